//! `/v1/webhook-subscriptions`: the org's subscriber endpoints and their Standard
//! Webhooks signing secrets.
//!
//! - `POST /webhook-subscriptions` `{"url", "events"}` creates one (201) and returns its
//!   `whsec_` secret, the only time besides a rotation that a secret is returned.
//! - `GET /webhook-subscriptions` lists the org's subscriptions as `{"data": [...]}`.
//! - `GET`, `PATCH` and `DELETE /webhook-subscriptions/{id}`. `PATCH` changes `url` or
//!   `events`, and sets `status` to `active` (also to enable again a subscription the
//!   relay disabled after a 410) or `disabled`.
//! - `POST /webhook-subscriptions/{id}/rotate-secret` issues a new secret. The previous
//!   ones keep signing for 24 hours, so callbacks carry one signature per secret meanwhile.
//!
//! A deleted subscription is kept with status `deleted` so its delivery history stays
//! listable, and this API returns 404 for it as for one that never existed. Disabling
//! or deleting a subscription parks its pending deliveries. The relay caches
//! subscriptions for `REACH_RELAY_SUBSCRIPTION_CACHE_MS`, so a change reaches it within
//! that time, or within twice that time for a subscription the relay itself disabled
//! after a 410.
//!
//! The URL is checked for form only. The relay resolves the host when it delivers and
//! rejects non-public addresses there.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use reach_shared::events::EventType;
use reach_shared::signing::WebhookSecret;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiState, OrgCaller};

/// Maximum length of a subscriber URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;

/// Subscriptions an org may have, deleted ones not counted. The relay makes one request
/// per matching subscription for every event, so this bounds the fan-out of one event.
pub const MAX_SUBSCRIPTIONS_PER_ORG: i64 = 50;

/// Secrets of one subscription that may be in their 24-hour rotation window at once.
/// Each adds a signature to every callback, so repeated rotations cannot grow the
/// `webhook-signature` header without bound.
pub const MAX_ROTATING_SECRETS: i64 = 4;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/webhook-subscriptions", post(create).get(list))
        .route("/webhook-subscriptions/{id}", get(show).patch(update).delete(remove))
        .route("/webhook-subscriptions/{id}/rotate-secret", post(rotate_secret))
}

/// A subscription as the API returns it. It never carries a secret.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Subscription {
    pub id: Uuid,
    pub url: String,
    /// Event types in sorted order, or the single element `*`.
    pub events: Vec<String>,
    /// `active` or `disabled`.
    pub status: String,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns of [`Subscription`], for `SELECT` and `RETURNING`.
const COLUMNS: &str = "id, url, event_types AS events, status, disabled_reason, created_at, updated_at";

/// Body of `POST /webhook-subscriptions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    url: String,
    events: Vec<String>,
}

/// Body of `PATCH /webhook-subscriptions/{id}`. Absent fields keep their value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    url: Option<String>,
    events: Option<Vec<String>>,
    status: Option<RequestedStatus>,
}

/// The statuses a customer may set. `deleted` is reached through `DELETE` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RequestedStatus {
    Active,
    Disabled,
}

impl RequestedStatus {
    fn as_str(self) -> &'static str {
        match self {
            RequestedStatus::Active => "active",
            RequestedStatus::Disabled => "disabled",
        }
    }
}

/// The response of a create or a rotation: the subscription and its new secret.
#[derive(Serialize)]
struct WithSecret<'a> {
    #[serde(flatten)]
    subscription: Subscription,
    /// The new `whsec_` secret. It is returned only in this response.
    secret: &'a str,
    /// When the secrets replaced by a rotation stop signing. Absent on a create.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_secret_expires_at: Option<DateTime<Utc>>,
}

#[tracing::instrument(skip_all, fields(org_id = %caller.org_id, subscription_id))]
async fn create(State(state): State<ApiState>, caller: OrgCaller, ApiJson(request): ApiJson<CreateRequest>) -> Result<Response, ApiError> {
    let url = validate_url(&request.url)?;
    let events = validate_events(request.events)?;

    let mut tx = state.pool.begin().await.map_err(|e| ApiError::database(e, "begin creating a subscription"))?;
    // Serialises the creates of one org so the count below stays true until the commit.
    // NO KEY UPDATE does not block the inserts of other tables that reference the org.
    let org: Option<Uuid> = sqlx::query_scalar("SELECT id FROM orgs WHERE id = $1 FOR NO KEY UPDATE")
        .bind(caller.org_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| ApiError::database(e, "lock the org"))?;
    if org.is_none() {
        return Err(ApiError::Forbidden("the org_id of this token names no org provisioned in this service"));
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_subscriptions WHERE org_id = $1 AND status <> 'deleted'")
        .bind(caller.org_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| ApiError::database(e, "count subscriptions"))?;
    if count >= MAX_SUBSCRIPTIONS_PER_ORG {
        return Err(ApiError::Conflict {
            code: "subscription_limit_reached",
            message: format!("this org already has {count} webhook subscriptions, the maximum: delete one before creating another"),
        });
    }

    let id = Uuid::now_v7();
    tracing::Span::current().record("subscription_id", tracing::field::display(id));
    let subscription: Subscription = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO webhook_subscriptions (id, org_id, url, event_types) VALUES ($1, $2, $3, $4) RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(caller.org_id)
    .bind(&url)
    .bind(&events)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| ApiError::database(e, "insert a subscription"))?;
    let secret = WebhookSecret::generate();
    insert_secret(&mut tx, &state, caller.org_id, id, &secret).await?;
    reach_shared::db::notify_subscriptions_changed(&mut tx, caller.org_id)
        .await
        .map_err(|e| ApiError::database(e, "announce a subscription change"))?;
    tx.commit().await.map_err(|e| ApiError::database(e, "commit a new subscription"))?;
    tracing::info!("created a webhook subscription");

    let location = format!("/v1/webhook-subscriptions/{id}");
    let body = WithSecret { subscription, secret: secret.expose_secret(), previous_secret_expires_at: None };
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(body)).into_response())
}

#[tracing::instrument(skip_all, fields(org_id = %caller.org_id))]
async fn list(State(state): State<ApiState>, caller: OrgCaller) -> Result<Json<serde_json::Value>, ApiError> {
    let subscriptions: Vec<Subscription> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_subscriptions WHERE org_id = $1 AND status <> 'deleted' ORDER BY created_at, id"
    )))
    .bind(caller.org_id)
    .fetch_all(&state.pool)
    .await
    .map_err(|e| ApiError::database(e, "list subscriptions"))?;
    Ok(Json(serde_json::json!({ "data": subscriptions })))
}

#[tracing::instrument(skip_all, fields(org_id = %caller.org_id, subscription_id = %id))]
async fn show(State(state): State<ApiState>, caller: OrgCaller, Path(id): Path<String>) -> Result<Json<Subscription>, ApiError> {
    let id = parse_id(&id)?;
    let subscription: Option<Subscription> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_subscriptions WHERE id = $1 AND org_id = $2 AND status <> 'deleted'"
    )))
    .bind(id)
    .bind(caller.org_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(|e| ApiError::database(e, "read a subscription"))?;
    subscription.map(Json).ok_or_else(not_found)
}

#[tracing::instrument(skip_all, fields(org_id = %caller.org_id, subscription_id = %id))]
async fn update(
    State(state): State<ApiState>,
    caller: OrgCaller,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<UpdateRequest>,
) -> Result<Json<Subscription>, ApiError> {
    let id = parse_id(&id)?;
    if request.url.is_none() && request.events.is_none() && request.status.is_none() {
        return Err(ApiError::Invalid {
            code: "empty_update",
            message: "the request changes nothing: give at least one of url, events or status".to_owned(),
        });
    }
    let url = request.url.as_deref().map(validate_url).transpose()?;
    let events = request.events.map(validate_events).transpose()?;
    let status = request.status.map(RequestedStatus::as_str);

    let mut tx = state.pool.begin().await.map_err(|e| ApiError::database(e, "begin updating a subscription"))?;
    // In SET expressions `status` is the value before this update.
    let subscription: Option<Subscription> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE webhook_subscriptions SET
             url = coalesce($3::text, url),
             event_types = coalesce($4::text[], event_types),
             status = coalesce($5::text, status),
             disabled_reason = CASE
                 WHEN $5::text = 'active' THEN NULL
                 WHEN $5::text = 'disabled' AND status <> 'disabled' THEN 'disabled through the customer API'
                 ELSE disabled_reason END,
             updated_at = now()
         WHERE id = $1 AND org_id = $2 AND status <> 'deleted'
         RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(caller.org_id)
    .bind(url)
    .bind(events)
    .bind(status)
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| ApiError::database(e, "update a subscription"))?;
    let subscription = subscription.ok_or_else(not_found)?;
    if request.status == Some(RequestedStatus::Disabled) {
        park_pending(&mut tx, id, "subscription disabled through the customer API").await?;
    }
    reach_shared::db::notify_subscriptions_changed(&mut tx, caller.org_id)
        .await
        .map_err(|e| ApiError::database(e, "announce a subscription change"))?;
    tx.commit().await.map_err(|e| ApiError::database(e, "commit a subscription update"))?;
    tracing::info!(status = subscription.status, "updated a webhook subscription");
    Ok(Json(subscription))
}

/// Marks the subscription deleted, parks its pending deliveries and drops its secrets.
/// Its deliveries and their attempts stay, for the deliveries API.
#[tracing::instrument(skip_all, fields(org_id = %caller.org_id, subscription_id = %id))]
async fn remove(State(state): State<ApiState>, caller: OrgCaller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    let mut tx = state.pool.begin().await.map_err(|e| ApiError::database(e, "begin deleting a subscription"))?;
    let deleted = sqlx::query(
        "UPDATE webhook_subscriptions SET status = 'deleted', deleted_at = now(), disabled_reason = NULL, updated_at = now()
         WHERE id = $1 AND org_id = $2 AND status <> 'deleted'",
    )
    .bind(id)
    .bind(caller.org_id)
    .execute(&mut *tx)
    .await
    .map_err(|e| ApiError::database(e, "delete a subscription"))?
    .rows_affected();
    if deleted == 0 {
        return Err(not_found());
    }
    let parked = park_pending(&mut tx, id, "subscription deleted").await?;
    sqlx::query("DELETE FROM webhook_subscription_secrets WHERE subscription_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| ApiError::database(e, "delete the secrets of a subscription"))?;
    reach_shared::db::notify_subscriptions_changed(&mut tx, caller.org_id)
        .await
        .map_err(|e| ApiError::database(e, "announce a subscription change"))?;
    tx.commit().await.map_err(|e| ApiError::database(e, "commit a subscription deletion"))?;
    tracing::info!(parked, "deleted a webhook subscription");
    Ok(StatusCode::NO_CONTENT)
}

/// Issues a new secret. The secrets that were active keep signing for 24 hours.
#[tracing::instrument(skip_all, fields(org_id = %caller.org_id, subscription_id = %id))]
async fn rotate_secret(
    State(state): State<ApiState>,
    caller: OrgCaller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let mut tx = state.pool.begin().await.map_err(|e| ApiError::database(e, "begin rotating a secret"))?;
    // Locking the subscription serialises concurrent rotations of it.
    let found: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM webhook_subscriptions WHERE id = $1 AND org_id = $2 AND status <> 'deleted' FOR UPDATE")
            .bind(id)
            .bind(caller.org_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| ApiError::database(e, "lock a subscription"))?;
    if found.is_none() {
        return Err(not_found());
    }
    sqlx::query("DELETE FROM webhook_subscription_secrets WHERE subscription_id = $1 AND expires_at <= now()")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| ApiError::database(e, "delete expired secrets"))?;
    let (rotating, first_expiry): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*), min(expires_at) FROM webhook_subscription_secrets WHERE subscription_id = $1 AND expires_at IS NOT NULL",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| ApiError::database(e, "count rotating secrets"))?;
    if rotating >= MAX_ROTATING_SECRETS {
        let first_expiry = first_expiry.map(|at| at.to_rfc3339()).unwrap_or_default();
        return Err(ApiError::Conflict {
            code: "too_many_rotating_secrets",
            message: format!(
                "{rotating} earlier secrets of this subscription still sign callbacks, the maximum: rotate again after {first_expiry}"
            ),
        });
    }

    let expiries: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "UPDATE webhook_subscription_secrets SET expires_at = now() + interval '24 hours'
         WHERE subscription_id = $1 AND expires_at IS NULL
         RETURNING expires_at",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| ApiError::database(e, "expire the current secret"))?;
    let secret = WebhookSecret::generate();
    insert_secret(&mut tx, &state, caller.org_id, id, &secret).await?;
    let subscription: Subscription = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE webhook_subscriptions SET updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| ApiError::database(e, "touch a subscription"))?;
    reach_shared::db::notify_subscriptions_changed(&mut tx, caller.org_id)
        .await
        .map_err(|e| ApiError::database(e, "announce a subscription change"))?;
    tx.commit().await.map_err(|e| ApiError::database(e, "commit a secret rotation"))?;
    tracing::info!("rotated the signing secret of a webhook subscription");

    let body = WithSecret { subscription, secret: secret.expose_secret(), previous_secret_expires_at: expiries.into_iter().max() };
    Ok(Json(body).into_response())
}

/// Seals and stores a new active secret of a subscription.
async fn insert_secret(
    tx: &mut Transaction<'_, Postgres>,
    state: &ApiState,
    org_id: Uuid,
    subscription_id: Uuid,
    secret: &SecretString,
) -> Result<(), ApiError> {
    let sealed = state.sealer.seal(secret).map_err(|error| {
        tracing::error!(error = format!("{error:#}"), "failed to seal a webhook secret");
        ApiError::Internal
    })?;
    let hash = Sha256::digest(secret.expose_secret().as_bytes()).to_vec();
    sqlx::query(
        "INSERT INTO webhook_subscription_secrets (org_id, subscription_id, secret_sealed, secret_sha256) VALUES ($1, $2, $3, $4)",
    )
    .bind(org_id)
    .bind(subscription_id)
    .bind(sealed)
    .bind(hash)
    .execute(&mut **tx)
    .await
    .map_err(|e| ApiError::database(e, "insert a secret"))?;
    Ok(())
}

/// Parks the pending deliveries of a subscription that stops receiving callbacks, as
/// the relay does after a 410. Returns how many were parked.
async fn park_pending(tx: &mut Transaction<'_, Postgres>, subscription_id: Uuid, reason: &str) -> Result<u64, ApiError> {
    let parked = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'parked', parked_at = now(), next_attempt_at = NULL, last_error = $2, updated_at = now()
         WHERE subscription_id = $1 AND status = 'pending'",
    )
    .bind(subscription_id)
    .bind(reason)
    .execute(&mut **tx)
    .await
    .map_err(|e| ApiError::database(e, "park pending deliveries"))?;
    Ok(parked.rows_affected())
}

/// Parses a subscription id from the path. A malformed id cannot name a subscription,
/// so it gets the same 404 as an unknown one.
fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| not_found())
}

fn not_found() -> ApiError {
    ApiError::NotFound("webhook subscription not found")
}

/// Checks a subscriber URL and returns it in the normalised form the relay parses.
fn validate_url(raw: &str) -> Result<String, ApiError> {
    let invalid = |message: String| ApiError::Invalid { code: "invalid_url", message };
    if raw.len() > MAX_URL_BYTES {
        return Err(invalid(format!("url has {} bytes, more than the maximum of {MAX_URL_BYTES}", raw.len())));
    }
    let url = url::Url::parse(raw).map_err(|error| invalid(format!("invalid url: {error}; expected an absolute https:// or http:// URL")))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(invalid(format!("url scheme {:?} is not supported: use https:// or http://", url.scheme())));
    }
    if url.host().is_none() {
        return Err(invalid("url has no host".to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "url contains credentials, which would be stored and shown in plain text: remove them and verify the webhook-signature header instead"
                .to_owned(),
        ));
    }
    if url.as_str().len() > MAX_URL_BYTES {
        return Err(invalid(format!("url has more than {MAX_URL_BYTES} bytes once normalised")));
    }
    Ok(url.into())
}

/// Checks a list of event types and returns it sorted without duplicates.
fn validate_events(events: Vec<String>) -> Result<Vec<String>, ApiError> {
    let invalid = |message: String| ApiError::Invalid { code: "invalid_events", message };
    let mut events = events;
    events.sort();
    events.dedup();
    if events.is_empty() {
        return Err(invalid("events is empty: list event types, or give [\"*\"] for every type".to_owned()));
    }
    if events.iter().any(|name| name == "*") {
        if events.len() > 1 {
            return Err(invalid("\"*\" already selects every event type: give [\"*\"] alone".to_owned()));
        }
        return Ok(events);
    }
    if let Some(unknown) = events.iter().find(|name| EventType::parse(name).is_none()) {
        let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        return Err(invalid(format!("unknown event type {unknown:?}: expected one of {}, or \"*\"", known.join(", "))));
    }
    Ok(events)
}
