//! The operations listener of every process: `/metrics` (Prometheus text), `/livez` and
//! `/readyz`. Readiness turns 503 once shutdown starts or a dependency is down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness of a process: ready only while its dependencies are up and it is not
/// shutting down.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    inner: Arc<ReadinessFlags>,
}

#[derive(Debug, Default)]
struct ReadinessFlags {
    database_up: AtomicBool,
    broker_up: AtomicBool,
    shutting_down: AtomicBool,
}

impl Readiness {
    pub fn set_database_up(&self, up: bool) {
        self.inner.database_up.store(up, Ordering::Relaxed);
    }

    pub fn set_broker_up(&self, up: bool) {
        self.inner.broker_up.store(up, Ordering::Relaxed);
    }

    pub fn set_shutting_down(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        let flags = &self.inner;
        flags.database_up.load(Ordering::Relaxed)
            && flags.broker_up.load(Ordering::Relaxed)
            && !flags.shutting_down.load(Ordering::Relaxed)
    }
}

/// Pings Postgres every `interval` and records the result in `readiness`, so `/readyz`
/// turns 503 while the database is unreachable. Stops with `shutdown`.
pub fn probe_database(pool: sqlx::PgPool, readiness: Readiness, interval: std::time::Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let ping = tokio::time::timeout(interval, sqlx::query("SELECT 1").execute(&pool)).await;
            let up = matches!(ping, Ok(Ok(_)));
            if up != readiness.inner.database_up.load(Ordering::Relaxed) {
                if up {
                    tracing::info!("database reachable again");
                } else {
                    tracing::warn!("database unreachable, readiness is 503");
                }
            }
            readiness.set_database_up(up);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
}

#[derive(Clone)]
struct OpsState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// Binds the operations listener and serves it until `shutdown` fires. Returns the
/// bound address (port 0 picks a free port).
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("failed to bind the metrics listener on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(OpsState { metrics, readiness });
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "metrics listener failed");
        }
    });
    Ok(bound)
}

async fn render_metrics(State(state): State<OpsState>) -> String {
    state.metrics.run_upkeep();
    state.metrics.render()
}

async fn ready(State(state): State<OpsState>) -> (StatusCode, &'static str) {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}
