//! Posting Meta-signed webhooks to the ingress with bounded concurrency and an optional
//! target rate, recording when each was sent and how the ingress responded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use reach_shared::signing::meta_signature;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::Url;

use crate::generator::{BusinessNumber, GeneratedWebhook, Generator, Shape};

/// The ingress response to one webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngressResponse {
    /// An HTTP response; `outcome` is the `status` field of a JSON body, such as
    /// `accepted` or `duplicate`.
    Http { status: u16, outcome: Option<String> },
    /// No HTTP response: refused connection, reset, timeout.
    Transport(String),
}

/// One post of one webhook.
#[derive(Debug, Clone)]
pub struct PostResult {
    /// Just before the request was written.
    pub sent_at: Instant,
    /// Until the whole response was read.
    pub response_time: Duration,
    pub response: IngressResponse,
}

impl PostResult {
    /// Returns true when the ingress responded 200.
    pub fn accepted(&self) -> bool {
        matches!(self.response, IngressResponse::Http { status: 200, .. })
    }

    /// Returns the ingress's outcome label, or `http_<status>`, or `transport_error`.
    pub fn label(&self) -> String {
        match &self.response {
            IngressResponse::Http { status: 200, outcome: Some(outcome) } => outcome.clone(),
            IngressResponse::Http { status, .. } => format!("http_{status}"),
            IngressResponse::Transport(_) => "transport_error".to_owned(),
        }
    }
}

/// Destination, signing secret and pacing of a run's generated webhooks.
#[derive(Debug, Clone)]
pub struct TrafficSettings {
    /// Base URL of the ingress, such as `http://127.0.0.1:8080`.
    pub ingress_url: Url,
    /// The Meta app secret the ingress verifies with.
    pub app_secret: SecretString,
    /// Generated webhooks to send, ignored when `duration` is set.
    pub webhooks: u64,
    /// Send for this long instead of a count: with a rate, `rate × duration` webhooks;
    /// without one, as many as start before it has passed.
    pub duration: Option<Duration>,
    pub pace: Pace,
    /// Seed of the generator; the same seed gives the same shapes and contents.
    pub seed: u64,
    pub shape: Shape,
    pub request_timeout: Duration,
}

impl TrafficSettings {
    pub fn poster(&self) -> anyhow::Result<Poster> {
        Poster::new(&self.ingress_url, self.app_secret.clone(), self.pace.concurrency, self.request_timeout)
    }

    /// Describes how much is sent, for progress lines.
    pub fn amount(&self) -> String {
        match (self.duration, self.pace.rate) {
            (Some(duration), Some(rate)) => format!("{} webhooks over {} s", self.rate_count(rate, duration), duration.as_secs_f64()),
            (Some(duration), None) => format!("webhooks for {} s", duration.as_secs_f64()),
            (None, _) => format!("{} webhooks", self.webhooks),
        }
    }

    fn rate_count(&self, rate: f64, duration: Duration) -> usize {
        (rate * duration.as_secs_f64()).round() as usize
    }

    /// Returns the run's webhooks: the generator's bodies of the configured shape, as
    /// many as the count or the duration gives. A duration without a rate counts from
    /// the first body taken.
    pub fn webhooks(&self, numbers: Vec<BusinessNumber>, run_tag: &str) -> Box<dyn Iterator<Item = GeneratedWebhook> + Send> {
        let generator = Generator::new(numbers, self.seed, run_tag).with_shape(self.shape);
        match (self.duration, self.pace.rate) {
            (Some(duration), Some(rate)) => Box::new(generator.take(self.rate_count(rate, duration))),
            (Some(duration), None) => {
                let mut deadline = None;
                Box::new(generator.take_while(move |_| Instant::now() < *deadline.get_or_insert_with(|| Instant::now() + duration)))
            }
            (None, _) => Box::new(generator.take(self.webhooks as usize)),
        }
    }
}

/// Counts of the ingress's responses to a run.
#[derive(Debug, Default)]
pub struct ResponseTally {
    pub posted: u64,
    /// Responses with status 200.
    pub accepted: u64,
    /// Responses with another status, or no response.
    pub rejected: u64,
    /// Of the rejected, those with no HTTP response.
    pub transport_errors: u64,
    /// Posts by [`PostResult::label`].
    pub outcomes: BTreeMap<String, u64>,
    /// Response times of the accepted posts.
    pub accepted_latencies: Vec<Duration>,
    /// The first few transport errors, for the report.
    pub sample_errors: Vec<String>,
}

impl ResponseTally {
    pub fn record(&mut self, result: &PostResult) {
        self.posted += 1;
        *self.outcomes.entry(result.label()).or_default() += 1;
        if result.accepted() {
            self.accepted += 1;
            self.accepted_latencies.push(result.response_time);
            return;
        }
        self.rejected += 1;
        if let IngressResponse::Transport(error) = &result.response {
            self.transport_errors += 1;
            if self.sample_errors.len() < 3 {
                self.sample_errors.push(error.clone());
            }
        }
    }
}

/// Signs and posts bodies to `POST /webhooks/whatsapp`.
pub struct Poster {
    client: reqwest::Client,
    url: Url,
    app_secret: SecretString,
}

impl Poster {
    /// `ingress_url` is the base URL of the ingress, such as `http://127.0.0.1:8080`.
    pub fn new(ingress_url: &Url, app_secret: SecretString, concurrency: usize, timeout: Duration) -> anyhow::Result<Self> {
        let url = ingress_url.join("/webhooks/whatsapp").context("failed to build the webhook URL")?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(concurrency)
            .tcp_nodelay(true)
            .timeout(timeout)
            .build()
            .context("failed to build the HTTP client")?;
        Ok(Self { client, url, app_secret })
    }

    /// Posts one body with its `X-Hub-Signature-256`.
    pub async fn post(&self, body: Vec<u8>) -> PostResult {
        let signature = meta_signature(self.app_secret.expose_secret(), &body);
        let sent_at = Instant::now();
        let request = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("x-hub-signature-256", signature)
            .body(body);
        let response = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.bytes().await {
                    Ok(bytes) => {
                        let outcome = serde_json::from_slice::<Value>(&bytes)
                            .ok()
                            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned));
                        IngressResponse::Http { status, outcome }
                    }
                    Err(error) => IngressResponse::Transport(error.to_string()),
                }
            }
            Err(error) => IngressResponse::Transport(error.to_string()),
        };
        PostResult { sent_at, response_time: sent_at.elapsed(), response }
    }
}

/// Pacing of a stream of posts.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Posts in flight at most.
    pub concurrency: usize,
    /// Target posts per second; `None` sends as fast as the concurrency allows.
    pub rate: Option<f64>,
}

/// Posts every body of `webhooks`, each with its context `T`, and hands each result to
/// `on_result` in completion order. With a rate, post `i` starts no earlier than
/// `i / rate` seconds after the first. A slow ingress makes posts start late, because
/// the concurrency limit is never exceeded to catch up.
pub async fn post_all<T, I, F>(poster: Arc<Poster>, pace: Pace, webhooks: I, mut on_result: F)
where
    T: Send + 'static,
    I: Iterator<Item = (Vec<u8>, T)>,
    F: FnMut(T, PostResult),
{
    let started = tokio::time::Instant::now();
    let interval = pace.rate.map(|rate| Duration::from_secs_f64(1.0 / rate));
    futures::stream::iter(webhooks.enumerate())
        .map(|(index, (body, context))| {
            let poster = poster.clone();
            tokio::spawn(async move {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(started + interval.mul_f64(index as f64)).await;
                }
                (context, poster.post(body).await)
            })
        })
        .buffer_unordered(pace.concurrency.max(1))
        .for_each(|joined| {
            match joined {
                Ok((context, result)) => on_result(context, result),
                Err(error) => tracing::error!(%error, "a webhook post task failed"),
            }
            futures::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use bytes::Bytes;
    use tokio::net::TcpListener;

    use super::*;

    /// Starts an ingress stand-in that checks the signature like the real one and
    /// reports `duplicate` for a body it has seen.
    async fn fake_ingress(secret: &'static str) -> (Url, Arc<Mutex<Vec<Bytes>>>) {
        let seen = Arc::new(Mutex::new(Vec::<Bytes>::new()));
        let state = seen.clone();
        let router = Router::new().route(
            "/webhooks/whatsapp",
            post(move |headers: HeaderMap, body: Bytes| {
                let seen = state.clone();
                async move {
                    let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    if signature != meta_signature(secret, &body) {
                        return (StatusCode::UNAUTHORIZED, r#"{"error":"mismatch"}"#.to_owned());
                    }
                    let mut seen = seen.lock().unwrap();
                    let outcome = if seen.contains(&body) { "duplicate" } else { "accepted" };
                    seen.push(body);
                    (StatusCode::OK, format!(r#"{{"status":"{outcome}"}}"#))
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (url, seen)
    }

    #[tokio::test]
    async fn posts_signed_bodies_and_reads_outcomes() {
        let (url, seen) = fake_ingress("s3cret").await;
        let poster = Arc::new(Poster::new(&url, "s3cret".to_owned().into(), 4, Duration::from_secs(5)).unwrap());
        let bodies = (0..20).map(|i| (format!("{{\"n\":{}}}", i % 10).into_bytes(), i));
        let mut results = Vec::new();
        post_all(poster, Pace { concurrency: 4, rate: None }, bodies, |index, result| results.push((index, result))).await;

        assert_eq!(results.len(), 20);
        assert!(results.iter().all(|(_, r)| r.accepted()));
        let duplicates = results.iter().filter(|(_, r)| r.label() == "duplicate").count();
        assert_eq!(duplicates, 10);
        assert_eq!(seen.lock().unwrap().len(), 20);

        let wrong = Poster::new(&url, "other".to_owned().into(), 1, Duration::from_secs(5)).unwrap();
        let rejected = wrong.post(b"{}".to_vec()).await;
        assert!(!rejected.accepted());
        assert_eq!(rejected.label(), "http_401");
    }

    #[tokio::test]
    async fn rate_spreads_posts() {
        let (url, _) = fake_ingress("s").await;
        let poster = Arc::new(Poster::new(&url, "s".to_owned().into(), 8, Duration::from_secs(5)).unwrap());
        let started = Instant::now();
        let bodies = (0..11).map(|i| (format!("{{\"i\":{i}}}").into_bytes(), ()));
        let mut count = 0;
        post_all(poster, Pace { concurrency: 8, rate: Some(50.0) }, bodies, |_, _| count += 1).await;
        assert_eq!(count, 11);
        // The 11th post starts 10 intervals of 20 ms after the first.
        assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn refused_connection_is_transport_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        let poster = Poster::new(&url, "s".to_owned().into(), 1, Duration::from_secs(2)).unwrap();
        let result = poster.post(b"{}".to_vec()).await;
        assert!(matches!(result.response, IngressResponse::Transport(_)));
        assert_eq!(result.label(), "transport_error");
    }
}
