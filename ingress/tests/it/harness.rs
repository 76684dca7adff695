//! A real ingress per test: its own migrated database, its own RabbitMQ prefix, and an
//! HTTP client aimed at its listener.

use std::future::Future;
use std::time::{Duration, Instant};

use reach_ingress::{Ingress, IngressSettings};
use reach_shared::amqp::Topology;
use reach_shared::events::Event;
use reach_shared::provision::ProvisioningFile;
use reach_shared::secrets::SecretSealer;
use reach_shared::settings::Env;
use reach_shared::signing::meta_signature;
use reach_shared::testing::{self, TestDatabase};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// App secret the fixtures under `fixtures/meta` are signed with.
pub const APP_SECRET: &str = "test_app_secret_0123456789abcdef";
pub const VERIFY_TOKEN: &str = "verify-token-for-tests";

/// Ids used by every fixture under `fixtures/meta`.
pub const FIXTURE_WABA: &str = "100000000000001";
pub const FIXTURE_PHONE: &str = "200000000000001";
pub const FIXTURE_DISPLAY: &str = "15550001111";

/// How long a test waits for an asynchronous result before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// HS256 key of the test identity provider.
pub const JWT_SECRET: &str = "test-identity-provider-secret";

/// Signs a token as the identity provider would, valid for an hour.
pub fn token(claims: Value) -> String {
    let mut claims = claims;
    claims["exp"] = serde_json::json!(chrono::Utc::now().timestamp() + 3600);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).expect("HMAC keys take any length"),
    )
    .expect("test claims serialise")
}

/// Reads a file under `fixtures/meta` byte for byte.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/../fixtures/meta/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|error| panic!("failed to read fixture {path}: {error}"))
}

/// A started ingress with its database and queues. Call [`TestIngress::finish`] at the
/// end of a test. When a test panics first, `Drop` still drops the database and deletes
/// the queues.
pub struct TestIngress {
    pub pool: PgPool,
    pub client: reqwest::Client,
    pub topology: Topology,
    /// Bound address of the webhook listener.
    pub addr: std::net::SocketAddr,
    /// Bound address of the operator listener.
    pub admin_addr: std::net::SocketAddr,
    /// `http://127.0.0.1:{port}/webhooks/whatsapp`.
    pub webhook_url: reqwest::Url,
    shutdown: CancellationToken,
    ingress: Option<Ingress>,
    database: Option<TestDatabase>,
}

/// An HTTP response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("response body is not JSON ({error}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// Returns the `status` field of a 200 response: `accepted`, `duplicate`, `unroutable` or
    /// `unparseable`.
    pub fn outcome(&self) -> String {
        self.json()["status"]
            .as_str()
            .unwrap_or_else(|| panic!("response has no status field: {:?}", String::from_utf8_lossy(&self.body)))
            .to_owned()
    }
}

impl TestIngress {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts an ingress; `overrides` replace or add environment variables.
    pub async fn start_with(overrides: &[(&str, &str)]) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            reach_shared::telemetry::init_logs("reach-ingress-it");
        }
        let database = TestDatabase::create().await.expect("failed to create the test database");
        let prefix = testing::unique_prefix();
        // Declared before the ingress starts so a test can read the relay queue at once.
        let topology = testing::declare_topology(&prefix, 8).await.expect("failed to declare the RabbitMQ topology");
        let amqp_url = secrecy::ExposeSecret::expose_secret(&testing::amqp_url()).to_owned();

        let mut pairs: Vec<(String, String)> = [
            ("REACH_INGRESS_ADDR", "127.0.0.1:0"),
            ("REACH_ADMIN_ADDR", "127.0.0.1:0"),
            ("REACH_HUB_JWT_SECRET", JWT_SECRET),
            ("REACH_METRICS_ADDR", "127.0.0.1:0"),
            ("DATABASE_URL", database.url.as_str()),
            ("AMQP_URL", amqp_url.as_str()),
            ("REACH_AMQP_PREFIX", prefix.as_str()),
            ("REACH_SEND_SHARDS", "8"),
            ("REACH_META_APP_SECRETS", APP_SECRET),
            ("REACH_META_VERIFY_TOKEN", VERIFY_TOKEN),
            ("REACH_DATABASE_MAX_CONNECTIONS", "8"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (name, value) in overrides {
            pairs.retain(|(k, _)| k != name);
            pairs.push((name.to_string(), value.to_string()));
        }
        let settings = IngressSettings::from_env(&Env::from_pairs(pairs)).expect("invalid ingress settings");

        let shutdown = CancellationToken::new();
        let ingress = reach_ingress::start(settings, shutdown.clone()).await.expect("failed to start the ingress");
        let webhook_url = reqwest::Url::parse(&format!("http://{}/webhooks/whatsapp", ingress.ingress_addr)).expect("valid URL");
        Self {
            pool: database.pool.clone(),
            client: reqwest::Client::new(),
            topology,
            addr: ingress.ingress_addr,
            admin_addr: ingress.admin_addr,
            webhook_url,
            shutdown,
            ingress: Some(ingress),
            database: Some(database),
        }
    }

    /// Stops the ingress, deletes the queues and drops the database. Fails when the
    /// ingress does not stop within [`DEADLINE`].
    pub async fn finish(mut self) {
        self.shutdown.cancel();
        let ingress = self.ingress.take().expect("finish runs once");
        let stopped = tokio::time::timeout(DEADLINE, ingress.wait()).await;
        testing::delete_topology(&self.topology).await.expect("failed to delete the RabbitMQ topology");
        let database = self.database.take().expect("finish runs once");
        database.drop_database().await.expect("failed to drop the test database");
        assert!(stopped.is_ok(), "ingress did not stop within {DEADLINE:?} of the shutdown signal");
    }

    /// Provisions one org that owns the WABA and phone number of the fixtures.
    pub async fn provision_fixture_org(&self) -> Uuid {
        let org_id = Uuid::new_v4();
        self.provision(json!({"orgs": [{
            "id": org_id, "slug": "fixture-org", "name": "Fixture Org",
            "wabas": [{"waba_id": FIXTURE_WABA, "access_token": "token-1", "phone_numbers": [
                {"phone_number_id": FIXTURE_PHONE, "display_phone_number": FIXTURE_DISPLAY}
            ]}]
        }]}))
        .await;
        org_id
    }

    pub async fn provision(&self, file: Value) {
        ProvisioningFile::parse(&file.to_string())
            .expect("invalid provisioning file")
            .apply(&self.pool, &SecretSealer::Passthrough)
            .await
            .expect("failed to apply the provisioning file");
    }

    /// POSTs `body` with `X-Hub-Signature-256: {signature}`, or without the header.
    pub async fn post(&self, body: impl Into<reqwest::Body>, signature: Option<&str>) -> Reply {
        let mut request = self.client.post(self.webhook_url.clone()).header("content-type", "application/json").body(body);
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        read_reply(request.send().await.expect("POST failed")).await
    }

    /// POSTs `body` signed with [`APP_SECRET`].
    pub async fn post_signed(&self, body: &[u8]) -> Reply {
        let signature = meta_signature(APP_SECRET, body);
        self.post(body.to_vec(), Some(&signature)).await
    }

    pub async fn get(&self, query: &[(&str, &str)]) -> Reply {
        let url = reqwest::Url::parse_with_params(self.webhook_url.as_str(), query).expect("valid query");
        read_reply(self.client.get(url).send().await.expect("GET failed")).await
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|error| panic!("query {sql:?} failed: {error}"))
    }

    pub async fn events(&self) -> Vec<EventRow> {
        sqlx::query("SELECT id, org_id, type, dedup_key, phone_number_id, inbound_webhook_id, data, created_at FROM events ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .expect("failed to read events")
            .iter()
            .map(|row| EventRow {
                id: row.get("id"),
                org_id: row.get("org_id"),
                event_type: row.get("type"),
                dedup_key: row.get("dedup_key"),
                phone_number_id: row.get("phone_number_id"),
                inbound_webhook_id: row.get("inbound_webhook_id"),
                data: row.get("data"),
                created_at: row.get("created_at"),
            })
            .collect()
    }

    pub async fn inbound_webhooks(&self) -> Vec<InboundRow> {
        sqlx::query("SELECT id, body, body_sha256, outcome, parse_error, event_count, unroutable_count FROM inbound_webhooks ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .expect("failed to read inbound_webhooks")
            .iter()
            .map(|row| InboundRow {
                id: row.get("id"),
                body: row.get("body"),
                body_sha256: row.get("body_sha256"),
                outcome: row.get("outcome"),
                parse_error: row.get("parse_error"),
                event_count: row.get("event_count"),
                unroutable_count: row.get("unroutable_count"),
            })
            .collect()
    }

    pub async fn outbox(&self) -> Vec<OutboxRow> {
        sqlx::query("SELECT id, org_id, topic, routing_key, message_id, payload, state, attempts, last_error FROM outbox ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .expect("failed to read the outbox")
            .iter()
            .map(|row| OutboxRow {
                id: row.get("id"),
                org_id: row.get("org_id"),
                topic: row.get("topic"),
                routing_key: row.get("routing_key"),
                message_id: row.get("message_id"),
                payload: row.get("payload"),
                state: row.get("state"),
                attempts: row.get("attempts"),
                last_error: row.get("last_error"),
            })
            .collect()
    }

    /// Returns `(status, status_rank, error_code)` of a message, if it has a row.
    pub async fn message_state(&self, wamid: &str) -> Option<(String, i16, Option<i32>)> {
        sqlx::query("SELECT status, status_rank, error_code FROM messages WHERE wamid = $1")
            .bind(wamid)
            .fetch_optional(&self.pool)
            .await
            .expect("failed to read messages")
            .map(|row| (row.get("status"), row.get("status_rank"), row.get("error_code")))
    }

    /// Returns `(mps, quality_rating)` of a phone number.
    pub async fn phone_number(&self, phone_number_id: &str) -> (i32, String) {
        let row = sqlx::query("SELECT mps, quality_rating FROM phone_numbers WHERE phone_number_id = $1")
            .bind(phone_number_id)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|error| panic!("failed to read phone number {phone_number_id}: {error}"));
        (row.get("mps"), row.get("quality_rating"))
    }

    /// Asserts that every event has exactly one outbox row that carries it, and that no
    /// other outbox row exists.
    pub async fn assert_outbox_matches_events(&self) {
        let events = self.events().await;
        let outbox = self.outbox().await;
        assert_eq!(outbox.len(), events.len(), "one outbox row per event");
        for event in &events {
            let rows: Vec<&OutboxRow> = outbox.iter().filter(|row| row.message_id == event.id).collect();
            assert_eq!(rows.len(), 1, "event {} ({}) has one outbox row", event.id, event.dedup_key);
            let row = rows[0];
            assert_eq!(row.topic, "event", "topic of the outbox row of {}", event.dedup_key);
            assert_eq!(row.routing_key, event.event_type, "routing key of the outbox row of {}", event.dedup_key);
            assert_eq!(row.org_id, Some(event.org_id), "org of the outbox row of {}", event.dedup_key);
            event.assert_matches_payload(&row.payload);
        }
    }
}

impl Drop for TestIngress {
    /// Cleans up after a test that panicked before [`TestIngress::finish`].
    fn drop(&mut self) {
        self.shutdown.cancel();
        let Some(database) = self.database.take() else { return };
        let name = database.name.clone();
        drop(database);
        testing::clean_up_after_panic(name, self.topology.clone());
    }
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: Uuid,
    pub org_id: Uuid,
    pub event_type: String,
    pub dedup_key: String,
    pub phone_number_id: Option<String>,
    pub inbound_webhook_id: Option<i64>,
    pub data: Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl EventRow {
    /// Asserts that `payload` is this event as [`Event`] serialises it.
    pub fn assert_matches_payload(&self, payload: &[u8]) {
        let event: Event = serde_json::from_slice(payload)
            .unwrap_or_else(|error| panic!("payload of {} does not parse as an Event: {error}", self.dedup_key));
        assert_eq!(event.id, self.id, "payload id of {}", self.dedup_key);
        assert_eq!(event.event_type.as_str(), self.event_type, "payload type of {}", self.dedup_key);
        assert_eq!(event.org_id, self.org_id, "payload org of {}", self.dedup_key);
        assert_eq!(event.created_at, self.created_at, "payload created_at of {}", self.dedup_key);
        assert_eq!(event.data, self.data, "payload data of {}", self.dedup_key);
    }
}

#[derive(Debug, Clone)]
pub struct InboundRow {
    pub id: i64,
    pub body: Vec<u8>,
    pub body_sha256: Vec<u8>,
    pub outcome: String,
    pub parse_error: Option<String>,
    pub event_count: i32,
    pub unroutable_count: i32,
}

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub org_id: Option<Uuid>,
    pub topic: String,
    pub routing_key: String,
    pub message_id: Uuid,
    pub payload: Vec<u8>,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
}

async fn read_reply(response: reqwest::Response) -> Reply {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().expect("ASCII content type").to_owned());
    let body = response.bytes().await.expect("failed to read the response body").to_vec();
    Reply { status, content_type, body }
}

/// Polls `probe` every 50 ms until it returns `Some`, and fails after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(description: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(started.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for {description}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Builds a notification body with the given entries, serialised compactly.
pub fn notification(entries: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "whatsapp_business_account", "entry": entries})).expect("JSON serialises")
}

/// Builds an entry of `waba_id` with one `messages` change of `phone_number_id`.
pub fn messages_entry(waba_id: &str, phone_number_id: &str, value: Value) -> Value {
    let mut value = value;
    value["messaging_product"] = json!("whatsapp");
    value["metadata"] = json!({"display_phone_number": FIXTURE_DISPLAY, "phone_number_id": phone_number_id});
    json!({"id": waba_id, "changes": [{"field": "messages", "value": value}]})
}

/// Builds an entry carrying one inbound text message.
pub fn text_entry(waba_id: &str, phone_number_id: &str, wamid: &str, text: &str) -> Value {
    messages_entry(
        waba_id,
        phone_number_id,
        json!({
            "contacts": [{"profile": {"name": "Tester"}, "wa_id": "15550002222"}],
            "messages": [{"from": "15550002222", "id": wamid, "timestamp": "1767225600", "type": "text", "text": {"body": text}}]
        }),
    )
}

/// Builds a body with one status of `wamid` for the fixtures' phone number. `timestamp` makes
/// otherwise equal bodies differ.
pub fn status_body(wamid: &str, status: &str, timestamp: u64) -> Vec<u8> {
    let mut item = json!({"id": wamid, "status": status, "timestamp": timestamp.to_string(), "recipient_id": "15550002222"});
    if status == "failed" {
        item["errors"] = json!([{"code": 131026, "title": "Message undeliverable"}]);
    }
    notification(vec![messages_entry(FIXTURE_WABA, FIXTURE_PHONE, json!({"statuses": [item]}))])
}
