//! The event consumer: takes events from the relay queue, fans each out to the matching
//! subscriptions, makes the first attempts, records them and acknowledges the message
//! after the commit. The reconnect loop is separate from [`Relay::process`], and the
//! ack, requeue or dead-letter decision is made in one place.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use reach_shared::amqp;
use reach_shared::events::EventHeader;
use reach_shared::outbox::reconnect_policy;
use sqlx::Row;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{InFlight, Relay};
use crate::records::{Next, Record};
use crate::sender::Verdict;
use crate::subscriptions::Subscription;

/// The decision for one event message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every delivery is recorded: acknowledge.
    Ack,
    /// Not handled this time (database down, shutting down): back to the queue.
    Requeue,
    /// The message can never be handled (not an event): to the dead-letter queue.
    DeadLetter,
}

impl Relay {
    /// Consumes until `shutdown` fires, reconnecting after any broker failure.
    pub(crate) async fn run_consumer(self: Arc<Self>, shutdown: CancellationToken) {
        let mut delays = reconnect_policy();
        while !shutdown.is_cancelled() {
            match self.clone().consume(&shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    self.readiness.set_broker_up(false);
                    metrics::counter!("reach_relay_consumer_restarts_total").increment(1);
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, "event consumer failed, reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn consume(self: Arc<Self>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let connection = amqp::connect(&self.settings.common.amqp_url, "reach-webhook-relay").await?;
        let channel = connection.create_channel().await.context("failed to open a channel")?;
        // Per-consumer prefetch (global: false): it bounds the unacknowledged events, and
        // so the memory and the redeliveries after a crash, of this process.
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions { global: false })
            .await
            .context("failed to set the prefetch")?;
        self.topology.declare(&channel).await?;
        let options = BasicConsumeOptions {
            no_local: false,
            // Manual acknowledgements: a message is acked only after its deliveries are recorded.
            no_ack: false,
            // Several relays share the queue.
            exclusive: false,
            nowait: false,
        };
        let mut consumer = channel
            .basic_consume(self.topology.relay_queue.as_str().into(), "".into(), options, FieldTable::default())
            .await
            .context("failed to start consuming the relay queue")?;
        self.readiness.set_broker_up(true);
        tracing::info!(queue = %self.topology.relay_queue, prefetch = self.settings.prefetch, "event consumer started");

        let mut in_flight = JoinSet::new();
        let result = loop {
            while in_flight.try_join_next().is_some() {}
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let relay = self.clone();
                        in_flight.spawn(async move { relay.handle(delivery).await });
                    }
                    Some(Err(error)) => break Err(anyhow::Error::new(error).context("the event consumer stopped")),
                    None => break Err(anyhow::anyhow!("the broker cancelled the event consumer")),
                },
            }
        };
        // Stop taking work, then let every message in hand finish and be acknowledged.
        let _ = channel.basic_cancel(consumer.tag(), lapin::options::BasicCancelOptions { nowait: false }).await;
        let waiting = in_flight.len();
        if waiting > 0 {
            tracing::info!(waiting, "waiting for events in flight");
        }
        while in_flight.join_next().await.is_some() {}
        let _ = connection.close(200, "shutdown".into()).await;
        result
    }

    async fn handle(self: Arc<Self>, delivery: Delivery) {
        metrics::counter!("reach_relay_events_consumed_total").increment(1);
        if delivery.redelivered {
            metrics::counter!("reach_relay_events_redelivered_total").increment(1);
        }
        let outcome = self.process(&delivery).await;
        let settled = match outcome {
            Outcome::Ack => delivery.acker.ack(BasicAckOptions { multiple: false }).await,
            Outcome::Requeue => delivery.acker.nack(BasicNackOptions { multiple: false, requeue: true }).await,
            Outcome::DeadLetter => delivery.acker.reject(BasicRejectOptions { requeue: false }).await,
        };
        if let Err(error) = settled {
            // The channel is gone; the broker redelivers the message to another consumer.
            tracing::warn!(%error, ?outcome, "failed to settle an event message");
        }
    }

    /// Fans one event message out and records every delivery.
    #[tracing::instrument(skip_all, fields(event_id))]
    pub async fn process(&self, delivery: &Delivery) -> Outcome {
        // Only the header is parsed: the body is forwarded as it is.
        let event: EventHeader = match serde_json::from_slice(&delivery.data) {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(%error, bytes = delivery.data.len(), "dead-lettering a message that is not an event");
                return Outcome::DeadLetter;
            }
        };
        tracing::Span::current().record("event_id", tracing::field::display(event.id));

        let mut subscriptions = match self.subscriptions.matching(event.org_id, event.event_type).await {
            Ok(subscriptions) => subscriptions,
            Err(error) => {
                tracing::warn!(%error, "failed to load subscriptions, requeueing the event");
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Outcome::Requeue;
            }
        };
        if delivery.redelivered && !subscriptions.is_empty() {
            // A redelivered message may have been handled before a crash: skip the pairs
            // already recorded; the retry lane owns them.
            match self.recorded_subscriptions(event.id).await {
                Ok(recorded) => subscriptions.retain(|s| !recorded.contains(&s.id)),
                Err(error) => {
                    tracing::warn!(%error, "failed to check earlier deliveries, requeueing the event");
                    return Outcome::Requeue;
                }
            }
        }
        if subscriptions.is_empty() {
            return Outcome::Ack;
        }

        // The message body is the callback body, byte for byte.
        let body = delivery.data.as_slice();
        let attempts = subscriptions.iter().map(|subscription| self.first_attempt(subscription, &event, body));
        let records = futures::future::join_all(attempts).await;
        match self.writer.commit(records).await {
            Ok(()) => Outcome::Ack,
            Err(_) => Outcome::Requeue,
        }
    }

    async fn first_attempt(&self, subscription: &Arc<Subscription>, event: &EventHeader, body: &[u8]) -> Record {
        // A subscription whose slots are taken is waited for only while the estimated
        // wait stays under the overflow limit. A slow endpoint makes the estimate large, so
        // its deliveries go to the retry lane at once and the queue keeps moving for
        // everyone else; a busy but fast one is waited for.
        let overflow_after = self.settings.overflow_after;
        let slot = if subscription.lane.estimated_wait() > overflow_after {
            None
        } else {
            subscription.lane.acquire(overflow_after).await
        };
        let Some(_slot) = slot else {
            metrics::counter!("reach_relay_deliveries_total", "outcome" => "overflowed").increment(1);
            self.retry_wake.notify_one();
            return Record::First {
                org_id: event.org_id,
                event_id: event.id,
                subscription_id: subscription.id,
                attempt: None,
                next: Next::Retry(Utc::now()),
            };
        };
        let _global = self.global_in_flight.acquire().await.expect("the global semaphore is never closed");
        let in_flight = InFlight::start("first");
        let attempt = self.sender.send(subscription, event.id, body).await;
        drop(in_flight);
        subscription.lane.record(attempt.duration);
        let next = self.policy.next(attempt.verdict, 1);
        self.observe(&attempt, &next, event);
        if attempt.verdict == Verdict::Gone {
            self.subscriptions.disable(subscription.id);
        }
        Record::First { org_id: event.org_id, event_id: event.id, subscription_id: subscription.id, attempt: Some(attempt), next }
    }

    async fn recorded_subscriptions(&self, event_id: Uuid) -> Result<HashSet<Uuid>, sqlx::Error> {
        let rows = sqlx::query("SELECT subscription_id FROM webhook_deliveries WHERE event_id = $1")
            .bind(event_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|row| row.get("subscription_id")).collect())
    }
}
