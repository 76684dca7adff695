//! The dispatcher's database writes, group-committed: callers hand an operation to
//! [`Store::run`] and get its result after the commit. Writer tasks take every
//! operation waiting (up to a batch) and apply them in one transaction, so thousands
//! of sends per second cost tens of commits.
//!
//! Operations:
//! - claim: record an attempt before the Graph API call (attempt count and start time).
//! - defer: put a queued message aside until a time; the sweeper queues it again.
//! - accept: store the wamid, emit `message.accepted`.
//! - fail: fail the message, emit `message.failed`.
//! - pause: pause a phone number after an account-level error, emit `account.updated`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use reach_shared::amqp::Topic;
use reach_shared::batch::Batcher;
use reach_shared::db::is_transient;
use reach_shared::events::{self, Event, EventType, StoredEvent, truncate_to_millis};
use reach_shared::outbox::{self, OutboxMessage, OutboxWaker};
use reach_shared::sends::SendJob;
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

/// A message claimed for one attempt.
#[derive(Debug, Clone)]
pub struct ClaimedMessage {
    pub id: Uuid,
    pub org_id: Uuid,
    pub phone_number_id: String,
    pub recipient: String,
    pub message_type: String,
    /// The Graph API body, without `biz_opaque_callback_data`.
    pub request: Value,
    /// Attempts so far, this one included.
    pub attempt_count: i32,
}

#[derive(Debug, Clone)]
pub enum Claim {
    Claimed(ClaimedMessage),
    /// Nothing to send: the job is stale, the message has a wamid or a final state.
    Skip,
    /// An earlier attempt may have reached Meta; wait until this time for a status
    /// webhook to reveal its wamid before sending again.
    Wait(DateTime<Utc>),
}

/// Puts a queued message aside until `until`.
#[derive(Debug, Clone)]
pub struct Deferral {
    pub job: SendJob,
    pub until: DateTime<Utc>,
    pub error_code: Option<i32>,
    pub error_title: Option<String>,
    /// Keep the attempt start time: the last call may have reached Meta.
    pub uncertain: bool,
    /// The message was claimed but never sent: take the attempt back.
    pub undo_claim: bool,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub message: ClaimedMessage,
    pub error_code: i32,
    pub error_title: String,
    /// `permanent_error` or `retries_exhausted`.
    pub reason: &'static str,
    /// Replayable by an operator (retries ran out).
    pub parked: bool,
}

#[derive(Debug, Clone)]
pub struct Pause {
    pub org_id: Uuid,
    pub phone_number_id: String,
    pub duration: Duration,
    pub error_code: i32,
    pub error_title: String,
}

#[derive(Debug)]
pub enum Operation {
    Claim { job: SendJob, grace: Duration },
    Defer(Deferral),
    Accept { message: ClaimedMessage, wamid: String },
    Fail(Failure),
    Pause(Pause),
}

#[derive(Debug, Clone)]
pub enum Reply {
    Claim(Claim),
    /// Deferred, accepted, failed or paused; `false` when the message had moved on
    /// (a status arrived, another attempt finished) and nothing was written.
    Done(bool),
    /// The number was already paused; the time it resumes.
    Paused(DateTime<Utc>),
}

#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum StoreError {
    #[error("the database is unavailable")]
    Unavailable,
    #[error("failed to write the dispatcher's outcome")]
    Failed,
    #[error("the store is shutting down")]
    ShuttingDown,
}

/// Handle to the writer tasks; clone freely. Claims have writers of their own, so a
/// claim does not queue behind a large batch of outcomes, because claims feed the pacer.
#[derive(Clone)]
pub struct Store {
    claims: Batcher<Operation, Result<Reply, StoreError>>,
    outcomes: Batcher<Operation, Result<Reply, StoreError>>,
}

impl Store {
    pub fn start(pool: PgPool, writers: usize, max_batch: usize, waker: OutboxWaker) -> (Self, tokio::task::JoinSet<()>) {
        let (claims, mut tasks) = start_writers("dispatcher_claims", pool.clone(), (writers / 2).max(1), max_batch, waker.clone());
        let (outcomes, mut outcome_tasks) = start_writers("dispatcher_outcomes", pool, writers, max_batch, waker);
        // Both sets are awaited by the caller through one JoinSet.
        tasks.spawn(async move { while outcome_tasks.join_next().await.is_some() {} });
        (Self { claims, outcomes }, tasks)
    }

    pub async fn run(&self, operation: Operation) -> Result<Reply, StoreError> {
        let writers = if matches!(operation, Operation::Claim { .. }) { &self.claims } else { &self.outcomes };
        writers.submit(operation).await.map_err(|_| StoreError::ShuttingDown)?
    }
}

fn start_writers(
    name: &'static str,
    pool: PgPool,
    writers: usize,
    max_batch: usize,
    waker: OutboxWaker,
) -> (Batcher<Operation, Result<Reply, StoreError>>, tokio::task::JoinSet<()>) {
    Batcher::start(name, writers, max_batch, move |operations: Vec<Operation>| {
        let pool = pool.clone();
        let waker = waker.clone();
        async move {
            match write_with_retry(&pool, &operations).await {
                Ok(written) => {
                    if written.wrote_outbox {
                        waker.wake();
                    }
                    if written.duplicates > 0 {
                        metrics::counter!("reach_dispatcher_duplicate_sends_total").increment(written.duplicates);
                    }
                    written.replies.into_iter().map(Ok).collect()
                }
                Err(error) => {
                    tracing::error!(%error, batch = operations.len(), "failed to write dispatcher outcomes");
                    let failure = if is_transient(&error) { StoreError::Unavailable } else { StoreError::Failed };
                    operations.iter().map(|_| Err(failure)).collect()
                }
            }
        }
    })
}

async fn write_with_retry(pool: &PgPool, operations: &[Operation]) -> Result<Written, sqlx::Error> {
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let result = async {
            let mut tx = pool.begin().await?;
            let written = write_batch(&mut tx, operations).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(written)
        }
        .await;
        match result {
            Err(error) if is_transient(&error) && attempt < 3 => {
                tracing::warn!(%error, attempt, "transient database error in the dispatcher, retrying");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            other => return other,
        }
    }
}

/// Applies one batch: claims first, then deferrals, accepts, failures and pauses.
async fn write_batch(tx: &mut Transaction<'_, Postgres>, operations: &[Operation]) -> Result<Written, sqlx::Error> {
    let mut replies: Vec<Option<Reply>> = vec![None; operations.len()];
    let mut events: Vec<(Event, String, Option<String>)> = Vec::new();
    let mut duplicates = 0;

    claim(tx, operations, &mut replies).await?;
    pause(tx, operations, &mut replies, &mut events).await?;
    defer(tx, operations, &mut replies).await?;
    accept(tx, operations, &mut replies, &mut events, &mut duplicates).await?;
    fail(tx, operations, &mut replies, &mut events).await?;

    let wrote_outbox = insert_events(tx, &events).await?;
    let replies = replies.into_iter().map(|reply| reply.unwrap_or(Reply::Done(false))).collect();
    Ok(Written { replies, wrote_outbox, duplicates })
}

/// The result of one committed batch.
struct Written {
    replies: Vec<Reply>,
    wrote_outbox: bool,
    /// Messages found sent twice.
    duplicates: u64,
}

async fn claim(tx: &mut Transaction<'_, Postgres>, operations: &[Operation], replies: &mut [Option<Reply>]) -> Result<(), sqlx::Error> {
    let mut indexes = Vec::new();
    let mut ids = Vec::new();
    let mut seqs = Vec::new();
    let mut graces = Vec::new();
    for (index, operation) in operations.iter().enumerate() {
        if let Operation::Claim { job, grace } = operation {
            indexes.push(index);
            ids.push(job.message_id);
            seqs.push(job.seq);
            graces.push(grace.as_secs_f64());
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    let rows = sqlx::query(
        "UPDATE outbound_messages AS m SET
             attempt_count = m.attempt_count + 1,
             attempt_started_at = now(),
             updated_at = now()
         FROM (SELECT DISTINCT ON (id) id, seq, grace FROM UNNEST($1::uuid[], $2::int[], $3::float8[]) AS t (id, seq, grace) ORDER BY id) AS j
         WHERE m.id = j.id AND m.dispatch_seq = j.seq AND m.state = 'queued' AND m.wamid IS NULL
           AND m.next_attempt_at IS NULL
           AND (m.attempt_started_at IS NULL OR m.attempt_started_at < now() - make_interval(secs => j.grace))
         RETURNING m.id, m.org_id, m.phone_number_id, m.recipient, m.type, m.request, m.attempt_count",
    )
    .bind(&ids)
    .bind(&seqs)
    .bind(&graces)
    .fetch_all(&mut **tx)
    .await?;
    let mut claimed: HashMap<Uuid, ClaimedMessage> = rows
        .into_iter()
        .map(|row| {
            let message = ClaimedMessage {
                id: row.get("id"),
                org_id: row.get("org_id"),
                phone_number_id: row.get("phone_number_id"),
                recipient: row.get("recipient"),
                message_type: row.get("type"),
                request: row.get("request"),
                attempt_count: row.get("attempt_count"),
            };
            (message.id, message)
        })
        .collect();

    let unclaimed: Vec<Uuid> = ids.iter().copied().filter(|id| !claimed.contains_key(id)).collect();
    let mut waits: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
    if !unclaimed.is_empty() {
        // A job that found an attempt in progress, and nothing else wrong, waits.
        let rows = sqlx::query(
            "SELECT m.id, m.attempt_started_at + make_interval(secs => j.grace) AS wait_until
             FROM outbound_messages m
             JOIN (SELECT DISTINCT ON (id) id, seq, grace FROM UNNEST($1::uuid[], $2::int[], $3::float8[]) AS t (id, seq, grace) ORDER BY id) AS j
               ON m.id = j.id AND m.dispatch_seq = j.seq
             WHERE m.id = ANY($4) AND m.state = 'queued' AND m.wamid IS NULL AND m.next_attempt_at IS NULL
               AND m.attempt_started_at IS NOT NULL",
        )
        .bind(&ids)
        .bind(&seqs)
        .bind(&graces)
        .bind(&unclaimed)
        .fetch_all(&mut **tx)
        .await?;
        waits = rows.into_iter().map(|row| (row.get("id"), row.get("wait_until"))).collect();
    }

    for (position, index) in indexes.into_iter().enumerate() {
        let id = ids[position];
        // The first job of a message in the batch takes the claim; a duplicate skips.
        replies[index] = Some(Reply::Claim(match claimed.remove(&id) {
            Some(message) => Claim::Claimed(message),
            None => match waits.remove(&id) {
                Some(until) => Claim::Wait(until),
                None => Claim::Skip,
            },
        }));
    }
    Ok(())
}

async fn defer(tx: &mut Transaction<'_, Postgres>, operations: &[Operation], replies: &mut [Option<Reply>]) -> Result<(), sqlx::Error> {
    let deferrals: Vec<(usize, &Deferral)> = operations
        .iter()
        .enumerate()
        .filter_map(|(index, operation)| match operation {
            Operation::Defer(deferral) => Some((index, deferral)),
            _ => None,
        })
        .collect();
    if deferrals.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = deferrals.iter().map(|(_, d)| d.job.message_id).collect();
    let seqs: Vec<i32> = deferrals.iter().map(|(_, d)| d.job.seq).collect();
    let untils: Vec<DateTime<Utc>> = deferrals.iter().map(|(_, d)| d.until).collect();
    let codes: Vec<Option<i32>> = deferrals.iter().map(|(_, d)| d.error_code).collect();
    let titles: Vec<Option<&str>> = deferrals.iter().map(|(_, d)| d.error_title.as_deref()).collect();
    let uncertain: Vec<bool> = deferrals.iter().map(|(_, d)| d.uncertain).collect();
    let undo: Vec<bool> = deferrals.iter().map(|(_, d)| d.undo_claim).collect();
    let rows = sqlx::query(
        // A message can already be waiting when a dispatcher that lost its shard
        // releases its claim (the new owner saw the claim and chose to wait): the
        // earlier time wins, so the release is not lost.
        "UPDATE outbound_messages AS m SET
             next_attempt_at = least(coalesce(m.next_attempt_at, d.until), d.until),
             attempt_started_at = CASE WHEN d.uncertain THEN m.attempt_started_at ELSE NULL END,
             attempt_count = CASE WHEN d.undo THEN greatest(m.attempt_count - 1, 0) ELSE m.attempt_count END,
             error_code = coalesce(d.code, m.error_code),
             error_title = coalesce(d.title, m.error_title),
             updated_at = now()
         FROM (SELECT DISTINCT ON (id) * FROM UNNEST($1::uuid[], $2::int[], $3::timestamptz[], $4::int[], $5::text[], $6::bool[], $7::bool[])
               AS t (id, seq, until, code, title, uncertain, undo) ORDER BY id) AS d
         WHERE m.id = d.id AND m.dispatch_seq = d.seq AND m.state = 'queued' AND m.wamid IS NULL
         RETURNING m.id",
    )
    .bind(&ids)
    .bind(&seqs)
    .bind(&untils)
    .bind(&codes)
    .bind(&titles)
    .bind(&uncertain)
    .bind(&undo)
    .fetch_all(&mut **tx)
    .await?;
    let done: HashSet<Uuid> = rows.iter().map(|row| row.get("id")).collect();
    for (index, deferral) in deferrals {
        replies[index] = Some(Reply::Done(done.contains(&deferral.job.message_id)));
    }
    Ok(())
}

async fn accept(
    tx: &mut Transaction<'_, Postgres>,
    operations: &[Operation],
    replies: &mut [Option<Reply>],
    events: &mut Vec<(Event, String, Option<String>)>,
    duplicates: &mut u64,
) -> Result<(), sqlx::Error> {
    let accepts: Vec<(usize, &ClaimedMessage, &str)> = operations
        .iter()
        .enumerate()
        .filter_map(|(index, operation)| match operation {
            Operation::Accept { message, wamid } => Some((index, message, wamid.as_str())),
            _ => None,
        })
        .collect();
    if accepts.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = accepts.iter().map(|(_, m, _)| m.id).collect();
    let wamids: Vec<&str> = accepts.iter().map(|(_, _, w)| *w).collect();
    // A status webhook may have stored a wamid first (through biz_opaque_callback_data)
    // and moved the state on: keep both.
    let rows = sqlx::query(
        "UPDATE outbound_messages AS m SET
             wamid = coalesce(m.wamid, a.wamid),
             state = CASE WHEN m.state_rank < 1 THEN 'accepted' ELSE m.state END,
             state_rank = greatest(m.state_rank, 1),
             error_code = CASE WHEN m.state_rank < 1 THEN NULL ELSE m.error_code END,
             error_title = CASE WHEN m.state_rank < 1 THEN NULL ELSE m.error_title END,
             accepted_at = coalesce(m.accepted_at, now()),
             attempt_started_at = NULL,
             updated_at = now()
         FROM (SELECT DISTINCT ON (id) * FROM UNNEST($1::uuid[], $2::text[]) AS t (id, wamid) ORDER BY id) AS a
         WHERE m.id = a.id
         RETURNING m.id, m.wamid, a.wamid AS new_wamid",
    )
    .bind(&ids)
    .bind(&wamids)
    .fetch_all(&mut **tx)
    .await?;
    let mut stored: HashMap<Uuid, String> = HashMap::new();
    for row in rows {
        let id: Uuid = row.get("id");
        let wamid: String = row.get("wamid");
        let new_wamid: String = row.get("new_wamid");
        if wamid != new_wamid {
            // An earlier attempt whose response was lost did reach Meta, so the
            // recipient got this message twice. Counted once the batch commits.
            *duplicates += 1;
            tracing::warn!(message_id = %id, "a message was sent twice: an earlier attempt's wamid arrived by status webhook");
        }
        stored.insert(id, wamid);
    }
    for (index, message, _) in accepts {
        let Some(wamid) = stored.get(&message.id) else {
            replies[index] = Some(Reply::Done(false));
            continue;
        };
        let data = json!({
            "message_id": message.id,
            "wamid": wamid,
            "phone_number_id": message.phone_number_id,
            "recipient_id": message.recipient,
            "type": message.message_type,
        });
        let event = Event { id: Uuid::now_v7(), event_type: EventType::MessageAccepted, created_at: truncate_to_millis(Utc::now()), org_id: message.org_id, data };
        events.push((event, format!("accepted:{}", message.id), Some(message.phone_number_id.clone())));
        replies[index] = Some(Reply::Done(true));
    }
    Ok(())
}

async fn fail(
    tx: &mut Transaction<'_, Postgres>,
    operations: &[Operation],
    replies: &mut [Option<Reply>],
    events: &mut Vec<(Event, String, Option<String>)>,
) -> Result<(), sqlx::Error> {
    let failures: Vec<(usize, &Failure)> = operations
        .iter()
        .enumerate()
        .filter_map(|(index, operation)| match operation {
            Operation::Fail(failure) => Some((index, failure)),
            _ => None,
        })
        .collect();
    if failures.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = failures.iter().map(|(_, f)| f.message.id).collect();
    let codes: Vec<i32> = failures.iter().map(|(_, f)| f.error_code).collect();
    let titles: Vec<&str> = failures.iter().map(|(_, f)| f.error_title.as_str()).collect();
    let reasons: Vec<&str> = failures.iter().map(|(_, f)| f.reason).collect();
    let parked: Vec<bool> = failures.iter().map(|(_, f)| f.parked).collect();
    // Only a message no status has moved on fails here.
    let rows = sqlx::query(
        "UPDATE outbound_messages AS m SET
             state = 'failed', state_rank = 5,
             error_code = f.code, error_title = f.title, failure_reason = f.reason, parked = f.parked,
             attempt_started_at = NULL, next_attempt_at = NULL, updated_at = now()
         FROM (SELECT DISTINCT ON (id) * FROM UNNEST($1::uuid[], $2::int[], $3::text[], $4::text[], $5::bool[])
               AS t (id, code, title, reason, parked) ORDER BY id) AS f
         WHERE m.id = f.id AND m.state_rank = 0 AND m.wamid IS NULL
         RETURNING m.id",
    )
    .bind(&ids)
    .bind(&codes)
    .bind(&titles)
    .bind(&reasons)
    .bind(&parked)
    .fetch_all(&mut **tx)
    .await?;
    let done: HashSet<Uuid> = rows.iter().map(|row| row.get("id")).collect();
    for (index, failure) in failures {
        let message = &failure.message;
        if !done.contains(&message.id) {
            replies[index] = Some(Reply::Done(false));
            continue;
        }
        let data = json!({
            "message_id": message.id,
            "phone_number_id": message.phone_number_id,
            "recipient_id": message.recipient,
            "type": message.message_type,
            "reason": failure.reason,
            "errors": [{"code": failure.error_code, "title": failure.error_title}],
        });
        let event = Event { id: Uuid::now_v7(), event_type: EventType::MessageFailed, created_at: truncate_to_millis(Utc::now()), org_id: message.org_id, data };
        // The guarded update above makes this once per failure; a replayed message can fail
        // again, so the key carries the time.
        events.push((event, format!("failed:{}:{}", message.id, Utc::now().timestamp_micros()), Some(message.phone_number_id.clone())));
        replies[index] = Some(Reply::Done(true));
    }
    Ok(())
}

async fn pause(
    tx: &mut Transaction<'_, Postgres>,
    operations: &[Operation],
    replies: &mut [Option<Reply>],
    events: &mut Vec<(Event, String, Option<String>)>,
) -> Result<(), sqlx::Error> {
    for (index, operation) in operations.iter().enumerate() {
        let Operation::Pause(pause) = operation else { continue };
        let paused = sqlx::query(
            "UPDATE phone_numbers SET
                 sending_paused_until = now() + make_interval(secs => $3),
                 sending_paused_code = $4,
                 sending_paused_reason = $5,
                 updated_at = now()
             WHERE phone_number_id = $1 AND org_id = $2
               AND (sending_paused_until IS NULL OR sending_paused_until <= now())
             RETURNING sending_paused_until",
        )
        .bind(&pause.phone_number_id)
        .bind(pause.org_id)
        .bind(pause.duration.as_secs_f64())
        .bind(pause.error_code)
        .bind(&pause.error_title)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = paused else {
            let until: Option<DateTime<Utc>> = sqlx::query_scalar("SELECT sending_paused_until FROM phone_numbers WHERE phone_number_id = $1")
                .bind(&pause.phone_number_id)
                .fetch_optional(&mut **tx)
                .await?
                .flatten();
            replies[index] = Some(Reply::Paused(until.unwrap_or_else(Utc::now)));
            continue;
        };
        let until: DateTime<Utc> = row.get("sending_paused_until");
        let created_at = truncate_to_millis(Utc::now());
        let data = json!({
            "phone_number_id": pause.phone_number_id,
            "event": "SENDING_PAUSED",
            "paused_until": until,
            "errors": [{"code": pause.error_code, "title": pause.error_title}],
        });
        let event = Event { id: Uuid::now_v7(), event_type: EventType::AccountUpdated, created_at, org_id: pause.org_id, data };
        events.push((event, format!("sending_paused:{}:{}", pause.phone_number_id, created_at.timestamp_millis()), Some(pause.phone_number_id.clone())));
        replies[index] = Some(Reply::Paused(until));
    }
    Ok(())
}

/// Inserts the events (a repeated dedup key is a no-op) and an outbox row for each
/// new one. Returns whether outbox rows were written.
async fn insert_events(tx: &mut Transaction<'_, Postgres>, events: &[(Event, String, Option<String>)]) -> Result<bool, sqlx::Error> {
    if events.is_empty() {
        return Ok(false);
    }
    let stored: Vec<StoredEvent> = events
        .iter()
        .map(|(event, key, phone)| StoredEvent { event, dedup_key: key, phone_number_id: phone.as_deref(), inbound_webhook_id: None })
        .collect();
    let new = events::insert(tx, &stored).await?;
    let messages: Vec<OutboxMessage> = events
        .iter()
        .filter(|(event, _, _)| new.contains(&event.id))
        .map(|(event, _, _)| OutboxMessage {
            org_id: Some(event.org_id),
            topic: Topic::Event,
            routing_key: event.event_type.as_str().to_owned(),
            message_id: event.id,
            payload: event.to_body(),
        })
        .collect();
    outbox::enqueue(tx, &messages).await?;
    Ok(!messages.is_empty())
}
