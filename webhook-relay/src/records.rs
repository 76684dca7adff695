//! Recording delivery outcomes. Consumers and the retry lane hand records to one
//! writer, which writes whatever is waiting in one transaction and replies to each
//! submitter after the commit; an event message is acknowledged only then.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use reach_shared::outbox::reconnect_policy;
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::sender::{Attempt, Verdict};

/// The state a delivery moves to after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Delivered,
    Retry(DateTime<Utc>),
    Parked(String),
}

impl Next {
    fn status(&self) -> &'static str {
        match self {
            Next::Delivered => "delivered",
            Next::Retry(_) => "pending",
            Next::Parked(_) => "parked",
        }
    }

    fn next_attempt_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Next::Retry(at) => Some(*at),
            _ => None,
        }
    }
}

/// The retry policy: when to try again after attempt number `attempts` (1-based).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub schedule: Vec<Duration>,
    pub retry_after_max: Duration,
}

impl RetryPolicy {
    /// Applies the delivery rules to the verdict of attempt number `attempts`.
    pub fn next(&self, verdict: Verdict, attempts: usize) -> Next {
        let exhausted = attempts > self.schedule.len();
        match verdict {
            Verdict::Delivered => Next::Delivered,
            Verdict::Forbidden => Next::Parked("target address is not public".to_owned()),
            Verdict::Gone => Next::Parked("endpoint answered 410 Gone: subscription disabled".to_owned()),
            _ if exhausted => Next::Parked(format!("failed {attempts} attempts, the retry schedule is exhausted")),
            Verdict::Throttled(Some(wait)) => {
                // The later of Retry-After and the schedule: honouring a short Retry-After
                // must not use the schedule up faster than failures would.
                let wait = wait.clamp(Duration::from_secs(1), self.retry_after_max);
                Next::Retry(Utc::now() + wait.max(jittered(self.schedule[attempts - 1])))
            }
            Verdict::Throttled(None) | Verdict::Failed => Next::Retry(Utc::now() + jittered(self.schedule[attempts - 1])),
        }
    }
}

/// Spreads a delay over ±20 %, so deliveries that failed together do not retry together.
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// One thing to write.
#[derive(Debug)]
pub enum Record {
    /// The first handling of an (event, subscription) pair: attempted now, or handed to
    /// the retry lane without an attempt (`attempt: None`) when the subscription was busy.
    First { org_id: Uuid, event_id: Uuid, subscription_id: Uuid, attempt: Option<Attempt>, next: Next },
    /// An attempt made by the retry lane on an existing delivery.
    Retry { org_id: Uuid, delivery_id: i64, subscription_id: Uuid, attempt: Attempt, next: Next },
    /// A claimed delivery put back without an attempt.
    Reschedule { delivery_id: i64, at: DateTime<Utc> },
    /// A claimed delivery parked without an attempt (subscription gone or disabled).
    Park { delivery_id: i64, reason: String },
}

#[derive(Debug, thiserror::Error)]
#[error("the record writer stopped before the records were written")]
pub struct WriterStopped;

struct Submission {
    records: Vec<Record>,
    done: oneshot::Sender<()>,
}

/// Handle to the writer task.
#[derive(Clone)]
pub struct RecordWriter {
    submissions: mpsc::Sender<Submission>,
}

/// Largest number of records written in one transaction.
const MAX_RECORDS_PER_TRANSACTION: usize = 2000;

impl RecordWriter {
    /// Starts the writer. It stops when every handle is dropped, or on `shutdown` while
    /// the database is unreachable (submitters then get [`WriterStopped`]).
    pub fn start(pool: PgPool, shutdown: CancellationToken) -> (Self, tokio::task::JoinHandle<()>) {
        let (submissions, receiver) = mpsc::channel(4096);
        let task = tokio::spawn(run_writer(pool, receiver, shutdown));
        (Self { submissions }, task)
    }

    /// Writes the records and returns after the commit.
    pub async fn commit(&self, records: Vec<Record>) -> Result<(), WriterStopped> {
        if records.is_empty() {
            return Ok(());
        }
        let (done, committed) = oneshot::channel();
        self.submissions.send(Submission { records, done }).await.map_err(|_| WriterStopped)?;
        committed.await.map_err(|_| WriterStopped)
    }
}

async fn run_writer(pool: PgPool, mut receiver: mpsc::Receiver<Submission>, shutdown: CancellationToken) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let mut count = batch[0].records.len();
        while count < MAX_RECORDS_PER_TRANSACTION {
            match receiver.try_recv() {
                Ok(next) => {
                    count += next.records.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let records: Vec<&Record> = batch.iter().flat_map(|s| &s.records).collect();
        let mut delays = reconnect_policy();
        loop {
            match write(&pool, &records).await {
                Ok(()) => break,
                Err(error) if shutdown.is_cancelled() => {
                    tracing::error!(%error, records = records.len(), "failed to record deliveries during shutdown, their messages return to the queue");
                    return;
                }
                Err(error) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(%error, records = records.len(), retry_in_ms = delay.as_millis() as u64, "failed to record deliveries, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        metrics::histogram!("reach_relay_record_batch_size").record(records.len() as f64);
        for submission in batch {
            let _ = submission.done.send(());
        }
    }
}

async fn write(pool: &PgPool, records: &[&Record]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut attempts: Vec<(i64, Uuid, &Attempt)> = Vec::new();
    let mut gone: Vec<Uuid> = Vec::new();

    // First handlings, one row per (event, subscription); a later record for the same
    // pair in this batch wins.
    let mut firsts: HashMap<(Uuid, Uuid), &Record> = HashMap::new();
    for record in records {
        if let Record::First { event_id, subscription_id, .. } = record {
            firsts.insert((*event_id, *subscription_id), record);
        }
    }
    let mut firsts: Vec<_> = firsts.into_iter().collect();
    firsts.sort_by_key(|(key, _)| *key);
    if !firsts.is_empty() {
        let ids = insert_first(&mut tx, &firsts).await?;
        // Every attempt is recorded, including both of a pair handled twice in this batch.
        for record in records {
            if let Record::First { org_id, event_id, subscription_id, attempt: Some(attempt), .. } = record {
                if let Some(id) = ids.get(&(*event_id, *subscription_id)) {
                    attempts.push((*id, *org_id, attempt));
                }
                if attempt.verdict == Verdict::Gone {
                    gone.push(*subscription_id);
                }
            }
        }
    }

    let mut retries: Vec<&Record> = records.iter().copied().filter(|r| !matches!(r, Record::First { .. })).collect();
    retries.sort_by_key(|r| match r {
        Record::Retry { delivery_id, .. } | Record::Reschedule { delivery_id, .. } | Record::Park { delivery_id, .. } => *delivery_id,
        Record::First { .. } => 0,
    });
    if !retries.is_empty() {
        update_existing(&mut tx, &retries).await?;
        for record in &retries {
            if let Record::Retry { org_id, delivery_id, subscription_id, attempt, .. } = record {
                attempts.push((*delivery_id, *org_id, attempt));
                if attempt.verdict == Verdict::Gone {
                    gone.push(*subscription_id);
                }
            }
        }
    }

    insert_attempts(&mut tx, &attempts).await?;

    gone.sort();
    gone.dedup();
    for subscription_id in gone {
        disable_subscription(&mut tx, subscription_id).await?;
    }
    tx.commit().await
}

async fn insert_first(tx: &mut Transaction<'_, Postgres>, firsts: &[((Uuid, Uuid), &Record)]) -> Result<HashMap<(Uuid, Uuid), i64>, sqlx::Error> {
    let mut org_ids = Vec::new();
    let mut event_ids = Vec::new();
    let mut subscription_ids = Vec::new();
    let mut statuses = Vec::new();
    let mut attempt_counts = Vec::new();
    let mut next_attempts = Vec::new();
    let mut codes = Vec::new();
    let mut errors = Vec::new();
    for (_, record) in firsts {
        let Record::First { org_id, event_id, subscription_id, attempt, next } = record else { continue };
        org_ids.push(*org_id);
        event_ids.push(*event_id);
        subscription_ids.push(*subscription_id);
        statuses.push(next.status());
        attempt_counts.push(i32::from(attempt.is_some()));
        next_attempts.push(next.next_attempt_at());
        codes.push(attempt.as_ref().and_then(|a| a.status_code).map(i32::from));
        errors.push(last_error(attempt.as_ref(), next));
    }
    let rows = sqlx::query(
        "INSERT INTO webhook_deliveries AS d
             (org_id, event_id, subscription_id, status, attempt_count, next_attempt_at, last_status_code, last_error, delivered_at, parked_at)
         SELECT org_id, event_id, subscription_id, status, attempt_count, next_attempt_at, last_status_code, last_error,
                CASE WHEN status = 'delivered' THEN now() END, CASE WHEN status = 'parked' THEN now() END
         FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::int[], $6::timestamptz[], $7::int[], $8::text[])
              AS t (org_id, event_id, subscription_id, status, attempt_count, next_attempt_at, last_status_code, last_error)
         ON CONFLICT (event_id, subscription_id) DO UPDATE SET
             attempt_count = d.attempt_count + EXCLUDED.attempt_count,
             status = CASE WHEN d.status = 'delivered' THEN 'delivered' ELSE EXCLUDED.status END,
             next_attempt_at = CASE WHEN d.status = 'delivered' THEN NULL ELSE EXCLUDED.next_attempt_at END,
             last_status_code = coalesce(EXCLUDED.last_status_code, d.last_status_code),
             last_error = EXCLUDED.last_error,
             delivered_at = coalesce(d.delivered_at, EXCLUDED.delivered_at),
             parked_at = CASE WHEN d.status = 'delivered' THEN NULL ELSE EXCLUDED.parked_at END,
             updated_at = now()
         RETURNING id, event_id, subscription_id",
    )
    .bind(&org_ids)
    .bind(&event_ids)
    .bind(&subscription_ids)
    .bind(&statuses)
    .bind(&attempt_counts)
    .bind(&next_attempts)
    .bind(&codes)
    .bind(&errors)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .iter()
        .map(|row| ((row.get("event_id"), row.get("subscription_id")), row.get("id")))
        .collect())
}

async fn update_existing(tx: &mut Transaction<'_, Postgres>, records: &[&Record]) -> Result<(), sqlx::Error> {
    let mut ids = Vec::new();
    let mut statuses = Vec::new();
    let mut increments = Vec::new();
    let mut next_attempts = Vec::new();
    let mut codes = Vec::new();
    let mut errors = Vec::new();
    for record in records {
        let (id, status, increment, next_at, code, error) = match record {
            Record::Retry { delivery_id, attempt, next, .. } => (
                *delivery_id,
                next.status(),
                1,
                next.next_attempt_at(),
                attempt.status_code.map(i32::from),
                last_error(Some(attempt), next),
            ),
            Record::Reschedule { delivery_id, at } => (*delivery_id, "pending", 0, Some(*at), None, None),
            Record::Park { delivery_id, reason } => (*delivery_id, "parked", 0, None, None, Some(reason.clone())),
            Record::First { .. } => continue,
        };
        ids.push(id);
        statuses.push(status);
        increments.push(increment);
        next_attempts.push(next_at);
        codes.push(code);
        errors.push(error);
    }
    sqlx::query(
        "UPDATE webhook_deliveries AS d SET
             status = t.status,
             attempt_count = d.attempt_count + t.increment,
             next_attempt_at = t.next_attempt_at,
             last_status_code = coalesce(t.code, d.last_status_code),
             last_error = coalesce(t.error, d.last_error),
             delivered_at = CASE WHEN t.status = 'delivered' THEN now() ELSE d.delivered_at END,
             parked_at = CASE WHEN t.status = 'parked' THEN now() ELSE d.parked_at END,
             updated_at = now()
         FROM UNNEST($1::bigint[], $2::text[], $3::int[], $4::timestamptz[], $5::int[], $6::text[])
              AS t (id, status, increment, next_attempt_at, code, error)
         WHERE d.id = t.id AND d.status = 'pending'",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&increments)
    .bind(&next_attempts)
    .bind(&codes)
    .bind(&errors)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_attempts(tx: &mut Transaction<'_, Postgres>, attempts: &[(i64, Uuid, &Attempt)]) -> Result<(), sqlx::Error> {
    if attempts.is_empty() {
        return Ok(());
    }
    let delivery_ids: Vec<i64> = attempts.iter().map(|(id, _, _)| *id).collect();
    let org_ids: Vec<Uuid> = attempts.iter().map(|(_, org, _)| *org).collect();
    let at: Vec<DateTime<Utc>> = attempts.iter().map(|(_, _, a)| a.attempted_at).collect();
    let durations: Vec<i32> = attempts.iter().map(|(_, _, a)| a.duration.as_millis().min(i32::MAX as u128) as i32).collect();
    let codes: Vec<Option<i32>> = attempts.iter().map(|(_, _, a)| a.status_code.map(i32::from)).collect();
    let errors: Vec<Option<&str>> = attempts.iter().map(|(_, _, a)| a.error.as_deref()).collect();
    let bodies: Vec<Option<String>> = attempts.iter().map(|(_, _, a)| a.response_body.as_ref().map(|b| b.replace('\0', ""))).collect();
    let truncated: Vec<bool> = attempts.iter().map(|(_, _, a)| a.response_truncated).collect();
    sqlx::query(
        "INSERT INTO webhook_attempts (delivery_id, org_id, attempted_at, duration_ms, status_code, error, response_body, response_truncated)
         SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::timestamptz[], $4::int[], $5::int[], $6::text[], $7::text[], $8::bool[])",
    )
    .bind(&delivery_ids)
    .bind(&org_ids)
    .bind(&at)
    .bind(&durations)
    .bind(&codes)
    .bind(&errors)
    .bind(&bodies)
    .bind(&truncated)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Disables a subscription whose endpoint returned 410 Gone and parks everything still
/// pending for it.
async fn disable_subscription(tx: &mut Transaction<'_, Postgres>, subscription_id: Uuid) -> Result<(), sqlx::Error> {
    let disabled_org: Option<Uuid> = sqlx::query_scalar(
        "UPDATE webhook_subscriptions SET status = 'disabled', disabled_reason = 'endpoint answered 410 Gone', updated_at = now()
         WHERE id = $1 AND status = 'active'
         RETURNING org_id",
    )
    .bind(subscription_id)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(org_id) = disabled_org {
        // Other relays drop the subscription from their caches at commit.
        reach_shared::db::notify_subscriptions_changed(tx, org_id).await?;
    }
    let disabled = u64::from(disabled_org.is_some());
    let parked = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'parked', parked_at = now(), next_attempt_at = NULL,
             last_error = 'subscription disabled after 410 Gone', updated_at = now()
         WHERE subscription_id = $1 AND status = 'pending'",
    )
    .bind(subscription_id)
    .execute(&mut **tx)
    .await?;
    if disabled > 0 {
        tracing::warn!(%subscription_id, parked = parked.rows_affected(), "disabled a subscription whose endpoint returned 410 Gone");
        metrics::counter!("reach_relay_subscriptions_disabled_total").increment(1);
    }
    Ok(())
}

fn last_error(attempt: Option<&Attempt>, next: &Next) -> Option<String> {
    match next {
        Next::Parked(reason) => Some(match attempt.and_then(|a| a.error.as_deref()) {
            Some(error) => format!("{reason}; last error: {error}"),
            None => reason.clone(),
        }),
        _ => attempt.and_then(|a| a.error.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { schedule: vec![Duration::from_secs(10), Duration::from_secs(100)], retry_after_max: Duration::from_secs(60) }
    }

    #[test]
    fn retry_policy_follows_schedule_then_parks() {
        let policy = policy();
        let Next::Retry(at) = policy.next(Verdict::Failed, 1) else { panic!("first failure retries") };
        let wait = (at - Utc::now()).num_milliseconds();
        assert!((7_000..=12_000).contains(&wait), "waits 10 s ± 20 %, got {wait} ms");
        assert!(matches!(policy.next(Verdict::Failed, 2), Next::Retry(_)));
        assert!(matches!(policy.next(Verdict::Failed, 3), Next::Parked(_)));
    }

    #[test]
    fn retry_after_is_bounded() {
        let policy = policy();
        let Next::Retry(at) = policy.next(Verdict::Throttled(Some(Duration::from_secs(3600))), 1) else { panic!("throttled retries") };
        assert!((at - Utc::now()).num_seconds() <= 60, "capped at retry_after_max");
        let Next::Retry(at) = policy.next(Verdict::Throttled(Some(Duration::ZERO)), 1) else { panic!("throttled retries") };
        assert!((at - Utc::now()).num_milliseconds() >= 900, "at least one second");
    }

    #[test]
    fn gone_and_forbidden_park_at_once() {
        assert!(matches!(policy().next(Verdict::Gone, 1), Next::Parked(_)));
        assert!(matches!(policy().next(Verdict::Forbidden, 1), Next::Parked(_)));
        assert_eq!(policy().next(Verdict::Delivered, 3), Next::Delivered);
    }
}
