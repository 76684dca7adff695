//! Routing items to orgs, and bodies that route nowhere or cannot be parsed.

use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{FIXTURE_PHONE, FIXTURE_WABA, TestIngress, fixture, notification, text_entry};

const OTHER_WABA: &str = "100000000000002";
const OTHER_PHONE: &str = "200000000000002";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_route_to_their_orgs() {
    let ingress = TestIngress::start().await;
    let first_org = ingress.provision_fixture_org().await;
    let second_org = Uuid::new_v4();
    ingress
        .provision(json!({"orgs": [{
            "id": second_org, "slug": "second-org", "name": "Second Org",
            "wabas": [{"waba_id": OTHER_WABA, "access_token": "token-2", "phone_numbers": [
                {"phone_number_id": OTHER_PHONE, "display_phone_number": "15550009999"}
            ]}]
        }]}))
        .await;

    let body = notification(vec![
        text_entry(FIXTURE_WABA, FIXTURE_PHONE, "wamid.first", "to the first org"),
        text_entry(OTHER_WABA, OTHER_PHONE, "wamid.second", "to the second org"),
    ]);
    let reply = ingress.post_signed(&body).await;
    assert_eq!(reply.status, StatusCode::OK, "a body with entries of two WABAs");
    assert_eq!(reply.outcome(), "accepted", "outcome");

    let events = ingress.events().await;
    assert_eq!(events.len(), 2, "one event per entry");
    let first = events.iter().find(|e| e.dedup_key == "message:wamid.first").expect("event of the first entry");
    let second = events.iter().find(|e| e.dedup_key == "message:wamid.second").expect("event of the second entry");
    assert_eq!(first.org_id, first_org, "the first entry belongs to the first org");
    assert_eq!(first.phone_number_id.as_deref(), Some(FIXTURE_PHONE), "phone number of the first entry");
    assert_eq!(second.org_id, second_org, "the second entry belongs to the second org");
    assert_eq!(second.phone_number_id.as_deref(), Some(OTHER_PHONE), "phone number of the second entry");
    assert_eq!(first.inbound_webhook_id, second.inbound_webhook_id, "both events come from the one stored body");

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

/// Fixture 04 names its number only by display number. Two other numbers share that
/// display number: one in another WABA of the same org, and one in another org.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_update_scoped_to_waba() {
    let ingress = TestIngress::start().await;
    let org_id = Uuid::new_v4();
    let other_org = Uuid::new_v4();
    ingress
        .provision(json!({"orgs": [
            {
                "id": org_id, "slug": "owner", "name": "Owner",
                "wabas": [
                    {"waba_id": FIXTURE_WABA, "access_token": "token-1", "phone_numbers": [
                        // Formatted: matching uses only the digits.
                        {"phone_number_id": FIXTURE_PHONE, "display_phone_number": "+1 555-000-1111"}
                    ]},
                    {"waba_id": OTHER_WABA, "access_token": "token-2", "phone_numbers": [
                        {"phone_number_id": OTHER_PHONE, "display_phone_number": "15550001111"}
                    ]}
                ]
            },
            {
                "id": other_org, "slug": "other", "name": "Other",
                "wabas": [{"waba_id": "100000000000003", "access_token": "token-3", "phone_numbers": [
                    {"phone_number_id": "200000000000003", "display_phone_number": "1 (555) 000-1111"}
                ]}]
            }
        ]}))
        .await;

    let reply = ingress.post_signed(&fixture("04_phone_number_quality_update.wire.json")).await;
    assert_eq!(reply.status, StatusCode::OK, "fixture 04");
    assert_eq!(reply.outcome(), "accepted", "outcome");

    assert_eq!(ingress.phone_number(FIXTURE_PHONE).await, (1000, "UNKNOWN".to_owned()), "the number in the entry's WABA");
    assert_eq!(ingress.phone_number(OTHER_PHONE).await, (80, "UNKNOWN".to_owned()), "the same display number in another WABA");
    assert_eq!(
        ingress.phone_number("200000000000003").await,
        (80, "UNKNOWN".to_owned()),
        "the same display number in another org"
    );

    let events = ingress.events().await;
    assert_eq!(events.len(), 1, "one event");
    assert_eq!(events[0].event_type, "phone_number.quality_updated", "type");
    assert_eq!(events[0].org_id, org_id, "org");
    assert_eq!(events[0].phone_number_id.as_deref(), Some(FIXTURE_PHONE), "phone_number_id column");
    assert_eq!(events[0].data["phone_number_id"], json!(FIXTURE_PHONE), "data.phone_number_id");
    assert_eq!(events[0].data["update"]["event"], json!("THROUGHPUT_UPGRADE"), "data.update.event");

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_phone_number_unroutable() {
    let ingress = TestIngress::start().await;

    // Nothing is provisioned, so no fixture routes anywhere.
    for name in ["01_inbound_text_unicode.wire.json", "03_template_status_update.wire.json", "04_phone_number_quality_update.wire.json"] {
        let reply = ingress.post_signed(&fixture(name)).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}");
        assert_eq!(reply.outcome(), "unroutable", "{name}");
    }

    let inbound = ingress.inbound_webhooks().await;
    assert_eq!(inbound.len(), 3, "every body is stored");
    for row in &inbound {
        assert_eq!(row.outcome, "unroutable", "outcome of row {}", row.id);
        assert_eq!(row.event_count, 0, "event_count of row {}", row.id);
        assert_eq!(row.unroutable_count, 1, "unroutable_count of row {}", row.id);
    }
    assert_eq!(ingress.count("SELECT count(*) FROM events").await, 0, "no events");
    assert_eq!(ingress.count("SELECT count(*) FROM outbox").await, 0, "no outbox rows");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_body_partially_unroutable() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let body = notification(vec![
        text_entry(FIXTURE_WABA, FIXTURE_PHONE, "wamid.known", "routed"),
        text_entry("100000000000999", "200000000000999", "wamid.unknown", "not routed"),
    ]);
    let reply = ingress.post_signed(&body).await;
    assert_eq!(reply.status, StatusCode::OK, "a body with one known and one unknown number");
    assert_eq!(reply.outcome(), "accepted", "outcome");

    let inbound = ingress.inbound_webhooks().await;
    assert_eq!(inbound.len(), 1, "the body is stored");
    assert_eq!(inbound[0].outcome, "partially_unroutable", "stored outcome");
    assert_eq!(inbound[0].event_count, 1, "event_count");
    assert_eq!(inbound[0].unroutable_count, 1, "unroutable_count");
    let events = ingress.events().await;
    assert_eq!(events.len(), 1, "only the known number makes an event");
    assert_eq!(events[0].dedup_key, "message:wamid.known", "the routed event");

    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_bodies_stored() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    let bodies: [&[u8]; 5] = [
        b"not json",
        br#"{"object":"page"}"#,
        br#"{"object":"page","entry":[]}"#,
        br#"{"object":"whatsapp_business_account"}"#,
        br#"{"object":"whatsapp_business_account","entry":[{"changes":[]}]}"#,
    ];
    for body in bodies {
        let printable = String::from_utf8_lossy(body);
        let reply = ingress.post_signed(body).await;
        assert_eq!(reply.status, StatusCode::OK, "{printable}");
        assert_eq!(reply.outcome(), "unparseable", "{printable}");
    }

    let inbound = ingress.inbound_webhooks().await;
    assert_eq!(inbound.len(), bodies.len(), "every body is stored");
    for body in bodies {
        let printable = String::from_utf8_lossy(body);
        let row = inbound.iter().find(|row| row.body == body).unwrap_or_else(|| panic!("{printable} is stored byte for byte"));
        assert_eq!(row.outcome, "unparseable", "{printable}: outcome");
        let parse_error = row.parse_error.as_deref().unwrap_or_default();
        assert!(!parse_error.is_empty(), "{printable}: parse_error is set");
        assert_eq!(row.event_count, 0, "{printable}: event_count");
    }
    assert_eq!(ingress.count("SELECT count(*) FROM events").await, 0, "no events");
    assert_eq!(ingress.count("SELECT count(*) FROM outbox").await, 0, "no outbox rows");
    ingress.finish().await;
}
