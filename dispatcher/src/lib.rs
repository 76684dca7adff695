//! `reach-dispatcher`: sends customers' WhatsApp messages through the Graph API, each
//! phone number at no more than its messages-per-second limit, exactly once per message
//! as far as Meta's API allows, with Meta's errors classified and acted on.
//!
//! Layout:
//! - [`settings`]: typed settings from the environment.
//! - [`consumer`]: the send shard consumers and their reconnect loop.
//! - [`lanes`]: one lane per phone number: claim, pace, call, record.
//! - [`pacer`]: the GCRA limiter with a hard one-second window cap.
//! - [`graph`]: the Graph API call and the classification of its errors.
//! - [`store`]: the group-committed database writes and the events they emit.
//! - [`directory`]: phone numbers' rates, pauses and tokens, refreshed.
//! - [`sweeper`]: queues again the messages whose wait is over.

pub mod consumer;
pub mod directory;
pub mod graph;
pub mod lanes;
pub mod pacer;
pub mod settings;
pub mod store;
pub mod sweeper;

use std::net::SocketAddr;
use std::sync::Arc;

use reach_shared::amqp::Topology;
use reach_shared::ops::{self, Readiness};
use reach_shared::outbox::{OutboxWaker, Publisher};
use reach_shared::{db, telemetry};
use tokio_util::sync::CancellationToken;

pub use settings::DispatcherSettings;

use consumer::Consumer;
use directory::Directory;
use graph::GraphClient;
use lanes::Lanes;
use store::Store;

/// A started dispatcher.
pub struct RunningDispatcher {
    pub metrics_addr: SocketAddr,
    pub readiness: Readiness,
    task: tokio::task::JoinHandle<()>,
}

impl RunningDispatcher {
    /// Waits until the dispatcher has shut down and drained.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Starts the dispatcher. Runs until `shutdown` fires, then stops consuming, lets the
/// sends in flight finish and record their outcomes, releases claimed jobs not sent
/// yet, and closes its connections.
pub async fn start(settings: DispatcherSettings, shutdown: CancellationToken) -> anyhow::Result<RunningDispatcher> {
    let settings = Arc::new(settings);
    let readiness = Readiness::default();
    let metrics = telemetry::metrics_handle("reach-dispatcher");
    describe_metrics();
    let metrics_addr = ops::serve(settings.common.metrics_addr, metrics, readiness.clone(), shutdown.clone()).await?;

    let pool = db::connect(&settings.common.database_url, settings.common.database_max_connections).await?;
    readiness.set_database_up(true);
    ops::probe_database(pool.clone(), readiness.clone(), std::time::Duration::from_secs(2), shutdown.clone());

    let directory = Arc::new(Directory::new(pool.clone(), settings.sealer.clone()));
    directory.refresh().await?;
    let refresher = {
        let directory = directory.clone();
        let interval = settings.directory_refresh;
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                if let Err(error) = directory.refresh().await {
                    tracing::warn!(error = format!("{error:#}"), "failed to refresh the phone number directory");
                }
            }
        })
    };

    let waker = OutboxWaker::default();
    let (store, writers) = Store::start(pool.clone(), 4, 256, waker.clone());
    let graph = GraphClient::new(settings.graph_url.clone(), settings.api_version.clone(), settings.request_timeout, settings.max_in_flight)?;
    let topology = Topology::new(&settings.common.amqp_prefix, settings.send_shards);
    // The lanes stop on their own token, after the consumers stopped feeding them.
    let lanes_shutdown = CancellationToken::new();
    let lanes = Lanes::new(settings.clone(), store.clone(), graph, directory.clone(), lanes_shutdown.clone());
    let consumer = Consumer { amqp_url: settings.common.amqp_url.clone(), topology: topology.clone(), prefetch: settings.prefetch, lanes: lanes.clone(), readiness: readiness.clone() };

    let sweeper = tokio::spawn(sweeper::run(pool.clone(), settings.send_shards, settings.sweep_interval, waker.clone(), shutdown.clone()));
    let publisher = settings.run_publisher.then(|| {
        let publisher = Publisher {
            pool: pool.clone(),
            amqp_url: settings.common.amqp_url.clone(),
            topology: topology.clone(),
            settings: settings.publisher.clone(),
            waker: waker.clone(),
            readiness: Readiness::default(),
        };
        tokio::spawn(publisher.run(shutdown.clone()))
    });
    tracing::info!(%metrics_addr, graph_url = %settings.graph_url, shards = settings.send_shards, "dispatcher started");

    let draining = readiness.clone();
    let task = tokio::spawn(async move {
        let connection = consumer.run(shutdown.clone()).await;
        draining.set_shutting_down();
        lanes_shutdown.cancel();
        lanes.wait().await;
        if let Some(connection) = connection {
            let close = connection.close(200, "shutdown".into());
            if tokio::time::timeout(consumer::BROKER_REPLY_TIMEOUT, close).await.is_err() {
                tracing::warn!("the broker did not confirm the connection close in time");
            }
        }
        drop(lanes);
        drop(store);
        let mut writers = writers;
        while writers.join_next().await.is_some() {}
        let _ = sweeper.await;
        let _ = refresher.await;
        if let Some(publisher) = publisher {
            let _ = publisher.await;
        }
        pool.close().await;
        tracing::info!("dispatcher stopped");
    });
    Ok(RunningDispatcher { metrics_addr, readiness, task })
}

/// Gives the dispatcher's metrics their help text on `/metrics`.
fn describe_metrics() {
    metrics::describe_counter!(
        "reach_dispatcher_sends_total",
        "Graph API sends by outcome: sent, failed, retried, throttled, paused (account-level error), uncertain (answer lost)"
    );
    metrics::describe_counter!("reach_dispatcher_meta_throttled_total", "Sends Meta answered with a rate-limit error, by error code");
    metrics::describe_histogram!("reach_dispatcher_mps_wait_seconds", "Time a claimed send waited for its phone number's rate");
    metrics::describe_histogram!("reach_dispatcher_send_duration_seconds", "One Graph API send call");
    metrics::describe_counter!("reach_dispatcher_jobs_received_total", "Send jobs taken from the shard queues");
    metrics::describe_counter!("reach_dispatcher_jobs_total", "Send jobs settled without a call: skipped (stale or done), waiting_for_status, dead_lettered");
    metrics::describe_counter!("reach_dispatcher_lane_overflows_total", "Jobs moved to the database because their lane held more than REACH_DISPATCHER_LANE_SECONDS of sends");
    metrics::describe_counter!("reach_dispatcher_requeued_total", "Messages queued again by the sweeper after their wait");
    metrics::describe_counter!("reach_dispatcher_duplicate_sends_total", "Messages Meta took twice because an attempt's answer was lost and no status revealed it in time");
    metrics::describe_counter!("reach_dispatcher_consumer_restarts_total", "Send consumer reconnects after a broker failure");
    metrics::describe_gauge!("reach_dispatcher_lanes", "Phone number lanes running in this process");
    metrics::describe_histogram!(
        "reach_dispatcher_claim_wait_seconds",
        "Time a lane's sender waited for a claimed job: idle numbers, or claims not keeping up"
    );
    metrics::describe_gauge!("reach_phone_numbers", "Phone numbers by quality rating, read by the dispatcher's directory");
    metrics::describe_gauge!("reach_phone_numbers_paused", "Phone numbers whose sending is paused after an account-level error");
}
