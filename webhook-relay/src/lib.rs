//! `reach-webhook-relay`: fans events out to customer subscriptions as Standard
//! Webhooks-signed callbacks, retries failures on a schedule and parks what never
//! succeeds.
//!
//! Layout:
//! - [`settings`]: typed settings from the environment.
//! - [`consumer`]: the event queue consumer and first attempts.
//! - [`retry`]: the retry lane, which also picks up overdue and handed-over deliveries.
//! - [`sender`]: one signed HTTP attempt and its verdict.
//! - [`records`]: the retry policy and the batched writer of outcomes.
//! - [`subscriptions`]: cached subscriptions with secrets and in-flight limits.
//! - [`ssrf`]: the address guard for subscriber URLs.

pub mod consumer;
pub mod records;
pub mod retry;
pub mod sender;
pub mod settings;
pub mod ssrf;
pub mod subscriptions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use reach_shared::amqp::Topology;
use reach_shared::events::EventHeader;
use reach_shared::ops::{self, Readiness};
use reach_shared::{db, telemetry};
use sqlx::{PgPool, Row};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use records::{Next, RecordWriter, RetryPolicy};
use sender::{Attempt, Sender};
pub use settings::RelaySettings;
use subscriptions::SubscriptionCache;

/// Everything the consumer and the retry lane share.
pub struct Relay {
    pub(crate) settings: RelaySettings,
    pub(crate) pool: PgPool,
    pub(crate) topology: Topology,
    pub(crate) subscriptions: SubscriptionCache,
    pub(crate) sender: Sender,
    pub(crate) writer: RecordWriter,
    pub(crate) policy: RetryPolicy,
    pub(crate) global_in_flight: Semaphore,
    /// Wakes the retry lane when a first attempt hands a delivery over.
    pub(crate) retry_wake: tokio::sync::Notify,
    pub(crate) readiness: Readiness,
}

/// A started relay.
pub struct RunningRelay {
    pub metrics_addr: SocketAddr,
    pub readiness: Readiness,
    task: tokio::task::JoinHandle<()>,
}

impl RunningRelay {
    /// Waits until the relay has shut down: consumers stopped, attempts in flight
    /// finished and recorded.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Starts the relay; it runs until `shutdown` fires.
pub async fn start(settings: RelaySettings, shutdown: CancellationToken) -> anyhow::Result<RunningRelay> {
    let readiness = Readiness::default();
    let metrics = telemetry::metrics_handle("reach-webhook-relay");
    describe_metrics();
    let metrics_addr = ops::serve(settings.common.metrics_addr, metrics, readiness.clone(), shutdown.clone()).await?;
    if settings.allow_private_targets {
        tracing::warn!("REACH_RELAY_ALLOW_PRIVATE_TARGETS=true: subscriber URLs may reach loopback and private addresses");
    }

    let pool = db::connect(&settings.common.database_url, settings.common.database_max_connections).await?;
    readiness.set_database_up(true);
    ops::probe_database(pool.clone(), readiness.clone(), std::time::Duration::from_secs(2), shutdown.clone());
    // The writer outlives the consumers: it is stopped only after they have finished.
    let writer_shutdown = CancellationToken::new();
    let (writer, writer_task) = RecordWriter::start(pool.clone(), writer_shutdown.clone());
    let relay = Arc::new(Relay {
        topology: Topology::new(&settings.common.amqp_prefix, settings.send_shards),
        subscriptions: SubscriptionCache::new(
            pool.clone(),
            settings.sealer.clone(),
            settings.subscription_cache_ttl,
            settings.subscription_in_flight.max(1),
        ),
        sender: Sender::new(settings.allow_private_targets, settings.connect_timeout, settings.request_timeout)?,
        policy: RetryPolicy { schedule: settings.retry_schedule.clone(), retry_after_max: settings.retry_after_max },
        global_in_flight: Semaphore::new(settings.global_in_flight.max(1)),
        retry_wake: tokio::sync::Notify::new(),
        writer,
        pool: pool.clone(),
        readiness: readiness.clone(),
        settings,
    });

    let consumer = tokio::spawn(relay.clone().run_consumer(shutdown.clone()));
    let retry_lane = tokio::spawn(relay.clone().run_retry_lane(shutdown.clone()));
    let gauges = tokio::spawn(refresh_table_gauges(pool.clone(), shutdown.clone()));
    let changes = {
        let relay = relay.clone();
        let pool = pool.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { subscriptions::follow_changes(&relay.subscriptions, pool, shutdown).await })
    };
    let draining = readiness.clone();
    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        draining.set_shutting_down();
        let _ = consumer.await;
        let _ = retry_lane.await;
        let _ = gauges.await;
        let _ = changes.await;
        drop(relay);
        writer_shutdown.cancel();
        let _ = writer_task.await;
        pool.close().await;
        tracing::info!("relay stopped");
    });
    Ok(RunningRelay { metrics_addr, readiness, task })
}

impl Relay {
    /// Counts an attempt's outcome and, for a delivered one, the end-to-end latency
    /// from the event's creation at the ingress.
    pub(crate) fn observe(&self, attempt: &Attempt, next: &Next, event: &EventHeader) {
        metrics::histogram!("reach_relay_attempt_duration_seconds").record(attempt.duration.as_secs_f64());
        let outcome = match next {
            Next::Delivered => {
                let latency = (Utc::now() - event.created_at).to_std().unwrap_or_default();
                metrics::histogram!("reach_relay_delivery_latency_seconds").record(latency.as_secs_f64());
                "delivered"
            }
            Next::Retry(_) => "retried",
            Next::Parked(_) if attempt.verdict == sender::Verdict::Gone => "disabled",
            Next::Parked(_) => "parked",
        };
        metrics::counter!("reach_relay_deliveries_total", "outcome" => outcome).increment(1);
        if !matches!(next, Next::Delivered) {
            tracing::info!(
                event_id = %event.id,
                status_code = attempt.status_code,
                error = attempt.error.as_deref(),
                outcome,
                "callback attempt failed"
            );
        }
    }
}

/// How often [`refresh_table_gauges`] reads the tables.
const TABLE_GAUGE_INTERVAL: Duration = Duration::from_secs(30);

/// Sets the gauges read from the database, at start and every 30 s, until `shutdown`
/// fires. They describe the shared tables, so every relay reports the same values.
async fn refresh_table_gauges(pool: PgPool, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(TABLE_GAUGE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let read = tokio::select! {
            _ = shutdown.cancelled() => return,
            read = read_table_gauges(&pool) => read,
        };
        match read {
            Ok((active, pending, parked)) => {
                metrics::gauge!("reach_relay_active_subscriptions").set(active as f64);
                metrics::gauge!("reach_relay_pending_deliveries").set(pending as f64);
                metrics::gauge!("reach_relay_parked_deliveries").set(parked as f64);
            }
            // A failed read leaves the gauges at their last values.
            Err(error) => tracing::warn!(%error, "failed to read the subscription and delivery gauges, retrying in 30 s"),
        }
    }
}

/// Reads the active subscriptions, and the pending and parked deliveries from the
/// trigger-maintained `platform.counters`, because counting `webhook_deliveries` itself
/// would scan a large table.
async fn read_table_gauges(pool: &PgPool) -> Result<(i64, i64, i64), sqlx::Error> {
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_subscriptions WHERE status = 'active'")
        .fetch_one(pool)
        .await?;
    let row = sqlx::query(
        "SELECT coalesce(sum(value) FILTER (WHERE name = 'webhook_deliveries.pending'), 0)::bigint AS pending,
                coalesce(sum(value) FILTER (WHERE name = 'webhook_deliveries.parked'), 0)::bigint AS parked
         FROM platform.counters
         WHERE name IN ('webhook_deliveries.pending', 'webhook_deliveries.parked')",
    )
    .fetch_one(pool)
    .await?;
    Ok((active, row.get("pending"), row.get("parked")))
}

/// Counts one callback attempt in `reach_relay_in_flight{lane}` while it lives, so an
/// attempt cancelled half-way is still taken off.
pub(crate) struct InFlight(&'static str);

impl InFlight {
    /// `lane` is `first` (the consumer's first attempts) or `retry` (the retry lane).
    pub(crate) fn start(lane: &'static str) -> Self {
        metrics::gauge!("reach_relay_in_flight", "lane" => lane).increment(1.0);
        Self(lane)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("reach_relay_in_flight", "lane" => self.0).decrement(1.0);
    }
}

/// Gives the relay metrics their help text on `/metrics`, and shows the in-flight
/// gauges at 0 before the first attempt.
fn describe_metrics() {
    metrics::describe_counter!(
        "reach_relay_deliveries_total",
        "Delivery outcomes: one per attempt (delivered, retried, parked, disabled) plus first attempts handed to the retry lane (overflowed)"
    );
    metrics::describe_histogram!("reach_relay_attempt_duration_seconds", "Time of one callback attempt, failed ones included");
    metrics::describe_histogram!(
        "reach_relay_delivery_latency_seconds",
        "Time from an event's creation at the ingress to its successful delivery. Deliveries after 30 s fall in +Inf"
    );
    metrics::describe_gauge!("reach_relay_in_flight", "Callback attempts under way now, by lane (first, retry)");
    metrics::describe_gauge!("reach_relay_active_subscriptions", "Active webhook subscriptions in the database, refreshed every 30 s");
    metrics::describe_gauge!("reach_relay_pending_deliveries", "Deliveries waiting for an attempt (retry lane backlog), refreshed every 30 s");
    metrics::describe_gauge!("reach_relay_parked_deliveries", "Deliveries parked for good, refreshed every 30 s");
    metrics::describe_counter!("reach_relay_events_consumed_total", "Event messages taken from the relay queue");
    metrics::describe_counter!("reach_relay_events_redelivered_total", "Event messages the broker delivered again after a failure");
    metrics::describe_counter!("reach_relay_consumer_restarts_total", "Event consumer reconnects after a broker failure");
    metrics::describe_counter!("reach_relay_retries_claimed_total", "Due deliveries claimed by the retry lane");
    metrics::describe_counter!("reach_relay_subscriptions_disabled_total", "410 Gone answers acted on, once per subscription and record batch, even when the subscription was already disabled");
    metrics::describe_histogram!("reach_relay_record_batch_size", "Delivery records written per transaction");
    for lane in ["first", "retry"] {
        metrics::gauge!("reach_relay_in_flight", "lane" => lane).increment(0.0);
    }
}
