//! Structured JSON logs and the process-wide Prometheus recorder.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Buckets of every `*_seconds` histogram, from 0.5 ms to 30 s.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of the end-to-end delivery latency, which includes retries: from 5 ms to a
/// day, so a callback delivered by the retry schedule still lands in a bucket.
const DELIVERY_LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0, 1800.0, 7200.0, 21600.0, 86400.0,
];

/// Buckets of every `*_size` histogram (rows or messages per batch).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Starts JSON logs on stderr, filtered by `RUST_LOG` (default `info`). Calling it twice
/// is harmless, so tests can start several services in one process.
pub fn init_logs(service: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let installed = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .with_writer(std::io::stderr)
        .try_init()
        .is_ok();
    if installed {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "logging started");
    }
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics_handle(service: &'static str) -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), BATCH_BUCKETS))
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("reach_relay_delivery_latency_seconds".into()),
                        DELIVERY_LATENCY_BUCKETS_SECONDS,
                    )
                })
                .expect("bucket lists are non-empty constants")
                .install_recorder()
                .expect("no other metrics recorder is installed in this process");
            metrics::describe_gauge!("reach_build_info", "Always 1; labels name the service and its version");
            metrics::describe_gauge!(
                "reach_process_start_time_seconds",
                "Unix time at which this process installed its metrics recorder; a change is a restart"
            );
            metrics::gauge!("reach_build_info", "service" => service, "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            metrics::gauge!("reach_process_start_time_seconds").set(started.as_secs_f64());
            handle
        })
        .clone()
}
