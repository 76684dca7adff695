//! Injection rules. A send that matches a rule's recipient or phone number gets the
//! rule's outcome instead of the normal behaviour: a Meta error, no response, a bare
//! 5xx, or a `failed` status. A rule applies to its first `times` matching sends, or to
//! all of them.
//!
//! The JSON form, in the rules file and on `POST /sim/rules`, is `{"rules":[...]}` or a
//! bare array. A rule names `to`, `phone_number_id` or both (all named must match), and
//! one outcome:
//! - `{"error_code": 131026, "http_status": 400}`: respond with that Meta error (status 400 to
//!   599, default 400).
//! - `{"kind": "timeout"}`: keep the request open without a response until the client
//!   gives up or the simulator stops.
//! - `{"kind": "http_5xx", "http_status": 503}`: respond with a plain-text 5xx (default 500),
//!   as a proxy in front of the Graph API would.
//! - `{"kind": "status_failed", "error_code": 131026}`: accept the send, then send a
//!   `failed` status with that code (default 131026) instead of `delivered`/`read`.
//!
//! `"times": N` (N >= 1) limits a rule to its first N matching sends. Rules are tried in
//! order, and the first that matches and is not used up applies.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A rule's outcome when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleOutcome {
    /// The Meta error `error_code`, sent with HTTP `http_status`.
    MetaError { error_code: u32, http_status: u16 },
    /// No response: the request stays open until the client closes it or the simulator
    /// shuts down.
    Timeout,
    /// A plain-text response with HTTP `http_status` (500 to 599).
    Http5xx { http_status: u16 },
    /// Accept the send, then send a `failed` status with `error_code`.
    StatusFailed { error_code: u32 },
}

/// One validated injection rule. `to` contains the recipient's digits only, so `+1 555…`
/// and `1555…` name the same recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RuleSpec", into = "RuleSpec")]
pub struct Rule {
    pub to: Option<String>,
    pub phone_number_id: Option<String>,
    pub outcome: RuleOutcome,
    /// Number of matching sends the rule applies to, or `None` for every one.
    pub times: Option<u64>,
}

/// The reason a rules document was rejected.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("rules are not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("rules must be a JSON array of rules or an object {{\"rules\": [...]}}")]
    NotAList,
    #[error("rules[{index}]: {reason}")]
    InvalidRule { index: usize, reason: String },
}

/// The flat JSON form of a rule, validated into [`Rule`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    phone_number_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error_code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    times: Option<u64>,
}

impl TryFrom<RuleSpec> for Rule {
    type Error = String;

    fn try_from(spec: RuleSpec) -> Result<Self, String> {
        let to = match spec.to {
            Some(to) => {
                let digits: String = to.chars().filter(char::is_ascii_digit).collect();
                if digits.is_empty() {
                    return Err(format!("to {to:?} contains no digits"));
                }
                Some(digits)
            }
            None => None,
        };
        if spec.phone_number_id.as_deref().is_some_and(str::is_empty) {
            return Err("phone_number_id is empty".to_owned());
        }
        if to.is_none() && spec.phone_number_id.is_none() {
            return Err("a rule must name \"to\", \"phone_number_id\" or both".to_owned());
        }
        if spec.times == Some(0) {
            return Err("times must be at least 1; remove the rule to disable it".to_owned());
        }
        let outcome = match spec.kind.as_deref() {
            None | Some("meta_error") => {
                let error_code = spec.error_code.ok_or("error_code is required unless kind is timeout or http_5xx")?;
                let http_status = spec.http_status.unwrap_or(400);
                if !(400..=599).contains(&http_status) {
                    return Err(format!("http_status {http_status} of a Meta error must be between 400 and 599"));
                }
                RuleOutcome::MetaError { error_code, http_status }
            }
            Some("timeout") => {
                if spec.error_code.is_some() || spec.http_status.is_some() {
                    return Err("a timeout rule takes neither error_code nor http_status".to_owned());
                }
                RuleOutcome::Timeout
            }
            Some("http_5xx") => {
                if spec.error_code.is_some() {
                    return Err("an http_5xx rule responds with plain text and takes no error_code".to_owned());
                }
                let http_status = spec.http_status.unwrap_or(500);
                if !(500..=599).contains(&http_status) {
                    return Err(format!("http_status {http_status} of an http_5xx rule must be between 500 and 599"));
                }
                RuleOutcome::Http5xx { http_status }
            }
            Some("status_failed") => {
                if spec.http_status.is_some() {
                    return Err("a status_failed rule accepts the send and takes no http_status".to_owned());
                }
                RuleOutcome::StatusFailed { error_code: spec.error_code.unwrap_or(131026) }
            }
            Some(other) => {
                return Err(format!("unknown kind {other:?}: expected meta_error, timeout, http_5xx or status_failed"));
            }
        };
        Ok(Rule { to, phone_number_id: spec.phone_number_id, outcome, times: spec.times })
    }
}

impl From<Rule> for RuleSpec {
    fn from(rule: Rule) -> Self {
        let (kind, error_code, http_status) = match rule.outcome {
            RuleOutcome::MetaError { error_code, http_status } => ("meta_error", Some(error_code), Some(http_status)),
            RuleOutcome::Timeout => ("timeout", None, None),
            RuleOutcome::Http5xx { http_status } => ("http_5xx", None, Some(http_status)),
            RuleOutcome::StatusFailed { error_code } => ("status_failed", Some(error_code), None),
        };
        RuleSpec {
            to: rule.to,
            phone_number_id: rule.phone_number_id,
            kind: Some(kind.to_owned()),
            error_code,
            http_status,
            times: rule.times,
        }
    }
}

impl Rule {
    /// Parses a rules document: `{"rules": [...]}` or a bare array. The error names the
    /// index of the first invalid rule.
    pub fn parse_list(json: &[u8]) -> Result<Vec<Rule>, RulesError> {
        let document: serde_json::Value = serde_json::from_slice(json).map_err(RulesError::NotJson)?;
        let items = match document {
            serde_json::Value::Array(items) => items,
            serde_json::Value::Object(mut object) if object.len() == 1 => match object.remove("rules") {
                Some(serde_json::Value::Array(items)) => items,
                _ => return Err(RulesError::NotAList),
            },
            _ => return Err(RulesError::NotAList),
        };
        items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                serde_json::from_value(item)
                    .map_err(|error| RulesError::InvalidRule { index, reason: error.to_string() })
            })
            .collect()
    }

    fn matches(&self, phone_number_id: &str, to_digits: &str) -> bool {
        self.to.as_deref().is_none_or(|to| to == to_digits)
            && self.phone_number_id.as_deref().is_none_or(|id| id == phone_number_id)
    }
}

/// The active rules with the number of sends each has been applied to.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<(Rule, AtomicU64)>,
}

/// A rule as `GET /sim/rules` shows it: the rule and how many sends it was applied to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleUsage {
    #[serde(flatten)]
    pub rule: Rule,
    pub applied: u64,
}

/// The body of `GET /sim/rules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesView {
    pub rules: Vec<RuleUsage>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Self {
        Self { rules: rules.into_iter().map(|rule| (rule, AtomicU64::new(0))).collect() }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Finds the first rule that matches the send and still has uses left, and counts
    /// the use.
    pub fn apply(&self, phone_number_id: &str, to_digits: &str) -> Option<RuleOutcome> {
        for (rule, applied) in &self.rules {
            if !rule.matches(phone_number_id, to_digits) {
                continue;
            }
            let taken = applied.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |count| match rule.times {
                Some(times) if count >= times => None,
                _ => Some(count + 1),
            });
            if taken.is_ok() {
                return Some(rule.outcome);
            }
        }
        None
    }

    pub fn view(&self) -> RulesView {
        let rules = self
            .rules
            .iter()
            .map(|(rule, applied)| RuleUsage { rule: rule.clone(), applied: applied.load(Ordering::Relaxed) })
            .collect();
        RulesView { rules }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_list_accepts_both_forms() {
        let wrapped =
            Rule::parse_list(br#"{"rules":[{"to":"+1 555 0002222","error_code":131026,"times":2}]}"#).unwrap();
        let bare = Rule::parse_list(br#"[{"to":"15550002222","error_code":131026,"times":2}]"#).unwrap();
        assert_eq!(wrapped, bare);
        assert_eq!(wrapped[0].to.as_deref(), Some("15550002222"));
        assert_eq!(wrapped[0].outcome, RuleOutcome::MetaError { error_code: 131026, http_status: 400 });
    }

    #[test]
    fn parse_list_names_invalid_rule() {
        let cases: &[(&str, &str)] = &[
            (r#"[{"error_code":1}]"#, "rules[0]: a rule must name"),
            (
                r#"[{"to":"1","kind":"timeout"},{"to":"abc","kind":"timeout"}]"#,
                "rules[1]: to \"abc\" contains no digits",
            ),
            (r#"[{"to":"1","kind":"teleport"}]"#, "rules[0]: unknown kind \"teleport\""),
            (r#"[{"to":"1","kind":"http_5xx","http_status":404}]"#, "rules[0]: http_status 404 of an http_5xx"),
            (r#"[{"to":"1","error_code":1,"times":0}]"#, "rules[0]: times must be at least 1"),
            (r#"[{"to":"1","error_code":1,"color":"red"}]"#, "rules[0]: unknown field `color`"),
            (r#"{"rule":[]}"#, "rules must be a JSON array"),
            ("{", "rules are not valid JSON"),
        ];
        for (json, expected) in cases {
            let error = Rule::parse_list(json.as_bytes()).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{json}: got {error:?}, expected it to start with {expected:?}");
        }
    }

    #[test]
    fn apply_stops_after_times() {
        let rules = Rule::parse_list(
            br#"[{"phone_number_id":"p1","error_code":131026,"times":2},{"to":"9","kind":"timeout"}]"#,
        )
        .unwrap();
        let set = RuleSet::new(rules);
        assert!(set.apply("p1", "1").is_some());
        assert!(set.apply("p1", "1").is_some());
        assert_eq!(set.apply("p1", "1"), None);
        assert_eq!(set.apply("p1", "9"), Some(RuleOutcome::Timeout));
        assert_eq!(set.apply("p2", "1"), None);
        assert_eq!(set.view().rules[0].applied, 2);
    }

    #[test]
    fn rule_round_trips_through_json() {
        let rules = Rule::parse_list(
            br#"[{"to":"1","kind":"status_failed"},{"phone_number_id":"p","kind":"http_5xx","http_status":503}]"#,
        )
        .unwrap();
        let json = serde_json::to_vec(&rules).unwrap();
        assert_eq!(Rule::parse_list(&json).unwrap(), rules);
        assert_eq!(rules[0].outcome, RuleOutcome::StatusFailed { error_code: 131026 });
    }
}
