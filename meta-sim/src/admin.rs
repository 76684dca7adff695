//! The simulator's own endpoints: `GET`/`POST /sim/rules` (read or replace the
//! injection rules), `GET /sim/stats`, `POST /sim/reset` (clear the counters, keep the
//! rules) and `GET /livez`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::Sim;
use crate::rules::{Rule, RuleSet, RulesError, RulesView};
use crate::stats::SimStats;

impl IntoResponse for RulesError {
    fn into_response(self) -> Response {
        (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": self.to_string()}))).into_response()
    }
}

/// `GET /sim/rules`: the active rules, each with the number of sends it was applied to.
pub async fn get_rules(State(sim): State<Arc<Sim>>) -> Json<RulesView> {
    Json(sim.rules().view())
}

/// `POST /sim/rules`: replaces every rule with the body's (`{"rules":[...]}` or a bare
/// array). A 422 names the first invalid rule and changes nothing.
pub async fn replace_rules(State(sim): State<Arc<Sim>>, body: Bytes) -> Result<Json<RulesView>, RulesError> {
    let rules = Rule::parse_list(&body).inspect_err(|error| tracing::warn!(%error, "rejected invalid rules"))?;
    let count = rules.len();
    let rule_set = Arc::new(RuleSet::new(rules));
    sim.replace_rules(rule_set.clone());
    tracing::info!(rules = count, "injection rules replaced");
    Ok(Json(rule_set.view()))
}

/// `GET /sim/stats`.
pub async fn get_stats(State(sim): State<Arc<Sim>>) -> Json<SimStats> {
    Json(sim.stats())
}

/// `POST /sim/reset`: clears every counter but the pending statuses. The rules, the
/// MPS windows and the pair-rate memory stay.
pub async fn reset(State(sim): State<Arc<Sim>>) -> StatusCode {
    sim.reset_counters();
    tracing::info!("stats reset");
    StatusCode::NO_CONTENT
}

pub async fn livez() -> &'static str {
    "ok"
}
