//! A slow endpoint stalls neither the queue nor the other subscriptions' callbacks.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reach_shared::events::{Event, EventType};
use uuid::Uuid;

use crate::harness::{Harness, Sub, event, wait_for};
use crate::subscriber::{Reply, Subscriber};

const EVENTS: usize = 300;
const SLOW: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endpoint_isolated() {
    // A prefetch well below the event count: if first attempts waited for the slow
    // endpoint, the unacknowledged messages would fill it and stall every callback.
    let h = Harness::start(&[
        ("REACH_RELAY_PREFETCH", "32"),
        ("REACH_RELAY_SUBSCRIPTION_IN_FLIGHT", "4"),
        ("REACH_RELAY_OVERFLOW_AFTER_MS", "50"),
        ("REACH_RELAY_REQUEST_TIMEOUT_MS", "5000"),
        ("REACH_RELAY_CLAIM_LEASE_MS", "10000"),
        ("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "1,1,1"),
    ])
    .await;
    let slow = Subscriber::start(Reply::status(204).delay(SLOW)).await;
    let healthy = Subscriber::start(Reply::status(204)).await;
    let sub_slow = Sub::new(&slow.url, &["*"]);
    let sub_healthy = Sub::new(&healthy.url, &["*"]);
    let org = h.provision_org(&[&sub_slow, &sub_healthy]).await;
    let events: Vec<Event> = (0..EVENTS).map(|i| event(org, EventType::ALL[i % EventType::ALL.len()])).collect();
    let ids: HashSet<Uuid> = events.iter().map(|e| e.id).collect();

    let published = Instant::now();
    h.publish(&events).await;
    let received = wait_for("every callback at the healthy endpoint", || async {
        let received = healthy.received();
        let distinct: HashSet<Uuid> = received.iter().map(|r| r.webhook_id()).collect();
        (distinct == ids).then_some(received)
    })
    .await;
    let last = received.iter().map(|r| r.at).max().expect("callbacks arrived");
    let took = last - published;
    assert!(
        took < Duration::from_millis(2500),
        "the last healthy callback arrived {took:?} after publishing, not well under the slow endpoint's {SLOW:?}"
    );

    // No request to the slow endpoint has completed yet, so at most its four slots are in use.
    let slow_so_far = slow.count();
    assert!(slow_so_far >= 1, "the slow endpoint gets callbacks while the others are delivered");
    assert!(slow_so_far <= 4, "the slow endpoint never has more than 4 requests in flight, got {slow_so_far}");

    let rows = wait_for("a recorded delivery of every event to the slow endpoint", || async {
        let rows: Vec<_> = h.deliveries().await.into_iter().filter(|d| d.subscription_id == sub_slow.id).collect();
        (rows.len() == EVENTS).then_some(rows)
    })
    .await;
    let parked: Vec<_> = rows.iter().filter(|d| d.status == "parked").collect();
    assert!(parked.is_empty(), "no delivery to the slow endpoint is parked: {parked:?}");
    wait_for("callbacks to the slow endpoint to be delivered", || async {
        let rows = h.deliveries().await;
        let delivered = rows.iter().filter(|d| d.subscription_id == sub_slow.id && d.status == "delivered").count();
        (delivered >= 4).then_some(())
    })
    .await;
    wait_for("the slow endpoint to get callbacks beyond its first slots", || async { (slow.count() >= 8).then_some(()) }).await;
    h.finish().await;
}
