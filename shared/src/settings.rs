//! Typed settings read from environment variables. This module is the only place that
//! reads the process environment; every service builds its own settings struct from
//! [`Env`] and [`CommonSettings`].

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::SecretString;

/// Deployment environment. Production refuses unsafe settings at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

impl FromStr for Environment {
    type Err = anyhow::Error;

    fn from_str(value: &str) -> anyhow::Result<Self> {
        match value {
            "development" => Ok(Self::Development),
            "production" => Ok(Self::Production),
            other => bail!("invalid REACH_ENV {other:?}: expected `development` or `production`"),
        }
    }
}

/// Reads variables from a source, which is the process environment in services and a
/// map in tests.
#[derive(Debug, Clone, Default)]
pub struct Env {
    overrides: std::collections::HashMap<String, String>,
    use_process_env: bool,
}

impl Env {
    /// Reads from the process environment.
    pub fn process() -> Self {
        Self { overrides: Default::default(), use_process_env: true }
    }

    /// Reads only from the given pairs; tests use this to avoid touching global state.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let overrides = pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        Self { overrides, use_process_env: false }
    }

    /// Returns the value of `name`, treating an empty value as unset.
    pub fn get(&self, name: &str) -> Option<String> {
        let value = match self.overrides.get(name) {
            Some(value) => Some(value.clone()),
            None if self.use_process_env => std::env::var(name).ok(),
            None => None,
        };
        value.filter(|v| !v.trim().is_empty())
    }

    pub fn string_or(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_owned())
    }

    pub fn required(&self, name: &str) -> anyhow::Result<String> {
        self.get(name).with_context(|| format!("missing required environment variable {name}"))
    }

    pub fn parse_or<T>(&self, name: &str, default: T) -> anyhow::Result<T>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid {name} {raw:?}: {e}")),
        }
    }

    /// Parses a duration given in milliseconds.
    pub fn millis_or(&self, name: &str, default_ms: u64) -> anyhow::Result<Duration> {
        Ok(Duration::from_millis(self.parse_or(name, default_ms)?))
    }

    pub fn bool_or(&self, name: &str, default: bool) -> anyhow::Result<bool> {
        match self.get(name).as_deref().map(str::trim) {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => bail!("invalid {name} {other:?}: expected true or false"),
        }
    }
}

/// Settings every service needs.
#[derive(Debug, Clone)]
pub struct CommonSettings {
    pub environment: Environment,
    pub database_url: SecretString,
    /// Upper bound of the Postgres pool of this process.
    pub database_max_connections: u32,
    pub amqp_url: SecretString,
    /// Prefix of every exchange and queue name; tests set a unique one each.
    pub amqp_prefix: String,
    /// `/metrics`, `/livez` and `/readyz` listener.
    pub metrics_addr: SocketAddr,
}

impl CommonSettings {
    /// Reads the common settings; `default_metrics_addr` differs per service.
    pub fn from_env(env: &Env, default_metrics_addr: &str) -> anyhow::Result<Self> {
        let environment = env.parse_or("REACH_ENV", Environment::Development)?;
        let database_url = env.string_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/reach");
        let amqp_url = env.string_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
        let metrics_addr = env
            .string_or("REACH_METRICS_ADDR", default_metrics_addr)
            .parse()
            .context("invalid REACH_METRICS_ADDR: expected host:port")?;
        Ok(Self {
            environment,
            database_url: database_url.into(),
            database_max_connections: env.parse_or("REACH_DATABASE_MAX_CONNECTIONS", 16)?,
            amqp_url: amqp_url.into(),
            amqp_prefix: env.string_or("REACH_AMQP_PREFIX", "reach"),
            metrics_addr,
        })
    }
}
