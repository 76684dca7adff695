//! `POST /v1/messages` and `GET /v1/messages/{id}`: validation, tenant checks,
//! idempotency keys, the send job in the outbox, and statuses moving a message forward.

use reach_shared::sends::{SendJob, shard_of};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{FIXTURE_PHONE, TestIngress, token};

const OTHER_PHONE: &str = "300000000000001";

/// Provisions two orgs with a number each; returns (first org, second org).
async fn two_orgs(ingress: &TestIngress) -> (Uuid, Uuid) {
    let first = ingress.provision_fixture_org().await;
    let second = Uuid::new_v4();
    ingress
        .provision(json!({"orgs": [{
            "id": second, "slug": "other-org", "name": "Other Org",
            "wabas": [{"waba_id": "300000000000009", "access_token": "token-2", "phone_numbers": [
                {"phone_number_id": OTHER_PHONE, "display_phone_number": "+1 555 0199"}
            ]}]
        }]}))
        .await;
    (first, second)
}

fn bearer(org_id: Uuid) -> String {
    format!("Bearer {}", token(json!({"sub": "user-1", "email": "dev@acme.test", "org_id": org_id})))
}

async fn send(ingress: &TestIngress, authorization: Option<&str>, key: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let mut request = ingress.client.post(format!("http://{}/v1/messages", ingress.addr)).json(body);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("POST /v1/messages answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn show(ingress: &TestIngress, authorization: &str, id: &str) -> (StatusCode, Value) {
    let response = ingress
        .client
        .get(format!("http://{}/v1/messages/{id}", ingress.addr))
        .header("authorization", authorization)
        .send()
        .await
        .expect("GET /v1/messages answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn text(phone_number_id: &str, to: &str) -> Value {
    json!({"phone_number_id": phone_number_id, "to": to, "type": "text", "text": {"body": "Your order shipped"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_queues_message_and_job() {
    let ingress = TestIngress::start_with(&[("REACH_INGRESS_RUN_PUBLISHER", "false")]).await;
    let (org, _) = two_orgs(&ingress).await;

    let (status, body) = send(&ingress, Some(&bearer(org)), None, &text(FIXTURE_PHONE, "+1 555 010 0123")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id: Uuid = body["id"].as_str().and_then(|s| s.parse().ok()).expect("the answer has the message id");

    let (status, shown) = show(&ingress, &bearer(org), &id.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["state"], "queued");
    assert_eq!(shown["to"], "15550100123", "the recipient is stored as digits");
    assert_eq!(shown["wamid"], Value::Null);

    let outbox = ingress.outbox().await;
    assert_eq!(outbox.len(), 1, "one send job, written with the message");
    assert_eq!(outbox[0].topic, "send");
    assert_eq!(outbox[0].routing_key, shard_of(FIXTURE_PHONE, 8).to_string(), "routed to the number's shard");
    let job: SendJob = serde_json::from_slice(&outbox[0].payload).expect("the payload is a send job");
    assert_eq!(job, SendJob { message_id: id, org_id: org, phone_number_id: FIXTURE_PHONE.to_owned(), seq: 1 });

    let request: Value = sqlx::query_scalar("SELECT request FROM outbound_messages WHERE id = $1").bind(id).fetch_one(&ingress.pool).await.unwrap();
    assert_eq!(request["messaging_product"], "whatsapp");
    assert_eq!(request["text"]["body"], "Your order shipped");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_checks_on_messages() {
    let ingress = TestIngress::start_with(&[("REACH_INGRESS_RUN_PUBLISHER", "false")]).await;
    let (org, other) = two_orgs(&ingress).await;

    let (status, body) = send(&ingress, None, None, &text(FIXTURE_PHONE, "15550100123")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "missing_token");
    let (status, body) = send(&ingress, Some("Bearer not-a-jwt"), None, &text(FIXTURE_PHONE, "15550100123")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_token");
    let admin = format!("Bearer {}", token(json!({"sub": "op", "platform_admin": true})));
    let (status, _) = send(&ingress, Some(&admin), None, &text(FIXTURE_PHONE, "15550100123")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a token without org_id");

    let (status, body) = send(&ingress, Some(&bearer(org)), None, &text(OTHER_PHONE, "15550100123")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a number of another org: {body}");
    assert_eq!(body["error"]["code"], "forbidden");

    let (status, body) = send(&ingress, Some(&bearer(org)), None, &text(FIXTURE_PHONE, "15550100123")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = body["id"].as_str().unwrap().to_owned();
    let (status, body) = show(&ingress, &bearer(other), &id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another org's message is not found");
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _) = show(&ingress, &bearer(org), "not-a-uuid").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = ingress.client.get(format!("http://{}/v1/messages/{id}", ingress.addr)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "GET needs a token too");

    assert_eq!(ingress.count("SELECT count(*) FROM outbound_messages").await, 1, "refused requests stored nothing");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_first_message() {
    let ingress = TestIngress::start_with(&[("REACH_INGRESS_RUN_PUBLISHER", "false")]).await;
    let (org, other) = two_orgs(&ingress).await;
    let body = text(FIXTURE_PHONE, "15550100123");

    let (first_status, first) = send(&ingress, Some(&bearer(org)), Some("order-42"), &body).await;
    let (again_status, again) = send(&ingress, Some(&bearer(org)), Some("order-42"), &body).await;
    assert_eq!(first_status, StatusCode::ACCEPTED);
    assert_eq!(again_status, StatusCode::ACCEPTED);
    assert_eq!(first["id"], again["id"], "the same key returns the same message");
    assert_eq!(ingress.count("SELECT count(*) FROM outbound_messages").await, 1);
    assert_eq!(ingress.count("SELECT count(*) FROM outbox WHERE topic = 'send'").await, 1, "nothing new is queued");

    let changed = text(FIXTURE_PHONE, "15550109999");
    let (status, error) = send(&ingress, Some(&bearer(org)), Some("order-42"), &changed).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["error"]["code"], "idempotency_key_reused");

    // Keys are per org: another org's identical key is a different message.
    let other_phone_body = text(OTHER_PHONE, "15550100123");
    let (status, theirs) = send(&ingress, Some(&bearer(other)), Some("order-42"), &other_phone_body).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(theirs["id"], first["id"]);

    // Concurrent retries with one key, likely in one group-committed batch.
    let auth = bearer(org);
    let concurrent = futures::future::join_all((0..12).map(|_| send(&ingress, Some(&auth), Some("order-43"), &body))).await;
    let ids: std::collections::HashSet<String> = concurrent.iter().map(|(status, body)| {
        assert_eq!(*status, StatusCode::ACCEPTED);
        body["id"].as_str().unwrap().to_owned()
    }).collect();
    assert_eq!(ids.len(), 1, "concurrent requests with one key get one message");
    assert_eq!(ingress.count("SELECT count(*) FROM outbound_messages WHERE idempotency_key = 'order-43'").await, 1);

    let (status, error) = send(&ingress, Some(&bearer(org)), Some(&"k".repeat(256)), &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["code"], "invalid_idempotency_key");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_sends_explain_fix() {
    let ingress = TestIngress::start_with(&[("REACH_INGRESS_RUN_PUBLISHER", "false")]).await;
    let (org, _) = two_orgs(&ingress).await;
    let cases = [
        (json!({"phone_number_id": FIXTURE_PHONE, "to": "12", "type": "text", "text": {"body": "x"}}), "invalid_recipient"),
        (json!({"phone_number_id": FIXTURE_PHONE, "to": "15550100123", "type": "text", "text": {"body": "x".repeat(4097)}}), "text_too_long"),
        (json!({"phone_number_id": FIXTURE_PHONE, "to": "15550100123", "type": "text"}), "missing_text"),
        (json!({"phone_number_id": FIXTURE_PHONE, "to": "15550100123", "type": "sticker"}), "unsupported_type"),
        (json!({"phone_number_id": "999", "to": "15550100123", "type": "text", "text": {"body": "x"}}), "unknown_phone_number"),
        (json!({"phone_number_id": FIXTURE_PHONE, "to": "15550100123", "type": "text", "text": {"body": "x"}, "extra": 1}), "invalid_body"),
        (json!({"to": "15550100123", "type": "text", "text": {"body": "x"}}), "invalid_body"),
        (json!({"phone_number_id": FIXTURE_PHONE, "to": "15550100123", "type": "text", "text": {"body": "a\u{0}b"}}), "invalid_character"),
    ];
    for (body, code) in cases {
        let (status, error) = send(&ingress, Some(&bearer(org)), None, &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error["error"]["code"], code, "{body}");
        assert!(!error["error"]["message"].as_str().unwrap_or_default().is_empty(), "the message says what to fix");
    }
    let huge = json!({"phone_number_id": FIXTURE_PHONE, "to": "15550100123", "type": "text", "text": {"body": "x".repeat(70_000)}});
    let (status, error) = send(&ingress, Some(&bearer(org)), None, &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error["error"]["code"], "body_too_large");
    assert_eq!(ingress.count("SELECT count(*) FROM outbound_messages").await, 0);
    ingress.finish().await;
}

/// Builds a Meta status webhook for one message, as the Cloud API sends it.
fn status_body(wamid: &str, status: &str, message_id: Option<Uuid>) -> Vec<u8> {
    let mut item = json!({"id": wamid, "status": status, "timestamp": "1767225601", "recipient_id": "15550100123"});
    if let Some(id) = message_id {
        item["biz_opaque_callback_data"] = json!(id.to_string());
    }
    if status == "failed" {
        item["errors"] = json!([{"code": 131026, "title": "Message undeliverable"}]);
    }
    serde_json::to_vec(&json!({"object": "whatsapp_business_account", "entry": [{"id": crate::harness::FIXTURE_WABA, "changes": [{"field": "messages", "value": {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": crate::harness::FIXTURE_DISPLAY, "phone_number_id": FIXTURE_PHONE},
        "statuses": [item]
    }}]}]}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_move_message_forward() {
    let ingress = TestIngress::start_with(&[("REACH_INGRESS_RUN_PUBLISHER", "false")]).await;
    let (org, _) = two_orgs(&ingress).await;
    let (_, first) = send(&ingress, Some(&bearer(org)), None, &text(FIXTURE_PHONE, "15550100123")).await;
    let (_, second) = send(&ingress, Some(&bearer(org)), None, &text(FIXTURE_PHONE, "15550100124")).await;
    let first: Uuid = first["id"].as_str().unwrap().parse().unwrap();
    let second: Uuid = second["id"].as_str().unwrap().parse().unwrap();

    // Read arrives first, before any wamid is stored: the callback data matches it and
    // stores the wamid; the later sent and delivered do not move it back.
    for status in ["read", "sent", "delivered"] {
        let reply = ingress.post_signed(&status_body("wamid.first", status, Some(first))).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let (_, shown) = show(&ingress, &bearer(org), &first.to_string()).await;
    assert_eq!(shown["state"], "read");
    assert_eq!(shown["wamid"], "wamid.first", "the status revealed the wamid");

    // Without callback data, the stored wamid matches.
    sqlx::query("UPDATE outbound_messages SET wamid = 'wamid.second', state = 'accepted', state_rank = 1 WHERE id = $1")
        .bind(second)
        .execute(&ingress.pool)
        .await
        .unwrap();
    ingress.post_signed(&status_body("wamid.second", "delivered", None)).await;
    ingress.post_signed(&status_body("wamid.second", "failed", None)).await;
    ingress.post_signed(&status_body("wamid.second", "read", None)).await;
    let (_, shown) = show(&ingress, &bearer(org), &second.to_string()).await;
    assert_eq!(shown["state"], "failed", "failed is terminal");
    assert_eq!(shown["error"]["code"], 131026);
    assert_eq!(shown["failure_reason"], "status_failed");

    // A status naming a message of another org through its callback data moves nothing.
    let other_org_message: Uuid = sqlx::query_scalar(
        "INSERT INTO outbound_messages (id, org_id, phone_number_id, recipient, type, request, request_sha256)
         SELECT gen_random_uuid(), org_id, phone_number_id, '15550100125', 'text', '{}', '\\x00' FROM phone_numbers WHERE phone_number_id = $1
         RETURNING id",
    )
    .bind(OTHER_PHONE)
    .fetch_one(&ingress.pool)
    .await
    .unwrap();
    ingress.post_signed(&status_body("wamid.forged", "read", Some(other_org_message))).await;
    let state: String = sqlx::query_scalar("SELECT state FROM outbound_messages WHERE id = $1").bind(other_org_message).fetch_one(&ingress.pool).await.unwrap();
    assert_eq!(state, "queued", "a status of one org never moves another org's message");
    ingress.finish().await;
}
