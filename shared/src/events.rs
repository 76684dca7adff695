//! Event types customers subscribe to, and the callback body they receive.

use std::collections::HashSet;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Every event type a subscription can name; `*` subscribes to all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "message.received")]
    MessageReceived,
    #[serde(rename = "message.accepted")]
    MessageAccepted,
    #[serde(rename = "message.sent")]
    MessageSent,
    #[serde(rename = "message.delivered")]
    MessageDelivered,
    #[serde(rename = "message.read")]
    MessageRead,
    #[serde(rename = "message.failed")]
    MessageFailed,
    #[serde(rename = "template.status_updated")]
    TemplateStatusUpdated,
    #[serde(rename = "phone_number.quality_updated")]
    PhoneNumberQualityUpdated,
    #[serde(rename = "account.updated")]
    AccountUpdated,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        EventType::MessageReceived,
        EventType::MessageAccepted,
        EventType::MessageSent,
        EventType::MessageDelivered,
        EventType::MessageRead,
        EventType::MessageFailed,
        EventType::TemplateStatusUpdated,
        EventType::PhoneNumberQualityUpdated,
        EventType::AccountUpdated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::MessageReceived => "message.received",
            EventType::MessageAccepted => "message.accepted",
            EventType::MessageSent => "message.sent",
            EventType::MessageDelivered => "message.delivered",
            EventType::MessageRead => "message.read",
            EventType::MessageFailed => "message.failed",
            EventType::TemplateStatusUpdated => "template.status_updated",
            EventType::PhoneNumberQualityUpdated => "phone_number.quality_updated",
            EventType::AccountUpdated => "account.updated",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == value)
    }
}

/// An event to store: the event, what makes it the same fact as another (unique per
/// org), and where it came from.
pub struct StoredEvent<'a> {
    pub event: &'a Event,
    pub dedup_key: &'a str,
    pub phone_number_id: Option<&'a str>,
    pub inbound_webhook_id: Option<i64>,
}

/// Inserts events in one statement; an event whose org and dedup key are stored already
/// is skipped. Returns the ids of the events inserted.
pub async fn insert(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, events: &[StoredEvent<'_>]) -> Result<HashSet<Uuid>, sqlx::Error> {
    use sqlx::Row;

    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event.id).collect();
    let org_ids: Vec<Uuid> = events.iter().map(|e| e.event.org_id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event.event_type.as_str()).collect();
    let keys: Vec<&str> = events.iter().map(|e| e.dedup_key).collect();
    let phone_ids: Vec<Option<&str>> = events.iter().map(|e| e.phone_number_id).collect();
    let webhook_ids: Vec<Option<i64>> = events.iter().map(|e| e.inbound_webhook_id).collect();
    let data: Vec<String> = events.iter().map(|e| e.event.data.to_string()).collect();
    let created: Vec<DateTime<Utc>> = events.iter().map(|e| e.event.created_at).collect();
    let rows = sqlx::query(
        "INSERT INTO events (id, org_id, type, dedup_key, phone_number_id, inbound_webhook_id, data, created_at)
         SELECT id, org_id, type, dedup_key, phone_number_id, inbound_webhook_id, data::jsonb, created_at
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::timestamptz[])
              AS t (id, org_id, type, dedup_key, phone_number_id, inbound_webhook_id, data, created_at)
         ON CONFLICT (org_id, dedup_key) DO NOTHING
         RETURNING id",
    )
    .bind(&ids)
    .bind(&org_ids)
    .bind(&types)
    .bind(&keys)
    .bind(&phone_ids)
    .bind(&webhook_ids)
    .bind(&data)
    .bind(&created)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.iter().map(|row| row.get("id")).collect())
}

/// An event as it travels from the outbox to the relay and, serialised, to customers:
/// `{"id", "type", "created_at", "org_id", "data"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: EventType,
    #[serde(with = "timestamp_millis")]
    pub created_at: DateTime<Utc>,
    pub org_id: Uuid,
    pub data: serde_json::Value,
}

impl Event {
    /// Serialises the callback body. The output depends only on the event's content
    /// (object keys sorted, timestamps in milliseconds), so a retry built from the
    /// database sends the same bytes as the first attempt built from the queue.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serialises")
    }
}

/// The fields of an event the relay routes on, read from a callback body without
/// parsing its `data`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct EventHeader {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: EventType,
    #[serde(with = "timestamp_millis")]
    pub created_at: DateTime<Utc>,
    pub org_id: Uuid,
}

impl Event {
    pub fn header(&self) -> EventHeader {
        EventHeader { id: self.id, event_type: self.event_type, created_at: self.created_at, org_id: self.org_id }
    }
}

/// Truncates a timestamp to what [`Event`] keeps: whole milliseconds.
pub fn truncate_to_millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).expect("a valid timestamp stays valid when truncated")
}

mod timestamp_millis {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|at| at.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_type_names_round_trip() {
        for event_type in EventType::ALL {
            assert_eq!(EventType::parse(event_type.as_str()), Some(event_type));
            let json = serde_json::to_string(&event_type).unwrap();
            assert_eq!(json, format!("\"{}\"", event_type.as_str()));
        }
        assert_eq!(EventType::parse("message.unknown"), None);
    }

    #[test]
    fn body_is_stable_across_json_round_trip() {
        let event = Event {
            id: Uuid::now_v7(),
            event_type: EventType::MessageReceived,
            created_at: truncate_to_millis(Utc::now()),
            org_id: Uuid::new_v4(),
            data: serde_json::json!({"z": 1, "a": {"é": "ü 🎉", "b": [1, 2]}}),
        };
        let body = event.to_body();
        let reparsed: Event = serde_json::from_slice(&body).unwrap();
        assert_eq!(reparsed, event);
        let header: EventHeader = serde_json::from_slice(&body).unwrap();
        assert_eq!(header, event.header());
        assert_eq!(reparsed.to_body(), body);
    }
}
