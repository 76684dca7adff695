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

use chrono::Utc;
use reach_shared::amqp::Topology;
use reach_shared::events::Event;
use reach_shared::ops::{self, Readiness};
use reach_shared::{db, telemetry};
use sqlx::PgPool;
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
    let metrics_addr = ops::serve(settings.common.metrics_addr, metrics, readiness.clone(), shutdown.clone()).await?;
    if settings.allow_private_targets {
        tracing::warn!("REACH_RELAY_ALLOW_PRIVATE_TARGETS=true: subscriber URLs may reach loopback and private addresses");
    }

    let pool = db::connect(&settings.common.database_url, settings.common.database_max_connections).await?;
    readiness.set_database_up(true);
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
        writer,
        pool: pool.clone(),
        readiness: readiness.clone(),
        settings,
    });

    let consumer = tokio::spawn(relay.clone().run_consumer(shutdown.clone()));
    let retry_lane = tokio::spawn(relay.clone().run_retry_lane(shutdown.clone()));
    let draining = readiness.clone();
    let task = tokio::spawn(async move {
        shutdown.cancelled().await;
        draining.set_shutting_down();
        let _ = consumer.await;
        let _ = retry_lane.await;
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
    pub(crate) fn observe(&self, attempt: &Attempt, next: &Next, event: &Event) {
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
