//! The send benchmark's loadgen side: a provisioning file of many numbers, messages
//! seeded straight into the fleet's database (with their send jobs in the outbox, as
//! the API writes them), and the measurement of what the Graph API simulator saw per
//! number.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use reach_meta_sim::SimStats;
use reach_shared::sends::{self, SendJob};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use url::Url;
use uuid::{Uuid, uuid};

pub const BENCH_SENDS_ORG_ID: Uuid = uuid!("8d2f4a60-3c1b-4e7a-9f05-6b2c8e1d7b40");
const BIG_NUMBER_ID: &str = "310000000000000";

/// Phone number ids of the benchmark file: one big number, then the small ones.
fn small_number_id(index: usize) -> String {
    format!("3100000000{:05}", index + 1)
}

/// Writes the provisioning file: one org, one WABA, one number at `big_mps` and
/// `small_count` numbers at `small_mps`, without subscriptions.
pub fn write_provisioning(path: &Path, big_mps: u32, small_count: usize, small_mps: u32) -> anyhow::Result<()> {
    let mut numbers = vec![json!({"phone_number_id": BIG_NUMBER_ID, "display_phone_number": "+1 555 0300", "mps": big_mps, "quality_rating": "GREEN"})];
    for index in 0..small_count {
        numbers.push(json!({
            "phone_number_id": small_number_id(index),
            "display_phone_number": format!("+1 555 3{index:05}"),
            "mps": small_mps,
            "quality_rating": "GREEN",
        }));
    }
    let file = json!({"orgs": [{
        "id": BENCH_SENDS_ORG_ID, "slug": "bench-sends", "name": "Send Benchmark Org",
        "wabas": [{"waba_id": "410000000000001", "access_token": "bench-sends-token", "phone_numbers": numbers}],
    }]});
    std::fs::write(path, serde_json::to_string_pretty(&file)?).with_context(|| format!("failed to write {}", path.display()))
}

/// Inserts `seconds` worth of messages for every number of the org at its MPS (or
/// `per_number` each), with their send jobs, interleaved by rate so every shard queue
/// contains every number's work in sending order. Returns the count.
pub async fn seed(pool: &PgPool, seconds: f64, per_number: Option<u64>, shards: u16) -> anyhow::Result<usize> {
    let numbers: Vec<(String, i32)> = sqlx::query_as("SELECT phone_number_id, mps FROM phone_numbers WHERE org_id = $1 ORDER BY phone_number_id")
        .bind(BENCH_SENDS_ORG_ID)
        .fetch_all(pool)
        .await
        .context("failed to read the benchmark numbers; apply the provisioning file first")?;
    ensure!(!numbers.is_empty(), "the benchmark org has no phone numbers");
    let mut plan: Vec<(f64, usize, u64)> = Vec::new();
    for (index, (_, mps)) in numbers.iter().enumerate() {
        let count = per_number.unwrap_or_else(|| (f64::from(*mps) * seconds).round() as u64);
        plan.extend((0..count).map(|k| (k as f64 / f64::from(*mps), index, k)));
    }
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));

    let total = plan.len();
    for chunk in plan.chunks(5000) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let phones: Vec<&str> = chunk.iter().map(|(_, index, _)| numbers[*index].0.as_str()).collect();
        // Distinct recipients per number, so the pair rate never applies.
        let recipients: Vec<String> = chunk.iter().map(|(_, index, k)| format!("1{:03}{:07}", index % 1000, k)).collect();
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO outbound_messages (id, org_id, phone_number_id, recipient, type, request, request_sha256)
             SELECT t.id, $2, t.phone, t.recipient, 'text',
                    jsonb_build_object('messaging_product', 'whatsapp', 'recipient_type', 'individual', 'to', t.recipient,
                                       'type', 'text', 'text', jsonb_build_object('body', 'Your verification code is 482913', 'preview_url', false)),
                    '\\x00'
             FROM UNNEST($1::uuid[], $3::text[], $4::text[]) AS t (id, phone, recipient)",
        )
        .bind(&ids)
        .bind(BENCH_SENDS_ORG_ID)
        .bind(&phones)
        .bind(&recipients)
        .execute(&mut *tx)
        .await
        .context("failed to insert benchmark messages")?;
        let jobs: Vec<SendJob> = ids
            .iter()
            .zip(&phones)
            .map(|(id, phone)| SendJob { message_id: *id, org_id: BENCH_SENDS_ORG_ID, phone_number_id: (*phone).to_owned(), seq: 1 })
            .collect();
        sends::enqueue_jobs(&mut tx, &jobs, shards).await.context("failed to queue benchmark jobs")?;
        tx.commit().await?;
    }
    Ok(total)
}

#[derive(Debug, Serialize)]
pub struct NumberFigures {
    pub phone_number_id: String,
    pub mps: u32,
    pub accepted: u64,
    /// Accepted sends over the time from the first to the last, start-up and tail
    /// included.
    pub mean_rate: f64,
    /// Mean of the whole seconds between the first and the last, as the simulator
    /// counted them: the rate once sending runs.
    pub steady_rate: f64,
    /// The lowest of those seconds.
    pub min_second: u64,
    /// Steady rate as a share of the MPS.
    pub ratio: f64,
    pub peak_one_second: u64,
    pub rate_limited_130429: u64,
}

#[derive(Debug, Serialize)]
pub struct SendsReport {
    pub messages: u64,
    pub accepted: u64,
    pub elapsed_seconds: f64,
    /// Accepted sends per second over every number, first to last accepted send.
    pub aggregate_rate: f64,
    pub rate_limited_130429: u64,
    /// Numbers whose mean rate is within 2% of (and not above) their MPS.
    pub numbers_within_2_percent: usize,
    pub numbers: usize,
    pub worst_ratio: f64,
    pub best_ratio: f64,
    pub big_number: Option<NumberFigures>,
    /// The small numbers' figures, summarised: min, median and max steady rate.
    pub small_numbers_mean_rate: [f64; 3],
    pub small_numbers_max_peak: u64,
}

/// Waits until the simulator accepted `expected` sends (or `timeout` passed), then
/// summarises its counters.
pub async fn measure(sim_url: &Url, expected: u64, timeout: Duration) -> anyhow::Result<SendsReport> {
    let client = reqwest::Client::new();
    let stats_url = sim_url.join("sim/stats")?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let stats = loop {
        let stats: SimStats = client.get(stats_url.clone()).send().await?.json().await.context("invalid simulator stats")?;
        let accepted: u64 = stats.phone_numbers.values().map(|n| n.accepted).sum();
        if accepted >= expected || started.elapsed() >= timeout {
            if accepted < expected {
                eprintln!("timed out with {accepted} of {expected} sends accepted");
            }
            break stats;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("  {accepted} of {expected} sends accepted by the simulator");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut figures: Vec<NumberFigures> = stats
        .phone_numbers
        .iter()
        .filter(|(_, n)| n.accepted > 0)
        .map(|(id, n)| {
            let mean = n.mean_rate.unwrap_or(0.0);
            let (steady, min_second) = steady_rate(&n.accepted_per_second).unwrap_or((mean, 0));
            NumberFigures {
                phone_number_id: id.clone(),
                mps: n.mps,
                accepted: n.accepted,
                mean_rate: (mean * 10.0).round() / 10.0,
                steady_rate: (steady * 10.0).round() / 10.0,
                min_second,
                ratio: (steady / f64::from(n.mps) * 1000.0).round() / 1000.0,
                peak_one_second: n.peak_one_second,
                rate_limited_130429: n.rejected_rate_limit,
            }
        })
        .collect();
    let first = stats.phone_numbers.values().filter_map(|n| n.first_accepted_at).min();
    let last = stats.phone_numbers.values().filter_map(|n| n.last_accepted_at).max();
    let elapsed = match (first, last) {
        (Some(first), Some(last)) => (last - first).num_milliseconds() as f64 / 1000.0,
        _ => 0.0,
    };
    let accepted: u64 = figures.iter().map(|f| f.accepted).sum();
    let big_index = figures.iter().position(|f| f.phone_number_id == BIG_NUMBER_ID);
    let big_number = big_index.map(|index| figures.remove(index));
    let mut small_rates: Vec<f64> = figures.iter().map(|f| f.steady_rate).collect();
    small_rates.sort_by(f64::total_cmp);
    let all: Vec<&NumberFigures> = figures.iter().chain(big_number.as_ref()).collect();
    let within = all.iter().filter(|f| (0.98..=1.0).contains(&f.ratio)).count();
    Ok(SendsReport {
        messages: expected,
        accepted,
        elapsed_seconds: (elapsed * 10.0).round() / 10.0,
        aggregate_rate: if elapsed > 0.0 { (accepted as f64 / elapsed).round() } else { 0.0 },
        rate_limited_130429: all.iter().map(|f| f.rate_limited_130429).sum(),
        numbers_within_2_percent: within,
        numbers: all.len(),
        worst_ratio: all.iter().map(|f| f.ratio).fold(f64::INFINITY, f64::min),
        best_ratio: all.iter().map(|f| f.ratio).fold(0.0, f64::max),
        small_numbers_mean_rate: if small_rates.is_empty() {
            [0.0; 3]
        } else {
            [small_rates[0], small_rates[small_rates.len() / 2], small_rates[small_rates.len() - 1]]
        },
        small_numbers_max_peak: figures.iter().map(|f| f.peak_one_second).max().unwrap_or(0),
        big_number,
    })
}

/// Returns the mean and the minimum of the whole seconds between the first and the
/// last one (both partial), or `None` with fewer than three seconds.
pub fn steady_rate(per_second: &[u64]) -> Option<(f64, u64)> {
    if per_second.len() < 3 {
        return None;
    }
    let middle = &per_second[1..per_second.len() - 1];
    let mean = middle.iter().sum::<u64>() as f64 / middle.len() as f64;
    Some((mean, *middle.iter().min().expect("at least one second")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_skips_partial_seconds() {
        assert_eq!(steady_rate(&[10, 80, 78, 79, 5]), Some((79.0, 78)));
        assert_eq!(steady_rate(&[10, 80]), None);
    }
}
