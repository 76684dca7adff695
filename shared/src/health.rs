//! The operators' health figures (`/platform/health`, `reachctl health`): outbox,
//! webhook delivery and phone-number quality. They come from maintained counters and
//! bounded queries, never whole-table counts, and never include message bodies, phone
//! numbers or secrets.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};

#[derive(Debug, Serialize)]
pub struct HealthReport {
    pub outbox: OutboxHealth,
    pub webhooks: WebhookHealth,
    pub phone_numbers: PhoneNumberHealth,
    pub generated_at: String,
}

#[derive(Debug, Serialize)]
pub struct OutboxHealth {
    pub pending: i64,
    /// Rows dispatched and not yet deleted by the outbox retention.
    pub dispatched: i64,
    pub failed: i64,
    pub oldest_pending_age_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct WebhookHealth {
    pub delivered: i64,
    pub pending: i64,
    pub parked: i64,
}

#[derive(Debug, Serialize)]
pub struct PhoneNumberHealth {
    pub quality: BTreeMap<&'static str, i64>,
}

/// Reads the figures: counter sums, the oldest pending outbox row by index, and the
/// quality breakdown of the phone numbers (one row per number, a small table).
pub async fn report(pool: &PgPool) -> Result<HealthReport, sqlx::Error> {
    let counters: BTreeMap<String, i64> = sqlx::query("SELECT name, sum(value)::bigint AS value FROM platform.counters GROUP BY name")
        .fetch_all(pool)
        .await?
        .iter()
        .map(|row| (row.get("name"), row.get("value")))
        .collect();
    let counter = |name: &str| counters.get(name).copied().unwrap_or(0).max(0);

    let oldest: Option<DateTime<Utc>> = sqlx::query_scalar("SELECT created_at FROM outbox WHERE state = 'pending' ORDER BY id LIMIT 1")
        .fetch_optional(pool)
        .await?;
    let now = Utc::now();
    let oldest_pending_age_seconds = oldest.map(|at| (now - at).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);

    let mut quality: BTreeMap<&'static str, i64> = [("GREEN", 0), ("YELLOW", 0), ("RED", 0), ("UNKNOWN", 0)].into_iter().collect();
    for row in sqlx::query("SELECT quality_rating, count(*) AS numbers FROM phone_numbers GROUP BY quality_rating").fetch_all(pool).await? {
        let rating: String = row.get("quality_rating");
        if let Some(slot) = quality.get_mut(rating.as_str()) {
            *slot = row.get("numbers");
        }
    }

    Ok(HealthReport {
        outbox: OutboxHealth {
            pending: counter("outbox.pending"),
            dispatched: counter("outbox.dispatched"),
            failed: counter("outbox.failed"),
            oldest_pending_age_seconds,
        },
        webhooks: WebhookHealth {
            delivered: counter("webhook_deliveries.delivered"),
            pending: counter("webhook_deliveries.pending"),
            parked: counter("webhook_deliveries.parked"),
        },
        phone_numbers: PhoneNumberHealth { quality },
        generated_at: now.to_rfc3339_opts(SecondsFormat::Millis, true),
    })
}
