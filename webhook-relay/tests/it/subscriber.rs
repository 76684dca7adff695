//! A customer endpoint: a real HTTP server on 127.0.0.1 that records every request
//! (headers, body, arrival time) and responds from a script, then with a default reply.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use reach_shared::events::Event;
use reach_shared::signing::{WebhookSecret, verify_signature_header};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The response to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Delay between recording the request and responding.
    pub delay: Duration,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self { status, delay: Duration::ZERO, headers: Vec::new(), body: Vec::new() }
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }
}

/// One request as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("callback has no {name} header: {:?}", self.headers))
            .to_str()
            .unwrap_or_else(|_| panic!("callback header {name} is not ASCII"))
    }

    pub fn webhook_id(&self) -> Uuid {
        let raw = self.header("webhook-id");
        raw.parse().unwrap_or_else(|_| panic!("webhook-id {raw:?} is not a UUID"))
    }

    pub fn timestamp(&self) -> i64 {
        let raw = self.header("webhook-timestamp");
        raw.parse().unwrap_or_else(|_| panic!("webhook-timestamp {raw:?} is not an integer"))
    }

    /// Verifies `webhook-signature` with `secret` (a `whsec_` string), as a customer would.
    pub fn verifies(&self, secret: &str) -> bool {
        let secret = WebhookSecret::parse(secret).expect("a valid test secret");
        verify_signature_header(&secret, self.header("webhook-id"), self.timestamp(), &self.body, self.header("webhook-signature"))
    }

    pub fn event(&self) -> Event {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("callback body is not an Event ({error}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

struct EndpointState {
    script: Mutex<VecDeque<Reply>>,
    then: Reply,
    received: Mutex<Vec<Received>>,
}

/// A running endpoint. It stops when dropped.
pub struct Subscriber {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:{port}/hook`.
    pub url: String,
    state: Arc<EndpointState>,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// Starts an endpoint that responds to every request with `reply`.
    pub async fn start(reply: Reply) -> Self {
        Self::scripted(Vec::new(), reply).await
    }

    /// Starts an endpoint that responds with `script` in order, then with `then`.
    pub async fn scripted(script: Vec<Reply>, then: Reply) -> Self {
        let state = Arc::new(EndpointState { script: Mutex::new(script.into()), then, received: Mutex::new(Vec::new()) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("failed to bind a subscriber");
        let addr = listener.local_addr().expect("bound address");
        let router = Router::new().fallback(answer).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { addr, url: format!("http://{addr}/hook"), state, task }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    pub fn count(&self) -> usize {
        self.state.received.lock().expect("lock").len()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(State(state): State<Arc<EndpointState>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let at = Instant::now();
    let reply = state.script.lock().expect("lock").pop_front().unwrap_or_else(|| state.then.clone());
    state.received.lock().expect("lock").push(Received { at, path: uri.path().to_owned(), headers, body });
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = Response::builder().status(StatusCode::from_u16(reply.status).expect("a valid status"));
    for (name, value) in &reply.headers {
        response = response.header(name, value);
    }
    response.body(Body::from(reply.body)).expect("a valid response")
}
