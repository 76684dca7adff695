//! Listing and replaying parked webhook deliveries, for `reachctl parked` and the
//! operator listener. A replay puts deliveries back to pending with a fresh retry
//! schedule; the relay's retry lane takes them within a sweep. Each replay writes one
//! audit event with its reason, in the same transaction.

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::audit::{self, AuditEvent};

/// The set of parked deliveries a command applies to.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub ids: Vec<i64>,
    pub org_id: Option<Uuid>,
    pub subscription_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.org_id.is_none() && self.subscription_id.is_none() && self.since.is_none() && self.until.is_none()
    }
}

/// A parked delivery as listed; no callback body or secret.
#[derive(Debug, Serialize)]
pub struct ParkedDelivery {
    pub id: i64,
    pub org_id: Uuid,
    pub event_id: Uuid,
    pub subscription_id: Uuid,
    pub attempt_count: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub parked_at: Option<DateTime<Utc>>,
}

/// The filter shared by list and replay; `$1` ids (empty = any), `$2` org, `$3`
/// subscription, `$4` parked since, `$5` parked until.
const FILTER: &str = "d.status = 'parked'
    AND (cardinality($1::bigint[]) = 0 OR d.id = ANY($1))
    AND ($2::uuid IS NULL OR d.org_id = $2)
    AND ($3::uuid IS NULL OR d.subscription_id = $3)
    AND ($4::timestamptz IS NULL OR d.parked_at >= $4)
    AND ($5::timestamptz IS NULL OR d.parked_at < $5)";

pub async fn list(pool: &PgPool, selection: &Selection, limit: i64) -> anyhow::Result<Vec<ParkedDelivery>> {
    let sql = format!(
        "SELECT d.id, d.org_id, d.event_id, d.subscription_id, d.attempt_count, d.last_status_code, d.last_error, d.parked_at
         FROM webhook_deliveries d WHERE {FILTER} ORDER BY d.parked_at, d.id LIMIT $6"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&selection.ids)
        .bind(selection.org_id)
        .bind(selection.subscription_id)
        .bind(selection.since)
        .bind(selection.until)
        .bind(limit)
        .fetch_all(pool)
        .await
        .context("failed to list parked deliveries")?;
    Ok(rows
        .iter()
        .map(|row| ParkedDelivery {
            id: row.get("id"),
            org_id: row.get("org_id"),
            event_id: row.get("event_id"),
            subscription_id: row.get("subscription_id"),
            attempt_count: row.get("attempt_count"),
            last_status_code: row.get("last_status_code"),
            last_error: row.get("last_error"),
            parked_at: row.get("parked_at"),
        })
        .collect())
}

/// Progress of a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Deliveries that will be replayed.
    Total(u64),
    /// Deliveries replayed so far.
    Replayed(u64),
}

/// Outcome of a replay run.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub replayed: u64,
    /// Parked deliveries of disabled subscriptions; they would park again at once.
    pub skipped_disabled: u64,
}

/// The operator requesting a replay, as recorded in the audit event.
#[derive(Debug, Clone, Default)]
pub struct Requester {
    pub user_id: String,
    pub email: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// Replays the selected parked deliveries in batches of 1,000, calling `progress` with
/// the total first and then after each batch with the count so far.
pub async fn replay(
    pool: &PgPool,
    selection: &Selection,
    reason: &str,
    requester: &Requester,
    mut progress: impl FnMut(Progress),
) -> anyhow::Result<ReplayReport> {
    if reason.trim().is_empty() {
        bail!("--reason is required and must not be empty: say why these deliveries are replayed");
    }
    if selection.is_empty() {
        bail!("select what to replay: --id, or a window with --since/--until, --org or --subscription");
    }
    let count_sql = format!(
        "SELECT count(*) FILTER (WHERE s.status = 'active') AS replayable, count(*) FILTER (WHERE s.status <> 'active') AS disabled
         FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id WHERE {FILTER}"
    );
    let counts = bind_filter(sqlx::query(sqlx::AssertSqlSafe(count_sql)), selection)
        .fetch_one(pool)
        .await
        .context("failed to count parked deliveries")?;
    let total: i64 = counts.get("replayable");
    let skipped_disabled: i64 = counts.get("disabled");

    progress(Progress::Total(total as u64));
    let batch_sql = format!(
        "UPDATE webhook_deliveries SET status = 'pending', attempt_count = 0, next_attempt_at = now(),
             parked_at = NULL, updated_at = now()
         WHERE id IN (
             SELECT d.id FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id
             WHERE {FILTER} AND s.status = 'active'
             ORDER BY d.id LIMIT 1000
             FOR UPDATE OF d SKIP LOCKED)"
    );
    let mut replayed = 0u64;
    let mut tx = pool.begin().await?;
    loop {
        let done = bind_filter(sqlx::query(sqlx::AssertSqlSafe(batch_sql.clone())), selection)
            .execute(&mut *tx)
            .await
            .context("failed to replay parked deliveries")?
            .rows_affected();
        replayed += done;
        progress(Progress::Replayed(replayed));
        if done < 1000 {
            break;
        }
    }
    let event = AuditEvent {
        actor_user_id: Some(requester.user_id.clone()),
        actor_email: requester.email.clone(),
        ip: requester.ip.clone(),
        action: "ParkedDeliveries.Replay".to_owned(),
        target_type: Some("webhook_deliveries".to_owned()),
        target_id: Some(describe(selection)),
        target_org_id: selection.org_id,
        user_agent: requester.user_agent.clone(),
        status_code: 200,
        reason: Some(format!("{reason} (replayed {replayed}, skipped {skipped_disabled} of disabled subscriptions)")),
        ..AuditEvent::default()
    };
    audit::record(&mut *tx, &event).await.context("failed to write the audit event")?;
    tx.commit().await.context("failed to commit the replay")?;
    Ok(ReplayReport { replayed, skipped_disabled: skipped_disabled as u64 })
}

fn bind_filter<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    selection: &Selection,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(selection.ids.clone())
        .bind(selection.org_id)
        .bind(selection.subscription_id)
        .bind(selection.since)
        .bind(selection.until)
}

/// Describes the selection for the audit event's target.
fn describe(selection: &Selection) -> String {
    let mut parts = Vec::new();
    if !selection.ids.is_empty() {
        let ids: Vec<String> = selection.ids.iter().map(i64::to_string).collect();
        parts.push(format!("ids={}", ids.join(",")));
    }
    if let Some(org) = selection.org_id {
        parts.push(format!("org={org}"));
    }
    if let Some(subscription) = selection.subscription_id {
        parts.push(format!("subscription={subscription}"));
    }
    if let Some(since) = selection.since {
        parts.push(format!("since={}", since.to_rfc3339()));
    }
    if let Some(until) = selection.until {
        parts.push(format!("until={}", until.to_rfc3339()));
    }
    parts.join(" ")
}
