//! Settings of `reach-ingress`, read once at start.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use reach_shared::auth::TokenVerifier;
use reach_shared::outbox::PublisherSettings;
use reach_shared::secrets::SecretSealer;
use reach_shared::settings::{CommonSettings, Env};
use secrecy::SecretString;

use crate::store::StoreSettings;

/// Meta sends bodies of up to 3 MB; 4 MiB leaves room.
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct IngressSettings {
    pub common: CommonSettings,
    /// Public listener: `/webhooks/*` and the customer API `/v1/*`.
    pub ingress_addr: SocketAddr,
    /// Operator listener: `/platform/*`.
    pub admin_addr: SocketAddr,
    /// Verifies customer and operator tokens.
    pub tokens: TokenVerifier,
    /// Seals webhook signing secrets created through the customer API.
    pub sealer: SecretSealer,
    /// Meta app secrets; a POST is authentic when it verifies against any of them.
    pub meta_app_secrets: Vec<SecretString>,
    /// Token Meta echoes in the GET subscription handshake.
    pub meta_verify_token: SecretString,
    /// Largest accepted body; larger ones get 413.
    pub body_limit_bytes: usize,
    pub store: StoreSettings,
    pub publisher: PublisherSettings,
    /// Send shard queues declared in the topology.
    pub send_shards: u16,
    /// Set false to run the ingress without an outbox publisher (another process
    /// publishes).
    pub run_publisher: bool,
}

impl IngressSettings {
    pub fn from_env(env: &Env) -> anyhow::Result<Self> {
        let common = CommonSettings::from_env(env, "127.0.0.1:9101")?;
        let ingress_addr = env
            .string_or("REACH_INGRESS_ADDR", "127.0.0.1:8080")
            .parse()
            .context("invalid REACH_INGRESS_ADDR: expected host:port")?;
        let admin_addr = env
            .string_or("REACH_ADMIN_ADDR", "127.0.0.1:8081")
            .parse()
            .context("invalid REACH_ADMIN_ADDR: expected host:port")?;
        let tokens = TokenVerifier::from_env(env, common.environment)?;
        let sealer = SecretSealer::from_env(env, common.environment)?;
        let meta_app_secrets: Vec<SecretString> = env
            .required("REACH_META_APP_SECRETS")?
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| SecretString::from(s.to_owned()))
            .collect();
        if meta_app_secrets.is_empty() {
            bail!("REACH_META_APP_SECRETS has no secret: give one or more, comma-separated");
        }
        let meta_verify_token = env.required("REACH_META_VERIFY_TOKEN")?.into();
        let defaults = PublisherSettings::default();
        let publisher = PublisherSettings {
            batch_size: env.parse_or("REACH_OUTBOX_BATCH_SIZE", defaults.batch_size)?,
            workers: env.parse_or("REACH_OUTBOX_PUBLISHERS", defaults.workers)?,
            idle_poll: env.millis_or("REACH_OUTBOX_IDLE_POLL_MS", defaults.idle_poll.as_millis() as u64)?,
            max_attempts: env.parse_or("REACH_OUTBOX_MAX_ATTEMPTS", defaults.max_attempts)?,
            retention: Duration::from_secs(env.parse_or("REACH_OUTBOX_RETENTION_SECONDS", defaults.retention.as_secs())?),
        };
        Ok(Self {
            common,
            ingress_addr,
            admin_addr,
            tokens,
            sealer,
            meta_app_secrets,
            meta_verify_token,
            body_limit_bytes: env.parse_or("REACH_INGRESS_BODY_LIMIT_BYTES", DEFAULT_BODY_LIMIT_BYTES)?,
            store: StoreSettings {
                writers: env.parse_or("REACH_INGRESS_WRITERS", 4)?,
                max_batch: env.parse_or("REACH_INGRESS_MAX_BATCH", 64)?,
            },
            publisher,
            send_shards: env.parse_or("REACH_SEND_SHARDS", 8)?,
            run_publisher: env.bool_or("REACH_INGRESS_RUN_PUBLISHER", true)?,
        })
    }
}
