//! The send pacer of one phone number: a GCRA limiter (governor) at slightly under the
//! number's MPS, under a hard cap on the sends in any sliding one-second window.
//!
//! GCRA spaces sends evenly, and its small burst absorbs timer lateness, so the
//! achieved rate stays at the configured rate. The window cap makes the MPS a hard
//! limit whatever the burst: at start-up, after a rate change and after idle time
//! alike, no one-second window ever contains more than the cap. Only the lane's sender
//! task uses a pacer, so it needs no lock.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

/// GCRA rate as a fraction of the MPS: the sends' spacing leaves this much room.
pub const RATE_FRACTION: f64 = 0.985;
/// The hard cap per one-second window as a fraction of the MPS, rounded down. The gap
/// to the MPS absorbs the jitter between leaving this process and reaching Meta.
pub const WINDOW_CAP_FRACTION: f64 = 0.99;
/// How much a throttling error cuts the rate, and how fast it recovers: 5 % per error,
/// 2 % back per quiet second. A lone 130429 is often arrival jitter at Meta rather than
/// a rate too high, so one costs little; repeated ones add up fast.
const THROTTLE_FACTOR: f64 = 0.95;
const RECOVERY_FACTOR: f64 = 1.02;
const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(1);

type Limiter = RateLimiter<governor::state::NotKeyed, governor::state::InMemoryState, DefaultClock>;

pub struct Pacer {
    mps: u32,
    /// 1.0 normally; lowered by throttling errors, recovering over time.
    slowdown: f64,
    last_adjusted: Instant,
    limiter: Limiter,
    clock: DefaultClock,
    cap: usize,
    /// Start times of the sends in the last second, oldest first.
    window: VecDeque<Instant>,
}

impl Pacer {
    pub fn new(mps: u32) -> Self {
        let clock = DefaultClock::default();
        let mps = mps.max(1);
        Self {
            mps,
            slowdown: 1.0,
            last_adjusted: Instant::now(),
            limiter: build_limiter(mps, 1.0, &clock),
            clock,
            cap: window_cap(mps),
            window: VecDeque::with_capacity(window_cap(mps)),
        }
    }

    pub fn mps(&self) -> u32 {
        self.mps
    }

    /// Returns the rate the pacer currently aims at, in sends per second.
    pub fn target_rate(&self) -> f64 {
        f64::from(self.mps) * RATE_FRACTION * self.slowdown
    }

    /// Changes the MPS. The window keeps its history, so a lower rate takes effect
    /// without a burst over the new cap.
    pub fn set_mps(&mut self, mps: u32) {
        let mps = mps.max(1);
        if mps == self.mps {
            return;
        }
        self.mps = mps;
        self.cap = window_cap(mps);
        self.limiter = build_limiter(mps, self.slowdown, &self.clock);
    }

    /// Slows the number after Meta returned a throttling error.
    pub fn throttled(&mut self) {
        self.slowdown = (self.slowdown * THROTTLE_FACTOR).max(0.05);
        self.last_adjusted = Instant::now();
        self.limiter = build_limiter(self.mps, self.slowdown, &self.clock);
    }

    fn recover(&mut self, now: Instant) {
        if self.slowdown < 1.0 && now.duration_since(self.last_adjusted) >= RECOVERY_INTERVAL {
            self.slowdown = (self.slowdown * RECOVERY_FACTOR).min(1.0);
            self.last_adjusted = now;
            self.limiter = build_limiter(self.mps, self.slowdown, &self.clock);
        }
    }

    /// Waits until one more send is allowed and counts it.
    pub async fn acquire(&mut self) {
        loop {
            let now = Instant::now();
            self.recover(now);
            while self.window.front().is_some_and(|&start| now.duration_since(start) >= WINDOW) {
                self.window.pop_front();
            }
            if self.window.len() >= self.cap {
                let oldest = *self.window.front().expect("a full window is not empty");
                tokio::time::sleep_until(oldest + WINDOW).await;
                continue;
            }
            match self.limiter.check() {
                Ok(()) => {
                    self.window.push_back(now);
                    return;
                }
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Returns the maximum sends allowed in any one-second window.
pub fn window_cap(mps: u32) -> usize {
    ((f64::from(mps) * WINDOW_CAP_FRACTION).floor() as usize).max(1)
}

fn build_limiter(mps: u32, slowdown: f64, clock: &DefaultClock) -> Limiter {
    let rate = (f64::from(mps) * RATE_FRACTION * slowdown).max(0.5);
    let period = Duration::from_secs_f64(1.0 / rate);
    // A burst of about 10 ms of sends (at least 2) lets a send that woke late be
    // followed at once by the next, so timer lateness and scheduling delays do not lower
    // the rate. The window cap bounds what the burst could add.
    let burst = ((rate * 0.01).ceil() as u32).clamp(2, 32);
    let quota = Quota::with_period(period).expect("the period is positive").allow_burst(NonZeroU32::new(burst).expect("the burst is at least 2"));
    RateLimiter::direct_with_clock(quota, clock.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the maximum count of sends in any window of one second.
    fn max_in_any_second(starts: &[Instant]) -> usize {
        let mut max = 0;
        let mut first = 0;
        for (last, &start) in starts.iter().enumerate() {
            while start.duration_since(starts[first]) >= WINDOW {
                first += 1;
            }
            max = max.max(last - first + 1);
        }
        max
    }

    async fn run(pacer: &mut Pacer, duration: Duration) -> Vec<Instant> {
        let end = Instant::now() + duration;
        let mut starts = Vec::new();
        while Instant::now() < end {
            pacer.acquire().await;
            starts.push(Instant::now());
        }
        starts
    }

    #[tokio::test]
    async fn first_second_stays_under_mps() {
        for mps in [20, 80, 1000] {
            let mut pacer = Pacer::new(mps);
            let starts = run(&mut pacer, Duration::from_millis(2500)).await;
            let peak = max_in_any_second(&starts);
            assert!(peak <= window_cap(mps), "mps {mps}: {peak} sends in one second");
            let first_second = starts.iter().filter(|&&s| s.duration_since(starts[0]) < WINDOW).count();
            assert!(first_second <= window_cap(mps), "mps {mps}: {first_second} sends in the first second");
            let rate = starts.len() as f64 / starts.last().unwrap().duration_since(starts[0]).as_secs_f64();
            assert!(rate >= f64::from(mps) * 0.95, "mps {mps}: achieved only {rate:.1}/s");
        }
    }

    #[tokio::test]
    async fn lower_rate_applies_without_burst() {
        let mut pacer = Pacer::new(1000);
        let mut starts = run(&mut pacer, Duration::from_millis(600)).await;
        pacer.set_mps(80);
        let switched = Instant::now();
        starts.extend(run(&mut pacer, Duration::from_millis(1500)).await);
        let after: Vec<Instant> = starts.iter().copied().filter(|&s| s >= switched).collect();
        let recent_before = starts.iter().filter(|&&s| s < switched && switched.duration_since(s) < WINDOW).count();
        assert!(recent_before > 80, "the first phase should have sent fast, sent {recent_before}");
        // Nothing new starts until the last second's sends fall under the new cap.
        assert!(after[0].duration_since(switched) > Duration::from_millis(300), "sent {:?} after the switch", after[0].duration_since(switched));
        let peak_after = max_in_any_second(&after);
        assert!(peak_after <= window_cap(80), "{peak_after} sends in one second after lowering the rate");
    }

    #[tokio::test]
    async fn throttling_slows_then_recovers() {
        let mut pacer = Pacer::new(100);
        let before = pacer.target_rate();
        pacer.throttled();
        assert!(pacer.target_rate() < before, "a throttling error lowers the rate");
        let slowed = pacer.target_rate();
        pacer.recover(Instant::now());
        assert_eq!(pacer.target_rate(), slowed, "no recovery before the interval");
        pacer.last_adjusted = Instant::now() - RECOVERY_INTERVAL;
        pacer.recover(Instant::now());
        assert!(pacer.target_rate() > slowed);
        for _ in 0..10 {
            pacer.last_adjusted = Instant::now() - RECOVERY_INTERVAL;
            pacer.recover(Instant::now());
        }
        assert_eq!(pacer.target_rate(), before, "recovery stops at the full rate");
    }
}
