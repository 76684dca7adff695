//! Fixtures parsed into events, and the outbox rows that carry them.

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::harness::{FIXTURE_PHONE, FIXTURE_WABA, TestIngress, fixture, notification, text_entry};

const INBOUND_WAMID: &str = "wamid.HBgLMTU1NTAwMDIyMjIVAgASGBQzRUIwMDAwMDAwMDAwMDAwMDAwMQA=";
/// Fixture 02: `read` and `sent` of the first message, `failed` of the second,
/// `delivered` of the third.
const READ_WAMID: &str = "wamid.HBgLMTU1NTAwMDIyMjIVAgARGBJPVVQwMDAwMDAwMDAwMDAwMDEA";
const FAILED_WAMID: &str = "wamid.HBgLMTU1NTAwMDQ0NDQVAgARGBJPVVQwMDAwMDAwMDAwMDAwMDIA";
const DELIVERED_WAMID: &str = "wamid.HBgLMTU1NTAwMDIyMjIVAgARGBJPVVQwMDAwMDAwMDAwMDAwMDMA";

/// Returns true when `key` is `{prefix}:` followed by a SHA-256 in hex.
fn is_content_key(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(':'))
        .is_some_and(|hash| hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Type, dedup key (or the prefix of a content key) and phone_number_id of an event.
type ExpectedEvent = (&'static str, String, Option<&'static str>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_parse_into_expected_events() {
    let ingress = TestIngress::start().await;
    let org_id = ingress.provision_fixture_org().await;

    let expected: [(&str, Vec<ExpectedEvent>); 4] = [
        (
            "01_inbound_text_unicode.wire.json",
            vec![("message.received", format!("message:{INBOUND_WAMID}"), Some(FIXTURE_PHONE))],
        ),
        (
            "02_status_batch_with_failed.wire.json",
            vec![
                ("message.read", format!("status:{READ_WAMID}:read"), Some(FIXTURE_PHONE)),
                ("message.sent", format!("status:{READ_WAMID}:sent"), Some(FIXTURE_PHONE)),
                ("message.failed", format!("status:{FAILED_WAMID}:failed"), Some(FIXTURE_PHONE)),
                ("message.delivered", format!("status:{DELIVERED_WAMID}:delivered"), Some(FIXTURE_PHONE)),
            ],
        ),
        (
            "03_template_status_update.wire.json",
            vec![("template.status_updated", "message_template_status_update".to_owned(), None)],
        ),
        (
            "04_phone_number_quality_update.wire.json",
            vec![("phone_number.quality_updated", "quality".to_owned(), Some(FIXTURE_PHONE))],
        ),
    ];

    for (name, _) in &expected {
        let reply = ingress.post_signed(&fixture(name)).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}");
        assert_eq!(reply.outcome(), "accepted", "{name}");
    }

    let inbound = ingress.inbound_webhooks().await;
    let events = ingress.events().await;
    assert_eq!(inbound.len(), 4, "one inbound row per fixture");
    assert_eq!(events.len(), 7, "events of all fixtures");
    for (name, wanted) in &expected {
        let body = fixture(name);
        let row = inbound.iter().find(|row| row.body == body).unwrap_or_else(|| panic!("{name} is stored byte for byte"));
        assert_eq!(row.outcome, "accepted", "{name}: outcome");
        assert_eq!(row.parse_error, None, "{name}: no parse problem");
        assert_eq!(row.event_count, wanted.len() as i32, "{name}: event_count");
        assert_eq!(row.unroutable_count, 0, "{name}: unroutable_count");
        assert_eq!(row.body_sha256, Sha256::digest(&body).to_vec(), "{name}: body_sha256");

        let mut found: Vec<_> = events.iter().filter(|event| event.inbound_webhook_id == Some(row.id)).collect();
        assert_eq!(found.len(), wanted.len(), "{name}: number of events");
        for (event_type, key, phone_number_id) in wanted {
            let position = found.iter().position(|event| {
                event.event_type == *event_type && (event.dedup_key == *key || is_content_key(&event.dedup_key, key))
            });
            let Some(position) = position else {
                panic!("{name}: no {event_type} event with dedup key {key}; found {found:#?}");
            };
            let event = found.remove(position);
            assert_eq!(event.org_id, org_id, "{name}: org of {key}");
            assert_eq!(event.phone_number_id.as_deref(), *phone_number_id, "{name}: phone_number_id of {key}");
            assert_eq!(event.data["waba_id"], json!(FIXTURE_WABA), "{name}: data.waba_id of {key}");
        }
    }

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_text_keeps_unicode() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let reply = ingress.post_signed(&fixture("01_inbound_text_unicode.wire.json")).await;
    assert_eq!(reply.status, StatusCode::OK, "fixture 01");

    let pretty: Value = serde_json::from_slice(&fixture("01_inbound_text_unicode.pretty.json")).unwrap();
    let change = &pretty["entry"][0]["changes"][0]["value"];
    let events = ingress.events().await;
    assert_eq!(events.len(), 1, "one event");
    let data = &events[0].data;
    assert_eq!(data["message"], change["messages"][0], "the message is kept whole, text decoded");
    assert_eq!(
        data["message"]["text"]["body"],
        json!("Olá! Preço do café? 😀 see https://example.com/p/1 <ok> 100% @home"),
        "text body"
    );
    assert_eq!(data["contact"], change["contacts"][0], "the sender's contact");
    assert_eq!(data["phone_number_id"], json!(FIXTURE_PHONE), "data.phone_number_id");
    assert_eq!(data["display_phone_number"], json!("15550001111"), "data.display_phone_number");

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_batch_sets_message_states() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let reply = ingress.post_signed(&fixture("02_status_batch_with_failed.wire.json")).await;
    assert_eq!(reply.status, StatusCode::OK, "fixture 02");

    // `read` comes before `sent` in the body; the message stays read.
    let read = ingress.message_state(READ_WAMID).await;
    assert_eq!(read, Some(("read".to_owned(), 3, None)), "first message");
    let failed = ingress.message_state(FAILED_WAMID).await;
    assert_eq!(failed, Some(("failed".to_owned(), 4, Some(131026))), "second message keeps its error code");
    let delivered = ingress.message_state(DELIVERED_WAMID).await;
    assert_eq!(delivered, Some(("delivered".to_owned(), 2, None)), "third message");
    assert_eq!(ingress.count("SELECT count(*) FROM messages").await, 3, "one row per message");

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_id_stays_numeric() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let reply = ingress.post_signed(&fixture("03_template_status_update.wire.json")).await;
    assert_eq!(reply.status, StatusCode::OK, "fixture 03");

    let events = ingress.events().await;
    assert_eq!(events.len(), 1, "one event");
    let event = &events[0];
    assert_eq!(event.event_type, "template.status_updated", "type");
    assert_eq!(event.phone_number_id, None, "a template update belongs to no phone number");
    let template_id = &event.data["update"]["message_template_id"];
    assert!(template_id.is_u64(), "the template id stays a JSON number, got {template_id}");
    assert_eq!(template_id.as_u64(), Some(1_234_567_890_123_456), "the 16-digit template id is exact");
    assert_eq!(event.data["update"]["event"], json!("REJECTED"), "data.update.event");
    assert_eq!(event.data["field"], json!("message_template_status_update"), "data.field");

    let outbox = ingress.outbox().await;
    assert_eq!(outbox.len(), 1, "one outbox row");
    let payload: Value = serde_json::from_slice(&outbox[0].payload).unwrap();
    assert_eq!(
        payload["data"]["update"]["message_template_id"].as_u64(),
        Some(1_234_567_890_123_456),
        "the outbox payload keeps the numeric template id"
    );

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

/// JSON allows `\u0000` in strings, so a signed body can carry it, but Postgres `jsonb`
/// and `text` reject U+0000. The ingress stores such a body and its event with U+FFFD
/// in place of U+0000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_character_replaced_in_event() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let body = notification(vec![text_entry(FIXTURE_WABA, FIXTURE_PHONE, "wamid.nul\u{0}", "before\u{0}after")]);
    assert!(String::from_utf8_lossy(&body).contains("\\u0000"), "the body escapes U+0000 as \\u0000");
    let reply = ingress.post_signed(&body).await;
    assert_eq!(reply.status, StatusCode::OK, "a signed body with U+0000; reply {:?}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.outcome(), "accepted", "outcome");

    let inbound = ingress.inbound_webhooks().await;
    assert_eq!(inbound.len(), 1, "the body is stored");
    assert_eq!(inbound[0].body, body, "the raw body keeps U+0000");
    let events = ingress.events().await;
    assert_eq!(events.len(), 1, "one event");
    assert_eq!(events[0].dedup_key, "message:wamid.nul\u{FFFD}", "dedup key");
    assert_eq!(events[0].data["message"]["text"]["body"], json!("before\u{FFFD}after"), "text body");

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

/// A signed body whose wamid does not fit a btree index entry (2704 bytes after
/// compression) is stored and answered 200 like any other body; the item is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_wamid_still_stored() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    // Random hex compresses to about half, so 8,000 characters stay over the limit.
    let random_hex: String = (0..250).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    let wamid = format!("wamid.{random_hex}");
    let body = notification(vec![text_entry(FIXTURE_WABA, FIXTURE_PHONE, &wamid, "long id")]);
    let reply = ingress.post_signed(&body).await;
    assert_eq!(reply.status, StatusCode::OK, "a signed body with an 8 KB wamid; reply {:?}", String::from_utf8_lossy(&reply.body));
    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 1, "the body is stored");
    assert_eq!(
        ingress.count("SELECT count(*) FROM inbound_webhooks WHERE outcome = 'unparseable' AND parse_error LIKE '%longer than%'").await,
        1,
        "the body is stored as unparseable with the reason"
    );
    assert_eq!(ingress.count("SELECT count(*) FROM events").await, 0, "the oversized item makes no event");

    ingress.finish().await;
}
