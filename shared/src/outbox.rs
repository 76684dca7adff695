//! The transactional outbox. A service that wants something to happen elsewhere writes
//! an outbox row in the same transaction as its state change ([`enqueue`]); the
//! [`Publisher`] moves committed rows into RabbitMQ with publisher confirms.
//!
//! Claiming is by state (`state = 'pending'`) with `FOR UPDATE SKIP LOCKED`, never by
//! an id cursor, because a cursor skips rows whose transaction commits late. Several
//! publishers, in one process or many, share the table safely.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use backon::BackoffBuilder;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use secrecy::SecretString;
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::{self, Topic, Topology};
use crate::ops::Readiness;

/// A row to publish once the surrounding transaction commits.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub org_id: Option<Uuid>,
    pub topic: Topic,
    pub routing_key: String,
    /// Becomes the AMQP `message_id`; consumers deduplicate on it.
    pub message_id: Uuid,
    pub payload: Vec<u8>,
}

/// Inserts outbox rows in the caller's transaction, in one statement.
pub async fn enqueue(tx: &mut Transaction<'_, Postgres>, messages: &[OutboxMessage]) -> Result<(), sqlx::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    let org_ids: Vec<Option<Uuid>> = messages.iter().map(|m| m.org_id).collect();
    let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
    let routing_keys: Vec<&str> = messages.iter().map(|m| m.routing_key.as_str()).collect();
    let message_ids: Vec<Uuid> = messages.iter().map(|m| m.message_id).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    sqlx::query(
        "INSERT INTO outbox (org_id, topic, routing_key, message_id, payload)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::bytea[])",
    )
    .bind(org_ids)
    .bind(topics)
    .bind(routing_keys)
    .bind(message_ids)
    .bind(payloads)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Publisher tuning.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// Rows claimed per transaction.
    pub batch_size: i64,
    /// Publisher tasks sharing the table in this process.
    pub workers: usize,
    /// How long an idle publisher sleeps before looking again for rows written by other
    /// processes; rows written in this process wake it at once through [`OutboxWaker`].
    pub idle_poll: Duration,
    /// A row that was nacked or returned this many times is marked failed.
    pub max_attempts: i32,
    /// Dispatched rows are deleted after this long.
    pub retention: Duration,
}

impl Default for PublisherSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            workers: 2,
            idle_poll: Duration::from_millis(200),
            max_attempts: 10,
            retention: Duration::from_secs(3600),
        }
    }
}

/// Wakes the publishers of this process after a commit that wrote outbox rows.
#[derive(Debug, Clone, Default)]
pub struct OutboxWaker(Arc<Notify>);

impl OutboxWaker {
    pub fn wake(&self) {
        self.0.notify_waiters();
        self.0.notify_one();
    }

    async fn wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.0.notified()).await;
    }
}

/// Moves pending outbox rows into RabbitMQ.
#[derive(Clone)]
pub struct Publisher {
    pub pool: PgPool,
    pub amqp_url: SecretString,
    pub topology: Topology,
    pub settings: PublisherSettings,
    pub waker: OutboxWaker,
    pub readiness: Readiness,
}

/// The outcome of publishing one claimed row.
enum PublishResult {
    Confirmed(i64),
    Rejected { id: i64, reason: &'static str },
}

impl Publisher {
    /// Runs the publisher workers and the retention sweep until `shutdown` fires. Each
    /// worker reconnects on its own after a broker or database failure.
    pub async fn run(self, shutdown: CancellationToken) {
        describe_metrics();
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..self.settings.workers.max(1) {
            let publisher = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move { publisher.run_worker(worker, shutdown).await });
        }
        let janitor = self.clone();
        let janitor_shutdown = shutdown.clone();
        tasks.spawn(async move { janitor.run_retention(janitor_shutdown).await });
        while tasks.join_next().await.is_some() {}
    }

    async fn run_worker(&self, worker: usize, shutdown: CancellationToken) {
        let mut delays = reconnect_policy();
        while !shutdown.is_cancelled() {
            match self.connect_and_publish(worker, &shutdown).await {
                Ok(()) => return,
                Err(error) => {
                    self.readiness.set_broker_up(false);
                    metrics::counter!("reach_outbox_publisher_restarts_total").increment(1);
                    let delay = delays.next().unwrap_or(MAX_RECONNECT_DELAY);
                    tracing::warn!(worker, error = format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, "outbox publisher failed, reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn connect_and_publish(&self, worker: usize, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let connection = amqp::connect(&self.amqp_url, &format!("reach-outbox-publisher-{worker}")).await?;
        let channel = connection.create_channel().await.context("failed to open a channel")?;
        channel
            .confirm_select(ConfirmSelectOptions { nowait: false })
            .await
            .context("failed to enable publisher confirms")?;
        self.topology.declare(&channel).await?;
        self.readiness.set_broker_up(true);
        tracing::info!(worker, "outbox publisher connected");

        let mut delays = reconnect_policy();
        loop {
            if shutdown.is_cancelled() {
                // Any batch in progress was awaited to its commit; nothing is left half done.
                let _ = connection.close(200, "shutdown".into()).await;
                return Ok(());
            }
            match self.publish_batch(&channel).await {
                Ok(claimed) => {
                    delays = reconnect_policy();
                    if claimed < self.settings.batch_size as usize {
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = self.waker.wait(self.settings.idle_poll) => {}
                        }
                    }
                }
                Err(error) if !channel.status().connected() => return Err(error),
                Err(error) => {
                    // A database error leaves the channel usable: back off and retry
                    // without reconnecting to the broker.
                    let delay = delays.next().unwrap_or(MAX_RECONNECT_DELAY);
                    tracing::warn!(worker, error = format!("{error:#}"), "outbox batch failed, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Claims up to one batch, publishes it, waits for every confirm and records the
    /// outcome, all in one transaction. Returns the number of rows claimed.
    async fn publish_batch(&self, channel: &Channel) -> anyhow::Result<usize> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await.context("failed to begin the outbox transaction")?;
        let rows = sqlx::query(
            "SELECT id, topic, routing_key, message_id, payload FROM outbox
             WHERE state = 'pending' AND available_at <= now()
             ORDER BY id
             LIMIT $1
             FOR UPDATE SKIP LOCKED",
        )
        .bind(self.settings.batch_size)
        .fetch_all(&mut *tx)
        .await
        .context("failed to claim outbox rows")?;
        if rows.is_empty() {
            tx.commit().await.context("failed to end the empty outbox transaction")?;
            return Ok(0);
        }

        // Mandatory: an unroutable message comes back instead of vanishing.
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.get("id");
            let topic: String = row.get("topic");
            let routing_key: String = row.get("routing_key");
            let message_id: Uuid = row.get("message_id");
            let payload: Vec<u8> = row.get("payload");
            let Some(topic) = Topic::parse(&topic) else {
                pending.push(Err(PublishResult::Rejected { id, reason: "unknown_topic" }));
                continue;
            };
            let mut headers = FieldTable::default();
            headers.insert("outbox_id".into(), AMQPValue::LongLongInt(id));
            let properties = BasicProperties::default()
                .with_message_id(message_id.to_string().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(headers);
            let confirm = channel
                .basic_publish(self.topology.exchange_for(topic).into(), routing_key.as_str().into(), options, &payload, properties)
                .await
                .context("failed to publish an outbox row")?;
            pending.push(Ok((id, confirm)));
        }

        let mut results = Vec::with_capacity(pending.len());
        for entry in pending {
            match entry {
                Err(rejected) => results.push(rejected),
                Ok((id, confirm)) => {
                    let confirmation = confirm.await.context("failed to receive a publisher confirm")?;
                    results.push(match confirmation {
                        Confirmation::Ack(None) | Confirmation::NotRequested => PublishResult::Confirmed(id),
                        Confirmation::Ack(Some(_)) => PublishResult::Rejected { id, reason: "returned" },
                        Confirmation::Nack(_) => PublishResult::Rejected { id, reason: "nacked" },
                    });
                }
            }
        }

        let confirmed: Vec<i64> = results
            .iter()
            .filter_map(|r| match r {
                PublishResult::Confirmed(id) => Some(*id),
                PublishResult::Rejected { .. } => None,
            })
            .collect();
        let mut rejected_ids = Vec::new();
        let mut rejected_reasons = Vec::new();
        for result in &results {
            if let PublishResult::Rejected { id, reason } = result {
                rejected_ids.push(*id);
                rejected_reasons.push(*reason);
                metrics::counter!("reach_outbox_publish_failures_total", "reason" => *reason).increment(1);
            }
        }

        sqlx::query("UPDATE outbox SET state = 'dispatched', dispatched_at = now(), attempts = attempts + 1 WHERE id = ANY($1)")
            .bind(&confirmed)
            .execute(&mut *tx)
            .await
            .context("failed to mark outbox rows dispatched")?;
        if !rejected_ids.is_empty() {
            tracing::warn!(count = rejected_ids.len(), "broker rejected outbox rows, they will be retried");
            sqlx::query(
                "UPDATE outbox AS o SET
                     attempts = o.attempts + 1,
                     last_error = r.reason,
                     state = CASE WHEN o.attempts + 1 >= $3 THEN 'failed' ELSE 'pending' END,
                     available_at = now() + make_interval(secs => least(300, power(2, o.attempts)))
                 FROM UNNEST($1::bigint[], $2::text[]) AS r (id, reason)
                 WHERE o.id = r.id",
            )
            .bind(&rejected_ids)
            .bind(&rejected_reasons)
            .bind(self.settings.max_attempts)
            .execute(&mut *tx)
            .await
            .context("failed to record rejected outbox rows")?;
        }
        tx.commit().await.context("failed to commit the outbox transaction")?;

        metrics::counter!("reach_outbox_published_total").increment(confirmed.len() as u64);
        metrics::histogram!("reach_outbox_publish_batch_size").record(rows.len() as f64);
        metrics::histogram!("reach_outbox_publish_duration_seconds").record(started.elapsed().as_secs_f64());
        Ok(rows.len())
    }

    /// Deletes dispatched rows older than the retention, in bounded batches, so the
    /// table stays small whatever the traffic.
    async fn run_retention(&self, shutdown: CancellationToken) {
        let retention_seconds = self.settings.retention.as_secs_f64();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
            loop {
                let deleted = sqlx::query(
                    "DELETE FROM outbox WHERE id IN (
                         SELECT id FROM outbox
                         WHERE state = 'dispatched' AND dispatched_at < now() - make_interval(secs => $1)
                         LIMIT 5000)",
                )
                .bind(retention_seconds)
                .execute(&self.pool)
                .await;
                match deleted {
                    Ok(done) if done.rows_affected() == 5000 => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "failed to delete old outbox rows");
                        break;
                    }
                }
            }
            self.record_backlog().await;
        }
    }

    async fn record_backlog(&self) {
        let row = sqlx::query(
            "SELECT count(*) AS pending, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest
             FROM (SELECT created_at FROM outbox WHERE state = 'pending' ORDER BY available_at, id LIMIT 100000) AS p",
        )
        .fetch_one(&self.pool)
        .await;
        if let Ok(row) = row {
            metrics::gauge!("reach_outbox_pending").set(row.get::<i64, _>("pending") as f64);
            metrics::gauge!("reach_outbox_oldest_pending_age_seconds").set(row.get::<f64, _>("oldest"));
        }
    }
}

/// Gives the publisher's metrics their help text on `/metrics`.
fn describe_metrics() {
    metrics::describe_counter!("reach_outbox_published_total", "Outbox rows published and confirmed by the broker");
    metrics::describe_counter!(
        "reach_outbox_publish_failures_total",
        "Outbox rows the broker returned or nacked, or with an unknown topic; they are retried with backoff"
    );
    metrics::describe_counter!("reach_outbox_publisher_restarts_total", "Publisher reconnects after a broker failure");
    metrics::describe_histogram!("reach_outbox_publish_batch_size", "Rows claimed per publish transaction");
    metrics::describe_histogram!(
        "reach_outbox_publish_duration_seconds",
        "Time of one publish transaction: claim, publish, confirms and commit"
    );
    metrics::describe_gauge!("reach_outbox_pending", "Outbox rows in state pending (capped at 100000), refreshed every 30 s");
    metrics::describe_gauge!(
        "reach_outbox_oldest_pending_age_seconds",
        "Age of the oldest pending outbox row, refreshed every 30 s; 0 when none is pending"
    );
}

const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

/// Delays between reconnect attempts: exponential from 100 ms to 10 s with jitter, so a
/// fleet restarting together does not reconnect in lockstep. Never gives up.
pub fn reconnect_policy() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_RECONNECT_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}
