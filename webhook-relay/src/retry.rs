//! The retry lane: claims due deliveries (failed attempts whose time has come,
//! deliveries handed over by busy subscriptions, and attempts left behind by a relay
//! that died) and tries them again, with its own concurrency limit so retries never
//! take the first attempts' capacity.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use reach_shared::events::{Event, EventType};
use sqlx::Row;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{InFlight, Relay};
use crate::records::Record;
use crate::sender::Verdict;

/// A delivery claimed for one attempt.
struct Claimed {
    delivery_id: i64,
    org_id: Uuid,
    event_id: Uuid,
    subscription_id: Uuid,
    attempt_count: i32,
}

impl Relay {
    pub(crate) async fn run_retry_lane(self: Arc<Self>, shutdown: CancellationToken) {
        let lane = Arc::new(Semaphore::new(self.settings.retry_in_flight.max(1)));
        let mut in_flight = JoinSet::new();
        loop {
            while in_flight.try_join_next().is_some() {}
            let free = lane.available_permits();
            if free == 0 {
                // Every slot of the lane is busy: go on as soon as one frees up rather than
                // after a whole sweep interval, so a large batch of due deliveries drains
                // at the lane's pace.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = lane.clone().acquire_owned() => drop(permit),
                }
                continue;
            }
            let claimed = self.clone().sweep(free, &lane, &mut in_flight).await;
            let full = matches!(claimed, Ok(n) if n == free && n > 0);
            if let Err(error) = claimed {
                tracing::warn!(%error, "failed to claim due deliveries");
            }
            if !full {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(self.settings.sweep_interval) => {}
                    // Deliveries handed over by busy subscriptions are due at once.
                    _ = self.retry_wake.notified() => {}
                }
            } else if shutdown.is_cancelled() {
                break;
            }
        }
        while in_flight.join_next().await.is_some() {}
    }

    /// Claims up to `limit` due deliveries and starts an attempt for each. Returns how
    /// many were claimed.
    async fn sweep(self: Arc<Self>, limit: usize, lane: &Arc<Semaphore>, in_flight: &mut JoinSet<()>) -> Result<usize, sqlx::Error> {
        let lease_seconds = self.settings.claim_lease.as_secs_f64();
        let rows = sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => $2), updated_at = now()
             WHERE id IN (
                 SELECT id FROM webhook_deliveries
                 WHERE status = 'pending' AND next_attempt_at <= now()
                 ORDER BY next_attempt_at
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED)
             RETURNING id, org_id, event_id, subscription_id, attempt_count",
        )
        .bind(limit as i64)
        .bind(lease_seconds)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let claimed: Vec<Claimed> = rows
            .iter()
            .map(|row| Claimed {
                delivery_id: row.get("id"),
                org_id: row.get("org_id"),
                event_id: row.get("event_id"),
                subscription_id: row.get("subscription_id"),
                attempt_count: row.get("attempt_count"),
            })
            .collect();
        let events = self.load_events(&claimed).await?;
        let count = claimed.len();
        metrics::counter!("reach_relay_retries_claimed_total").increment(count as u64);
        for claim in claimed {
            let permit = lane.clone().acquire_owned().await.expect("the lane semaphore is never closed");
            let relay = self.clone();
            let event = events.get(&claim.event_id).cloned();
            in_flight.spawn(async move {
                let record = relay.retry(claim, event).await;
                if relay.writer.commit(vec![record]).await.is_err() {
                    // The claim's lease runs out and another sweep takes it again.
                    tracing::warn!("failed to record a retry, it will be claimed again after the lease");
                }
                drop(permit);
            });
        }
        Ok(count)
    }

    async fn load_events(&self, claimed: &[Claimed]) -> Result<HashMap<Uuid, Arc<Event>>, sqlx::Error> {
        let ids: Vec<Uuid> = claimed.iter().map(|c| c.event_id).collect();
        let rows = sqlx::query("SELECT id, org_id, type, created_at, data FROM events WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        let mut events = HashMap::with_capacity(rows.len());
        for row in rows {
            let raw_type: String = row.get("type");
            let Some(event_type) = EventType::parse(&raw_type) else {
                tracing::error!(event_type = raw_type, "skipping an event of an unknown type");
                continue;
            };
            let event = Event {
                id: row.get("id"),
                event_type,
                created_at: row.get("created_at"),
                org_id: row.get("org_id"),
                data: row.get("data"),
            };
            events.insert(event.id, Arc::new(event));
        }
        Ok(events)
    }

    async fn retry(&self, claim: Claimed, event: Option<Arc<Event>>) -> Record {
        let Some(event) = event else {
            return Record::Park { delivery_id: claim.delivery_id, reason: "event not found".to_owned() };
        };
        let subscription = match self.subscriptions.get(claim.org_id, claim.subscription_id).await {
            Ok(Some(subscription)) => subscription,
            Ok(None) => {
                return Record::Park { delivery_id: claim.delivery_id, reason: "subscription deleted or disabled".to_owned() };
            }
            Err(error) => {
                tracing::warn!(%error, "failed to load a subscription for a retry");
                return Record::Reschedule { delivery_id: claim.delivery_id, at: Utc::now() + Duration::from_secs(5) };
            }
        };
        // The subscription's slots are shared with first attempts; when they are all
        // taken, the retry waits for a later sweep instead of piling on.
        let Ok(_slot) = subscription.lane.slots.clone().try_acquire_owned() else {
            return Record::Reschedule { delivery_id: claim.delivery_id, at: Utc::now() + Duration::from_secs(1) };
        };
        let body = event.to_body();
        let in_flight = InFlight::start("retry");
        let attempt = self.sender.send(&subscription, event.id, &body).await;
        drop(in_flight);
        subscription.lane.record(attempt.duration);
        let attempts = claim.attempt_count as usize + 1;
        let next = self.policy.next(attempt.verdict, attempts);
        self.observe(&attempt, &next, &event.header());
        if attempt.verdict == Verdict::Gone {
            self.subscriptions.disable(subscription.id);
        }
        Record::Retry { org_id: claim.org_id, delivery_id: claim.delivery_id, subscription_id: claim.subscription_id, attempt, next }
    }
}
