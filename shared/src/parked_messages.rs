//! Listing and replaying parked outbound messages (failed because their retries ran
//! out), and resuming a paused phone number, for `reachctl`. A replay queues each
//! message again with a fresh attempt count; each replay or resume writes one audit
//! event with its reason, in the same transaction.

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::audit::{self, AuditEvent};
use crate::sends::{self, SendJob};

/// The parked messages a command applies to.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub ids: Vec<Uuid>,
    pub org_id: Option<Uuid>,
    pub phone_number_id: Option<String>,
    /// Parked (last updated) at or after.
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.org_id.is_none() && self.phone_number_id.is_none() && self.since.is_none() && self.until.is_none()
    }
}

/// A parked message as listed; no message body.
#[derive(Debug, Serialize)]
pub struct ParkedMessage {
    pub id: Uuid,
    pub org_id: Uuid,
    pub phone_number_id: String,
    pub attempt_count: i32,
    pub error_code: Option<i32>,
    pub error_title: Option<String>,
    pub parked_at: DateTime<Utc>,
}

const FILTER: &str = "m.parked AND m.state = 'failed'
    AND (cardinality($1::uuid[]) = 0 OR m.id = ANY($1))
    AND ($2::uuid IS NULL OR m.org_id = $2)
    AND ($3::text IS NULL OR m.phone_number_id = $3)
    AND ($4::timestamptz IS NULL OR m.updated_at >= $4)
    AND ($5::timestamptz IS NULL OR m.updated_at < $5)";

pub async fn list(pool: &PgPool, selection: &Selection, limit: i64) -> anyhow::Result<Vec<ParkedMessage>> {
    let sql = format!(
        "SELECT m.id, m.org_id, m.phone_number_id, m.attempt_count, m.error_code, m.error_title, m.updated_at
         FROM outbound_messages m WHERE {FILTER} ORDER BY m.updated_at, m.id LIMIT $6"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&selection.ids)
        .bind(selection.org_id)
        .bind(&selection.phone_number_id)
        .bind(selection.since)
        .bind(selection.until)
        .bind(limit)
        .fetch_all(pool)
        .await
        .context("failed to list parked messages")?;
    Ok(rows
        .iter()
        .map(|row| ParkedMessage {
            id: row.get("id"),
            org_id: row.get("org_id"),
            phone_number_id: row.get("phone_number_id"),
            attempt_count: row.get("attempt_count"),
            error_code: row.get("error_code"),
            error_title: row.get("error_title"),
            parked_at: row.get("updated_at"),
        })
        .collect())
}

/// Queues the selected parked messages again, in one transaction with its audit event.
/// Returns how many were queued.
pub async fn replay(pool: &PgPool, selection: &Selection, reason: &str, actor: &str, shards: u16) -> anyhow::Result<u64> {
    if reason.trim().is_empty() {
        bail!("--reason is required and must not be empty: say why these messages are replayed");
    }
    if selection.is_empty() {
        bail!("select what to replay: --id, or --org, --phone-number, --since or --until");
    }
    let sql = format!(
        "UPDATE outbound_messages AS m SET
             state = 'queued', state_rank = 0, parked = false, failure_reason = NULL,
             error_code = NULL, error_title = NULL, attempt_count = 0, attempt_started_at = NULL,
             next_attempt_at = NULL, dispatch_seq = m.dispatch_seq + 1, updated_at = now()
         WHERE {FILTER}
         RETURNING m.id, m.org_id, m.phone_number_id, m.dispatch_seq"
    );
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&selection.ids)
        .bind(selection.org_id)
        .bind(&selection.phone_number_id)
        .bind(selection.since)
        .bind(selection.until)
        .fetch_all(&mut *tx)
        .await
        .context("failed to replay parked messages")?;
    let jobs: Vec<SendJob> = rows
        .iter()
        .map(SendJob::from_row)
        .collect();
    sends::enqueue_jobs(&mut tx, &jobs, shards).await.context("failed to queue replayed messages")?;
    let event = AuditEvent {
        actor_user_id: Some(actor.to_owned()),
        action: "ParkedMessages.Replay".to_owned(),
        target_type: Some("outbound_messages".to_owned()),
        target_id: Some(describe(selection)),
        target_org_id: selection.org_id,
        user_agent: Some(concat!("reachctl/", env!("CARGO_PKG_VERSION")).to_owned()),
        status_code: 200,
        reason: Some(format!("{reason} (replayed {})", jobs.len())),
        ..AuditEvent::default()
    };
    audit::record(&mut *tx, &event).await.context("failed to write the audit event")?;
    tx.commit().await.context("failed to commit the replay")?;
    Ok(jobs.len() as u64)
}

/// Ends the pause of a phone number at once and makes its waiting messages due.
/// Returns whether the number was paused.
pub async fn resume_phone_number(pool: &PgPool, phone_number_id: &str, reason: &str, actor: &str) -> anyhow::Result<bool> {
    if reason.trim().is_empty() {
        bail!("--reason is required and must not be empty: say why sending resumes");
    }
    let mut tx = pool.begin().await?;
    let resumed = sqlx::query(
        "UPDATE phone_numbers SET sending_paused_until = NULL, updated_at = now()
         WHERE phone_number_id = $1 AND sending_paused_until IS NOT NULL
         RETURNING org_id",
    )
    .bind(phone_number_id)
    .fetch_optional(&mut *tx)
    .await
    .context("failed to resume the phone number")?;
    let Some(row) = resumed else {
        let known: Option<String> = sqlx::query_scalar("SELECT phone_number_id FROM phone_numbers WHERE phone_number_id = $1")
            .bind(phone_number_id)
            .fetch_optional(&mut *tx)
            .await?;
        if known.is_none() {
            bail!("phone number {phone_number_id} is not provisioned");
        }
        return Ok(false);
    };
    sqlx::query(
        "UPDATE outbound_messages SET next_attempt_at = now()
         WHERE phone_number_id = $1 AND state = 'queued' AND next_attempt_at > now()",
    )
    .bind(phone_number_id)
    .execute(&mut *tx)
    .await
    .context("failed to make the waiting messages due")?;
    let event = AuditEvent {
        actor_user_id: Some(actor.to_owned()),
        action: "PhoneNumberSending.Resume".to_owned(),
        target_type: Some("phone_number".to_owned()),
        target_id: Some(phone_number_id.to_owned()),
        target_org_id: Some(row.get("org_id")),
        user_agent: Some(concat!("reachctl/", env!("CARGO_PKG_VERSION")).to_owned()),
        status_code: 200,
        reason: Some(reason.to_owned()),
        ..AuditEvent::default()
    };
    audit::record(&mut *tx, &event).await.context("failed to write the audit event")?;
    tx.commit().await?;
    Ok(true)
}

fn describe(selection: &Selection) -> String {
    let mut parts = Vec::new();
    if !selection.ids.is_empty() {
        let ids: Vec<String> = selection.ids.iter().map(Uuid::to_string).collect();
        parts.push(format!("ids={}", ids.join(",")));
    }
    if let Some(org) = selection.org_id {
        parts.push(format!("org={org}"));
    }
    if let Some(number) = &selection.phone_number_id {
        parts.push(format!("phone_number={number}"));
    }
    if let Some(since) = selection.since {
        parts.push(format!("since={}", since.to_rfc3339()));
    }
    if let Some(until) = selection.until {
        parts.push(format!("until={}", until.to_rfc3339()));
    }
    parts.join(" ")
}
