//! PANIC's message shapes (SimplyStaking/panic): what its consumers — the Chainlink node
//! data transformer, the alerters, the health checker — expect on RabbitMQ. The RabbitMQ
//! sink (src/outbox.rs) sends these; nothing here knows about connections or the outbox.

use rusqlite::Transaction;
use serde_json::{Map, Value, json};

use crate::clock::now_micros;
use crate::monitor::RoundResult;
use crate::monitor::prometheus::Sample;

/// The metrics PANIC v1.3.1's Chainlink monitor requests, in its order, and whether each is
/// `strict` (a round without it is error 5003) or `optional` (null when absent)
/// (alerter/src/monitors/node/chainlink.py, `self._prometheus_metrics`).
pub const CHAINLINK_METRICS: [(&str, bool); 10] = [
    ("head_tracker_current_head", true),
    ("head_tracker_heads_received_total", true),
    ("max_unconfirmed_blocks", true),
    ("process_start_time_seconds", true),
    ("tx_manager_num_gas_bumps_total", true),
    ("tx_manager_gas_bump_exceeds_limit_total", true),
    ("unconfirmed_transactions", true),
    ("gas_updater_set_gas_price", false),
    ("eth_balance", true),
    ("run_status_update_total", false),
];

/// The metrics PANIC's monitor passes on as they were read (every requested one but the
/// three it reshapes).
const ONE_VALUE_METRICS: [&str; 7] = [
    "head_tracker_current_head",
    "head_tracker_heads_received_total",
    "max_unconfirmed_blocks",
    "process_start_time_seconds",
    "tx_manager_num_gas_bumps_total",
    "tx_manager_gas_bump_exceeds_limit_total",
    "unconfirmed_transactions",
];

/// PANIC's error codes (alerter/src/utils/exceptions.py) for what a Chainlink round can
/// meet.
pub const METRIC_NOT_FOUND: i64 = 5003;
pub const DATA_READING: i64 = 5005;
pub const NODE_IS_DOWN: i64 = 5015;

/// What PANIC's Chainlink monitor would have made of a round, before its `meta_data`
/// (which needs the node's names, known to the sink): the probe fills it in, the RabbitMQ
/// sink publishes it.
#[derive(Debug, Clone, PartialEq)]
pub enum ChainlinkReading {
    /// A source answered with every strict metric: its URL and PANIC's `result.data`.
    Data { source: String, data: Value },
    /// An error of the round; `source` is PANIC's `last_source_used` for it.
    Error { source: String, error: PanicError },
}

/// The PANIC exceptions a Chainlink round can end in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PanicError {
    /// `NodeIsDownException`: no source answered.
    NodeDown,
    /// `MetricNotFoundException`: a strict metric is missing at the source.
    MetricNotFound(String),
    /// `DataReadingException`: the source answered, but not with readable metrics.
    DataReading,
}

impl PanicError {
    /// PANIC's code and message, as its exception classes word them.
    fn code_and_message(&self, source: &str, names: &Names<'_>) -> (i64, String) {
        match self {
            PanicError::NodeDown => (NODE_IS_DOWN, format!("Node {} is unreachable", names.node)),
            PanicError::MetricNotFound(metric) => (
                METRIC_NOT_FOUND,
                format!("Could not find metric {metric} at endpoint {source}"),
            ),
            PanicError::DataReading => (
                DATA_READING,
                format!(
                    "{} experienced errors when reading data from {source}",
                    names.monitor
                ),
            ),
        }
    }
}

/// One requested metric as PANIC's `get_prometheus_metrics_data` (alerter/src/utils/data.py)
/// collects it: unlabelled samples summed into one float; labelled ones as (labels, value),
/// a later sample with the same labels replacing the earlier.
enum Collected<'a> {
    Number(f64),
    Labelled(Vec<(&'a Sample, f64)>),
}

/// PANIC's reading of one source's exposition, `symbol` naming the balance's currency.
pub fn chainlink_reading(source: &str, samples: &[Sample], symbol: &str) -> ChainlinkReading {
    let mut found: Vec<(&str, Collected<'_>)> = Vec::new();
    for sample in samples {
        let Some((name, _)) = CHAINLINK_METRICS.iter().find(|(n, _)| *n == sample.name) else {
            continue;
        };
        let slot = match found.iter_mut().find(|(n, _)| n == name) {
            Some((_, slot)) => slot,
            None => {
                let first = if sample.labels.is_empty() {
                    Collected::Number(0.0)
                } else {
                    Collected::Labelled(Vec::new())
                };
                found.push((name, first));
                &mut found.last_mut().expect("just pushed").1
            }
        };
        match slot {
            Collected::Number(sum) if sample.labels.is_empty() => *sum += sample.value,
            Collected::Labelled(list) if !sample.labels.is_empty() => {
                match list.iter_mut().find(|(s, _)| s.labels == sample.labels) {
                    Some(entry) => entry.1 = sample.value,
                    None => list.push((sample, sample.value)),
                }
            }
            // PANIC's own code fails on a metric exposed both with and without labels;
            // the first form seen wins here.
            _ => {}
        }
    }
    let get = |name: &str| found.iter().find(|(n, _)| *n == name).map(|(_, c)| c);
    if let Some((missing, _)) = CHAINLINK_METRICS
        .iter()
        .find(|(name, strict)| *strict && get(name).is_none())
    {
        return ChainlinkReading::Error {
            source: source.to_owned(),
            error: PanicError::MetricNotFound((*missing).to_owned()),
        };
    }
    let mut data = Map::new();
    for name in ONE_VALUE_METRICS {
        let value = match get(name) {
            Some(Collected::Number(v)) => float(*v),
            Some(Collected::Labelled(list)) => Value::Object(
                list.iter()
                    .map(|(s, v)| (python_labels(s), float(*v)))
                    .collect(),
            ),
            None => Value::Null,
        };
        data.insert(name.to_owned(), value);
    }
    let labelled = |name: &str| match get(name) {
        Some(Collected::Labelled(list)) => list.as_slice(),
        _ => &[],
    };
    // The first sample with a `percentile` label; null when the metric is absent.
    let gas_price = match get("gas_updater_set_gas_price") {
        None => Value::Null,
        Some(_) => labelled("gas_updater_set_gas_price")
            .iter()
            .find_map(|(s, v)| {
                Some(json!({"percentile": s.label("percentile")?, "price": float(*v)}))
            })
            .unwrap_or_else(|| json!({})),
    };
    data.insert("gas_updater_set_gas_price".into(), gas_price);
    // The first account's balance.
    let balance = labelled("eth_balance")
        .iter()
        .find_map(|(s, v)| {
            Some(json!({"address": s.label("account")?, "balance": float(*v), "symbol": symbol}))
        })
        .unwrap_or_else(|| json!({}));
    data.insert("balance".into(), balance);
    let errored = labelled("run_status_update_total")
        .iter()
        .filter(|(s, _)| s.label("status") == Some("errored"))
        .count();
    data.insert("run_status_update_total_errors".into(), json!(errored));
    ChainlinkReading::Data {
        source: source.to_owned(),
        data: Value::Object(data),
    }
}

/// A metric value as Python's `json.dumps` writes a float, except that NaN and the
/// infinities (which it writes as non-JSON words) become null.
fn float(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// A sample's labels as PANIC keys them: Python's `json.dumps` of the label dict
/// (`{"a": "b", "c": "d"}`, non-ASCII as `\uXXXX`).
fn python_labels(sample: &Sample) -> String {
    let quote = |text: &str| {
        let mut out = String::from("\"");
        for c in text.chars() {
            if c.is_ascii() {
                let escaped = serde_json::to_string(&c.to_string()).unwrap_or_default();
                out.push_str(&escaped[1..escaped.len() - 1]);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        out.push('"');
        out
    };
    let pairs: Vec<String> = sample
        .labels
        .iter()
        .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
        .collect();
    format!("{{{}}}", pairs.join(", "))
}

/// The names a message carries.
struct Names<'a> {
    monitor: &'a str,
    node: &'a str,
}

/// How PANIC's `meta_data` names a Chainlink node: the optional `node_name`, `node_id` and
/// `node_parent_id` of the monitor's config.
#[derive(Debug, Clone, Default)]
pub struct NodeNames {
    pub name: Option<String>,
    pub id: Option<String>,
    pub parent_id: Option<String>,
}

pub fn node_names(tx: &Transaction<'_>, monitor: &str) -> NodeNames {
    let config: Option<Value> = tx
        .query_row(
            "SELECT config FROM monitors WHERE name = ?1",
            [monitor],
            |r| r.get::<_, String>(0),
        )
        .ok()
        .and_then(|c| serde_json::from_str(&c).ok());
    let field = |key: &str| {
        config
            .as_ref()
            .and_then(|c| c.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    NodeNames {
        name: field("node_name"),
        id: field("node_id"),
        parent_id: field("node_parent_id"),
    }
}

/// The routing key and body of a round's message: a Chainlink round as PANIC's Chainlink
/// monitor publishes it (`{"prometheus": {"result": …}}` or `{"prometheus": {"error": …}}`),
/// any other kind as snapq's own result object.
pub fn message_for(result: &RoundResult, names: &NodeNames) -> (String, Value) {
    if result.kind != "chainlink_node" {
        let body = serde_json::to_value(result).unwrap_or(Value::Null);
        return (format!("{}.{}", result.kind, result.monitor), body);
    }
    let time = time::OffsetDateTime::parse(
        &result.started_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map_or(0.0, |t| t.unix_timestamp_nanos() as f64 / 1e9);
    let node_name = names.name.as_deref().unwrap_or(&result.monitor);
    let meta_data = |source: Value| {
        json!({
            "monitor_name": result.monitor,
            "node_name": node_name,
            "last_source_used": source,
            "node_id": names.id.as_deref().unwrap_or(&result.monitor),
            "node_parent_id": names.parent_id.as_deref().unwrap_or("snapq"),
            "time": time,
        })
    };
    let error = |source: Value, code: i64, message: String| {
        json!({"prometheus": {"error": {
            "meta_data": meta_data(source),
            "message": message,
            "code": code,
        }}})
    };
    let body = match &result.panic {
        Some(ChainlinkReading::Data { source, data }) => {
            json!({"prometheus": {"result": {"meta_data": meta_data(json!(source)), "data": data}}})
        }
        Some(ChainlinkReading::Error { source, error: e }) => {
            let (code, message) = e.code_and_message(
                source,
                &Names {
                    monitor: &result.monitor,
                    node: node_name,
                },
            );
            error(json!(source), code, message)
        }
        // A round that ended before reading anything PANIC would know (it panicked): a
        // reading error with no source.
        None => error(
            Value::Null,
            DATA_READING,
            format!(
                "{} experienced errors when reading data from None",
                result.monitor
            ),
        ),
    };
    ("node.chainlink".to_owned(), body)
}

/// PANIC's worker heartbeats for a batch of result bodies (`message_for`'s shapes):
/// `{"component_name": <monitor>, "is_alive": true, "timestamp": <Unix s>}`, as its monitors
/// send after each round (alerter/src/monitors/node/chainlink.py, `_monitor`). One per
/// monitor of the batch, in the order of its last result: PANIC's health checker keeps
/// only the latest of a component, and a backlog sent after an outage would otherwise
/// carry thousands of heartbeats for the same monitor.
pub fn worker_heartbeats<'a>(bodies: impl Iterator<Item = &'a str>) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Meta {
        monitor_name: String,
    }
    #[derive(serde::Deserialize)]
    struct Part {
        meta_data: Meta,
    }
    #[derive(serde::Deserialize)]
    struct Prometheus {
        result: Option<Part>,
        error: Option<Part>,
    }
    /// Only the fields that name the monitor; the rest is skipped unread.
    #[derive(serde::Deserialize)]
    struct Named {
        monitor: Option<String>,
        prometheus: Option<Prometheus>,
    }
    let mut monitors: Vec<String> = Vec::new();
    for body in bodies {
        let Ok(named) = serde_json::from_str::<Named>(body) else {
            continue;
        };
        let monitor = match named.prometheus {
            Some(p) => p.result.or(p.error).map(|part| part.meta_data.monitor_name),
            None => named.monitor,
        };
        if let Some(monitor) = monitor {
            monitors.retain(|m| *m != monitor);
            monitors.push(monitor);
        }
    }
    let timestamp = now_micros() as f64 / 1e6;
    monitors
        .into_iter()
        .map(|monitor| {
            json!({"component_name": monitor, "is_alive": true, "timestamp": timestamp}).to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::{RoundError, kind};
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// What PANIC v1.3.1 reads of a Chainlink message, field by field, with the type its
    /// code gives or expects. Taken from:
    /// - alerter/src/monitors/node/chainlink.py (`_process_retrieved_prometheus_data`,
    ///   `_process_error`): the nesting under `prometheus`, `meta_data`'s six keys, the
    ///   one-value metrics as `prometheus_client` floats (None when optional and absent),
    ///   `gas_updater_set_gas_price` as one `{percentile, price}` object or None, the
    ///   error's integer `code` and `message`;
    /// - alerter/src/utils/constants/data.py (`RAW_TO_TRANSFORMED_CHAINLINK_METRICS`): the
    ///   `data` keys the transformer renames, each of which must be there (it `del`s them);
    ///   `balance` and `run_status_update_total_errors` among them;
    /// - alerter/src/data_transformers/node/chainlink.py (`_transform_data`,
    ///   `_update_state`): `meta_data`'s `node_id`, `node_parent_id`, `node_name`, `time`,
    ///   `last_source_used`, the percentile as a string with `%`;
    /// - alerter/src/utils/exceptions.py: codes 5003, 5005, 5015 and their messages.
    ///
    /// `"float"` is a JSON number written as a float (Python's `json.dumps` of a float),
    /// `"int"` one written as an integer; `A|B` either; an object lists every key, no more.
    fn result_schema() -> Value {
        json!({"prometheus": {"result": {
            "meta_data": meta_schema(),
            "data": {
                "head_tracker_current_head": "float",
                "head_tracker_heads_received_total": "float",
                "max_unconfirmed_blocks": "float",
                "process_start_time_seconds": "float",
                "tx_manager_num_gas_bumps_total": "float",
                "tx_manager_gas_bump_exceeds_limit_total": "float",
                "unconfirmed_transactions": "float",
                "gas_updater_set_gas_price": "gas|null",
                "balance": {"address": "str", "balance": "float", "symbol": "str"},
                "run_status_update_total_errors": "int",
            },
        }}})
    }

    fn meta_schema() -> Value {
        json!({
            "monitor_name": "str",
            "node_name": "str",
            "last_source_used": "str",
            "node_id": "str",
            "node_parent_id": "str",
            "time": "float",
        })
    }

    fn error_schema() -> Value {
        json!({"prometheus": {"error": {"meta_data": meta_schema(), "message": "str", "code": "int"}}})
    }

    /// Checks `value` against `schema`, naming the path of the first difference.
    fn check(value: &Value, schema: &Value, path: &str) {
        match schema {
            Value::Object(fields) => {
                let object = value
                    .as_object()
                    .unwrap_or_else(|| panic!("{path}: not an object: {value}"));
                let mut want: Vec<&String> = fields.keys().collect();
                let mut got: Vec<&String> = object.keys().collect();
                want.sort();
                got.sort();
                assert_eq!(got, want, "{path}: keys");
                for (key, sub) in fields {
                    check(&object[key], sub, &format!("{path}.{key}"));
                }
            }
            Value::String(types) => {
                let ok = types.split('|').any(|t| match t {
                    "str" => value.is_string(),
                    "int" => value.is_i64() || value.is_u64(),
                    "float" => value.is_f64(),
                    "null" => value.is_null(),
                    "gas" if value.is_object() => {
                        check(value, &json!({"percentile": "str", "price": "float"}), path);
                        true
                    }
                    "gas" => false,
                    other => panic!("unknown type {other}"),
                });
                assert!(ok, "{path}: {value} is not {types}");
            }
            other => panic!("bad schema {other}"),
        }
    }

    /// Serves each body once, in order, as a real HTTP server on loopback.
    fn serve(bodies: Vec<&'static str>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for body in bodies {
                let (mut stream, _) = listener.accept().unwrap();
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).unwrap();
                    head.extend_from_slice(&buf[..n]);
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(reply.as_bytes()).unwrap();
            }
        });
        url
    }

    /// A URL nothing listens on.
    fn closed_url() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        drop(listener);
        url
    }

    const FULL: &str = "\
head_tracker_current_head 4242
head_tracker_heads_received_total 99
max_unconfirmed_blocks 3
process_start_time_seconds 1.7e9
tx_manager_num_gas_bumps_total 5
tx_manager_gas_bump_exceeds_limit_total 0
unconfirmed_transactions 1
gas_updater_set_gas_price{percentile=\"20%\"} 3e10
eth_balance{account=\"0xA\"} 2.5
eth_balance{account=\"0xB\"} 7
run_status_update_total{status=\"completed\",job=\"j1\"} 4
run_status_update_total{status=\"errored\",job=\"j1\"} 2
run_status_update_total{status=\"errored\",job=\"j2\"} 1
";

    /// `FULL` without the optional metrics (and without the lines `drop` starts).
    fn without(drop: &[&str]) -> &'static str {
        let text: String = FULL
            .lines()
            .filter(|l| !l.starts_with("gas_updater") && !l.starts_with("run_status"))
            .filter(|l| !drop.iter().any(|d| l.starts_with(d)))
            .map(|l| format!("{l}\n"))
            .collect();
        Box::leak(text.into_boxed_str())
    }

    /// Runs one real round of a `chainlink_node` monitor and makes its message.
    fn message(urls: &[String], symbol: &str) -> (RoundResult, Value) {
        let probe = kind("chainlink_node")
            .unwrap()
            .prepare(&json!({"node_prometheus_urls": urls, "symbol": symbol, "connect_timeout": 1}))
            .unwrap();
        let round = probe.round(&Value::Null);
        let (data, error) = match round.outcome {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e)),
        };
        let result = RoundResult {
            monitor: "node-1".into(),
            kind: "chainlink_node".into(),
            version: 1,
            ok: error.is_none(),
            started_at: "2026-01-01T00:00:00Z".into(),
            duration_ms: 1.5,
            data,
            error,
            panic: round.panic,
        };
        let names = NodeNames {
            name: Some("Node One".into()),
            id: Some("n-1".into()),
            parent_id: Some("chain-x".into()),
        };
        let (key, body) = message_for(&result, &names);
        assert_eq!(key, "node.chainlink");
        // As a consumer reads it: the serialised text, parsed again.
        let body: Value = serde_json::from_str(&body.to_string()).unwrap();
        (result, body)
    }

    #[test]
    fn chainlink_messages_have_panics_fields_names_and_types() {
        // Healthy.
        let url = serve(vec![FULL]);
        let (result, body) = message(std::slice::from_ref(&url), "ETH");
        assert!(result.ok);
        check(&body, &result_schema(), "");
        let r = &body["prometheus"]["result"];
        assert_eq!(r["data"]["head_tracker_current_head"], json!(4242.0));
        assert_eq!(r["data"]["process_start_time_seconds"], json!(1.7e9));
        assert_eq!(
            r["data"]["gas_updater_set_gas_price"],
            json!({"percentile": "20%", "price": 3e10})
        );
        assert_eq!(
            r["data"]["balance"],
            json!({"address": "0xA", "balance": 2.5, "symbol": "ETH"})
        );
        assert_eq!(r["data"]["run_status_update_total_errors"], 2);
        let meta = &r["meta_data"];
        assert_eq!(meta["last_source_used"], url.as_str());
        assert_eq!(meta["node_name"], "Node One");
        assert_eq!(meta["node_id"], "n-1");
        assert_eq!(meta["node_parent_id"], "chain-x");
        assert_eq!(meta["monitor_name"], "node-1");
        assert_eq!(meta["time"], 1_767_225_600.0);

        // One source down: the next one answers and is the source used.
        let up = serve(vec![FULL]);
        let (_, body) = message(&[closed_url(), up.clone()], "");
        check(&body, &result_schema(), "");
        let r = &body["prometheus"]["result"];
        assert_eq!(r["meta_data"]["last_source_used"], up.as_str());
        assert_eq!(r["data"]["balance"]["symbol"], "");

        // Node down: 5015, last_source_used the first source (none answered before).
        let (first, second) = (closed_url(), closed_url());
        let (result, body) = message(&[first.clone(), second], "");
        assert_eq!(result.error.unwrap().code, "node_down");
        check(&body, &error_schema(), "");
        let e = &body["prometheus"]["error"];
        assert_eq!(e["code"], 5015);
        assert_eq!(e["message"], "Node Node One is unreachable");
        assert_eq!(e["meta_data"]["last_source_used"], first.as_str());

        // A metric PANIC requires missing: 5003 naming it and the source, even though
        // snapq itself counts it as optional.
        let url = serve(vec![without(&["tx_manager_gas_bump_exceeds_limit_total"])]);
        let (result, body) = message(std::slice::from_ref(&url), "");
        assert!(result.ok, "optional for snapq");
        check(&body, &error_schema(), "");
        let e = &body["prometheus"]["error"];
        assert_eq!(e["code"], 5003);
        assert_eq!(
            e["message"],
            format!(
                "Could not find metric tx_manager_gas_bump_exceeds_limit_total at endpoint {url}"
            )
        );
        assert_eq!(e["meta_data"]["last_source_used"], url.as_str());

        // Optional metrics missing: gas price null, no errored runs.
        let url = serve(vec![without(&[])]);
        let (_, body) = message(std::slice::from_ref(&url), "");
        check(&body, &result_schema(), "");
        let d = &body["prometheus"]["result"]["data"];
        assert_eq!(d["gas_updater_set_gas_price"], Value::Null);
        assert_eq!(d["run_status_update_total_errors"], 0);

        // Not Prometheus text: PANIC's data reading error, 5005.
        let url = serve(vec!["<html>busy</html>"]);
        let (_, body) = message(std::slice::from_ref(&url), "");
        check(&body, &error_schema(), "");
        assert_eq!(body["prometheus"]["error"]["code"], 5005);
        assert_eq!(
            body["prometheus"]["error"]["message"],
            format!("node-1 experienced errors when reading data from {url}")
        );
    }

    #[test]
    fn labelled_one_value_metrics_are_keyed_as_python_writes_labels() {
        let samples = crate::monitor::prometheus::parse(&format!(
            "{}head_tracker_current_head{{evmChainID=\"1\",name=\"é\"}} 7\n",
            without(&["head_tracker_current_head"])
        ))
        .unwrap();
        let ChainlinkReading::Data { data, .. } = chainlink_reading("u", &samples, "") else {
            panic!("not data")
        };
        assert_eq!(
            data["head_tracker_current_head"],
            json!({r#"{"evmChainID": "1", "name": "\u00e9"}"#: 7.0})
        );
    }

    #[test]
    fn other_kinds_keep_snapqs_shape() {
        let result = RoundResult {
            monitor: "node-1".into(),
            kind: "http".into(),
            version: 2,
            ok: true,
            started_at: "2026-01-01T00:00:00Z".into(),
            duration_ms: 1.5,
            data: Some(json!({"status": 200})),
            error: None,
            panic: None,
        };
        let (key, body) = message_for(&result, &NodeNames::default());
        assert_eq!(key, "http.node-1");
        assert_eq!(body["data"]["status"], 200);
        assert_eq!(body["version"], 2);
        let _ = RoundError::new("x", "y");
    }
}
