//! Settings of `reach-dispatcher`, read once at start.

use std::time::Duration;

use anyhow::{Context, bail};
use reach_shared::outbox::PublisherSettings;
use reach_shared::secrets::SecretSealer;
use reach_shared::settings::{CommonSettings, Env};
use url::Url;

#[derive(Debug, Clone)]
pub struct DispatcherSettings {
    pub common: CommonSettings,
    /// Graph API base URL, without the version segment.
    pub graph_url: Url,
    /// Graph API version path segment, such as `v23.0`.
    pub api_version: String,
    /// Unseals the WABA access tokens.
    pub sealer: SecretSealer,
    /// Send shard queues; the same count as every publisher's.
    pub send_shards: u16,
    /// Unacknowledged jobs per shard queue. It must cover a number's rate times the
    /// Graph API latency, plus half a second claimed ahead and the time to record
    /// outcomes (about 1,500 at 1,000 MPS and 300 ms), and it bounds this process's
    /// memory.
    pub prefetch: u16,
    /// Graph API calls in flight at once, over every number.
    pub max_in_flight: usize,
    /// Timeout of one Graph API call.
    pub request_timeout: Duration,
    /// A lane holding more than this many seconds of sends at the number's rate moves
    /// new jobs to the database to wait, so one number's backlog does not hold a
    /// shard's prefetch window against the other numbers.
    pub lane_seconds: f64,
    /// Attempts after which a message failing with 5xx or network errors is parked.
    pub max_attempts: i32,
    /// First retry delay after a 5xx or network error; doubles up to `retry_max_delay`.
    pub retry_min_delay: Duration,
    pub retry_max_delay: Duration,
    /// Delay of one recipient after Meta's pair-rate error (131056).
    pub pair_rate_delay: Duration,
    /// How long an account-level error pauses a phone number.
    pub pause: Duration,
    /// How long a message whose last call may have reached Meta (timeout, connection
    /// lost after sending) waits for a status webhook to reveal its wamid before it is
    /// sent again.
    pub uncertain_grace: Duration,
    /// How often the phone numbers (rates, pauses, tokens) are read again.
    pub directory_refresh: Duration,
    /// How often due retries are queued again.
    pub sweep_interval: Duration,
    /// Run an outbox publisher in this process too, so `message.accepted` events and
    /// retries flow even without an ingress.
    pub run_publisher: bool,
    pub publisher: PublisherSettings,
}

impl DispatcherSettings {
    pub fn from_env(env: &Env) -> anyhow::Result<Self> {
        let common = CommonSettings::from_env(env, "127.0.0.1:9102")?;
        let graph_url: Url = env
            .string_or("REACH_META_GRAPH_URL", "https://graph.facebook.com")
            .parse()
            .context("invalid REACH_META_GRAPH_URL: expected an absolute URL such as https://graph.facebook.com")?;
        if !matches!(graph_url.scheme(), "http" | "https") {
            bail!("invalid REACH_META_GRAPH_URL: the scheme must be http or https");
        }
        let api_version = env.string_or("REACH_META_API_VERSION", "v23.0");
        let version_is_valid = api_version.strip_prefix('v').is_some_and(|rest| {
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit() || c == '.')
        });
        if !version_is_valid {
            bail!("invalid REACH_META_API_VERSION {api_version:?}: expected a version segment such as v23.0");
        }
        let sealer = SecretSealer::from_env(env, common.environment)?;
        let lane_seconds: f64 = env.parse_or("REACH_DISPATCHER_LANE_SECONDS", 10.0)?;
        if !(lane_seconds > 0.0) {
            bail!("REACH_DISPATCHER_LANE_SECONDS must be positive");
        }
        let publisher_defaults = PublisherSettings::default();
        Ok(Self {
            graph_url,
            api_version,
            sealer,
            send_shards: env.parse_or("REACH_SEND_SHARDS", 8)?,
            prefetch: env.parse_or("REACH_DISPATCHER_PREFETCH", 4000)?,
            max_in_flight: env.parse_or("REACH_DISPATCHER_MAX_IN_FLIGHT", 4000)?,
            request_timeout: env.millis_or("REACH_DISPATCHER_REQUEST_TIMEOUT_MS", 15_000)?,
            lane_seconds,
            max_attempts: env.parse_or("REACH_DISPATCHER_MAX_ATTEMPTS", 10)?,
            retry_min_delay: env.millis_or("REACH_DISPATCHER_RETRY_MIN_DELAY_MS", 1_000)?,
            retry_max_delay: env.millis_or("REACH_DISPATCHER_RETRY_MAX_DELAY_MS", 300_000)?,
            pair_rate_delay: env.millis_or("REACH_DISPATCHER_PAIR_RATE_DELAY_MS", 6_000)?,
            pause: env.millis_or("REACH_DISPATCHER_PAUSE_MS", 600_000)?,
            uncertain_grace: env.millis_or("REACH_DISPATCHER_UNCERTAIN_GRACE_MS", 60_000)?,
            directory_refresh: env.millis_or("REACH_DISPATCHER_DIRECTORY_REFRESH_MS", 2_000)?,
            sweep_interval: env.millis_or("REACH_DISPATCHER_SWEEP_INTERVAL_MS", 500)?,
            run_publisher: env.bool_or("REACH_DISPATCHER_RUN_PUBLISHER", true)?,
            publisher: PublisherSettings {
                workers: env.parse_or("REACH_OUTBOX_PUBLISHERS", publisher_defaults.workers)?,
                ..publisher_defaults
            },
            common,
        })
    }
}
