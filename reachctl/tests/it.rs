//! Integration tests of `reachctl`: the real binary against a database of its own.

use std::process::Command;

use reach_shared::signing::WebhookSecret;
use reach_shared::testing::TestDatabase;
use secrecy::ExposeSecret;
use sha2::Digest;
use serde_json::{Value, json};
use uuid::Uuid;

const ORG: &str = "0b6f3a53-8d0a-4c34-9c55-2f1a3e0c0001";
const SUBSCRIPTION: &str = "0b6f3a53-8d0a-4c34-9c55-2f1a3e0c0002";

/// Runs reachctl against the database; returns stdout lines parsed as JSON, or the
/// stderr text when the command failed.
fn reachctl(database: &TestDatabase, args: &[&str]) -> Result<Vec<Value>, String> {
    let output = Command::new(env!("CARGO_BIN_EXE_reachctl"))
        .args(args)
        .env("DATABASE_URL", &database.url)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .env_remove("REACH_OPERATOR")
        .output()
        .expect("reachctl runs");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let stdout = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    Ok(stdout.lines().map(|line| serde_json::from_str(line).expect("each line is JSON")).collect())
}

fn provisioning_file(secret: &str) -> tempfile_path::TempFile {
    let file = json!({"orgs": [{
        "id": ORG, "slug": "acme", "name": "Acme",
        "wabas": [{"waba_id": "100000000000001", "access_token": "token-1",
                   "phone_numbers": [{"phone_number_id": "200000000000001", "display_phone_number": "+1 555 000 1111",
                                      "mps": 80, "quality_rating": "GREEN"}]}],
        "subscriptions": [{"id": SUBSCRIPTION, "url": "https://hooks.acme.test/reach", "events": ["*"], "secret": secret}]
    }]});
    tempfile_path::TempFile::with_contents(&file.to_string())
}

#[tokio::test]
async fn provision_twice_changes_nothing() {
    let database = TestDatabase::create().await.expect("test database");
    let secret = WebhookSecret::generate();
    let file = provisioning_file(secret.expose_secret());

    let first = reachctl(&database, &["provision", "--file", file.path()]).expect("first provision");
    assert_eq!(first[0]["provisioned"]["orgs"], 1);
    assert_eq!(first[0]["provisioned"]["secrets"], 1);
    let second = reachctl(&database, &["provision", "--file", file.path()]).expect("second provision");
    assert_eq!(second[0]["provisioned"], json!({"orgs": 0, "wabas": 0, "phone_numbers": 0, "subscriptions": 0, "secrets": 0}));

    let rotated = provisioning_file(WebhookSecret::generate().expose_secret());
    let third = reachctl(&database, &["provision", "--file", rotated.path()]).expect("rotation");
    assert_eq!(third[0]["provisioned"]["secrets"], 1, "a new secret is a rotation");
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_subscription_secrets WHERE expires_at IS NULL OR expires_at > now()")
        .fetch_one(&database.pool)
        .await
        .unwrap();
    assert_eq!(active, 2, "the previous secret keeps signing during the rotation");

    let back = reachctl(&database, &["provision", "--file", file.path()]).expect("rotation back");
    assert_eq!(back[0]["provisioned"]["secrets"], 1, "giving the earlier secret again rotates back to it");
    let permanent: Vec<Vec<u8>> = sqlx::query_scalar("SELECT secret_sha256 FROM webhook_subscription_secrets WHERE expires_at IS NULL")
        .fetch_all(&database.pool)
        .await
        .unwrap();
    let first_hash = sha2::Sha256::digest(secret.expose_secret().as_bytes()).to_vec();
    assert_eq!(permanent, vec![first_hash], "only the earlier secret signs for good");
    database.drop_database().await.unwrap();
}

#[tokio::test]
async fn provision_rejects_invalid_file() {
    let database = TestDatabase::create().await.expect("test database");
    let file = provisioning_file("not-a-whsec-secret");
    let error = reachctl(&database, &["provision", "--file", file.path()]).expect_err("invalid secret");
    assert!(error.contains("invalid secret"), "{error}");
    let orgs: i64 = sqlx::query_scalar("SELECT count(*) FROM orgs").fetch_one(&database.pool).await.unwrap();
    assert_eq!(orgs, 0, "nothing is written from an invalid file");
    database.drop_database().await.unwrap();
}

/// Inserts `count` parked deliveries for the provisioned subscription.
async fn park_deliveries(database: &TestDatabase, count: i64) {
    sqlx::query(
        "INSERT INTO events (id, org_id, type, dedup_key, data, created_at)
         SELECT gen_random_uuid(), $1, 'message.received', 'k' || n, '{}', now() FROM generate_series(1, $2) AS n",
    )
    .bind(Uuid::parse_str(ORG).unwrap())
    .bind(count)
    .execute(&database.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO webhook_deliveries (org_id, event_id, subscription_id, status, attempt_count, parked_at, last_error)
         SELECT org_id, id, $1, 'parked', 8, now() - interval '1 hour', 'endpoint answered 500' FROM events",
    )
    .bind(Uuid::parse_str(SUBSCRIPTION).unwrap())
    .execute(&database.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn parked_replay_requires_reason() {
    let database = TestDatabase::create().await.expect("test database");
    let file = provisioning_file(WebhookSecret::generate().expose_secret());
    reachctl(&database, &["provision", "--file", file.path()]).expect("provision");
    park_deliveries(&database, 3).await;

    let listed = reachctl(&database, &["parked", "list"]).expect("list");
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|d| d["last_error"] == "endpoint answered 500"));

    let missing = reachctl(&database, &["parked", "replay", "--org", ORG, "--actor", "alice"]).expect_err("no reason");
    assert!(missing.contains("--reason"), "{missing}");
    let empty = reachctl(&database, &["parked", "replay", "--org", ORG, "--actor", "alice", "--reason", " "]).expect_err("empty reason");
    assert!(empty.contains("--reason is required"), "{empty}");
    let unselected = reachctl(&database, &["parked", "replay", "--actor", "alice", "--reason", "fixed"]).expect_err("no selection");
    assert!(unselected.contains("select what to replay"), "{unselected}");
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM platform.audit_events").fetch_one(&database.pool).await.unwrap();
    assert_eq!(audited, 0, "rejected commands change nothing");
    database.drop_database().await.unwrap();
}

#[tokio::test]
async fn parked_replay_by_window_audited() {
    let database = TestDatabase::create().await.expect("test database");
    let file = provisioning_file(WebhookSecret::generate().expose_secret());
    reachctl(&database, &["provision", "--file", file.path()]).expect("provision");
    park_deliveries(&database, 2500).await;

    let window_start = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    let replayed = reachctl(
        &database,
        &["parked", "replay", "--since", &window_start, "--actor", "alice", "--reason", "endpoint fixed"],
    )
    .expect("replay");
    assert_eq!(replayed[0]["replayed"], 2500, "every parked delivery of the window, across batches");

    let (pending, reset): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE attempt_count = 0 AND next_attempt_at <= now())
         FROM webhook_deliveries",
    )
    .fetch_one(&database.pool)
    .await
    .unwrap();
    assert_eq!(pending, 2500, "replayed deliveries are pending again");
    assert_eq!(reset, 2500, "with a fresh schedule, due now");

    let (actor, action, reason): (String, String, String) =
        sqlx::query_as("SELECT actor_user_id, action, reason FROM platform.audit_events").fetch_one(&database.pool).await.unwrap();
    assert_eq!(actor, "alice");
    assert_eq!(action, "ParkedDeliveries.Replay");
    assert!(reason.starts_with("endpoint fixed"), "{reason}");

    let again = reachctl(&database, &["parked", "replay", "--since", &window_start, "--actor", "alice", "--reason", "again"]).expect("replay");
    assert_eq!(again[0]["replayed"], 0, "nothing parked is left to replay");
    database.drop_database().await.unwrap();
}

/// A file in the system temporary directory, removed on drop.
mod tempfile_path {
    pub struct TempFile(std::path::PathBuf);

    impl TempFile {
        pub fn with_contents(contents: &str) -> Self {
            let path = std::env::temp_dir().join(format!("reachctl-test-{}.json", uuid::Uuid::new_v4()));
            std::fs::write(&path, contents).expect("write the temporary file");
            Self(path)
        }

        pub fn path(&self) -> &str {
            self.0.to_str().expect("temporary paths are UTF-8")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
