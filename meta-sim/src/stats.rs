//! The body of `GET /sim/stats`, and the process-wide counters behind its top-level
//! fields. Per-number counters live with each number's traffic state
//! ([`crate::traffic`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `GET /sim/stats`. Counters start at zero at start and at `POST /sim/reset`, except
/// `statuses_pending`, which is a level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    /// Per phone number id.
    pub phone_numbers: BTreeMap<String, NumberStats>,
    /// Sends to a phone number id the simulator does not serve, whatever their token.
    pub unknown_number_requests: u64,
    /// Status webhook POSTs that got a 2xx response, duplicates included.
    pub status_webhooks_posted: u64,
    /// Status webhook POST attempts that failed (non-2xx or no response), retried or not.
    pub status_webhooks_failed_attempts: u64,
    /// Statuses carried by POSTs that got a 2xx response, duplicates counted once.
    pub statuses_posted: u64,
    /// Statuses dropped: the pending queue was full, or every attempt of their POST failed.
    pub statuses_dropped: u64,
    /// Statuses scheduled or being posted now.
    pub statuses_pending: u64,
}

/// Counters of one phone number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumberStats {
    /// The enforced limit: accepted sends in any sliding one-second window.
    pub mps: u32,
    /// Sends accepted with 200 and a wamid.
    pub accepted: u64,
    /// Sends rejected with 130429 because the number's MPS was reached.
    pub rejected_rate_limit: u64,
    /// Sends rejected with 131056 because the recipient got a message within the pair
    /// interval.
    pub rejected_pair_rate: u64,
    /// Sends handled by an injection rule: an error, a plain 5xx or no response.
    pub injected_errors: u64,
    /// Accepted sends whose statuses end in `failed` by a `status_failed` rule.
    pub injected_failed_statuses: u64,
    /// Sends rejected with 500 (131000) by the random `--error-rate` fault.
    pub random_faults: u64,
    /// Sends rejected for their body (codes 100 and 131009).
    pub invalid_requests: u64,
    /// Sends rejected for a missing or wrong access token (code 190).
    pub auth_failures: u64,
    /// Maximum accepted sends seen in any sliding one-second window.
    pub peak_one_second: u64,
    /// `accepted` divided by the seconds between the first and the last accepted send;
    /// `null` with fewer than two accepted sends.
    pub mean_rate: Option<f64>,
    pub first_accepted_at: Option<DateTime<Utc>>,
    pub last_accepted_at: Option<DateTime<Utc>>,
    /// Accepted sends in each whole second since the first accepted send (the first
    /// hour at most); the last entry is the second in progress.
    #[serde(default)]
    pub accepted_per_second: Vec<u64>,
}

/// Process-wide counters, shared by the send handler and the status poster.
#[derive(Debug, Default)]
pub struct GlobalCounters {
    pub unknown_number_requests: AtomicU64,
    pub status_webhooks_posted: AtomicU64,
    pub status_webhooks_failed_attempts: AtomicU64,
    pub statuses_posted: AtomicU64,
    pub statuses_dropped: AtomicU64,
    /// Not reset: the statuses it counts are still pending.
    pub statuses_pending: AtomicUsize,
}

impl GlobalCounters {
    pub fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    /// Clears every counter except `statuses_pending`.
    pub fn reset(&self) {
        for counter in [
            &self.unknown_number_requests,
            &self.status_webhooks_posted,
            &self.status_webhooks_failed_attempts,
            &self.statuses_posted,
            &self.statuses_dropped,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// Fills the top-level fields of a stats body around `phone_numbers`.
    pub fn snapshot(&self, phone_numbers: BTreeMap<String, NumberStats>) -> SimStats {
        SimStats {
            phone_numbers,
            unknown_number_requests: self.unknown_number_requests.load(Ordering::Relaxed),
            status_webhooks_posted: self.status_webhooks_posted.load(Ordering::Relaxed),
            status_webhooks_failed_attempts: self.status_webhooks_failed_attempts.load(Ordering::Relaxed),
            statuses_posted: self.statuses_posted.load(Ordering::Relaxed),
            statuses_dropped: self.statuses_dropped.load(Ordering::Relaxed),
            statuses_pending: self.statuses_pending.load(Ordering::Relaxed) as u64,
        }
    }
}
