//! Repeated bodies and repeated facts, one after another and at once.

use futures::future::join_all;
use reach_shared::signing::meta_signature;
use reqwest::StatusCode;

use crate::harness::{APP_SECRET, TestIngress, fixture, status_body};

async fn row_counts(ingress: &TestIngress) -> [i64; 4] {
    [
        ingress.count("SELECT count(*) FROM inbound_webhooks").await,
        ingress.count("SELECT count(*) FROM events").await,
        ingress.count("SELECT count(*) FROM outbox").await,
        ingress.count("SELECT count(*) FROM messages").await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_body_twice_is_duplicate() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;
    let body = fixture("02_status_batch_with_failed.wire.json");

    let first = ingress.post_signed(&body).await;
    assert_eq!(first.status, StatusCode::OK, "first delivery");
    assert_eq!(first.outcome(), "accepted", "first delivery");
    let after_first = row_counts(&ingress).await;
    assert_eq!(after_first, [1, 4, 4, 3], "inbound rows, events, outbox rows, messages after the first delivery");

    let second = ingress.post_signed(&body).await;
    assert_eq!(second.status, StatusCode::OK, "second delivery");
    assert_eq!(second.json(), serde_json::json!({"status": "duplicate"}), "second delivery");
    assert_eq!(row_counts(&ingress).await, after_first, "the second delivery writes nothing");

    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_status_two_bodies_one_event() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let first = ingress.post_signed(&status_body("wamid.same", "delivered", 1_767_225_601)).await;
    assert_eq!(first.outcome(), "accepted", "first body");
    let second = ingress.post_signed(&status_body("wamid.same", "delivered", 1_767_225_999)).await;
    assert_eq!(second.status, StatusCode::OK, "second body");
    assert_eq!(second.outcome(), "accepted", "a different body is no duplicate, even without new events");

    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 2, "both bodies are stored");
    let events = ingress.events().await;
    assert_eq!(events.len(), 1, "one event for the one fact");
    assert_eq!(events[0].dedup_key, "status:wamid.same:delivered", "dedup key");
    ingress.assert_outbox_matches_events().await;

    ingress.finish().await;
}

/// Updates without an id of their own are keyed by content, so the same update with
/// other whitespace is the same fact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reformatted_update_same_event() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    for name in ["03_template_status_update", "04_phone_number_quality_update"] {
        let wire = ingress.post_signed(&fixture(&format!("{name}.wire.json"))).await;
        assert_eq!(wire.outcome(), "accepted", "{name} wire body");
        let pretty = ingress.post_signed(&fixture(&format!("{name}.pretty.json"))).await;
        assert_eq!(pretty.outcome(), "accepted", "{name} pretty body, signed over its own bytes");
    }

    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 4, "all four bodies are stored");
    assert_eq!(ingress.count("SELECT count(*) FROM events").await, 2, "one event per update");
    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_accept_once() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;
    let body = fixture("02_status_batch_with_failed.wire.json");
    let signature = meta_signature(APP_SECRET, &body);

    let replies = join_all((0..20).map(|_| ingress.post(body.clone(), Some(&signature)))).await;
    let statuses: Vec<StatusCode> = replies.iter().map(|reply| reply.status).collect();
    assert!(statuses.iter().all(|status| *status == StatusCode::OK), "every POST is answered 200: {statuses:?}");
    let outcomes: Vec<String> = replies.iter().map(|reply| reply.outcome()).collect();
    let accepted = outcomes.iter().filter(|outcome| *outcome == "accepted").count();
    let duplicate = outcomes.iter().filter(|outcome| *outcome == "duplicate").count();
    assert_eq!(accepted, 1, "exactly one POST is accepted: {outcomes:?}");
    assert_eq!(duplicate, 19, "every other POST is a duplicate: {outcomes:?}");

    assert_eq!(row_counts(&ingress).await, [1, 4, 4, 3], "inbound rows, events, outbox rows, messages");
    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_same_status_one_event() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let bodies: Vec<Vec<u8>> = (0..20).map(|n| status_body("wamid.racing", "delivered", 1_767_225_600 + n)).collect();
    let replies = join_all(bodies.iter().map(|body| ingress.post_signed(body))).await;
    for (n, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, StatusCode::OK, "body {n}: {:?}", String::from_utf8_lossy(&reply.body));
        assert_eq!(reply.outcome(), "accepted", "body {n}");
    }

    assert_eq!(row_counts(&ingress).await, [20, 1, 1, 1], "inbound rows, events, outbox rows, messages");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_statuses_keep_highest() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let bodies: Vec<Vec<u8>> = (0..21)
        .map(|n| status_body("wamid.mixed", ["sent", "delivered", "read"][n as usize % 3], 1_767_225_600 + n))
        .collect();
    let replies = join_all(bodies.iter().map(|body| ingress.post_signed(body))).await;
    for (n, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, StatusCode::OK, "body {n}: {:?}", String::from_utf8_lossy(&reply.body));
    }

    assert_eq!(ingress.count("SELECT count(*) FROM events").await, 3, "one event per status");
    let state = ingress.message_state("wamid.mixed").await;
    assert_eq!(state, Some(("read".to_owned(), 3, None)), "the message ends at the highest status");
    ingress.finish().await;
}
