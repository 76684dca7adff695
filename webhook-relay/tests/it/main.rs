//! Integration tests of `reach-webhook-relay`: each test starts the real relay against
//! the local Postgres and RabbitMQ, with a database and a queue prefix of its own, and
//! real subscriber endpoints on 127.0.0.1 that record what they receive.

mod harness;
mod subscriber;

mod body_cap;
mod fanout;
mod gone;
mod isolation;
mod restart;
mod retries;
mod ssrf;
mod vectors;
