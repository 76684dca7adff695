//! Settings of the simulator: [`SimSettings`] for code and tests, and [`SimArgs`], the
//! command line (each option with an environment variable fallback) that builds them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use reach_shared::provision::ProvisioningFile;
use secrecy::{ExposeSecret, SecretString};

use crate::rules::Rule;

pub const DEFAULT_ADDR: &str = "127.0.0.1:9300";
pub const DEFAULT_LATENCY_MIN_MS: u64 = 100;
pub const DEFAULT_LATENCY_MAX_MS: u64 = 300;
pub const DEFAULT_PAIR_INTERVAL_MS: u64 = 6_000;
pub const DEFAULT_READ_RATIO: f64 = 1.0;
pub const DEFAULT_REORDER_RATIO: f64 = 0.1;
pub const DEFAULT_DUPLICATE_RATIO: f64 = 0.05;
pub const DEFAULT_STATUS_DELAY_MS: u64 = 200;
pub const DEFAULT_MAX_PENDING_STATUSES: usize = 1_000_000;
pub const DEFAULT_WEBHOOK_CONCURRENCY: usize = 64;
pub const DEFAULT_WEBHOOK_MAX_ATTEMPTS: usize = 10;

/// Everything a simulator run needs. [`SimSettings::new`] fills in the command line's
/// defaults. Change the public fields after it.
#[derive(Debug, Clone)]
pub struct SimSettings {
    /// Listen address. Port 0 picks a free port, which [`crate::start`] returns.
    pub addr: SocketAddr,
    /// The phone numbers served. Any other phone number id is unknown (code 100).
    pub numbers: Vec<SimNumber>,
    /// Destination of status webhooks, or `None` to send none.
    pub webhook: Option<WebhookTarget>,
    /// Each send's response is delayed by a uniformly random time in
    /// `latency_min..=latency_max`.
    pub latency_min: Duration,
    pub latency_max: Duration,
    /// A second accepted send from one number to one recipient within this interval is
    /// rejected with 131056. Zero disables the check.
    pub pair_interval: Duration,
    /// Fraction (0 to 1) of sends that pass every other check but are rejected with HTTP
    /// 500 and code 131000.
    pub error_rate: f64,
    /// Fraction of delivered messages that also get a `read` status.
    pub read_ratio: f64,
    /// Fraction of messages whose statuses are posted in a shuffled order. The
    /// timestamps inside the statuses keep the true order.
    pub reorder_ratio: f64,
    /// Fraction of status webhook bodies posted twice.
    pub duplicate_ratio: f64,
    /// Delay between a send's response and its first status, and between its later
    /// statuses.
    pub status_delay: Duration,
    /// Maximum statuses waiting to be posted. Statuses over it are dropped and counted.
    pub max_pending_statuses: usize,
    /// Status webhook POSTs in flight at once.
    pub webhook_concurrency: usize,
    /// Attempts of one status webhook POST, the first included, before its statuses are
    /// dropped.
    pub webhook_max_attempts: usize,
    /// Injection rules active at start, until `POST /sim/rules` replaces them.
    pub rules: Vec<Rule>,
}

/// A phone number the simulator serves.
#[derive(Debug, Clone)]
pub struct SimNumber {
    pub phone_number_id: String,
    pub waba_id: String,
    /// As in the provisioning file. Status webhooks carry its digits only.
    pub display_phone_number: String,
    /// The bearer token a send to this number must carry.
    pub access_token: SecretString,
    /// Accepted sends allowed in any sliding one-second window (at least 1).
    pub mps: u32,
}

/// The ingress endpoint that receives status webhooks, and the Meta app secret that
/// signs them.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    pub url: reqwest::Url,
    pub app_secret: SecretString,
}

impl SimSettings {
    /// Settings with the command line's defaults, serving `numbers` on `addr`, without
    /// status webhooks or rules.
    pub fn new(addr: SocketAddr, numbers: Vec<SimNumber>) -> Self {
        Self {
            addr,
            numbers,
            webhook: None,
            latency_min: Duration::from_millis(DEFAULT_LATENCY_MIN_MS),
            latency_max: Duration::from_millis(DEFAULT_LATENCY_MAX_MS),
            pair_interval: Duration::from_millis(DEFAULT_PAIR_INTERVAL_MS),
            error_rate: 0.0,
            read_ratio: DEFAULT_READ_RATIO,
            reorder_ratio: DEFAULT_REORDER_RATIO,
            duplicate_ratio: DEFAULT_DUPLICATE_RATIO,
            status_delay: Duration::from_millis(DEFAULT_STATUS_DELAY_MS),
            max_pending_statuses: DEFAULT_MAX_PENDING_STATUSES,
            webhook_concurrency: DEFAULT_WEBHOOK_CONCURRENCY,
            webhook_max_attempts: DEFAULT_WEBHOOK_MAX_ATTEMPTS,
            rules: Vec::new(),
        }
    }

    /// Settings with the defaults of [`SimSettings::new`], serving every phone number of
    /// a provisioning file.
    pub fn from_provisioning_file(addr: SocketAddr, path: &Path) -> anyhow::Result<Self> {
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the provisioning file {}", path.display()))?;
        let file =
            ProvisioningFile::parse(&json).with_context(|| format!("invalid provisioning file {}", path.display()))?;
        Ok(Self::new(addr, numbers_of(&file)))
    }

    /// Checks ranges and uniqueness. [`crate::start`] calls it.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.numbers.is_empty() {
            bail!("no phone numbers to serve: the provisioning file has none");
        }
        let mut ids = std::collections::HashSet::new();
        for number in &self.numbers {
            if !ids.insert(number.phone_number_id.as_str()) {
                bail!("phone number {} is listed twice", number.phone_number_id);
            }
            if number.mps == 0 {
                bail!("phone number {}: mps must be at least 1", number.phone_number_id);
            }
            if number.access_token.expose_secret().is_empty() {
                bail!("phone number {}: the access token is empty", number.phone_number_id);
            }
        }
        if self.latency_min > self.latency_max {
            bail!(
                "latency min {} ms exceeds latency max {} ms",
                self.latency_min.as_millis(),
                self.latency_max.as_millis()
            );
        }
        let ratios = [
            ("error rate", self.error_rate),
            ("read ratio", self.read_ratio),
            ("reorder ratio", self.reorder_ratio),
            ("duplicate ratio", self.duplicate_ratio),
        ];
        for (name, value) in ratios {
            if !(0.0..=1.0).contains(&value) {
                bail!("{name} {value} is outside 0 to 1");
            }
        }
        if self.max_pending_statuses == 0 || self.webhook_concurrency == 0 || self.webhook_max_attempts == 0 {
            bail!("max pending statuses, webhook concurrency and webhook max attempts must each be at least 1");
        }
        Ok(())
    }
}

/// Lists every phone number of a provisioning file with its WABA and access token.
fn numbers_of(file: &ProvisioningFile) -> Vec<SimNumber> {
    let mut numbers = Vec::new();
    for waba in file.orgs.iter().flat_map(|org| &org.wabas) {
        for number in &waba.phone_numbers {
            numbers.push(SimNumber {
                phone_number_id: number.phone_number_id.clone(),
                waba_id: waba.waba_id.clone(),
                display_phone_number: number.display_phone_number.clone(),
                access_token: waba.access_token.clone(),
                // The provisioning file rejects an mps below 1.
                mps: u32::try_from(number.mps).unwrap_or(1),
            });
        }
    }
    numbers
}

/// The command line of `reach-meta-sim`. Every option can also be set by the
/// environment variable named in `--help`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "reach-meta-sim",
    version,
    about = "Simulates Meta's WhatsApp Cloud API send endpoint (POST /{version}/{phone_number_id}/messages) \
             and posts signed status webhooks, for tests, the demo and benchmarks"
)]
pub struct SimArgs {
    /// Address to listen on (host:port). Port 0 picks a free port, which is logged.
    #[arg(long, env = "REACH_SIM_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,

    /// The fleet's provisioning file: the phone numbers served, with their access
    /// tokens, MPS, WABA ids and display numbers.
    #[arg(long, env = "REACH_SIM_PROVISIONING_FILE")]
    pub provisioning_file: PathBuf,

    /// Messages per second enforced on every number, replacing the file's values.
    #[arg(long, env = "REACH_SIM_MPS_OVERRIDE", value_parser = clap::value_parser!(u32).range(1..))]
    pub mps_override: Option<u32>,

    /// The ingress's `/webhooks/whatsapp` URL that receives status webhooks. Empty or
    /// absent sends none.
    #[arg(long, env = "REACH_SIM_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// Meta app secret that signs status webhooks (X-Hub-Signature-256). Required with
    /// --webhook-url.
    #[arg(long, env = "REACH_SIM_APP_SECRET", hide_env_values = true)]
    pub app_secret: Option<SecretString>,

    /// Minimum delay of each send's response, in milliseconds.
    #[arg(long, env = "REACH_SIM_LATENCY_MIN_MS", default_value_t = DEFAULT_LATENCY_MIN_MS)]
    pub latency_min_ms: u64,

    /// Maximum delay of each send's response, in milliseconds. The delay is uniform
    /// between the minimum and this.
    #[arg(long, env = "REACH_SIM_LATENCY_MAX_MS", default_value_t = DEFAULT_LATENCY_MAX_MS)]
    pub latency_max_ms: u64,

    /// Milliseconds within which a second send from one number to one recipient is
    /// rejected with error 131056. 0 disables the check.
    #[arg(long, env = "REACH_SIM_PAIR_INTERVAL_MS", default_value_t = DEFAULT_PAIR_INTERVAL_MS)]
    pub pair_interval_ms: u64,

    /// Fraction (0 to 1) of otherwise accepted sends rejected with HTTP 500 and error 131000.
    #[arg(long, env = "REACH_SIM_ERROR_RATE", default_value_t = 0.0)]
    pub error_rate: f64,

    /// Fraction (0 to 1) of delivered messages that also get a `read` status.
    #[arg(long, env = "REACH_SIM_READ_RATIO", default_value_t = DEFAULT_READ_RATIO)]
    pub read_ratio: f64,

    /// Fraction (0 to 1) of messages whose statuses are posted in a shuffled order.
    #[arg(long, env = "REACH_SIM_REORDER_RATIO", default_value_t = DEFAULT_REORDER_RATIO)]
    pub reorder_ratio: f64,

    /// Fraction (0 to 1) of status webhook bodies posted twice.
    #[arg(long, env = "REACH_SIM_DUPLICATE_RATIO", default_value_t = DEFAULT_DUPLICATE_RATIO)]
    pub duplicate_ratio: f64,

    /// Milliseconds from a send's response to its first status, and between its later
    /// statuses.
    #[arg(long, env = "REACH_SIM_STATUS_DELAY_MS", default_value_t = DEFAULT_STATUS_DELAY_MS)]
    pub status_delay_ms: u64,

    /// JSON file of injection rules active at start (`{"rules":[...]}`), until POST
    /// /sim/rules replaces them.
    #[arg(long, env = "REACH_SIM_RULES_FILE")]
    pub rules_file: Option<PathBuf>,

    /// Maximum statuses waiting to be posted. Statuses over it are dropped and counted in
    /// /sim/stats.
    #[arg(long, env = "REACH_SIM_MAX_PENDING_STATUSES", default_value_t = DEFAULT_MAX_PENDING_STATUSES)]
    pub max_pending_statuses: usize,

    /// Maximum status webhook POSTs in flight at once.
    #[arg(long, env = "REACH_SIM_WEBHOOK_CONCURRENCY", default_value_t = DEFAULT_WEBHOOK_CONCURRENCY)]
    pub webhook_concurrency: usize,

    /// Attempts of one status webhook POST, the first included, with exponential backoff
    /// between them, before its statuses are dropped.
    #[arg(long, env = "REACH_SIM_WEBHOOK_MAX_ATTEMPTS", default_value_t = DEFAULT_WEBHOOK_MAX_ATTEMPTS)]
    pub webhook_max_attempts: usize,
}

impl SimArgs {
    /// Reads the provisioning and rules files and builds validated settings.
    pub fn into_settings(self) -> anyhow::Result<SimSettings> {
        let mut settings = SimSettings::from_provisioning_file(self.addr, &self.provisioning_file)?;
        if let Some(mps) = self.mps_override {
            for number in &mut settings.numbers {
                number.mps = mps;
            }
        }

        settings.webhook = match self.webhook_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => {
                let url = reqwest::Url::parse(url).with_context(|| format!("invalid REACH_SIM_WEBHOOK_URL {url:?}"))?;
                if !matches!(url.scheme(), "http" | "https") {
                    bail!("REACH_SIM_WEBHOOK_URL {url} must start with http:// or https://");
                }
                let app_secret = self
                    .app_secret
                    .filter(|secret| !secret.expose_secret().is_empty())
                    .context("REACH_SIM_APP_SECRET (--app-secret) is required with REACH_SIM_WEBHOOK_URL: it signs the status webhooks")?;
                Some(WebhookTarget { url, app_secret })
            }
        };

        settings.latency_min = Duration::from_millis(self.latency_min_ms);
        settings.latency_max = Duration::from_millis(self.latency_max_ms);
        settings.pair_interval = Duration::from_millis(self.pair_interval_ms);
        settings.error_rate = self.error_rate;
        settings.read_ratio = self.read_ratio;
        settings.reorder_ratio = self.reorder_ratio;
        settings.duplicate_ratio = self.duplicate_ratio;
        settings.status_delay = Duration::from_millis(self.status_delay_ms);
        settings.max_pending_statuses = self.max_pending_statuses;
        settings.webhook_concurrency = self.webhook_concurrency;
        settings.webhook_max_attempts = self.webhook_max_attempts;

        if let Some(path) = &self.rules_file {
            let json =
                std::fs::read(path).with_context(|| format!("failed to read the rules file {}", path.display()))?;
            settings.rules =
                Rule::parse_list(&json).with_context(|| format!("invalid rules file {}", path.display()))?;
        }
        settings.validate()?;
        Ok(settings)
    }
}
