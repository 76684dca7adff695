//! Crashes and duplicates: a relay killed mid-stream, a message the broker redelivers
//! after its delivery was recorded, and an event published twice.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions};
use reach_shared::amqp::{self, Topology};
use reach_shared::events::{Event, EventType};
use reach_shared::testing;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::harness::{Harness, Sub, event, quiet_period, wait_for, wait_for_within};
use crate::subscriber::{Reply, Subscriber};

const EVENTS: usize = 500;

/// Starts the relay binary; its logs go to `log`.
fn spawn_relay(env: &[(String, String)], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("failed to open the relay log");
    Command::new(env!("CARGO_BIN_EXE_reach-webhook-relay"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("failed to start the relay binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_relay_delivers_everything() {
    let h = Harness::without_relay().await;
    // A slightly slow endpoint with few slots, and first attempts that wait for a slot
    // instead of overflowing: the kill lands with messages in hand and not yet recorded.
    // Some responses are 500s, so the retry lane also has claimed retries when the kill lands.
    let ok = Reply::status(204).delay(Duration::from_millis(20));
    let script = (0..300).map(|i| if i % 7 == 3 { Reply::status(500) } else { ok.clone() }).collect();
    let endpoint = Subscriber::scripted(script, ok).await;
    let sub = Sub::new(&endpoint.url, &["*"]);
    let org = h.provision_org(&[&sub]).await;
    let events: Vec<Event> = (0..EVENTS).map(|i| event(org, EventType::ALL[i % EventType::ALL.len()])).collect();
    let ids: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
    h.publish(&events).await;

    let env = h.relay_env(&[
        ("REACH_RELAY_PREFETCH", "64"),
        ("REACH_RELAY_SUBSCRIPTION_IN_FLIGHT", "8"),
        ("REACH_RELAY_OVERFLOW_AFTER_MS", "30000"),
        ("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "0.2,0.2,0.2,0.2,0.2"),
        ("REACH_RELAY_REQUEST_TIMEOUT_MS", "1000"),
        ("REACH_RELAY_CLAIM_LEASE_MS", "2000"),
    ]);
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("relay-{}.log", h.prefix));
    let log_name = log.display().to_string();
    let mut first = spawn_relay(&env, &log);
    let description = format!("the first relay to make 100 callbacks (relay log: {log_name})");
    wait_for(&description, || async { (endpoint.count() >= 100).then_some(()) }).await;
    first.kill().await.expect("failed to kill the relay");
    let at_kill = endpoint.count();
    assert!(at_kill < EVENTS, "the relay was killed after all {EVENTS} callbacks, not mid-stream; slow the endpoint down");

    let mut second = spawn_relay(&env, &log);
    wait_for_within(&format!("every delivery to be delivered (relay log: {log_name})"), Duration::from_secs(60), || async {
        let deliveries = h.deliveries().await;
        (deliveries.len() == EVENTS && deliveries.iter().all(|d| d.status == "delivered")).then_some(())
    })
    .await;
    let received = endpoint.received();
    let distinct: HashSet<Uuid> = received.iter().map(|r| r.webhook_id()).collect();
    let duplicates = received.len() - distinct.len();
    assert_eq!(
        distinct.len(),
        EVENTS,
        "every event reaches the endpoint at least once ({duplicates} duplicates, {at_kill} callbacks before the kill)"
    );
    assert_eq!(distinct, ids, "the endpoint receives exactly the published events ({duplicates} duplicates)");
    let deliveries = h.deliveries().await;
    let pairs: HashSet<(Uuid, Uuid)> = deliveries.iter().map(|d| (d.event_id, d.subscription_id)).collect();
    assert_eq!(pairs.len(), EVENTS, "one delivery row per event");

    // A clean stop on SIGTERM.
    let pid = second.id().expect("the relay is running").to_string();
    let signalled = Command::new("kill").args(["-TERM", &pid]).status().await.expect("failed to run kill");
    assert!(signalled.success(), "kill -TERM {pid} failed");
    let exit = tokio::time::timeout(Duration::from_secs(20), second.wait()).await;
    assert!(
        matches!(&exit, Ok(Ok(status)) if status.success()),
        "the relay exits cleanly on SIGTERM: {exit:?} (relay log: {log_name})"
    );
    let _ = std::fs::remove_file(&log);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_relay_drains_cleanly() {
    let h = Harness::without_relay().await;
    let endpoint = Subscriber::scripted(Vec::new(), Reply::status(204).delay(Duration::from_millis(20))).await;
    let sub = Sub::new(&endpoint.url, &["*"]);
    let org = h.provision_org(&[&sub]).await;
    let events: Vec<Event> = (0..EVENTS).map(|i| event(org, EventType::ALL[i % EventType::ALL.len()])).collect();
    let ids: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
    h.publish(&events).await;

    let env = h.relay_env(&[("REACH_RELAY_PREFETCH", "64"), ("REACH_RELAY_SUBSCRIPTION_IN_FLIGHT", "8")]);
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("relay-{}.log", h.prefix));
    let log_name = log.display().to_string();
    let mut first = spawn_relay(&env, &log);
    wait_for(&format!("the first relay to make 100 callbacks (relay log: {log_name})"), || async {
        (endpoint.count() >= 100).then_some(())
    })
    .await;

    // SIGTERM under load: attempts in hand finish and are recorded, the rest go back to
    // the queue, and the process exits on its own.
    let pid = first.id().expect("the relay is running").to_string();
    let signalled = Command::new("kill").args(["-TERM", &pid]).status().await.expect("failed to run kill");
    assert!(signalled.success(), "kill -TERM {pid} failed");
    let exit = tokio::time::timeout(Duration::from_secs(20), first.wait()).await;
    assert!(matches!(&exit, Ok(Ok(status)) if status.success()), "the relay exits cleanly on SIGTERM: {exit:?} (relay log: {log_name})");
    let at_stop = endpoint.count();
    assert!(at_stop < EVENTS, "the relay stopped after all {EVENTS} callbacks, not mid-stream; slow the endpoint down");
    // Rows are delivered, or pending when a busy subscription handed them to the retry lane.
    let recorded = h.deliveries().await;
    let delivered = recorded.iter().filter(|d| d.status == "delivered").count();
    let statuses: HashSet<&str> = recorded.iter().map(|d| d.status.as_str()).collect();
    assert!(statuses.iter().all(|s| ["delivered", "pending"].contains(s)), "nothing is parked by a stop: {statuses:?}");
    assert_eq!(delivered, at_stop, "each callback made before the stop is recorded as delivered");

    let mut second = spawn_relay(&env, &log);
    wait_for_within(&format!("every delivery to be delivered (relay log: {log_name})"), Duration::from_secs(60), || async {
        let deliveries = h.deliveries().await;
        (deliveries.len() == EVENTS && deliveries.iter().all(|d| d.status == "delivered")).then_some(())
    })
    .await;
    let received = endpoint.received();
    let distinct: HashSet<Uuid> = received.iter().map(|r| r.webhook_id()).collect();
    assert_eq!(distinct, ids, "every event reaches the endpoint");
    assert_eq!(received.len(), EVENTS, "a graceful stop sends nothing twice ({at_stop} callbacks before the stop)");

    second.kill().await.expect("failed to stop the second relay");
    let _ = std::fs::remove_file(&log);
    h.finish().await;
}

/// Takes the first message of the relay queue and returns it unacknowledged, twice, so
/// the relay receives it as a redelivery. Returns whether the broker flagged the second
/// delivery as redelivered.
async fn return_unacknowledged(topology: &Topology) -> bool {
    let connection = amqp::connect(&testing::amqp_url(), "reach-relay-it").await.expect("failed to connect to RabbitMQ");
    let channel = connection.create_channel().await.expect("failed to open a channel");
    let mut redelivered = false;
    for _ in 0..2 {
        let message = wait_for("the event message in the relay queue", || async {
            channel
                .basic_get(topology.relay_queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .expect("basic.get failed")
        })
        .await;
        redelivered = message.delivery.redelivered;
        message
            .delivery
            .acker
            .nack(BasicNackOptions { multiple: false, requeue: true })
            .await
            .expect("failed to return the message");
    }
    let _ = connection.close(200, "done".into()).await;
    redelivered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_message_skips_recorded() {
    let mut h = Harness::without_relay().await;
    let recorded = Subscriber::start(Reply::status(204)).await;
    let unrecorded = Subscriber::start(Reply::status(204)).await;
    let sub_recorded = Sub::new(&recorded.url, &["*"]);
    let sub_unrecorded = Sub::new(&unrecorded.url, &["*"]);
    let org = h.provision_org(&[&sub_recorded, &sub_unrecorded]).await;
    let e = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&e)).await;
    h.wait_published().await;

    // What a relay that crashed after recording one pair, before the ack, leaves behind:
    // a pending delivery that is due.
    sqlx::query(
        "INSERT INTO webhook_deliveries (org_id, event_id, subscription_id, status, attempt_count, next_attempt_at, last_status_code)
         VALUES ($1, $2, $3, 'pending', 1, now(), 500)",
    )
    .bind(org)
    .bind(e.id)
    .bind(sub_recorded.id)
    .execute(&h.pool)
    .await
    .expect("failed to record the delivery");
    let redelivered = return_unacknowledged(&h.topology).await;
    assert!(redelivered, "the broker flags a returned message as redelivered");

    h.start_relay(&[]).await;
    let retried = h.wait_delivery(e.id, sub_recorded.id, "delivered").await;
    h.wait_delivery(e.id, sub_unrecorded.id, "delivered").await;
    quiet_period().await;
    assert_eq!(retried.attempt_count, 2, "the recorded delivery is retried once");
    assert_eq!(recorded.count(), 1, "the recorded pair gets one request, from the retry lane, not a second from the consumer");
    assert_eq!(unrecorded.count(), 1, "the pair not recorded yet is attempted by the consumer");
    assert_eq!(h.deliveries().await.len(), 2, "one delivery row per subscription");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_publish_one_delivery() {
    let h = Harness::start(&[]).await;
    let endpoint = Subscriber::start(Reply::status(204)).await;
    let sub = Sub::new(&endpoint.url, &["*"]);
    let org = h.provision_org(&[&sub]).await;
    let e = event(org, EventType::MessageSent);
    h.publish_copies(std::slice::from_ref(&e), 2).await;
    h.wait_published().await;

    let delivery = h.wait_delivery(e.id, sub.id, "delivered").await;
    quiet_period().await;
    let deliveries = h.deliveries().await;
    assert_eq!(deliveries.len(), 1, "one delivery row for the event published twice: {deliveries:?}");
    assert_eq!(deliveries[0].status, "delivered", "the delivery stays delivered");
    let requests = endpoint.count();
    assert!(requests >= 1, "the endpoint gets the event");
    assert!(endpoint.received().iter().all(|r| r.webhook_id() == e.id), "every request carries the event id");
    let attempts = h.attempts(delivery.id).await.len();
    assert!(attempts >= 1, "the attempt is recorded ({requests} requests, {attempts} attempt rows)");
    h.finish().await;
}
