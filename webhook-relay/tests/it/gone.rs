//! 410 Gone disables the subscription and parks its pending deliveries.

use reach_shared::events::EventType;

use crate::harness::{Harness, Sub, event, quiet_period, wait_for};
use crate::subscriber::{Reply, Subscriber};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_subscription() {
    // The first event's retry is a minute away, so it is still pending when the 410 comes.
    let h = Harness::start(&[("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "60")]).await;
    let gone = Subscriber::scripted(vec![Reply::status(500)], Reply::status(410)).await;
    let healthy = Subscriber::start(Reply::status(204)).await;
    let sub_gone = Sub::new(&gone.url, &["*"]);
    let sub_healthy = Sub::new(&healthy.url, &["*"]);
    let org = h.provision_org(&[&sub_gone, &sub_healthy]).await;

    let failing = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&failing)).await;
    let pending = h.wait_delivery(failing.id, sub_gone.id, "pending").await;
    assert_eq!(pending.attempt_count, 1, "the first event failed once and waits for its retry");

    let answered_gone = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&answered_gone)).await;
    let delivery = h.wait_delivery(answered_gone.id, sub_gone.id, "parked").await;
    assert_eq!(delivery.last_status_code, Some(410), "the 410 is recorded");
    let (status, reason) = h.subscription_status(sub_gone.id).await;
    assert_eq!(status, "disabled", "the subscription is disabled");
    assert!(reason.as_deref().is_some_and(|r| r.contains("410")), "the disabled reason names the 410: {reason:?}");
    let earlier = h.delivery(failing.id, sub_gone.id).await.expect("the first delivery exists");
    assert_eq!(earlier.status, "parked", "the pending delivery of the disabled subscription is parked");
    assert_eq!(earlier.next_attempt_at, None, "the parked delivery has no next attempt");

    // A later event reaches the healthy subscription only.
    let after = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&after)).await;
    h.wait_delivery(after.id, sub_healthy.id, "delivered").await;
    quiet_period().await;
    assert_eq!(h.delivery(after.id, sub_gone.id).await.map(|d| d.id), None, "no delivery for the disabled subscription");
    assert_eq!(gone.count(), 2, "the disabled endpoint gets no request after the 410");
    assert_eq!(healthy.count(), 3, "the healthy endpoint gets every event");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_during_retry_disables() {
    let h = Harness::start(&[("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "0.2,0.2,0.2")]).await;
    let gone = Subscriber::scripted(vec![Reply::status(503)], Reply::status(410)).await;
    let sub = Sub::new(&gone.url, &["*"]);
    let org = h.provision_org(&[&sub]).await;
    let e = event(org, EventType::PhoneNumberQualityUpdated);
    h.publish(std::slice::from_ref(&e)).await;

    let delivery = h.wait_delivery(e.id, sub.id, "parked").await;
    let codes: Vec<Option<i32>> = h.attempts(delivery.id).await.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, vec![Some(503), Some(410)], "a retry answered 410");
    let (status, _) = wait_for("the subscription to be disabled", || async {
        let status = h.subscription_status(sub.id).await;
        (status.0 == "disabled").then_some(status)
    })
    .await;
    assert_eq!(status, "disabled", "a 410 in the retry lane disables the subscription");
    quiet_period().await;
    assert_eq!(gone.count(), 2, "no request after the 410");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabled_again_after_gone() {
    let h = Harness::start(&[("REACH_RELAY_SUBSCRIPTION_CACHE_MS", "200")]).await;
    let endpoint = Subscriber::scripted(vec![Reply::status(410)], Reply::status(204)).await;
    let sub = Sub::new(&endpoint.url, &["*"]);
    let org = h.provision_org(&[&sub]).await;

    let answered_gone = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&answered_gone)).await;
    h.wait_delivery(answered_gone.id, sub.id, "parked").await;
    let (status, _) = h.subscription_status(sub.id).await;
    assert_eq!(status, "disabled", "the 410 disables the subscription");

    // The operator enables it again once the endpoint is fixed.
    sqlx::query("UPDATE webhook_subscriptions SET status = 'active', disabled_reason = NULL WHERE id = $1")
        .bind(sub.id)
        .execute(&h.pool)
        .await
        .expect("enable the subscription");
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;

    let later = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&later)).await;
    h.wait_delivery(later.id, sub.id, "delivered").await;
    assert_eq!(endpoint.count(), 2, "the enabled subscription gets the later event");
    h.finish().await;
}
