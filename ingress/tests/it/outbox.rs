//! The outbox publisher of the ingress: rows into RabbitMQ with publisher confirms.

use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use reach_shared::testing;
use reqwest::StatusCode;
use uuid::Uuid;

use crate::harness::{DEADLINE, TestIngress, fixture, wait_for};

/// Takes `count` messages from `queue` with `basic.get`, acknowledging each, and fails
/// after [`DEADLINE`].
async fn take_messages(channel: &lapin::Channel, queue: &str, count: usize) -> Vec<Delivery> {
    let started = Instant::now();
    let mut deliveries = Vec::new();
    while deliveries.len() < count {
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} with {} of {count} messages on {queue}",
            deliveries.len()
        );
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap_or_else(|error| panic!("basic.get on {queue} failed: {error}"));
        match message {
            Some(message) => {
                message.delivery.acker.ack(BasicAckOptions::default()).await.expect("failed to ack a message");
                deliveries.push(message.delivery);
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    deliveries
}

fn outbox_id_header(delivery: &Delivery) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    headers.inner().iter().find(|(name, _)| name.as_str() == "outbox_id").and_then(|(_, value)| match value {
        AMQPValue::LongLongInt(id) => Some(*id),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_relay_queue() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let reply = ingress.post_signed(&fixture("02_status_batch_with_failed.wire.json")).await;
    assert_eq!(reply.status, StatusCode::OK, "fixture 02");
    let events = ingress.events().await;
    assert_eq!(events.len(), 4, "fixture 02 makes four events");

    let connection = reach_shared::amqp::connect(&testing::amqp_url(), "reach-ingress-it-consumer").await.expect("AMQP connection");
    let channel = connection.create_channel().await.expect("AMQP channel");
    let queue = ingress.topology.relay_queue.clone();
    assert!(queue.ends_with(".events.relay"), "relay queue name {queue}");
    let deliveries = take_messages(&channel, &queue, events.len()).await;

    let outbox = ingress.outbox().await;
    for delivery in &deliveries {
        let message_id = delivery.properties.message_id().as_ref().map(|id| id.as_str().to_owned());
        let message_id = message_id.expect("every message has a message_id");
        let event = events
            .iter()
            .find(|event| event.id.to_string() == message_id)
            .unwrap_or_else(|| panic!("message_id {message_id} is the id of a stored event"));
        event.assert_matches_payload(&delivery.data);
        assert_eq!(delivery.exchange.as_str(), ingress.topology.events_exchange, "exchange of {}", event.dedup_key);
        assert_eq!(delivery.routing_key.as_str(), event.event_type, "routing key of {}", event.dedup_key);
        let content_type = delivery.properties.content_type().as_ref().map(|t| t.as_str().to_owned());
        assert_eq!(content_type.as_deref(), Some("application/json"), "content type of {}", event.dedup_key);
        assert_eq!(*delivery.properties.delivery_mode(), Some(2), "{} is persistent", event.dedup_key);
        let row = outbox.iter().find(|row| row.message_id == event.id).expect("the event has an outbox row");
        assert_eq!(outbox_id_header(delivery), Some(row.id), "outbox_id header of {}", event.dedup_key);
    }
    let mut delivered_ids: Vec<String> = deliveries
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|id| id.as_str().to_owned()))
        .collect();
    delivered_ids.sort();
    delivered_ids.dedup();
    assert_eq!(delivered_ids.len(), events.len(), "each event is published once");

    let outbox = wait_for("every outbox row to be dispatched", || async {
        let rows = ingress.outbox().await;
        rows.iter().all(|row| row.state == "dispatched").then_some(rows)
    })
    .await;
    for row in &outbox {
        assert_eq!(row.attempts, 1, "row {} is dispatched at the first attempt", row.id);
        assert_eq!(row.last_error, None, "row {} has no error", row.id);
    }
    let dispatched_at_set = ingress.count("SELECT count(*) FROM outbox WHERE dispatched_at IS NOT NULL").await;
    assert_eq!(dispatched_at_set, 4, "dispatched rows record dispatched_at");

    // Confirms came before the rows were marked, so every message is in the queue by now.
    let extra = channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.expect("basic.get");
    assert!(extra.is_none(), "no message beyond one per event");

    let _ = connection.close(200, "done".into()).await;
    ingress.finish().await;
}

/// A row the broker cannot route is returned (mandatory publish), retried with backoff
/// and marked failed after `REACH_OUTBOX_MAX_ATTEMPTS`; rows behind it still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_row_marked_failed() {
    let ingress = TestIngress::start_with(&[("REACH_OUTBOX_MAX_ATTEMPTS", "2")]).await;
    ingress.provision_fixture_org().await;

    // The sends exchange is direct and bound only to shard numbers 0 to 7.
    let returned_id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (topic, routing_key, message_id, payload) VALUES ('send', 'no-such-shard', $1, '\\x7b7d') RETURNING id",
    )
    .bind(Uuid::new_v4())
    .fetch_one(&ingress.pool)
    .await
    .expect("insert an unroutable outbox row");
    let reply = ingress.post_signed(&fixture("01_inbound_text_unicode.wire.json")).await;
    assert_eq!(reply.status, StatusCode::OK, "fixture 01");

    let first = wait_for("the first attempt of the unroutable row", || async {
        let rows = ingress.outbox().await;
        rows.into_iter().find(|row| row.id == returned_id && row.attempts >= 1)
    })
    .await;
    assert_eq!(first.attempts, 1, "one attempt so far");
    assert_eq!(first.state, "pending", "the row is retried after one return");
    assert_eq!(first.last_error.as_deref(), Some("returned"), "the broker returned the row");
    let backoff = ingress.count(&format!("SELECT count(*) FROM outbox WHERE id = {returned_id} AND available_at > now()")).await;
    assert_eq!(backoff, 1, "the retry waits for available_at");

    wait_for("the event row to be dispatched", || async {
        let rows = ingress.outbox().await;
        rows.iter().any(|row| row.topic == "event" && row.state == "dispatched").then_some(())
    })
    .await;

    // Skip the backoff instead of waiting for it.
    sqlx::query("UPDATE outbox SET available_at = now() WHERE id = $1")
        .bind(returned_id)
        .execute(&ingress.pool)
        .await
        .expect("update available_at");
    let failed = wait_for("the unroutable row to be marked failed", || async {
        let rows = ingress.outbox().await;
        rows.into_iter().find(|row| row.id == returned_id && row.state != "pending")
    })
    .await;
    assert_eq!(failed.state, "failed", "the row fails after two returns");
    assert_eq!(failed.attempts, 2, "attempts");
    assert_eq!(failed.last_error.as_deref(), Some("returned"), "last_error");

    ingress.finish().await;
}

/// A row with a topic the publisher does not recognise is rejected without publishing,
/// and fails after `REACH_OUTBOX_MAX_ATTEMPTS` like a returned one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_row_marked_failed() {
    let ingress = TestIngress::start_with(&[("REACH_OUTBOX_MAX_ATTEMPTS", "1")]).await;

    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (topic, routing_key, message_id, payload) VALUES ('bogus', 'x', $1, '\\x7b7d') RETURNING id",
    )
    .bind(Uuid::new_v4())
    .fetch_one(&ingress.pool)
    .await
    .expect("insert an outbox row with an unknown topic");

    let row = wait_for("the row with an unknown topic to leave pending", || async {
        let rows = ingress.outbox().await;
        rows.into_iter().find(|row| row.id == id && row.state != "pending")
    })
    .await;
    assert_eq!(row.state, "failed", "state");
    assert_eq!(row.attempts, 1, "attempts");
    assert_eq!(row.last_error.as_deref(), Some("unknown_topic"), "last_error");

    ingress.finish().await;
}
