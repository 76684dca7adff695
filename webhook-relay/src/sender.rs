//! One HTTP attempt of a callback: sign, send, read at most 64 KiB of the answer and
//! classify it. Redirects are never followed and proxies never used.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reach_shared::signing::signature_header;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER, USER_AGENT};
use uuid::Uuid;

use crate::ssrf::{self, GuardedResolver, NonPublicAddress};
use crate::subscriptions::Subscription;

/// At most this much of a response body is read and stored.
pub const MAX_STORED_RESPONSE_BYTES: usize = 64 * 1024;

/// The result of one attempt, as recorded in `webhook_attempts`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub attempted_at: DateTime<Utc>,
    pub duration: Duration,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response_body: Option<String>,
    pub response_truncated: bool,
    pub verdict: Verdict,
}

/// The delivery rules' reading of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Delivered,
    /// 410: the subscription is disabled and its pending deliveries parked.
    Gone,
    /// 429 or 503, with the `Retry-After` delay when one was given.
    Throttled(Option<Duration>),
    /// Any other failure: retried on the schedule.
    Failed,
    /// The target may never be reached (non-public address): parked at once.
    Forbidden,
}

#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    allow_private: bool,
}

impl Sender {
    pub fn new(allow_private: bool, connect_timeout: Duration, request_timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self { client, allow_private })
    }

    /// Signs and sends `body` to the subscription. Never returns an error: every
    /// failure becomes an [`Attempt`] with a verdict.
    pub async fn send(&self, subscription: &Subscription, event_id: Uuid, body: &[u8]) -> Attempt {
        let attempted_at = Utc::now();
        let started = Instant::now();
        let failed = |error: String, verdict: Verdict| Attempt {
            attempted_at,
            duration: started.elapsed(),
            status_code: None,
            error: Some(error),
            response_body: None,
            response_truncated: false,
            verdict,
        };

        // The resolver never sees address literals, so they are checked here.
        let literal: Option<std::net::IpAddr> = match subscription.url.host() {
            Some(url::Host::Ipv4(ip)) => Some(ip.into()),
            Some(url::Host::Ipv6(ip)) => Some(ip.into()),
            Some(url::Host::Domain(_)) | None => None,
        };
        if let Some(Err(refused)) = literal.map(|ip| ssrf::check_literal(ip, self.allow_private)) {
            return failed(refused.to_string(), Verdict::Forbidden);
        }

        let id = event_id.to_string();
        let timestamp = attempted_at.timestamp();
        let signature = signature_header(&subscription.secrets, &id, timestamp, body);
        let request = self
            .client
            .post(subscription.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("ReachFleet-Webhooks/", env!("CARGO_PKG_VERSION")))
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_vec());

        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                if let Some(refused) = find_cause::<NonPublicAddress>(&error) {
                    return failed(refused.to_string(), Verdict::Forbidden);
                }
                let kind = if error.is_timeout() {
                    "timed out"
                } else if error.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                return failed(format!("{kind}: {}", error_chain(&error)), Verdict::Failed);
            }
        };

        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        let mut body = Vec::new();
        let mut truncated = false;
        let mut read_error = None;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_STORED_RESPONSE_BYTES - body.len();
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        truncated = true;
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => {
                    read_error = Some(format!("failed to read the response: {}", error_chain(&error)));
                    break;
                }
            }
        }

        let verdict = classify(status, retry_after);
        let (text, cut) = stored_text(&body);
        Attempt {
            attempted_at,
            duration: started.elapsed(),
            status_code: Some(status.as_u16()),
            error: if verdict == Verdict::Delivered { None } else { read_error.or_else(|| Some(format!("endpoint answered {status}"))) },
            response_body: (!body.is_empty()).then_some(text),
            response_truncated: truncated || cut,
            verdict,
        }
    }
}

/// Decodes a response body for storage. Each byte of invalid UTF-8 becomes U+FFFD,
/// three bytes, so the text is cut again, at a character boundary, to stay within
/// [`MAX_STORED_RESPONSE_BYTES`]. Returns the text and whether that cut removed anything.
fn stored_text(body: &[u8]) -> (String, bool) {
    let mut text = String::from_utf8_lossy(body).into_owned();
    if text.len() <= MAX_STORED_RESPONSE_BYTES {
        return (text, false);
    }
    let mut end = MAX_STORED_RESPONSE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (text, true)
}

/// Applies the delivery rules to a status code.
pub fn classify(status: StatusCode, retry_after: Option<Duration>) -> Verdict {
    match status.as_u16() {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        429 | 503 => Verdict::Throttled(retry_after),
        // 3xx is a failure: following a redirect would send the callback, and its
        // signature, somewhere the customer never registered.
        _ => Verdict::Failed,
    }
}

/// Reads `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
    (at - Utc::now()).to_std().ok()
}

fn find_cause<'a, T: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = current {
        if let Some(found) = cause.downcast_ref::<T>() {
            return Some(found);
        }
        current = cause.source();
    }
    None
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(cause) = current {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        current = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_rules() {
        assert_eq!(classify(StatusCode::OK, None), Verdict::Delivered);
        assert_eq!(classify(StatusCode::NO_CONTENT, None), Verdict::Delivered);
        assert_eq!(classify(StatusCode::MOVED_PERMANENTLY, None), Verdict::Failed);
        assert_eq!(classify(StatusCode::GONE, None), Verdict::Gone);
        let wait = Some(Duration::from_secs(7));
        assert_eq!(classify(StatusCode::TOO_MANY_REQUESTS, wait), Verdict::Throttled(wait));
        assert_eq!(classify(StatusCode::SERVICE_UNAVAILABLE, None), Verdict::Throttled(None));
        assert_eq!(classify(StatusCode::INTERNAL_SERVER_ERROR, None), Verdict::Failed);
        assert_eq!(classify(StatusCode::BAD_REQUEST, None), Verdict::Failed);
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(120)));
        let later = (Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        headers.insert(RETRY_AFTER, later.parse().unwrap());
        let parsed = parse_retry_after(&headers).unwrap();
        assert!(parsed > Duration::from_secs(50) && parsed <= Duration::from_secs(60), "{parsed:?}");
        headers.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&headers), None);
    }
}
