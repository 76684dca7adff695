//! Integration tests of `reach-dispatcher`: each test runs the real ingress, the real
//! Graph API simulator and the dispatcher on 127.0.0.1 against the local Postgres and
//! RabbitMQ, with a database and a queue prefix of its own.

mod harness;

mod errors;
mod exactly_once;
mod pacing;
mod sends;
