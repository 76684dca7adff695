//! RabbitMQ connection and topology. Every exchange and queue is declared here and only
//! here: redeclaring a queue with different arguments closes the channel, so one
//! definition keeps every process in agreement.
//!
//! Topology, with `{p}` the configured prefix:
//! - `{p}.events` (topic): business events, routing key = event type.
//!   - `{p}.events.relay` (quorum): the webhook relay's work queue, bound with `#`.
//! - `{p}.sends` (direct): outbound sends, routing key = shard number.
//!   - `{p}.sends.{n}` (quorum, single active consumer), n in 0..shards.
//! - `{p}.dlx` (direct): dead letters, routing key = the queue they died in.
//!   - `{p}.{queue}.dead` (quorum) for each queue above.

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::{ExposeSecret, SecretString};

/// A quorum queue dead-letters a message after this many redeliveries, so one poison
/// message cannot loop forever.
const DELIVERY_LIMIT: i32 = 20;

/// Names of every exchange and queue, derived from one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
    pub events_exchange: String,
    pub relay_queue: String,
    pub sends_exchange: String,
    pub send_shards: u16,
    pub dead_letter_exchange: String,
}

/// Logical destination of an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Event,
    Send,
}

impl Topic {
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Event => "event",
            Topic::Send => "send",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "event" => Some(Topic::Event),
            "send" => Some(Topic::Send),
            _ => None,
        }
    }
}

impl Topology {
    pub fn new(prefix: &str, send_shards: u16) -> Self {
        Self {
            prefix: prefix.to_owned(),
            events_exchange: format!("{prefix}.events"),
            relay_queue: format!("{prefix}.events.relay"),
            sends_exchange: format!("{prefix}.sends"),
            send_shards: send_shards.max(1),
            dead_letter_exchange: format!("{prefix}.dlx"),
        }
    }

    pub fn exchange_for(&self, topic: Topic) -> &str {
        match topic {
            Topic::Event => &self.events_exchange,
            Topic::Send => &self.sends_exchange,
        }
    }

    pub fn send_shard_queue(&self, shard: u16) -> String {
        format!("{}.sends.{shard}", self.prefix)
    }

    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dead")
    }

    /// Every work queue, without the dead-letter queues.
    pub fn work_queues(&self) -> Vec<String> {
        let mut queues = vec![self.relay_queue.clone()];
        queues.extend((0..self.send_shards).map(|shard| self.send_shard_queue(shard)));
        queues
    }

    /// Declares every exchange, queue and binding. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> anyhow::Result<()> {
        // Durable exchanges: they survive a broker restart like the queues bound to them.
        let durable_exchange = ExchangeDeclareOptions {
            passive: false,
            durable: true,
            auto_delete: false,
            internal: false,
            nowait: false,
        };
        channel
            .exchange_declare(self.events_exchange.as_str().into(), ExchangeKind::Topic, durable_exchange, FieldTable::default())
            .await
            .with_context(|| format!("failed to declare exchange {}", self.events_exchange))?;
        channel
            .exchange_declare(self.sends_exchange.as_str().into(), ExchangeKind::Direct, durable_exchange, FieldTable::default())
            .await
            .with_context(|| format!("failed to declare exchange {}", self.sends_exchange))?;
        channel
            .exchange_declare(
                self.dead_letter_exchange.as_str().into(),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("failed to declare exchange {}", self.dead_letter_exchange))?;

        self.declare_work_queue(channel, &self.relay_queue, false).await?;
        self.bind(channel, &self.relay_queue, &self.events_exchange, "#").await?;

        for shard in 0..self.send_shards {
            let queue = self.send_shard_queue(shard);
            // Single active consumer: one dispatcher owns a shard, and so the rate of
            // every phone number in it, at a time.
            self.declare_work_queue(channel, &queue, true).await?;
            self.bind(channel, &queue, &self.sends_exchange, &shard.to_string()).await?;
        }
        Ok(())
    }

    /// Deletes every exchange and queue of this prefix. Tests call it to clean up.
    pub async fn delete_all(&self, channel: &Channel) -> anyhow::Result<()> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        for queue in self.work_queues() {
            for name in [Self::dead_letter_queue(&queue), queue] {
                channel
                    .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .with_context(|| format!("failed to delete queue {name}"))?;
            }
        }
        for exchange in [&self.events_exchange, &self.sends_exchange, &self.dead_letter_exchange] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .with_context(|| format!("failed to delete exchange {exchange}"))?;
        }
        Ok(())
    }

    async fn declare_work_queue(&self, channel: &Channel, queue: &str, single_active_consumer: bool) -> anyhow::Result<()> {
        let durable_queue = QueueDeclareOptions {
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
        };

        let dead_letters = Self::dead_letter_queue(queue);
        let mut dead_arguments = FieldTable::default();
        dead_arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        channel
            .queue_declare(dead_letters.as_str().into(), durable_queue, dead_arguments)
            .await
            .with_context(|| format!("failed to declare queue {dead_letters}"))?;
        self.bind(channel, &dead_letters, &self.dead_letter_exchange, queue).await?;

        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_letter_exchange.as_str().into()));
        arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(queue.into()));
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongInt(DELIVERY_LIMIT));
        if single_active_consumer {
            arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        channel
            .queue_declare(queue.into(), durable_queue, arguments)
            .await
            .with_context(|| format!("failed to declare queue {queue}"))?;
        Ok(())
    }

    async fn bind(&self, channel: &Channel, queue: &str, exchange: &str, routing_key: &str) -> anyhow::Result<()> {
        channel
            .queue_bind(queue.into(), exchange.into(), routing_key.into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .with_context(|| format!("failed to bind queue {queue} to {exchange}"))?;
        Ok(())
    }
}

/// Opens a connection named after the service, so the broker's management UI shows who
/// is connected.
pub async fn connect(url: &SecretString, connection_name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    Connection::connect(url.expose_secret(), properties)
        .await
        .context("failed to connect to RabbitMQ at AMQP_URL")
}
