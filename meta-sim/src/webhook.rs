//! Posting status webhook bodies to the ingress: signed with `X-Hub-Signature-256`,
//! retried with jittered exponential backoff on a failed or non-2xx POST, and posted a
//! second time for the `duplicate_ratio` share of bodies.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use rand::Rng;
use reach_shared::signing::meta_signature;
use secrecy::ExposeSecret;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::settings::{SimSettings, WebhookTarget};
use crate::stats::GlobalCounters;

/// Time one POST may take, connection included, before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Backoff between attempts: from 100 ms, doubling, at most 5 s, with jitter. Ten
/// attempts span about 20 s.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Sends status webhook bodies to one URL with a bounded number in flight.
pub struct Poster {
    client: reqwest::Client,
    url: reqwest::Url,
    app_secret: secrecy::SecretString,
    duplicate_ratio: f64,
    max_attempts: usize,
    slots: Arc<Semaphore>,
    counters: Arc<GlobalCounters>,
    shutdown: CancellationToken,
}

/// Cause of a failed POST attempt.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("webhook endpoint responded HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("webhook POST failed: {}", error_chain(.0))]
    Transport(reqwest::Error),
}

impl Poster {
    pub fn new(
        settings: &SimSettings,
        target: &WebhookTarget,
        counters: Arc<GlobalCounters>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent("facebookexternalua")
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(settings.webhook_concurrency)
            .no_proxy()
            .build()
            .context("failed to build the status webhook HTTP client")?;
        Ok(Self {
            client,
            url: target.url.clone(),
            app_secret: target.app_secret.clone(),
            duplicate_ratio: settings.duplicate_ratio,
            max_attempts: settings.webhook_max_attempts,
            slots: Arc::new(Semaphore::new(settings.webhook_concurrency)),
            counters,
            shutdown,
        })
    }

    /// Waits for a free POST slot. Returns `None` when shutdown fires first.
    pub async fn acquire_slot(&self, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            () = shutdown.cancelled() => None,
            permit = self.slots.clone().acquire_owned() => permit.ok(),
        }
    }

    /// Posts `body`, which carries `statuses` statuses, until it is accepted or the
    /// attempts run out, then maybe once more as a duplicate. Releases the statuses
    /// from the pending count either way.
    pub async fn deliver(self: Arc<Self>, body: Bytes, statuses: usize, _slot: OwnedSemaphorePermit) {
        let signature = meta_signature(self.app_secret.expose_secret(), &body);
        let duplicate = rand::rng().random_bool(self.duplicate_ratio);
        let delivered = self.post_with_retries(&body, &signature).await;
        if delivered {
            GlobalCounters::add(&self.counters.statuses_posted, statuses as u64);
            if duplicate {
                self.post_with_retries(&body, &signature).await;
            }
        } else {
            GlobalCounters::add(&self.counters.statuses_dropped, statuses as u64);
        }
        self.counters.statuses_pending.fetch_sub(statuses, Ordering::Relaxed);
    }

    /// Returns whether a 2xx came back before the attempts ran out or shutdown fired.
    async fn post_with_retries(&self, body: &Bytes, signature: &str) -> bool {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(BACKOFF_MIN)
            .with_max_delay(BACKOFF_MAX)
            .with_max_times(self.max_attempts.saturating_sub(1))
            .with_jitter();
        let attempts = (|| self.post_once(body, signature)).retry(backoff).notify(|error, delay| {
            tracing::debug!(error = %error, retry_in_ms = delay.as_millis() as u64, "status webhook attempt failed, retrying");
        });
        let outcome = tokio::select! {
            () = self.shutdown.cancelled() => return false,
            outcome = attempts => outcome,
        };
        match outcome {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    error = %error,
                    attempts = self.max_attempts,
                    body_bytes = body.len(),
                    "status webhook dropped after its last attempt failed"
                );
                false
            }
        }
    }

    async fn post_once(&self, body: &Bytes, signature: &str) -> Result<(), AttemptError> {
        let sent = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Hub-Signature-256", signature)
            .body(body.clone())
            .send()
            .await;
        let outcome = match sent {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(AttemptError::Status(response.status())),
            Err(error) => Err(AttemptError::Transport(error)),
        };
        match &outcome {
            Ok(()) => GlobalCounters::add(&self.counters.status_webhooks_posted, 1),
            Err(_) => GlobalCounters::add(&self.counters.status_webhooks_failed_attempts, 1),
        }
        outcome
    }
}

/// Joins an error and its sources with `: `, since reqwest's own message leaves out the
/// cause (refused, reset, timed out).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
