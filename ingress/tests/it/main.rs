//! Integration tests of `reach-ingress`: each test starts the real ingress on
//! 127.0.0.1 against the local Postgres and RabbitMQ, with a database and a queue
//! prefix of its own, so tests run in parallel without sharing state.

mod harness;

mod api_deliveries;
mod api_messages;
mod api_subscriptions;
mod body_limit;
mod duplicates;
mod group_commit;
mod handshake;
mod outbox;
mod parsing;
mod platform;
mod routing;
mod shutdown;
mod signatures;
mod statuses;
