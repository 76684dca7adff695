//! Settings of `reach-webhook-relay`, read once at start.

use std::time::Duration;

use anyhow::{Context, bail};
use reach_shared::secrets::SecretSealer;
use reach_shared::settings::{CommonSettings, Env, Environment};

/// Default retry schedule: the delay before attempts 2, 3, ... after a failure. It spans
/// about 27.5 hours, so an endpoint that is down for a day still gets its callbacks.
pub const DEFAULT_RETRY_SCHEDULE_SECONDS: &[u64] = &[5, 300, 1800, 7200, 18000, 36000, 36000];

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub common: CommonSettings,
    pub sealer: SecretSealer,
    /// Allow subscriber URLs that resolve to loopback, private or other non-public
    /// addresses. Development and tests only; refused in production.
    pub allow_private_targets: bool,
    /// Maximum unacknowledged event messages of this process.
    pub prefetch: u16,
    /// HTTP requests in flight across every subscription.
    pub global_in_flight: usize,
    /// HTTP requests in flight to one subscription; a slow endpoint cannot take more.
    pub subscription_in_flight: usize,
    /// Maximum wait of a first attempt for a slot of its subscription, measured or
    /// estimated from the subscription's recent attempt durations; past it the delivery
    /// is handed to the retry lane, so a slow endpoint never blocks the queue.
    pub overflow_after: Duration,
    /// HTTP requests in flight in the retry lane.
    pub retry_in_flight: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Delay before each retry; the delivery is parked after the last one fails.
    pub retry_schedule: Vec<Duration>,
    /// Longest `Retry-After` honoured; longer values are capped to it.
    pub retry_after_max: Duration,
    /// How often the retry lane looks for due deliveries.
    pub sweep_interval: Duration,
    /// A claimed retry is invisible to other relays this long; a relay that dies
    /// mid-attempt leaves it to be picked up after the lease.
    pub claim_lease: Duration,
    /// How long subscriptions and their secrets are cached.
    pub subscription_cache_ttl: Duration,
    pub send_shards: u16,
}

impl RelaySettings {
    pub fn from_env(env: &Env) -> anyhow::Result<Self> {
        let common = CommonSettings::from_env(env, "127.0.0.1:9103")?;
        let sealer = SecretSealer::from_env(env, common.environment)?;
        let allow_private_targets = env.bool_or("REACH_RELAY_ALLOW_PRIVATE_TARGETS", false)?;
        if allow_private_targets && common.environment == Environment::Production {
            bail!("REACH_RELAY_ALLOW_PRIVATE_TARGETS=true is rejected in production: it lets subscriber URLs reach internal addresses");
        }
        let retry_schedule = match env.get("REACH_RELAY_RETRY_SCHEDULE_SECONDS") {
            None => DEFAULT_RETRY_SCHEDULE_SECONDS.iter().map(|s| Duration::from_secs(*s)).collect(),
            Some(raw) => parse_schedule(&raw)?,
        };
        let request_timeout = env.millis_or("REACH_RELAY_REQUEST_TIMEOUT_MS", 15_000)?;
        let claim_lease = env.millis_or("REACH_RELAY_CLAIM_LEASE_MS", 60_000)?;
        if claim_lease <= request_timeout {
            bail!("REACH_RELAY_CLAIM_LEASE_MS must exceed REACH_RELAY_REQUEST_TIMEOUT_MS, or a slow attempt could be claimed twice");
        }
        Ok(Self {
            sealer,
            allow_private_targets,
            prefetch: env.parse_or("REACH_RELAY_PREFETCH", 512)?,
            global_in_flight: env.parse_or("REACH_RELAY_GLOBAL_IN_FLIGHT", 512)?,
            subscription_in_flight: env.parse_or("REACH_RELAY_SUBSCRIPTION_IN_FLIGHT", 64)?,
            overflow_after: env.millis_or("REACH_RELAY_OVERFLOW_AFTER_MS", 1_000)?,
            retry_in_flight: env.parse_or("REACH_RELAY_RETRY_IN_FLIGHT", 128)?,
            connect_timeout: env.millis_or("REACH_RELAY_CONNECT_TIMEOUT_MS", 5_000)?,
            request_timeout,
            retry_schedule,
            retry_after_max: env.millis_or("REACH_RELAY_RETRY_AFTER_MAX_MS", 3_600_000)?,
            sweep_interval: env.millis_or("REACH_RELAY_SWEEP_INTERVAL_MS", 1_000)?,
            claim_lease,
            subscription_cache_ttl: env.millis_or("REACH_RELAY_SUBSCRIPTION_CACHE_MS", 5_000)?,
            send_shards: env.parse_or("REACH_SEND_SHARDS", 8)?,
            common,
        })
    }
}

/// Parses `5,300,1800` (seconds; fractions allowed, e.g. `0.2`).
fn parse_schedule(raw: &str) -> anyhow::Result<Vec<Duration>> {
    let schedule = raw
        .split(',')
        .map(str::trim)
        .map(|part| {
            part.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .with_context(|| format!("invalid REACH_RELAY_RETRY_SCHEDULE_SECONDS entry {part:?}: expected seconds"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(schedule)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_parses_fractions() {
        assert_eq!(parse_schedule("0.5, 2").unwrap(), vec![Duration::from_millis(500), Duration::from_secs(2)]);
        assert!(parse_schedule("1,x").is_err());
        assert!(parse_schedule("-1").is_err());
    }

    #[test]
    fn default_schedule_spans_a_day() {
        let total: u64 = DEFAULT_RETRY_SCHEDULE_SECONDS.iter().sum();
        assert!(total >= 24 * 3600, "the schedule spans {total} s");
    }

    #[test]
    fn private_targets_refused_in_production() {
        let env = Env::from_pairs([
            ("REACH_ENV", "production"),
            ("REACH_SECRETS_MODE", "local"),
            ("REACH_SECRETS_KEYS", "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            ("REACH_RELAY_ALLOW_PRIVATE_TARGETS", "true"),
        ]);
        assert!(RelaySettings::from_env(&env).is_err());
    }
}
