//! The customer API `/v1/webhook-subscriptions`: secrets, CRUD, rotation, tenant
//! isolation and input validation. Also the request helpers the deliveries tests use.

use chrono::{TimeDelta, Utc};
use reach_shared::secrets::SecretSealer;
use reach_shared::signing::{WebhookSecret, signature_header, verify_signature_header};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{TestIngress, token};

/// A customer API response with its JSON body, which is `Value::Null` when the body is empty.
pub struct ApiReply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl ApiReply {
    /// Returns the `error.code` of an error response.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an API error: {} {}", self.status, self.body))
    }
}

/// Sends `method /v1{path}` with an optional bearer token and JSON body.
pub async fn call(ingress: &TestIngress, method: Method, path: &str, bearer: Option<&str>, body: Option<Value>) -> ApiReply {
    let mut request = ingress.client.request(method.clone(), format!("http://{}/v1{path}", ingress.addr));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap_or_else(|error| panic!("{method} {path} failed: {error}"));
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("failed to read the response body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|error| panic!("{method} {path}: body is not JSON ({error}): {:?}", String::from_utf8_lossy(&bytes)))
    };
    ApiReply { status, headers, body }
}

/// Provisions an org without WABAs and returns its id and a token of one of its users.
pub async fn provision_org(ingress: &TestIngress, user: &str) -> (Uuid, String) {
    let org_id = Uuid::new_v4();
    ingress.provision(json!({"orgs": [{"id": org_id, "slug": format!("org-{org_id}"), "name": "Test Org"}]})).await;
    (org_id, token(json!({"sub": user, "org_id": org_id})))
}

/// Creates a subscription through the API and returns its response body.
pub async fn create_subscription(ingress: &TestIngress, bearer: &str, url: &str) -> Value {
    let reply = call(ingress, Method::POST, "/webhook-subscriptions", Some(bearer), Some(json!({"url": url, "events": ["*"]}))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    reply.body
}

/// Returns `(sealed secret, expires_at)` of every secret row of a subscription, oldest first.
async fn stored_secrets(ingress: &TestIngress, subscription_id: &str) -> Vec<(String, Option<chrono::DateTime<Utc>>)> {
    sqlx::query_as("SELECT secret_sealed, expires_at FROM webhook_subscription_secrets WHERE subscription_id = $1::uuid ORDER BY id")
        .bind(subscription_id)
        .fetch_all(&ingress.pool)
        .await
        .expect("failed to read secrets")
}

fn unseal(sealed: &str) -> String {
    SecretSealer::Passthrough.unseal(sealed).expect("the test ingress stores secrets in passthrough mode").expose_secret().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_returns_signing_secret() {
    let ingress = TestIngress::start().await;
    let (_, bearer) = provision_org(&ingress, "user-a").await;

    let body = json!({"url": "https://hooks.example.com/reach", "events": ["message.read", "message.received", "message.read"]});
    let created = call(&ingress, Method::POST, "/webhook-subscriptions", Some(&bearer), Some(body)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().expect("id is a string").to_owned();
    let location = created.headers.get("location").and_then(|v| v.to_str().ok());
    assert_eq!(location, Some(format!("/v1/webhook-subscriptions/{id}").as_str()));
    assert_eq!(created.body["events"], json!(["message.read", "message.received"]), "sorted without duplicates");
    assert_eq!(created.body["status"], "active");
    let secret = created.body["secret"].as_str().expect("the create response carries the secret").to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");

    // The relay signs with the stored secret, and a customer verifies with the returned one.
    let stored = stored_secrets(&ingress, &id).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1, None, "the first secret does not expire");
    let signer = WebhookSecret::parse(&unseal(&stored[0].0)).expect("the stored secret parses");
    let callback = br#"{"id":"evt","type":"message.read"}"#;
    let header = signature_header(&[signer], "msg_1", 1_767_225_600, callback);
    let verifier = WebhookSecret::parse(&secret).expect("the returned secret parses");
    assert!(verify_signature_header(&verifier, "msg_1", 1_767_225_600, callback, &header), "returned secret verifies the signature");
    let other = WebhookSecret::parse(WebhookSecret::generate().expose_secret()).unwrap();
    assert!(!verify_signature_header(&other, "msg_1", 1_767_225_600, callback, &header), "another secret does not");

    let shown = call(&ingress, Method::GET, &format!("/webhook-subscriptions/{id}"), Some(&bearer), None).await;
    assert_eq!(shown.status, StatusCode::OK);
    assert!(shown.body.get("secret").is_none(), "GET carries no secret: {}", shown.body);
    let listed = call(&ingress, Method::GET, "/webhook-subscriptions", Some(&bearer), None).await;
    assert!(!listed.body.to_string().contains(&secret), "the list carries no secret");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_list_update_delete() {
    let ingress = TestIngress::start().await;
    let (org_id, bearer) = provision_org(&ingress, "user-a").await;
    let first = create_subscription(&ingress, &bearer, "https://one.example.com/hook").await;
    let second = create_subscription(&ingress, &bearer, "https://two.example.com/hook").await;
    let first_id = first["id"].as_str().unwrap().to_owned();
    let second_path = format!("/webhook-subscriptions/{}", second["id"].as_str().unwrap());

    let listed = call(&ingress, Method::GET, "/webhook-subscriptions", Some(&bearer), None).await;
    assert_eq!(listed.status, StatusCode::OK);
    let urls: Vec<&str> = listed.body["data"].as_array().unwrap().iter().map(|s| s["url"].as_str().unwrap()).collect();
    assert_eq!(urls, ["https://one.example.com/hook", "https://two.example.com/hook"], "creation order");

    let patch = json!({"url": "https://two.example.com/v2", "events": ["message.failed"]});
    let updated = call(&ingress, Method::PATCH, &second_path, Some(&bearer), Some(patch)).await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["url"], "https://two.example.com/v2");
    assert_eq!(updated.body["events"], json!(["message.failed"]));
    let shown = call(&ingress, Method::GET, &second_path, Some(&bearer), None).await;
    assert_eq!(shown.body["url"], "https://two.example.com/v2", "the change is stored");

    // The relay disables a subscription whose endpoint returned 410. The customer enables it again.
    sqlx::query("UPDATE webhook_subscriptions SET status = 'disabled', disabled_reason = 'endpoint answered 410 Gone' WHERE id = $1::uuid")
        .bind(second["id"].as_str().unwrap())
        .execute(&ingress.pool)
        .await
        .unwrap();
    let shown = call(&ingress, Method::GET, &second_path, Some(&bearer), None).await;
    assert_eq!(shown.body["status"], "disabled");
    let enabled = call(&ingress, Method::PATCH, &second_path, Some(&bearer), Some(json!({"status": "active"}))).await;
    assert_eq!(enabled.status, StatusCode::OK, "{}", enabled.body);
    assert_eq!(enabled.body["status"], "active");
    assert_eq!(enabled.body["disabled_reason"], Value::Null);

    // Deleting keeps the delivery history and parks what was pending.
    sqlx::query("INSERT INTO events (id, org_id, type, dedup_key, data, created_at) VALUES ($1, $2, 'message.read', 'k1', '{}', now())")
        .bind(Uuid::new_v4())
        .bind(org_id)
        .execute(&ingress.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO webhook_deliveries (org_id, event_id, subscription_id, status, next_attempt_at) SELECT org_id, id, $1::uuid, 'pending', now() FROM events")
        .bind(&first_id)
        .execute(&ingress.pool)
        .await
        .unwrap();
    let first_path = format!("/webhook-subscriptions/{first_id}");
    let deleted = call(&ingress, Method::DELETE, &first_path, Some(&bearer), None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    for (method, body) in [(Method::GET, None), (Method::DELETE, None), (Method::PATCH, Some(json!({"status": "active"})))] {
        let gone = call(&ingress, method.clone(), &first_path, Some(&bearer), body).await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND, "{method} of a deleted subscription");
    }
    let listed = call(&ingress, Method::GET, "/webhook-subscriptions", Some(&bearer), None).await;
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 1, "{}", listed.body);
    let (status, last_error): (String, Option<String>) =
        sqlx::query_as("SELECT status, last_error FROM webhook_deliveries").fetch_one(&ingress.pool).await.expect("the delivery survives");
    assert_eq!(status, "parked");
    assert_eq!(last_error.as_deref(), Some("subscription deleted"));
    assert!(stored_secrets(&ingress, &first_id).await.is_empty(), "a deleted subscription keeps no secret");
    let status: String = sqlx::query_scalar("SELECT status FROM webhook_subscriptions WHERE id = $1::uuid")
        .bind(&first_id)
        .fetch_one(&ingress.pool)
        .await
        .unwrap();
    assert_eq!(status, "deleted", "the row stays for the delivery history");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_old_secret_for_a_day() {
    let ingress = TestIngress::start().await;
    let (_, bearer) = provision_org(&ingress, "user-a").await;
    let created = create_subscription(&ingress, &bearer, "https://hooks.example.com/reach").await;
    let id = created["id"].as_str().unwrap().to_owned();
    let rotate_path = format!("/webhook-subscriptions/{id}/rotate-secret");

    let rotated = call(&ingress, Method::POST, &rotate_path, Some(&bearer), None).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.body);
    let new_secret = rotated.body["secret"].as_str().expect("the rotation returns the new secret");
    assert_ne!(new_secret, created["secret"].as_str().unwrap());
    let expires_at: chrono::DateTime<Utc> = serde_json::from_value(rotated.body["previous_secret_expires_at"].clone()).expect("a timestamp");
    let until_expiry = expires_at - Utc::now();
    assert!(
        (TimeDelta::hours(24) - TimeDelta::minutes(5)..=TimeDelta::hours(24)).contains(&until_expiry),
        "the old secret expires about 24 h from now, got {until_expiry}"
    );

    let stored = stored_secrets(&ingress, &id).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(unseal(&stored[0].0), created["secret"].as_str().unwrap(), "the old secret is kept");
    assert_eq!(stored[0].1, Some(expires_at), "the response names the stored expiry");
    assert_eq!(unseal(&stored[1].0), new_secret);
    assert_eq!(stored[1].1, None, "the new secret does not expire");
    let signing = ingress
        .count(&format!("SELECT count(*) FROM webhook_subscription_secrets WHERE subscription_id = '{id}' AND (expires_at IS NULL OR expires_at > now())"))
        .await;
    assert_eq!(signing, 2, "both secrets sign, as the relay selects them");

    // Three more rotations fill the window, so the next one is rejected.
    for _ in 0..3 {
        let rotated = call(&ingress, Method::POST, &rotate_path, Some(&bearer), None).await;
        assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.body);
    }
    let rejected = call(&ingress, Method::POST, &rotate_path, Some(&bearer), None).await;
    assert_eq!(rejected.status, StatusCode::CONFLICT, "{}", rejected.body);
    assert_eq!(rejected.code(), "too_many_rotating_secrets");
    assert_eq!(stored_secrets(&ingress, &id).await.len(), 5, "the rejected rotation stored nothing");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_isolated_between_orgs() {
    let ingress = TestIngress::start().await;
    let (_, owner) = provision_org(&ingress, "user-a").await;
    let (_, stranger) = provision_org(&ingress, "user-b").await;
    let admin = token(json!({"sub": "op-1", "platform_admin": true}));
    let created = create_subscription(&ingress, &owner, "https://hooks.example.com/reach").await;
    let id = created["id"].as_str().unwrap();
    let path = format!("/webhook-subscriptions/{id}");
    let missing_id = Uuid::new_v4().to_string();

    let requests = [
        (Method::GET, path.clone(), None),
        (Method::PATCH, path.clone(), Some(json!({"status": "disabled"}))),
        (Method::POST, format!("{path}/rotate-secret"), None),
        (Method::DELETE, path.clone(), None),
    ];
    for (method, path, body) in &requests {
        let foreign = call(&ingress, method.clone(), path, Some(&stranger), body.clone()).await;
        assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{method} {path} with another org's token");
        let unknown = call(&ingress, method.clone(), &path.replace(id, &missing_id), Some(&owner), body.clone()).await;
        assert_eq!(foreign.body, unknown.body, "{method}: another org's subscription returns the same 404 as a missing one");
    }
    let listed = call(&ingress, Method::GET, "/webhook-subscriptions", Some(&stranger), None).await;
    assert_eq!(listed.body["data"], json!([]), "another org lists nothing");
    let shown = call(&ingress, Method::GET, &path, Some(&owner), None).await;
    assert_eq!(shown.body["status"], "active", "the other org changed nothing");
    assert_eq!(stored_secrets(&ingress, id).await.len(), 1, "nor rotated the secret");

    let every_endpoint = [
        (Method::POST, "/webhook-subscriptions".to_owned(), Some(json!({"url": "https://x.example.com", "events": ["*"]}))),
        (Method::GET, "/webhook-subscriptions".to_owned(), None),
        (Method::GET, path.clone(), None),
        (Method::PATCH, path.clone(), Some(json!({"status": "disabled"}))),
        (Method::POST, format!("{path}/rotate-secret"), None),
        (Method::DELETE, path.clone(), None),
    ];
    for (method, path, body) in &every_endpoint {
        let anonymous = call(&ingress, method.clone(), path, None, body.clone()).await;
        assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "{method} {path} without a token");
        assert_eq!(anonymous.code(), "missing_token");
        let operator = call(&ingress, method.clone(), path, Some(&admin), body.clone()).await;
        assert_eq!(operator.status, StatusCode::FORBIDDEN, "{method} {path} with a token without org_id");
    }
    assert_eq!(ingress.count("SELECT count(*) FROM webhook_subscriptions WHERE status = 'active'").await, 1);
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_input_validated() {
    let ingress = TestIngress::start().await;
    let (org_id, bearer) = provision_org(&ingress, "user-a").await;
    let long_url = format!("https://hooks.example.com/{}", "a".repeat(2048));
    let cases = [
        (json!({"url": "ftp://hooks.example.com/x", "events": ["*"]}), "invalid_url"),
        (json!({"url": "hooks.example.com/x", "events": ["*"]}), "invalid_url"),
        (json!({"url": "https://user:password@hooks.example.com/x", "events": ["*"]}), "invalid_url"),
        (json!({"url": long_url, "events": ["*"]}), "invalid_url"),
        (json!({"url": "https://hooks.example.com/x", "events": []}), "invalid_events"),
        (json!({"url": "https://hooks.example.com/x", "events": ["*", "message.read"]}), "invalid_events"),
        (json!({"url": "https://hooks.example.com/x", "events": ["message.unknown"]}), "invalid_events"),
        (json!({"events": ["*"]}), "invalid_body"),
        (json!({"url": "https://hooks.example.com/x", "events": ["*"], "secret": "whsec_x"}), "invalid_body"),
    ];
    for (body, code) in cases {
        let reply = call(&ingress, Method::POST, "/webhook-subscriptions", Some(&bearer), Some(body.clone())).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {}", reply.body);
        assert_eq!(reply.code(), code, "{body}");
        assert!(!reply.body["error"]["message"].as_str().unwrap_or_default().is_empty(), "{body}: a message says what to fix");
    }
    assert_eq!(ingress.count("SELECT count(*) FROM webhook_subscriptions").await, 0, "nothing invalid is stored");

    let created = create_subscription(&ingress, &bearer, "https://hooks.example.com/x").await;
    let path = format!("/webhook-subscriptions/{}", created["id"].as_str().unwrap());
    let patches = [
        (json!({}), "empty_update"),
        (json!({"status": "deleted"}), "invalid_body"),
        (json!({"url": "mailto:ops@example.com"}), "invalid_url"),
        (json!({"events": ["message.read", "*"]}), "invalid_events"),
    ];
    for (body, code) in patches {
        let reply = call(&ingress, Method::PATCH, &path, Some(&bearer), Some(body.clone())).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "PATCH {body}: {}", reply.body);
        assert_eq!(reply.code(), code, "PATCH {body}");
    }

    // An org at the limit cannot create another.
    sqlx::query(
        "INSERT INTO webhook_subscriptions (id, org_id, url, event_types)
         SELECT gen_random_uuid(), $1, 'https://hooks.example.com/' || n, '{*}' FROM generate_series(2, 50) AS n",
    )
    .bind(org_id)
    .execute(&ingress.pool)
    .await
    .unwrap();
    let rejected = call(&ingress, Method::POST, "/webhook-subscriptions", Some(&bearer), Some(json!({"url": "https://x.example.com", "events": ["*"]}))).await;
    assert_eq!(rejected.status, StatusCode::CONFLICT, "{}", rejected.body);
    assert_eq!(rejected.code(), "subscription_limit_reached");
    ingress.finish().await;
}
