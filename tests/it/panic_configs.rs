//! snapq as PANIC's node monitors manager: configurations in over the real RabbitMQ
//! (`run --panic-configs`), as PANIC's config manager sends them
//! (alerter/src/monitors/managers/node.py `_process_configs`: exchange `config`, routing
//! key `chains.<base>.<sub>.nodes_config`, a body of node sections with string values).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::amqp::{BROKER, TestBroker};
use crate::fake_http::{FakeServer, Mode, chainlink_metrics};
use crate::support::{Foreman, Home, unique, wait_until};

/// A queue and a sub chain no other run uses; the queue is deleted at the end.
struct Chain {
    queue: String,
    sub: String,
    broker: TestBroker,
}

impl Chain {
    fn new() -> Chain {
        let tag = format!(
            "{}x{}x{}",
            std::process::id(),
            unique(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        );
        Chain {
            queue: format!("snapq-test-configs-{tag}"),
            sub: format!("t{tag}"),
            broker: TestBroker::connect(),
        }
    }

    fn start(&self, home: &Home) -> Foreman {
        let foreman = home.start(&[
            "--amqp-url",
            BROKER,
            "--panic-configs",
            "--panic-configs-queue",
            &self.queue,
            "--panic-interval",
            "0.3",
        ]);
        assert!(
            wait_until(Duration::from_secs(10), || status(home)["state"]
                == "consuming"),
            "not consuming: {}\n{}",
            status(home),
            foreman.log_text()
        );
        foreman
    }

    fn routing_key(&self) -> String {
        format!("chains.chainlink.{}.nodes_config", self.sub)
    }

    fn send(&self, body: &[u8]) {
        self.broker.publish("config", &self.routing_key(), body);
    }

    fn monitor(&self, node: &str) -> String {
        format!("panic.{}.{node}", self.sub)
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        self.broker.delete_queue(&self.queue);
    }
}

/// A node section as PANIC's config manager sends it: every value a string.
fn node(id: &str, url: &str) -> Value {
    json!({
        "id": id,
        "parent_id": "chain_name_1",
        "name": format!("Node {id}"),
        "node_prometheus_urls": url,
        "ethereum_addresses": "0x1aB5",
        "monitor_node": "true",
        "monitor_prometheus": "true",
    })
}

fn nodes(sections: &[(&str, Value)]) -> Vec<u8> {
    let mut body = serde_json::Map::new();
    body.insert("DEFAULT".into(), json!({}));
    for (id, section) in sections {
        body.insert((*id).to_owned(), section.clone());
    }
    Value::Object(body).to_string().into_bytes()
}

fn status(home: &Home) -> Value {
    let status: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    status["panic_configs"].clone()
}

/// The managed monitors: name → (version, config).
fn managed(home: &Home) -> Vec<(String, i64, Value)> {
    let list: Value = serde_json::from_str(&home.ok(&["monitor", "list", "--json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|m| m["managed_by"].is_string())
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["version"].as_i64().unwrap(),
                m["config"].clone(),
            )
        })
        .collect()
}

fn names(list: &[(String, i64, Value)]) -> Vec<String> {
    list.iter().map(|(n, _, _)| n.clone()).collect()
}

fn version(list: &[(String, i64, Value)], name: &str) -> Option<i64> {
    list.iter().find(|(n, _, _)| n == name).map(|(_, v, _)| *v)
}

#[test]
fn a_chains_nodes_config_starts_restarts_and_stops_its_monitors() {
    let home = Home::new();
    let chain = Chain::new();
    let (a, b, b2) = (
        FakeServer::start(Mode::Text(chainlink_metrics(1))),
        FakeServer::start(Mode::Text(chainlink_metrics(2))),
        FakeServer::start(Mode::Text(chainlink_metrics(3))),
    );
    let mut foreman = chain.start(&home);
    let monitorables = chain.broker.subscribe("monitorable", "chainlink.nodes");
    let (ma, mb) = (chain.monitor("node_a"), chain.monitor("node_b"));

    // Two nodes: two monitors within a second, marked as the chain's.
    let sent = Instant::now();
    chain.send(&nodes(&[
        ("node_a", node("node_a", &a.url())),
        ("node_b", node("node_b", &b.url())),
    ]));
    assert!(
        wait_until(Duration::from_secs(1), || managed(&home).len() == 2),
        "not started within 1 s: {:?}\n{}",
        managed(&home),
        foreman.log_text()
    );
    let started = sent.elapsed();
    let list = managed(&home);
    assert_eq!(names(&list), [ma.clone(), mb.clone()]);
    let config = &list[0].2;
    assert_eq!(config["node_prometheus_urls"], json!([a.url()]));
    assert_eq!(config["node_name"], "Node node_a");
    assert_eq!(config["node_id"], "node_a");
    assert_eq!(config["node_parent_id"], "chain_name_1");
    // Their rounds run.
    assert!(wait_until(Duration::from_secs(5), || {
        let list: Value = serde_json::from_str(&home.ok(&["monitor", "list", "--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .filter(|m| m["last_status"] == "ok")
            .count()
            == 2
    }));
    let text = home.ok(&["monitor", "list"]);
    assert!(
        text.contains(&format!(
            "managed by PANIC configs, chain chainlink {}",
            chain.sub
        )),
        "{text}"
    );

    // The monitorable list, as PANIC's managers publish it.
    let message = monitorables
        .recv_timeout(Duration::from_secs(5))
        .expect("a monitorable list");
    assert_eq!(message.routing_key, "chainlink.nodes");
    let body: Value = serde_json::from_slice(&message.body).unwrap();
    assert_eq!(body["manager_name"], "snapq");
    let ours: Vec<&Value> = body["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["chain_name"] == chain.sub.as_str())
        .collect();
    assert_eq!(ours.len(), 2, "{body}");
    assert_eq!(
        *ours[0],
        json!({"chain_id": "chain_name_1", "chain_name": chain.sub, "source_id": "node_a",
               "source_name": "Node node_a"})
    );

    // The CLI does not change them, and says why.
    for args in [
        vec!["monitor", "update", ma.as_str(), "--interval", "5"],
        vec!["monitor", "remove", ma.as_str()],
    ] {
        let out = home.snapq(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("managed by PANIC"), "{err}");
    }

    // One URL changed: that monitor restarts (a new version), the other is untouched.
    chain.send(&nodes(&[
        ("node_a", node("node_a", &a.url())),
        ("node_b", node("node_b", &b2.url())),
    ]));
    assert!(
        wait_until(Duration::from_secs(1), || version(&managed(&home), &mb)
            == Some(2)),
        "not restarted within 1 s: {:?}",
        managed(&home)
    );
    let list = managed(&home);
    assert_eq!(version(&list, &ma), Some(1));
    assert_eq!(list[1].2["node_prometheus_urls"], json!([b2.url()]));

    // node_b missing: stopped; node_a still untouched.
    chain.send(&nodes(&[("node_a", node("node_a", &a.url()))]));
    assert!(
        wait_until(Duration::from_secs(1), || managed(&home).len() == 1),
        "not stopped within 1 s: {:?}",
        managed(&home)
    );
    assert_eq!(version(&managed(&home), &ma), Some(1));

    // monitor_node false stops it too.
    let mut off = node("node_a", &a.url());
    off["monitor_node"] = json!("false");
    chain.send(&nodes(&[("node_a", off)]));
    assert!(wait_until(Duration::from_secs(1), || managed(&home).is_empty()));
    chain.send(&nodes(&[("node_a", node("node_a", &a.url()))]));
    assert!(wait_until(Duration::from_secs(1), || managed(&home).len() == 1));

    // Malformed: logged, counted, acknowledged, and nothing changes.
    let before = managed(&home);
    chain.send(b"{not json");
    let mut missing_url = node("node_c", &a.url());
    missing_url
        .as_object_mut()
        .unwrap()
        .remove("node_prometheus_urls");
    chain.send(&nodes(&[
        ("node_a", node("node_a", &b.url())),
        ("node_c", missing_url),
    ]));
    assert!(
        wait_until(Duration::from_secs(5), || status(&home)["rejected"] == 2),
        "{}",
        status(&home)
    );
    assert_eq!(
        managed(&home),
        before,
        "a malformed message changed monitors"
    );
    let s = status(&home);
    assert!(
        s["last_rejection"]
            .as_str()
            .unwrap()
            .contains("node \"node_c\": node_prometheus_urls is missing"),
        "{s}"
    );
    assert!(foreman.has_log("malformed message"));
    let text = home.ok(&["status"]);
    assert!(text.contains("2 rejected"), "{text}");
    foreman.stop();
    eprintln!("two monitors started {started:?} after the message");
}

#[test]
fn kill_9_between_receiving_and_committing_a_config_loses_nothing() {
    let home = Home::new();
    let chain = Chain::new();
    let a = FakeServer::start(Mode::Text(chainlink_metrics(1)));
    let mut foreman = chain.start(&home);
    // Hold the write lock, so the configuration cannot be committed.
    let lock = home.conn();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    chain.send(&nodes(&[("node_a", node("node_a", &a.url()))]));
    assert!(
        wait_until(Duration::from_secs(10), || foreman
            .has_log("PANIC configs: received")),
        "{}",
        foreman.log_text()
    );
    foreman.kill9();
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    assert!(managed(&home).is_empty(), "committed before the kill?");
    // The broker hands the unacknowledged message to the next foreman.
    let mut foreman = chain.start(&home);
    assert!(
        wait_until(Duration::from_secs(5), || managed(&home).len() == 1),
        "the configuration was lost: {:?}\n{}",
        managed(&home),
        foreman.log_text()
    );
    assert_eq!(names(&managed(&home)), [chain.monitor("node_a")]);
    foreman.stop();
}

#[test]
fn panic_configs_need_the_broker() {
    let home = Home::new();
    let out = home.snapq(&["run", "--panic-configs"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--amqp-url"), "{err}");
}
