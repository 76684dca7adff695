//! The customer API on the public listener: `/v1/*`, authenticated by the identity
//! provider's JWT with an `org_id` claim. Every query a handler runs is scoped to that
//! org, and a row of another org gets the same 404 as a missing one.
//!
//! Errors are JSON `{"error": {"code", "message"}}` with a stable `code` a client can
//! branch on and a message that tells what to fix.
//!
//! - [`messages`]: `POST /v1/messages`, `GET /v1/messages/{id}`.
//! - [`subscriptions`]: `/v1/webhook-subscriptions`.
//! - [`deliveries`]: `/v1/webhook-deliveries`.

pub mod deliveries;
pub mod messages;
pub mod subscriptions;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use reach_shared::auth::{AuthError, TokenVerifier};
use reach_shared::outbox::OutboxWaker;
use reach_shared::secrets::SecretSealer;
use serde::de::DeserializeOwned;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// Largest request body of the customer API. Meta's own limits keep a message far
/// smaller.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

/// State shared by every customer API handler.
#[derive(Clone)]
pub struct ApiState {
    pub pool: PgPool,
    pub tokens: TokenVerifier,
    /// Seals webhook signing secrets before they are stored.
    pub sealer: SecretSealer,
    /// Wakes this process's outbox publishers after a commit that wrote outbox rows.
    pub waker: OutboxWaker,
    /// Send shard queues; a message is routed to one by its phone number.
    pub send_shards: u16,
    /// Stores new messages, group-committed.
    pub messages: messages::MessageWriter,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .merge(messages::routes())
        .merge(subscriptions::routes())
        .merge(deliveries::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route under /v1")
}

async fn method_not_allowed() -> Response {
    let body = json!({"error": {"code": "method_not_allowed", "message": "this route does not take this HTTP method; see the API reference in the README"}});
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// The authenticated caller: a user of one org.
#[derive(Debug, Clone)]
pub struct OrgCaller {
    pub org_id: Uuid,
    pub user_id: String,
}

impl FromRequestParts<ApiState> for OrgCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let authorization = parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let claims = state.tokens.verify_header(authorization).map_err(ApiError::Unauthorized)?;
        let org_id = claims.org_id.ok_or(ApiError::Forbidden("this token has no org_id claim: use a token issued for an org"))?;
        Ok(Self { org_id, user_id: claims.sub })
    }
}

/// A JSON body, parsed with errors in the API's format: 413 over the body limit, 422
/// when the JSON is invalid or does not fit the request type.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<ApiState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &ApiState) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge
            } else {
                ApiError::BadRequest { code: "unreadable_body", message: "failed to read the request body".to_owned() }
            }
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|error| ApiError::Invalid {
            code: "invalid_body",
            message: format!("invalid JSON body: {error}"),
        })
    }
}

/// An error of the customer API. Each variant maps to one HTTP status; `code` values
/// are part of the API and never change meaning.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// The request is well-formed JSON but a field is missing or invalid.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("the request body exceeds {BODY_LIMIT_BYTES} bytes")]
    TooLarge,
    /// The database is unreachable or timed out; the client may retry.
    #[error("the service is temporarily unavailable; retry later")]
    Unavailable,
    /// Anything else; the cause is logged where it happened, never returned.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(AuthError::MissingToken) => "missing_token",
            ApiError::Unauthorized(_) => "invalid_token",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::BadRequest { code, .. } | ApiError::Invalid { code, .. } | ApiError::Conflict { code, .. } => code,
            ApiError::TooLarge => "body_too_large",
            ApiError::Unavailable => "unavailable",
            ApiError::Internal => "internal",
        }
    }

    /// Maps a database error, logging its cause: transient failures become 503 so the
    /// client retries, anything else 500.
    pub fn database(error: sqlx::Error, context: &'static str) -> Self {
        if reach_shared::db::is_transient(&error) {
            tracing::warn!(%error, context, "database unavailable in a customer API request");
            ApiError::Unavailable
        } else {
            tracing::error!(%error, context, "database error in a customer API request");
            ApiError::Internal
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        metrics::counter!("reach_api_errors_total", "code" => self.code()).increment(1);
        (status, Json(json!({"error": {"code": self.code(), "message": self.to_string()}}))).into_response()
    }
}
