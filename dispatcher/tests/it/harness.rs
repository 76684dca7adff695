//! A whole outbound path per test: its own database and queue prefix, a real ingress
//! (customer API, outbox publisher, Meta webhooks), a real `reach-meta-sim` on port 0
//! whose status webhooks go to that ingress, and a dispatcher aimed at the simulator,
//! in this process or as a child process that a test can kill.

use std::time::Duration;

use reach_dispatcher::{DispatcherSettings, RunningDispatcher};
use reach_ingress::{Ingress, IngressSettings};
use reach_meta_sim::{Rule, RunningSim, SimNumber, SimSettings, SimStats, WebhookTarget};
use reach_shared::amqp::Topology;
use reach_shared::provision::ProvisioningFile;
use reach_shared::secrets::SecretSealer;
use reach_shared::settings::Env;
use reach_shared::testing::{self, TestDatabase};
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const APP_SECRET: &str = "test_app_secret_0123456789abcdef";
pub const JWT_SECRET: &str = "test-identity-provider-secret";
pub const SHARDS: u16 = 2;

/// How long a test waits for an asynchronous result before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A phone number of the test org.
#[derive(Debug, Clone)]
pub struct Number {
    pub phone_number_id: String,
    pub mps: u32,
}

pub fn number(phone_number_id: &str, mps: u32) -> Number {
    Number { phone_number_id: phone_number_id.to_owned(), mps }
}

/// Knobs of one test's fleet.
pub struct Options {
    pub numbers: Vec<Number>,
    /// Simulator latency range in milliseconds.
    pub latency_ms: (u64, u64),
    pub pair_interval: Duration,
    pub rules: Vec<Rule>,
    /// Extra dispatcher environment variables.
    pub dispatcher_env: Vec<(&'static str, String)>,
    /// Start the dispatcher in this process; otherwise the test starts it.
    pub start_dispatcher: bool,
    /// The MPS the simulator enforces, when it differs from the provisioned one.
    pub sim_mps: Option<u32>,
    /// Added to the MPS the simulator enforces.
    pub sim_mps_extra: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            numbers: vec![number("110000000000001", 80)],
            latency_ms: (5, 15),
            pair_interval: Duration::ZERO,
            rules: Vec::new(),
            dispatcher_env: Vec::new(),
            start_dispatcher: true,
            sim_mps: None,
            sim_mps_extra: 0,
        }
    }
}

pub struct Fleet {
    pub pool: PgPool,
    pub client: reqwest::Client,
    pub org_id: Uuid,
    pub api_url: String,
    pub sim: RunningSim,
    pub topology: Topology,
    database_url: String,
    amqp_url: String,
    dispatcher_env: Vec<(&'static str, String)>,
    shutdown: CancellationToken,
    sim_shutdown: CancellationToken,
    ingress: Option<Ingress>,
    dispatcher: Option<(CancellationToken, RunningDispatcher)>,
    database: Option<TestDatabase>,
}

impl Fleet {
    pub async fn start(options: Options) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            reach_shared::telemetry::init_logs("reach-dispatcher-it");
        }
        let database = TestDatabase::create().await.expect("failed to create the test database");
        let prefix = testing::unique_prefix();
        let topology = testing::declare_topology(&prefix, SHARDS).await.expect("failed to declare the topology");
        let amqp_url = secrecy::ExposeSecret::expose_secret(&testing::amqp_url()).to_owned();

        let org_id = Uuid::new_v4();
        let wabas: Vec<Value> = options
            .numbers
            .iter()
            .enumerate()
            .map(|(index, n)| {
                json!({"waba_id": format!("90000000000{index:04}"), "access_token": token_of(&n.phone_number_id), "phone_numbers": [
                    {"phone_number_id": n.phone_number_id, "display_phone_number": format!("+1 555 01{index:02}"), "mps": n.mps}
                ]})
            })
            .collect();
        let file = json!({"orgs": [{"id": org_id, "slug": "outbound", "name": "Outbound Org", "wabas": wabas}]});
        ProvisioningFile::parse(&file.to_string())
            .expect("valid provisioning")
            .apply(&database.pool, &SecretSealer::Passthrough)
            .await
            .expect("failed to provision");

        let shutdown = CancellationToken::new();
        let ingress_env = vec![
            ("REACH_INGRESS_ADDR", "127.0.0.1:0".to_owned()),
            ("REACH_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ("REACH_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("REACH_HUB_JWT_SECRET", JWT_SECRET.to_owned()),
            ("DATABASE_URL", database.url.clone()),
            ("AMQP_URL", amqp_url.clone()),
            ("REACH_AMQP_PREFIX", prefix.clone()),
            ("REACH_SEND_SHARDS", SHARDS.to_string()),
            ("REACH_META_APP_SECRETS", APP_SECRET.to_owned()),
            ("REACH_META_VERIFY_TOKEN", "verify".to_owned()),
            ("REACH_DATABASE_MAX_CONNECTIONS", "6".to_owned()),
            ("REACH_OUTBOX_IDLE_POLL_MS", "50".to_owned()),
        ];
        let settings = IngressSettings::from_env(&Env::from_pairs(ingress_env)).expect("valid ingress settings");
        let ingress = reach_ingress::start(settings, shutdown.clone()).await.expect("failed to start the ingress");

        let sim_numbers = options
            .numbers
            .iter()
            .enumerate()
            .map(|(index, n)| SimNumber {
                phone_number_id: n.phone_number_id.clone(),
                waba_id: format!("90000000000{index:04}"),
                display_phone_number: format!("1555010{index:01}"),
                access_token: token_of(&n.phone_number_id).into(),
                mps: options.sim_mps.unwrap_or(n.mps) + options.sim_mps_extra,
            })
            .collect();
        let mut sim_settings = SimSettings::new("127.0.0.1:0".parse().unwrap(), sim_numbers);
        sim_settings.latency_min = Duration::from_millis(options.latency_ms.0);
        sim_settings.latency_max = Duration::from_millis(options.latency_ms.1);
        sim_settings.pair_interval = options.pair_interval;
        sim_settings.rules = options.rules;
        sim_settings.status_delay = Duration::from_millis(50);
        sim_settings.webhook = Some(WebhookTarget {
            url: format!("http://{}/webhooks/whatsapp", ingress.ingress_addr).parse().unwrap(),
            app_secret: APP_SECRET.to_owned().into(),
        });
        let sim_shutdown = CancellationToken::new();
        let sim = reach_meta_sim::start(sim_settings, sim_shutdown.clone()).await.expect("failed to start the simulator");

        let mut fleet = Self {
            pool: database.pool.clone(),
            client: reqwest::Client::new(),
            org_id,
            api_url: format!("http://{}/v1/messages", ingress.ingress_addr),
            sim,
            topology,
            database_url: database.url.clone(),
            amqp_url,
            dispatcher_env: options.dispatcher_env,
            shutdown,
            sim_shutdown,
            ingress: Some(ingress),
            dispatcher: None,
            database: Some(database),
        };
        if options.start_dispatcher {
            fleet.start_dispatcher().await;
        }
        fleet
    }

    /// Returns the dispatcher's environment: this fleet's database, broker and simulator.
    pub fn dispatcher_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("DATABASE_URL", self.database_url.clone()),
            ("AMQP_URL", self.amqp_url.clone()),
            ("REACH_AMQP_PREFIX", self.topology.prefix.clone()),
            ("REACH_SEND_SHARDS", SHARDS.to_string()),
            ("REACH_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("REACH_META_GRAPH_URL", self.sim.base_url()),
            ("REACH_DATABASE_MAX_CONNECTIONS", "6".to_owned()),
            ("REACH_DISPATCHER_RETRY_MIN_DELAY_MS", "100".to_owned()),
            ("REACH_DISPATCHER_RETRY_MAX_DELAY_MS", "400".to_owned()),
            ("REACH_DISPATCHER_SWEEP_INTERVAL_MS", "100".to_owned()),
            ("REACH_DISPATCHER_DIRECTORY_REFRESH_MS", "200".to_owned()),
            ("REACH_DISPATCHER_REQUEST_TIMEOUT_MS", "2000".to_owned()),
            ("REACH_OUTBOX_IDLE_POLL_MS", "50".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (name, value) in &self.dispatcher_env {
            env.retain(|(k, _)| k != name);
            env.push((name.to_string(), value.clone()));
        }
        env
    }

    pub async fn start_dispatcher(&mut self) {
        let settings = DispatcherSettings::from_env(&Env::from_pairs(self.dispatcher_env())).expect("valid dispatcher settings");
        let shutdown = CancellationToken::new();
        let dispatcher = reach_dispatcher::start(settings, shutdown.clone()).await.expect("failed to start the dispatcher");
        self.dispatcher = Some((shutdown, dispatcher));
    }

    /// Stops the in-process dispatcher and waits until it drained.
    pub async fn stop_dispatcher(&mut self) {
        if let Some((shutdown, dispatcher)) = self.dispatcher.take() {
            shutdown.cancel();
            tokio::time::timeout(DEADLINE, dispatcher.wait()).await.expect("the dispatcher stops within the deadline");
        }
    }

    pub fn bearer(&self) -> String {
        let claims = json!({"sub": "user-1", "org_id": self.org_id, "exp": chrono::Utc::now().timestamp() + 3600});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap(),
        )
        .unwrap();
        format!("Bearer {token}")
    }

    /// Sends a text message through the customer API; returns its id.
    pub async fn send_text(&self, phone_number_id: &str, to: &str) -> Uuid {
        let body = json!({"phone_number_id": phone_number_id, "to": to, "type": "text", "text": {"body": "Your code is 123456"}});
        let response = self.client.post(&self.api_url).header("authorization", self.bearer()).json(&body).send().await.expect("the API answers");
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED, "POST /v1/messages");
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().and_then(|id| id.parse().ok()).expect("the answer has an id")
    }

    /// Inserts `count` messages and their jobs directly, much faster than the API.
    pub async fn queue_many(&self, phone_number_id: &str, count: usize, recipient_base: u64) -> Vec<Uuid> {
        let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
        let recipients: Vec<String> = (0..count as u64).map(|n| (recipient_base + n).to_string()).collect();
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO outbound_messages (id, org_id, phone_number_id, recipient, type, request, request_sha256)
             SELECT t.id, $2, $3, t.recipient, 'text',
                    jsonb_build_object('messaging_product', 'whatsapp', 'to', t.recipient, 'type', 'text', 'text', jsonb_build_object('body', 'hello')),
                    '\\x00'
             FROM UNNEST($1::uuid[], $4::text[]) AS t (id, recipient)",
        )
        .bind(&ids)
        .bind(self.org_id)
        .bind(phone_number_id)
        .bind(&recipients)
        .execute(&mut *tx)
        .await
        .unwrap();
        let jobs: Vec<reach_shared::sends::SendJob> = ids
            .iter()
            .map(|&message_id| reach_shared::sends::SendJob { message_id, org_id: self.org_id, phone_number_id: phone_number_id.to_owned(), seq: 1 })
            .collect();
        reach_shared::sends::enqueue_jobs(&mut tx, &jobs, SHARDS).await.unwrap();
        tx.commit().await.unwrap();
        ids
    }

    pub async fn state(&self, id: Uuid) -> MessageRow {
        let row = sqlx::query(
            "SELECT state, wamid, error_code, failure_reason, parked, attempt_count, accepted_at FROM outbound_messages WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .expect("the message exists");
        MessageRow {
            state: row.get("state"),
            wamid: row.get("wamid"),
            error_code: row.get("error_code"),
            failure_reason: row.get("failure_reason"),
            parked: row.get("parked"),
            attempt_count: row.get("attempt_count"),
            accepted_at: row.get("accepted_at"),
        }
    }

    /// Waits until `sql` (a count) returns `expected`; fails after [`DEADLINE`] with
    /// the last value.
    pub async fn wait_for_count(&self, sql: &str, expected: i64) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&self.pool).await.expect("count query");
            if count == expected {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{sql} returned {count}, expected {expected}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&self.pool).await.expect("count query")
    }

    pub async fn sim_stats(&self) -> SimStats {
        self.client.get(format!("{}/sim/stats", self.sim.base_url())).send().await.unwrap().json().await.unwrap()
    }

    pub async fn set_rules(&self, rules: Value) {
        let response = self.client.post(format!("{}/sim/rules", self.sim.base_url())).json(&rules).send().await.unwrap();
        assert!(response.status().is_success(), "the simulator takes the rules");
    }

    pub async fn finish(mut self) {
        self.stop_dispatcher().await;
        self.sim_shutdown.cancel();
        self.shutdown.cancel();
        if let Some(ingress) = self.ingress.take() {
            let _ = tokio::time::timeout(DEADLINE, ingress.wait()).await;
        }
        testing::delete_topology(&self.topology).await.expect("failed to delete the topology");
        if let Some(database) = self.database.take() {
            database.drop_database().await.expect("failed to drop the test database");
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.sim_shutdown.cancel();
        self.shutdown.cancel();
        if let Some((shutdown, _)) = &self.dispatcher {
            shutdown.cancel();
        }
        let Some(database) = self.database.take() else { return };
        let name = database.name.clone();
        drop(database);
        testing::clean_up_after_panic(name, self.topology.clone());
    }
}

#[derive(Debug, Clone)]
pub struct MessageRow {
    pub state: String,
    pub wamid: Option<String>,
    pub error_code: Option<i32>,
    pub failure_reason: Option<String>,
    pub parked: bool,
    pub attempt_count: i32,
    pub accepted_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub fn token_of(phone_number_id: &str) -> String {
    format!("token-for-{phone_number_id}")
}
