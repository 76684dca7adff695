//! Subscriber URLs that reach loopback are rejected unless private targets are allowed.
//! Every URL here names this machine's loopback, where the test's own endpoint listens.

use reach_shared::events::EventType;

use crate::harness::{Harness, Sub, event, quiet_period};
use crate::subscriber::{Reply, Subscriber};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_targets_refused() {
    let h = Harness::start(&[("REACH_RELAY_ALLOW_PRIVATE_TARGETS", "false")]).await;
    let endpoint = Subscriber::start(Reply::status(204)).await;
    let port = endpoint.addr.port();
    let urls = [
        format!("http://localhost:{port}/hook"),
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        // Other spellings of 127.0.0.1 that URL parsers accept.
        format!("http://127.1:{port}/hook"),
        format!("http://2130706433:{port}/hook"),
        format!("http://0x7f.0.0.1:{port}/hook"),
    ];
    let subs: Vec<Sub> = urls.iter().map(|url| Sub::new(url, &["*"])).collect();
    let org = h.provision_org(&subs.iter().collect::<Vec<_>>()).await;
    let e = event(org, EventType::MessageReceived);
    h.publish(std::slice::from_ref(&e)).await;

    for (url, sub) in urls.iter().zip(&subs) {
        let delivery = h.wait_delivery(e.id, sub.id, "parked").await;
        let reason = delivery.last_error.clone().unwrap_or_default();
        assert!(reason.contains("not public") || reason.contains("not a public"), "{url}: parked as a non-public address: {reason:?}");
        let attempts = h.attempts(delivery.id).await;
        assert_eq!(attempts.len(), 1, "{url}: one refused attempt, no retry: {attempts:?}");
        assert_eq!(attempts[0].status_code, None, "{url}: no HTTP status, nothing was sent");
    }
    quiet_period().await;
    assert_eq!(endpoint.count(), 0, "the loopback endpoint receives nothing");
    h.finish().await;
}
