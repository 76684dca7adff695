//! The Postgres pool and the embedded migrations of `migrations/`.

use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;

/// Migrations compiled into every binary, so `reachctl migrate` needs no files.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Opens a pool; the first connection is made lazily so a service can start while
/// Postgres is still coming up.
pub fn connect_lazy(url: &SecretString, max_connections: u32) -> anyhow::Result<PgPool> {
    // Keeping a quarter of the pool open spares a burst the cost of opening connections
    // (authentication and backend start) on its first transactions.
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(max_connections / 4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(url.expose_secret())
        .context("invalid DATABASE_URL")
}

/// Opens a pool and checks that Postgres accepts a query.
pub async fn connect(url: &SecretString, max_connections: u32) -> anyhow::Result<PgPool> {
    let pool = connect_lazy(url, max_connections)?;
    sqlx::query("SELECT 1")
        .execute(&pool)
        .await
        .context("failed to connect to Postgres at DATABASE_URL")?;
    Ok(pool)
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("failed to apply migrations")
}

/// Returns true when the error is worth retrying: a lost connection, a pool timeout,
/// a serialization failure or a deadlock.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40001" | "40P01" | "57P01" | "57P03")),
        _ => false,
    }
}

/// The PostgreSQL notification channel that announces a change to an org's webhook
/// subscriptions or secrets; the payload is the org id. Relays drop that org from their
/// subscription cache when it arrives.
pub const SUBSCRIPTIONS_CHANGED_CHANNEL: &str = "reach_subscriptions_changed";

/// Announces a change to the org's subscriptions. PostgreSQL delivers the notification
/// when the transaction commits, and not at all when it rolls back.
pub async fn notify_subscriptions_changed(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, org_id: uuid::Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(SUBSCRIPTIONS_CHANGED_CHANNEL)
        .bind(org_id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}
