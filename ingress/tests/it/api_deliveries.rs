//! The customer API `/v1/webhook-deliveries`: listing with filters and pagination, one
//! delivery with its attempts, and replays of parked deliveries, each scoped to the
//! caller's org. Deliveries are seeded with SQL, as the relay would write them.

use std::collections::HashSet;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::api_subscriptions::{call, create_subscription, provision_org};
use crate::harness::{TestIngress, token};

/// Inserts `count` events of the subscription's org, each with one delivery in `status`
/// created at `at` (and delivered or parked at `at`). Returns the delivery ids.
async fn seed(ingress: &TestIngress, subscription_id: &Value, status: &str, count: i32, at: DateTime<Utc>) -> Vec<i64> {
    sqlx::query_scalar(
        "WITH subscription AS (SELECT id, org_id FROM webhook_subscriptions WHERE id = $1::uuid),
         new_events AS (
             INSERT INTO events (id, org_id, type, dedup_key, data, created_at)
             SELECT gen_random_uuid(), s.org_id, 'message.read', 'seed:' || gen_random_uuid(), '{\"secret\": \"body\"}', $4
             FROM subscription s, generate_series(1, $3)
             RETURNING id, org_id)
         INSERT INTO webhook_deliveries
             (org_id, event_id, subscription_id, status, attempt_count, next_attempt_at, last_status_code, last_error, created_at,
              delivered_at, parked_at)
         SELECT e.org_id, e.id, $1::uuid, $2, 1,
                CASE WHEN $2 = 'pending' THEN now() + interval '1 hour' END,
                CASE WHEN $2 = 'delivered' THEN 200 ELSE 500 END,
                CASE WHEN $2 = 'delivered' THEN NULL ELSE 'endpoint returned 500' END,
                $4, CASE WHEN $2 = 'delivered' THEN $4 END, CASE WHEN $2 = 'parked' THEN $4 END
         FROM new_events e
         RETURNING id",
    )
    .bind(subscription_id.as_str().expect("a subscription id"))
    .bind(status)
    .bind(count)
    .bind(at)
    .fetch_all(&ingress.pool)
    .await
    .expect("failed to seed deliveries")
}

/// Builds `/webhook-deliveries?{params}`, percent-encoded.
fn list_path(params: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse("http://localhost/").expect("valid URL");
    url.query_pairs_mut().extend_pairs(params);
    format!("/webhook-deliveries?{}", url.query().unwrap_or_default())
}

fn ids(page: &Value) -> Vec<i64> {
    page["data"].as_array().unwrap_or_else(|| panic!("no data in {page}")).iter().map(|d| d["id"].as_i64().unwrap()).collect()
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn delivery_status(ingress: &TestIngress, id: i64) -> String {
    sqlx::query_scalar("SELECT status FROM webhook_deliveries WHERE id = $1").bind(id).fetch_one(&ingress.pool).await.unwrap()
}

/// Returns the distinct statuses of the given deliveries.
async fn statuses(ingress: &TestIngress, ids: &[i64]) -> HashSet<String> {
    let mut statuses = HashSet::new();
    for &id in ids {
        statuses.insert(delivery_status(ingress, id).await);
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_listed_with_filters_and_pages() {
    let ingress = TestIngress::start().await;
    let (_, bearer) = provision_org(&ingress, "user-a").await;
    let (_, other_bearer) = provision_org(&ingress, "user-b").await;
    let first = create_subscription(&ingress, &bearer, "https://one.example.com/hook").await;
    let second = create_subscription(&ingress, &bearer, "https://two.example.com/hook").await;
    let foreign = create_subscription(&ingress, &other_bearer, "https://other.example.com/hook").await;
    let now = Utc::now();
    let delivered = seed(&ingress, &first["id"], "delivered", 3, now - TimeDelta::hours(2)).await;
    let parked = seed(&ingress, &first["id"], "parked", 2, now - TimeDelta::hours(1)).await;
    let pending = seed(&ingress, &second["id"], "pending", 2, now).await;
    let foreign_ids = seed(&ingress, &foreign["id"], "parked", 1, now).await;

    let all = call(&ingress, Method::GET, "/webhook-deliveries", Some(&bearer), None).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    let mut expected: Vec<i64> = [delivered.clone(), parked.clone(), pending.clone()].concat();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids(&all.body), expected, "every delivery of the org, newest first");
    assert_eq!(all.body["next_cursor"], Value::Null);
    let item = &all.body["data"][0];
    let mut keys: Vec<&str> = item.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let expected_keys = [
        "attempt_count", "created_at", "delivered_at", "event_id", "event_type", "id", "last_error", "last_status_code",
        "next_attempt_at", "parked_at", "status", "subscription_id", "updated_at",
    ];
    assert_eq!(keys, expected_keys, "no callback body: {item}");
    assert_eq!(item["event_type"], "message.read");
    assert!(!all.body.to_string().contains("secret"), "event data is not listed");

    let ninety_minutes_ago = rfc3339(now - TimeDelta::minutes(90));
    let cases = [
        (vec![("status", "parked")], &parked),
        (vec![("subscription_id", second["id"].as_str().unwrap())], &pending),
        (vec![("until", ninety_minutes_ago.as_str())], &delivered),
        (vec![("since", ninety_minutes_ago.as_str()), ("status", "pending")], &pending),
    ];
    for (params, expected) in cases {
        let page = call(&ingress, Method::GET, &list_path(&params), Some(&bearer), None).await;
        assert_eq!(page.status, StatusCode::OK, "{params:?}: {}", page.body);
        let mut got = ids(&page.body);
        got.sort_unstable();
        assert_eq!(&got, expected, "{params:?}");
    }

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut params = vec![("limit", "3".to_owned())];
        if let Some(cursor) = &cursor {
            params.push(("cursor", cursor.clone()));
        }
        let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let page = call(&ingress, Method::GET, &list_path(&params), Some(&bearer), None).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        seen.extend(ids(&page.body));
        pages += 1;
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3, "7 deliveries in pages of 3");
    assert_eq!(seen, expected, "the pages together list every delivery once, in order");

    let foreign_list = call(&ingress, Method::GET, "/webhook-deliveries", Some(&other_bearer), None).await;
    assert_eq!(ids(&foreign_list.body), foreign_ids, "each org lists only its own");

    let invalid = [
        vec![("status", "lost")],
        vec![("limit", "0")],
        vec![("limit", "1001")],
        vec![("cursor", "abc")],
        vec![("since", "yesterday")],
        vec![("since", "2026-12-05T00:00:00Z"), ("until", "2026-12-04T00:00:00Z")],
        vec![("state", "parked")],
    ];
    for params in invalid {
        let reply = call(&ingress, Method::GET, &list_path(&params), Some(&bearer), None).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{params:?}: {}", reply.body);
        assert_eq!(reply.code(), "invalid_query", "{params:?}");
    }
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_shown_with_attempts() {
    let ingress = TestIngress::start().await;
    let (org_id, bearer) = provision_org(&ingress, "user-a").await;
    let (_, other_bearer) = provision_org(&ingress, "user-b").await;
    let subscription = create_subscription(&ingress, &bearer, "https://one.example.com/hook").await;
    let id = seed(&ingress, &subscription["id"], "parked", 1, Utc::now()).await[0];
    sqlx::query(
        "INSERT INTO webhook_attempts (org_id, delivery_id, attempted_at, duration_ms, status_code, response_body)
         VALUES ($1, $2, now() - interval '1 minute', 12, 503, 'busy'), ($1, $2, now(), 15, 500, 'broken')",
    )
    .bind(org_id)
    .bind(id)
    .execute(&ingress.pool)
    .await
    .unwrap();

    let path = format!("/webhook-deliveries/{id}");
    let shown = call(&ingress, Method::GET, &path, Some(&bearer), None).await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.body);
    assert_eq!(shown.body["status"], "parked");
    let codes: Vec<i64> = shown.body["attempts"].as_array().unwrap().iter().map(|a| a["status_code"].as_i64().unwrap()).collect();
    assert_eq!(codes, [500, 503], "latest attempt first");
    assert_eq!(shown.body["attempts"][0]["response_body"], "broken");

    let foreign = call(&ingress, Method::GET, &path, Some(&other_bearer), None).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "another org's delivery");
    let missing = call(&ingress, Method::GET, "/webhook-deliveries/999999", Some(&bearer), None).await;
    assert_eq!(foreign.body, missing.body, "returns the same 404 as a missing one");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_one_parked_delivery() {
    let ingress = TestIngress::start().await;
    let (org_id, bearer) = provision_org(&ingress, "user-a").await;
    let (_, other_bearer) = provision_org(&ingress, "user-b").await;
    let admin = token(json!({"sub": "op-1", "platform_admin": true}));
    let subscription = create_subscription(&ingress, &bearer, "https://one.example.com/hook").await;
    let parked = seed(&ingress, &subscription["id"], "parked", 2, Utc::now()).await;
    let delivered = seed(&ingress, &subscription["id"], "delivered", 1, Utc::now()).await[0];
    let path = |id: i64| format!("/webhook-deliveries/{id}/replay");

    // Rejected requests change nothing.
    let foreign = call(&ingress, Method::POST, &path(parked[0]), Some(&other_bearer), None).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "another org's delivery: {}", foreign.body);
    let anonymous = call(&ingress, Method::POST, &path(parked[0]), None, None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let operator = call(&ingress, Method::POST, &path(parked[0]), Some(&admin), None).await;
    assert_eq!(operator.status, StatusCode::FORBIDDEN);
    let malformed = call(&ingress, Method::POST, "/webhook-deliveries/abc/replay", Some(&bearer), None).await;
    assert_eq!(malformed.status, StatusCode::NOT_FOUND);
    assert_eq!(delivery_status(&ingress, parked[0]).await, "parked");

    let replayed = call(&ingress, Method::POST, &path(parked[0]), Some(&bearer), None).await;
    assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.body);
    assert_eq!(replayed.body, json!({"replayed": 1, "skipped_disabled": 0}));
    let (status, attempt_count, due): (String, i32, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT status, attempt_count, next_attempt_at FROM webhook_deliveries WHERE id = $1")
            .bind(parked[0])
            .fetch_one(&ingress.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempt_count), ("pending", 0), "back to pending with a fresh schedule");
    assert!(due.is_some_and(|at| at <= Utc::now()), "due at once: {due:?}");
    assert_eq!(delivery_status(&ingress, parked[1]).await, "parked", "only the named delivery is replayed");

    for id in [parked[0], delivered] {
        let conflict = call(&ingress, Method::POST, &path(id), Some(&bearer), None).await;
        assert_eq!(conflict.status, StatusCode::CONFLICT, "delivery {id}: {}", conflict.body);
        assert_eq!(conflict.code(), "delivery_not_parked");
    }

    sqlx::query("UPDATE webhook_subscriptions SET status = 'disabled' WHERE id = $1::uuid")
        .bind(subscription["id"].as_str().unwrap())
        .execute(&ingress.pool)
        .await
        .unwrap();
    let disabled = call(&ingress, Method::POST, &path(parked[1]), Some(&bearer), None).await;
    assert_eq!(disabled.status, StatusCode::CONFLICT, "{}", disabled.body);
    assert_eq!(disabled.code(), "subscription_not_active");
    assert_eq!(delivery_status(&ingress, parked[1]).await, "parked");

    let audited: Vec<(Option<String>, Option<Uuid>, Option<String>)> =
        sqlx::query_as("SELECT actor_user_id, target_org_id, target_id FROM platform.audit_events WHERE action = 'ParkedDeliveries.Replay'")
            .fetch_all(&ingress.pool)
            .await
            .unwrap();
    assert_eq!(audited.len(), 1, "one audit event per replay: {audited:?}");
    assert_eq!(audited[0].0.as_deref(), Some("user-a"));
    assert_eq!(audited[0].1, Some(org_id));
    assert!(audited[0].2.as_deref().is_some_and(|target| target.contains(&format!("ids={}", parked[0]))), "{audited:?}");
    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_window_of_parked_deliveries() {
    let ingress = TestIngress::start().await;
    let (_, bearer) = provision_org(&ingress, "user-a").await;
    let (_, other_bearer) = provision_org(&ingress, "user-b").await;
    let first = create_subscription(&ingress, &bearer, "https://one.example.com/hook").await;
    let second = create_subscription(&ingress, &bearer, "https://two.example.com/hook").await;
    let foreign = create_subscription(&ingress, &other_bearer, "https://other.example.com/hook").await;
    let now = Utc::now();
    let old = seed(&ingress, &first["id"], "parked", 2, now - TimeDelta::days(3)).await;
    let recent_first = seed(&ingress, &first["id"], "parked", 2, now - TimeDelta::hours(1)).await;
    let recent_second = seed(&ingress, &second["id"], "parked", 1, now - TimeDelta::hours(1)).await;
    let recent_foreign = seed(&ingress, &foreign["id"], "parked", 1, now - TimeDelta::hours(1)).await;
    let window = json!({"since": rfc3339(now - TimeDelta::hours(2)), "until": rfc3339(now + TimeDelta::minutes(1))});

    let invalid = [
        (json!({"since": rfc3339(now - TimeDelta::days(32)), "until": rfc3339(now)}), "invalid_window"),
        (json!({"since": rfc3339(now), "until": rfc3339(now - TimeDelta::hours(1))}), "invalid_window"),
        (json!({"since": rfc3339(now)}), "invalid_body"),
        (json!({}), "invalid_body"),
    ];
    for (body, code) in invalid {
        let reply = call(&ingress, Method::POST, "/webhook-deliveries/replay", Some(&bearer), Some(body.clone())).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {}", reply.body);
        assert_eq!(reply.code(), code, "{body}");
    }
    let mut foreign_window = window.clone();
    foreign_window["subscription_id"] = foreign["id"].clone();
    let reply = call(&ingress, Method::POST, "/webhook-deliveries/replay", Some(&bearer), Some(foreign_window)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "another org's subscription: {}", reply.body);
    assert_eq!(ingress.count("SELECT count(*) FROM webhook_deliveries WHERE status = 'parked'").await, 6, "rejected replays change nothing");

    let mut first_window = window.clone();
    first_window["subscription_id"] = first["id"].clone();
    let replayed = call(&ingress, Method::POST, "/webhook-deliveries/replay", Some(&bearer), Some(first_window)).await;
    assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.body);
    assert_eq!(replayed.body["replayed"], 2, "{}", replayed.body);

    let replayed = call(&ingress, Method::POST, "/webhook-deliveries/replay", Some(&bearer), Some(window.clone())).await;
    assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.body);
    assert_eq!(replayed.body["replayed"], 1, "the rest of the org's window: {}", replayed.body);

    let pending = HashSet::from(["pending".to_owned()]);
    let parked = HashSet::from(["parked".to_owned()]);
    assert_eq!(statuses(&ingress, &[recent_first, recent_second].concat()).await, pending);
    assert_eq!(statuses(&ingress, &old).await, parked, "parked before the window");
    assert_eq!(statuses(&ingress, &recent_foreign).await, parked, "another org's deliveries");

    let foreign_replay = call(&ingress, Method::POST, "/webhook-deliveries/replay", Some(&other_bearer), Some(window)).await;
    assert_eq!(foreign_replay.body["replayed"], 1, "the other org replays its own: {}", foreign_replay.body);
    assert_eq!(statuses(&ingress, &recent_foreign).await, pending);
    ingress.finish().await;
}
