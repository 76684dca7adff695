//! The operator listener (`REACH_ADMIN_ADDR`): `/platform/*`. Every request, refused ones
//! included, writes a row to `platform.audit_events` before its response leaves; when
//! the audit row cannot be written the response is a 503, never an unaudited answer.

mod health;

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use reach_shared::auth::{AuthError, Claims, TokenVerifier};
use serde_json::json;
use sqlx::PgPool;

pub use health::HealthReport;

#[derive(Clone)]
pub struct PlatformState {
    pub pool: PgPool,
    pub tokens: TokenVerifier,
}

/// What the audit row records about one request; handlers fill it in through a
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
        .route("/platform/health", get(health::show))
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

    let written = sqlx::query(
        "INSERT INTO platform.audit_events
             (actor_user_id, actor_email, action, target_type, target_id, target_org_id, ip, user_agent, status_code, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(note.actor.as_ref().map(|c| c.sub.clone()))
    .bind(note.actor.as_ref().and_then(|c| c.email.clone()))
    .bind(action)
    .bind(note.target_type)
    .bind(note.target_id.or(Some(path)))
    .bind(note.actor.as_ref().and_then(|c| c.org_id))
    .bind(ip)
    .bind(user_agent)
    .bind(i32::from(status.as_u16()))
    .bind(note.reason)
    .execute(&state.pool)
    .await;
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
