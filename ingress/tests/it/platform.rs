//! `/platform/health` on the operator listener: authentication, the figures, and the
//! append-only audit log.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestIngress, token};

async fn get_health(ingress: &TestIngress, authorization: Option<&str>) -> (StatusCode, Value) {
    let mut request = ingress.client.get(format!("http://{}/platform/health", ingress.admin_addr)).header("user-agent", "platform-test");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.expect("operator listener answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_requires_admin_token() {
    let ingress = TestIngress::start().await;

    let (status, body) = get_health(&ingress, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
    assert_eq!(body["error"]["code"], "missing_token");

    let (status, _) = get_health(&ingress, Some("Bearer not-a-jwt")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "malformed token");

    let customer = token(json!({"sub": "user-1", "email": "dev@acme.test", "org_id": "0b6f3a53-8d0a-4c34-9c55-2f1a3e0c0001"}));
    let (status, body) = get_health(&ingress, Some(&format!("Bearer {customer}"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "customer token without platform_admin");
    assert_eq!(body["error"]["code"], "forbidden");

    let admin = token(json!({"sub": "op-1", "email": "ops@reach.test", "platform_admin": true}));
    let (status, _) = get_health(&ingress, Some(&format!("Bearer {admin}"))).await;
    assert_eq!(status, StatusCode::OK, "admin token");

    let rows: Vec<(Option<String>, String, i32, Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT actor_email, action, status_code, reason, user_agent, ip FROM platform.audit_events ORDER BY id",
    )
    .fetch_all(&ingress.pool)
    .await
    .expect("read audit events");
    assert_eq!(rows.len(), 4, "every request is audited, refused ones included");
    let statuses: Vec<i32> = rows.iter().map(|r| r.2).collect();
    assert_eq!(statuses, vec![401, 401, 403, 200]);
    assert!(rows.iter().all(|r| r.1 == "PlatformHealth.Show"), "action names the operation");
    assert_eq!(rows[2].0.as_deref(), Some("dev@acme.test"), "a refused token still names its actor");
    assert!(rows[2].3.as_deref().unwrap_or_default().contains("platform_admin"), "the reason says what was missing");
    assert_eq!(rows[3].0.as_deref(), Some("ops@reach.test"));
    assert!(rows.iter().all(|r| r.4.as_deref() == Some("platform-test")), "user agent recorded");
    assert!(rows.iter().all(|r| r.5.as_deref() == Some("127.0.0.1")), "client address recorded");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_counters() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;
    let posted = ingress.post_signed(&crate::harness::fixture("02_status_batch_with_failed.wire.json")).await;
    assert_eq!(posted.status, StatusCode::OK);
    crate::harness::wait_for("outbox rows dispatched", || async {
        (ingress.count("SELECT count(*) FROM outbox WHERE state = 'dispatched'").await == 4).then_some(())
    })
    .await;
    sqlx::query("INSERT INTO outbox (topic, routing_key, message_id, payload, created_at) VALUES ('event', 'x', gen_random_uuid(), '\\x00', now() - interval '90 seconds')")
        .execute(&ingress.pool)
        .await
        .expect("insert a pending row");
    sqlx::query("UPDATE outbox SET available_at = now() + interval '1 hour' WHERE routing_key = 'x'")
        .execute(&ingress.pool)
        .await
        .expect("keep it pending");

    let admin = token(json!({"sub": "op-1", "platform_admin": true}));
    let (status, body) = get_health(&ingress, Some(&format!("Bearer {admin}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["outbox"]["dispatched"], 4, "{body}");
    assert_eq!(body["outbox"]["pending"], 1, "{body}");
    assert_eq!(body["outbox"]["failed"], 0, "{body}");
    let age = body["outbox"]["oldest_pending_age_seconds"].as_f64().expect("age is a number");
    assert!((89.0..200.0).contains(&age), "oldest pending row is about 90 s old, got {age}");
    assert_eq!(body["phone_numbers"]["quality"]["UNKNOWN"], 1, "the fixture org provisions one number without a rating: {body}");
    assert_eq!(body["phone_numbers"]["quality"]["RED"], 0, "{body}");
    assert_eq!(body["webhooks"]["delivered"], 0, "{body}");
    assert!(body["generated_at"].as_str().is_some_and(|at| at.ends_with('Z')), "{body}");
    let text = body.to_string();
    assert!(!text.contains("wamid") && !text.contains("1555"), "no message or number data: {text}");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_rejects_changes() {
    let ingress = TestIngress::start().await;
    let (status, _) = get_health(&ingress, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = get_health(&ingress, Some("Bearer x")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let update = sqlx::query("UPDATE platform.audit_events SET status_code = 200").execute(&ingress.pool).await;
    let error = update.expect_err("UPDATE must be rejected");
    assert!(error.to_string().contains("append-only"), "{error}");
    let delete = sqlx::query("DELETE FROM platform.audit_events").execute(&ingress.pool).await;
    assert!(delete.is_err(), "DELETE must be rejected");
    let truncate = sqlx::query("TRUNCATE platform.audit_events").execute(&ingress.pool).await;
    assert!(truncate.is_err(), "TRUNCATE must be rejected");
    assert_eq!(ingress.count("SELECT count(*) FROM platform.audit_events").await, 2, "both rows survive");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_platform_route_audited() {
    let ingress = TestIngress::start().await;
    let response = ingress.client.get(format!("http://{}/platform/secrets", ingress.admin_addr)).send().await.expect("answers");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let action: String = sqlx::query_scalar("SELECT action FROM platform.audit_events").fetch_one(&ingress.pool).await.expect("one row");
    assert_eq!(action, "Platform.NotFound");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_replay_needs_reason() {
    let ingress = TestIngress::start().await;
    let org_id = ingress.provision_fixture_org().await;
    let subscription = uuid::Uuid::new_v4();
    sqlx::query("INSERT INTO webhook_subscriptions (id, org_id, url, event_types) VALUES ($1, $2, 'https://hooks.test/x', '{*}')")
        .bind(subscription)
        .bind(org_id)
        .execute(&ingress.pool)
        .await
        .expect("insert a subscription");
    sqlx::query(
        "INSERT INTO events (id, org_id, type, dedup_key, data, created_at)
         SELECT gen_random_uuid(), $1, 'message.received', 'k' || n, '{}', now() FROM generate_series(1, 3) AS n",
    )
    .bind(org_id)
    .execute(&ingress.pool)
    .await
    .expect("insert events");
    sqlx::query("INSERT INTO webhook_deliveries (org_id, event_id, subscription_id, status, parked_at) SELECT org_id, id, $1, 'parked', now() FROM events")
        .bind(subscription)
        .execute(&ingress.pool)
        .await
        .expect("insert parked deliveries");

    let url = format!("http://{}/platform/webhook-deliveries/replay", ingress.admin_addr);
    let admin = format!("Bearer {}", token(json!({"sub": "op-1", "email": "ops@reach.test", "platform_admin": true})));
    let without_token = ingress.client.post(&url).json(&json!({"org_id": org_id, "reason": "fixed"})).send().await.unwrap();
    assert_eq!(without_token.status(), StatusCode::UNAUTHORIZED);
    let without_reason = ingress.client.post(&url).header("authorization", &admin).json(&json!({"org_id": org_id})).send().await.unwrap();
    assert_eq!(without_reason.status(), StatusCode::UNPROCESSABLE_ENTITY, "a replay needs a reason");
    let without_selection = ingress.client.post(&url).header("authorization", &admin).json(&json!({"reason": "fixed"})).send().await.unwrap();
    assert_eq!(without_selection.status(), StatusCode::UNPROCESSABLE_ENTITY, "a replay needs a selection");
    let misspelt = ingress
        .client
        .post(&url)
        .header("authorization", &admin)
        .json(&json!({"org": org_id, "since": "2026-01-01T00:00:00Z", "reason": "fixed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(misspelt.status(), StatusCode::UNPROCESSABLE_ENTITY, "an unknown field is rejected, not ignored");
    assert_eq!(ingress.count("SELECT count(*) FROM webhook_deliveries WHERE status = 'parked'").await, 3, "refused replays change nothing");

    let replayed = ingress
        .client
        .post(&url)
        .header("authorization", &admin)
        .json(&json!({"org_id": org_id, "reason": "endpoint fixed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), StatusCode::OK);
    let body: Value = replayed.json().await.unwrap();
    assert_eq!(body["replayed"], 3, "{body}");
    assert_eq!(ingress.count("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'").await, 3);

    let audited: Vec<(String, i32, Option<String>)> =
        sqlx::query_as("SELECT action, status_code, reason FROM platform.audit_events ORDER BY id").fetch_all(&ingress.pool).await.unwrap();
    let statuses: Vec<i32> = audited.iter().filter(|a| a.0 == "PlatformParkedDeliveries.Replay").map(|a| a.1).collect();
    assert_eq!(statuses, vec![401, 422, 422, 422, 200], "every request is audited");
    let change = audited.iter().find(|a| a.0 == "ParkedDeliveries.Replay").expect("the replay itself is audited");
    assert!(change.2.as_deref().unwrap_or_default().starts_with("endpoint fixed"), "{change:?}");
    ingress.finish().await;
}
