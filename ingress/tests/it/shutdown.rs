//! SIGTERM under load: the real binary stops accepting, finishes the requests in flight
//! and exits; every webhook it answered 200 is stored.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reach_shared::provision::ProvisioningFile;
use reach_shared::secrets::SecretSealer;
use reach_shared::signing::meta_signature;
use reach_shared::testing::{self, TestDatabase};
use reqwest::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::harness::{APP_SECRET, FIXTURE_PHONE, FIXTURE_WABA, notification, text_entry};

const WEBHOOKS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing() {
    let database = TestDatabase::create().await.expect("failed to create the test database");
    let prefix = testing::unique_prefix();
    let topology = testing::declare_topology(&prefix, 8).await.expect("failed to declare the topology");
    let file = json!({"orgs": [{"id": uuid::Uuid::new_v4(), "slug": "load", "name": "Load",
        "wabas": [{"waba_id": FIXTURE_WABA, "access_token": "t", "phone_numbers": [
            {"phone_number_id": FIXTURE_PHONE, "display_phone_number": "15550001111"}]}]}]});
    ProvisioningFile::parse(&file.to_string()).unwrap().apply(&database.pool, &SecretSealer::Passthrough).await.unwrap();

    let amqp_url = secrecy::ExposeSecret::expose_secret(&testing::amqp_url()).to_owned();
    let mut child = Command::new(env!("CARGO_BIN_EXE_reach-ingress"))
        .env_clear()
        .env("DATABASE_URL", &database.url)
        .env("AMQP_URL", amqp_url)
        .env("REACH_AMQP_PREFIX", &prefix)
        .env("REACH_INGRESS_ADDR", "127.0.0.1:0")
        .env("REACH_ADMIN_ADDR", "127.0.0.1:0")
        .env("REACH_METRICS_ADDR", "127.0.0.1:0")
        .env("REACH_META_APP_SECRETS", APP_SECRET)
        .env("REACH_META_VERIFY_TOKEN", "v")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("failed to start reach-ingress");

    // The ingress logs its bound address as a JSON field.
    let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let address = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("readable log") {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if let Some(address) = entry["fields"]["ingress_addr"].as_str() {
                return address.to_owned();
            }
        }
        panic!("the ingress exited before listening");
    })
    .await
    .expect("the ingress starts within 20 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let url = format!("http://{address}/webhooks/whatsapp");
    let client = reqwest::Client::new();
    let answered = Arc::new(AtomicUsize::new(0));
    let mut senders = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (client, url, answered) = (client.clone(), url.clone(), answered.clone());
        senders.spawn(async move {
            let mut accepted = Vec::new();
            for n in (worker..WEBHOOKS).step_by(16) {
                let body = notification(vec![text_entry(FIXTURE_WABA, FIXTURE_PHONE, &format!("wamid.load.{n}"), "load")]);
                let signature = meta_signature(APP_SECRET, &body);
                let sent = client.post(&url).header("x-hub-signature-256", signature).body(body.clone()).send().await;
                match sent {
                    Ok(response) if response.status() == StatusCode::OK => {
                        accepted.push(Sha256::digest(&body).to_vec());
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    // After the stop, connections are refused: Meta retries those.
                    _ => break,
                }
            }
            accepted
        });
    }

    while answered.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = child.id().expect("the ingress is running").to_string();
    let signalled = Command::new("kill").args(["-TERM", &pid]).status().await.expect("failed to run kill");
    assert!(signalled.success(), "kill -TERM {pid} failed");
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    assert!(matches!(&exit, Ok(Ok(status)) if status.success()), "the ingress exits cleanly on SIGTERM: {exit:?}");

    let mut accepted: HashSet<Vec<u8>> = HashSet::new();
    while let Some(result) = senders.join_next().await {
        accepted.extend(result.expect("sender task"));
    }
    assert!(accepted.len() < WEBHOOKS, "the stop landed mid-stream ({} of {WEBHOOKS} accepted)", accepted.len());
    let stored: HashSet<Vec<u8>> = sqlx::query_scalar("SELECT body_sha256 FROM inbound_webhooks")
        .fetch_all(&database.pool)
        .await
        .expect("read stored bodies")
        .into_iter()
        .collect();
    let missing = accepted.difference(&stored).count();
    assert_eq!(missing, 0, "every webhook answered 200 is stored ({} accepted, {} stored)", accepted.len(), stored.len());
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&database.pool).await.unwrap();
    assert_eq!(outbox as usize, stored.len(), "each stored webhook has its outbox row");

    testing::delete_topology(&topology).await.expect("failed to delete the queues");
    database.drop_database().await.expect("failed to drop the database");
}
