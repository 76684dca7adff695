//! `reach-loadgen send`: sends generated webhooks only, and measures the ingress's
//! throughput and response latency. It checks no callback; the benchmark scripts use it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::generator::BusinessNumber;
use crate::stats::Percentiles;
use crate::traffic::{ResponseTally, TrafficSettings, post_all};

/// The result of a send run; serialised as the last line of stdout.
#[derive(Debug, Serialize)]
pub struct SendReport {
    pub webhooks: u64,
    /// Responses with status 200.
    pub accepted: u64,
    /// Responses with another status, or no response.
    pub rejected: u64,
    /// Of the rejected, those with no HTTP response.
    pub transport_errors: u64,
    /// Posts by the ingress's outcome (`accepted`, `duplicate`, `unroutable`, ...) or
    /// `http_<status>` or `transport_error`.
    pub outcomes: BTreeMap<String, u64>,
    pub concurrency: usize,
    pub target_rate: Option<f64>,
    pub elapsed_seconds: f64,
    pub accepted_per_second: f64,
    /// Time from sending a webhook to reading the ingress's 200 response.
    pub latency_ms: Percentiles,
}

pub async fn run(settings: TrafficSettings, numbers: Vec<BusinessNumber>) -> anyhow::Result<SendReport> {
    let poster = Arc::new(settings.poster()?);
    let run_tag = format!("{:08X}", rand::random::<u32>());
    eprintln!(
        "sending {} of shape {:?} to {} (seed {}, run tag {run_tag}, concurrency {}, rate {})",
        settings.amount(),
        settings.shape,
        settings.ingress_url,
        settings.seed,
        settings.pace.concurrency,
        settings.pace.rate.map_or("unlimited".to_owned(), |r| format!("{r}/s"))
    );
    let webhooks = settings.webhooks(numbers, &run_tag).map(|w| (w.body, ()));
    let mut responses = ResponseTally::default();
    let started = Instant::now();
    post_all(poster, settings.pace, webhooks, |(), result| responses.record(&result)).await;
    let elapsed = started.elapsed().as_secs_f64();

    for error in &responses.sample_errors {
        eprintln!("transport error: {error}");
    }
    Ok(SendReport {
        webhooks: responses.posted,
        accepted: responses.accepted,
        rejected: responses.rejected,
        transport_errors: responses.transport_errors,
        concurrency: settings.pace.concurrency,
        target_rate: settings.pace.rate,
        elapsed_seconds: (elapsed * 1000.0).round() / 1000.0,
        accepted_per_second: (responses.accepted as f64 / elapsed.max(0.001) * 10.0).round() / 10.0,
        latency_ms: Percentiles::of(&responses.accepted_latencies),
        outcomes: responses.outcomes,
    })
}
