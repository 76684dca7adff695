//! `reach-loadgen`: writes the demo's provisioning file, runs the end-to-end demo
//! (Meta-signed traffic in, verified callbacks out), and sends load for benchmarks.
//!
//! Layout:
//! - [`provisioning`]: the demo org and subscriptions, written to and read from a file.
//! - [`generator`], [`meta_body`]: realistic webhook bodies in Meta's byte form (`reach_shared::meta_wire`).
//! - [`fixtures`]: the Meta fixtures and the events a body should produce.
//! - [`traffic`]: signed posts with bounded concurrency and an optional rate.
//! - [`subscriber`]: the verifying Standard Webhooks subscriber.
//! - [`expect`], [`stats`]: matching callbacks to expectations; percentiles.
//! - [`demo`], [`send`]: the demo and the ingress-only traffic command.
//! - [`bench`]: the end-to-end and relay-drain drivers of `scripts/bench`.

mod bench;
mod bench_sends;
mod demo;
mod expect;
mod fixtures;
mod generator;
mod meta_body;
mod outbound;
mod provisioning;
mod send;
mod stats;
mod subscriber;
mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use reach_shared::telemetry;
use serde::Serialize;
use url::Url;

use crate::generator::Shape;
use crate::traffic::{Pace, TrafficSettings};

#[derive(Parser)]
#[command(name = "reach-loadgen", version, about = "Traffic generator, verifying subscriber and benchmark driver for Reach Fleet")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the demo provisioning file (one org, two WABAs with a number each, two
    /// subscriptions pointing at the subscriber) with fresh secrets. Apply it with
    /// `reachctl provision --file`.
    Provision(ProvisionArgs),
    /// Run the end-to-end demo: serve the verifying subscriber, replay the fixtures,
    /// send generated webhooks, wait for the callbacks and print a JSON report as the
    /// last stdout line. Exits 1 when a webhook was rejected, a callback was lost or a
    /// signature failed.
    Demo(DemoArgs),
    /// Send generated webhooks only and print the ingress's throughput and response
    /// latency as a JSON line.
    Send(SendArgs),
    /// Write a benchmark provisioning file: one org with number 200000000000001 and
    /// --endpoints subscriptions to every event type, each with its own secret and
    /// subscriber path. Apply it with `reachctl provision --file`.
    BenchProvision(BenchProvisionArgs),
    /// Measure end to end: serve the verifying subscriber, send through the running
    /// ingress and relay, wait for every callback, and print a JSON line with the
    /// counts, the rates and the latency from each POST to each callback.
    BenchE2e(BenchE2eArgs),
    /// Serve the verifying subscriber of a provisioning file until --callbacks distinct
    /// callbacks arrived, and print a JSON line with the first and last arrival and the
    /// rate. Start the relay on a backlog after the subscriber returns 200 on GET /livez.
    Subscribe(SubscribeArgs),
    /// Send benchmark: write its provisioning file, seed messages, or measure what the
    /// simulator saw.
    #[command(subcommand)]
    BenchSends(BenchSendsCommand),
}

#[derive(Subcommand)]
enum BenchSendsCommand {
    /// Write the provisioning file: one number at --big-mps and --small-numbers at
    /// --small-mps, in one org without subscriptions.
    Provision {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 1000)]
        big_mps: u32,
        #[arg(long, default_value_t = 100)]
        small_numbers: usize,
        #[arg(long, default_value_t = 80)]
        small_mps: u32,
    },
    /// Insert --seconds of messages for every number of the benchmark org at its MPS,
    /// with their send jobs in the outbox. Prints the count.
    Seed {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        #[arg(long, default_value_t = 20.0, value_parser = parse_seconds)]
        seconds: f64,
        /// Send shard queues (REACH_SEND_SHARDS of the fleet).
        #[arg(long, env = "REACH_SEND_SHARDS", default_value_t = 8)]
        send_shards: u16,
        /// Messages per number instead of MPS × --seconds.
        #[arg(long)]
        per_number: Option<u64>,
    },
    /// Wait until the simulator accepted --messages sends, then print the figures.
    Measure {
        #[arg(long)]
        sim_url: Url,
        #[arg(long)]
        messages: u64,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
    },
}

#[derive(Args)]
struct ProvisionArgs {
    /// Path of the provisioning file to write (mode 0600: it contains the secrets).
    #[arg(long)]
    file: PathBuf,
    /// Loopback address of the verifying subscriber the subscriptions point at.
    #[arg(long, env = "REACH_LOADGEN_SUBSCRIBER_ADDR", default_value = "127.0.0.1:9200")]
    subscriber_addr: SocketAddr,
}

#[derive(Args)]
struct TrafficArgs {
    /// Base URL of the ingress.
    #[arg(long, env = "REACH_LOADGEN_INGRESS_URL", default_value = "http://127.0.0.1:8080")]
    ingress_url: Url,
    /// Meta app secret the webhooks are signed with; the ingress must list it in
    /// REACH_META_APP_SECRETS. Defaults to the fixtures' test secret.
    #[arg(long, env = "REACH_LOADGEN_META_APP_SECRET", default_value = fixtures::TEST_APP_SECRET, hide_env_values = true, hide_default_value = true)]
    meta_app_secret: String,
    /// Generated webhooks to send.
    #[arg(long, env = "REACH_LOADGEN_WEBHOOKS", default_value_t = 10_000)]
    webhooks: u64,
    /// Webhooks in flight at most.
    #[arg(long, env = "REACH_LOADGEN_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// Target webhooks per second; unset sends as fast as the concurrency allows.
    #[arg(long, env = "REACH_LOADGEN_RATE", value_parser = parse_rate)]
    rate: Option<f64>,
    /// Seed of the generated shapes and contents; random when unset.
    #[arg(long, env = "REACH_LOADGEN_SEED")]
    seed: Option<u64>,
    /// Seconds to wait for the ingress to respond to one webhook.
    #[arg(long, env = "REACH_LOADGEN_REQUEST_TIMEOUT_SECONDS", default_value_t = 30)]
    request_timeout_seconds: u64,
    /// Send for this many seconds instead of --webhooks: with --rate, rate × seconds
    /// webhooks; without, as many as start in that time.
    #[arg(long, env = "REACH_LOADGEN_DURATION_SECONDS", value_parser = parse_seconds)]
    duration_seconds: Option<f64>,
    /// Bodies to send: `mixed` (texts, media, replies, status batches) or `text` (one
    /// inbound text per body, 760 bytes, as the pgbench baseline stores).
    #[arg(long, env = "REACH_LOADGEN_SHAPE", value_enum, default_value_t = Shape::Mixed)]
    shape: Shape,
}

impl TrafficArgs {
    fn settings(self) -> TrafficSettings {
        TrafficSettings {
            ingress_url: self.ingress_url,
            app_secret: self.meta_app_secret.into(),
            webhooks: self.webhooks,
            duration: self.duration_seconds.map(Duration::from_secs_f64),
            pace: Pace { concurrency: self.concurrency as usize, rate: self.rate },
            seed: self.seed.unwrap_or_else(rand::random),
            shape: self.shape,
            request_timeout: Duration::from_secs(self.request_timeout_seconds),
        }
    }
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    traffic: TrafficArgs,
    /// Provisioning file from `reach-loadgen provision`, applied beforehand with
    /// `reachctl provision --file`. When the file does not exist, the demo writes it
    /// for --subscriber-addr and applies it itself.
    #[arg(long, env = "REACH_LOADGEN_PROVISIONING_FILE")]
    provisioning_file: PathBuf,
    /// Apply the existing provisioning file before sending.
    #[arg(long)]
    apply: bool,
    /// Subscriber address used only when the demo writes a new provisioning file.
    #[arg(long, env = "REACH_LOADGEN_SUBSCRIBER_ADDR", default_value = "127.0.0.1:9200")]
    subscriber_addr: SocketAddr,
    /// Postgres of the fleet: applying the file and counting parked deliveries.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/reach", hide_env_values = true)]
    database_url: String,
    /// Directory of the `*.wire.json` Meta fixtures replayed before the traffic.
    #[arg(long, env = "REACH_LOADGEN_FIXTURES_DIR", default_value = "fixtures/meta")]
    fixtures_dir: PathBuf,
    /// Seconds to wait for the expected callbacks after the response to the last webhook.
    #[arg(long, env = "REACH_LOADGEN_TIMEOUT_SECONDS", default_value_t = 120)]
    timeout_seconds: u64,
    /// Seconds to keep listening after the last expected callback, to count late
    /// duplicates.
    #[arg(long, env = "REACH_LOADGEN_SETTLE_SECONDS", default_value_t = 2)]
    settle_seconds: u64,
    #[command(flatten)]
    outbound: OutboundArgs,
}

#[derive(Args)]
struct OutboundArgs {
    /// Base URL of reach-meta-sim. When set, the demo also sends messages through the
    /// customer API after the inbound traffic and reports each number's rate as the
    /// simulator saw it.
    #[arg(long, env = "REACH_LOADGEN_SIM_URL")]
    sim_url: Option<Url>,
    /// Each phone number sends its MPS times this many seconds of messages.
    #[arg(long, env = "REACH_LOADGEN_OUTBOUND_SECONDS", default_value_t = 5.0, value_parser = parse_seconds)]
    outbound_seconds: f64,
    /// API requests in flight at most while posting messages.
    #[arg(long, env = "REACH_LOADGEN_OUTBOUND_CONCURRENCY", default_value_t = 64)]
    outbound_concurrency: usize,
    /// HS256 key the customer tokens are signed with; the ingress's REACH_HUB_JWT_SECRET.
    #[arg(long, env = "REACH_HUB_JWT_SECRET", default_value = "", hide_env_values = true, hide_default_value = true)]
    jwt_secret: String,
}

#[derive(Args)]
struct SendArgs {
    #[command(flatten)]
    traffic: TrafficArgs,
}

#[derive(Args)]
struct BenchProvisionArgs {
    /// Path of the provisioning file to write (mode 0600: it contains the secrets).
    #[arg(long)]
    file: PathBuf,
    /// Subscriptions, served at /hooks/bench-0, /hooks/bench-1, ...
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    endpoints: u32,
    /// Loopback address of the verifying subscriber the subscriptions point at.
    #[arg(long, env = "REACH_LOADGEN_SUBSCRIBER_ADDR", default_value = "127.0.0.1:9200")]
    subscriber_addr: SocketAddr,
}

#[derive(Args)]
struct BenchE2eArgs {
    #[command(flatten)]
    traffic: TrafficArgs,
    /// Benchmark provisioning file. When it does not exist, it is written with
    /// --endpoints subscriptions on --subscriber-addr and applied to DATABASE_URL.
    #[arg(long, env = "REACH_LOADGEN_PROVISIONING_FILE")]
    provisioning_file: PathBuf,
    /// Subscriptions of a new provisioning file.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    endpoints: u32,
    /// Subscriber address of a new provisioning file.
    #[arg(long, env = "REACH_LOADGEN_SUBSCRIBER_ADDR", default_value = "127.0.0.1:9200")]
    subscriber_addr: SocketAddr,
    /// Postgres of the fleet, for applying a new provisioning file.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/reach", hide_env_values = true)]
    database_url: String,
    /// Seconds to wait for the expected callbacks after the response to the last webhook.
    #[arg(long, env = "REACH_LOADGEN_TIMEOUT_SECONDS", default_value_t = 120)]
    timeout_seconds: u64,
    /// Seconds to keep listening after the last expected callback, to count late
    /// duplicates.
    #[arg(long, env = "REACH_LOADGEN_SETTLE_SECONDS", default_value_t = 1)]
    settle_seconds: u64,
    /// Seconds of unmeasured traffic at the same pace first, whose callbacks are awaited
    /// before the measured traffic starts.
    #[arg(long, value_parser = parse_seconds)]
    warmup_seconds: Option<f64>,
}

#[derive(Args)]
struct SubscribeArgs {
    /// Provisioning file whose subscriptions to serve (from `bench-provision` or
    /// `provision`).
    #[arg(long, env = "REACH_LOADGEN_PROVISIONING_FILE")]
    provisioning_file: PathBuf,
    /// Distinct callbacks (event and subscription) to wait for.
    #[arg(long)]
    callbacks: usize,
    /// Seconds to wait for them, from the start.
    #[arg(long, env = "REACH_LOADGEN_TIMEOUT_SECONDS", default_value_t = 120)]
    timeout_seconds: u64,
    /// Seconds to keep listening after the last expected callback, to count late
    /// duplicates.
    #[arg(long, env = "REACH_LOADGEN_SETTLE_SECONDS", default_value_t = 1)]
    settle_seconds: u64,
    /// Also write the JSON report to this file.
    #[arg(long)]
    report_file: Option<PathBuf>,
}

fn parse_seconds(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err(format!("invalid duration {raw:?}: expected seconds, a number above 0")),
    }
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("invalid rate {raw:?}: expected webhooks per second, a number above 0")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    telemetry::init_logs("reach-loadgen");
    match Cli::parse().command {
        Command::Provision(args) => {
            provisioning::write_demo_file(&args.file, args.subscriber_addr)?;
            eprintln!("wrote {}; apply it with: reachctl provision --file {}", args.file.display(), args.file.display());
        }
        Command::Demo(args) => {
            let outbound = args.outbound.sim_url.map(|sim_url| outbound::OutboundSettings {
                ingress_url: args.traffic.ingress_url.clone(),
                sim_url,
                jwt_secret: args.outbound.jwt_secret.into(),
                seconds: args.outbound.outbound_seconds,
                concurrency: args.outbound.outbound_concurrency,
                timeout: Duration::from_secs(args.timeout_seconds),
            });
            let settings = demo::DemoSettings {
                traffic: args.traffic.settings(),
                provisioning_file: args.provisioning_file,
                subscriber_addr: args.subscriber_addr,
                apply: args.apply,
                database_url: args.database_url.into(),
                fixtures_dir: args.fixtures_dir,
                timeout: Duration::from_secs(args.timeout_seconds),
                settle: Duration::from_secs(args.settle_seconds),
                outbound,
            };
            let report = demo::run(settings).await?;
            print_result_line(&report)?;
            if !report.passed() {
                eprintln!(
                    "demo failed: {} rejected webhooks, {} lost callbacks, {} signature failures, or outbound messages refused, failed or unread",
                    report.rejected, report.lost, report.signature_failures
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Send(args) => {
            let report = send::run(args.traffic.settings(), generator::demo_numbers()).await?;
            print_result_line(&report)?;
        }
        Command::BenchProvision(args) => {
            provisioning::write_bench_file(&args.file, args.subscriber_addr, args.endpoints as usize)?;
            eprintln!("wrote {}; apply it with: reachctl provision --file {}", args.file.display(), args.file.display());
        }
        Command::BenchE2e(args) => {
            let settings = bench::EndToEndSettings {
                traffic: args.traffic.settings(),
                provisioning: bench::BenchProvisioning {
                    file: args.provisioning_file,
                    endpoints: args.endpoints as usize,
                    subscriber_addr: args.subscriber_addr,
                    database_url: args.database_url.into(),
                },
                timeout: Duration::from_secs(args.timeout_seconds),
                settle: Duration::from_secs(args.settle_seconds),
                warmup: args.warmup_seconds.map(Duration::from_secs_f64),
            };
            let report = bench::end_to_end(settings).await?;
            print_result_line(&report)?;
        }
        Command::BenchSends(BenchSendsCommand::Provision { file, big_mps, small_numbers, small_mps }) => {
            bench_sends::write_provisioning(&file, big_mps, small_numbers, small_mps)?;
        }
        Command::BenchSends(BenchSendsCommand::Seed { database_url, seconds, send_shards, per_number }) => {
            let pool = reach_shared::db::connect(&database_url.into(), 2).await?;
            let count = bench_sends::seed(&pool, seconds, per_number, send_shards).await?;
            print_result_line(&serde_json::json!({"seeded": count}))?;
        }
        Command::BenchSends(BenchSendsCommand::Measure { sim_url, messages, timeout_seconds }) => {
            let report = bench_sends::measure(&sim_url, messages, Duration::from_secs(timeout_seconds)).await?;
            print_result_line(&report)?;
        }
        Command::Subscribe(args) => {
            let settings = bench::SubscribeSettings {
                provisioning_file: args.provisioning_file,
                callbacks: args.callbacks,
                timeout: Duration::from_secs(args.timeout_seconds),
                settle: Duration::from_secs(args.settle_seconds),
                report_file: args.report_file,
            };
            let report = bench::subscribe(settings).await?;
            print_result_line(&report)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the run's result as one JSON line on stdout; scripts read the last line.
#[allow(clippy::print_stdout)]
fn print_result_line<T: Serialize>(report: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}
