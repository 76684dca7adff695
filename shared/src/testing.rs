//! Helpers for integration tests: a fresh database and a unique RabbitMQ prefix per
//! test, against the real Postgres and RabbitMQ named by `TEST_DATABASE_URL` and
//! `TEST_AMQP_URL` (defaults: the local servers).

use anyhow::Context;
use secrecy::SecretString;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::amqp::Topology;
use crate::settings::Env;

/// Server URL of the Postgres that tests create their databases in.
pub fn server_url() -> String {
    Env::process().string_or("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432")
}

pub fn amqp_url() -> SecretString {
    Env::process().string_or("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f").into()
}

/// A migrated database of its own, dropped by [`TestDatabase::drop_database`].
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDatabase {
    pub async fn create() -> anyhow::Result<Self> {
        let name = format!("reach_test_{}", Uuid::new_v4().simple());
        let server = server_url();
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{server}/postgres"))
            .await
            .context("failed to connect to the test Postgres server")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await?;
        admin.close().await;
        let url = format!("{server}/{name}");
        let pool = PgPoolOptions::new().max_connections(8).connect(&url).await?;
        crate::db::migrate(&pool).await?;
        Ok(Self { name, url, pool })
    }

    /// Drops the database, closing every connection to it first.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        drop_database_named(&self.name).await
    }
}

/// Drops a test database by name, forcing its connections closed.
async fn drop_database_named(name: &str) -> anyhow::Result<()> {
    let admin = PgPoolOptions::new().max_connections(1).connect(&format!("{}/postgres", server_url())).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(())
}

/// Deletes a test's queues and drops its database from a `Drop` implementation, after
/// a test panicked. `Drop` cannot await and the test's runtime may be unwinding, so the
/// cleanup runs on a thread with a runtime of its own and fresh connections. Failures
/// are ignored: the test has already failed.
pub fn clean_up_after_panic(database_name: String, topology: Topology) {
    let cleanup = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a cleanup runtime");
        runtime.block_on(async move {
            let _ = delete_topology(&topology).await;
            let _ = drop_database_named(&database_name).await;
        });
    });
    let _ = cleanup.join();
}

/// A unique exchange and queue prefix, so tests running at once never share a queue.
pub fn unique_prefix() -> String {
    format!("test.{}", Uuid::new_v4().simple())
}

/// Declares the topology of `prefix` and returns it.
pub async fn declare_topology(prefix: &str, send_shards: u16) -> anyhow::Result<Topology> {
    let topology = Topology::new(prefix, send_shards);
    let connection = crate::amqp::connect(&amqp_url(), "reach-test-setup").await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(topology)
}

/// Deletes every queue and exchange of the topology.
pub async fn delete_topology(topology: &Topology) -> anyhow::Result<()> {
    let connection = crate::amqp::connect(&amqp_url(), "reach-test-teardown").await?;
    let channel = connection.create_channel().await?;
    topology.delete_all(&channel).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
