//! Failed attempts: the retry schedule, parking, `Retry-After`, timeouts and redirects.

use std::time::Duration;

use reach_shared::events::EventType;

use crate::harness::{Harness, Sub, event, quiet_period};
use crate::subscriber::{Reply, Subscriber};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_then_success() {
    let h = Harness::start(&[("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "0.2,0.2,0.2")]).await;
    let endpoint = Subscriber::scripted(vec![Reply::status(500), Reply::status(500)], Reply::status(204)).await;
    let sub = Sub::new(&endpoint.url, &["*"]);
    let org = h.provision_org(&[&sub]).await;
    let e = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&e)).await;

    let delivery = h.wait_delivery(e.id, sub.id, "delivered").await;
    assert_eq!(delivery.attempt_count, 3, "three attempts counted");
    assert_eq!(delivery.last_status_code, Some(204), "last status code");
    assert_eq!(delivery.next_attempt_at, None, "nothing scheduled after delivery");
    let attempts = h.attempts(delivery.id).await;
    let codes: Vec<Option<i32>> = attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, vec![Some(500), Some(500), Some(204)], "status code of each attempt");
    assert!(
        attempts[..2].iter().all(|a| a.error.as_deref().is_some_and(|e| e.contains("500"))),
        "failed attempts record the status as the error: {attempts:?}"
    );
    assert_eq!(attempts[2].error, None, "the successful attempt has no error");

    let received = endpoint.received();
    assert_eq!(received.len(), 3, "three requests reached the endpoint");
    assert!(received.iter().all(|r| r.webhook_id() == e.id), "every attempt carries the event id as webhook-id");
    assert!(received.iter().all(|r| r.verifies(&sub.secret)), "every attempt is signed");
    assert!(
        received.iter().all(|r| r.body == received[0].body),
        "retries rebuilt from the events row send the bytes of the first attempt"
    );
    for pair in received.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(150), "retries wait for the schedule (0.2 s ± 20 %), got {gap:?}");
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_after_schedule() {
    let h = Harness::start(&[("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "0.1,0.1")]).await;
    let endpoint = Subscriber::start(Reply::status(500)).await;
    let sub = Sub::new(&endpoint.url, &["*"]);
    let org = h.provision_org(&[&sub]).await;
    let e = event(org, EventType::MessageSent);
    h.publish(std::slice::from_ref(&e)).await;

    let delivery = h.wait_delivery(e.id, sub.id, "parked").await;
    assert_eq!(delivery.attempt_count, 3, "parked after the first attempt and the two scheduled retries");
    assert_eq!(delivery.last_status_code, Some(500), "last status code");
    assert_eq!(delivery.next_attempt_at, None, "nothing scheduled after parking");
    let reason = delivery.last_error.clone().unwrap_or_default();
    assert!(reason.contains("exhausted"), "the reason names the exhausted schedule: {reason:?}");
    assert_eq!(h.attempts(delivery.id).await.len(), 3, "three attempts recorded");
    quiet_period().await;
    assert_eq!(endpoint.count(), 3, "no request after parking");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_delays_retry() {
    let h = Harness::start(&[("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "0.1,0.1")]).await;
    let throttled = Subscriber::scripted(vec![Reply::status(429).header("retry-after", "1")], Reply::status(204)).await;
    let unavailable = Subscriber::scripted(vec![Reply::status(503).header("retry-after", "2")], Reply::status(204)).await;
    let sub_throttled = Sub::new(&throttled.url, &["*"]);
    let sub_unavailable = Sub::new(&unavailable.url, &["*"]);
    let org = h.provision_org(&[&sub_throttled, &sub_unavailable]).await;
    let e = event(org, EventType::MessageRead);
    h.publish(std::slice::from_ref(&e)).await;

    for (name, sub, endpoint, status, wait) in [
        ("429", &sub_throttled, &throttled, 429, Duration::from_secs(1)),
        ("503", &sub_unavailable, &unavailable, 503, Duration::from_secs(2)),
    ] {
        let delivery = h.wait_delivery(e.id, sub.id, "delivered").await;
        let codes: Vec<Option<i32>> = h.attempts(delivery.id).await.iter().map(|a| a.status_code).collect();
        assert_eq!(codes, vec![Some(status), Some(204)], "{name}: throttled once, then delivered");
        let received = endpoint.received();
        assert_eq!(received.len(), 2, "{name}: two requests");
        let gap = received[1].at - received[0].at;
        assert!(
            gap >= wait - Duration::from_millis(50),
            "{name}: the retry honours Retry-After of {wait:?} instead of the 0.1 s schedule, came after {gap:?}"
        );
    }
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_recorded_as_error() {
    let h = Harness::start(&[
        ("REACH_RELAY_REQUEST_TIMEOUT_MS", "300"),
        ("REACH_RELAY_CLAIM_LEASE_MS", "3000"),
        ("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "0.1"),
    ])
    .await;
    let endpoint = Subscriber::start(Reply::status(204).delay(Duration::from_secs(2))).await;
    let sub = Sub::new(&endpoint.url, &["*"]);
    let org = h.provision_org(&[&sub]).await;
    let e = event(org, EventType::MessageDelivered);
    h.publish(std::slice::from_ref(&e)).await;

    let delivery = h.wait_delivery(e.id, sub.id, "parked").await;
    let attempts = h.attempts(delivery.id).await;
    assert_eq!(attempts.len(), 2, "the first attempt and one retry: {attempts:?}");
    for attempt in &attempts {
        let error = attempt.error.clone().unwrap_or_default();
        assert!(error.contains("timed out"), "the attempt is recorded as a timeout: {error:?}");
        assert_eq!(attempt.status_code, None, "a timed-out attempt has no status code");
        assert!(
            (250..1500).contains(&attempt.duration_ms),
            "the attempt is cut at the 300 ms request timeout, took {} ms",
            attempt.duration_ms
        );
    }
    let reason = delivery.last_error.unwrap_or_default();
    assert!(reason.contains("timed out"), "the parked delivery keeps the last error: {reason:?}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_not_followed() {
    let h = Harness::start(&[("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "0.1")]).await;
    let target = Subscriber::start(Reply::status(204)).await;
    let found = Subscriber::start(Reply::status(302).header("location", &target.url)).await;
    let temporary = Subscriber::start(Reply::status(307).header("location", &target.url)).await;
    let sub_found = Sub::new(&found.url, &["*"]);
    let sub_temporary = Sub::new(&temporary.url, &["*"]);
    let org = h.provision_org(&[&sub_found, &sub_temporary]).await;
    let e = event(org, EventType::AccountUpdated);
    h.publish(std::slice::from_ref(&e)).await;

    for (sub, endpoint, status) in [(&sub_found, &found, 302), (&sub_temporary, &temporary, 307)] {
        let delivery = h.wait_delivery(e.id, sub.id, "parked").await;
        assert_eq!(delivery.last_status_code, Some(status), "{status}: last status code");
        let attempts = h.attempts(delivery.id).await;
        assert_eq!(attempts.len(), 2, "{status}: a failed attempt, retried once, then parked: {attempts:?}");
        assert!(attempts.iter().all(|a| a.status_code == Some(status)), "{status}: every attempt records the redirect status");
        assert!(
            attempts.iter().all(|a| a.error.as_deref().is_some_and(|e| e.contains(&status.to_string()))),
            "{status}: every attempt is a failure: {attempts:?}"
        );
        assert_eq!(endpoint.count(), 2, "{status}: the redirecting endpoint got both attempts");
    }
    quiet_period().await;
    assert_eq!(target.count(), 0, "the redirect target receives nothing");
    h.finish().await;
}
