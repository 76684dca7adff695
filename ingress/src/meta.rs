//! Parsing of WhatsApp Cloud API webhook bodies into normalised items, one per item of
//! every change of every entry. Parsing is tolerant: unknown fields, unknown message
//! types, statuses without `profile`, system messages without `contacts`, and numeric
//! ids sent as numbers or strings are all accepted. An item that cannot be understood
//! is reported as a problem and skipped; the rest of the body still counts.

use reach_shared::events::EventType;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// The destination of an item, before the database resolves it to an org.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `metadata.phone_number_id` of a `messages` change.
    PhoneNumber(String),
    /// The entry's WABA id, for template and account updates.
    Waba(String),
    /// A quality update that names the number only by its display number.
    DisplayNumber { waba_id: String, display_digits: String },
}

/// Status order of a message: statuses only move it forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StatusRank {
    Sent = 1,
    Delivered = 2,
    Read = 3,
    /// Terminal: no later status moves a failed message.
    Failed = 4,
}

impl StatusRank {
    /// Returns the state an outbound message reaches with this status.
    pub fn message_state(self) -> reach_shared::sends::MessageState {
        use reach_shared::sends::MessageState;
        match self {
            StatusRank::Sent => MessageState::Sent,
            StatusRank::Delivered => MessageState::Delivered,
            StatusRank::Read => MessageState::Read,
            StatusRank::Failed => MessageState::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StatusRank::Sent => "sent",
            StatusRank::Delivered => "delivered",
            StatusRank::Read => "read",
            StatusRank::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub wamid: String,
    pub rank: StatusRank,
    pub error_code: Option<i32>,
    pub error_title: Option<String>,
    /// The outbound message id the dispatcher put in `biz_opaque_callback_data`, which
    /// Meta echoes in every status of that message.
    pub message_id: Option<uuid::Uuid>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QualityUpdate {
    pub quality_rating: Option<&'static str>,
    pub mps: Option<i32>,
}

/// One normalised item, ready to become an event once routed.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub target: Target,
    pub event_type: EventType,
    /// The key that makes two items the same fact, unique per org.
    pub dedup_key: String,
    pub data: Value,
    pub status: Option<StatusUpdate>,
    pub quality: Option<QualityUpdate>,
}

/// The parsed body: its items, and what could not be understood.
#[derive(Debug, Default)]
pub struct Notification {
    pub items: Vec<Item>,
    /// Human-readable descriptions of skipped parts; stored with the raw body.
    pub problems: Vec<String>,
}

/// At most this many problem descriptions are kept per body.
const MAX_PROBLEMS_KEPT: usize = 20;

/// Maximum wamid length accepted. Meta's are about 60 characters; a longer one could not be
/// indexed (Postgres btree entries are limited to 2,704 bytes), so the item is skipped
/// as a problem instead of failing the transaction on every retry.
const MAX_WAMID_LENGTH: usize = 512;

/// Parses a body whose signature has been verified. Returns an error only when nothing
/// in it can be used: not JSON, not a WABA notification, or no understandable item.
pub fn parse(body: &[u8]) -> Result<Notification, String> {
    let mut root: Value = serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    replace_nul_characters(&mut root);
    let object = root.get("object").and_then(Value::as_str);
    if object != Some("whatsapp_business_account") {
        return Err(format!("unexpected object {object:?}: expected \"whatsapp_business_account\""));
    }
    let entries = root
        .get("entry")
        .and_then(Value::as_array)
        .ok_or_else(|| "missing entry array".to_owned())?;

    let mut notification = Notification::default();
    for (entry_index, entry) in entries.iter().enumerate() {
        let Some(waba_id) = entry.get("id").and_then(id_string) else {
            notification.problem(format!("entry {entry_index}: missing id"));
            continue;
        };
        let changes = entry.get("changes").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for (change_index, change) in changes.iter().enumerate() {
            let at = format!("entry {entry_index} change {change_index}");
            let field = change.get("field").and_then(Value::as_str).unwrap_or_default();
            let Some(value) = change.get("value").and_then(Value::as_object) else {
                notification.problem(format!("{at}: missing value object"));
                continue;
            };
            match field {
                "messages" => notification.parse_messages_change(&at, &waba_id, value),
                "message_template_status_update" => notification.push_waba_item(
                    EventType::TemplateStatusUpdated,
                    &waba_id,
                    field,
                    entry.get("time"),
                    value,
                ),
                "phone_number_quality_update" => notification.parse_quality_update(&at, &waba_id, entry.get("time"), value),
                "account_update" | "account_review_update" | "account_alerts" | "business_capability_update" => {
                    notification.push_waba_item(EventType::AccountUpdated, &waba_id, field, entry.get("time"), value)
                }
                other => notification.problem(format!("{at}: field {other:?} is not handled")),
            }
        }
    }
    if notification.items.is_empty() && !notification.problems.is_empty() {
        return Err(notification.problems.join("; "));
    }
    Ok(notification)
}

impl Notification {
    fn problem(&mut self, problem: String) {
        if self.problems.len() < MAX_PROBLEMS_KEPT {
            self.problems.push(problem);
        }
    }

    fn parse_messages_change(&mut self, at: &str, waba_id: &str, value: &Map<String, Value>) {
        let metadata = value.get("metadata");
        let Some(phone_number_id) = metadata.and_then(|m| m.get("phone_number_id")).and_then(id_string) else {
            self.problem(format!("{at}: missing metadata.phone_number_id"));
            return;
        };
        let display_phone_number = metadata.and_then(|m| m.get("display_phone_number")).and_then(id_string);
        let contacts = value.get("contacts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();

        for (index, message) in value.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let Some(wamid) = message.get("id").and_then(id_string) else {
                self.problem(format!("{at} message {index}: missing id"));
                continue;
            };
            if wamid.len() > MAX_WAMID_LENGTH {
                self.problem(format!("{at} message {index}: id longer than {MAX_WAMID_LENGTH} bytes"));
                continue;
            }
            let from = message.get("from").and_then(id_string);
            // System messages come without contacts; a contact may lack `profile`.
            let contact = contacts
                .iter()
                .find(|c| from.is_some() && c.get("wa_id").and_then(id_string) == from)
                .cloned()
                .unwrap_or(Value::Null);
            self.items.push(Item {
                target: Target::PhoneNumber(phone_number_id.clone()),
                event_type: EventType::MessageReceived,
                dedup_key: format!("message:{wamid}"),
                data: json!({
                    "waba_id": waba_id,
                    "phone_number_id": phone_number_id,
                    "display_phone_number": display_phone_number,
                    "contact": contact,
                    "message": message,
                }),
                status: None,
                quality: None,
            });
        }

        for (index, status) in value.get("statuses").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let wamid = status.get("id").and_then(id_string);
            let state = status.get("status").and_then(Value::as_str);
            let (Some(wamid), Some(state)) = (wamid, state) else {
                self.problem(format!("{at} status {index}: missing id or status"));
                continue;
            };
            if wamid.len() > MAX_WAMID_LENGTH {
                self.problem(format!("{at} status {index}: id longer than {MAX_WAMID_LENGTH} bytes"));
                continue;
            }
            let (event_type, rank) = match state {
                "sent" => (EventType::MessageSent, StatusRank::Sent),
                "delivered" => (EventType::MessageDelivered, StatusRank::Delivered),
                "read" => (EventType::MessageRead, StatusRank::Read),
                "failed" => (EventType::MessageFailed, StatusRank::Failed),
                other => {
                    self.problem(format!("{at} status {index}: status {other:?} is not handled"));
                    continue;
                }
            };
            let first_error = status.get("errors").and_then(Value::as_array).and_then(|errors| errors.first());
            let error_code = first_error.and_then(|error| error.get("code")).and_then(id_string).and_then(|code| code.parse().ok());
            let error_title = first_error
                .and_then(|error| error.get("title"))
                .and_then(Value::as_str)
                .map(|title| title.chars().take(200).collect());
            let message_id = status
                .get("biz_opaque_callback_data")
                .and_then(Value::as_str)
                .and_then(|data| uuid::Uuid::parse_str(data).ok());
            self.items.push(Item {
                target: Target::PhoneNumber(phone_number_id.clone()),
                event_type,
                dedup_key: format!("status:{wamid}:{state}"),
                data: json!({
                    "waba_id": waba_id,
                    "phone_number_id": phone_number_id,
                    "display_phone_number": display_phone_number,
                    "status": status,
                }),
                status: Some(StatusUpdate { wamid, rank, error_code, error_title, message_id }),
                quality: None,
            });
        }
    }

    fn parse_quality_update(&mut self, at: &str, waba_id: &str, time: Option<&Value>, value: &Map<String, Value>) {
        let Some(display) = value.get("display_phone_number").and_then(id_string) else {
            self.problem(format!("{at}: quality update without display_phone_number"));
            return;
        };
        let event = value.get("event").and_then(Value::as_str).unwrap_or_default();
        // NOTE: Meta's quality events name a direction, not a rating. FLAGGED is taken as
        // RED and UNFLAGGED as YELLOW (flag lifted, quality not yet high); an explicit
        // rating field, when present, wins.
        let quality_rating = match value.get("quality_rating").or(value.get("new_quality_score")).and_then(Value::as_str) {
            Some("GREEN" | "HIGH") => Some("GREEN"),
            Some("YELLOW" | "MEDIUM") => Some("YELLOW"),
            Some("RED" | "LOW") => Some("RED"),
            _ => match event {
                "FLAGGED" => Some("RED"),
                "UNFLAGGED" => Some("YELLOW"),
                _ => None,
            },
        };
        // Meta's throughput upgrade raises a number from 80 to 1,000 messages per second.
        let mps = (event == "THROUGHPUT_UPGRADE").then_some(1000);
        let mut data = Map::new();
        data.insert("waba_id".into(), json!(waba_id));
        data.insert("update".into(), Value::Object(value.clone()));
        self.items.push(Item {
            target: Target::DisplayNumber { waba_id: waba_id.to_owned(), display_digits: digits(&display) },
            event_type: EventType::PhoneNumberQualityUpdated,
            dedup_key: content_key("quality", waba_id, time, value),
            data: Value::Object(data),
            status: None,
            quality: Some(QualityUpdate { quality_rating, mps }),
        });
    }

    fn push_waba_item(&mut self, event_type: EventType, waba_id: &str, field: &str, time: Option<&Value>, value: &Map<String, Value>) {
        self.items.push(Item {
            target: Target::Waba(waba_id.to_owned()),
            event_type,
            dedup_key: content_key(field, waba_id, time, value),
            data: json!({ "waba_id": waba_id, "field": field, "update": value }),
            status: None,
            quality: None,
        });
    }
}

/// Replaces U+0000 with U+FFFD in every string and object key. JSON allows `\u0000`,
/// but Postgres `jsonb` and `text` reject it, so one such character would fail the
/// whole transaction on every retry. The raw body is stored unchanged.
fn replace_nul_characters(value: &mut Value) {
    match value {
        Value::String(text) if text.contains('\0') => *text = text.replace('\0', "\u{FFFD}"),
        Value::Array(items) => items.iter_mut().for_each(replace_nul_characters),
        Value::Object(object) => {
            if object.keys().any(|key| key.contains('\0')) {
                *object = std::mem::take(object).into_iter().map(|(key, item)| (key.replace('\0', "\u{FFFD}"), item)).collect();
            }
            object.values_mut().for_each(replace_nul_characters);
        }
        _ => {}
    }
}

/// Reads an id Meta sends either as a string or as a number.
pub fn id_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Keeps only the digits of a phone number: `+1 555-0100` and `15550100` match.
pub fn digits(number: &str) -> String {
    number.chars().filter(char::is_ascii_digit).collect()
}

/// Builds the dedup key of an update without an id of its own: the hash of its content.
fn content_key(kind: &str, waba_id: &str, time: Option<&Value>, value: &Map<String, Value>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(&json!([waba_id, time, value])).expect("a JSON value serialises"));
    format!("{kind}:{}", hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_read_as_strings() {
        assert_eq!(id_string(&json!(1234567890123456u64)), Some("1234567890123456".into()));
        assert_eq!(id_string(&json!("42")), Some("42".into()));
        assert_eq!(id_string(&json!("")), None);
        assert_eq!(id_string(&Value::Null), None);
    }

    #[test]
    fn system_message_without_contacts_and_unknown_type() {
        let body = json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": 100, "changes": [{"field": "messages", "value": {
                "metadata": {"phone_number_id": 200, "display_phone_number": "1555"},
                "messages": [
                    {"id": "wamid.sys", "type": "system", "system": {"body": "changed number"}},
                    {"id": "wamid.new", "from": "1", "type": "hologram", "hologram": {"x": 1}}
                ],
                "statuses": [{"id": "wamid.s", "status": "delivered", "recipient_id": "1"}]
            }}]}]
        });
        let parsed = parse(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(parsed.items.len(), 3);
        assert!(parsed.problems.is_empty());
        assert_eq!(parsed.items[0].target, Target::PhoneNumber("200".into()));
        assert_eq!(parsed.items[0].data["contact"], Value::Null);
        assert_eq!(parsed.items[2].status.as_ref().unwrap().rank, StatusRank::Delivered);
    }

    #[test]
    fn not_a_waba_notification_is_unparseable() {
        assert!(parse(b"not json").is_err());
        assert!(parse(br#"{"object":"page","entry":[]}"#).is_err());
        assert!(parse(br#"{"object":"whatsapp_business_account","entry":[{"changes":[]}]}"#).is_err());
    }
}
