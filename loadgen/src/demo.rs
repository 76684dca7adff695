//! `reach-loadgen demo`: the end-to-end check of the message plane. It serves the
//! verifying subscriber, replays the Meta fixtures, sends the generated traffic and
//! waits for every expected callback. The report counts what arrived, what was lost and
//! what was parked, and gives the latency from each webhook's POST to the first
//! callback of each of its events.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use reach_shared::db;
use secrecy::SecretString;
use serde::Serialize;
use sqlx::PgPool;

use crate::expect::{EventFilter, EventKey, Expectations, Receipt, Tally};
use crate::fixtures;
use crate::outbound::{self, OutboundReport, OutboundSettings, SendingNumber};
use crate::provisioning::{DemoSetup, write_demo_file};
use crate::stats::Percentiles;
use crate::subscriber::{RejectionCounts, Subscriber};
use crate::traffic::{ResponseTally, PostResult, TrafficSettings, post_all};

#[derive(Debug, Clone)]
pub struct DemoSettings {
    pub traffic: TrafficSettings,
    /// Read when it exists; otherwise written for `subscriber_addr` and applied.
    pub provisioning_file: PathBuf,
    pub subscriber_addr: std::net::SocketAddr,
    /// Apply an existing provisioning file before sending.
    pub apply: bool,
    pub database_url: SecretString,
    pub fixtures_dir: PathBuf,
    /// How long to wait for the expected callbacks after the response to the last webhook.
    pub timeout: Duration,
    /// How long to keep listening after the last expected callback, to count late
    /// duplicates.
    pub settle: Duration,
    /// Messages to send through the customer API after the inbound traffic; none when
    /// absent.
    pub outbound: Option<OutboundSettings>,
}

/// The demo's result; serialised as the last line of stdout.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// Webhooks posted: the fixtures and the generated ones.
    pub webhooks: u64,
    /// Webhooks the ingress accepted with 200.
    pub accepted: u64,
    /// Webhooks with another status or no response at all.
    pub rejected: u64,
    /// Events the accepted webhooks should have created.
    pub events: usize,
    pub expected_callbacks: usize,
    /// Distinct expected callbacks received.
    pub delivered: usize,
    /// Deliveries parked in the database (all orgs).
    pub parked: i64,
    pub lost: usize,
    pub duplicates: u64,
    pub unexpected: u64,
    pub signature_failures: u64,
    /// From a webhook's POST to the first callback of each of its events.
    pub latency_ms: Percentiles,
    /// Messages sent through the API, per phone number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound: Option<OutboundReport>,
    pub elapsed_seconds: f64,
}

impl DemoReport {
    /// True when every webhook was accepted, every expected callback arrived and
    /// every callback verified.
    pub fn passed(&self) -> bool {
        let outbound_ok = self.outbound.as_ref().is_none_or(|o| o.rejected_requests == 0 && o.failed == 0 && o.reached_read == o.messages as i64);
        self.rejected == 0 && self.lost == 0 && self.signature_failures == 0 && outbound_ok
    }
}

pub async fn run(settings: DemoSettings) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let pool = db::connect(&settings.database_url, 2).await?;
    let setup = prepare_provisioning(&settings, &pool).await?;
    if !setup.numbers.iter().any(|n| n.phone_number_id == "200000000000001") {
        tracing::warn!("the provisioning file lacks phone number 200000000000001; the fixtures will be unroutable");
    }
    let filters: Vec<EventFilter> = setup.subscriptions.iter().map(|s| EventFilter::new(&s.events)).collect();
    let subscriber = Subscriber::start(setup.subscriber_addr, setup.endpoints()).await?;
    eprintln!("subscriber listening on http://{} for {} subscriptions", subscriber.addr, filters.len());

    let poster = Arc::new(settings.traffic.poster()?);
    let mut expectations = Expectations::default();
    let mut responses = ResponseTally::default();
    let mut expect = |events: Vec<EventKey>, result: &PostResult, responses: &mut ResponseTally| {
        responses.record(result);
        // Only a webhook the ingress stored as new creates events; a duplicate body
        // creates none and a rejected one may not have been stored.
        if result.accepted() && result.label() == "accepted" {
            for event in events {
                expectations.add(event, result.sent_at);
            }
        }
    };

    for fixture in fixtures::load(&settings.fixtures_dir)? {
        let result = poster.post(fixture.body.clone()).await;
        eprintln!("fixture {}: {}", fixture.name, result.label());
        expect(fixture.events, &result, &mut responses);
    }

    let traffic = &settings.traffic;
    let run_tag = format!("{:08X}", rand::random::<u32>());
    eprintln!(
        "sending {} generated (seed {}, run tag {run_tag}, concurrency {}, rate {})",
        traffic.amount(),
        traffic.seed,
        traffic.pace.concurrency,
        traffic.pace.rate.map_or("unlimited".to_owned(), |r| format!("{r}/s"))
    );
    let webhooks = traffic.webhooks(setup.numbers.clone(), &run_tag).map(|w| (w.body, w.events));
    let sending_started = Instant::now();
    let mut progress = Progress::new(traffic.amount());
    post_all(poster, traffic.pace, webhooks, |events, result| {
        expect(events, &result, &mut responses);
        progress.tick(&responses);
    })
    .await;
    let sending = sending_started.elapsed();
    eprintln!(
        "sent {} webhooks in {:.1} s ({:.0}/s); waiting up to {} s for {} callbacks",
        responses.posted,
        sending.as_secs_f64(),
        responses.posted as f64 / sending.as_secs_f64().max(0.001),
        settings.timeout.as_secs(),
        expectations.callback_count(&filters)
    );

    wait_for_callbacks(&subscriber, &expectations, &filters, settings.timeout).await;

    let mut outbound_expectations = Expectations::default();
    let outbound = match &settings.outbound {
        Some(outbound) => Some(run_outbound(outbound, &pool, &setup, &subscriber, &filters, &mut outbound_expectations, settings.timeout).await?),
        None => None,
    };
    tokio::time::sleep(settings.settle).await;

    // Each part is tallied against its own receipts, so neither counts the other's
    // callbacks as unexpected.
    let (outbound_receipts, inbound_receipts): (Vec<Receipt>, Vec<Receipt>) = subscriber
        .receipts()
        .into_iter()
        .partition(|receipt| outbound_expectations.contains(&receipt.key) || matches!(receipt.key, EventKey::Outbound { .. }));
    let tally = expectations.tally(&filters, &inbound_receipts);
    let outbound_tally = outbound_expectations.tally(&filters, &outbound_receipts);
    let rejections = subscriber.rejections();
    subscriber.stop().await;

    let database = DatabaseCounts::read(&pool, setup.org_id).await?;
    pool.close().await;

    let report = DemoReport {
        webhooks: responses.posted,
        accepted: responses.accepted,
        rejected: responses.rejected,
        events: expectations.event_count() + outbound_expectations.event_count(),
        expected_callbacks: tally.expected_callbacks + outbound_tally.expected_callbacks,
        delivered: tally.delivered + outbound_tally.delivered,
        parked: database.parked,
        lost: tally.lost + outbound_tally.lost,
        duplicates: tally.duplicates + outbound_tally.duplicates,
        unexpected: tally.unexpected + outbound_tally.unexpected,
        signature_failures: rejections.signature_failures(),
        latency_ms: Percentiles::of(&tally.latencies),
        outbound,
        elapsed_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    };
    print_summary(&report, &responses, &tally, &rejections, &database, &setup);
    if let Some(outbound) = &report.outbound {
        eprintln!(
            "outbound callbacks: {} expected, {} delivered, {} lost, {} duplicates, {} unexpected",
            outbound_tally.expected_callbacks, outbound_tally.delivered, outbound_tally.lost, outbound_tally.duplicates, outbound_tally.unexpected
        );
        outbound::print_summary(outbound);
    }
    eprintln!("result: {}", if report.passed() { "PASS" } else { "FAIL" });
    Ok(report)
}

/// Sends each number's share of messages through the API and waits until they are
/// read and their callbacks arrived.
async fn run_outbound(
    settings: &OutboundSettings,
    pool: &PgPool,
    setup: &DemoSetup,
    subscriber: &Subscriber,
    filters: &[EventFilter],
    expectations: &mut Expectations,
    timeout: Duration,
) -> anyhow::Result<OutboundReport> {
    let numbers: Vec<SendingNumber> = setup
        .file
        .orgs
        .iter()
        .flat_map(|org| &org.wabas)
        .flat_map(|waba| &waba.phone_numbers)
        .map(|number| SendingNumber { phone_number_id: number.phone_number_id.clone(), mps: number.mps.max(1) as u32 })
        .collect();
    let planned: Vec<String> = numbers.iter().map(|n| format!("{} at {} MPS", n.phone_number_id, n.mps)).collect();
    eprintln!("sending {:.0} s of messages from each number through the API: {}", settings.seconds, planned.join(", "));
    let (posted, rejected, api_rate) = outbound::post_messages(settings, setup.org_id, &numbers, expectations).await?;
    eprintln!("posted {} messages ({rejected} rejected) at {api_rate:.0} requests/s; waiting for the sends", posted.len());
    outbound::wait_for_wamids(pool, &posted, expectations, settings.timeout).await?;
    outbound::wait_for_read(pool, &posted, settings.timeout).await?;
    wait_for_callbacks(subscriber, expectations, filters, timeout).await;
    outbound::report(settings, pool, &numbers, &posted, rejected, api_rate).await
}

/// Reads the provisioning file, or writes and applies a new one when there is none.
async fn prepare_provisioning(settings: &DemoSettings, pool: &PgPool) -> anyhow::Result<DemoSetup> {
    let path = &settings.provisioning_file;
    let fresh = !path.exists();
    if fresh {
        write_demo_file(path, settings.subscriber_addr)?;
        eprintln!("wrote the provisioning file {}", path.display());
    }
    let setup = DemoSetup::read(path)?;
    if fresh || settings.apply {
        setup.apply(pool, path).await?;
    }
    Ok(setup)
}

/// Polls the subscriber until every expected callback arrived or `timeout` passed.
async fn wait_for_callbacks(subscriber: &Subscriber, expectations: &Expectations, filters: &[EventFilter], timeout: Duration) {
    let waiting_since = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let tally = expectations.tally(filters, &subscriber.receipts());
        if tally.delivered >= tally.expected_callbacks {
            break;
        }
        if waiting_since.elapsed() >= timeout {
            eprintln!("timed out after {} s with {} of {} callbacks", timeout.as_secs(), tally.delivered, tally.expected_callbacks);
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("  {} of {} callbacks received", tally.delivered, tally.expected_callbacks);
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Prints a progress line to stderr every 5 seconds while sending.
pub struct Progress {
    /// The amount being sent, as [`TrafficSettings::amount`] describes it.
    total: String,
    last: Instant,
}

impl Progress {
    pub fn new(total: String) -> Self {
        Self { total, last: Instant::now() }
    }

    pub fn tick(&mut self, responses: &ResponseTally) {
        if self.last.elapsed() >= Duration::from_secs(5) {
            eprintln!("  posted {} of {} ({} accepted)", responses.posted, self.total, responses.accepted);
            self.last = Instant::now();
        }
    }
}

/// Counts read from the database after the run.
struct DatabaseCounts {
    parked: i64,
    /// Deliveries by status, all orgs.
    deliveries: Vec<(String, i64)>,
    /// Events stored for the demo org, including those of earlier runs.
    events: i64,
}

impl DatabaseCounts {
    async fn read(pool: &PgPool, org_id: uuid::Uuid) -> anyhow::Result<Self> {
        let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status = 'parked'")
            .fetch_one(pool)
            .await
            .context("failed to count parked deliveries")?;
        let deliveries: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM webhook_deliveries GROUP BY status ORDER BY status")
                .fetch_all(pool)
                .await
                .context("failed to count deliveries by status")?;
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE org_id = $1")
            .bind(org_id)
            .fetch_one(pool)
            .await
            .context("failed to count the org's events")?;
        Ok(Self { parked, deliveries, events })
    }
}

fn print_summary(
    report: &DemoReport,
    responses: &ResponseTally,
    tally: &Tally,
    rejections: &RejectionCounts,
    database: &DatabaseCounts,
    setup: &DemoSetup,
) {
    let outcomes: Vec<String> = responses.outcomes.iter().map(|(label, count)| format!("{label} {count}")).collect();
    let ingress = Percentiles::of(&responses.accepted_latencies);

    eprintln!();
    eprintln!("== reach-loadgen demo ==");
    eprintln!("webhooks: {} posted, {} accepted, {} rejected ({})", report.webhooks, report.accepted, report.rejected, outcomes.join(", "));
    for error in &responses.sample_errors {
        eprintln!("  transport error: {error}");
    }
    eprintln!("ingress response ms: {}", format_percentiles(&ingress));

    eprintln!("events expected: {} (stored for the org: {})", report.events, database.events);
    eprintln!(
        "callbacks: {} expected, {} delivered, {} lost, {} duplicates, {} unexpected",
        report.expected_callbacks, report.delivered, report.lost, report.duplicates, report.unexpected
    );
    for (subscription, counts) in setup.subscriptions.iter().zip(&tally.by_subscription) {
        eprintln!(
            "  subscription {} {} {:?}: {} of {} delivered",
            subscription.id, subscription.path, subscription.events, counts.delivered, counts.expected
        );
    }

    eprintln!(
        "subscriber rejections: {} bad signature, {} stale timestamp, {} missing header, {} invalid timestamp; {} unreadable bodies",
        rejections.bad_signature,
        rejections.stale_timestamp,
        rejections.missing_header,
        rejections.invalid_timestamp,
        rejections.unreadable_body
    );

    let deliveries: Vec<String> = database.deliveries.iter().map(|(status, count)| format!("{status} {count}")).collect();
    eprintln!("deliveries in the database: {}", if deliveries.is_empty() { "none".to_owned() } else { deliveries.join(", ") });
    eprintln!("end-to-end ms (webhook POST to first callback, per inbound event): {}", format_percentiles(&report.latency_ms));
}

pub fn format_percentiles(p: &Percentiles) -> String {
    let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    format!("p50 {} p90 {} p99 {} max {} (n={})", show(p.p50), show(p.p90), show(p.p99), show(p.max), p.count)
}
