//! The Graph API send call and the classification of its errors. Meta's errors are
//! classified by `error.code`, never by the HTTP status, because Meta returns most
//! errors with 400 whatever their kind.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use url::Url;

/// The consequence of a failed send for the message and its phone number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The number sent too fast (130429, 80007, 4, 131057): slow the number, retry.
    Throttled,
    /// Too many messages to one recipient (131056): delay that recipient only.
    PairRate,
    /// A temporary failure on Meta's side (5xx, 131000, 131016, 1, 2): retry with
    /// backoff.
    Transient,
    /// The message can never be sent as it is: fail it.
    Permanent,
    /// The account or number cannot send at all (bad token, blocked, unpaid): pause
    /// the number and keep its messages queued.
    Account,
}

impl ErrorClass {
    pub fn as_label(self) -> &'static str {
        match self {
            ErrorClass::Throttled => "throttled",
            ErrorClass::PairRate => "pair_rate",
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Account => "account",
        }
    }
}

/// Classifies a Graph API error code. Codes Meta documents for the Cloud API:
/// throttling 4, 80007, 130429, 131057; pair rate 131056; account-level 0 and 190
/// (access token), 3 and 10 (permission), 368 (policy block), 131031 (account
/// locked), 131048 (spam rate limit), 131049 (ecosystem limit), 130497 (country
/// restriction); temporary 1, 2, 131000, 131016. Every other code (100, 131008,
/// 131009, 131021, 131026, 131047, 131050, 131051, 130472, 132000 to 132018, 133010,
/// ...) concerns the message itself and is permanent.
pub fn classify(code: i64, http_status: u16) -> ErrorClass {
    match code {
        4 | 80007 | 130429 | 131057 => ErrorClass::Throttled,
        131056 => ErrorClass::PairRate,
        0 | 3 | 10 | 190 | 368 | 131031 | 131048 | 131049 | 130497 => ErrorClass::Account,
        1 | 2 | 131000 | 131016 => ErrorClass::Transient,
        _ if http_status >= 500 => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

/// An error object from a Graph API response.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphError {
    pub http_status: u16,
    pub code: i64,
    pub title: String,
}

/// The result of one send call.
#[derive(Debug, Clone, PartialEq)]
pub enum SendResult {
    Accepted { wamid: String },
    Rejected(GraphError),
    /// The request never left: connecting failed. Safe to send again.
    NotSent(String),
    /// The request may have reached Meta (timeout, connection lost, unreadable
    /// response), so Meta may have taken the message.
    Uncertain(String),
}

/// A Graph API client for the send endpoint.
#[derive(Clone)]
pub struct GraphClient {
    http: reqwest::Client,
    base: Url,
    version: String,
}

impl GraphClient {
    pub fn new(base: Url, version: String, timeout: Duration, max_idle_per_host: usize) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("reach-dispatcher/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, base, version })
    }

    /// `POST {base}/{version}/{phone_number_id}/messages` with the number's token.
    pub async fn send(&self, phone_number_id: &str, token: &SecretString, body: &Value) -> SendResult {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map(|mut segments| {
                segments.pop_if_empty().push(&self.version).push(phone_number_id).push("messages");
            })
            .expect("REACH_META_GRAPH_URL is checked to be an http(s) URL at start");
        let sent = self.http.post(url).bearer_auth(token.expose_secret()).json(body).send().await;
        let response = match sent {
            Ok(response) => response,
            Err(error) if error.is_connect() => return SendResult::NotSent(error_chain(&error)),
            Err(error) => return SendResult::Uncertain(error_chain(&error)),
        };
        let status = response.status().as_u16();
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(error) => return SendResult::Uncertain(error_chain(&error)),
        };
        parse_response(status, &bytes)
    }
}

fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads a send response: a wamid on 2xx, Meta's error object otherwise.
pub fn parse_response(status: u16, body: &[u8]) -> SendResult {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if (200..300).contains(&status) {
        let wamid = json
            .as_ref()
            .and_then(|v| v.pointer("/messages/0/id"))
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty() && id.len() <= 512);
        return match wamid {
            Some(wamid) => SendResult::Accepted { wamid: wamid.to_owned() },
            // A success response without a readable id: Meta may have taken the send.
            None => SendResult::Uncertain(format!("HTTP {status} without a message id")),
        };
    }
    let error = json.as_ref().and_then(|v| v.get("error"));
    let code = error.and_then(|e| e.get("code")).and_then(Value::as_i64);
    let title = error
        .and_then(|e| e.get("error_data").and_then(|d| d.get("details")).or_else(|| e.get("message")))
        .and_then(Value::as_str)
        .unwrap_or("")
        .chars()
        .take(300)
        .collect();
    match code {
        Some(code) => SendResult::Rejected(GraphError { http_status: status, code, title }),
        // Not a Graph error object (a proxy's page, say): judge by the status alone.
        None if status >= 500 || status == 429 => {
            SendResult::Rejected(GraphError { http_status: status, code: if status == 429 { 4 } else { 1 }, title: format!("HTTP {status}") })
        }
        None => SendResult::Rejected(GraphError { http_status: status, code: 100, title: format!("HTTP {status} without a Graph error") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_classify_by_kind() {
        for code in [130429, 80007, 4, 131057] {
            assert_eq!(classify(code, 400), ErrorClass::Throttled, "{code}");
        }
        assert_eq!(classify(131056, 400), ErrorClass::PairRate);
        for code in [190, 0, 3, 10, 131048, 131049, 368, 131031, 130497] {
            assert_eq!(classify(code, 400), ErrorClass::Account, "{code}");
        }
        for code in [131026, 131047, 131050, 131051, 132000, 132001, 132018, 100, 130472, 131008, 131009, 131021] {
            assert_eq!(classify(code, 400), ErrorClass::Permanent, "{code}");
        }
        assert_eq!(classify(131000, 500), ErrorClass::Transient);
        assert_eq!(classify(131026, 503), ErrorClass::Transient, "an unknown code on a 5xx is retried");
        assert_eq!(classify(130429, 500), ErrorClass::Throttled, "the code decides, not the status");
    }

    #[test]
    fn responses_parse() {
        let ok = br#"{"messaging_product":"whatsapp","contacts":[{"input":"1","wa_id":"1"}],"messages":[{"id":"wamid.X"}]}"#;
        assert_eq!(parse_response(200, ok), SendResult::Accepted { wamid: "wamid.X".into() });
        let throttled = br#"{"error":{"message":"(#130429) Rate limit hit","type":"OAuthException","code":130429,"error_data":{"messaging_product":"whatsapp","details":"Cloud API message throughput has been reached."}}}"#;
        match parse_response(400, throttled) {
            SendResult::Rejected(error) => {
                assert_eq!(error.code, 130429);
                assert!(error.title.contains("throughput"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(parse_response(502, b"<html>bad gateway</html>"), SendResult::Rejected(GraphError { code: 1, .. })));
        assert!(matches!(parse_response(200, b"{}"), SendResult::Uncertain(_)));
    }
}
