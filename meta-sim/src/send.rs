//! `POST /{version}/{phone_number_id}/messages`: the send endpoint. Checks run in
//! Meta's order (path version, access token, phone number, body, injection rules, MPS,
//! pair rate, random fault), and every response, error or not, goes out after the drawn
//! latency.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use secrecy::ExposeSecret;
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::Sim;
use crate::meta_error::MetaError;
use crate::request::{MessageKind, SendRequest};
use crate::rules::RuleOutcome;
use crate::stats::GlobalCounters;
use crate::statuses::AcceptedMessage;
use crate::traffic::{Admission, EarlyRejection, NumberState};

/// Outcome of one request.
enum Decision {
    /// This response, sent once the latency has passed.
    Respond(Response),
    /// No response, as a `timeout` rule requests.
    Hang,
}

#[derive(Serialize)]
struct SendResponse<'a> {
    messaging_product: &'static str,
    contacts: [Contact<'a>; 1],
    messages: [SentMessage<'a>; 1],
}

#[derive(Serialize)]
struct Contact<'a> {
    input: &'a str,
    wa_id: &'a str,
}

#[derive(Serialize)]
struct SentMessage<'a> {
    id: &'a str,
    /// `accepted` for templates, absent otherwise, as at Meta.
    #[serde(skip_serializing_if = "Option::is_none")]
    message_status: Option<&'static str>,
}

/// Handles one send: decides the response at arrival, so the MPS window counts arrival
/// times, then delays the response until the drawn latency has passed.
pub async fn send_message(
    State(sim): State<Arc<Sim>>,
    Path((version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = sim.draw_latency();
    let respond_at = Instant::now() + latency;
    match decide(&sim, &version, &phone_number_id, &headers, &body, respond_at) {
        Decision::Respond(response) => {
            tokio::time::sleep_until(respond_at.into()).await;
            response
        }
        Decision::Hang => {
            // Held until the client gives up (axum then drops this future) or shutdown.
            sim.shutdown.cancelled().await;
            (StatusCode::SERVICE_UNAVAILABLE, "simulator shutting down").into_response()
        }
    }
}

#[tracing::instrument(level = "debug", skip_all, fields(phone_number_id = %phone_number_id))]
fn decide(
    sim: &Sim,
    version: &str,
    phone_number_id: &str,
    headers: &HeaderMap,
    body: &[u8],
    respond_at: Instant,
) -> Decision {
    if !is_graph_version(version) {
        return reject(MetaError::unknown_path(format!("Unknown version {version:?}: expected vNN.N, such as v21.0")));
    }
    let token = bearer_token(headers);
    let Some(index) = sim.index.get(phone_number_id).copied() else {
        GlobalCounters::add(&sim.counters.unknown_number_requests, 1);
        let token_known = token.is_some_and(|token| sim.numbers.iter().any(|number| token_matches(number, token)));
        tracing::debug!("send to an unknown phone number rejected");
        return reject(if token_known {
            MetaError::unknown_object(phone_number_id)
        } else {
            MetaError::invalid_token()
        });
    };
    let number = &sim.numbers[index];
    if !token.is_some_and(|token| token_matches(number, token)) {
        number.count_rejection(EarlyRejection::Auth);
        tracing::debug!("send with an invalid access token rejected");
        return reject(MetaError::invalid_token());
    }

    let request = match SendRequest::parse(body) {
        Ok(request) => request,
        Err(error) => {
            number.count_rejection(EarlyRejection::InvalidBody);
            tracing::debug!(code = error.code, "invalid send body rejected");
            return reject(error);
        }
    };

    let mut failure = None;
    let rules = sim.rules();
    if !rules.is_empty() {
        match rules.apply(phone_number_id, &request.to_digits) {
            None => {}
            Some(RuleOutcome::MetaError { error_code, http_status }) => {
                number.count_rejection(EarlyRejection::Injected);
                let status = StatusCode::from_u16(http_status).unwrap_or(StatusCode::BAD_REQUEST);
                return reject(MetaError::injected(status, error_code));
            }
            Some(RuleOutcome::Timeout) => {
                number.count_rejection(EarlyRejection::Injected);
                return Decision::Hang;
            }
            Some(RuleOutcome::Http5xx { http_status }) => {
                number.count_rejection(EarlyRejection::Injected);
                let status = StatusCode::from_u16(http_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let text = format!("{status}");
                return Decision::Respond((status, [(header::CONTENT_TYPE, "text/plain")], text).into_response());
            }
            Some(RuleOutcome::StatusFailed { error_code }) => failure = Some(error_code),
        }
    }

    let fault = sim.error_rate > 0.0 && rand::rng().random_bool(sim.error_rate);
    match number.admit(&request.to_digits, sim.pair_interval, fault, failure.is_some()) {
        Admission::Accepted => {}
        Admission::RateLimited => return reject(MetaError::rate_limited()),
        Admission::PairRateLimited => return reject(MetaError::pair_rate_limited()),
        Admission::Fault => return reject(MetaError::unknown_failure()),
    }

    let wamid = sim.wamids.issue(&request.to_digits);
    let response = SendResponse {
        messaging_product: "whatsapp",
        contacts: [Contact { input: &request.to, wa_id: &request.to_digits }],
        messages: [SentMessage {
            id: &wamid,
            message_status: (request.kind == MessageKind::Template).then_some("accepted"),
        }],
    };
    let response = Json(response).into_response();
    if let Some(queue) = &sim.statuses {
        queue.push(AcceptedMessage {
            number: index,
            wamid,
            read: sim.read_ratio > 0.0 && rand::rng().random_bool(sim.read_ratio),
            recipient_id: request.to_digits,
            biz_opaque_callback_data: request.biz_opaque_callback_data,
            kind: request.kind,
            failure,
            responded_at: respond_at,
            responded_unix: unix_seconds_at(respond_at),
        });
    }
    Decision::Respond(response)
}

fn reject(error: MetaError) -> Decision {
    Decision::Respond(error.into_response())
}

/// Whether `version` looks like a Graph API version: `v`, digits, `.`, digits.
fn is_graph_version(version: &str) -> bool {
    let Some((major, minor)) = version.strip_prefix('v').and_then(|rest| rest.split_once('.')) else {
        return false;
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
    all_digits(major) && all_digits(minor)
}

/// Extracts the token of an `Authorization: Bearer <token>` header. The scheme is
/// matched without regard to case.
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
}

fn token_matches(number: &NumberState, token: &[u8]) -> bool {
    bool::from(number.number.access_token.expose_secret().as_bytes().ct_eq(token))
}

/// Converts `instant` (now or later) to wall-clock Unix seconds.
fn unix_seconds_at(instant: Instant) -> f64 {
    let ahead = instant.saturating_duration_since(Instant::now());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    (now + ahead).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_versions() {
        for version in ["v21.0", "v1.0", "v123.45"] {
            assert!(is_graph_version(version), "{version}");
        }
        for version in ["21.0", "v21", "v.0", "v21.", "v2a.0", "V21.0", ""] {
            assert!(!is_graph_version(version), "{version}");
        }
    }

    #[test]
    fn bearer_scheme_ignores_case() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "bEaReR abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some(&b"abc"[..]));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }
}
