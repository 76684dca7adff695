//! The phone numbers the dispatcher sends for: rate, pause and the WABA's access token,
//! read again from Postgres every `REACH_DISPATCHER_DIRECTORY_REFRESH_MS`. A rate
//! changed by Meta's throughput upgrade or by provisioning, or a pause lifted by an
//! operator, reaches the lanes within one refresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use reach_shared::secrets::SecretSealer;
use secrecy::SecretString;
use sqlx::{PgPool, Row};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct NumberInfo {
    pub org_id: Uuid,
    pub mps: u32,
    pub paused_until: Option<DateTime<Utc>>,
    /// The WABA's access token; `None` when it could not be unsealed (the error is
    /// logged at refresh).
    pub token: Option<SecretString>,
    sealed_token: String,
}

impl NumberInfo {
    pub fn is_paused(&self, now: DateTime<Utc>) -> bool {
        self.paused_until.is_some_and(|until| until > now)
    }
}

pub struct Directory {
    pool: PgPool,
    sealer: SecretSealer,
    numbers: RwLock<HashMap<String, Arc<NumberInfo>>>,
    /// Refreshes started so far.
    started: AtomicU64,
    /// The `started` count of the latest refresh that completed.
    completed: AtomicU64,
}

impl Directory {
    pub fn new(pool: PgPool, sealer: SecretSealer) -> Self {
        Self { pool, sealer, numbers: RwLock::new(HashMap::new()), started: AtomicU64::new(0), completed: AtomicU64::new(0) }
    }

    /// Returns a mark to pass to [`Directory::is_newer_than`] later.
    pub fn mark(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    /// Returns whether a refresh that started after `mark` was taken has completed,
    /// so the directory shows every change committed before the mark.
    pub fn is_newer_than(&self, mark: u64) -> bool {
        self.completed.load(Ordering::Acquire) > mark
    }

    pub fn get(&self, phone_number_id: &str) -> Option<Arc<NumberInfo>> {
        self.numbers.read().expect("the directory lock is never poisoned").get(phone_number_id).cloned()
    }

    /// Reads every phone number again. Tokens are unsealed only when they changed.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let generation = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        let rows = sqlx::query(
            "SELECT p.phone_number_id, p.org_id, p.mps, p.quality_rating, p.sending_paused_until, w.access_token_sealed
             FROM phone_numbers p JOIN wabas w ON w.waba_id = p.waba_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let previous = self.numbers.read().expect("the directory lock is never poisoned").clone();
        let mut numbers = HashMap::with_capacity(rows.len());
        let mut quality: HashMap<String, u64> = ["GREEN", "YELLOW", "RED", "UNKNOWN"].iter().map(|q| (q.to_string(), 0)).collect();
        let mut paused = 0u64;
        let now = Utc::now();
        for row in rows {
            let phone_number_id: String = row.get("phone_number_id");
            let sealed_token: String = row.get("access_token_sealed");
            let token = match previous.get(&phone_number_id) {
                Some(known) if known.sealed_token == sealed_token => known.token.clone(),
                _ => match self.sealer.unseal(&sealed_token) {
                    Ok(token) => Some(token),
                    Err(error) => {
                        tracing::error!(phone_number_id = %phone_number_id, error = format!("{error:#}"), "failed to unseal a WABA access token; its sends wait");
                        None
                    }
                },
            };
            let info = NumberInfo {
                org_id: row.get("org_id"),
                mps: u32::try_from(row.get::<i32, _>("mps")).unwrap_or(1).max(1),
                paused_until: row.get("sending_paused_until"),
                token,
                sealed_token,
            };
            *quality.entry(row.get::<String, _>("quality_rating")).or_default() += 1;
            if info.is_paused(now) {
                paused += 1;
            }
            numbers.insert(phone_number_id, Arc::new(info));
        }
        for (rating, count) in quality {
            metrics::gauge!("reach_phone_numbers", "quality" => rating).set(count as f64);
        }
        metrics::gauge!("reach_phone_numbers_paused").set(paused as f64);
        *self.numbers.write().expect("the directory lock is never poisoned") = numbers;
        self.completed.fetch_max(generation, Ordering::AcqRel);
        Ok(())
    }
}
