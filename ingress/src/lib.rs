//! `reach-ingress`: receives Meta's webhooks, stores them with their events and outbox
//! rows in one transaction, and runs the outbox publisher that moves those rows into
//! RabbitMQ.
//!
//! Layout:
//! - [`settings`]: typed settings from the environment.
//! - [`routes`]: the `/webhooks/whatsapp` handlers (handshake and notifications).
//! - [`api`]: the customer API `/v1/*` (messages, webhook subscriptions and deliveries).
//! - [`meta`]: parsing Meta's bodies into normalised items.
//! - [`store`]: routing items to orgs and writing them, with group commit.
//! - [`platform`]: the operator listener (`/platform/health`) and its audit log.

pub mod api;
pub mod meta;
pub mod platform;
pub mod routes;
pub mod settings;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use reach_shared::amqp::Topology;
use reach_shared::ops::{self, Readiness};
use reach_shared::outbox::{OutboxWaker, Publisher};
use reach_shared::signing::MetaSignatureVerifier;
use reach_shared::{db, telemetry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use settings::IngressSettings;
use store::WebhookStore;

/// The state every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<IngressSettings>,
    pub verifier: MetaSignatureVerifier,
    pub store: WebhookStore,
}

/// A started ingress: its bound addresses and the task that runs it to the end.
pub struct Ingress {
    pub ingress_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness: Readiness,
    task: tokio::task::JoinHandle<()>,
}

impl Ingress {
    /// Waits until the ingress has shut down and drained.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds the listeners and starts the ingress. Port 0 picks free ports; the bound
/// addresses are returned. Runs until `shutdown` fires, then stops accepting, finishes
/// requests in flight, commits what they carried and stops the publisher.
pub async fn start(settings: IngressSettings, shutdown: CancellationToken) -> anyhow::Result<Ingress> {
    let settings = Arc::new(settings);
    let readiness = Readiness::default();
    let metrics = telemetry::metrics_handle("reach-ingress");
    describe_metrics();
    let metrics_addr = ops::serve(settings.common.metrics_addr, metrics, readiness.clone(), shutdown.clone()).await?;

    let pool = db::connect(&settings.common.database_url, settings.common.database_max_connections).await?;
    readiness.set_database_up(true);
    ops::probe_database(pool.clone(), readiness.clone(), std::time::Duration::from_secs(2), shutdown.clone());
    let waker = OutboxWaker::default();
    let (store, mut writers) = WebhookStore::start(pool.clone(), settings.store.clone(), waker.clone());
    let (messages, mut message_writers) =
        api::messages::start_writer(pool.clone(), waker.clone(), settings.send_shards, settings.store.writers, settings.store.max_batch);
    let api_state = api::ApiState {
        pool: pool.clone(),
        tokens: settings.tokens.clone(),
        sealer: settings.sealer.clone(),
        waker: waker.clone(),
        send_shards: settings.send_shards,
        messages,
    };

    let publisher_task = if settings.run_publisher {
        let publisher = Publisher {
            pool: pool.clone(),
            amqp_url: settings.common.amqp_url.clone(),
            topology: Topology::new(&settings.common.amqp_prefix, settings.send_shards),
            settings: settings.publisher.clone(),
            waker,
            // The outbox absorbs a broker outage without losing a webhook, so the ingress
            // stays ready meanwhile; the publisher's restarts show in its metrics.
            readiness: Readiness::default(),
        };
        Some(tokio::spawn(publisher.run(shutdown.clone())))
    } else {
        None
    };
    readiness.set_broker_up(true);

    let state = AppState {
        verifier: MetaSignatureVerifier::new(settings.meta_app_secrets.clone()),
        settings: settings.clone(),
        store,
    };
    let router = Router::new()
        .route("/webhooks/whatsapp", get(routes::verify_subscription).post(routes::receive_notification))
        .with_state(state)
        .nest("/v1", api::router(api_state));
    let listener = TcpListener::bind(settings.ingress_addr)
        .await
        .with_context(|| format!("failed to bind REACH_INGRESS_ADDR {}", settings.ingress_addr))?;
    let ingress_addr = listener.local_addr()?;
    let admin_listener = TcpListener::bind(settings.admin_addr)
        .await
        .with_context(|| format!("failed to bind REACH_ADMIN_ADDR {}", settings.admin_addr))?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_router = platform::router(platform::PlatformState { pool: pool.clone(), tokens: settings.tokens.clone() });
    let admin_shutdown = shutdown.clone();
    let admin_task = tokio::spawn(async move {
        let served = axum::serve(admin_listener, admin_router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move { admin_shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "operator listener failed");
        }
    });
    tracing::info!(%ingress_addr, %admin_addr, %metrics_addr, "ingress listening");

    let draining = readiness.clone();
    let task = tokio::spawn(async move {
        let stop = shutdown.clone();
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                draining.set_shutting_down();
            })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "ingress listener failed");
        }
        // The router, and with it the last store handle, is gone: writers commit what
        // is queued and stop.
        while writers.join_next().await.is_some() {}
        while message_writers.join_next().await.is_some() {}
        let _ = admin_task.await;
        if let Some(publisher) = publisher_task {
            let _ = publisher.await;
        }
        pool.close().await;
        tracing::info!("ingress stopped");
    });
    Ok(Ingress { ingress_addr, admin_addr, metrics_addr, readiness, task })
}

/// Gives the ingress metrics their help text on `/metrics`.
fn describe_metrics() {
    metrics::describe_counter!(
        "reach_webhooks_received_total",
        "Meta webhook POSTs by outcome: accepted, duplicate, unroutable, unparseable, unauthorized, too_large, error"
    );
    metrics::describe_counter!("reach_webhook_signature_failures_total", "Webhooks refused for their X-Hub-Signature-256, by reason");
    metrics::describe_histogram!("reach_ingress_webhook_duration_seconds", "Time from the start of a webhook POST to its answer");
    metrics::describe_counter!("reach_ingress_events_total", "New events stored from accepted webhooks");
    metrics::describe_counter!("reach_ingress_unroutable_items_total", "Items of accepted webhooks naming an unknown phone number or WABA");
    metrics::describe_histogram!("reach_ingress_commit_batch_size", "Webhooks written per storage transaction");
    metrics::describe_counter!("reach_api_messages_total", "POST /v1/messages answered 202, by outcome: queued, idempotent_replay");
    metrics::describe_counter!("reach_api_errors_total", "Error responses of the customer API /v1, by error code");
    metrics::describe_counter!("reach_platform_requests_total", "Audited requests on the operator listener, by action and HTTP status");
    metrics::describe_counter!("reach_platform_audit_failures_total", "Operator requests answered 503 because their audit row could not be written");
}
