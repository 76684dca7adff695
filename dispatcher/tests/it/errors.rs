//! Every class of Graph API error against the simulator's injection rules.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Fleet, Options, number};

const PHONE: &str = "140000000000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_fails_message() {
    let fleet = Fleet::start(Options { numbers: vec![number(PHONE, 80)], ..Options::default() }).await;
    fleet.set_rules(json!([{"to": "15550500001", "error_code": 131026}, {"to": "15550500002", "error_code": 132001}])).await;
    let undeliverable = fleet.send_text(PHONE, "15550500001").await;
    let bad_template = fleet.send_text(PHONE, "15550500002").await;
    let fine = fleet.send_text(PHONE, "15550500003").await;
    fleet.wait_for_count("SELECT count(*) FROM outbound_messages WHERE state = 'failed'", 2).await;

    for (id, code) in [(undeliverable, 131026), (bad_template, 132001)] {
        let row = fleet.state(id).await;
        assert_eq!(row.error_code, Some(code));
        assert_eq!(row.failure_reason.as_deref(), Some("permanent_error"));
        assert!(!row.parked, "a permanent error is not replayable");
        assert_eq!(row.attempt_count, 1, "never retried");
    }
    let failed_events = fleet.count("SELECT count(*) FROM events WHERE type = 'message.failed' AND (data->'errors'->0->>'code')::int IN (131026, 132001)").await;
    assert_eq!(failed_events, 2, "one message.failed each");
    fleet.wait_for_count(&format!("SELECT count(*) FROM outbound_messages WHERE id = '{fine}' AND state_rank >= 1"), 1).await;
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_retry_then_park() {
    let fleet = Fleet::start(Options {
        numbers: vec![number(PHONE, 80)],
        dispatcher_env: vec![("REACH_DISPATCHER_MAX_ATTEMPTS", "3".to_owned())],
        ..Options::default()
    })
    .await;
    fleet
        .set_rules(json!([
            {"to": "15550510001", "kind": "http_5xx", "http_status": 503, "times": 2},
            {"to": "15550510002", "error_code": 131000, "http_status": 500, "times": 1},
            {"to": "15550510003", "kind": "http_5xx", "http_status": 502}
        ]))
        .await;
    let recovers = fleet.send_text(PHONE, "15550510001").await;
    let recovers_coded = fleet.send_text(PHONE, "15550510002").await;
    let never = fleet.send_text(PHONE, "15550510003").await;

    fleet.wait_for_count(&format!("SELECT count(*) FROM outbound_messages WHERE id IN ('{recovers}', '{recovers_coded}') AND state_rank >= 1"), 2).await;
    assert_eq!(fleet.state(recovers).await.attempt_count, 3, "two 503s, then accepted");
    assert_eq!(fleet.state(recovers_coded).await.attempt_count, 2);

    fleet.wait_for_count(&format!("SELECT count(*) FROM outbound_messages WHERE id = '{never}' AND state = 'failed'"), 1).await;
    let parked = fleet.state(never).await;
    assert!(parked.parked, "exhausted retries park the message");
    assert_eq!(parked.failure_reason.as_deref(), Some("retries_exhausted"));
    assert_eq!(parked.attempt_count, 3);

    // The operator replays it once the endpoint works again.
    fleet.set_rules(json!([])).await;
    let selection = reach_shared::parked_messages::Selection { ids: vec![never], ..Default::default() };
    let replayed = reach_shared::parked_messages::replay(&fleet.pool, &selection, "Graph API outage over", "ops", crate::harness::SHARDS).await.unwrap();
    assert_eq!(replayed, 1);
    fleet.wait_for_count(&format!("SELECT count(*) FROM outbound_messages WHERE id = '{never}' AND state_rank BETWEEN 1 AND 4"), 1).await;
    let audit = fleet.count("SELECT count(*) FROM platform.audit_events WHERE action = 'ParkedMessages.Replay'").await;
    assert_eq!(audit, 1, "the replay is audited");
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_slows_and_retries() {
    let fleet = Fleet::start(Options { numbers: vec![number(PHONE, 80)], ..Options::default() }).await;
    fleet.set_rules(json!([{"phone_number_id": PHONE, "error_code": 130429, "times": 3}, {"phone_number_id": PHONE, "error_code": 80007, "times": 1}])).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(fleet.send_text(PHONE, &format!("1555052{n:04}")).await);
    }
    fleet.wait_for_count("SELECT count(*) FROM outbound_messages WHERE state_rank BETWEEN 1 AND 4", 10).await;
    let attempts: i64 = fleet.count("SELECT sum(attempt_count) FROM outbound_messages").await;
    assert_eq!(attempts, 14, "four throttled attempts were retried");
    for id in ids {
        assert!(fleet.state(id).await.wamid.is_some());
    }
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_rate_delays_only_recipient() {
    let fleet = Fleet::start(Options {
        numbers: vec![number(PHONE, 20)],
        pair_interval: Duration::from_millis(1500),
        dispatcher_env: vec![("REACH_DISPATCHER_PAIR_RATE_DELAY_MS", "1600".to_owned())],
        ..Options::default()
    })
    .await;
    let started = chrono::Utc::now();
    let mut same = Vec::new();
    for _ in 0..3 {
        same.push(fleet.send_text(PHONE, "15550530000").await);
    }
    let mut others = Vec::new();
    for n in 1..=20 {
        others.push(fleet.send_text(PHONE, &format!("1555053{n:04}")).await);
    }
    fleet.wait_for_count("SELECT count(*) FROM outbound_messages WHERE state_rank BETWEEN 1 AND 4", 23).await;

    // Twenty other recipients at 20 MPS take about a second, not the pair delays.
    let mut latest_other = started;
    for id in &others {
        latest_other = latest_other.max(fleet.state(*id).await.accepted_at.unwrap());
    }
    assert!(latest_other - started < chrono::Duration::milliseconds(2500), "other recipients were held back: {:?}", latest_other - started);
    let mut accepted: Vec<_> = Vec::new();
    for id in &same {
        accepted.push(fleet.state(*id).await.accepted_at.unwrap());
    }
    accepted.sort();
    assert!(accepted[2] - accepted[0] >= chrono::Duration::milliseconds(3000), "the recipient's messages were spaced by the pair rate");
    let stats = fleet.sim_stats().await;
    assert!(stats.phone_numbers[PHONE].rejected_pair_rate >= 2, "Meta answered 131056");
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_error_pauses_number() {
    let other = "140000000000002";
    let fleet = Fleet::start(Options {
        numbers: vec![number(PHONE, 80), number(other, 80)],
        dispatcher_env: vec![("REACH_DISPATCHER_PAUSE_MS", "600000".to_owned())],
        ..Options::default()
    })
    .await;
    fleet.set_rules(json!([{"phone_number_id": PHONE, "error_code": 131048, "times": 1}])).await;
    let first = fleet.send_text(PHONE, "15550540001").await;
    fleet.wait_for_count(&format!("SELECT count(*) FROM phone_numbers WHERE phone_number_id = '{PHONE}' AND sending_paused_until > now()"), 1).await;
    let mut waiting = vec![first];
    for n in 2..6 {
        waiting.push(fleet.send_text(PHONE, &format!("1555054{n:04}")).await);
    }
    let unaffected = fleet.send_text(other, "15550549999").await;
    fleet.wait_for_count(&format!("SELECT count(*) FROM outbound_messages WHERE id = '{unaffected}' AND state_rank >= 1"), 1).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    for id in &waiting {
        let row = fleet.state(*id).await;
        assert_eq!(row.state, "queued", "a paused number's messages stay queued");
        assert_eq!(row.attempt_count, 0, "the paused attempt is not counted against the message");
    }
    let paused_events = fleet.count("SELECT count(*) FROM events WHERE type = 'account.updated' AND data->>'event' = 'SENDING_PAUSED'").await;
    assert_eq!(paused_events, 1, "the pause is announced once");

    let resumed = reach_shared::parked_messages::resume_phone_number(&fleet.pool, PHONE, "spam limit lifted", "ops").await.unwrap();
    assert!(resumed);
    fleet.wait_for_count(&format!("SELECT count(*) FROM outbound_messages WHERE phone_number_id = '{PHONE}' AND state_rank BETWEEN 1 AND 4"), 5).await;
    fleet.finish().await;
}
