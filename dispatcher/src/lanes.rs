//! Lanes: one per phone number with work in this process. A lane has two tasks:
//!
//! - the claimer records each job's attempt (in batches, through the store) up to half
//!   a second ahead of its send, so the database round trip never sits between the
//!   pacer and the Graph API call;
//! - the sender waits for the number's [`Pacer`], takes a global in-flight slot and
//!   starts the call, which then records its outcome and acknowledges the job.
//!
//! Because the send shards have a single active consumer, only one process runs the
//! lane of a number at a time, and the pacer's limit holds for the whole fleet.
//!
//! Everything that must wait (a retry, a paused number, a recipient over the pair
//! rate, a backlog longer than `lane_seconds`) leaves the queue. The message gets a
//! `next_attempt_at` in Postgres and the job is acknowledged. The sweeper queues the
//! message again when it is due, so the prefetch window only contains work that is
//! about to be sent.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder;
use chrono::{DateTime, Utc};
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use reach_shared::sends::SendJob;
use secrecy::SecretString;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::directory::{Directory, NumberInfo};
use crate::graph::{ErrorClass, GraphClient, SendResult, classify};
use crate::pacer::{Pacer, window_cap};
use crate::settings::DispatcherSettings;
use crate::store::{Claim, ClaimedMessage, Deferral, Failure, Operation, Pause, Reply, Store};

/// A job taken from a send shard, with the handle that settles it.
pub struct Work {
    pub job: SendJob,
    pub acker: Acker,
    /// The broker delivered the job before, to this or another dispatcher.
    pub redelivered: bool,
}

/// A claimed job, ready for the pacer.
struct Ready {
    work: Work,
    message: ClaimedMessage,
}

/// Throttled sends retry after one to two seconds.
const THROTTLE_RETRY: Duration = Duration::from_secs(1);
/// A lane without work for this long stops and frees its memory.
const LANE_IDLE: Duration = Duration::from_secs(60);
/// A job for a number the directory does not know yet waits this long.
const UNKNOWN_NUMBER_RETRY: Duration = Duration::from_secs(5);
/// Throttling and pair-rate errors park a message only after this many attempts
/// times `max_attempts`, because they do not mean the message is wrong.
const RATE_ATTEMPTS_FACTOR: i32 = 5;

/// The lanes of this process.
#[derive(Clone)]
pub struct Lanes {
    shared: Arc<Shared>,
}

struct Shared {
    settings: Arc<DispatcherSettings>,
    store: Store,
    graph: GraphClient,
    directory: Arc<Directory>,
    in_flight: Arc<Semaphore>,
    lanes: Mutex<HashMap<String, LaneHandle>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

struct LaneHandle {
    work: mpsc::UnboundedSender<Work>,
    lane: Arc<Lane>,
}

/// State shared by a lane's tasks and its sends.
struct Lane {
    phone_number_id: String,
    /// Jobs in the lane, from submission to acknowledgement.
    queued: AtomicUsize,
    /// Throttling errors so far; the sender slows its pacer when this grows.
    throttled: AtomicU64,
    /// Set by an account-level error, with the directory's mark at that moment, until
    /// a later refresh of the directory shows the pause (or an operator's resume).
    paused_until: Mutex<Option<(DateTime<Utc>, u64)>>,
    /// Recipients held back by Meta's pair rate, until the given instant.
    pair_holds: Mutex<HashMap<String, Instant>>,
    /// Start times of the calls of the last second, oldest first: the MPS cap applied
    /// again at the moment a call leaves, after any scheduling delay since the pacer let
    /// it go, so delays cannot bunch calls into one second.
    calls: Mutex<VecDeque<Instant>>,
}

impl Lane {
    /// Returns the end of the number's pause, if it is paused. `info` is the number's
    /// directory entry, read by the caller.
    fn paused_until(&self, directory: &Directory, info: Option<&NumberInfo>) -> Option<DateTime<Utc>> {
        let now = Utc::now();
        let mut local = self.paused_until.lock().expect("lane locks are never poisoned");
        if local.is_some_and(|(_, mark)| directory.is_newer_than(mark)) {
            // The directory has caught up: it shows the pause, or an operator's resume.
            *local = None;
        }
        let known = info.and_then(|info| info.paused_until);
        known.or(local.map(|(until, _)| until)).filter(|until| *until > now)
    }

    fn pair_hold(&self, recipient: &str) -> Option<Instant> {
        let mut holds = self.pair_holds.lock().expect("lane locks are never poisoned");
        let now = Instant::now();
        holds.retain(|_, until| *until > now);
        holds.get(recipient).copied()
    }

    fn done(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// Waits until a call fits under `cap` calls in the last second, and counts it.
    async fn admit_call(&self, cap: usize) {
        loop {
            let wait = {
                let mut calls = self.calls.lock().expect("lane locks are never poisoned");
                let now = Instant::now();
                while calls.front().is_some_and(|&start| now.duration_since(start) >= Duration::from_secs(1)) {
                    calls.pop_front();
                }
                if calls.len() < cap {
                    calls.push_back(now);
                    return;
                }
                *calls.front().expect("a full window is not empty") + Duration::from_secs(1) - now
            };
            metrics::counter!("reach_dispatcher_call_cap_waits_total").increment(1);
            tokio::time::sleep(wait).await;
        }
    }
}

impl Lanes {
    pub fn new(settings: Arc<DispatcherSettings>, store: Store, graph: GraphClient, directory: Arc<Directory>, shutdown: CancellationToken) -> Self {
        let in_flight = Arc::new(Semaphore::new(settings.max_in_flight.max(1)));
        Self {
            shared: Arc::new(Shared {
                settings,
                store,
                graph,
                directory,
                in_flight,
                lanes: Mutex::new(HashMap::new()),
                tracker: TaskTracker::new(),
                shutdown,
            }),
        }
    }

    /// Waits until every lane task and send has finished. Call after `shutdown`.
    pub async fn wait(&self) {
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
    }

    /// Hands a job to its number's lane, or moves it to the database when the lane
    /// already contains `lane_seconds` of sends.
    pub fn submit(&self, work: Work) {
        let shared = &self.shared;
        let Some(info) = shared.directory.get(&work.job.phone_number_id) else {
            let until = Utc::now() + UNKNOWN_NUMBER_RETRY;
            tracing::warn!(phone_number_id = %work.job.phone_number_id, "job for a phone number not in the directory yet, retrying later");
            let shared = shared.clone();
            shared.tracker.clone().spawn(async move { shared.defer_unclaimed(work, until).await });
            return;
        };
        let target_rate = f64::from(info.mps) * crate::pacer::RATE_FRACTION;
        let threshold = ((target_rate * shared.settings.lane_seconds) as usize).max(50);

        let mut lanes = shared.lanes.lock().expect("lane locks are never poisoned");
        let takeover = work.redelivered;
        let handle = lanes
            .entry(work.job.phone_number_id.clone())
            .or_insert_with(|| self.spawn_lane(&work.job.phone_number_id, target_rate, takeover));
        let queued = handle.lane.queued.load(Ordering::Acquire);
        if queued >= threshold {
            drop(lanes);
            // Back when the lane still has about half its length to send, so it never
            // runs dry while the job makes its way back through the sweeper.
            let drain_seconds = queued as f64 / target_rate.max(0.5);
            let wait = Duration::from_secs_f64((drain_seconds - shared.settings.lane_seconds / 2.0).max(0.5));
            metrics::counter!("reach_dispatcher_lane_overflows_total").increment(1);
            let shared = shared.clone();
            shared.tracker.clone().spawn(async move { shared.defer_unclaimed(work, Utc::now() + wait).await });
            return;
        }
        handle.lane.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(returned) = handle.work.send(work) {
            // The lane stopped (shutdown): the job goes back to its queue.
            handle.lane.done();
            let work = returned.0;
            shared.tracker.spawn(async move { requeue(&work.acker).await });
        }
    }

    /// Starts a number's lane. `takeover` is true when its first job was delivered
    /// before, so another dispatcher (or an earlier lane here) may have sent for the
    /// number within the last second.
    fn spawn_lane(&self, phone_number_id: &str, target_rate: f64, takeover: bool) -> LaneHandle {
        let lane = Arc::new(Lane {
            phone_number_id: phone_number_id.to_owned(),
            queued: AtomicUsize::new(0),
            throttled: AtomicU64::new(0),
            paused_until: Mutex::new(None),
            pair_holds: Mutex::new(HashMap::new()),
            calls: Mutex::new(VecDeque::new()),
        });
        // Half a second of sends, claimed ahead of the pacer in batches of half that, so
        // the next claim overlaps the sending of the previous batch even when Postgres
        // is slow. A crash leaves at most this many claims to wait out the uncertain
        // grace before they are sent.
        let lookahead = ((target_rate * 0.5) as usize).clamp(16, 2048);
        let (work_sender, work_receiver) = mpsc::unbounded_channel();
        let (ready_sender, ready_receiver) = mpsc::channel(lookahead);
        let shared = self.shared.clone();
        let claimer_lane = lane.clone();
        shared.tracker.spawn(shared.clone().run_claimer(claimer_lane, work_receiver, ready_sender, lookahead));
        shared.tracker.spawn(shared.clone().run_sender(lane.clone(), ready_receiver, takeover));
        metrics::gauge!("reach_dispatcher_lanes").increment(1.0);
        tracing::debug!(phone_number_id = %phone_number_id, lookahead, "lane started");
        LaneHandle { work: work_sender, lane }
    }
}

impl Shared {
    async fn run_claimer(self: Arc<Self>, lane: Arc<Lane>, mut work: mpsc::UnboundedReceiver<Work>, ready: mpsc::Sender<Ready>, lookahead: usize) {
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                next = tokio::time::timeout(LANE_IDLE, work.recv()) => next,
            };
            let first = match next {
                Ok(Some(first)) => first,
                Ok(None) => break,
                Err(_) => {
                    // Idle: stop, unless a job arrived meanwhile.
                    let mut lanes = self.lanes.lock().expect("lane locks are never poisoned");
                    if lane.queued.load(Ordering::Acquire) == 0 {
                        lanes.remove(&lane.phone_number_id);
                        break;
                    }
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < (lookahead / 2).clamp(8, 256) {
                match work.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }

            let info = self.directory.get(&lane.phone_number_id);
            if lane.paused_until(&self.directory, info.as_deref()).is_some() {
                // Due at once in the database, where the sweeper keeps it while the
                // number is paused and queues it the moment the pause ends or an
                // operator resumes the number.
                for item in batch {
                    self.defer_unclaimed(item, Utc::now()).await;
                    lane.done();
                }
                continue;
            }

            let grace = self.settings.uncertain_grace;
            let claims = futures::future::join_all(batch.iter().map(|item| self.store.run(Operation::Claim { job: item.job.clone(), grace }))).await;
            for (item, claim) in batch.into_iter().zip(claims) {
                match claim {
                    Ok(Reply::Claim(Claim::Claimed(message))) => {
                        if let Some(until) = lane.pair_hold(&message.recipient) {
                            let until = Utc::now() + until.saturating_duration_since(Instant::now());
                            self.release(item, until).await;
                            lane.done();
                            continue;
                        }
                        if let Err(returned) = ready.send(Ready { work: item, message }).await {
                            let Ready { work, .. } = returned.0;
                            self.release(work, Utc::now()).await;
                            lane.done();
                        }
                    }
                    Ok(Reply::Claim(Claim::Wait(until))) => {
                        metrics::counter!("reach_dispatcher_jobs_total", "outcome" => "waiting_for_status").increment(1);
                        let deferral = Deferral { job: item.job.clone(), until, error_code: None, error_title: None, uncertain: true, undo_claim: false };
                        self.settle(&item.acker, self.store.run(Operation::Defer(deferral)).await.is_ok()).await;
                        lane.done();
                    }
                    Ok(_) => {
                        // Stale job, or the message was sent or failed already.
                        metrics::counter!("reach_dispatcher_jobs_total", "outcome" => "skipped").increment(1);
                        ack(&item.acker).await;
                        lane.done();
                    }
                    Err(error) => {
                        tracing::warn!(%error, message_id = %item.job.message_id, "failed to claim a message, returning it to the queue");
                        requeue(&item.acker).await;
                        lane.done();
                    }
                }
            }
        }
        // Stopping: jobs not yet claimed go back to the queue untouched.
        work.close();
        while let Ok(item) = work.try_recv() {
            requeue(&item.acker).await;
            lane.done();
        }
        metrics::gauge!("reach_dispatcher_lanes").decrement(1.0);
    }

    async fn run_sender(self: Arc<Self>, lane: Arc<Lane>, mut ready: mpsc::Receiver<Ready>, takeover: bool) {
        if takeover {
            // The previous owner's sends of the last second are unknown here; waiting
            // one window keeps the number under its MPS across the handover.
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let initial_mps = self.directory.get(&lane.phone_number_id).map_or(1, |info| info.mps);
        let mut pacer = Pacer::new(initial_mps);
        let mut throttles_seen = 0;
        loop {
            let item = match ready.try_recv() {
                Ok(item) => item,
                Err(_) => {
                    // Nothing claimed yet: time spent here is rate the lane could not use.
                    let starved = Instant::now();
                    let item = tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        item = ready.recv() => match item {
                            Some(item) => item,
                            None => break,
                        },
                    };
                    metrics::histogram!("reach_dispatcher_claim_wait_seconds").record(starved.elapsed().as_secs_f64());
                    item
                }
            };
            let info = self.directory.get(&lane.phone_number_id);
            if let Some(info) = &info {
                if info.mps != pacer.mps() {
                    tracing::info!(phone_number_id = %lane.phone_number_id, from = pacer.mps(), to = info.mps, "phone number rate changed");
                    pacer.set_mps(info.mps);
                }
            }
            let throttles = lane.throttled.load(Ordering::Acquire);
            if throttles > throttles_seen {
                throttles_seen = throttles;
                pacer.throttled();
            }
            if lane.paused_until(&self.directory, info.as_deref()).is_some() {
                self.release(item.work, Utc::now()).await;
                lane.done();
                continue;
            }
            let Some(token) = info.and_then(|info| info.token.clone()) else {
                self.release(item.work, Utc::now() + UNKNOWN_NUMBER_RETRY).await;
                lane.done();
                continue;
            };

            let waiting = Instant::now();
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.release(item.work, Utc::now()).await;
                    lane.done();
                    break;
                }
                _ = pacer.acquire() => {}
            }
            metrics::histogram!("reach_dispatcher_mps_wait_seconds").record(waiting.elapsed().as_secs_f64());
            let permit = self.in_flight.clone().acquire_owned().await.expect("the in-flight semaphore is never closed");
            let shared = self.clone();
            let send_lane = lane.clone();
            let cap = window_cap(pacer.mps());
            self.tracker.spawn(async move {
                send_lane.admit_call(cap).await;
                shared.send(&send_lane, item, token).await;
                drop(permit);
            });
        }
        // Stopping: claimed jobs not sent yet are released for the sweeper.
        ready.close();
        while let Ok(item) = ready.try_recv() {
            self.release(item.work, Utc::now()).await;
            lane.done();
        }
    }

    /// Makes one Graph API call and records what it means.
    async fn send(&self, lane: &Lane, item: Ready, token: SecretString) {
        let Ready { work, message } = item;
        let mut body = message.request.clone();
        body["biz_opaque_callback_data"] = serde_json::Value::String(message.id.to_string());
        let started = Instant::now();
        let result = self.graph.send(&message.phone_number_id, &token, &body).await;
        metrics::histogram!("reach_dispatcher_send_duration_seconds").record(started.elapsed().as_secs_f64());

        let operation = self.decide(lane, &work.job, &message, result).await;
        let written = match operation {
            Some(operation) => self.store.run(operation).await.is_ok(),
            None => true,
        };
        self.settle(&work.acker, written).await;
        lane.done();
    }

    /// Turns a call's result into the operation to record.
    async fn decide(&self, lane: &Lane, job: &SendJob, message: &ClaimedMessage, result: SendResult) -> Option<Operation> {
        let settings = &self.settings;
        let now = Utc::now();
        let retry = |until: DateTime<Utc>, code: Option<i32>, title: Option<String>, uncertain: bool| {
            Operation::Defer(Deferral { job: job.clone(), until, error_code: code, error_title: title, uncertain, undo_claim: false })
        };
        let error = match result {
            SendResult::Accepted { wamid } => {
                metrics::counter!("reach_dispatcher_sends_total", "outcome" => "sent").increment(1);
                return Some(Operation::Accept { message: message.clone(), wamid });
            }
            SendResult::NotSent(reason) | SendResult::Uncertain(reason) if message.attempt_count >= settings.max_attempts => {
                metrics::counter!("reach_dispatcher_sends_total", "outcome" => "failed").increment(1);
                tracing::warn!(message_id = %message.id, attempts = message.attempt_count, reason, "parking a message: retries exhausted");
                return Some(Operation::Fail(Failure {
                    message: message.clone(),
                    error_code: 131000,
                    error_title: format!("retries exhausted: {reason}"),
                    reason: "retries_exhausted",
                    parked: true,
                }));
            }
            SendResult::NotSent(reason) => {
                metrics::counter!("reach_dispatcher_sends_total", "outcome" => "retried").increment(1);
                tracing::warn!(message_id = %message.id, reason, "graph API unreachable, retrying later");
                return Some(retry(now + self.backoff(message.attempt_count), None, Some(truncate(&reason)), false));
            }
            SendResult::Uncertain(reason) => {
                // Meta may have taken the send: wait for a status webhook to reveal
                // its wamid through biz_opaque_callback_data before sending again.
                metrics::counter!("reach_dispatcher_sends_total", "outcome" => "uncertain").increment(1);
                tracing::warn!(message_id = %message.id, reason, "graph API response lost, waiting for a status webhook before sending again");
                return Some(retry(now + settings.uncertain_grace, None, Some(truncate(&reason)), true));
            }
            SendResult::Rejected(error) => error,
        };

        let code = i32::try_from(error.code).unwrap_or(i32::MAX);
        let class = classify(error.code, error.http_status);
        let rate_limited = matches!(class, ErrorClass::Throttled | ErrorClass::PairRate);
        if rate_limited {
            let label = match error.code {
                130429 | 131056 | 80007 | 4 => error.code.to_string(),
                _ => "other".to_owned(),
            };
            metrics::counter!("reach_dispatcher_meta_throttled_total", "code" => label).increment(1);
        }
        let exhausted = match class {
            ErrorClass::Throttled | ErrorClass::PairRate => message.attempt_count >= settings.max_attempts * RATE_ATTEMPTS_FACTOR,
            ErrorClass::Transient => message.attempt_count >= settings.max_attempts,
            ErrorClass::Permanent | ErrorClass::Account => false,
        };
        if class == ErrorClass::Permanent || exhausted {
            let reason = if exhausted { "retries_exhausted" } else { "permanent_error" };
            metrics::counter!("reach_dispatcher_sends_total", "outcome" => "failed").increment(1);
            tracing::info!(message_id = %message.id, code, reason, "message failed");
            return Some(Operation::Fail(Failure { message: message.clone(), error_code: code, error_title: error.title, reason, parked: exhausted }));
        }
        match class {
            ErrorClass::Throttled => {
                metrics::counter!("reach_dispatcher_sends_total", "outcome" => "throttled").increment(1);
                lane.throttled.fetch_add(1, Ordering::AcqRel);
                let jitter = Duration::from_millis(rand::random_range(0..1000));
                Some(retry(now + THROTTLE_RETRY + jitter, Some(code), Some(error.title), false))
            }
            ErrorClass::PairRate => {
                metrics::counter!("reach_dispatcher_sends_total", "outcome" => "throttled").increment(1);
                let hold = Instant::now() + settings.pair_rate_delay;
                lane.pair_holds.lock().expect("lane locks are never poisoned").insert(message.recipient.clone(), hold);
                Some(retry(now + settings.pair_rate_delay, Some(code), Some(error.title), false))
            }
            ErrorClass::Transient => {
                metrics::counter!("reach_dispatcher_sends_total", "outcome" => "retried").increment(1);
                Some(retry(now + self.backoff(message.attempt_count), Some(code), Some(error.title), false))
            }
            ErrorClass::Account => {
                metrics::counter!("reach_dispatcher_sends_total", "outcome" => "paused").increment(1);
                let pause = Pause {
                    org_id: message.org_id,
                    phone_number_id: message.phone_number_id.clone(),
                    duration: settings.pause,
                    error_code: code,
                    error_title: error.title.clone(),
                };
                let until = match self.store.run(Operation::Pause(pause)).await {
                    Ok(Reply::Paused(until)) => until,
                    _ => now + settings.pause,
                };
                *lane.paused_until.lock().expect("lane locks are never poisoned") = Some((until, self.directory.mark()));
                tracing::warn!(phone_number_id = %message.phone_number_id, code, %until, "account-level error: sending paused for this phone number");
                // Not the message's fault: the attempt is taken back. The message is due
                // at once, and the sweeper keeps it waiting while the number is paused.
                Some(Operation::Defer(Deferral { job: job.clone(), until: now, error_code: Some(code), error_title: Some(error.title), uncertain: false, undo_claim: true }))
            }
            ErrorClass::Permanent => None,
        }
    }

    /// Computes the delay before attempt `attempts + 1` after a transient error:
    /// exponential from `retry_min_delay`, doubling, capped at `retry_max_delay`, with jitter.
    fn backoff(&self, attempts: i32) -> Duration {
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(self.settings.retry_min_delay)
            .with_max_delay(self.settings.retry_max_delay)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        delays.nth(attempts.max(1) as usize - 1).unwrap_or(self.settings.retry_max_delay)
    }

    /// Moves a job that was never claimed to the database until `until`, then
    /// acknowledges it.
    async fn defer_unclaimed(&self, work: Work, until: DateTime<Utc>) {
        let deferral = Deferral { job: work.job.clone(), until, error_code: None, error_title: None, uncertain: false, undo_claim: false };
        let written = self.store.run(Operation::Defer(deferral)).await.is_ok();
        self.settle(&work.acker, written).await;
    }

    /// Takes back the claim of a job that was not sent and moves it to the database
    /// until `until`.
    async fn release(&self, work: Work, until: DateTime<Utc>) {
        let deferral = Deferral { job: work.job.clone(), until, error_code: None, error_title: None, uncertain: false, undo_claim: true };
        let written = self.store.run(Operation::Defer(deferral)).await.is_ok();
        self.settle(&work.acker, written).await;
    }

    /// Acknowledges a job whose outcome was written, or returns it to the queue.
    async fn settle(&self, acker: &Acker, written: bool) {
        if written { ack(acker).await } else { requeue(acker).await }
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(300).collect()
}

async fn ack(acker: &Acker) {
    if let Err(error) = acker.ack(BasicAckOptions { multiple: false }).await {
        // The channel is gone; the broker redelivers the job, and the claim check
        // makes the redelivery harmless.
        tracing::debug!(%error, "failed to acknowledge a send job");
    }
}

async fn requeue(acker: &Acker) {
    if let Err(error) = acker.nack(BasicNackOptions { multiple: false, requeue: true }).await {
        tracing::debug!(%error, "failed to return a send job to its queue");
    }
}
