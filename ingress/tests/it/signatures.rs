//! `X-Hub-Signature-256` over the raw body, as the ingress checks it.

use reach_shared::signing::meta_signature;
use reqwest::StatusCode;

use crate::harness::{APP_SECRET, TestIngress, fixture, notification};

/// The wire fixtures with the header values published next to them, computed by Meta's
/// algorithm independently of this code base.
const PUBLISHED: [(&str, &str); 4] = [
    (
        "01_inbound_text_unicode.wire.json",
        "sha256=c9adde979b42ab0d61acb74b180509bad3bbeda4c3991566fb5695bafb3b1293",
    ),
    (
        "02_status_batch_with_failed.wire.json",
        "sha256=8a3020c35afd7eb74a69903bab5d2e30b67448e115eea141e30c2970a94e6b83",
    ),
    (
        "03_template_status_update.wire.json",
        "sha256=bb1faecf9de35d319a940e748d6013f26c745db723f472b3eb3811d040fcee1b",
    ),
    (
        "04_phone_number_quality_update.wire.json",
        "sha256=2d42450d0b32b089ca6bbcfa2913a96f7b733d7d2b326aebcccc12e5e34de61d",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_accept_published_signature() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    for (name, signature) in PUBLISHED {
        let reply = ingress.post(fixture(name), Some(signature)).await;
        assert_eq!(reply.status, StatusCode::OK, "{name} with its published signature");
        assert_eq!(reply.outcome(), "accepted", "{name} is stored as accepted");
    }
    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 4, "every fixture body is stored");

    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_configured_secret_verifies() {
    let ingress = TestIngress::start_with(&[("REACH_META_APP_SECRETS", "first_app_secret, second_app_secret")]).await;

    let by_second = notification(vec![]);
    let reply = ingress.post(by_second.clone(), Some(&meta_signature("second_app_secret", &by_second))).await;
    assert_eq!(reply.status, StatusCode::OK, "a body signed with the second secret");

    let by_first = br#"{"object":"whatsapp_business_account","entry":[],"n":1}"#.to_vec();
    let reply = ingress.post(by_first.clone(), Some(&meta_signature("first_app_secret", &by_first))).await;
    assert_eq!(reply.status, StatusCode::OK, "a body signed with the first secret");

    let by_neither = br#"{"object":"whatsapp_business_account","entry":[],"n":2}"#.to_vec();
    let reply = ingress.post(by_neither.clone(), Some(&meta_signature(APP_SECRET, &by_neither))).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "a body signed with a secret that is not configured");

    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 2, "only the two authentic bodies are stored");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reformatted_body_fails_verification() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    for (name, signature) in PUBLISHED {
        let pretty_name = name.replace(".wire.json", ".pretty.json");
        let pretty = fixture(&pretty_name);
        let reply = ingress.post(pretty, Some(signature)).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{pretty_name} with the signature of the wire bytes");
    }

    // The same content compacted by a JSON serialiser, which unescapes `\/` and `\uXXXX`.
    let wire = fixture("01_inbound_text_unicode.wire.json");
    let reserialised = serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&wire).unwrap()).unwrap();
    assert_ne!(reserialised, wire, "re-serialising changes the bytes");
    let reply = ingress.post(reserialised, Some(PUBLISHED[0].1)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "re-serialised 01 with the signature of the wire bytes");

    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 0, "no rejected body is stored");
    assert_eq!(ingress.count("SELECT count(*) FROM events").await, 0, "no rejected body makes events");
    ingress.finish().await;
}

/// A verifier that strips `sha256=` as a set of characters, not as a literal prefix,
/// also eats leading digest characters `a`, `2`, `5` and `6`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_starting_with_prefix_characters() {
    let ingress = TestIngress::start().await;

    let (body, signature) = (0..100_000)
        .map(|n| format!(r#"{{"object":"whatsapp_business_account","entry":[],"n":{n}}}"#).into_bytes())
        .map(|body| {
            let signature = meta_signature(APP_SECRET, &body);
            (body, signature)
        })
        .find(|(_, signature)| signature["sha256=".len()..].chars().take(2).all(|c| ['a', '2', '5', '6'].contains(&c)))
        .expect("some body among 100,000 has a digest starting with two of a, 2, 5, 6");

    let reply = ingress.post(body, Some(&signature)).await;
    assert_eq!(reply.status, StatusCode::OK, "signature {signature}");
    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 1, "the body is stored");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signature_headers_rejected() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let body = fixture("01_inbound_text_unicode.wire.json");
    let good = meta_signature(APP_SECRET, &body);
    let digest = &good["sha256=".len()..];
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing header", None),
        ("empty header", Some(String::new())),
        ("sha1 algorithm", Some(format!("sha1={}", &digest[..40]))),
        ("digest without prefix", Some(digest.to_owned())),
        ("prefix without digest", Some("sha256=".to_owned())),
        ("non-hex digest", Some(format!("sha256={}", "z".repeat(64)))),
        ("digest one character short", Some(good[..good.len() - 1].to_owned())),
        ("digest one character long", Some(format!("{good}0"))),
        ("digest of 32 hex characters", Some(good[..7 + 32].to_owned())),
        ("wrong secret", Some(meta_signature("wrong_app_secret", &body))),
        ("digest of another body", Some(meta_signature(APP_SECRET, b"{}"))),
    ];

    for (case, header) in &cases {
        let reply = ingress.post(body.clone(), header.as_deref()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{case}");
        assert!(reply.json()["error"].is_string(), "{case}: the 401 body names the error");
    }

    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 0, "no rejected body is stored");
    assert_eq!(ingress.count("SELECT count(*) FROM events").await, 0, "no rejected body makes events");
    assert_eq!(ingress.count("SELECT count(*) FROM outbox").await, 0, "no rejected body makes outbox rows");
    ingress.finish().await;
}
