//! `chainlink_node`: scrapes a Chainlink node's Prometheus metrics, with failover across
//! its sources (SPEC): first the last source that answered, then the others in order. A
//! connection error or timeout moves to the next source; a source that answers with
//! unparseable or incomplete data is an error of the round; no source answering is "node
//! is down".

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::http_fetch::{Client, FetchError, check_url, split_limits};
use super::prometheus::{self, Sample};
use super::{MonitorKind, Probe, Round, RoundError, parse_config};
use crate::panic::{self, ChainlinkReading, PanicError};

pub struct ChainlinkNode;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    node_prometheus_urls: Vec<String>,
    /// How PANIC's `meta_data` names the node (the RabbitMQ sink reads these from the
    /// stored config); default: the monitor's name, and "snapq" for the parent.
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default)]
    node_parent_id: Option<String>,
    /// The currency of the node's balance, in PANIC's `balance.symbol` (default empty).
    #[serde(default)]
    symbol: String,
    /// Seconds one round may take over all its sources (each call is also bounded by
    /// `timeout`). Without it, 1,000 unreachable sources made a round last 1,000 timeouts,
    /// holding a worker and then the whole graceful stop.
    #[serde(default = "default_round_timeout")]
    round_timeout: f64,
}

/// A round's time over all its sources: a few sources timing out, not a worker held for
/// minutes.
const DEFAULT_ROUND_TIMEOUT: f64 = 30.0;

fn default_round_timeout() -> f64 {
    DEFAULT_ROUND_TIMEOUT
}

/// The most sources a node may list: a node has a few (PANIC's configs list one to three).
const MAX_SOURCES: usize = 32;

/// Metrics a round must find, each a single number.
const REQUIRED: [&str; 5] = [
    "head_tracker_current_head",
    "head_tracker_heads_received_total",
    "max_unconfirmed_blocks",
    "process_start_time_seconds",
    "unconfirmed_transactions",
];

/// Optional single-number metrics (null when absent).
const OPTIONAL: [&str; 2] = [
    "tx_manager_num_gas_bumps_total",
    "tx_manager_gas_bump_exceeds_limit_total",
];

struct ChainlinkProbe {
    urls: Vec<String>,
    symbol: String,
    client: Client,
    round_timeout: Duration,
}

impl MonitorKind for ChainlinkNode {
    fn name(&self) -> &'static str {
        "chainlink_node"
    }

    fn prepare(&self, config: &Value) -> Result<Arc<dyn Probe>, String> {
        let (client, rest) = split_limits(config)?;
        let config: Config = parse_config(&rest)?;
        if config.node_prometheus_urls.is_empty() {
            return Err(
                "node_prometheus_urls: give at least one http(s) URL of the node's \
                        /metrics"
                    .into(),
            );
        }
        if config.node_prometheus_urls.len() > MAX_SOURCES {
            return Err(format!(
                "node_prometheus_urls: at most {MAX_SOURCES} sources, not {} (list the node's \
                 own /metrics URLs; monitor other nodes with monitors of their own)",
                config.node_prometheus_urls.len()
            ));
        }
        for (i, url) in config.node_prometheus_urls.iter().enumerate() {
            check_url(&format!("node_prometheus_urls[{i}]"), url)?;
        }
        let round_timeout = config.round_timeout;
        if !(round_timeout.is_finite() && round_timeout > 0.0 && round_timeout <= 3600.0) {
            return Err(format!(
                "round_timeout must be a number of seconds above 0 and at most 3600, not \
                 {round_timeout}"
            ));
        }
        // The names are only carried for the sink; they just have to be strings.
        let _ = (config.node_name, config.node_id, config.node_parent_id);
        Ok(Arc::new(ChainlinkProbe {
            urls: config.node_prometheus_urls,
            symbol: config.symbol,
            client,
            round_timeout: Duration::from_secs_f64(round_timeout),
        }))
    }
}

impl Probe for ChainlinkProbe {
    fn round(&self, state: &Value) -> Round {
        let last = state.get("last_source").and_then(Value::as_str);
        // The last source that answered first, then the others in their order.
        let mut order: Vec<&String> = self
            .urls
            .iter()
            .filter(|u| Some(u.as_str()) == last)
            .collect();
        order.extend(self.urls.iter().filter(|u| Some(u.as_str()) != last));
        let deadline = Instant::now() + self.round_timeout;
        let mut unreachable = Vec::new();
        for url in order {
            if Instant::now() >= deadline {
                unreachable.push(format!(
                    "{url} and the sources after it: not tried, the round's {:.0} s \
                     (round_timeout) ran out",
                    self.round_timeout.as_secs_f64()
                ));
                break;
            }
            match self.client.get_until(url, Some(deadline)) {
                Err(FetchError::Unreachable(why)) => unreachable.push(format!("{url}: {why}")),
                Err(FetchError::BadAnswer(why)) => {
                    return unreadable(
                        url,
                        RoundError::new("bad_response", format!("{url}: {why}")),
                    );
                }
                Ok(fetched) if fetched.status != 200 => {
                    let error = RoundError::new(
                        "bad_status",
                        format!("{url} answered HTTP {}", fetched.status),
                    );
                    return unreadable(url, error);
                }
                Ok(fetched) => return self.read(url, &fetched.body),
            }
        }
        // PANIC keeps the last source used when the node is down: the one that answered
        // last, or the first.
        let last_used = last.unwrap_or(&self.urls[0]).to_owned();
        Round {
            outcome: Err(RoundError::new(
                "node_down",
                format!(
                    "node is down: no source answered ({})",
                    unreachable.join("; ")
                ),
            )),
            state: state.clone(),
            panic: Some(ChainlinkReading::Error {
                source: last_used,
                error: PanicError::NodeDown,
            }),
        }
    }
}

impl ChainlinkProbe {
    /// A source answered with a body: snapq's reading of it and PANIC's.
    fn read(&self, url: &str, body: &str) -> Round {
        let samples = match prometheus::parse(body) {
            Ok(samples) => samples,
            Err(e) => {
                let error = RoundError::new(
                    "unparseable",
                    format!("{url} did not answer with Prometheus text: {e}"),
                );
                return unreadable(url, error);
            }
        };
        Round {
            outcome: extract(url, &samples),
            state: json!({ "last_source": url }),
            panic: Some(panic::chainlink_reading(url, &samples, &self.symbol)),
        }
    }
}

/// A source answered, but not with metrics: PANIC's `DataReadingException`.
fn unreadable(url: &str, error: RoundError) -> Round {
    Round {
        outcome: Err(error),
        state: json!({ "last_source": url }),
        panic: Some(ChainlinkReading::Error {
            source: url.to_owned(),
            error: PanicError::DataReading,
        }),
    }
}

/// Reads the metrics of SPEC from an exposition's samples.
fn extract(url: &str, samples: &[Sample]) -> Result<Value, RoundError> {
    let first = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| number(s.value))
    };
    let mut data = Map::new();
    data.insert("source".into(), json!(url));
    let mut missing = Vec::new();
    for name in REQUIRED {
        match first(name) {
            Some(v) => {
                data.insert(name.into(), v);
            }
            None => missing.push(name),
        }
    }
    let balances: Map<String, Value> = with_name(samples, "eth_balance")
        .filter_map(|s| Some((s.label("account")?.to_owned(), number(s.value))))
        .collect();
    if balances.is_empty() {
        missing.push("eth_balance");
    }
    if !missing.is_empty() {
        return Err(RoundError::new(
            "incomplete_data",
            format!("{url} lacks required metrics: {}", missing.join(", ")),
        ));
    }
    data.insert("eth_balance".into(), Value::Object(balances));
    for name in OPTIONAL {
        data.insert(name.into(), first(name).unwrap_or(Value::Null));
    }
    let gas_prices: Vec<Value> = with_name(samples, "gas_updater_set_gas_price")
        .map(|s| json!({ "percentile": s.label("percentile"), "price": number(s.value) }))
        .collect();
    data.insert(
        "gas_updater_set_gas_price".into(),
        if gas_prices.is_empty() {
            Value::Null
        } else {
            Value::Array(gas_prices)
        },
    );
    let runs: Vec<&Sample> = with_name(samples, "run_status_update_total").collect();
    let errored = runs
        .iter()
        .filter(|s| s.label("status").is_some_and(|st| st.contains("error")))
        .count();
    data.insert(
        "run_status_update_total".into(),
        if runs.is_empty() {
            Value::Null
        } else {
            json!(errored)
        },
    );
    Ok(Value::Object(data))
}

fn with_name<'a>(samples: &'a [Sample], name: &'a str) -> impl Iterator<Item = &'a Sample> {
    samples.iter().filter(move |s| s.name == name)
}

/// A metric value as JSON: integers stay integers; NaN and infinities become null.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const GOOD: &str = "\
# TYPE head_tracker_current_head gauge
head_tracker_current_head 1234
head_tracker_heads_received_total 99
max_unconfirmed_blocks 3
process_start_time_seconds 1.7e9
unconfirmed_transactions 0
eth_balance{account=\"0xA\"} 2.5
gas_updater_set_gas_price{percentile=\"20%\"} 3e10
run_status_update_total{status=\"completed\"} 4
run_status_update_total{status=\"errored\"} 2
run_status_update_total{status=\"errored\",job=\"x\"} 1
";

    #[test]
    fn extracts_the_metrics() {
        let samples = prometheus::parse(GOOD).unwrap();
        let data = extract("http://n/metrics", &samples).unwrap();
        assert_eq!(data["head_tracker_current_head"], 1234);
        assert_eq!(data["eth_balance"]["0xA"], 2.5);
        assert_eq!(data["process_start_time_seconds"], 1_700_000_000);
        assert_eq!(data["gas_updater_set_gas_price"][0]["percentile"], "20%");
        assert_eq!(data["run_status_update_total"], 2);
        assert_eq!(data["tx_manager_num_gas_bumps_total"], Value::Null);
        assert_eq!(data["source"], "http://n/metrics");
    }

    #[test]
    fn incomplete_and_garbage_are_errors() {
        let samples = prometheus::parse("head_tracker_current_head 1\n").unwrap();
        let e = extract("u", &samples).unwrap_err();
        assert_eq!(e.code, "incomplete_data");
        assert!(e.message.contains("eth_balance"), "{}", e.message);
        let probe = ChainlinkProbe {
            urls: vec!["u".into()],
            symbol: String::new(),
            client: split_limits(&json!({})).unwrap().0,
            round_timeout: Duration::from_secs(1),
        };
        let e = probe.read("u", "<html>oops</html>").outcome.unwrap_err();
        assert_eq!(e.code, "unparseable");
    }

    #[test]
    fn configs_are_checked() {
        let k = ChainlinkNode;
        for (config, field) in [
            (json!({"node_prometheus_urls": []}), "node_prometheus_urls"),
            (
                json!({"node_prometheus_urls": ["ftp://x/metrics"]}),
                "node_prometheus_urls[0]",
            ),
            (
                json!({"node_prometheus_urls": "http://x"}),
                "node_prometheus_urls",
            ),
            (
                json!({"node_prometheus_urls": ["http://x"], "timeout": "soon"}),
                "timeout",
            ),
            (
                json!({"node_prometheus_urls": ["http://x"], "colour": 1}),
                "colour",
            ),
            (json!({}), "node_prometheus_urls"),
        ] {
            let err = k.prepare(&config).err().unwrap();
            assert!(err.contains(field), "{config}: {err}");
        }
        assert!(
            k.prepare(&json!({"node_prometheus_urls": ["https://n:6688/metrics"]}))
                .is_ok()
        );
    }
}
