//! Monitors: named configurations of a monitor *kind*, run every interval by the foreman
//! on its worker pool (SPEC "Monitors").
//!
//! A kind is a strategy (`MonitorKind`): it validates a JSON config into a ready `Probe`, and a
//! probe performs one round, returning data or a coded error. Adding a kind is one file
//! with a `MonitorKind` and one line in `KINDS`.
//!
//! Schedules and last results live only in the `monitors` table (src/monitor/store.rs), so
//! after any restart every enabled monitor runs again on time.

pub mod chainlink;
pub mod http;
pub mod http_fetch;
pub mod prometheus;
pub mod store;
pub mod system;

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::panic::ChainlinkReading;

/// Every kind, by name. One line per kind.
pub static KINDS: &[&dyn MonitorKind] = &[&chainlink::ChainlinkNode, &http::Http, &system::System];

/// A monitor kind: a strategy that validates configs and makes probes.
pub trait MonitorKind: Send + Sync {
    /// The name used on the command line and in results (`chainlink_node`).
    fn name(&self) -> &'static str;
    /// Checks a config and builds the probe that runs rounds with it. The error names the
    /// field that is wrong.
    fn prepare(&self, config: &Value) -> Result<Arc<dyn Probe>, String>;
}

/// A validated config, ready to run rounds.
pub trait Probe: Send + Sync {
    /// Runs one round. `state` is what the previous round of this monitor left (`Null` at
    /// first): the Chainlink kind keeps the last source that answered there.
    fn round(&self, state: &Value) -> Round;
}

/// What one round produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    pub outcome: Result<Value, RoundError>,
    /// Handed to the next round of the same monitor.
    pub state: Value,
    /// What PANIC's own monitor would have made of the round (Chainlink rounds), for the
    /// RabbitMQ sink.
    pub panic: Option<ChainlinkReading>,
}

/// A coded round error: `code` is stable (for alerting rules), `message` is for people.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundError {
    pub message: String,
    pub code: String,
}

impl RoundError {
    pub fn new(code: &str, message: impl Into<String>) -> RoundError {
        RoundError {
            message: message.into(),
            code: code.to_owned(),
        }
    }
}

/// Looks up a kind by name.
pub fn kind(name: &str) -> Option<&'static dyn MonitorKind> {
    KINDS.iter().copied().find(|k| k.name() == name)
}

/// The names of every kind, for messages.
pub fn kind_names() -> String {
    KINDS
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Deserialises a config, naming the field on error (`node_prometheus_urls: invalid type…`).
pub fn parse_config<T: DeserializeOwned>(config: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(config).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

/// The result of one round as it is published (SPEC: one JSON object per round).
#[derive(Debug, Clone, Serialize)]
pub struct RoundResult {
    pub monitor: String,
    pub kind: String,
    pub version: i64,
    pub ok: bool,
    pub started_at: String,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RoundError>,
    /// The round as PANIC reads it (`Round::panic`); not part of snapq's result object.
    #[serde(skip)]
    pub panic: Option<ChainlinkReading>,
}

impl RoundResult {
    /// One line summarising the result for `monitor list`.
    pub fn summary(&self) -> String {
        match (&self.data, &self.error) {
            (_, Some(e)) => format!("{}: {}", e.code, e.message),
            (Some(Value::Object(map)), _) => {
                let mut parts: Vec<String> = map
                    .iter()
                    .filter(|(_, v)| v.is_number() || v.is_string() || v.is_boolean())
                    .take(4)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                if map.len() > parts.len() {
                    parts.push("…".into());
                }
                parts.join(" ")
            }
            _ => String::new(),
        }
    }
}
