use std::time::{Duration, Instant};

use reach_meta_sim::{Rule, RuleOutcome};

use crate::harness::*;

#[tokio::test]
async fn error_rule_applies_times_then_stops() {
    let sim = TestSim::start(settings()).await;
    let set = sim
        .post_rules(&format!(r#"{{"rules":[{{"to":"{RECIPIENT}","error_code":131026,"http_status":400,"times":2}}]}}"#))
        .await;
    assert_eq!(set.status, 200, "{}", set.text);

    for attempt in 0..2 {
        let reply = sim.send_text(RECIPIENT).await;
        assert_eq!(reply.status, 400, "attempt {attempt}");
        assert_eq!(reply.error_code(), Some(131026), "attempt {attempt}");
        assert_eq!(reply.json["error"]["message"], "(#131026) Message undeliverable");
    }
    assert_eq!(sim.send_text("15550009999").await.status, 200, "another recipient is not matched");
    assert_eq!(sim.send_text(RECIPIENT).await.status, 200, "the rule is used up after two sends");

    let rules = sim.client.get(sim.url("/sim/rules")).send().await.unwrap();
    let view: reach_meta_sim::RulesView = rules.json().await.unwrap();
    assert_eq!(view.rules.len(), 1);
    assert_eq!(view.rules[0].applied, 2);
    assert_eq!(view.rules[0].rule.outcome, RuleOutcome::MetaError { error_code: 131026, http_status: 400 });
    assert_eq!(sim.stats().await.phone_numbers[PHONE].injected_errors, 2);
    sim.stop().await;
}

#[tokio::test]
async fn http_5xx_rule_returns_plain_text() {
    let sim = TestSim::start(settings()).await;
    let set =
        sim.post_rules(&format!(r#"[{{"phone_number_id":"{PHONE}","kind":"http_5xx","http_status":503}}]"#)).await;
    assert_eq!(set.status, 200, "{}", set.text);
    let reply = sim.send_text(RECIPIENT).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json, serde_json::Value::Null, "body {:?} should not be JSON", reply.text);
    let other = sim.send(OTHER_PHONE, OTHER_TOKEN, &text_body(RECIPIENT)).await;
    assert_eq!(other.status, 200);
    sim.stop().await;
}

#[tokio::test]
async fn timeout_rule_never_responds() {
    let mut settings = settings();
    settings.rules =
        Rule::parse_list(format!(r#"[{{"to":"{RECIPIENT}","kind":"timeout","times":1}}]"#).as_bytes()).unwrap();
    let sim = TestSim::start(settings).await;

    let started = Instant::now();
    let result = sim
        .client
        .post(sim.url(&format!("/v21.0/{PHONE}/messages")))
        .bearer_auth(TOKEN)
        .json(&text_body(RECIPIENT))
        .timeout(Duration::from_millis(400))
        .send()
        .await;
    let error = result.expect_err("a timeout rule must not respond");
    assert!(error.is_timeout(), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));

    assert_eq!(sim.send_text(RECIPIENT).await.status, 200, "the rule applied once");
    assert_eq!(sim.stats().await.phone_numbers[PHONE].injected_errors, 1);
    sim.stop().await;
}

#[tokio::test]
async fn hanging_request_does_not_block_shutdown() {
    let mut settings = settings();
    settings.rules = Rule::parse_list(br#"[{"phone_number_id":"200000000000001","kind":"timeout"}]"#).unwrap();
    let sim = TestSim::start(settings).await;
    let request =
        sim.client.post(sim.url(&format!("/v21.0/{PHONE}/messages"))).bearer_auth(TOKEN).json(&text_body(RECIPIENT));
    let hanging = tokio::spawn(async move { request.send().await.map(|response| response.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    sim.stop().await;
    let status = tokio::time::timeout(DEADLINE, hanging).await.expect("the hanging request ends").unwrap();
    assert_eq!(status.ok(), Some(503));
}

#[tokio::test]
async fn invalid_rules_are_422() {
    let sim = TestSim::start(settings()).await;
    let cases = [
        (r#"{"rules":[{"to":"1","error_code":131026},{"kind":"timeout"}]}"#, "rules[1]"),
        (r#"[{"to":"1","kind":"http_5xx","http_status":404}]"#, "between 500 and 599"),
        (r#"[{"to":"1","kind":"explode"}]"#, "unknown kind"),
        (r#"[{"to":"1"}]"#, "error_code is required"),
        ("not json", "not valid JSON"),
    ];
    for (body, expected) in cases {
        let reply = sim.post_rules(body).await;
        assert_eq!(reply.status, 422, "{body}");
        let error = reply.json["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{body}: {error:?} does not mention {expected:?}");
    }
    // A rejected document changes nothing.
    let rules = sim.client.get(sim.url("/sim/rules")).send().await.unwrap();
    let view: reach_meta_sim::RulesView = rules.json().await.unwrap();
    assert!(view.rules.is_empty());
    sim.stop().await;
}
