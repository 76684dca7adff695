//! Message states move forward only: sent < delivered < read, and failed is terminal.

use reqwest::StatusCode;

use crate::harness::{TestIngress, status_body};

/// Posts one status body per step and returns the message state after each step.
async fn post_statuses(ingress: &TestIngress, wamid: &str, statuses: &[&str]) -> Vec<Option<(String, i16, Option<i32>)>> {
    let mut states = Vec::new();
    for (n, status) in statuses.iter().enumerate() {
        let reply = ingress.post_signed(&status_body(wamid, status, 1_767_225_600 + n as u64)).await;
        assert_eq!(reply.status, StatusCode::OK, "{status} of {wamid}");
        assert_eq!(reply.outcome(), "accepted", "{status} of {wamid}");
        states.push(ingress.message_state(wamid).await);
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_never_move_backwards() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let states = post_statuses(&ingress, "wamid.late", &["read", "sent", "delivered"]).await;
    let read = Some(("read".to_owned(), 3, None));
    assert_eq!(states[0], read, "after read");
    assert_eq!(states[1], read, "a later sent does not move a read message back");
    assert_eq!(states[2], read, "a later delivered does not move a read message back");
    assert_eq!(ingress.count("SELECT count(*) FROM events").await, 3, "each status is still an event");

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_status_is_terminal() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let states = post_statuses(&ingress, "wamid.failed", &["sent", "failed", "delivered", "read"]).await;
    assert_eq!(states[0], Some(("sent".to_owned(), 1, None)), "after sent");
    let failed = Some(("failed".to_owned(), 4, Some(131026)));
    assert_eq!(states[1], failed, "failed moves a sent message and records the error code");
    assert_eq!(states[2], failed, "delivered after failed changes nothing");
    assert_eq!(states[3], failed, "read after failed changes nothing");

    // Read before failed: failed still wins.
    let states = post_statuses(&ingress, "wamid.read-then-failed", &["read", "failed"]).await;
    assert_eq!(states[1], failed, "failed after read");

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}
