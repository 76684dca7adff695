//! The benchmark drivers `scripts/bench` runs. `bench-e2e` sends webhooks through a
//! running ingress and relay and times each callback from the webhook's POST.
//! `subscribe` only serves the verifying subscriber and times how fast a backlog already
//! queued for the relay arrives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reach_shared::db;
use secrecy::SecretString;
use serde::Serialize;

use crate::demo::{Progress, format_percentiles};
use crate::expect::{EventFilter, Expectations, Receipt};
use crate::provisioning::{DemoSetup, write_bench_file};
use crate::stats::Percentiles;
use crate::subscriber::{Arrivals, Subscriber};
use crate::traffic::{PostResult, Poster, ResponseTally, TrafficSettings, post_all};

/// The source of a benchmark's provisioning.
#[derive(Debug, Clone)]
pub struct BenchProvisioning {
    /// Read when it exists. Otherwise it is written with `endpoints` subscriptions on
    /// `subscriber_addr` and applied.
    pub file: PathBuf,
    pub endpoints: usize,
    pub subscriber_addr: SocketAddr,
    pub database_url: SecretString,
}

impl BenchProvisioning {
    /// Reads the file, or writes and applies a new one when there is none.
    async fn prepare(&self) -> anyhow::Result<DemoSetup> {
        if !self.file.exists() {
            write_bench_file(&self.file, self.subscriber_addr, self.endpoints)?;
            eprintln!("wrote the provisioning file {} with {} endpoints", self.file.display(), self.endpoints);
            let setup = DemoSetup::read(&self.file)?;
            let pool = db::connect(&self.database_url, 1).await?;
            setup.apply(&pool, &self.file).await?;
            pool.close().await;
            return Ok(setup);
        }
        DemoSetup::read(&self.file)
    }
}

/// Settings of one `bench-e2e` run.
#[derive(Debug, Clone)]
pub struct EndToEndSettings {
    pub traffic: TrafficSettings,
    pub provisioning: BenchProvisioning,
    /// How long to wait for the expected callbacks after the response to the last webhook.
    pub timeout: Duration,
    /// How long to keep listening after the last expected callback, to count late
    /// duplicates.
    pub settle: Duration,
    /// Traffic of the same pace sent first for this long, and its callbacks awaited,
    /// so connection pools, caches and queues are warm. It is not measured.
    pub warmup: Option<Duration>,
}

/// The result of `bench-e2e`, serialised as the last line of stdout.
#[derive(Debug, Serialize)]
pub struct EndToEndReport {
    pub endpoints: usize,
    pub webhooks: u64,
    /// Webhooks the ingress accepted with 200.
    pub accepted: u64,
    pub rejected: u64,
    pub concurrency: usize,
    pub target_rate: Option<f64>,
    pub warmup_seconds: Option<f64>,
    /// From the first POST to the response to the last.
    pub sending_seconds: f64,
    pub accepted_per_second: f64,
    /// Callbacks the accepted webhooks should cause: one per event and subscription.
    pub expected: usize,
    /// Distinct expected callbacks received.
    pub delivered: usize,
    pub lost: usize,
    pub duplicates: u64,
    pub unexpected: u64,
    pub signature_failures: u64,
    /// Distinct callbacks received while sending, per second of sending.
    pub delivered_per_second_while_sending: f64,
    /// Delivered callbacks per second from the first POST to the last callback.
    pub delivered_per_second: f64,
    /// Expected callbacks not yet received when the last response arrived.
    pub backlog_at_send_end: usize,
    /// True when every expected callback arrived before the timeout.
    pub drained: bool,
    /// From the last response to the last expected callback, or `None` when not drained.
    pub drain_seconds: Option<f64>,
    /// Time from sending a webhook to reading the ingress's 200 response.
    pub ingress_latency_ms: Percentiles,
    /// Per callback, from its webhook's POST to its first receipt.
    pub latency_ms: Percentiles,
}

pub async fn end_to_end(settings: EndToEndSettings) -> anyhow::Result<EndToEndReport> {
    let setup = settings.provisioning.prepare().await?;
    let filters: Vec<EventFilter> = setup.subscriptions.iter().map(|s| EventFilter::new(&s.events)).collect();
    let subscriber = Subscriber::start(setup.subscriber_addr, setup.endpoints()).await?;
    eprintln!("subscriber listening on http://{} for {} subscriptions", subscriber.addr, filters.len());
    let traffic = &settings.traffic;
    let poster = Arc::new(traffic.poster()?);

    if let Some(warmup) = settings.warmup {
        let warmup_traffic = TrafficSettings { duration: Some(warmup), ..traffic.clone() };
        eprintln!("warming up, not measured:");
        let before = subscriber.arrivals().distinct;
        let sent = send_phase(&warmup_traffic, &poster, &setup).await;
        let expected = before + sent.expectations.callback_count(&filters);
        wait_for_arrivals(&subscriber, expected, settings.timeout).await;
    }

    // Receipts from here on belong to the measured traffic.
    let before = subscriber.arrivals().distinct;
    let measured_from = Instant::now();
    let sent = send_phase(traffic, &poster, &setup).await;
    let sending = sent.finished - sent.started;
    let at_send_end = subscriber.arrivals().distinct - before;
    let expected = sent.expectations.callback_count(&filters);
    let responses = &sent.responses;
    eprintln!(
        "sent {} webhooks in {:.1} s ({:.0}/s); {at_send_end} of {expected} callbacks so far, waiting up to {} s for the rest",
        responses.posted,
        sending.as_secs_f64(),
        responses.accepted as f64 / sending.as_secs_f64().max(0.001),
        settings.timeout.as_secs()
    );

    let last = wait_for_arrivals(&subscriber, before + expected, settings.timeout).await;
    tokio::time::sleep(settings.settle).await;
    let receipts: Vec<Receipt> = subscriber.receipts().into_iter().filter(|r| r.first_at >= measured_from).collect();
    let tally = sent.expectations.tally(&filters, &receipts);
    let signature_failures = subscriber.rejections().signature_failures();
    subscriber.stop().await;

    let drained = tally.lost == 0;
    let until_last = last.last.map_or(sending, |at| at.saturating_duration_since(sent.started));
    let report = EndToEndReport {
        endpoints: filters.len(),
        webhooks: responses.posted,
        accepted: responses.accepted,
        rejected: responses.rejected,
        concurrency: traffic.pace.concurrency,
        target_rate: traffic.pace.rate,
        warmup_seconds: settings.warmup.map(|w| w.as_secs_f64()),
        sending_seconds: round(sending.as_secs_f64(), 3),
        accepted_per_second: per_second(responses.accepted as usize, sending),
        expected: tally.expected_callbacks,
        delivered: tally.delivered,
        lost: tally.lost,
        duplicates: tally.duplicates,
        unexpected: tally.unexpected,
        signature_failures,
        delivered_per_second_while_sending: per_second(at_send_end, sending),
        delivered_per_second: per_second(tally.delivered, until_last),
        backlog_at_send_end: expected.saturating_sub(at_send_end),
        drained,
        drain_seconds: drained
            .then(|| round(last.last.map_or(0.0, |at| at.saturating_duration_since(sent.finished).as_secs_f64()), 3)),
        ingress_latency_ms: Percentiles::of(&responses.accepted_latencies),
        latency_ms: Percentiles::of(&tally.callback_latencies),
    };
    for error in &responses.sample_errors {
        eprintln!("transport error: {error}");
    }
    eprintln!("ingress response ms: {}", format_percentiles(&report.ingress_latency_ms));
    eprintln!("end-to-end ms (POST to callback, per callback): {}", format_percentiles(&report.latency_ms));
    Ok(report)
}

/// The outcome of one round of sending.
struct Sent {
    expectations: Expectations,
    responses: ResponseTally,
    /// Before the first POST and after the response to the last.
    started: Instant,
    finished: Instant,
}

/// Sends `traffic` and records the events each newly accepted webhook should cause.
async fn send_phase(traffic: &TrafficSettings, poster: &Arc<Poster>, setup: &DemoSetup) -> Sent {
    let run_tag = format!("{:08X}", rand::random::<u32>());
    eprintln!(
        "sending {} of shape {:?} (seed {}, run tag {run_tag}, concurrency {}, rate {})",
        traffic.amount(),
        traffic.shape,
        traffic.seed,
        traffic.pace.concurrency,
        traffic.pace.rate.map_or("unlimited".to_owned(), |r| format!("{r}/s"))
    );
    let mut expectations = Expectations::default();
    let mut responses = ResponseTally::default();
    let mut progress = Progress::new(traffic.amount());
    let webhooks = traffic.webhooks(setup.numbers.clone(), &run_tag).map(|w| (w.body, w.events));
    let started = Instant::now();
    post_all(poster.clone(), traffic.pace, webhooks, |events, result: PostResult| {
        responses.record(&result);
        if result.accepted() && result.label() == "accepted" {
            for event in events {
                expectations.add(event, result.sent_at);
            }
        }
        progress.tick(&responses);
    })
    .await;
    Sent { expectations, responses, started, finished: Instant::now() }
}

/// Polls the subscriber until `expected` distinct callbacks arrived or `timeout`
/// passed, and returns the last count.
async fn wait_for_arrivals(subscriber: &Subscriber, expected: usize, timeout: Duration) -> Arrivals {
    let waiting_since = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let arrivals = subscriber.arrivals();
        if arrivals.distinct >= expected {
            return arrivals;
        }
        if waiting_since.elapsed() >= timeout {
            eprintln!("timed out after {} s with {} of {expected} callbacks", timeout.as_secs(), arrivals.distinct);
            return arrivals;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("  {} of {expected} callbacks received", arrivals.distinct);
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Settings of one `subscribe` run.
#[derive(Debug, Clone)]
pub struct SubscribeSettings {
    pub provisioning_file: PathBuf,
    /// Distinct callbacks to wait for.
    pub callbacks: usize,
    /// How long to wait for them, from the start.
    pub timeout: Duration,
    pub settle: Duration,
    /// Also write the report here.
    pub report_file: Option<PathBuf>,
}

/// The result of `subscribe`, serialised as the last line of stdout.
#[derive(Debug, Serialize)]
pub struct SubscribeReport {
    pub endpoints: usize,
    pub expected: usize,
    /// Distinct (subscription, `webhook-id`) callbacks received.
    pub delivered: usize,
    /// True when `delivered` reached `expected` before the timeout.
    pub complete: bool,
    pub duplicates: u64,
    pub signature_failures: u64,
    /// Distinct callbacks per subscription, in file order.
    pub per_endpoint: Vec<usize>,
    /// Unix milliseconds of the first callback and of the last new one.
    pub first_arrival_unix_ms: Option<u128>,
    pub last_arrival_unix_ms: Option<u128>,
    /// From the first callback to the last new one.
    pub seconds: f64,
    pub delivered_per_second: f64,
}

pub async fn subscribe(settings: SubscribeSettings) -> anyhow::Result<SubscribeReport> {
    let setup = DemoSetup::read(&settings.provisioning_file)?;
    let subscriber = Subscriber::start(setup.subscriber_addr, setup.endpoints()).await?;
    eprintln!(
        "subscriber listening on http://{} for {} subscriptions; waiting up to {} s for {} callbacks",
        subscriber.addr,
        setup.subscriptions.len(),
        settings.timeout.as_secs(),
        settings.callbacks
    );
    // Instants become wall-clock times through one pair taken together.
    let (anchor, anchor_wall) = (Instant::now(), SystemTime::now());
    let unix_ms = |at: Instant| {
        (anchor_wall + at.saturating_duration_since(anchor)).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
    };
    let arrivals = wait_for_arrivals(&subscriber, settings.callbacks, settings.timeout).await;
    tokio::time::sleep(settings.settle).await;
    let receipts = subscriber.receipts();
    let signature_failures = subscriber.rejections().signature_failures();
    subscriber.stop().await;

    let mut per_endpoint = vec![0; setup.subscriptions.len()];
    for receipt in &receipts {
        per_endpoint[receipt.subscription] += 1;
    }
    let span = match (arrivals.first, arrivals.last) {
        (Some(first), Some(last)) => last.saturating_duration_since(first),
        _ => Duration::ZERO,
    };
    let report = SubscribeReport {
        endpoints: setup.subscriptions.len(),
        expected: settings.callbacks,
        delivered: arrivals.distinct,
        complete: arrivals.distinct >= settings.callbacks,
        duplicates: receipts.iter().map(|r| r.count.saturating_sub(1)).sum(),
        signature_failures,
        per_endpoint,
        first_arrival_unix_ms: arrivals.first.map(unix_ms),
        last_arrival_unix_ms: arrivals.last.map(unix_ms),
        seconds: round(span.as_secs_f64(), 3),
        delivered_per_second: per_second(arrivals.distinct, span),
    };
    if let Some(path) = &settings.report_file {
        write_report(path, &report)?;
    }
    Ok(report)
}

fn write_report<T: Serialize>(path: &Path, report: &T) -> anyhow::Result<()> {
    use anyhow::Context;
    let line = serde_json::to_string(report)? + "\n";
    std::fs::write(path, line).with_context(|| format!("failed to write {}", path.display()))
}

/// Returns events per second over `span`, rounded to a tenth, or 0 for an empty span.
fn per_second(count: usize, span: Duration) -> f64 {
    if span.is_zero() {
        return 0.0;
    }
    round(count as f64 / span.as_secs_f64(), 1)
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_second_rounds_and_handles_empty_span() {
        assert_eq!(per_second(1_000, Duration::from_millis(300)), 3333.3);
        assert_eq!(per_second(5, Duration::ZERO), 0.0);
        assert_eq!(round(1.23456, 3), 1.235);
    }
}
