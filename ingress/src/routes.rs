//! `/webhooks/whatsapp`: Meta's subscription handshake (GET) and notifications (POST).

use std::collections::HashMap;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use http_body_util::LengthLimitError;
use secrecy::ExposeSecret;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::meta;
use crate::store::{Outcome, StoreError, VerifiedWebhook};

/// Maximum time a client may take to send a webhook body.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `GET /webhooks/whatsapp`: returns the bare `hub.challenge` when `hub.verify_token`
/// matches, 403 otherwise. No signature is involved.
pub async fn verify_subscription(State(state): State<AppState>, Query(query): Query<HashMap<String, String>>) -> Response {
    let mode = query.get("hub.mode").map(String::as_str);
    let token = query.get("hub.verify_token").map(String::as_bytes).unwrap_or_default();
    let expected = state.settings.meta_verify_token.expose_secret().as_bytes();
    let token_matches = bool::from(token.ct_eq(expected));
    match (mode, token_matches, query.get("hub.challenge")) {
        (Some("subscribe"), true, Some(challenge)) => {
            tracing::info!("meta subscription handshake accepted");
            ([(header::CONTENT_TYPE, "text/plain")], challenge.clone()).into_response()
        }
        _ => {
            tracing::warn!(mode, "meta subscription handshake rejected");
            (StatusCode::FORBIDDEN, "verify token mismatch").into_response()
        }
    }
}

/// `POST /webhooks/whatsapp`: verifies the signature over the raw bytes, then stores
/// the body, its events and their outbox rows in one transaction, and responds 200
/// only after the commit.
pub async fn receive_notification(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let response = receive(&state, &headers, body).await;
    metrics::histogram!("reach_ingress_webhook_duration_seconds").record(started.elapsed().as_secs_f64());
    response
}

async fn receive(state: &AppState, headers: &HeaderMap, body: Body) -> Response {
    let limit = state.settings.body_limit_bytes;
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > limit as u64) {
        return too_large(limit);
    }
    // A client that stalls mid-body would otherwise hold its connection for ever.
    // NOTE: a client stalling inside the request headers is not timed out here; put the
    // public listener behind a proxy with a header timeout.
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit)).await;
    let Ok(read) = read else {
        tracing::warn!(timeout_seconds = BODY_READ_TIMEOUT.as_secs(), "timed out reading a webhook body");
        return (StatusCode::REQUEST_TIMEOUT, Json(json!({"error": "timed out reading the request body"}))).into_response();
    };
    let body = match read {
        Ok(body) => body,
        Err(error) => {
            let inner = error.into_inner();
            if inner.downcast_ref::<LengthLimitError>().is_some() {
                return too_large(limit);
            }
            tracing::warn!(error = %inner, "failed to read a webhook body");
            return (StatusCode::BAD_REQUEST, Json(json!({"error": "failed to read the request body"}))).into_response();
        }
    };

    let signature = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
    if let Err(rejection) = state.verifier.verify(signature, &body) {
        metrics::counter!("reach_webhooks_received_total", "outcome" => "unauthorized").increment(1);
        metrics::counter!("reach_webhook_signature_failures_total", "reason" => rejection.as_label()).increment(1);
        tracing::warn!(reason = rejection.as_label(), body_bytes = body.len(), "rejected a webhook with an invalid signature");
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": rejection.to_string()}))).into_response();
    }

    let body_sha256: [u8; 32] = Sha256::digest(&body).into();
    let parsed = meta::parse(&body);
    let webhook = VerifiedWebhook { body, body_sha256, parsed, received_at: Utc::now() };
    match state.store.persist(webhook).await {
        Ok(outcome) => {
            metrics::counter!("reach_webhooks_received_total", "outcome" => outcome.as_label()).increment(1);
            if let Outcome::Accepted { new_events, unroutable_items } = outcome {
                metrics::counter!("reach_ingress_events_total").increment(new_events as u64);
                if unroutable_items > 0 {
                    metrics::counter!("reach_ingress_unroutable_items_total").increment(unroutable_items as u64);
                    tracing::warn!(unroutable_items, "stored a webhook with items for unknown phone numbers or WABAs");
                }
            }
            match outcome {
                Outcome::Unroutable => tracing::warn!(body_sha256 = hex::encode(body_sha256), "stored an unroutable webhook"),
                Outcome::Unparseable => tracing::warn!(body_sha256 = hex::encode(body_sha256), "stored an unparseable webhook"),
                _ => {}
            }
            (StatusCode::OK, Json(json!({"status": outcome.as_label()}))).into_response()
        }
        Err(error) => {
            metrics::counter!("reach_webhooks_received_total", "outcome" => "error").increment(1);
            let status = match error {
                StoreError::Unavailable | StoreError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                StoreError::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, Json(json!({"error": error.to_string()}))).into_response()
        }
    }
}

fn too_large(limit: usize) -> Response {
    metrics::counter!("reach_webhooks_received_total", "outcome" => "too_large").increment(1);
    tracing::warn!(limit_bytes = limit, "rejected a webhook body over the size limit");
    (StatusCode::PAYLOAD_TOO_LARGE, Json(json!({"error": format!("body exceeds the limit of {limit} bytes")}))).into_response()
}
