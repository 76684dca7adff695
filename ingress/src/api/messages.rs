//! `POST /v1/messages` and `GET /v1/messages/{id}`. A send request is validated,
//! turned into the Graph API request body, and written with its send job in one
//! transaction; the dispatcher sends it at the number's rate.
//!
//! An `Idempotency-Key` makes a retried request safe: the same key with the same body
//! returns the first message's id and queues nothing; the same key with a different
//! body is rejected with 422 `idempotency_key_reused`.

use std::collections::{HashMap, HashSet};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use reach_shared::batch::Batcher;
use reach_shared::db::is_transient;
use reach_shared::outbox::OutboxWaker;
use reach_shared::sends::{self, MessageState, SendJob};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiState, OrgCaller};

/// Meta's limit on a text message body, in characters.
const MAX_TEXT_CHARS: usize = 4096;
/// Meta's limit on a template name, in characters.
const MAX_TEMPLATE_NAME_CHARS: usize = 512;
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

pub fn routes() -> Router<ApiState> {
    Router::new().route("/messages", post(create_message)).route("/messages/{id}", get(show_message))
}

/// Body of `POST /v1/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    phone_number_id: String,
    to: String,
    #[serde(rename = "type")]
    message_type: String,
    #[serde(default)]
    text: Option<TextContent>,
    #[serde(default)]
    template: Option<TemplateContent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TextContent {
    body: String,
    #[serde(default)]
    preview_url: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateContent {
    name: String,
    language: TemplateLanguage,
    #[serde(default)]
    components: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateLanguage {
    code: String,
}

/// A validated request: the recipient in digits and the Graph API body to send.
struct ValidSend {
    recipient: String,
    message_type: &'static str,
    graph_request: Value,
}

fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::Invalid { code, message: message.into() }
}

/// Normalises a recipient to the digits of its E.164 number or WhatsApp id: an
/// optional leading `+`, then 8 to 15 digits, with spaces, dashes, dots and
/// parentheses allowed between them as in a written number.
fn normalise_recipient(to: &str) -> Result<String, ApiError> {
    let trimmed = to.trim();
    let rest = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let mut digits = String::with_capacity(rest.len());
    for c in rest.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => {
                return Err(invalid(
                    "invalid_recipient",
                    "to must be an E.164 phone number or WhatsApp id, for example +15551234567; it contains a character that is not a digit",
                ));
            }
        }
    }
    if !(8..=15).contains(&digits.len()) {
        return Err(invalid("invalid_recipient", format!("to must have 8 to 15 digits, got {} digits", digits.len())));
    }
    if digits.starts_with('0') {
        return Err(invalid(
            "invalid_recipient",
            "to must start with a country code, not 0: write +44 7700 900123 or 447700900123, not 07700 900123 or 0044...",
        ));
    }
    Ok(digits)
}

fn validate(request: &SendRequest) -> Result<ValidSend, ApiError> {
    if request.phone_number_id.trim().is_empty() || request.phone_number_id.len() > 64 {
        return Err(invalid("invalid_phone_number_id", "phone_number_id is required: the id of one of your provisioned numbers"));
    }
    let recipient = normalise_recipient(&request.to)?;
    let mut graph_request = json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": recipient,
    });
    let message_type = match request.message_type.as_str() {
        "text" => {
            if request.template.is_some() {
                return Err(invalid("unexpected_field", "a text message takes text, not template"));
            }
            let text = request.text.as_ref().ok_or_else(|| invalid("missing_text", "type text needs text.body"))?;
            let length = text.body.chars().count();
            if text.body.trim().is_empty() {
                return Err(invalid("invalid_text", "text.body is empty"));
            }
            if length > MAX_TEXT_CHARS {
                return Err(invalid("text_too_long", format!("text.body has {length} characters; Meta allows at most {MAX_TEXT_CHARS}")));
            }
            graph_request["type"] = json!("text");
            graph_request["text"] = json!({"body": text.body, "preview_url": text.preview_url});
            "text"
        }
        "template" => {
            if request.text.is_some() {
                return Err(invalid("unexpected_field", "a template message takes template, not text"));
            }
            let template = request.template.as_ref().ok_or_else(|| invalid("missing_template", "type template needs template.name and template.language.code"))?;
            let name_is_valid = !template.name.is_empty()
                && template.name.chars().count() <= MAX_TEMPLATE_NAME_CHARS
                && template.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !name_is_valid {
                return Err(invalid(
                    "invalid_template_name",
                    format!("template.name must be 1 to {MAX_TEMPLATE_NAME_CHARS} lowercase letters, digits or underscores"),
                ));
            }
            let code = &template.language.code;
            let code_is_valid = (2..=8).contains(&code.len()) && code.chars().all(|c| c.is_ascii_alphabetic() || c == '_');
            if !code_is_valid {
                return Err(invalid("invalid_template_language", "template.language.code must be a locale such as en or en_US"));
            }
            if template.components.iter().any(|component| !component.is_object()) {
                return Err(invalid("invalid_template_components", "template.components must be a list of objects, as in the Graph API"));
            }
            let mut body = json!({"name": template.name, "language": {"code": code}});
            if !template.components.is_empty() {
                body["components"] = Value::Array(template.components.clone());
            }
            graph_request["type"] = json!("template");
            graph_request["template"] = body;
            "template"
        }
        other => {
            return Err(invalid("unsupported_type", format!("type {other:?} is not supported: use text or template")));
        }
    };
    Ok(ValidSend { recipient, message_type, graph_request })
}

/// Returns whether any string in `value`, keys included, contains U+0000.
fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(key, item)| key.contains('\0') || contains_nul(item)),
        _ => false,
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|key| !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_BYTES)
        .ok_or_else(|| {
            ApiError::BadRequest {
                code: "invalid_idempotency_key",
                message: format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters"),
            }
        })?;
    Ok(Some(key.to_owned()))
}

/// `POST /v1/messages`: responds 202 with the message id.
#[tracing::instrument(skip_all, fields(org_id = %caller.org_id))]
async fn create_message(State(state): State<ApiState>, caller: OrgCaller, headers: HeaderMap, ApiJson(request): ApiJson<SendRequest>) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let send = validate(&request)?;
    // serde_json's maps keep keys sorted, so equal requests serialise to equal bytes.
    let request_bytes = serde_json::to_vec(&send.graph_request).expect("a JSON value always serialises");
    // PostgreSQL's jsonb cannot store U+0000, and Meta rejects it too.
    if request.phone_number_id.contains('\0') || contains_nul(&send.graph_request) {
        return Err(invalid("invalid_character", "a string in the request contains the NUL character (U+0000); remove it"));
    }
    let request_sha256 = Sha256::digest(&request_bytes).to_vec();

    let message = NewMessage {
        id: Uuid::now_v7(),
        org_id: caller.org_id,
        phone_number_id: request.phone_number_id.clone(),
        recipient: send.recipient,
        message_type: send.message_type,
        graph_request: send.graph_request,
        idempotency_key: key,
        request_sha256,
    };
    let created = state.messages.submit(message).await.map_err(|_| ApiError::Unavailable)??;
    let (id, replayed) = match created {
        Created::New(id) => (id, false),
        Created::Existing(id) => (id, true),
        Created::KeyReused => {
            return Err(invalid("idempotency_key_reused", "this Idempotency-Key was used for a different request; use a new key for a new message"));
        }
        Created::UnknownNumber => {
            return Err(invalid("unknown_phone_number", format!("phone number {} is not provisioned", request.phone_number_id)));
        }
        Created::OtherOrg => return Err(ApiError::Forbidden("this phone number belongs to another org")),
    };
    let outcome = if replayed { "idempotent_replay" } else { "queued" };
    metrics::counter!("reach_api_messages_total", "outcome" => outcome).increment(1);
    if !replayed {
        tracing::info!(message_id = %id, phone_number_id = %request.phone_number_id, "message queued");
    }
    // A replay reports the first message's state now, which may have moved on.
    let state_now = if replayed {
        sqlx::query_scalar::<_, String>("SELECT state FROM outbound_messages WHERE id = $1 AND org_id = $2")
            .bind(id)
            .bind(caller.org_id)
            .fetch_one(&state.pool)
            .await
            .map_err(|e| ApiError::database(e, "replayed message state"))?
    } else {
        MessageState::Queued.as_str().to_owned()
    };
    let mut response = (StatusCode::ACCEPTED, Json(json!({"id": id, "state": state_now}))).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// A validated message on its way to the database.
pub struct NewMessage {
    id: Uuid,
    org_id: Uuid,
    phone_number_id: String,
    recipient: String,
    message_type: &'static str,
    graph_request: Value,
    idempotency_key: Option<String>,
    request_sha256: Vec<u8>,
}

/// The result of storing a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New(Uuid),
    /// The idempotency key named an earlier message with the same request.
    Existing(Uuid),
    /// The idempotency key named an earlier message with another request.
    KeyReused,
    UnknownNumber,
    OtherOrg,
}

/// Group-committed writer of new messages and their send jobs.
pub type MessageWriter = Batcher<NewMessage, Result<Created, ApiError>>;

/// Starts the writers that store messages, many requests per transaction.
pub fn start_writer(pool: PgPool, waker: OutboxWaker, shards: u16, writers: usize, max_batch: usize) -> (MessageWriter, tokio::task::JoinSet<()>) {
    Batcher::start("api_messages", writers, max_batch, move |messages: Vec<NewMessage>| {
        let pool = pool.clone();
        let waker = waker.clone();
        async move {
            let mut attempt = 0u64;
            loop {
                attempt += 1;
                match store_batch(&pool, &messages, shards).await {
                    Ok(created) => {
                        if created.iter().any(|c| matches!(c, Created::New(_))) {
                            waker.wake();
                        }
                        return created.into_iter().map(Ok).collect();
                    }
                    Err(error) if is_transient(&error) && attempt < 3 => {
                        tracing::warn!(%error, attempt, "transient database error while storing messages, retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
                    }
                    Err(error) => {
                        let transient = is_transient(&error);
                        tracing::error!(%error, batch = messages.len(), "failed to store messages");
                        return messages.iter().map(|_| Err(if transient { ApiError::Unavailable } else { ApiError::Internal })).collect();
                    }
                }
            }
        }
    })
}

/// Stores a batch of messages and their send jobs in one transaction.
async fn store_batch(pool: &PgPool, messages: &[NewMessage], shards: u16) -> Result<Vec<Created>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let numbers: Vec<&str> = messages.iter().map(|m| m.phone_number_id.as_str()).collect();
    let owners: HashMap<String, Uuid> = sqlx::query("SELECT phone_number_id, org_id FROM phone_numbers WHERE phone_number_id = ANY($1)")
        .bind(&numbers)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| (row.get("phone_number_id"), row.get("org_id")))
        .collect();

    let mut results: Vec<Option<Created>> = messages
        .iter()
        .map(|m| match owners.get(&m.phone_number_id) {
            None => Some(Created::UnknownNumber),
            Some(owner) if *owner != m.org_id => Some(Created::OtherOrg),
            Some(_) => None,
        })
        .collect();
    let valid: Vec<&NewMessage> = messages.iter().zip(&results).filter(|(_, r)| r.is_none()).map(|(m, _)| m).collect();
    if valid.is_empty() {
        tx.commit().await?;
        return Ok(results.into_iter().map(|r| r.expect("every result is set")).collect());
    }

    let ids: Vec<Uuid> = valid.iter().map(|m| m.id).collect();
    let org_ids: Vec<Uuid> = valid.iter().map(|m| m.org_id).collect();
    let phones: Vec<&str> = valid.iter().map(|m| m.phone_number_id.as_str()).collect();
    let recipients: Vec<&str> = valid.iter().map(|m| m.recipient.as_str()).collect();
    let types: Vec<&str> = valid.iter().map(|m| m.message_type).collect();
    let requests: Vec<String> = valid.iter().map(|m| m.graph_request.to_string()).collect();
    let keys: Vec<Option<&str>> = valid.iter().map(|m| m.idempotency_key.as_deref()).collect();
    let hashes: Vec<&[u8]> = valid.iter().map(|m| m.request_sha256.as_slice()).collect();
    // A key repeated within the batch inserts once; the repeat finds the first below.
    let inserted: HashSet<Uuid> = sqlx::query(
        "INSERT INTO outbound_messages (id, org_id, phone_number_id, recipient, type, request, idempotency_key, request_sha256)
         SELECT id, org_id, phone_number_id, recipient, type, request::jsonb, idempotency_key, request_sha256
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bytea[])
              AS t (id, org_id, phone_number_id, recipient, type, request, idempotency_key, request_sha256)
         ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(&ids)
    .bind(&org_ids)
    .bind(&phones)
    .bind(&recipients)
    .bind(&types)
    .bind(&requests)
    .bind(&keys)
    .bind(&hashes)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|row| row.get("id"))
    .collect();

    let conflicted: Vec<&NewMessage> = valid.iter().copied().filter(|m| !inserted.contains(&m.id)).collect();
    let mut earlier: HashMap<(Uuid, String), (Uuid, Vec<u8>)> = HashMap::new();
    if !conflicted.is_empty() {
        let org_ids: Vec<Uuid> = conflicted.iter().map(|m| m.org_id).collect();
        let keys: Vec<&str> = conflicted.iter().filter_map(|m| m.idempotency_key.as_deref()).collect();
        let rows = sqlx::query(
            "SELECT m.org_id, m.idempotency_key, m.id, m.request_sha256
             FROM outbound_messages m JOIN UNNEST($1::uuid[], $2::text[]) AS k (org_id, idempotency_key)
               ON m.org_id = k.org_id AND m.idempotency_key = k.idempotency_key",
        )
        .bind(&org_ids)
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            earlier.insert((row.get("org_id"), row.get("idempotency_key")), (row.get("id"), row.get("request_sha256")));
        }
    }

    let mut jobs = Vec::new();
    for (message, result) in messages.iter().zip(results.iter_mut()) {
        if result.is_some() {
            continue;
        }
        if inserted.contains(&message.id) {
            jobs.push(SendJob { message_id: message.id, org_id: message.org_id, phone_number_id: message.phone_number_id.clone(), seq: 1 });
            *result = Some(Created::New(message.id));
            continue;
        }
        let key = message.idempotency_key.clone().expect("only a message with a key can conflict");
        *result = Some(match earlier.get(&(message.org_id, key)) {
            Some((id, sha256)) if *sha256 == message.request_sha256 => Created::Existing(*id),
            Some(_) => Created::KeyReused,
            // Not expected: the insert waits for a concurrent transaction holding the
            // key to end. Without the earlier request to compare, refuse the reuse.
            None => Created::KeyReused,
        });
    }
    sends::enqueue_jobs(&mut tx, &jobs, shards).await?;
    tx.commit().await?;
    Ok(results.into_iter().map(|r| r.expect("every result is set")).collect())
}

/// `GET /v1/messages/{id}`: the message's state, within the caller's org only.
#[tracing::instrument(skip_all, fields(org_id = %caller.org_id))]
async fn show_message(State(state): State<ApiState>, caller: OrgCaller, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    // An id that is not a UUID cannot name a message: the same 404 as a missing one.
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound("no message with this id"))?;
    let row = sqlx::query(
        "SELECT id, phone_number_id, recipient, type, state, wamid, error_code, error_title, failure_reason,
                attempt_count, created_at, updated_at, accepted_at
         FROM outbound_messages WHERE id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(caller.org_id)
    .fetch_optional(&state.pool)
    .await
    .map_err(|e| ApiError::database(e, "message lookup"))?
    .ok_or(ApiError::NotFound("no message with this id"))?;

    let state_name: String = row.get("state");
    let error_code: Option<i32> = row.get("error_code");
    let error = error_code.map(|code| json!({"code": code, "title": row.get::<Option<String>, _>("error_title")}));
    Ok(Json(json!({
        "id": row.get::<Uuid, _>("id"),
        "phone_number_id": row.get::<String, _>("phone_number_id"),
        "to": row.get::<String, _>("recipient"),
        "type": row.get::<String, _>("type"),
        "state": MessageState::parse(&state_name).map_or_else(|| state_name.clone(), |state| state.as_str().to_owned()),
        "wamid": row.get::<Option<String>, _>("wamid"),
        "error": error,
        "failure_reason": row.get::<Option<String>, _>("failure_reason"),
        "attempts": row.get::<i32, _>("attempt_count"),
        "created_at": row.get::<DateTime<Utc>, _>("created_at"),
        "updated_at": row.get::<DateTime<Utc>, _>("updated_at"),
        "accepted_at": row.get::<Option<DateTime<Utc>>, _>("accepted_at"),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_normalise_to_digits() {
        assert_eq!(normalise_recipient("+1 (555) 010-0123").unwrap(), "15550100123");
        assert_eq!(normalise_recipient("491701234567").unwrap(), "491701234567");
        for bad in ["", "+", "12345", "1234567890123456", "+1555abc0123", "0015550100123", "+1555 0100 123 ext 4", "+١٥٥٥٠١٠٠١٢٣"] {
            assert!(normalise_recipient(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    fn request(json: Value) -> SendRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn text_over_meta_limit_rejected() {
        let long = "é".repeat(MAX_TEXT_CHARS + 1);
        let result = validate(&request(json!({"phone_number_id": "1", "to": "+15550100123", "type": "text", "text": {"body": long}})));
        assert!(matches!(result, Err(ApiError::Invalid { code: "text_too_long", .. })));
        let exact = "é".repeat(MAX_TEXT_CHARS);
        assert!(validate(&request(json!({"phone_number_id": "1", "to": "+15550100123", "type": "text", "text": {"body": exact}}))).is_ok());
    }

    #[test]
    fn nul_found_anywhere() {
        assert!(contains_nul(&json!({"text": {"body": "a\u{0}b"}})));
        assert!(contains_nul(&json!({"components": [{"parameters": [{"text": "\u{0}"}]}]})));
        assert!(!contains_nul(&json!({"text": {"body": "a\\u0000b"}})), "an escaped backslash is not a NUL");
    }

    #[test]
    fn template_becomes_graph_body() {
        let send = validate(&request(json!({
            "phone_number_id": "1", "to": "15550100123", "type": "template",
            "template": {"name": "order_update", "language": {"code": "en_US"}, "components": [{"type": "body"}]}
        })))
        .unwrap();
        assert_eq!(send.graph_request["template"]["name"], "order_update");
        assert_eq!(send.graph_request["to"], "15550100123");
        assert_eq!(send.graph_request["messaging_product"], "whatsapp");
        let bad_name = validate(&request(json!({
            "phone_number_id": "1", "to": "15550100123", "type": "template",
            "template": {"name": "Order Update", "language": {"code": "en_US"}}
        })));
        assert!(matches!(bad_name, Err(ApiError::Invalid { code: "invalid_template_name", .. })));
    }

    #[test]
    fn type_and_content_must_agree() {
        let mismatch = validate(&request(json!({"phone_number_id": "1", "to": "15550100123", "type": "text", "template": {"name": "a", "language": {"code": "en"}}})));
        assert!(mismatch.is_err());
        let unsupported = validate(&request(json!({"phone_number_id": "1", "to": "15550100123", "type": "image"})));
        assert!(matches!(unsupported, Err(ApiError::Invalid { code: "unsupported_type", .. })));
    }
}
