//! Active subscriptions per org with their unsealed signing secrets, cached for a
//! short time. The in-flight limit of each subscription lives here too, and survives
//! cache refreshes.
//!
//! Every change to an org's subscriptions (API, provisioning, a 410) sends a PostgreSQL
//! notification at commit; [`follow_changes`] drops that org's entry, so the next event
//! of the org reads the subscriptions again. The lifetime only bounds staleness when a
//! notification is lost, and an entry is dropped for every org when the listening
//! connection is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reach_shared::events::EventType;
use reach_shared::secrets::SecretSealer;
use reach_shared::signing::WebhookSecret;
use secrecy::ExposeSecret;
use sqlx::{PgPool, Row};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One subscription, ready to deliver to.
#[derive(Debug)]
pub struct Subscription {
    pub id: Uuid,
    pub org_id: Uuid,
    pub url: url::Url,
    /// `None` means every type (`*`).
    pub event_types: Option<Vec<EventType>>,
    /// Every secret that is active now; the callback carries one signature per secret.
    pub secrets: Vec<WebhookSecret>,
    /// Limits concurrent requests to this subscription and measures its pace.
    pub lane: Arc<Lane>,
}

/// The request slots of one subscription and how fast they turn over.
#[derive(Debug)]
pub struct Lane {
    pub slots: Arc<Semaphore>,
    capacity: usize,
    /// Requests waiting for a slot now.
    waiting: AtomicUsize,
    /// Moving mean of the attempt duration, in microseconds (weight 1/8 per attempt).
    mean_duration_us: AtomicU64,
}

impl Lane {
    fn new(capacity: usize) -> Self {
        Self { slots: Arc::new(Semaphore::new(capacity)), capacity, waiting: AtomicUsize::new(0), mean_duration_us: AtomicU64::new(0) }
    }

    /// Estimates how long a new request would wait for a slot: the requests ahead of
    /// it, spread over the slots, times the mean attempt duration.
    pub fn estimated_wait(&self) -> Duration {
        if self.slots.available_permits() > 0 {
            return Duration::ZERO;
        }
        let turns = (self.waiting.load(Ordering::Relaxed) / self.capacity + 1) as u64;
        Duration::from_micros(turns.saturating_mul(self.mean_duration_us.load(Ordering::Relaxed)))
    }

    /// Waits for a slot, counting the request as waiting meanwhile.
    pub async fn acquire(&self, timeout: Duration) -> Option<OwnedSemaphorePermit> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let slot = tokio::time::timeout(timeout, self.slots.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        slot.ok().and_then(Result::ok)
    }

    /// Records the duration of a finished attempt.
    pub fn record(&self, duration: Duration) {
        let sample = duration.as_micros().min(u64::MAX as u128) as u64;
        let _ = self.mean_duration_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mean| {
            Some(if mean == 0 { sample } else { mean - mean / 8 + sample / 8 })
        });
    }
}

impl Subscription {
    pub fn wants(&self, event_type: EventType) -> bool {
        self.event_types.as_ref().is_none_or(|types| types.contains(&event_type))
    }
}

struct CachedOrg {
    loaded_at: Instant,
    subscriptions: Vec<Arc<Subscription>>,
}

/// Cache of active subscriptions by org.
pub struct SubscriptionCache {
    pool: PgPool,
    sealer: SecretSealer,
    ttl: Duration,
    in_flight_limit: usize,
    orgs: RwLock<HashMap<Uuid, Arc<CachedOrg>>>,
    lanes: std::sync::Mutex<HashMap<Uuid, Arc<Lane>>>,
    /// Subscriptions this process disabled, hidden at once, before the database records it.
    /// An entry lapses after two cache lifetimes, time for the disabling write to commit
    /// and the cache to reload; from then on the database decides, so a subscription
    /// enabled again is delivered to again.
    disabled: std::sync::Mutex<HashMap<Uuid, Instant>>,
}

impl SubscriptionCache {
    pub fn new(pool: PgPool, sealer: SecretSealer, ttl: Duration, in_flight_limit: usize) -> Self {
        Self {
            pool,
            sealer,
            ttl,
            in_flight_limit,
            orgs: RwLock::new(HashMap::new()),
            lanes: std::sync::Mutex::new(HashMap::new()),
            disabled: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Drops an org's entry; its next event reads the subscriptions again.
    pub async fn forget(&self, org_id: Uuid) {
        self.orgs.write().await.remove(&org_id);
    }

    /// Drops every entry.
    pub async fn forget_all(&self) {
        self.orgs.write().await.clear();
    }

    /// Returns the org's active subscriptions that want `event_type`.
    pub async fn matching(&self, org_id: Uuid, event_type: EventType) -> Result<Vec<Arc<Subscription>>, sqlx::Error> {
        let org = self.org(org_id).await?;
        Ok(org.subscriptions.iter().filter(|s| s.wants(event_type) && !self.is_disabled(s.id)).cloned().collect())
    }

    /// Returns one active subscription, or `None` when it is gone or disabled.
    pub async fn get(&self, org_id: Uuid, subscription_id: Uuid) -> Result<Option<Arc<Subscription>>, sqlx::Error> {
        let org = self.org(org_id).await?;
        if self.is_disabled(subscription_id) {
            return Ok(None);
        }
        Ok(org.subscriptions.iter().find(|s| s.id == subscription_id).cloned())
    }

    /// Hides a subscription at once, before its disabling is committed, so no event
    /// processed meanwhile reaches an endpoint that returned 410 Gone.
    pub fn disable(&self, subscription_id: Uuid) {
        self.disabled.lock().expect("disabled map lock is never poisoned").insert(subscription_id, Instant::now());
    }

    fn is_disabled(&self, subscription_id: Uuid) -> bool {
        let mut disabled = self.disabled.lock().expect("disabled map lock is never poisoned");
        match disabled.get(&subscription_id) {
            Some(at) if at.elapsed() < self.ttl * 2 => true,
            Some(_) => {
                disabled.remove(&subscription_id);
                false
            }
            None => false,
        }
    }

    async fn org(&self, org_id: Uuid) -> Result<Arc<CachedOrg>, sqlx::Error> {
        if let Some(org) = self.orgs.read().await.get(&org_id) {
            if org.loaded_at.elapsed() < self.ttl {
                return Ok(org.clone());
            }
        }
        let loaded = Arc::new(self.load(org_id).await?);
        self.orgs.write().await.insert(org_id, loaded.clone());
        Ok(loaded)
    }

    async fn load(&self, org_id: Uuid) -> Result<CachedOrg, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT s.id, s.url, s.event_types,
                    coalesce(array_agg(k.secret_sealed ORDER BY k.id DESC) FILTER (WHERE k.id IS NOT NULL), '{}') AS secrets
             FROM webhook_subscriptions s
             LEFT JOIN webhook_subscription_secrets k
               ON k.subscription_id = s.id AND (k.expires_at IS NULL OR k.expires_at > now())
             WHERE s.org_id = $1 AND s.status = 'active'
             GROUP BY s.id",
        )
        .bind(org_id)
        .fetch_all(&self.pool)
        .await?;

        let mut subscriptions = Vec::with_capacity(rows.len());
        for row in rows {
            let id: Uuid = row.get("id");
            let raw_url: String = row.get("url");
            let Ok(url) = url::Url::parse(&raw_url) else {
                tracing::error!(subscription_id = %id, "skipping a subscription with an invalid url");
                continue;
            };
            let types: Vec<String> = row.get("event_types");
            let event_types = if types.iter().any(|t| t == "*") {
                None
            } else {
                Some(types.iter().filter_map(|t| EventType::parse(t)).collect())
            };
            let mut secrets = Vec::new();
            for sealed in row.get::<Vec<String>, _>("secrets") {
                match self.sealer.unseal(&sealed).map(|plain| WebhookSecret::parse(plain.expose_secret())) {
                    Ok(Ok(secret)) => secrets.push(secret),
                    Ok(Err(error)) => tracing::error!(subscription_id = %id, %error, "skipping an invalid signing secret"),
                    Err(error) => tracing::error!(subscription_id = %id, error = format!("{error:#}"), "failed to unseal a signing secret"),
                }
            }
            if secrets.is_empty() {
                // NOTE: a subscription without a usable secret is skipped rather than sent
                // unsigned callbacks; its events wait for nothing and are not recorded.
                tracing::error!(subscription_id = %id, "skipping a subscription without an active signing secret");
                continue;
            }
            let lane = self
                .lanes
                .lock()
                .expect("lane map lock is never poisoned")
                .entry(id)
                .or_insert_with(|| Arc::new(Lane::new(self.in_flight_limit)))
                .clone();
            subscriptions.push(Arc::new(Subscription { id, org_id, url, event_types, secrets, lane }));
        }
        Ok(CachedOrg { loaded_at: Instant::now(), subscriptions })
    }
}

/// Listens for subscription changes until `shutdown` fires, and drops each changed org
/// from `cache`. After a lost connection, notifications may have been missed, so every
/// entry is dropped.
pub async fn follow_changes(cache: &SubscriptionCache, pool: PgPool, shutdown: CancellationToken) {
    let mut delays = reach_shared::outbox::reconnect_policy();
    while !shutdown.is_cancelled() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Err(error) = listen_for_changes(cache, &pool) => {
                cache.forget_all().await;
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "subscription change listener failed, reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Listens on one connection until it fails.
async fn listen_for_changes(cache: &SubscriptionCache, pool: &PgPool) -> Result<std::convert::Infallible, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
    listener.listen(reach_shared::db::SUBSCRIPTIONS_CHANGED_CHANNEL).await?;
    // Changes made before the listener started are unknown.
    cache.forget_all().await;
    loop {
        match listener.try_recv().await? {
            Some(notification) => match notification.payload().parse::<Uuid>() {
                Ok(org_id) => cache.forget(org_id).await,
                Err(_) => {
                    tracing::warn!(payload = notification.payload(), "subscription change notice without an org id, dropping every entry");
                    cache.forget_all().await;
                }
            },
            None => {
                tracing::warn!("lost the subscription change listener's connection, dropping every cached org");
                cache.forget_all().await;
            }
        }
    }
}
