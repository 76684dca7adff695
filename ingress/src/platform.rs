//! The operator listener (`REACH_ADMIN_ADDR`): `/platform/*`. Every request, refused ones
//! included, writes a row to `platform.audit_events` before its response leaves; when
//! the audit row cannot be written the response is a 503, never an unaudited answer.


use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use reach_shared::auth::{AuthError, Claims, TokenVerifier};
use reach_shared::audit::{self, AuditEvent};
use reach_shared::{health, parked};
use serde_json::json;
use sqlx::PgPool;


#[derive(Clone)]
pub struct PlatformState {
    pub pool: PgPool,
    pub tokens: TokenVerifier,
}

/// The facts the audit row records about one request; handlers fill it in through a
/// response extension.
#[derive(Debug, Clone, Default)]
struct AuditNote {
    action: &'static str,
    target_type: Option<&'static str>,
    target_id: Option<String>,
    reason: Option<String>,
    actor: Option<Claims>,
}

pub fn router(state: PlatformState) -> Router {
    Router::new()
        .route("/platform/health", get(show_health))
        .route("/platform/webhook-deliveries/replay", post(replay_parked))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), audit))
        .with_state(state)
}

/// Authenticates an operator: 401 without a valid token, 403 without `platform_admin`.
fn authorize(state: &PlatformState, headers: &HeaderMap) -> Result<Claims, (StatusCode, AuditNote, Response)> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.tokens.verify_header(authorization) {
        Ok(claims) if claims.platform_admin => Ok(claims),
        Ok(claims) => {
            let message = "this token lacks the platform_admin claim";
            let note = AuditNote { reason: Some(message.to_owned()), actor: Some(claims), ..AuditNote::default() };
            Err((StatusCode::FORBIDDEN, note, error_response(StatusCode::FORBIDDEN, "forbidden", message)))
        }
        Err(error) => {
            let code = match error {
                AuthError::MissingToken => "missing_token",
                AuthError::InvalidToken(_) | AuthError::NotConfigured => "invalid_token",
            };
            let note = AuditNote { reason: Some(error.to_string()), ..AuditNote::default() };
            Err((StatusCode::UNAUTHORIZED, note, error_response(StatusCode::UNAUTHORIZED, code, &error.to_string())))
        }
    }
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": {"code": code, "message": message}}))).into_response()
}

async fn not_found() -> Response {
    let mut response = error_response(StatusCode::NOT_FOUND, "not_found", "no such platform route");
    response.extensions_mut().insert(AuditNote { action: "Platform.NotFound", ..AuditNote::default() });
    response
}

/// Writes the audit row of every request after the handler ran.
async fn audit(State(state): State<PlatformState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string());
    let user_agent = request.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let response = next.run(request).await;
    let note = response.extensions().get::<AuditNote>().cloned().unwrap_or_default();
    let action = if note.action.is_empty() { "Platform.Unknown" } else { note.action };
    let status = response.status();

    let event = AuditEvent {
        actor_user_id: note.actor.as_ref().map(|c| c.sub.clone()),
        actor_email: note.actor.as_ref().and_then(|c| c.email.clone()),
        action: action.to_owned(),
        target_type: note.target_type.map(str::to_owned),
        target_id: note.target_id.or(Some(path)),
        target_org_id: note.actor.as_ref().and_then(|c| c.org_id),
        ip,
        user_agent,
        status_code: i32::from(status.as_u16()),
        reason: note.reason,
    };
    let written = audit::record(&state.pool, &event).await;
    match written {
        Ok(_) => {
            metrics::counter!("reach_platform_requests_total", "action" => action, "status" => status.as_str().to_owned()).increment(1);
            response
        }
        Err(error) => {
            tracing::error!(%error, action, "failed to write an audit event, refusing the response");
            metrics::counter!("reach_platform_audit_failures_total").increment(1);
            error_response(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", "the audit log is unavailable; try again")
        }
    }
}

/// `GET /platform/health`.
async fn show_health(State(state): State<PlatformState>, headers: HeaderMap) -> Response {
    const ACTION: &str = "PlatformHealth.Show";
    let claims = match authorize(&state, &headers) {
        Ok(claims) => claims,
        Err((_, mut note, mut response)) => {
            note.action = ACTION;
            note.target_type = Some("platform");
            response.extensions_mut().insert(note);
            return response;
        }
    };
    let note = AuditNote { action: ACTION, target_type: Some("platform"), target_id: Some("health".to_owned()), reason: None, actor: Some(claims) };
    let mut response = match health::report(&state.pool).await {
        Ok(report) => (StatusCode::OK, Json(report)).into_response(),
        Err(error) => {
            tracing::error!(%error, "failed to read the health figures");
            error_response(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", "failed to read the health figures; try again")
        }
    };
    response.extensions_mut().insert(note);
    response
}

/// Body of `POST /platform/webhook-deliveries/replay`: a selection and the reason.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default)]
    ids: Vec<i64>,
    org_id: Option<uuid::Uuid>,
    subscription_id: Option<uuid::Uuid>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    reason: String,
}

impl ReplayRequest {
    fn selection(&self) -> parked::Selection {
        parked::Selection {
            ids: self.ids.clone(),
            org_id: self.org_id,
            subscription_id: self.subscription_id,
            since: self.since,
            until: self.until,
        }
    }
}

/// `POST /platform/webhook-deliveries/replay`: puts the selected parked deliveries back
/// to pending. The replay writes its own audit event (`ParkedDeliveries.Replay`) in its
/// transaction; the request is audited like every other.
async fn replay_parked(
    State(state): State<PlatformState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    const ACTION: &str = "PlatformParkedDeliveries.Replay";
    let mut note = AuditNote { action: ACTION, target_type: Some("webhook_deliveries"), ..AuditNote::default() };
    let claims = match authorize(&state, &headers) {
        Ok(claims) => claims,
        Err((_, refused, mut response)) => {
            note.reason = refused.reason;
            note.actor = refused.actor;
            response.extensions_mut().insert(note);
            return response;
        }
    };
    note.actor = Some(claims.clone());
    let request: ReplayRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            let message = format!("invalid request body: {error}");
            note.reason = Some(message.clone());
            let mut response = error_response(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", &message);
            response.extensions_mut().insert(note);
            return response;
        }
    };
    note.reason = Some(request.reason.clone());
    let invalid = if request.reason.trim().is_empty() {
        Some("reason is required: say why these deliveries are replayed")
    } else if request.selection().is_empty() {
        Some("select what to replay: ids, or a window with since/until, org_id or subscription_id")
    } else {
        None
    };
    if let Some(message) = invalid {
        let mut response = error_response(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message);
        response.extensions_mut().insert(note);
        return response;
    }

    let requester = parked::Requester {
        user_id: claims.sub.clone(),
        email: claims.email.clone(),
        ip: Some(peer.ip().to_string()),
        user_agent: headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned),
    };
    let mut response = match parked::replay(&state.pool, &request.selection(), &request.reason, &requester, |_| {}).await {
        Ok(report) => (StatusCode::OK, Json(report)).into_response(),
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "failed to replay parked deliveries");
            error_response(StatusCode::SERVICE_UNAVAILABLE, "replay_failed", "failed to replay the parked deliveries; try again")
        }
    };
    response.extensions_mut().insert(note);
    response
}
