//! `/v1/webhook-deliveries`: the org's webhook deliveries, one per event and
//! subscription, and replays of parked ones. No response carries a callback body.
//!
//! - `GET /webhook-deliveries` lists deliveries newest first, filtered by `status`,
//!   `subscription_id` and a `since`/`until` window on their creation time, in pages of
//!   `limit` (default 100, at most 1,000). `next_cursor`, when not null, is the `cursor`
//!   of the next page.
//! - `GET /webhook-deliveries/{id}` returns one delivery with its latest attempts.
//! - `POST /webhook-deliveries/{id}/replay` replays one parked delivery.
//! - `POST /webhook-deliveries/replay` `{"since", "until", "subscription_id"?}` replays the
//!   deliveries parked in that window, which spans at most 31 days.
//!
//! A replay puts parked deliveries back to pending with a fresh retry schedule, and the
//! relay's retry lane sends them within a sweep. Deliveries of disabled or deleted
//! subscriptions stay parked. Each replay writes an audit event in its transaction.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use reach_shared::parked::{self, Requester, Selection};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiState, OrgCaller};

/// Page size of a list without `limit`.
pub const DEFAULT_PAGE_SIZE: i64 = 100;

/// Maximum `limit` of a list.
pub const MAX_PAGE_SIZE: i64 = 1000;

/// Maximum window of a replay by time. A longer one is split by the client, so a
/// single request cannot requeue months of deliveries at once.
pub const MAX_REPLAY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::days(31);

/// Attempts returned with one delivery, the latest first. Each can carry up to 64 KiB
/// of the endpoint's response.
pub const ATTEMPTS_SHOWN: i64 = 20;

/// The reason recorded in the audit event of a customer's replay.
const REPLAY_REASON: &str = "replay requested through the customer API";

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/webhook-deliveries", get(list))
        .route("/webhook-deliveries/replay", post(replay_window))
        .route("/webhook-deliveries/{id}", get(show))
        .route("/webhook-deliveries/{id}/replay", post(replay_one))
}

/// A delivery as the API returns it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Delivery {
    pub id: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub subscription_id: Uuid,
    /// `pending`, `delivered` or `parked`.
    pub status: String,
    /// Attempts since the delivery was created or last replayed.
    pub attempt_count: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    /// When a pending delivery is tried next.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub parked_at: Option<DateTime<Utc>>,
}

/// The columns of [`Delivery`], from `webhook_deliveries d` joined with `events e`.
const COLUMNS: &str = "d.id, d.event_id, e.type AS event_type, d.subscription_id, d.status, d.attempt_count,
    d.last_status_code, d.last_error, d.next_attempt_at, d.created_at, d.updated_at, d.delivered_at, d.parked_at";

/// One HTTP request to the subscriber's endpoint.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Attempt {
    pub attempted_at: DateTime<Utc>,
    pub duration_ms: i32,
    /// The endpoint's HTTP status, or null when no response arrived.
    pub status_code: Option<i32>,
    pub error: Option<String>,
    /// At most 64 KiB of the endpoint's response body.
    pub response_body: Option<String>,
    pub response_truncated: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum DeliveryStatus {
    Pending,
    Delivered,
    Parked,
}

impl DeliveryStatus {
    fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Parked => "parked",
        }
    }
}

/// Query string of `GET /webhook-deliveries`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<DeliveryStatus>,
    subscription_id: Option<Uuid>,
    /// Deliveries created at or after this time.
    since: Option<DateTime<Utc>>,
    /// Deliveries created before this time.
    until: Option<DateTime<Utc>>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    limit: Option<i64>,
}

#[derive(Debug, Serialize)]
struct DeliveryPage {
    data: Vec<Delivery>,
    /// The `cursor` of the next page, or null on the last page.
    next_cursor: Option<String>,
}

/// Body of `POST /webhook-deliveries/replay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayWindowRequest {
    /// Deliveries parked at or after this time.
    since: DateTime<Utc>,
    /// Deliveries parked before this time.
    until: DateTime<Utc>,
    subscription_id: Option<Uuid>,
}

/// The response of a replay.
#[derive(Debug, Serialize)]
struct ReplayResponse {
    /// Deliveries put back to pending.
    replayed: u64,
    /// Parked deliveries of disabled or deleted subscriptions in the selection, left parked.
    skipped_disabled: u64,
}

#[tracing::instrument(skip_all, fields(org_id = %caller.org_id))]
async fn list(
    State(state): State<ApiState>,
    caller: OrgCaller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<DeliveryPage>, ApiError> {
    let invalid = |message: String| ApiError::Invalid { code: "invalid_query", message };
    let Query(query) = query.map_err(|rejection| invalid(rejection.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&limit) {
        return Err(invalid(format!("limit {limit} is out of range: give 1 to {MAX_PAGE_SIZE}")));
    }
    let cursor = match query.cursor.as_deref() {
        None => None,
        Some(raw) => Some(
            raw.parse::<i64>()
                .map_err(|_| invalid(format!("invalid cursor {raw:?}: pass the next_cursor of the previous page unchanged")))?,
        ),
    };
    let window = query.since.zip(query.until);
    if window.is_some_and(|(since, until)| since >= until) {
        return Err(invalid("since must be earlier than until".to_owned()));
    }

    let mut data: Vec<Delivery> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.org_id = $1
           AND ($2::text IS NULL OR d.status = $2)
           AND ($3::uuid IS NULL OR d.subscription_id = $3)
           AND ($4::timestamptz IS NULL OR d.created_at >= $4)
           AND ($5::timestamptz IS NULL OR d.created_at < $5)
           AND ($6::bigint IS NULL OR d.id < $6)
         ORDER BY d.id DESC
         LIMIT $7"
    )))
    .bind(caller.org_id)
    .bind(query.status.map(DeliveryStatus::as_str))
    .bind(query.subscription_id)
    .bind(query.since)
    .bind(query.until)
    .bind(cursor)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await
    .map_err(|e| ApiError::database(e, "list deliveries"))?;

    // One row more than the page was read to learn whether another page follows.
    let next_cursor = if data.len() as i64 > limit {
        data.truncate(limit as usize);
        data.last().map(|delivery| delivery.id.to_string())
    } else {
        None
    };
    Ok(Json(DeliveryPage { data, next_cursor }))
}

#[tracing::instrument(skip_all, fields(org_id = %caller.org_id, delivery_id = %id))]
async fn show(State(state): State<ApiState>, caller: OrgCaller, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id)?;
    let delivery: Option<Delivery> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_deliveries d JOIN events e ON e.id = d.event_id WHERE d.id = $1 AND d.org_id = $2"
    )))
    .bind(id)
    .bind(caller.org_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(|e| ApiError::database(e, "read a delivery"))?;
    let delivery = delivery.ok_or_else(not_found)?;
    let attempts: Vec<Attempt> = sqlx::query_as(
        "SELECT attempted_at, duration_ms, status_code, error, response_body, response_truncated
         FROM webhook_attempts WHERE delivery_id = $1 AND org_id = $2
         ORDER BY attempted_at DESC, id DESC LIMIT $3",
    )
    .bind(id)
    .bind(caller.org_id)
    .bind(ATTEMPTS_SHOWN)
    .fetch_all(&state.pool)
    .await
    .map_err(|e| ApiError::database(e, "read the attempts of a delivery"))?;

    let mut body = serde_json::to_value(&delivery).expect("a delivery serialises");
    body["attempts"] = serde_json::to_value(&attempts).expect("attempts serialise");
    Ok(Json(body))
}

/// Replays one parked delivery: 409 when it is not parked or its subscription is not
/// active, because the replay would change nothing.
#[tracing::instrument(skip_all, fields(org_id = %caller.org_id, delivery_id = %id))]
async fn replay_one(
    State(state): State<ApiState>,
    caller: OrgCaller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ReplayResponse>, ApiError> {
    let id = parse_id(&id)?;
    check_replayable(&state, &caller, id).await?;
    let selection = Selection { ids: vec![id], org_id: Some(caller.org_id), ..Selection::default() };
    let report = replay(&state, &caller, &headers, &selection).await?;
    if report.replayed == 0 {
        // The delivery or its subscription changed since the check: report what it is now.
        check_replayable(&state, &caller, id).await?;
    }
    Ok(Json(report))
}

/// Replays the deliveries parked within a window, optionally of one subscription.
#[tracing::instrument(skip_all, fields(org_id = %caller.org_id))]
async fn replay_window(
    State(state): State<ApiState>,
    caller: OrgCaller,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ReplayWindowRequest>,
) -> Result<Json<ReplayResponse>, ApiError> {
    let invalid = |message: String| ApiError::Invalid { code: "invalid_window", message };
    if request.since >= request.until {
        return Err(invalid("since must be earlier than until".to_owned()));
    }
    let span = request.until - request.since;
    if span > MAX_REPLAY_WINDOW {
        return Err(invalid(format!(
            "the window spans {} hours, more than the maximum of {} days: split it into several replays",
            span.num_hours(),
            MAX_REPLAY_WINDOW.num_days()
        )));
    }
    if let Some(subscription_id) = request.subscription_id {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM webhook_subscriptions WHERE id = $1 AND org_id = $2 AND status <> 'deleted'")
                .bind(subscription_id)
                .bind(caller.org_id)
                .fetch_optional(&state.pool)
                .await
                .map_err(|e| ApiError::database(e, "read a subscription"))?;
        match status.as_deref() {
            None => return Err(ApiError::NotFound("webhook subscription not found")),
            Some("active") => {}
            Some(other) => return Err(subscription_not_active(other)),
        }
    }

    let selection = Selection {
        org_id: Some(caller.org_id),
        subscription_id: request.subscription_id,
        since: Some(request.since),
        until: Some(request.until),
        ..Selection::default()
    };
    let report = replay(&state, &caller, &headers, &selection).await?;
    Ok(Json(report))
}

/// Checks that a delivery of the caller's org is parked and its subscription active.
async fn check_replayable(state: &ApiState, caller: &OrgCaller, id: i64) -> Result<(), ApiError> {
    let found: Option<(String, String)> = sqlx::query_as(
        "SELECT d.status, s.status FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id
         WHERE d.id = $1 AND d.org_id = $2",
    )
    .bind(id)
    .bind(caller.org_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(|e| ApiError::database(e, "read a delivery"))?;
    let (delivery_status, subscription_status) = found.ok_or_else(not_found)?;
    if delivery_status != "parked" {
        return Err(ApiError::Conflict {
            code: "delivery_not_parked",
            message: format!("delivery {id} is {delivery_status}: only parked deliveries can be replayed"),
        });
    }
    if subscription_status != "active" {
        return Err(subscription_not_active(&subscription_status));
    }
    Ok(())
}

/// Runs a replay of a selection that is always scoped to the caller's org.
async fn replay(state: &ApiState, caller: &OrgCaller, headers: &HeaderMap, selection: &Selection) -> Result<ReplayResponse, ApiError> {
    debug_assert_eq!(selection.org_id, Some(caller.org_id), "a customer replay is scoped to the caller's org");
    let requester = Requester {
        user_id: caller.user_id.clone(),
        email: None,
        ip: None,
        user_agent: headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned),
    };
    let report = parked::replay(&state.pool, selection, REPLAY_REASON, &requester, |_| {}).await.map_err(|error| {
        match error.downcast::<sqlx::Error>() {
            Ok(error) => ApiError::database(error, "replay parked deliveries"),
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "failed to replay parked deliveries");
                ApiError::Internal
            }
        }
    })?;
    tracing::info!(replayed = report.replayed, skipped_disabled = report.skipped_disabled, "replayed parked deliveries");
    Ok(ReplayResponse { replayed: report.replayed, skipped_disabled: report.skipped_disabled })
}

/// Parses a delivery id from the path. A malformed id cannot name a delivery, so it gets
/// the same 404 as an unknown one.
fn parse_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse().map_err(|_| not_found())
}

fn not_found() -> ApiError {
    ApiError::NotFound("webhook delivery not found")
}

/// Builds the 409 of a replay whose subscription is `disabled` or `deleted`, whose
/// callbacks would park again at once.
fn subscription_not_active(status: &str) -> ApiError {
    let message = if status == "deleted" {
        "the subscription was deleted, so its deliveries cannot be replayed".to_owned()
    } else {
        format!(
            "the subscription is {status}: enable it with PATCH /v1/webhook-subscriptions/{{id}} and {{\"status\": \"active\"}}, then replay"
        )
    };
    ApiError::Conflict { code: "subscription_not_active", message }
}
