use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

/// Settings posting statuses to `receiver`, 30 ms apart, all read, in order, once.
fn webhook_settings(receiver: &WebhookReceiver) -> reach_meta_sim::SimSettings {
    let mut settings = settings();
    settings.webhook = Some(receiver.target());
    settings.status_delay = Duration::from_millis(30);
    settings.read_ratio = 1.0;
    settings
}

fn of_wamid<'a>(statuses: &'a [Value], wamid: &str) -> Vec<&'a Value> {
    statuses.iter().filter(|status| status["id"] == wamid).collect()
}

fn wamid_of(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json["messages"][0]["id"].as_str().unwrap().to_owned()
}

/// Waits until the stats satisfy `done`.
async fn wait_for_stats(
    sim: &TestSim,
    what: &str,
    done: impl Fn(&reach_meta_sim::SimStats) -> bool,
) -> reach_meta_sim::SimStats {
    let started = Instant::now();
    loop {
        let stats = sim.stats().await;
        if done(&stats) {
            return stats;
        }
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}; stats {stats:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn statuses_arrive_signed_in_meta_shape() {
    let receiver = WebhookReceiver::start(0).await;
    let sim = TestSim::start(webhook_settings(&receiver)).await;
    let mut body = text_body(RECIPIENT);
    body["biz_opaque_callback_data"] = json!("order/42 é");
    let wamid = wamid_of(&sim.send(PHONE, TOKEN, &body).await);

    let statuses =
        receiver.wait_for("sent, delivered and read", |statuses| of_wamid(statuses, &wamid).len() >= 3).await;
    let mine = of_wamid(&statuses, &wamid);
    let kinds: Vec<&str> = mine.iter().map(|status| status["status"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["sent", "delivered", "read"]);
    let mut previous_timestamp = 0;
    for status in &mine {
        assert_eq!(status["biz_opaque_callback_data"], "order/42 é");
        assert_eq!(status["recipient_id"], RECIPIENT);
        let timestamp: i64 = status["timestamp"].as_str().unwrap().parse().unwrap();
        assert!(timestamp >= previous_timestamp);
        assert!((timestamp - chrono::Utc::now().timestamp()).abs() < 60, "timestamp {timestamp} is not now");
        previous_timestamp = timestamp;
    }
    assert_eq!(mine[0]["pricing"]["pricing_model"], "PMP");
    assert_eq!(mine[0]["conversation"]["id"].as_str().unwrap().len(), 32);
    assert!(mine[1]["pricing"].is_object());
    assert!(mine[2].get("pricing").is_none());

    let webhook = &receiver.received()[0];
    assert_eq!(webhook.json["object"], "whatsapp_business_account");
    assert_eq!(webhook.json["entry"][0]["id"], WABA);
    let change = &webhook.json["entry"][0]["changes"][0];
    assert_eq!(change["field"], "messages");
    assert_eq!(change["value"]["messaging_product"], "whatsapp");
    assert_eq!(change["value"]["metadata"]["display_phone_number"], "15550001111");
    assert_eq!(change["value"]["metadata"]["phone_number_id"], PHONE);
    let raw = String::from_utf8(webhook.body.to_vec()).unwrap();
    assert!(raw.contains(r#""order\/42 \u00e9""#), "body is not in Meta's escaped form: {raw}");
    assert!(!raw.contains('\n'), "body is not compact: {raw}");
    assert_eq!(receiver.bad_signatures(), 0);

    let stats = wait_for_stats(&sim, "three statuses posted", |stats| stats.statuses_posted == 3).await;
    assert!(stats.status_webhooks_posted >= 1);
    assert_eq!(stats.statuses_dropped, 0);
    assert_eq!(stats.statuses_pending, 0);
    sim.stop().await;
}

#[tokio::test]
async fn due_statuses_share_a_body() {
    let receiver = WebhookReceiver::start(0).await;
    let mut settings = webhook_settings(&receiver);
    settings.status_delay = Duration::from_millis(150);
    let sim = TestSim::start(settings).await;
    for i in 0..10 {
        wamid_of(&sim.send_text(&format!("155500030{i:02}")).await);
    }
    receiver.wait_for("30 statuses", |statuses| statuses.len() >= 30).await;
    let sizes: Vec<usize> = receiver
        .received()
        .iter()
        .map(|webhook| webhook.json["entry"][0]["changes"][0]["value"]["statuses"].as_array().unwrap().len())
        .collect();
    assert!(sizes.iter().all(|size| *size <= 50), "{sizes:?}");
    assert!(sizes.len() < 30, "30 statuses took {} bodies: {sizes:?}", sizes.len());
    sim.stop().await;
}

#[tokio::test]
async fn duplicate_ratio_one_posts_each_body_twice() {
    let receiver = WebhookReceiver::start(0).await;
    let mut settings = webhook_settings(&receiver);
    settings.duplicate_ratio = 1.0;
    let sim = TestSim::start(settings).await;
    let wamid = wamid_of(&sim.send_text(RECIPIENT).await);

    receiver.wait_for("each status twice", |statuses| of_wamid(statuses, &wamid).len() >= 6).await;
    wait_for_stats(&sim, "nothing pending", |stats| stats.statuses_pending == 0).await;
    let mut copies: HashMap<Vec<u8>, usize> = HashMap::new();
    for webhook in receiver.received() {
        *copies.entry(webhook.body.to_vec()).or_default() += 1;
    }
    assert!(copies.values().all(|count| *count == 2), "copies per body: {:?}", copies.values().collect::<Vec<_>>());
    let statuses = receiver.statuses();
    for kind in ["sent", "delivered", "read"] {
        let count = of_wamid(&statuses, &wamid).iter().filter(|status| status["status"] == kind).count();
        assert_eq!(count, 2, "{kind}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn status_failed_rule_sends_failed() {
    let receiver = WebhookReceiver::start(0).await;
    let sim = TestSim::start(webhook_settings(&receiver)).await;
    let set = sim.post_rules(&format!(r#"[{{"to":"{RECIPIENT}","kind":"status_failed","error_code":131026}}]"#)).await;
    assert_eq!(set.status, 200, "{}", set.text);
    let failed_wamid = wamid_of(&sim.send_text(RECIPIENT).await);
    let fine_wamid = wamid_of(&sim.send_text("15550004444").await);

    let statuses = receiver
        .wait_for("failed and read", |statuses| {
            of_wamid(statuses, &failed_wamid).len() >= 2 && of_wamid(statuses, &fine_wamid).len() >= 3
        })
        .await;
    let failed: Vec<&str> =
        of_wamid(&statuses, &failed_wamid).iter().map(|status| status["status"].as_str().unwrap()).collect();
    assert_eq!(failed, ["sent", "failed"]);
    let error = &of_wamid(&statuses, &failed_wamid)[1]["errors"][0];
    assert_eq!(error["code"], 131026);
    assert_eq!(error["title"], "Message undeliverable");
    assert!(error["error_data"]["details"].is_string());

    // Nothing more arrives for the failed message.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(of_wamid(&receiver.statuses(), &failed_wamid).len(), 2);
    let stats = sim.stats().await;
    assert_eq!(stats.phone_numbers[PHONE].accepted, 2);
    assert_eq!(stats.phone_numbers[PHONE].injected_failed_statuses, 1);
    sim.stop().await;
}

#[tokio::test]
async fn read_ratio_zero_sends_no_read() {
    let receiver = WebhookReceiver::start(0).await;
    let mut settings = webhook_settings(&receiver);
    settings.read_ratio = 0.0;
    let sim = TestSim::start(settings).await;
    let wamid = wamid_of(&sim.send_text(RECIPIENT).await);
    receiver.wait_for("delivered", |statuses| of_wamid(statuses, &wamid).len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let kinds: Vec<String> =
        of_wamid(&receiver.statuses(), &wamid).iter().map(|status| status["status"].to_string()).collect();
    assert_eq!(kinds, ["\"sent\"", "\"delivered\""]);
    sim.stop().await;
}

#[tokio::test]
async fn reorder_ratio_one_shuffles_arrival() {
    let receiver = WebhookReceiver::start(0).await;
    let mut settings = webhook_settings(&receiver);
    settings.reorder_ratio = 1.0;
    let sim = TestSim::start(settings).await;
    let mut wamids = Vec::new();
    for i in 0..12 {
        wamids.push(wamid_of(&sim.send_text(&format!("155500050{i:02}")).await));
    }
    let statuses = receiver.wait_for("36 statuses", |statuses| statuses.len() >= 36).await;

    let mut out_of_order = 0;
    for wamid in &wamids {
        let mine = of_wamid(&statuses, wamid);
        assert_eq!(mine.len(), 3, "{wamid}");
        if mine[0]["status"] != "sent" || mine[1]["status"] != "delivered" {
            out_of_order += 1;
        }
        // The timestamps keep the true order whatever the arrival order.
        let timestamp = |kind: &str| -> i64 {
            let status = mine.iter().find(|status| status["status"] == kind).unwrap();
            status["timestamp"].as_str().unwrap().parse().unwrap()
        };
        assert!(timestamp("sent") <= timestamp("delivered"));
        assert!(timestamp("delivered") <= timestamp("read"));
    }
    // Each message keeps the true order with chance 1/6, so all 12 do with chance 6^-12.
    assert!(out_of_order > 0, "no message arrived out of order");
    sim.stop().await;
}

#[tokio::test]
async fn failed_posts_are_retried() {
    let receiver = WebhookReceiver::start(2).await;
    let sim = TestSim::start(webhook_settings(&receiver)).await;
    let wamid = wamid_of(&sim.send_text(RECIPIENT).await);
    receiver.wait_for("all three statuses", |statuses| of_wamid(statuses, &wamid).len() >= 3).await;
    let stats = wait_for_stats(&sim, "three statuses posted", |stats| stats.statuses_posted == 3).await;
    assert_eq!(stats.status_webhooks_failed_attempts, 2);
    assert_eq!(stats.statuses_dropped, 0);
    sim.stop().await;
}

#[tokio::test]
async fn statuses_dropped_after_last_attempt() {
    let receiver = WebhookReceiver::start(u32::MAX).await;
    let mut settings = webhook_settings(&receiver);
    settings.webhook_max_attempts = 2;
    settings.read_ratio = 0.0;
    let sim = TestSim::start(settings).await;
    wamid_of(&sim.send_text(RECIPIENT).await);
    let stats = wait_for_stats(&sim, "two statuses dropped", |stats| stats.statuses_dropped == 2).await;
    assert_eq!(stats.statuses_posted, 0);
    assert_eq!(stats.statuses_pending, 0);
    // Sent and delivered fall due 30 ms apart, so they are two bodies of two attempts each.
    assert_eq!(stats.status_webhooks_failed_attempts, 4);
    assert!(receiver.received().is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn pending_bound_drops_excess() {
    let receiver = WebhookReceiver::start(0).await;
    let mut settings = webhook_settings(&receiver);
    settings.max_pending_statuses = 3;
    settings.status_delay = Duration::from_millis(500);
    let sim = TestSim::start(settings).await;
    for i in 0..3 {
        wamid_of(&sim.send_text(&format!("155500060{i:02}")).await);
    }
    let stats = wait_for_stats(&sim, "six statuses dropped", |stats| stats.statuses_dropped == 6).await;
    assert_eq!(stats.statuses_pending, 3);
    receiver.wait_for("the first message's statuses", |statuses| statuses.len() >= 3).await;
    let stats = wait_for_stats(&sim, "three posted", |stats| stats.statuses_posted == 3).await;
    assert_eq!(stats.statuses_dropped, 6);
    sim.stop().await;
}
