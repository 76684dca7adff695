//! The Meta fixtures replayed before the generated traffic, and the events a body
//! should produce, read the way the ingress reads them: one event per inbound message,
//! per status, per template update, per quality update and per account update.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use reach_shared::events::EventType;
use serde_json::Value;

use crate::expect::EventKey;

/// The app secret the fixtures' published signatures were made with.
pub const TEST_APP_SECRET: &str = "test_app_secret_0123456789abcdef";

/// One `*.wire.json` file: the exact bytes to post.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: String,
    pub body: Vec<u8>,
    pub events: Vec<EventKey>,
}

/// Loads every `*.wire.json` of `dir`, sorted by name.
pub fn load(dir: &Path) -> anyhow::Result<Vec<Fixture>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("failed to list the fixtures in {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".wire.json")))
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("no *.wire.json fixture in {}", dir.display());
    }
    paths
        .into_iter()
        .map(|path| {
            let body = std::fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
            let events = expected_events(&body).with_context(|| format!("failed to read the events of {}", path.display()))?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            Ok(Fixture { name, body, events })
        })
        .collect()
}

/// Lists the events a WhatsApp Business Account notification should produce, in body
/// order. Fields the ingress does not handle produce none.
pub fn expected_events(body: &[u8]) -> anyhow::Result<Vec<EventKey>> {
    let root: Value = serde_json::from_slice(body).context("invalid JSON body")?;
    let mut events = Vec::new();
    let entries = root.get("entry").and_then(Value::as_array).context("missing entry array")?;
    for change in entries.iter().flat_map(|e| e.get("changes").and_then(Value::as_array).into_iter().flatten()) {
        let value = change.get("value").unwrap_or(&Value::Null);
        match change.get("field").and_then(Value::as_str).unwrap_or_default() {
            "messages" => {
                for message in value.get("messages").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(wamid) = message.get("id").and_then(Value::as_str) {
                        events.push(EventKey::Received { wamid: wamid.to_owned() });
                    }
                }
                for status in value.get("statuses").and_then(Value::as_array).into_iter().flatten() {
                    let wamid = status.get("id").and_then(Value::as_str);
                    let state = status.get("status").and_then(Value::as_str);
                    if let (Some(wamid), Some(state)) = (wamid, state) {
                        events.extend(EventKey::status(wamid, state));
                    }
                }
            }
            "message_template_status_update" => events.push(EventKey::Other { event_type: EventType::TemplateStatusUpdated }),
            "phone_number_quality_update" => events.push(EventKey::Other { event_type: EventType::PhoneNumberQualityUpdated }),
            "account_update" | "account_review_update" | "account_alerts" | "business_capability_update" => {
                events.push(EventKey::Other { event_type: EventType::AccountUpdated })
            }
            _ => {}
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use reach_shared::signing::meta_signature;

    use super::*;

    fn fixtures() -> Vec<Fixture> {
        load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/meta")).unwrap()
    }

    /// The `X-Hub-Signature-256` values published in `fixtures/meta/README.md`.
    const PUBLISHED: [(&str, &str); 4] = [
        ("01_inbound_text_unicode.wire.json", "sha256=c9adde979b42ab0d61acb74b180509bad3bbeda4c3991566fb5695bafb3b1293"),
        ("02_status_batch_with_failed.wire.json", "sha256=8a3020c35afd7eb74a69903bab5d2e30b67448e115eea141e30c2970a94e6b83"),
        ("03_template_status_update.wire.json", "sha256=bb1faecf9de35d319a940e748d6013f26c745db723f472b3eb3811d040fcee1b"),
        ("04_phone_number_quality_update.wire.json", "sha256=2d42450d0b32b089ca6bbcfa2913a96f7b733d7d2b326aebcccc12e5e34de61d"),
    ];

    #[test]
    fn fixture_signatures_match_published() {
        let fixtures = fixtures();
        assert_eq!(fixtures.len(), PUBLISHED.len());
        for (fixture, (name, signature)) in fixtures.iter().zip(PUBLISHED) {
            assert_eq!(fixture.name, name);
            assert_eq!(meta_signature(TEST_APP_SECRET, &fixture.body), signature, "{name}");
        }
    }

    #[test]
    fn fixture_events() {
        let fixtures = fixtures();
        let events: Vec<&[EventKey]> = fixtures.iter().map(|f| f.events.as_slice()).collect();
        assert_eq!(
            events[0],
            [EventKey::Received { wamid: "wamid.HBgLMTU1NTAwMDIyMjIVAgASGBQzRUIwMDAwMDAwMDAwMDAwMDAwMQA=".into() }]
        );
        let read_then_sent = "wamid.HBgLMTU1NTAwMDIyMjIVAgARGBJPVVQwMDAwMDAwMDAwMDAwMDEA";
        assert_eq!(
            events[1],
            [
                EventKey::status(read_then_sent, "read").unwrap(),
                EventKey::status(read_then_sent, "sent").unwrap(),
                EventKey::status("wamid.HBgLMTU1NTAwMDQ0NDQVAgARGBJPVVQwMDAwMDAwMDAwMDAwMDIA", "failed").unwrap(),
                EventKey::status("wamid.HBgLMTU1NTAwMDIyMjIVAgARGBJPVVQwMDAwMDAwMDAwMDAwMDMA", "delivered").unwrap(),
            ]
        );
        assert_eq!(events[2], [EventKey::Other { event_type: EventType::TemplateStatusUpdated }]);
        assert_eq!(events[3], [EventKey::Other { event_type: EventType::PhoneNumberQualityUpdated }]);
    }

    #[test]
    fn unhandled_fields_produce_nothing() {
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[
            {"field":"flows","value":{}},
            {"field":"messages","value":{"statuses":[{"id":"w","status":"deleted"}]}},
            {"field":"account_update","value":{"event":"VERIFIED_ACCOUNT"}}]}]}"#;
        assert_eq!(expected_events(body).unwrap(), [EventKey::Other { event_type: EventType::AccountUpdated }]);
        assert!(expected_events(b"[]").is_err());
    }
}
