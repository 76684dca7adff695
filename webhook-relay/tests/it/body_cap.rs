//! At most 64 KiB of a response body is stored.

use reach_shared::events::EventType;

use crate::harness::{Harness, Sub, event, wait_for};
use crate::subscriber::{Reply, Subscriber};

const CAP: i32 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_capped() {
    // A long schedule: only the first attempt happens during the test.
    let h = Harness::start(&[("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "60")]).await;
    let huge_text: Vec<u8> = b"0123456789abcdef".repeat(200 * 1024 / 16);
    // 0xFF never occurs in UTF-8, so decoding turns each byte into U+FFFD, three bytes.
    let huge_binary: Vec<u8> = vec![0xff; 200 * 1024];
    // Three-byte characters whose 64 KiB cut falls inside a character.
    let huge_wide: Vec<u8> = "€".repeat(200 * 1024 / 3).into_bytes();
    let small = b"{\"error\":\"try later\"}".to_vec();
    let cases = [
        ("200 KiB of text", huge_text, true),
        ("200 KiB of non-UTF-8 bytes", huge_binary, true),
        ("200 KiB of three-byte characters", huge_wide, true),
        ("a small body", small, false),
    ];
    let mut endpoints = Vec::new();
    for (_, body, _) in &cases {
        let endpoint = Subscriber::start(Reply::status(500).body(body.clone())).await;
        let sub = Sub::new(&endpoint.url, &["*"]);
        endpoints.push((endpoint, sub));
    }
    let subs: Vec<&Sub> = endpoints.iter().map(|(_, sub)| sub).collect();
    let org = h.provision_org(&subs).await;
    let e = event(org, EventType::MessageFailed);
    h.publish(std::slice::from_ref(&e)).await;

    for ((name, body, truncated), (_, sub)) in cases.iter().zip(&endpoints) {
        let description = format!("the first attempt for {name}");
        let attempt = wait_for(&description, || async {
            let delivery = h.delivery(e.id, sub.id).await?;
            h.attempts(delivery.id).await.into_iter().next()
        })
        .await;
        assert_eq!(attempt.status_code, Some(500), "{name}: status code");
        let stored = attempt.stored_bytes.unwrap_or(0);
        assert!(stored > 0, "{name}: the body is stored");
        assert!(stored <= CAP, "{name}: Postgres holds {stored} bytes of response body, more than 64 KiB");
        assert_eq!(attempt.response_truncated, *truncated, "{name}: response_truncated");

        let text = attempt.response_body.unwrap_or_default();
        if std::str::from_utf8(body).is_ok() {
            assert!(body.starts_with(text.as_bytes()), "{name}: the stored text is the start of the response body");
        }
        if !truncated {
            assert_eq!(text.as_bytes(), body.as_slice(), "{name}: a small body is stored whole");
        }
    }
    h.finish().await;
}
