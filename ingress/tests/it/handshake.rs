//! `GET /webhooks/whatsapp`: Meta's subscription handshake.

use reqwest::StatusCode;

use crate::harness::{TestIngress, VERIFY_TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_echoes_bare_challenge() {
    let ingress = TestIngress::start().await;

    let reply = ingress
        .get(&[("hub.mode", "subscribe"), ("hub.verify_token", VERIFY_TOKEN), ("hub.challenge", "1158201444")])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "right token");
    assert_eq!(reply.body, b"1158201444", "the body is the challenge alone");
    assert_eq!(reply.content_type.as_deref(), Some("text/plain"), "content type");

    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_rejects_bad_requests() {
    let ingress = TestIngress::start().await;

    let suffixed = format!("{VERIFY_TOKEN}x");
    let cases: [(&str, &[(&str, &str)]); 6] = [
        ("wrong token", &[("hub.mode", "subscribe"), ("hub.verify_token", "wrong"), ("hub.challenge", "1")]),
        ("token with a suffix", &[("hub.mode", "subscribe"), ("hub.verify_token", &suffixed), ("hub.challenge", "1")]),
        ("missing token", &[("hub.mode", "subscribe"), ("hub.challenge", "1")]),
        ("missing mode", &[("hub.verify_token", VERIFY_TOKEN), ("hub.challenge", "1")]),
        ("other mode", &[("hub.mode", "unsubscribe"), ("hub.verify_token", VERIFY_TOKEN), ("hub.challenge", "1")]),
        ("missing challenge", &[("hub.mode", "subscribe"), ("hub.verify_token", VERIFY_TOKEN)]),
    ];
    for (case, query) in cases {
        let reply = ingress.get(query).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{case}");
        assert!(!reply.body.starts_with(b"1"), "{case}: the challenge is not echoed");
    }

    ingress.finish().await;
}
