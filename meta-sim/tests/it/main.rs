//! Integration tests of `reach-meta-sim`: each test starts a real simulator on
//! 127.0.0.1 port 0 and talks to it over HTTP. Webhook tests add a receiver of their
//! own that verifies every signature.

mod harness;

mod auth;
mod cli;
mod limits;
mod rules;
mod sends;
mod webhooks;
