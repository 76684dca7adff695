//! `reach-meta-sim`: an HTTP server that behaves like the send endpoint of Meta's
//! WhatsApp Cloud API (`POST /{version}/{phone_number_id}/messages`) for tests, the demo
//! and benchmarks. It checks the access token and the body as Meta does. It enforces
//! each number's messages per second over a sliding one-second window, and the pair
//! rate. It injects faults by rule or at random, and posts signed status webhooks
//! (`sent`, `delivered`, `read` or `failed`) to the ingress.
//!
//! Layout:
//! - [`settings`]: [`SimSettings`] and the command line that builds them.
//! - [`send`]: the send endpoint and the order of its checks.
//! - [`request`]: parsing and validating a send body.
//! - [`traffic`]: per-number MPS window, pair-rate memory and counters.
//! - [`rules`]: injection rules.
//! - [`meta_error`]: Graph API error bodies and the error-code catalogue.
//! - [`statuses`], [`webhook`]: scheduling, batching and posting status webhooks.
//! - [`admin`]: `/sim/rules`, `/sim/stats`, `/sim/reset`, `/livez`.
//! - [`stats`]: the `/sim/stats` body, also for clients to deserialise.
//! - [`ids`]: wamids and conversation ids (JSON in Meta's byte form is `reach_shared::meta_wire`).

pub mod admin;
pub mod ids;
pub mod meta_error;
pub mod request;
pub mod rules;
pub mod send;
pub mod settings;
pub mod stats;
pub mod statuses;
pub mod traffic;
pub mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ids::WamidIssuer;
use meta_error::MetaError;
use rules::RuleSet;
pub use rules::{Rule, RuleOutcome, RulesView};
pub use settings::{SimArgs, SimNumber, SimSettings, WebhookTarget};
use stats::GlobalCounters;
pub use stats::{NumberStats, SimStats};
use statuses::StatusQueue;
use traffic::NumberState;

/// State shared by every handler.
pub struct Sim {
    numbers: Vec<NumberState>,
    /// Phone number id to its index in `numbers`.
    index: HashMap<String, usize>,
    latency_min: Duration,
    latency_max: Duration,
    pair_interval: Duration,
    error_rate: f64,
    read_ratio: f64,
    rules: RwLock<Arc<RuleSet>>,
    counters: Arc<GlobalCounters>,
    /// `None` when no webhook URL is set.
    statuses: Option<StatusQueue>,
    wamids: WamidIssuer,
    shutdown: CancellationToken,
}

/// A started simulator.
#[derive(Debug)]
pub struct RunningSim {
    /// The bound listen address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RunningSim {
    /// Returns `http://{addr}`, the base URL to put in front of `/v21.0/{id}/messages`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the simulator has stopped: every request in flight has its response
    /// (a hanging `timeout` request gets 503), and the status scheduler and its POSTs
    /// have ended. Statuses not yet posted are abandoned.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds the listener and starts the simulator, which runs until `shutdown` fires. Port 0
/// picks a free port, and the bound address is logged and returned.
pub async fn start(settings: SimSettings, shutdown: CancellationToken) -> anyhow::Result<RunningSim> {
    settings.validate()?;
    let counters = Arc::new(GlobalCounters::default());
    let tracker = TaskTracker::new();
    let statuses = match &settings.webhook {
        Some(target) => Some(statuses::start(&settings, target, counters.clone(), &tracker, shutdown.clone())?),
        None => None,
    };
    let numbers: Vec<NumberState> = settings.numbers.iter().cloned().map(NumberState::new).collect();
    let index =
        settings.numbers.iter().enumerate().map(|(index, number)| (number.phone_number_id.clone(), index)).collect();
    let sim = Arc::new(Sim {
        numbers,
        index,
        latency_min: settings.latency_min,
        latency_max: settings.latency_max,
        pair_interval: settings.pair_interval,
        error_rate: settings.error_rate,
        read_ratio: settings.read_ratio,
        rules: RwLock::new(Arc::new(RuleSet::new(settings.rules.clone()))),
        counters,
        statuses,
        wamids: WamidIssuer::new(),
        shutdown: shutdown.clone(),
    });

    let listener = TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("failed to bind REACH_SIM_ADDR {}", settings.addr))?;
    let addr = listener.local_addr().context("failed to read the bound address")?;
    // Responses are small writes. Without TCP_NODELAY, Nagle's algorithm can hold one
    // back until the client's delayed ACK, tens of milliseconds later.
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "failed to set TCP_NODELAY on an accepted connection");
        }
    });
    tracing::info!(
        %addr,
        phone_numbers = settings.numbers.len(),
        status_webhooks = settings.webhook.is_some(),
        rules = settings.rules.len(),
        "meta simulator listening"
    );

    let router = router(sim);
    let task = tokio::spawn(async move {
        let stop = shutdown.clone();
        let served = axum::serve(listener, router).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        if let Err(error) = served {
            tracing::error!(%error, "meta simulator listener failed");
        }
        tracker.close();
        tracker.wait().await;
        tracing::info!("meta simulator stopped");
    });
    Ok(RunningSim { addr, task })
}

fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/{version}/{phone_number_id}/messages", post(send::send_message))
        .route("/sim/rules", get(admin::get_rules).post(admin::replace_rules))
        .route("/sim/stats", get(admin::get_stats))
        .route("/sim/reset", post(admin::reset))
        .route("/livez", get(admin::livez))
        .fallback(|| async {
            MetaError::unknown_path("This simulator serves POST /{version}/{phone_number_id}/messages".to_owned())
        })
        .with_state(sim)
}

impl Sim {
    fn draw_latency(&self) -> Duration {
        if self.latency_min == self.latency_max {
            return self.latency_min;
        }
        rand::rng().random_range(self.latency_min..=self.latency_max)
    }

    fn rules(&self) -> Arc<RuleSet> {
        self.rules.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn replace_rules(&self, rules: Arc<RuleSet>) {
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = rules;
    }

    fn stats(&self) -> SimStats {
        let phone_numbers: BTreeMap<String, NumberStats> =
            self.numbers.iter().map(|state| (state.number.phone_number_id.clone(), state.stats())).collect();
        self.counters.snapshot(phone_numbers)
    }

    fn reset_counters(&self) {
        for number in &self.numbers {
            number.reset_counters();
        }
        self.counters.reset();
    }
}
