//! A real simulator per test on 127.0.0.1 port 0, an HTTP client aimed at it, and a
//! status webhook receiver that checks every signature.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use reach_meta_sim::{RunningSim, SimNumber, SimSettings, SimStats, WebhookTarget};
use reach_shared::signing::MetaSignatureVerifier;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const PHONE: &str = "200000000000001";
pub const WABA: &str = "100000000000001";
pub const TOKEN: &str = "test-access-token-1";
pub const OTHER_PHONE: &str = "200000000000002";
pub const OTHER_TOKEN: &str = "test-access-token-2";
pub const APP_SECRET: &str = "test_app_secret_0123456789abcdef";
pub const RECIPIENT: &str = "15550002222";

/// How long a test waits for an asynchronous result before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Two numbers (mps 80), no latency, no pair-rate check, no status webhooks.
pub fn settings() -> SimSettings {
    let numbers = vec![number(PHONE, WABA, TOKEN, 80), number(OTHER_PHONE, "100000000000002", OTHER_TOKEN, 80)];
    let mut settings = SimSettings::new("127.0.0.1:0".parse().unwrap(), numbers);
    settings.latency_min = Duration::ZERO;
    settings.latency_max = Duration::ZERO;
    settings.pair_interval = Duration::ZERO;
    settings.reorder_ratio = 0.0;
    settings.duplicate_ratio = 0.0;
    settings
}

pub fn number(phone_number_id: &str, waba_id: &str, token: &str, mps: u32) -> SimNumber {
    SimNumber {
        phone_number_id: phone_number_id.to_owned(),
        waba_id: waba_id.to_owned(),
        display_phone_number: "+1 555-000-1111".to_owned(),
        access_token: token.into(),
        mps,
    }
}

pub fn text_body(to: &str) -> Value {
    serde_json::json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"body": "hello"}
    })
}

/// A started simulator, stopped when dropped.
pub struct TestSim {
    pub running: Option<RunningSim>,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
}

/// A response read to the end, its body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub json: Value,
    pub text: String,
}

impl Reply {
    /// `error.code` of a Meta error body.
    pub fn error_code(&self) -> Option<u64> {
        self.json["error"]["code"].as_u64()
    }
}

impl TestSim {
    pub async fn start(settings: SimSettings) -> Self {
        let shutdown = CancellationToken::new();
        let running = reach_meta_sim::start(settings, shutdown.clone()).await.expect("simulator starts");
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Self { addr: running.addr, running: Some(running), client, shutdown }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Posts a raw body to `/v21.0/{phone}/messages` with `token` as the bearer.
    pub async fn send_raw(&self, phone: &str, token: Option<&str>, body: Vec<u8>) -> Reply {
        let mut request = self
            .client
            .post(self.url(&format!("/v21.0/{phone}/messages")))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        read(request.send().await.expect("simulator responds")).await
    }

    pub async fn send(&self, phone: &str, token: &str, body: &Value) -> Reply {
        self.send_raw(phone, Some(token), serde_json::to_vec(body).unwrap()).await
    }

    pub async fn send_text(&self, to: &str) -> Reply {
        self.send(PHONE, TOKEN, &text_body(to)).await
    }

    pub async fn stats(&self) -> SimStats {
        let response = self.client.get(self.url("/sim/stats")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.expect("stats body deserialises into SimStats")
    }

    pub async fn post_rules(&self, rules: &str) -> Reply {
        let response = self.client.post(self.url("/sim/rules")).body(rules.to_owned()).send().await.unwrap();
        read(response).await
    }

    /// Stops the simulator and waits until it has stopped.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            tokio::time::timeout(DEADLINE, running.wait()).await.expect("simulator stops within the deadline");
        }
    }
}

impl Drop for TestSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn read(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply { status, json, text }
}

/// One status webhook POST as the receiver got it.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    pub body: Bytes,
    pub json: Value,
}

#[derive(Clone)]
struct ReceiverState {
    verifier: MetaSignatureVerifier,
    received: Arc<Mutex<Vec<ReceivedWebhook>>>,
    bad_signatures: Arc<Mutex<u32>>,
    /// POSTs still to be rejected with 500 before the receiver starts accepting them.
    failures_left: Arc<Mutex<u32>>,
}

/// A status webhook endpoint on 127.0.0.1 port 0 that verifies `X-Hub-Signature-256`
/// against [`APP_SECRET`], responds 401 to a bad one, and records the rest.
pub struct WebhookReceiver {
    pub url: reqwest::Url,
    state: ReceiverState,
    shutdown: CancellationToken,
}

impl WebhookReceiver {
    /// Starts a receiver that rejects the first `fail_first` POSTs with 500.
    pub async fn start(fail_first: u32) -> Self {
        let state = ReceiverState {
            verifier: MetaSignatureVerifier::new(vec![APP_SECRET.into()]),
            received: Arc::default(),
            bad_signatures: Arc::default(),
            failures_left: Arc::new(Mutex::new(fail_first)),
        };
        let router = Router::new().route("/webhooks/whatsapp", post(receive)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, router).with_graceful_shutdown(async move { stop.cancelled().await }).await.unwrap();
        });
        let url = format!("http://{addr}/webhooks/whatsapp").parse().unwrap();
        Self { url, state, shutdown }
    }

    pub fn target(&self) -> WebhookTarget {
        WebhookTarget { url: self.url.clone(), app_secret: APP_SECRET.into() }
    }

    pub fn received(&self) -> Vec<ReceivedWebhook> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn bad_signatures(&self) -> u32 {
        *self.state.bad_signatures.lock().unwrap()
    }

    /// Collects every status received, in arrival order.
    pub fn statuses(&self) -> Vec<Value> {
        self.received()
            .iter()
            .flat_map(|webhook| {
                let change = &webhook.json["entry"][0]["changes"][0];
                change["value"]["statuses"].as_array().cloned().unwrap_or_default()
            })
            .collect()
    }

    /// Waits until `done` holds for the statuses received so far.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let statuses = self.statuses();
            if done(&statuses) {
                return statuses;
            }
            assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}; received {statuses:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn receive(State(state): State<ReceiverState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = headers.get("x-hub-signature-256").map(|value| value.as_bytes());
    if state.verifier.verify(signature, &body).is_err() {
        *state.bad_signatures.lock().unwrap() += 1;
        return StatusCode::UNAUTHORIZED;
    }
    {
        let mut failures_left = state.failures_left.lock().unwrap();
        if *failures_left > 0 {
            *failures_left -= 1;
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
    }
    let json = serde_json::from_slice(&body).expect("status webhook body is JSON");
    state.received.lock().unwrap().push(ReceivedWebhook { body, json });
    StatusCode::OK
}
