//! The verifying subscriber: an HTTP server on loopback with one path per subscription.
//! It checks each callback's Standard Webhooks signature with that subscription's
//! secret, rejects a timestamp more than five minutes off, responds 204 at once and
//! records per (subscription, `webhook-id`) how often and first when it arrived.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use bytes::Bytes;
use reach_shared::events::Event;
use reach_shared::signing::{WebhookSecret, verify_signature_header};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::expect::{EventKey, Receipt};

/// Largest accepted distance between `webhook-timestamp` and the subscriber's clock.
pub const TIMESTAMP_TOLERANCE_SECONDS: i64 = 5 * 60;

/// One subscription as the subscriber serves it.
pub struct Endpoint {
    /// Request path, for example `/hooks/all`.
    pub path: String,
    pub secret: WebhookSecret,
}

/// Why a callback was rejected with 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    MissingHeader,
    InvalidTimestamp,
    StaleTimestamp,
    BadSignature,
}

/// Checks a callback as a customer's Standard Webhooks library does and returns its
/// `webhook-id`.
pub fn check_callback(secret: &WebhookSecret, headers: &HeaderMap, body: &[u8], now_unix: i64) -> Result<String, Rejection> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signature)) =
        (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"))
    else {
        return Err(Rejection::MissingHeader);
    };
    let timestamp: i64 = timestamp.trim().parse().map_err(|_| Rejection::InvalidTimestamp)?;
    if (now_unix - timestamp).abs() > TIMESTAMP_TOLERANCE_SECONDS {
        return Err(Rejection::StaleTimestamp);
    }
    if !verify_signature_header(secret, id, timestamp, body, signature) {
        return Err(Rejection::BadSignature);
    }
    Ok(id.to_owned())
}

/// Callbacks the subscriber rejected or could not read, by cause.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct RejectionCounts {
    pub missing_header: u64,
    pub invalid_timestamp: u64,
    pub stale_timestamp: u64,
    pub bad_signature: u64,
    /// Verified callbacks whose body is not an event with a recognisable key; they are
    /// accepted with 204 so the relay does not retry them.
    pub unreadable_body: u64,
}

impl RejectionCounts {
    /// Callbacks rejected with 401.
    pub fn signature_failures(&self) -> u64 {
        self.missing_header + self.invalid_timestamp + self.stale_timestamp + self.bad_signature
    }
}

#[derive(Default)]
struct Counters {
    missing_header: AtomicU64,
    invalid_timestamp: AtomicU64,
    stale_timestamp: AtomicU64,
    bad_signature: AtomicU64,
    unreadable_body: AtomicU64,
}

struct SubscriberState {
    /// Path to (subscription index, secret).
    endpoints: HashMap<String, (usize, WebhookSecret)>,
    book: Mutex<Book>,
    counters: Counters,
}

/// The receipts and their arrival times, behind one lock.
#[derive(Default)]
struct Book {
    receipts: HashMap<(usize, String), Receipt>,
    /// When the first and the latest new (subscription, `webhook-id`) pair arrived.
    first_new: Option<Instant>,
    last_new: Option<Instant>,
}

/// A cheap snapshot of the distinct callbacks received so far.
#[derive(Debug, Clone, Copy)]
pub struct Arrivals {
    /// Distinct (subscription, `webhook-id`) pairs with a readable event.
    pub distinct: usize,
    pub first: Option<Instant>,
    /// When the latest of them first arrived.
    pub last: Option<Instant>,
}

/// A running subscriber; [`Subscriber::stop`] shuts it down.
pub struct Subscriber {
    pub addr: SocketAddr,
    state: Arc<SubscriberState>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Binds `addr` and serves the endpoints; subscription `i` is `endpoints[i]`.
    pub async fn start(addr: SocketAddr, endpoints: Vec<Endpoint>) -> anyhow::Result<Self> {
        let state = Arc::new(SubscriberState {
            endpoints: endpoints.into_iter().enumerate().map(|(index, e)| (e.path, (index, e.secret))).collect(),
            book: Mutex::default(),
            counters: Counters::default(),
        });
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to bind the subscriber on {addr}"))?;
        let addr = listener.local_addr()?;
        // `GET /livez` lets a script wait for the subscriber. No subscription uses that path.
        let router = Router::new()
            .route("/livez", axum::routing::get(|| async { StatusCode::OK }))
            .fallback(receive)
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "subscriber listener failed");
            }
        });
        Ok(Self { addr, state, stop, task })
    }

    /// Copies every receipt recorded so far.
    pub fn receipts(&self) -> Vec<Receipt> {
        self.state.book.lock().expect("receipts lock").receipts.values().cloned().collect()
    }

    /// Counts the distinct callbacks so far without copying them.
    pub fn arrivals(&self) -> Arrivals {
        let book = self.state.book.lock().expect("receipts lock");
        Arrivals { distinct: book.receipts.len(), first: book.first_new, last: book.last_new }
    }

    pub fn rejections(&self) -> RejectionCounts {
        let counters = &self.state.counters;
        RejectionCounts {
            missing_header: counters.missing_header.load(Ordering::Relaxed),
            invalid_timestamp: counters.invalid_timestamp.load(Ordering::Relaxed),
            stale_timestamp: counters.stale_timestamp.load(Ordering::Relaxed),
            bad_signature: counters.bad_signature.load(Ordering::Relaxed),
            unreadable_body: counters.unreadable_body.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting connections and waits for requests in flight.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn receive(State(state): State<Arc<SubscriberState>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    let received_at = Instant::now();
    let Some((subscription, secret)) = state.endpoints.get(uri.path()) else {
        return StatusCode::NOT_FOUND;
    };
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED;
    }
    let now_unix = chrono::Utc::now().timestamp();
    let webhook_id = match check_callback(secret, &headers, &body, now_unix) {
        Ok(id) => id,
        Err(rejection) => {
            let counters = &state.counters;
            let counter = match rejection {
                Rejection::MissingHeader => &counters.missing_header,
                Rejection::InvalidTimestamp => &counters.invalid_timestamp,
                Rejection::StaleTimestamp => &counters.stale_timestamp,
                Rejection::BadSignature => &counters.bad_signature,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return StatusCode::UNAUTHORIZED;
        }
    };
    let key = serde_json::from_slice::<Event>(&body).ok().and_then(|event| EventKey::from_callback(&event));
    let Some(key) = key else {
        state.counters.unreadable_body.fetch_add(1, Ordering::Relaxed);
        return StatusCode::NO_CONTENT;
    };
    let mut book = state.book.lock().expect("receipts lock");
    match book.receipts.entry((*subscription, webhook_id)) {
        std::collections::hash_map::Entry::Occupied(mut slot) => slot.get_mut().count += 1,
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(Receipt { subscription: *subscription, key, count: 1, first_at: received_at });
            book.first_new.get_or_insert(received_at);
            book.last_new = Some(received_at);
        }
    }
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use axum::http::HeaderValue;
    use chrono::Utc;
    use reach_shared::events::EventType;
    use reach_shared::signing::signature_header;
    use secrecy::ExposeSecret;
    use serde_json::{Value, json};
    use uuid::Uuid;

    use super::*;

    fn headers(id: &str, timestamp: i64, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", HeaderValue::from_str(id).unwrap());
        headers.insert("webhook-timestamp", HeaderValue::from_str(&timestamp.to_string()).unwrap());
        headers.insert("webhook-signature", HeaderValue::from_str(signature).unwrap());
        headers
    }

    #[test]
    fn published_vectors_verify() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/standard-webhooks/vectors.json");
        let vectors: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let vectors = vectors["vectors"].as_array().unwrap();
        assert!(!vectors.is_empty());
        for vector in vectors {
            let secret = WebhookSecret::parse_any_length(vector["secret"].as_str().unwrap()).unwrap();
            let id = vector["msg_id"].as_str().unwrap();
            let timestamp = vector["timestamp"].as_i64().unwrap();
            let body = match vector.get("payload_repeat") {
                Some(repeat) => repeat["char"].as_str().unwrap().repeat(repeat["count"].as_u64().unwrap() as usize),
                None => vector["payload"].as_str().unwrap().to_owned(),
            };
            let expected = vector["expected"].as_str().unwrap();
            let signed = headers(id, timestamp, expected);
            assert_eq!(check_callback(&secret, &signed, body.as_bytes(), timestamp), Ok(id.to_owned()));
            // Several signatures, as during a secret rotation: any match is enough.
            let rotated = headers(id, timestamp, &format!("v1,AAAA {expected}"));
            assert_eq!(check_callback(&secret, &rotated, body.as_bytes(), timestamp + 299), Ok(id.to_owned()));

            let tampered = format!("{body} ");
            assert_eq!(check_callback(&secret, &signed, tampered.as_bytes(), timestamp), Err(Rejection::BadSignature));
            assert_eq!(check_callback(&secret, &signed, body.as_bytes(), timestamp + 301), Err(Rejection::StaleTimestamp));
            assert_eq!(check_callback(&secret, &signed, body.as_bytes(), timestamp - 301), Err(Rejection::StaleTimestamp));
        }
    }

    #[test]
    fn missing_or_invalid_headers_rejected() {
        let secret = WebhookSecret::parse(WebhookSecret::generate().expose_secret()).unwrap();
        let mut partial = headers("msg_1", 100, "v1,x");
        partial.remove("webhook-signature");
        assert_eq!(check_callback(&secret, &partial, b"{}", 100), Err(Rejection::MissingHeader));
        let mut bad_timestamp = headers("msg_1", 100, "v1,x");
        bad_timestamp.insert("webhook-timestamp", HeaderValue::from_static("soon"));
        assert_eq!(check_callback(&secret, &bad_timestamp, b"{}", 100), Err(Rejection::InvalidTimestamp));
        assert_eq!(check_callback(&secret, &headers("msg_1", 100, "v1a,x"), b"{}", 100), Err(Rejection::BadSignature));
    }

    fn callback_body(wamid: &str) -> (Uuid, Vec<u8>) {
        let event = Event {
            id: Uuid::now_v7(),
            event_type: EventType::MessageReceived,
            created_at: Utc::now(),
            org_id: Uuid::new_v4(),
            data: json!({"message": {"id": wamid, "type": "text"}}),
        };
        (event.id, event.to_body())
    }

    #[tokio::test]
    async fn server_verifies_records_and_rejects() {
        let secrets: Vec<String> = (0..2).map(|_| WebhookSecret::generate().expose_secret().to_owned()).collect();
        let endpoints = ["/hooks/all", "/hooks/messages"]
            .iter()
            .zip(&secrets)
            .map(|(path, secret)| Endpoint { path: (*path).to_owned(), secret: WebhookSecret::parse(secret).unwrap() })
            .collect();
        let subscriber = Subscriber::start("127.0.0.1:0".parse().unwrap(), endpoints).await.unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let post = |path: &str, secret: &str, id: Uuid, timestamp: i64, body: &[u8]| {
            let signer = WebhookSecret::parse(secret).unwrap();
            let signature = signature_header(&[signer], &id.to_string(), timestamp, body);
            client
                .post(format!("http://{}{path}", subscriber.addr))
                .header("webhook-id", id.to_string())
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(body.to_vec())
                .send()
        };
        let now = Utc::now().timestamp();
        let (id, body) = callback_body("wamid.1");

        assert_eq!(post("/hooks/all", &secrets[0], id, now, &body).await.unwrap().status(), 204);
        assert_eq!(post("/hooks/all", &secrets[0], id, now, &body).await.unwrap().status(), 204);
        assert_eq!(post("/hooks/messages", &secrets[1], id, now, &body).await.unwrap().status(), 204);
        // Signed with the other subscription's secret.
        assert_eq!(post("/hooks/messages", &secrets[0], id, now, &body).await.unwrap().status(), 401);
        assert_eq!(post("/hooks/all", &secrets[0], id, now - 600, &body).await.unwrap().status(), 401);
        assert_eq!(post("/hooks/none", &secrets[0], id, now, &body).await.unwrap().status(), 404);
        assert_eq!(post("/hooks/all", &secrets[0], id, now, b"not an event").await.unwrap().status(), 204);

        let livez = client.get(format!("http://{}/livez", subscriber.addr)).send().await.unwrap();
        assert_eq!(livez.status(), 200);

        let mut receipts = subscriber.receipts();
        receipts.sort_by_key(|r| r.subscription);
        assert_eq!(receipts.len(), 2);
        let arrivals = subscriber.arrivals();
        assert_eq!(arrivals.distinct, 2);
        assert!(arrivals.first.unwrap() <= arrivals.last.unwrap());
        assert_eq!((receipts[0].subscription, receipts[0].count), (0, 2));
        assert_eq!((receipts[1].subscription, receipts[1].count), (1, 1));
        assert_eq!(receipts[0].key, EventKey::Received { wamid: "wamid.1".into() });
        let rejections = subscriber.rejections();
        assert_eq!(rejections.bad_signature, 1);
        assert_eq!(rejections.stale_timestamp, 1);
        assert_eq!(rejections.unreadable_body, 1);
        assert_eq!(rejections.signature_failures(), 2);
        subscriber.stop().await;
    }
}
