//! A relay per test: its own migrated database, its own RabbitMQ prefix, an outbox
//! publisher that moves the test's events into the broker the way production does,
//! and readers for the delivery tables.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reach_shared::amqp::{Topic, Topology};
use reach_shared::events::{Event, EventType, truncate_to_millis};
use reach_shared::ops::Readiness;
use reach_shared::outbox::{self, OutboxMessage, OutboxWaker, Publisher, PublisherSettings};
use reach_shared::provision::ProvisioningFile;
use reach_shared::secrets::SecretSealer;
use reach_shared::settings::Env;
use reach_shared::signing::WebhookSecret;
use reach_shared::testing::{self, TestDatabase};
use reach_webhook_relay::{RelaySettings, RunningRelay};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long a test waits for an asynchronous outcome before failing.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Settings every test relay gets unless a test overrides them: short retries, a fast
/// sweep, private targets allowed (subscribers listen on 127.0.0.1).
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("REACH_METRICS_ADDR", "127.0.0.1:0"),
    ("REACH_SEND_SHARDS", "1"),
    ("REACH_DATABASE_MAX_CONNECTIONS", "8"),
    ("REACH_RELAY_ALLOW_PRIVATE_TARGETS", "true"),
    ("REACH_RELAY_RETRY_SCHEDULE_SECONDS", "0.2,0.2,0.2"),
    ("REACH_RELAY_SWEEP_INTERVAL_MS", "50"),
    ("REACH_RELAY_CONNECT_TIMEOUT_MS", "1000"),
    ("REACH_RELAY_REQUEST_TIMEOUT_MS", "2000"),
    ("REACH_RELAY_CLAIM_LEASE_MS", "4000"),
];

/// One test's database, queues, outbox publisher and (usually) an in-process relay.
/// Call [`Harness::finish`] at the end of a test; when a test panics first, `Drop`
/// still drops the database and deletes the queues.
pub struct Harness {
    pub pool: PgPool,
    pub topology: Topology,
    pub prefix: String,
    waker: OutboxWaker,
    publisher_shutdown: CancellationToken,
    publisher: Option<JoinHandle<()>>,
    relay: Option<(CancellationToken, RunningRelay)>,
    database: Option<TestDatabase>,
}

impl Harness {
    /// Starts a relay with the base settings and `overrides`.
    pub async fn start(overrides: &[(&str, &str)]) -> Self {
        let mut harness = Self::without_relay().await;
        harness.start_relay(overrides).await;
        harness
    }

    /// Creates the database, the queues and the publisher, but no relay.
    pub async fn without_relay() -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            reach_shared::telemetry::init_logs("reach-webhook-relay-it");
        }
        let database = TestDatabase::create().await.expect("failed to create the test database");
        let prefix = testing::unique_prefix();
        // Declared before anything is published, so the relay queue keeps events that
        // are published before the relay starts.
        let topology = testing::declare_topology(&prefix, 1).await.expect("failed to declare the RabbitMQ topology");
        let waker = OutboxWaker::default();
        let publisher = Publisher {
            pool: database.pool.clone(),
            amqp_url: testing::amqp_url(),
            topology: topology.clone(),
            settings: PublisherSettings { workers: 1, idle_poll: Duration::from_millis(50), ..PublisherSettings::default() },
            waker: waker.clone(),
            readiness: Readiness::default(),
        };
        let publisher_shutdown = CancellationToken::new();
        let publisher = tokio::spawn(publisher.run(publisher_shutdown.clone()));
        Self {
            pool: database.pool.clone(),
            topology,
            prefix,
            waker,
            publisher_shutdown,
            publisher: Some(publisher),
            relay: None,
            database: Some(database),
        }
    }

    /// Returns the relay's environment: connection settings, the base settings, then `overrides`.
    pub fn relay_env(&self, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let database = self.database.as_ref().expect("the database exists until finish");
        let amqp_url = testing::amqp_url().expose_secret().to_owned();
        let mut pairs: Vec<(String, String)> = vec![
            ("DATABASE_URL".to_owned(), database.url.clone()),
            ("AMQP_URL".to_owned(), amqp_url),
            ("REACH_AMQP_PREFIX".to_owned(), self.prefix.clone()),
        ];
        for (name, value) in BASE_SETTINGS.iter().chain(overrides) {
            pairs.retain(|(k, _)| k != name);
            pairs.push((name.to_string(), value.to_string()));
        }
        pairs
    }

    /// Starts the real relay in this process.
    pub async fn start_relay(&mut self, overrides: &[(&str, &str)]) {
        assert!(self.relay.is_none(), "one in-process relay per harness");
        let settings = RelaySettings::from_env(&Env::from_pairs(self.relay_env(overrides))).expect("invalid relay settings");
        let shutdown = CancellationToken::new();
        let relay = reach_webhook_relay::start(settings, shutdown.clone()).await.expect("failed to start the relay");
        self.relay = Some((shutdown, relay));
    }

    /// Stops the relay and the publisher, deletes the queues and drops the database.
    /// Fails when the relay does not stop within [`DEADLINE`] of the shutdown signal.
    pub async fn finish(mut self) {
        let stopped = match self.relay.take() {
            Some((shutdown, relay)) => {
                shutdown.cancel();
                tokio::time::timeout(DEADLINE, relay.wait()).await.is_ok()
            }
            None => true,
        };
        self.publisher_shutdown.cancel();
        if let Some(publisher) = self.publisher.take() {
            let _ = tokio::time::timeout(DEADLINE, publisher).await;
        }
        testing::delete_topology(&self.topology).await.expect("failed to delete the RabbitMQ topology");
        let database = self.database.take().expect("finish runs once");
        database.drop_database().await.expect("failed to drop the test database");
        assert!(stopped, "the relay did not stop within {DEADLINE:?} of the shutdown signal");
    }

    pub async fn provision(&self, file: Value) {
        ProvisioningFile::parse(&file.to_string())
            .expect("invalid provisioning file")
            .apply(&self.pool, &SecretSealer::Passthrough)
            .await
            .expect("failed to apply the provisioning file");
    }

    /// Provisions an org with the given subscriptions and returns its id.
    pub async fn provision_org(&self, subscriptions: &[&Sub]) -> Uuid {
        let org_id = Uuid::new_v4();
        self.provision(org_file(org_id, subscriptions)).await;
        org_id
    }

    /// Writes the events and their outbox rows in one transaction, as the ingress does,
    /// and wakes the publisher.
    pub async fn publish(&self, events: &[Event]) {
        let messages: Vec<OutboxMessage> = events.iter().map(outbox_message).collect();
        self.insert_events(events, &messages).await;
    }

    /// Like [`Harness::publish`], but every event goes out `copies` times with the same
    /// message id, as after a publisher retry.
    pub async fn publish_copies(&self, events: &[Event], copies: usize) {
        let messages: Vec<OutboxMessage> = events.iter().flat_map(|e| std::iter::repeat_n(outbox_message(e), copies)).collect();
        self.insert_events(events, &messages).await;
    }

    async fn insert_events(&self, events: &[Event], messages: &[OutboxMessage]) {
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let org_ids: Vec<Uuid> = events.iter().map(|e| e.org_id).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let dedup_keys: Vec<String> = events.iter().map(|e| format!("test:{}", e.id)).collect();
        let data: Vec<String> = events.iter().map(|e| e.data.to_string()).collect();
        let created: Vec<DateTime<Utc>> = events.iter().map(|e| e.created_at).collect();
        let mut tx = self.pool.begin().await.expect("failed to begin");
        sqlx::query(
            "INSERT INTO events (id, org_id, type, dedup_key, data, created_at)
             SELECT id, org_id, type, dedup_key, data::jsonb, created_at
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
                  AS t (id, org_id, type, dedup_key, data, created_at)",
        )
        .bind(&ids)
        .bind(&org_ids)
        .bind(&types)
        .bind(&dedup_keys)
        .bind(&data)
        .bind(&created)
        .execute(&mut *tx)
        .await
        .expect("failed to insert events");
        outbox::enqueue(&mut tx, messages).await.expect("failed to enqueue outbox rows");
        tx.commit().await.expect("failed to commit events");
        self.waker.wake();
    }

    /// Waits until the publisher has moved every outbox row into the broker.
    pub async fn wait_published(&self) {
        wait_for("every outbox row to be dispatched", || async {
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE state <> 'dispatched'")
                .fetch_one(&self.pool)
                .await
                .expect("failed to count outbox rows");
            (pending == 0).then_some(())
        })
        .await
    }

    pub async fn deliveries(&self) -> Vec<DeliveryRow> {
        sqlx::query(
            "SELECT id, event_id, subscription_id, status, attempt_count, next_attempt_at, last_status_code, last_error
             FROM webhook_deliveries ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .expect("failed to read webhook_deliveries")
        .iter()
        .map(|row| DeliveryRow {
            id: row.get("id"),
            event_id: row.get("event_id"),
            subscription_id: row.get("subscription_id"),
            status: row.get("status"),
            attempt_count: row.get("attempt_count"),
            next_attempt_at: row.get("next_attempt_at"),
            last_status_code: row.get("last_status_code"),
            last_error: row.get("last_error"),
        })
        .collect()
    }

    pub async fn delivery(&self, event_id: Uuid, subscription_id: Uuid) -> Option<DeliveryRow> {
        self.deliveries().await.into_iter().find(|d| d.event_id == event_id && d.subscription_id == subscription_id)
    }

    /// Waits until the delivery of `event_id` to `subscription_id` has `status`.
    pub async fn wait_delivery(&self, event_id: Uuid, subscription_id: Uuid, status: &str) -> DeliveryRow {
        let description = format!("the delivery of {event_id} to {subscription_id} to be {status}");
        wait_for(&description, || async { self.delivery(event_id, subscription_id).await.filter(|d| d.status == status) }).await
    }

    /// Attempts of one delivery, oldest first.
    pub async fn attempts(&self, delivery_id: i64) -> Vec<AttemptRow> {
        sqlx::query(
            "SELECT duration_ms, status_code, error, response_body, octet_length(response_body) AS stored_bytes,
                    response_truncated
             FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempted_at, id",
        )
        .bind(delivery_id)
        .fetch_all(&self.pool)
        .await
        .expect("failed to read webhook_attempts")
        .iter()
        .map(|row| AttemptRow {
            duration_ms: row.get("duration_ms"),
            status_code: row.get("status_code"),
            error: row.get("error"),
            response_body: row.get("response_body"),
            stored_bytes: row.get("stored_bytes"),
            response_truncated: row.get("response_truncated"),
        })
        .collect()
    }

    /// `status` and `disabled_reason` of a subscription.
    pub async fn subscription_status(&self, subscription_id: Uuid) -> (String, Option<String>) {
        let row = sqlx::query("SELECT status, disabled_reason FROM webhook_subscriptions WHERE id = $1")
            .bind(subscription_id)
            .fetch_one(&self.pool)
            .await
            .expect("failed to read the subscription");
        (row.get("status"), row.get("disabled_reason"))
    }
}

impl Drop for Harness {
    /// Cleans up after a test that panicked before [`Harness::finish`].
    fn drop(&mut self) {
        if let Some((shutdown, _)) = &self.relay {
            shutdown.cancel();
        }
        self.publisher_shutdown.cancel();
        let Some(database) = self.database.take() else { return };
        let name = database.name.clone();
        drop(database);
        testing::clean_up_after_panic(name, self.topology.clone());
    }
}

/// A subscription to provision, with its plain signing secret kept for verification.
#[derive(Debug, Clone)]
pub struct Sub {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
}

impl Sub {
    pub fn new(url: &str, events: &[&str]) -> Self {
        Self {
            id: Uuid::new_v4(),
            url: url.to_owned(),
            events: events.iter().map(|e| e.to_string()).collect(),
            secret: WebhookSecret::generate().expose_secret().to_owned(),
        }
    }

    /// Returns the same subscription with a new secret. Applying it rotates the secret.
    pub fn rotated(&self) -> Self {
        Self { secret: WebhookSecret::generate().expose_secret().to_owned(), ..self.clone() }
    }

    pub fn json(&self) -> Value {
        json!({"id": self.id, "url": self.url, "events": self.events, "secret": self.secret})
    }
}

/// Builds a provisioning file with one org and its subscriptions.
pub fn org_file(org_id: Uuid, subscriptions: &[&Sub]) -> Value {
    let subscriptions: Vec<Value> = subscriptions.iter().map(|s| s.json()).collect();
    json!({"orgs": [{
        "id": org_id,
        "slug": format!("org-{}", org_id.simple()),
        "name": "Relay Test Org",
        "subscriptions": subscriptions,
    }]})
}

/// Builds a new event. Its data mixes key lengths, non-ASCII text and numbers, so a
/// body rebuilt from the `events` row (jsonb) differs from the published one unless
/// serialisation is canonical.
pub fn event(org_id: Uuid, event_type: EventType) -> Event {
    Event {
        id: Uuid::now_v7(),
        event_type,
        created_at: truncate_to_millis(Utc::now()),
        org_id,
        data: json!({
            "zz": 1,
            "a": {"text": "héllo wörld 🎉", "list": [1, 2.5, null, true]},
            "bbb": "x",
            "wamid": format!("wamid.{}", Uuid::new_v4().simple()),
        }),
    }
}

fn outbox_message(event: &Event) -> OutboxMessage {
    OutboxMessage {
        org_id: Some(event.org_id),
        topic: Topic::Event,
        routing_key: event.event_type.as_str().to_owned(),
        message_id: event.id,
        payload: event.to_body(),
    }
}

#[derive(Debug, Clone)]
pub struct DeliveryRow {
    pub id: i64,
    pub event_id: Uuid,
    pub subscription_id: Uuid,
    pub status: String,
    pub attempt_count: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
    /// `octet_length(response_body)`: what Postgres really stores.
    pub stored_bytes: Option<i32>,
    pub response_truncated: bool,
}

/// Polls `probe` every 25 ms until it returns `Some`, and fails after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(description: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_within(description, DEADLINE, probe).await
}

pub async fn wait_for_within<T, F, Fut>(description: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {description}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Lets the relay run before a check that nothing more happened. 800 ms is 16 sweeps
/// of the retry lane at the test interval of 50 ms.
pub async fn quiet_period() {
    tokio::time::sleep(Duration::from_millis(800)).await;
}
