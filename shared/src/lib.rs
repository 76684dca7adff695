//! Library shared by every Reach Fleet service: typed settings, telemetry and the
//! operations listener, the Postgres pool and migrations, the RabbitMQ connection and
//! topology, the transactional outbox and its publisher, signing and sealed secrets.
//!
//! Layout:
//! - [`settings`]: environment variables into typed, validated settings.
//! - [`telemetry`], [`ops`]: JSON logs, the Prometheus recorder, `/metrics`, `/livez`, `/readyz`.
//! - [`audit`]: the append-only operator audit log.
//! - [`auth`]: verifying the identity provider's JWTs.
//! - [`batch`]: group commit, many callers' jobs handled in one transaction.
//! - [`db`]: pool and embedded migrations.
//! - [`amqp`]: connection and the one place where exchanges and queues are declared.
//! - [`outbox`]: writing outbox rows inside a business transaction, and the publisher.
//! - [`health`]: the operators' health figures.
//! - [`parked`]: listing and replaying parked deliveries.
//! - [`parked_messages`]: replaying parked outbound messages, resuming paused numbers.
//! - [`events`]: event types and the callback body customers receive.
//! - [`meta_wire`]: JSON in the byte form of Meta's webhooks, for simulators and load.
//! - [`signing`]: Meta's `X-Hub-Signature-256` and Standard Webhooks signatures.
//! - [`provision`]: applying a provisioning file (orgs, numbers, subscriptions).
//! - [`sends`]: send jobs, shard routing by phone number, outbound message states.
//! - [`secrets`]: sealing stored secrets (passthrough or AES-256-GCM).
//! - [`testing`]: a fresh database and unique queue names for integration tests.
//! - [`shutdown`]: the cancellation token fired by SIGTERM or Ctrl-C.

pub mod amqp;
pub mod audit;
pub mod auth;
pub mod batch;
pub mod db;
pub mod events;
pub mod health;
pub mod meta_wire;
pub mod ops;
pub mod provision;
pub mod outbox;
pub mod parked;
pub mod parked_messages;
pub mod secrets;
pub mod sends;
pub mod settings;
pub mod shutdown;
pub mod signing;
pub mod telemetry;
pub mod testing;
