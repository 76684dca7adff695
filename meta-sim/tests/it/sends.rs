use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn text_send_returns_wamid() {
    let sim = TestSim::start(settings()).await;
    let reply = sim.send_text("+1 (555) 000-2222").await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json["messaging_product"], "whatsapp");
    assert_eq!(reply.json["contacts"][0]["input"], "+1 (555) 000-2222");
    assert_eq!(reply.json["contacts"][0]["wa_id"], RECIPIENT);
    let wamid = reply.json["messages"][0]["id"].as_str().unwrap();
    assert!(wamid.starts_with("wamid.HBgL"), "{wamid}");
    assert!((50..=70).contains(&wamid.len()), "{wamid} has {} characters", wamid.len());
    assert!(reply.json["messages"][0].get("message_status").is_none());

    let second = sim.send_text(RECIPIENT).await;
    assert_ne!(second.json["messages"][0]["id"], reply.json["messages"][0]["id"]);

    let stats = sim.stats().await;
    assert_eq!(stats.phone_numbers[PHONE].accepted, 2);
    assert!(stats.phone_numbers[PHONE].first_accepted_at.is_some());
    assert!(stats.phone_numbers[PHONE].mean_rate.is_some());
    assert_eq!(stats.phone_numbers[OTHER_PHONE].accepted, 0);
    assert_eq!(stats.phone_numbers[OTHER_PHONE].mean_rate, None);
    sim.stop().await;
}

#[tokio::test]
async fn template_send_is_accepted() {
    let sim = TestSim::start(settings()).await;
    let body = json!({
        "messaging_product": "whatsapp",
        "to": RECIPIENT,
        "type": "template",
        "template": {"name": "order_shipped", "language": {"code": "en_US"}, "components": []}
    });
    let reply = sim.send(PHONE, TOKEN, &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json["messages"][0]["message_status"], "accepted");
    sim.stop().await;
}

#[tokio::test]
async fn invalid_bodies_name_the_field() {
    let sim = TestSim::start(settings()).await;
    let too_long = "x".repeat(4097);
    let cases: Vec<(Vec<u8>, u64, &str)> = vec![
        (b"{not json".to_vec(), 100, "Invalid request body"),
        (
            json!({"to": RECIPIENT, "type": "text", "text": {"body": "x"}}).to_string().into_bytes(),
            100,
            "messaging_product",
        ),
        (
            json!({"messaging_product": "whatsapp", "type": "text", "text": {"body": "x"}}).to_string().into_bytes(),
            100,
            "parameter to",
        ),
        (
            json!({"messaging_product": "whatsapp", "to": RECIPIENT, "text": {"body": "x"}}).to_string().into_bytes(),
            100,
            "parameter type",
        ),
        (
            json!({"messaging_product": "whatsapp", "to": RECIPIENT, "type": "text", "text": {"body": too_long}})
                .to_string()
                .into_bytes(),
            100,
            "text['body']",
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "call me", "type": "text", "text": {"body": "x"}})
                .to_string()
                .into_bytes(),
            131009,
            "Param to",
        ),
    ];
    for (body, code, field) in &cases {
        let reply = sim.send_raw(PHONE, Some(TOKEN), body.clone()).await;
        let request = String::from_utf8_lossy(body);
        assert_eq!(reply.status, 400, "{request}");
        assert_eq!(reply.error_code(), Some(*code), "{request}: {}", reply.text);
        let error = &reply.json["error"];
        let text = format!("{} {}", error["message"], error["error_data"]["details"]);
        assert!(text.contains(field), "{request}: {text} does not name {field}");
        assert_eq!(error["error_data"]["messaging_product"], "whatsapp");
    }
    let stats = sim.stats().await;
    assert_eq!(stats.phone_numbers[PHONE].invalid_requests, cases.len() as u64);
    assert_eq!(stats.phone_numbers[PHONE].accepted, 0);
    sim.stop().await;
}

#[tokio::test]
async fn bad_version_is_rejected() {
    let sim = TestSim::start(settings()).await;
    let response = sim
        .client
        .post(sim.url(&format!("/latest/{PHONE}/messages")))
        .bearer_auth(TOKEN)
        .json(&text_body(RECIPIENT))
        .send()
        .await
        .unwrap();
    let reply = read(response).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error_code(), Some(100));
    assert!(reply.text.contains("vNN.N"), "{}", reply.text);
    sim.stop().await;
}

#[tokio::test]
async fn latency_delays_every_response() {
    let mut settings = settings();
    settings.latency_min = Duration::from_millis(150);
    settings.latency_max = Duration::from_millis(200);
    let sim = TestSim::start(settings).await;
    for token in [TOKEN, "wrong"] {
        let started = Instant::now();
        let reply = sim.send(PHONE, token, &text_body(RECIPIENT)).await;
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(150), "{token}: responded after {elapsed:?}");
        assert!(elapsed < Duration::from_millis(1000), "{token}: responded after {elapsed:?}");
        assert!(reply.status == 200 || reply.status == 401);
    }
    sim.stop().await;
}

#[tokio::test]
async fn admin_endpoints_respond() {
    let sim = TestSim::start(settings()).await;
    let livez = sim.client.get(sim.url("/livez")).send().await.unwrap();
    assert_eq!(livez.status(), 200);

    assert_eq!(sim.send_text(RECIPIENT).await.status, 200);
    assert_eq!(sim.stats().await.phone_numbers[PHONE].accepted, 1);
    let reset = sim.client.post(sim.url("/sim/reset")).send().await.unwrap();
    assert_eq!(reset.status(), 204);
    let stats = sim.stats().await;
    assert_eq!(stats.phone_numbers[PHONE].accepted, 0);
    assert_eq!(stats.phone_numbers[PHONE].peak_one_second, 0);
    assert_eq!(stats.phone_numbers[PHONE].first_accepted_at, None);
    sim.stop().await;
}
