//! Persistence of verified webhooks with group commit. Handlers hand a parsed webhook to
//! [`WebhookStore::persist`]; writer tasks take whatever is waiting (up to a batch),
//! write it in one transaction and answer each handler after the commit. Under load
//! this turns many small commits into a few larger ones; at low load a batch is one
//! webhook and adds no delay.
//!
//! One transaction holds, for every new body: the raw body, one event per routed item,
//! the forward-only message states, quality changes, and the outbox rows.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use reach_shared::amqp::Topic;
use reach_shared::batch::Batcher;
use reach_shared::db::is_transient;
use reach_shared::events::{self, Event, StoredEvent, truncate_to_millis};
use reach_shared::outbox::{self, OutboxMessage, OutboxWaker};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::meta::{Item, Notification, StatusRank, Target};

/// A webhook whose signature was verified, parsed but not yet routed.
#[derive(Debug)]
pub struct VerifiedWebhook {
    pub body: Bytes,
    pub body_sha256: [u8; 32],
    pub parsed: Result<Notification, String>,
    pub received_at: DateTime<Utc>,
}

/// The store's outcome for a webhook. Meta gets 200 for every variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored; `new_events` events were created (0 when every item was seen before).
    Accepted { new_events: usize, unroutable_items: usize },
    /// The same body was stored before.
    Duplicate,
    /// Stored, but no item belongs to a known phone number or WABA.
    Unroutable,
    /// Stored, but nothing in it could be understood.
    Unparseable,
}

impl Outcome {
    pub fn as_label(self) -> &'static str {
        match self {
            Outcome::Accepted { .. } => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Unroutable => "unroutable",
            Outcome::Unparseable => "unparseable",
        }
    }
}

#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum StoreError {
    /// A transient database failure; Meta retries the webhook.
    #[error("the database is unavailable")]
    Unavailable,
    /// Any other database failure, logged where it happened.
    #[error("failed to store the webhook")]
    Failed,
    #[error("the store is shutting down")]
    ShuttingDown,
}

#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Concurrent writer transactions.
    pub writers: usize,
    /// Webhooks written in one transaction at most.
    pub max_batch: usize,
}

/// Handle to the writer tasks. Dropping every clone lets the writers finish what is
/// queued and stop.
#[derive(Clone)]
pub struct WebhookStore {
    batcher: Batcher<VerifiedWebhook, Result<Outcome, StoreError>>,
}

impl WebhookStore {
    pub fn start(pool: PgPool, settings: StoreSettings, waker: OutboxWaker) -> (Self, tokio::task::JoinSet<()>) {
        let (batcher, writers) = Batcher::start("ingress", settings.writers, settings.max_batch, move |webhooks: Vec<VerifiedWebhook>| {
            let pool = pool.clone();
            let waker = waker.clone();
            async move { write(&pool, &waker, webhooks).await }
        });
        (Self { batcher }, writers)
    }

    /// Stores the webhook and returns after the commit.
    pub async fn persist(&self, webhook: VerifiedWebhook) -> Result<Outcome, StoreError> {
        self.batcher.submit(webhook).await.map_err(|_| StoreError::ShuttingDown)?
    }
}

/// Writes one batch in one transaction; returns each webhook's outcome.
async fn write(pool: &PgPool, waker: &OutboxWaker, webhooks: Vec<VerifiedWebhook>) -> Vec<Result<Outcome, StoreError>> {
    metrics::histogram!("reach_ingress_commit_batch_size").record(webhooks.len() as f64);
    match write_with_retry(pool, waker, &webhooks).await {
        Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
        Err(error) if webhooks.len() > 1 && !is_transient(&error) => {
            // One bad webhook must not fail its neighbours: write each alone.
            tracing::warn!(error = %error, batch = webhooks.len(), "batch write failed, writing webhooks one by one");
            let mut results = Vec::with_capacity(webhooks.len());
            for webhook in &webhooks {
                let single = std::slice::from_ref(webhook);
                results.push(write_with_retry(pool, waker, single).await.map(|mut o| o.remove(0)).map_err(|error| {
                    tracing::error!(%error, "failed to store a webhook");
                    classify(&error)
                }));
            }
            results
        }
        Err(error) => {
            tracing::error!(error = %error, batch = webhooks.len(), "failed to store webhooks");
            let answer = if is_transient(&error) { StoreError::Unavailable } else { StoreError::Failed };
            webhooks.iter().map(|_| Err(answer)).collect()
        }
    }
}

async fn write_with_retry(pool: &PgPool, waker: &OutboxWaker, webhooks: &[VerifiedWebhook]) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = async {
            let mut tx = pool.begin().await?;
            let (outcomes, wrote_outbox) = write_batch(&mut tx, webhooks).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>((outcomes, wrote_outbox))
        }
        .await;
        match result {
            Ok((outcomes, wrote_outbox)) => {
                if wrote_outbox {
                    waker.wake();
                }
                return Ok(outcomes);
            }
            Err(error) if is_transient(&error) && attempt < 3 => {
                tracing::warn!(%error, attempt, "transient database error while storing webhooks, retrying");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

fn classify(error: &sqlx::Error) -> StoreError {
    if is_transient(error) { StoreError::Unavailable } else { StoreError::Failed }
}

/// The orgs (and phone numbers) that the items of one batch route to.
#[derive(Default)]
struct Routes {
    phone_numbers: HashMap<String, Uuid>,
    wabas: HashMap<String, Uuid>,
    displays: HashMap<(String, String), (Uuid, String)>,
}

impl Routes {
    async fn load(tx: &mut Transaction<'_, Postgres>, webhooks: &[VerifiedWebhook]) -> Result<Self, sqlx::Error> {
        let mut phone_ids = HashSet::new();
        let mut waba_ids = HashSet::new();
        let mut display_wabas = Vec::new();
        let mut display_digits = Vec::new();
        for item in webhooks.iter().filter_map(|w| w.parsed.as_ref().ok()).flat_map(|n| &n.items) {
            match &item.target {
                Target::PhoneNumber(id) => {
                    phone_ids.insert(id.clone());
                }
                Target::Waba(id) => {
                    waba_ids.insert(id.clone());
                }
                Target::DisplayNumber { waba_id, display_digits: digits } => {
                    display_wabas.push(waba_id.clone());
                    display_digits.push(digits.clone());
                }
            }
        }

        let mut routes = Routes::default();
        if !phone_ids.is_empty() {
            let ids: Vec<String> = phone_ids.into_iter().collect();
            for row in sqlx::query("SELECT phone_number_id, org_id FROM phone_numbers WHERE phone_number_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut **tx)
                .await?
            {
                routes.phone_numbers.insert(row.get("phone_number_id"), row.get("org_id"));
            }
        }
        if !waba_ids.is_empty() {
            let ids: Vec<String> = waba_ids.into_iter().collect();
            for row in sqlx::query("SELECT waba_id, org_id FROM wabas WHERE waba_id = ANY($1)").bind(&ids).fetch_all(&mut **tx).await? {
                routes.wabas.insert(row.get("waba_id"), row.get("org_id"));
            }
        }
        if !display_wabas.is_empty() {
            let rows = sqlx::query(
                "SELECT p.waba_id, p.display_digits, p.org_id, p.phone_number_id
                 FROM phone_numbers p
                 JOIN UNNEST($1::text[], $2::text[]) AS t (waba_id, display_digits)
                   ON p.waba_id = t.waba_id AND p.display_digits = t.display_digits",
            )
            .bind(&display_wabas)
            .bind(&display_digits)
            .fetch_all(&mut **tx)
            .await?;
            for row in rows {
                routes
                    .displays
                    .insert((row.get("waba_id"), row.get("display_digits")), (row.get("org_id"), row.get("phone_number_id")));
            }
        }
        Ok(routes)
    }

    /// Returns the org and phone number id of an item, or `None` when unroutable.
    fn resolve(&self, target: &Target) -> Option<(Uuid, Option<String>)> {
        match target {
            Target::PhoneNumber(id) => self.phone_numbers.get(id).map(|org| (*org, Some(id.clone()))),
            Target::Waba(id) => self.wabas.get(id).map(|org| (*org, None)),
            Target::DisplayNumber { waba_id, display_digits } => self
                .displays
                .get(&(waba_id.clone(), display_digits.clone()))
                .map(|(org, phone_number_id)| (*org, Some(phone_number_id.clone()))),
        }
    }
}

/// A routed item on its way to the events table.
struct RoutedItem<'a> {
    webhook_index: usize,
    event: Event,
    phone_number_id: Option<String>,
    item: &'a Item,
}

/// Writes one batch in the caller's transaction. Returns each webhook's outcome and
/// whether outbox rows were written.
async fn write_batch(tx: &mut Transaction<'_, Postgres>, webhooks: &[VerifiedWebhook]) -> Result<(Vec<Outcome>, bool), sqlx::Error> {
    let routes = Routes::load(tx, webhooks).await?;

    // Route every item and decide each body's outcome before anything is written.
    let mut outcomes = Vec::with_capacity(webhooks.len());
    let mut routed: Vec<RoutedItem> = Vec::new();
    let mut raw_outcomes = Vec::with_capacity(webhooks.len());
    let mut parse_errors: Vec<Option<String>> = Vec::with_capacity(webhooks.len());
    let mut event_counts = Vec::with_capacity(webhooks.len());
    let mut unroutable_counts = Vec::with_capacity(webhooks.len());
    for (index, webhook) in webhooks.iter().enumerate() {
        let notification = match &webhook.parsed {
            Err(problem) => {
                outcomes.push(Outcome::Unparseable);
                raw_outcomes.push("unparseable");
                parse_errors.push(Some(problem.clone()));
                event_counts.push(0);
                unroutable_counts.push(0);
                continue;
            }
            Ok(notification) => notification,
        };
        let created_at = truncate_to_millis(webhook.received_at);
        let mut routed_here = 0;
        let mut unroutable = 0;
        for item in &notification.items {
            let Some((org_id, phone_number_id)) = routes.resolve(&item.target) else {
                unroutable += 1;
                continue;
            };
            let mut data = item.data.clone();
            if let (Some(id), Some(object)) = (&phone_number_id, data.as_object_mut()) {
                object.entry("phone_number_id").or_insert_with(|| serde_json::Value::String(id.clone()));
            }
            routed.push(RoutedItem {
                webhook_index: index,
                event: Event { id: Uuid::now_v7(), event_type: item.event_type, created_at, org_id, data },
                phone_number_id,
                item,
            });
            routed_here += 1;
        }
        let (outcome, label) = match (routed_here, unroutable) {
            (0, 0) => (Outcome::Accepted { new_events: 0, unroutable_items: 0 }, "accepted"),
            (0, _) => (Outcome::Unroutable, "unroutable"),
            (_, 0) => (Outcome::Accepted { new_events: 0, unroutable_items: 0 }, "accepted"),
            (_, n) => (Outcome::Accepted { new_events: 0, unroutable_items: n }, "partially_unroutable"),
        };
        outcomes.push(outcome);
        raw_outcomes.push(label);
        parse_errors.push((!notification.problems.is_empty()).then(|| notification.problems.join("; ")));
        event_counts.push(routed_here as i32);
        unroutable_counts.push(unroutable as i32);
    }

    // Raw bodies: the unique hash makes a repeated body a no-op.
    let hashes: Vec<&[u8]> = webhooks.iter().map(|w| w.body_sha256.as_slice()).collect();
    let bodies: Vec<&[u8]> = webhooks.iter().map(|w| w.body.as_ref()).collect();
    let received: Vec<DateTime<Utc>> = webhooks.iter().map(|w| w.received_at).collect();
    let inserted = sqlx::query(
        "INSERT INTO inbound_webhooks (body_sha256, body, outcome, parse_error, event_count, unroutable_count, received_at)
         SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::text[], $4::text[], $5::int[], $6::int[], $7::timestamptz[])
         ON CONFLICT (body_sha256) DO NOTHING
         RETURNING id, body_sha256",
    )
    .bind(&hashes)
    .bind(&bodies)
    .bind(&raw_outcomes)
    .bind(&parse_errors)
    .bind(&event_counts)
    .bind(&unroutable_counts)
    .bind(&received)
    .fetch_all(&mut **tx)
    .await?;
    let mut new_bodies: HashMap<Vec<u8>, i64> =
        inserted.iter().map(|row| (row.get::<Vec<u8>, _>("body_sha256"), row.get::<i64, _>("id"))).collect();
    let mut raw_ids: Vec<Option<i64>> = Vec::with_capacity(webhooks.len());
    for (index, webhook) in webhooks.iter().enumerate() {
        // The first webhook of the batch with a new hash owns it; repeats are duplicates.
        match new_bodies.remove(webhook.body_sha256.as_slice()) {
            Some(id) => raw_ids.push(Some(id)),
            None => {
                outcomes[index] = Outcome::Duplicate;
                raw_ids.push(None);
            }
        }
    }
    routed.retain(|r| raw_ids[r.webhook_index].is_some());
    if routed.is_empty() {
        return Ok((outcomes, false));
    }

    // Events: the (org, dedup key) constraint drops facts seen before.
    let new_event_ids = insert_events(tx, &routed, &raw_ids).await?;
    let new_routed: Vec<&RoutedItem> = routed.iter().filter(|r| new_event_ids.contains(&r.event.id)).collect();
    for r in &new_routed {
        if let Outcome::Accepted { new_events, .. } = &mut outcomes[r.webhook_index] {
            *new_events += 1;
        }
    }

    advance_message_states(tx, &new_routed).await?;
    advance_outbound_messages(tx, &new_routed).await?;
    apply_quality_updates(tx, &new_routed).await?;

    let messages: Vec<OutboxMessage> = new_routed
        .iter()
        .map(|r| OutboxMessage {
            org_id: Some(r.event.org_id),
            topic: Topic::Event,
            routing_key: r.event.event_type.as_str().to_owned(),
            message_id: r.event.id,
            payload: r.event.to_body(),
        })
        .collect();
    outbox::enqueue(tx, &messages).await?;
    Ok((outcomes, !messages.is_empty()))
}

async fn insert_events(tx: &mut Transaction<'_, Postgres>, routed: &[RoutedItem<'_>], raw_ids: &[Option<i64>]) -> Result<HashSet<Uuid>, sqlx::Error> {
    let events: Vec<StoredEvent> = routed
        .iter()
        .map(|r| StoredEvent {
            event: &r.event,
            dedup_key: &r.item.dedup_key,
            phone_number_id: r.phone_number_id.as_deref(),
            inbound_webhook_id: raw_ids[r.webhook_index],
        })
        .collect();
    events::insert(tx, &events).await
}

/// Moves each message to the highest status seen, never backwards. Rows are written in
/// key order so concurrent batches cannot deadlock on them.
async fn advance_message_states(tx: &mut Transaction<'_, Postgres>, routed: &[&RoutedItem<'_>]) -> Result<(), sqlx::Error> {
    let mut highest: HashMap<(Uuid, &str), (StatusRank, Option<i32>, &str)> = HashMap::new();
    for r in routed {
        let (Some(status), Some(phone_number_id)) = (&r.item.status, r.phone_number_id.as_deref()) else { continue };
        let key = (r.event.org_id, status.wamid.as_str());
        let entry = highest.entry(key).or_insert((status.rank, status.error_code, phone_number_id));
        if status.rank > entry.0 {
            *entry = (status.rank, status.error_code, phone_number_id);
        }
    }
    if highest.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<_> = highest.into_iter().collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let org_ids: Vec<Uuid> = rows.iter().map(|((org, _), _)| *org).collect();
    let wamids: Vec<&str> = rows.iter().map(|((_, wamid), _)| *wamid).collect();
    let statuses: Vec<&str> = rows.iter().map(|(_, (rank, _, _))| rank.as_str()).collect();
    let ranks: Vec<i16> = rows.iter().map(|(_, (rank, _, _))| *rank as i16).collect();
    let codes: Vec<Option<i32>> = rows.iter().map(|(_, (_, code, _))| *code).collect();
    let phones: Vec<&str> = rows.iter().map(|(_, (_, _, phone))| *phone).collect();
    sqlx::query(
        "INSERT INTO messages (org_id, wamid, status, status_rank, error_code, phone_number_id)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::smallint[], $5::int[], $6::text[])
         ON CONFLICT (org_id, wamid) DO UPDATE SET
             status = EXCLUDED.status,
             status_rank = EXCLUDED.status_rank,
             error_code = coalesce(EXCLUDED.error_code, messages.error_code),
             updated_at = now()
         WHERE messages.status_rank < EXCLUDED.status_rank",
    )
    .bind(&org_ids)
    .bind(&wamids)
    .bind(&statuses)
    .bind(&ranks)
    .bind(&codes)
    .bind(&phones)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Moves outbound messages forward with their statuses. A status names its message by
/// the id echoed in `biz_opaque_callback_data` when present, so a status that arrives
/// before the dispatcher stored the send's wamid still matches, and stores that wamid;
/// otherwise by wamid. Like [`advance_message_states`], a state never moves backwards.
async fn advance_outbound_messages(tx: &mut Transaction<'_, Postgres>, routed: &[&RoutedItem<'_>]) -> Result<(), sqlx::Error> {
    let mut rows: Vec<(Uuid, Option<Uuid>, &str, reach_shared::sends::MessageState, Option<i32>, Option<&str>)> = routed
        .iter()
        .filter_map(|r| {
            let status = r.item.status.as_ref()?;
            Some((r.event.org_id, status.message_id, status.wamid.as_str(), status.rank.message_state(), status.error_code, status.error_title.as_deref()))
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    // Key order, so concurrent batches lock rows in the same order.
    rows.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let org_ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let message_ids: Vec<Option<Uuid>> = rows.iter().map(|r| r.1).collect();
    let wamids: Vec<&str> = rows.iter().map(|r| r.2).collect();
    let states: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    let ranks: Vec<i16> = rows.iter().map(|r| r.3.rank()).collect();
    let codes: Vec<Option<i32>> = rows.iter().map(|r| r.4).collect();
    let titles: Vec<Option<&str>> = rows.iter().map(|r| r.5).collect();
    // The highest status per message wins; DISTINCT ON picks it before the update so
    // one statement never updates a row twice.
    sqlx::query(
        "UPDATE outbound_messages AS m SET
             state = s.state,
             state_rank = s.rank,
             wamid = coalesce(m.wamid, s.wamid),
             error_code = coalesce(s.code, m.error_code),
             error_title = coalesce(s.title, m.error_title),
             failure_reason = CASE WHEN s.state = 'failed' THEN 'status_failed' ELSE m.failure_reason END,
             next_attempt_at = NULL,
             updated_at = now()
         FROM (
             SELECT DISTINCT ON (coalesce(t.message_id, o.id)) coalesce(t.message_id, o.id) AS id, t.org_id, t.wamid, t.state, t.rank, t.code, t.title
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::smallint[], $6::int[], $7::text[])
                  AS t (org_id, message_id, wamid, state, rank, code, title)
             LEFT JOIN outbound_messages o ON t.message_id IS NULL AND o.org_id = t.org_id AND o.wamid = t.wamid
             WHERE coalesce(t.message_id, o.id) IS NOT NULL
             ORDER BY coalesce(t.message_id, o.id), t.rank DESC
         ) AS s
         WHERE m.id = s.id AND m.org_id = s.org_id AND m.state_rank < s.rank
           AND (m.wamid IS NULL OR m.wamid = s.wamid)",
    )
    .bind(&org_ids)
    .bind(&message_ids)
    .bind(&wamids)
    .bind(&states)
    .bind(&ranks)
    .bind(&codes)
    .bind(&titles)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn apply_quality_updates(tx: &mut Transaction<'_, Postgres>, routed: &[&RoutedItem<'_>]) -> Result<(), sqlx::Error> {
    for r in routed {
        let (Some(quality), Some(phone_number_id)) = (&r.item.quality, r.phone_number_id.as_deref()) else { continue };
        sqlx::query(
            "UPDATE phone_numbers SET
                 quality_rating = coalesce($2, quality_rating),
                 mps = coalesce($3, mps),
                 updated_at = now()
             WHERE phone_number_id = $1 AND org_id = $4",
        )
        .bind(phone_number_id)
        .bind(quality.quality_rating)
        .bind(quality.mps)
        .bind(r.event.org_id)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
