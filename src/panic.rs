//! PANIC's message shapes (SimplyStaking/panic): what its consumers — the Chainlink node
//! data transformer, the alerters, the health checker — expect on RabbitMQ. The RabbitMQ
//! sink (src/amqp.rs) sends these; nothing here knows about connections or the outbox.

use rusqlite::Transaction;
use serde_json::{Value, json};

use crate::clock::now_micros;
use crate::monitor::RoundResult;

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

/// The routing key and body of a round's message.
pub fn message_for(result: &RoundResult, names: &NodeNames) -> (String, Value) {
    if result.kind != "chainlink_node" {
        let body = serde_json::to_value(result).unwrap_or(Value::Null);
        return (format!("{}.{}", result.kind, result.monitor), body);
    }
    let source = result
        .data
        .as_ref()
        .and_then(|d| d.get("source"))
        .cloned()
        .unwrap_or(Value::Null);
    let time = time::OffsetDateTime::parse(
        &result.started_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map_or(0.0, |t| t.unix_timestamp_nanos() as f64 / 1e9);
    let meta_data = json!({
        "monitor_name": result.monitor,
        "node_name": names.name.as_deref().unwrap_or(&result.monitor),
        "node_id": names.id.as_deref().unwrap_or(&result.monitor),
        "node_parent_id": names.parent_id.as_deref().unwrap_or("snapq"),
        "last_source_used": source,
        "time": time,
    });
    let body = match (&result.data, &result.error) {
        (_, Some(error)) => json!({"prometheus": {"error": {
            "meta_data": meta_data,
            "message": error.message,
            "code": error.code,
        }}}),
        (data, None) => {
            let mut data = data.clone().unwrap_or(Value::Null);
            if let Some(map) = data.as_object_mut() {
                map.remove("source");
            }
            json!({"prometheus": {"result": {"meta_data": meta_data, "data": data}}})
        }
    };
    ("node.chainlink".to_owned(), body)
}

/// PANIC's worker heartbeat for the monitor whose result `body` is (`message_for`'s
/// shapes): `{"component_name": <monitor>, "is_alive": true, "timestamp": <Unix s>}`, as
/// its monitors send after each round (alerter/src/monitors/node/chainlink.py, `_monitor`).
pub fn worker_heartbeat(body: &str) -> Option<String> {
    let body: Value = serde_json::from_str(body).ok()?;
    let monitor = match body.get("prometheus") {
        Some(p) => p
            .get("result")
            .or_else(|| p.get("error"))?
            .get("meta_data")?
            .get("monitor_name")?,
        None => body.get("monitor")?,
    };
    Some(
        json!({
            "component_name": monitor,
            "is_alive": true,
            "timestamp": now_micros() as f64 / 1e6,
        })
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::RoundError;

    fn result(kind: &str, data: Option<Value>, error: Option<RoundError>) -> RoundResult {
        RoundResult {
            monitor: "node-1".into(),
            kind: kind.into(),
            version: 2,
            ok: error.is_none(),
            started_at: "2026-01-01T00:00:00Z".into(),
            duration_ms: 1.5,
            data,
            error,
        }
    }

    #[test]
    fn panic_shapes() {
        let ok = result(
            "chainlink_node",
            Some(json!({"source": "http://n/metrics", "head_tracker_current_head": 7})),
            None,
        );
        let (key, body) = message_for(&ok, &NodeNames::default());
        assert_eq!(key, "node.chainlink");
        let r = &body["prometheus"]["result"];
        assert_eq!(r["data"]["head_tracker_current_head"], 7);
        assert!(r["data"].get("source").is_none());
        assert_eq!(r["meta_data"]["last_source_used"], "http://n/metrics");
        assert_eq!(r["meta_data"]["monitor_name"], "node-1");
        assert_eq!(r["meta_data"]["time"], 1_767_225_600.0);
        let down = result(
            "chainlink_node",
            None,
            Some(RoundError::new("node_down", "node is down")),
        );
        let named = NodeNames {
            name: Some("Node One".into()),
            id: Some("n-1".into()),
            parent_id: Some("chain-x".into()),
        };
        let (_, body) = message_for(&down, &named);
        assert_eq!(body["prometheus"]["error"]["code"], "node_down");
        let meta = &body["prometheus"]["error"]["meta_data"];
        assert_eq!(meta["node_name"], "Node One");
        assert_eq!(meta["node_id"], "n-1");
        assert_eq!(meta["node_parent_id"], "chain-x");
        assert_eq!(meta["monitor_name"], "node-1");
        let (key, body) = message_for(
            &result("http", Some(json!({"status": 200})), None),
            &NodeNames::default(),
        );
        assert_eq!(key, "http.node-1");
        assert_eq!(body["data"]["status"], 200);
        assert_eq!(body["version"], 2);
    }
}
