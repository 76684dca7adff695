//! Fan-out by org and event type, and what each callback carries.

use std::collections::BTreeSet;

use chrono::Utc;
use reach_shared::events::{Event, EventType};
use sqlx::Row;
use uuid::Uuid;

use crate::harness::{Harness, Sub, event, org_file, wait_for};
use crate::subscriber::{Reply, Subscriber};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_by_type_and_org() {
    let h = Harness::start(&[]).await;
    let all = Subscriber::start(Reply::status(204)).await;
    let received_only = Subscriber::start(Reply::status(200)).await;
    let read_only = Subscriber::start(Reply::status(202)).await;
    let other_org_all = Subscriber::start(Reply::status(204)).await;
    let sub_all = Sub::new(&all.url, &["*"]);
    let sub_received = Sub::new(&received_only.url, &["message.received"]);
    let sub_read = Sub::new(&read_only.url, &["message.read"]);
    let sub_other = Sub::new(&other_org_all.url, &["*"]);
    let org = h.provision_org(&[&sub_all, &sub_received, &sub_read]).await;
    let other_org = h.provision_org(&[&sub_other]).await;

    let org_events = vec![
        event(org, EventType::MessageReceived),
        event(org, EventType::MessageRead),
        event(org, EventType::MessageReceived),
        event(org, EventType::MessageSent),
        event(org, EventType::TemplateStatusUpdated),
    ];
    let other_events = vec![event(other_org, EventType::MessageReceived), event(other_org, EventType::AccountUpdated)];
    let published: Vec<Event> = org_events.iter().chain(&other_events).cloned().collect();
    h.publish(&published).await;

    let of_type = |events: &[Event], t: EventType| -> Vec<Event> { events.iter().filter(|e| e.event_type == t).cloned().collect() };
    let expected: Vec<(&str, &Sub, &Subscriber, Vec<Event>)> = vec![
        ("the * subscription", &sub_all, &all, org_events.clone()),
        ("the message.received subscription", &sub_received, &received_only, of_type(&org_events, EventType::MessageReceived)),
        ("the message.read subscription", &sub_read, &read_only, of_type(&org_events, EventType::MessageRead)),
        ("the other org's * subscription", &sub_other, &other_org_all, other_events.clone()),
    ];
    let expected_pairs: BTreeSet<(Uuid, Uuid)> =
        expected.iter().flat_map(|(_, sub, _, events)| events.iter().map(|e| (e.id, sub.id))).collect();

    let deliveries = wait_for("every matching delivery to be delivered", || async {
        let rows = h.deliveries().await;
        (rows.len() >= expected_pairs.len() && rows.iter().all(|d| d.status == "delivered")).then_some(rows)
    })
    .await;
    let pairs: Vec<(Uuid, Uuid)> = deliveries.iter().map(|d| (d.event_id, d.subscription_id)).collect();
    assert_eq!(pairs.len(), expected_pairs.len(), "one delivery row per matching (event, subscription) pair: {pairs:?}");
    assert_eq!(pairs.iter().copied().collect::<BTreeSet<_>>(), expected_pairs, "delivery rows are exactly the matching pairs");

    for (name, sub, endpoint, events) in &expected {
        let received = endpoint.received();
        let ids: BTreeSet<Uuid> = received.iter().map(|r| r.webhook_id()).collect();
        let wanted: BTreeSet<Uuid> = events.iter().map(|e| e.id).collect();
        assert_eq!(received.len(), events.len(), "{name} gets each matching event once");
        assert_eq!(ids, wanted, "{name} gets exactly the matching events, by webhook-id");
        for request in &received {
            let published = events.iter().find(|e| e.id == request.webhook_id()).expect("checked above");
            assert_eq!(request.event(), *published, "{name}: the body parses as the published event");
            assert_eq!(request.body.as_ref(), published.to_body().as_slice(), "{name}: the body is the published bytes");
            assert!(request.verifies(&sub.secret), "{name}: the signature verifies with the subscription's secret");
            assert_eq!(request.header("content-type"), "application/json", "{name}: content type");
            let skew = (Utc::now().timestamp() - request.timestamp()).abs();
            assert!(skew < 60, "{name}: webhook-timestamp is {skew} s away from now");
            assert_eq!(request.path, "/hook", "{name}: the callback goes to the subscription's path");
        }
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_secret_signs_twice() {
    let h = Harness::start(&[]).await;
    let endpoint = Subscriber::start(Reply::status(204)).await;
    let old = Sub::new(&endpoint.url, &["*"]);
    let org = h.provision_org(&[&old]).await;
    let new = old.rotated();
    h.provision(org_file(org, &[&new])).await;

    let expiry: Vec<Option<f64>> = sqlx::query(
        "SELECT extract(epoch FROM expires_at - now())::float8 AS seconds_left FROM webhook_subscription_secrets
         WHERE subscription_id = $1 ORDER BY id",
    )
    .bind(old.id)
    .fetch_all(&h.pool)
    .await
    .expect("failed to read secrets")
    .iter()
    .map(|row| row.get("seconds_left"))
    .collect();
    assert_eq!(expiry.len(), 2, "the rotation keeps both secrets: {expiry:?}");
    let old_left = expiry[0].expect("the old secret has an expiry");
    assert!((23.0 * 3600.0..=24.0 * 3600.0).contains(&old_left), "the old secret stays active about 24 h, {old_left} s left");
    assert_eq!(expiry[1], None, "the new secret does not expire");

    let e = event(org, EventType::MessageDelivered);
    h.publish(std::slice::from_ref(&e)).await;
    h.wait_delivery(e.id, old.id, "delivered").await;
    let received = endpoint.received();
    assert_eq!(received.len(), 1, "one callback");
    let header = received[0].header("webhook-signature");
    let entries: Vec<&str> = header.split(' ').collect();
    assert_eq!(entries.len(), 2, "one signature per active secret: {header:?}");
    assert!(entries.iter().all(|e| e.starts_with("v1,")), "every entry is v1: {header:?}");
    assert!(received[0].verifies(&old.secret), "the old secret verifies during the rotation");
    assert!(received[0].verifies(&new.secret), "the new secret verifies");
    let stranger = Sub::new(&endpoint.url, &["*"]);
    assert!(!received[0].verifies(&stranger.secret), "an unrelated secret does not verify");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_subscription_applies_at_once() {
    // A cache lifetime of ten minutes: only the change notification can refresh it.
    let h = Harness::start(&[("REACH_RELAY_SUBSCRIPTION_CACHE_MS", "600000")]).await;
    let first = Subscriber::start(Reply::status(204)).await;
    let second = Subscriber::start(Reply::status(204)).await;
    let sub_first = Sub::new(&first.url, &["*"]);
    let sub_second = Sub::new(&second.url, &["*"]);
    let org = h.provision_org(&[&sub_first]).await;

    let before = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&before)).await;
    h.wait_delivery(before.id, sub_first.id, "delivered").await;

    // The org's subscriptions are cached now; a new one is announced at commit.
    h.provision(org_file(org, &[&sub_first, &sub_second])).await;
    let after = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&after)).await;
    h.wait_delivery(after.id, sub_second.id, "delivered").await;
    h.wait_delivery(after.id, sub_first.id, "delivered").await;
    assert!(h.delivery(before.id, sub_second.id).await.is_none(), "an event from before the subscription is not delivered to it");
    h.finish().await;
}
