//! Per-number admission and counters: the sliding one-second MPS window, the pair-rate
//! memory of recent recipients, and the counters of `/sim/stats`. Each number has one
//! short mutex, and nothing awaits while holding it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::settings::SimNumber;
use crate::stats::NumberStats;

const WINDOW: Duration = Duration::from_secs(1);

/// The pair-rate memory is swept once it contains this many recipients, and after that
/// whenever it has doubled since the last sweep.
const MIN_PAIR_SWEEP_LEN: usize = 4_096;

/// Per-second counts are kept for at most this many seconds after the first accepted
/// send; later sends still count everywhere else.
const MAX_SECONDS_TRACKED: usize = 3_600;

/// Maximum initial window capacity, so a benchmark's `--mps-override` of millions grows
/// the window only as far as its traffic needs.
const MAX_INITIAL_WINDOW_CAPACITY: usize = 1_024;

/// A served phone number and its traffic state.
#[derive(Debug)]
pub struct NumberState {
    pub number: SimNumber,
    traffic: Mutex<Traffic>,
}

/// The verdict of the MPS, pair-rate and random-fault checks on one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    RateLimited,
    PairRateLimited,
    /// Rejected by the random fault of `--error-rate`.
    Fault,
}

/// A send rejected before the admission checks, counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyRejection {
    Auth,
    InvalidBody,
    Injected,
}

#[derive(Debug)]
struct Traffic {
    /// Arrival times of the sends accepted in the last second, oldest first.
    window: VecDeque<Instant>,
    /// Time of the last accepted send to each recipient (by digits).
    last_send_to: HashMap<String, Instant>,
    next_pair_sweep_len: usize,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: u64,
    rejected_rate_limit: u64,
    rejected_pair_rate: u64,
    injected_errors: u64,
    injected_failed_statuses: u64,
    random_faults: u64,
    invalid_requests: u64,
    auth_failures: u64,
    peak_one_second: u64,
    first_accepted: Option<(Instant, DateTime<Utc>)>,
    last_accepted: Option<(Instant, DateTime<Utc>)>,
    /// Accepted sends in each whole second since the first accepted send.
    per_second: Vec<u64>,
}

impl NumberState {
    pub fn new(number: SimNumber) -> Self {
        let traffic = Traffic {
            window: VecDeque::with_capacity((number.mps as usize).min(MAX_INITIAL_WINDOW_CAPACITY)),
            last_send_to: HashMap::new(),
            next_pair_sweep_len: MIN_PAIR_SWEEP_LEN,
            counters: Counters::default(),
        };
        Self { number, traffic: Mutex::new(traffic) }
    }

    /// Runs the MPS check, then the pair-rate check, then applies the random fault
    /// (`fault`, drawn by the caller). Only an accepted send enters the window and the
    /// pair memory. `pair_interval` zero disables the pair check, and `failed_status` counts
    /// an accepted send as bound for a `failed` status.
    pub fn admit(&self, to_digits: &str, pair_interval: Duration, fault: bool, failed_status: bool) -> Admission {
        let wall = Utc::now();
        let mut traffic = self.lock();
        // Taken under the lock, so the window stays in time order.
        let now = Instant::now();
        while traffic.window.front().is_some_and(|oldest| now.duration_since(*oldest) >= WINDOW) {
            traffic.window.pop_front();
        }
        if traffic.window.len() >= self.number.mps as usize {
            traffic.counters.rejected_rate_limit += 1;
            return Admission::RateLimited;
        }
        let pair_enabled = !pair_interval.is_zero();
        if pair_enabled
            && let Some(last) = traffic.last_send_to.get(to_digits)
            && now.duration_since(*last) < pair_interval
        {
            traffic.counters.rejected_pair_rate += 1;
            return Admission::PairRateLimited;
        }
        if fault {
            traffic.counters.random_faults += 1;
            return Admission::Fault;
        }

        traffic.window.push_back(now);
        if pair_enabled {
            traffic.remember_recipient(to_digits, now, pair_interval);
        }
        let counters = &mut traffic.counters;
        counters.accepted += 1;
        if failed_status {
            counters.injected_failed_statuses += 1;
        }
        let (first, _) = *counters.first_accepted.get_or_insert((now, wall));
        counters.last_accepted = Some((now, wall));
        let second = now.duration_since(first).as_secs() as usize;
        if second < MAX_SECONDS_TRACKED {
            if counters.per_second.len() <= second {
                counters.per_second.resize(second + 1, 0);
            }
            counters.per_second[second] += 1;
        }
        let in_window = traffic.window.len() as u64;
        traffic.counters.peak_one_second = traffic.counters.peak_one_second.max(in_window);
        Admission::Accepted
    }

    pub fn count_rejection(&self, rejection: EarlyRejection) {
        let mut traffic = self.lock();
        let counter = match rejection {
            EarlyRejection::Auth => &mut traffic.counters.auth_failures,
            EarlyRejection::InvalidBody => &mut traffic.counters.invalid_requests,
            EarlyRejection::Injected => &mut traffic.counters.injected_errors,
        };
        *counter += 1;
    }

    /// Clears the counters. The MPS window and the pair memory stay, so the limits hold
    /// across a reset.
    pub fn reset_counters(&self) {
        self.lock().counters = Counters::default();
    }

    pub fn stats(&self) -> NumberStats {
        let traffic = self.lock();
        let counters = &traffic.counters;
        let mean_rate = match (counters.first_accepted, counters.last_accepted) {
            (Some((first, _)), Some((last, _))) if counters.accepted >= 2 && last > first => {
                Some(counters.accepted as f64 / last.duration_since(first).as_secs_f64())
            }
            _ => None,
        };
        NumberStats {
            mps: self.number.mps,
            accepted: counters.accepted,
            rejected_rate_limit: counters.rejected_rate_limit,
            rejected_pair_rate: counters.rejected_pair_rate,
            injected_errors: counters.injected_errors,
            injected_failed_statuses: counters.injected_failed_statuses,
            random_faults: counters.random_faults,
            invalid_requests: counters.invalid_requests,
            auth_failures: counters.auth_failures,
            peak_one_second: counters.peak_one_second,
            mean_rate,
            first_accepted_at: counters.first_accepted.map(|(_, wall)| wall),
            last_accepted_at: counters.last_accepted.map(|(_, wall)| wall),
            accepted_per_second: counters.per_second.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Traffic> {
        // A panic while holding the lock leaves counters at worst slightly off.
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Traffic {
    fn remember_recipient(&mut self, to_digits: &str, now: Instant, pair_interval: Duration) {
        match self.last_send_to.get_mut(to_digits) {
            Some(last) => *last = now,
            None => {
                self.last_send_to.insert(to_digits.to_owned(), now);
            }
        }
        // Recipients older than the interval can no longer be rejected, so sweeping them
        // keeps the memory proportional to the recipients of one interval.
        if self.last_send_to.len() >= self.next_pair_sweep_len {
            self.last_send_to.retain(|_, last| now.duration_since(*last) < pair_interval);
            self.next_pair_sweep_len = (self.last_send_to.len() * 2).max(MIN_PAIR_SWEEP_LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(mps: u32) -> NumberState {
        NumberState::new(SimNumber {
            phone_number_id: "p1".to_owned(),
            waba_id: "w1".to_owned(),
            display_phone_number: "+1 555 000 1111".to_owned(),
            access_token: "token".into(),
            mps,
        })
    }

    #[test]
    fn admit_caps_window_at_mps() {
        let state = number(3);
        let verdicts: Vec<_> = (0..5).map(|i| state.admit(&i.to_string(), Duration::ZERO, false, false)).collect();
        assert_eq!(verdicts[..3], [Admission::Accepted; 3]);
        assert_eq!(verdicts[3..], [Admission::RateLimited; 2]);
        let stats = state.stats();
        assert_eq!(stats.accepted, 3);
        assert_eq!(stats.rejected_rate_limit, 2);
        assert_eq!(stats.peak_one_second, 3);
    }

    #[test]
    fn rejected_sends_leave_window_and_pair_memory() {
        let state = number(2);
        let interval = Duration::from_secs(60);
        assert_eq!(state.admit("1", interval, true, false), Admission::Fault);
        assert_eq!(state.admit("1", interval, false, false), Admission::Accepted);
        assert_eq!(state.admit("1", interval, false, false), Admission::PairRateLimited);
        assert_eq!(state.admit("2", interval, false, false), Admission::Accepted);
        assert_eq!(state.admit("3", interval, false, false), Admission::RateLimited);
        let stats = state.stats();
        assert_eq!(stats.random_faults, 1);
        assert_eq!(stats.rejected_pair_rate, 1);
        assert_eq!(stats.accepted, 2);
    }

    #[test]
    fn reset_keeps_the_window() {
        let state = number(1);
        assert_eq!(state.admit("1", Duration::ZERO, false, false), Admission::Accepted);
        state.reset_counters();
        assert_eq!(state.stats().accepted, 0);
        assert_eq!(state.admit("2", Duration::ZERO, false, false), Admission::RateLimited);
    }
}
