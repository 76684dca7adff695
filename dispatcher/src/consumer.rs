//! The send shard consumers: one channel per shard on one connection, each with its own
//! prefetch. The shards are single-active-consumer queues, so while this process is a
//! shard's active consumer no other dispatcher sends for its numbers; a standby
//! process takes over when this one disconnects. The reconnect loop is separate from
//! the handling of a delivery, which only parses the job and hands it to its lane.

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use futures::stream::SelectAll;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use reach_shared::amqp::{self, Topology};
use reach_shared::ops::Readiness;
use reach_shared::outbox::reconnect_policy;
use reach_shared::sends::SendJob;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::lanes::{Lanes, Work};

/// How long shutdown waits for the broker to confirm a cancel or a close.
pub const BROKER_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Consumer {
    pub amqp_url: SecretString,
    pub topology: Topology,
    pub prefetch: u16,
    pub lanes: Lanes,
    pub readiness: Readiness,
}

impl Consumer {
    /// Consumes until `shutdown` fires, reconnecting after any broker failure. Returns
    /// the open connection so the caller can close it after the lanes drained (their
    /// acknowledgements need it).
    pub async fn run(self, shutdown: CancellationToken) -> Option<lapin::Connection> {
        let mut delays = reconnect_policy();
        loop {
            match self.consume(&shutdown).await {
                Ok(connection) => return Some(connection),
                Err(error) => {
                    self.readiness.set_broker_up(false);
                    metrics::counter!("reach_dispatcher_consumer_restarts_total").increment(1);
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, "send consumer failed, reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn consume(&self, shutdown: &CancellationToken) -> anyhow::Result<lapin::Connection> {
        let connection = amqp::connect(&self.amqp_url, "reach-dispatcher").await?;
        let mut consumers = SelectAll::new();
        let mut channels = Vec::new();
        for shard in 0..self.topology.send_shards {
            let channel = connection.create_channel().await.context("failed to open a channel")?;
            if shard == 0 {
                self.topology.declare(&channel).await?;
            }
            // Per-consumer prefetch (global: false): each shard has its own window, so a
            // busy shard cannot starve the others.
            channel
                .basic_qos(self.prefetch, BasicQosOptions { global: false })
                .await
                .context("failed to set the prefetch")?;
            let options = BasicConsumeOptions {
                no_local: false,
                // Manual acknowledgements: a job is acked only once its outcome is stored.
                no_ack: false,
                // The queue's single-active-consumer setting elects one consumer; an
                // exclusive consumer would refuse the standby processes instead.
                exclusive: false,
                nowait: false,
            };
            let queue = self.topology.send_shard_queue(shard);
            let consumer = channel
                .basic_consume(queue.as_str().into(), format!("reach-dispatcher-{shard}").as_str().into(), options, FieldTable::default())
                .await
                .with_context(|| format!("failed to consume {queue}"))?;
            consumers.push(consumer);
            channels.push(channel);
        }
        self.readiness.set_broker_up(true);
        tracing::info!(shards = self.topology.send_shards, prefetch = self.prefetch, "send consumers started");

        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                next = consumers.next() => match next {
                    Some(Ok(delivery)) => self.handle(delivery).await,
                    Some(Err(error)) => break Err(anyhow::Error::new(error).context("a send consumer stopped")),
                    None => break Err(anyhow::anyhow!("the broker cancelled the send consumers")),
                },
            }
        };
        if let Err(error) = result {
            let _ = connection.close(320, "consumer failed".into()).await;
            return Err(error);
        }
        // Stop taking work; jobs in the lanes finish on this connection.
        for (channel, consumer) in channels.iter().zip(consumers.iter()) {
            let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions { nowait: false });
            if tokio::time::timeout(BROKER_REPLY_TIMEOUT, cancel).await.is_err() {
                tracing::warn!(timeout_ms = BROKER_REPLY_TIMEOUT.as_millis() as u64, "the broker did not confirm a consumer cancel in time");
            }
        }
        Ok(connection)
    }

    async fn handle(&self, delivery: lapin::message::Delivery) {
        metrics::counter!("reach_dispatcher_jobs_received_total").increment(1);
        match serde_json::from_slice::<SendJob>(&delivery.data) {
            Ok(job) => self.lanes.submit(Work { job, acker: delivery.acker, redelivered: delivery.redelivered }),
            Err(error) => {
                tracing::error!(%error, bytes = delivery.data.len(), "dead-lettering a message that is not a send job");
                metrics::counter!("reach_dispatcher_jobs_total", "outcome" => "dead_lettered").increment(1);
                let _ = delivery.acker.reject(BasicRejectOptions { requeue: false }).await;
            }
        }
    }
}
