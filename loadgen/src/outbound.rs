//! The outbound part of the demo and the send benchmark: messages posted through the
//! customer API (`POST /v1/messages`), then followed through the dispatcher and the
//! Graph API simulator until they are read. The report gives, per phone number, the
//! configured MPS and what the simulator saw: the mean and peak one-second rates and
//! the 130429 errors.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use reach_meta_sim::SimStats;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Row};
use url::Url;
use uuid::Uuid;

use crate::expect::{EventKey, Expectations};
use reach_shared::events::EventType;

#[derive(Debug, Clone)]
pub struct OutboundSettings {
    /// The ingress's public base URL; the API is under `/v1`.
    pub ingress_url: Url,
    /// The simulator's base URL, for `/sim/stats`.
    pub sim_url: Url,
    /// Signs the customer tokens (HS256), as the identity provider would.
    pub jwt_secret: SecretString,
    /// Each number gets its MPS times this many seconds of messages.
    pub seconds: f64,
    /// API requests in flight at once.
    pub concurrency: usize,
    /// How long to wait for every message to be read.
    pub timeout: Duration,
}

/// A number to send from, with its provisioned MPS.
#[derive(Debug, Clone)]
pub struct SendingNumber {
    pub phone_number_id: String,
    pub mps: u32,
}

/// One message posted through the API.
#[derive(Debug, Clone)]
pub struct PostedMessage {
    pub id: Uuid,
    pub phone_number_id: String,
    pub posted_at: Instant,
}

#[derive(Debug, Serialize)]
pub struct NumberReport {
    pub phone_number_id: String,
    pub mps: u32,
    pub messages: usize,
    /// Sends the simulator accepted for this number.
    pub accepted_by_meta: u64,
    /// Accepted sends per second between the first and the last, as the simulator saw them.
    pub mean_rate: Option<f64>,
    /// Mean of the whole seconds between the first and the last accepted send.
    pub steady_rate: Option<f64>,
    /// The most accepted sends in any sliding one-second window.
    pub peak_one_second: u64,
    /// 130429 errors (throughput reached); the target is 0.
    pub rate_limited_130429: u64,
    pub reached_read: i64,
    pub failed: i64,
}

#[derive(Debug, Serialize)]
pub struct OutboundReport {
    pub messages: usize,
    /// API requests whose response was not 202.
    pub rejected_requests: usize,
    pub api_requests_per_second: f64,
    pub reached_read: i64,
    pub failed: i64,
    pub numbers: Vec<NumberReport>,
}

/// Posts each number's share of messages, interleaved by rate so every number's queue
/// fills at once, and records each message's expected `message.accepted`.
pub async fn post_messages(
    settings: &OutboundSettings,
    org_id: Uuid,
    numbers: &[SendingNumber],
    expectations: &mut Expectations,
) -> anyhow::Result<(Vec<PostedMessage>, usize, f64)> {
    let token = customer_token(&settings.jwt_secret, org_id)?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(settings.concurrency).build()?;
    let url = settings.ingress_url.join("v1/messages").context("invalid ingress URL")?;

    // Interleave: the k-th message of a number at MPS m goes at k / m seconds of its
    // schedule, so posting order follows the rates.
    let recipient_base: u64 = 15_550_000_000 + u64::from(rand::random::<u16>()) * 10_000;
    let mut plan: Vec<(f64, &str)> = Vec::new();
    for number in numbers {
        let count = (f64::from(number.mps) * settings.seconds).round() as usize;
        plan.extend((0..count).map(|k| (k as f64 / f64::from(number.mps), number.phone_number_id.as_str())));
    }
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));

    let started = Instant::now();
    let requests = plan.into_iter().enumerate().map(|(index, (_, phone_number_id))| {
        let client = client.clone();
        let url = url.clone();
        let token = token.clone();
        let phone_number_id = phone_number_id.to_owned();
        async move {
            let to = (recipient_base + index as u64).to_string();
            let body = json!({"phone_number_id": phone_number_id, "to": to, "type": "text", "text": {"body": format!("Reach demo message {index}")}});
            let posted_at = Instant::now();
            let response = client.post(url).bearer_auth(token).header("idempotency-key", format!("demo-{recipient_base}-{index}")).json(&body).send().await;
            match response {
                Ok(response) if response.status() == reqwest::StatusCode::ACCEPTED => {
                    let answer: serde_json::Value = response.json().await.ok()?;
                    let id = answer["id"].as_str()?.parse().ok()?;
                    Some(PostedMessage { id, phone_number_id, posted_at })
                }
                Ok(response) => {
                    tracing::warn!(status = %response.status(), "POST /v1/messages was rejected");
                    None
                }
                Err(error) => {
                    tracing::warn!(%error, "POST /v1/messages failed");
                    None
                }
            }
        }
    });
    let results: Vec<Option<PostedMessage>> = futures::stream::iter(requests).buffer_unordered(settings.concurrency.max(1)).collect().await;
    let elapsed = started.elapsed().as_secs_f64().max(0.001);
    let rejected = results.iter().filter(|r| r.is_none()).count();
    let posted: Vec<PostedMessage> = results.into_iter().flatten().collect();
    for message in &posted {
        expectations.add(EventKey::Outbound { message_id: message.id.to_string(), event_type: EventType::MessageAccepted }, message.posted_at);
    }
    Ok((posted.clone(), rejected, posted.len() as f64 / elapsed))
}

/// Waits until every message has its wamid (or failed), then adds the status events
/// the simulator will cause to the expectations.
pub async fn wait_for_wamids(pool: &PgPool, posted: &[PostedMessage], expectations: &mut Expectations, timeout: Duration) -> anyhow::Result<()> {
    let ids: Vec<Uuid> = posted.iter().map(|m| m.id).collect();
    let posted_at: HashMap<Uuid, Instant> = posted.iter().map(|m| (m.id, m.posted_at)).collect();
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM outbound_messages WHERE id = ANY($1) AND (wamid IS NOT NULL OR state = 'failed')")
            .bind(&ids)
            .fetch_one(pool)
            .await
            .context("failed to count sent messages")?;
        if done as usize >= ids.len() || started.elapsed() >= timeout {
            if (done as usize) < ids.len() {
                eprintln!("timed out with {done} of {} messages sent", ids.len());
            }
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("  {done} of {} messages sent", ids.len());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rows = sqlx::query("SELECT id, wamid FROM outbound_messages WHERE id = ANY($1) AND wamid IS NOT NULL")
        .bind(&ids)
        .fetch_all(pool)
        .await
        .context("failed to read the wamids")?;
    for row in rows {
        let id: Uuid = row.get("id");
        let wamid: String = row.get("wamid");
        let at = posted_at[&id];
        for status in ["sent", "delivered", "read"] {
            expectations.add(EventKey::status(&wamid, status).expect("known status"), at);
        }
    }
    Ok(())
}

/// Reads the per-number figures from the database and the simulator.
pub async fn report(
    settings: &OutboundSettings,
    pool: &PgPool,
    numbers: &[SendingNumber],
    posted: &[PostedMessage],
    rejected_requests: usize,
    api_rate: f64,
) -> anyhow::Result<OutboundReport> {
    let stats: SimStats = reqwest::get(settings.sim_url.join("sim/stats")?)
        .await
        .context("failed to read the simulator's stats")?
        .json()
        .await
        .context("invalid simulator stats")?;
    let ids: Vec<Uuid> = posted.iter().map(|m| m.id).collect();
    let rows = sqlx::query(
        "SELECT phone_number_id, count(*) FILTER (WHERE state = 'read') AS read, count(*) FILTER (WHERE state = 'failed') AS failed
         FROM outbound_messages WHERE id = ANY($1) GROUP BY phone_number_id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await
    .context("failed to count messages by state")?;
    let states: HashMap<String, (i64, i64)> = rows.iter().map(|r| (r.get("phone_number_id"), (r.get("read"), r.get("failed")))).collect();

    let mut reports = Vec::new();
    for number in numbers {
        let seen = stats.phone_numbers.get(&number.phone_number_id);
        let (read, failed) = states.get(&number.phone_number_id).copied().unwrap_or_default();
        reports.push(NumberReport {
            phone_number_id: number.phone_number_id.clone(),
            mps: number.mps,
            messages: posted.iter().filter(|m| m.phone_number_id == number.phone_number_id).count(),
            accepted_by_meta: seen.map_or(0, |s| s.accepted),
            mean_rate: seen.and_then(|s| s.mean_rate).map(|r| (r * 10.0).round() / 10.0),
            steady_rate: seen.and_then(|s| crate::bench_sends::steady_rate(&s.accepted_per_second)).map(|(r, _)| (r * 10.0).round() / 10.0),
            peak_one_second: seen.map_or(0, |s| s.peak_one_second),
            rate_limited_130429: seen.map_or(0, |s| s.rejected_rate_limit),
            reached_read: read,
            failed,
        });
    }
    Ok(OutboundReport {
        messages: posted.len(),
        rejected_requests,
        api_requests_per_second: api_rate.round(),
        reached_read: reports.iter().map(|r| r.reached_read).sum(),
        failed: reports.iter().map(|r| r.failed).sum(),
        numbers: reports,
    })
}

/// Waits until every posted message is read or failed, or `timeout` passed.
pub async fn wait_for_read(pool: &PgPool, posted: &[PostedMessage], timeout: Duration) -> anyhow::Result<()> {
    let ids: Vec<Uuid> = posted.iter().map(|m| m.id).collect();
    let started = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM outbound_messages WHERE id = ANY($1) AND state IN ('read', 'failed')")
            .bind(&ids)
            .fetch_one(pool)
            .await
            .context("failed to count read messages")?;
        if done as usize >= ids.len() || started.elapsed() >= timeout {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn print_summary(report: &OutboundReport) {
    eprintln!(
        "outbound: {} messages through the API ({} refused, {:.0} requests/s), {} read, {} failed",
        report.messages, report.rejected_requests, report.api_requests_per_second, report.reached_read, report.failed
    );
    for number in &report.numbers {
        let mean = number.mean_rate.map_or("-".to_owned(), |r| format!("{r:.1}"));
        let steady = number.steady_rate.map_or("-".to_owned(), |r| format!("{r:.1}"));
        eprintln!(
            "  number {}: MPS {}, {} messages, mean {mean}/s (whole seconds {steady}/s), peak {} in one second, {} 130429 errors, {} read",
            number.phone_number_id, number.mps, number.messages, number.peak_one_second, number.rate_limited_130429, number.reached_read
        );
    }
}

fn customer_token(secret: &SecretString, org_id: Uuid) -> anyhow::Result<String> {
    ensure!(!secret.expose_secret().is_empty(), "REACH_HUB_JWT_SECRET is empty: the outbound demo signs customer tokens with it");
    let claims = json!({"sub": "reach-loadgen", "email": "loadgen@reach.test", "org_id": org_id, "exp": chrono::Utc::now().timestamp() + 3600});
    let key = jsonwebtoken::EncodingKey::from_secret(secret.expose_secret().as_bytes())?;
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)?)
}
