//! The MQTT sink against the real Mosquitto on 127.0.0.1:1883 (`.ci/run` starts it), read
//! by Mosquitto's own client `mosquitto_sub`, not by snapq's code. The same guarantees as
//! RabbitMQ's (tests/it/amqp.rs): nothing lost across an outage or a kill -9, in order.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::amqp::{Proxy, kill_9_loses_nothing, outage_loses_nothing};
use crate::fake_http::{FakeServer, Mode, chainlink_metrics};
use crate::support::{Home, unique, wait_until};

const MQTT: &str = "mqtt://127.0.0.1:1883";

/// `mosquitto_sub` on one topic filter at QoS 1, its messages collected as (topic, JSON).
struct Subscriber {
    child: Child,
    got: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Subscriber {
    /// Subscribes and waits until a probe published to `probe_topic` (which the filter
    /// must match) comes back, so nothing published afterwards is missed.
    fn start(filter: &str, probe_topic: &str) -> Subscriber {
        let mut child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                "1883",
                "-q",
                "1",
                "-v",
                "-t",
                filter,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (Debian's mosquitto-clients; .ci/run installs it)");
        let got = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        {
            let got = got.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    let Some((topic, payload)) = line.split_once(' ') else {
                        continue;
                    };
                    let value = serde_json::from_str(payload)
                        .unwrap_or_else(|e| panic!("not JSON on {topic}: {e}: {payload}"));
                    got.lock().unwrap().push((topic.to_owned(), value));
                }
            });
        }
        let subscriber = Subscriber { child, got };
        let ready = wait_until(Duration::from_secs(10), || {
            publish(probe_topic, r#"{"probe": true}"#);
            std::thread::sleep(Duration::from_millis(100));
            subscriber.all().iter().any(|(_, v)| v["probe"] == true)
        });
        assert!(ready, "mosquitto_sub did not subscribe to {filter}");
        subscriber
    }

    /// Every message but the probes.
    fn messages(&self) -> Vec<(String, Value)> {
        self.all()
            .into_iter()
            .filter(|(_, v)| v["probe"] != true)
            .collect()
    }

    fn bodies(&self) -> Vec<Value> {
        self.messages().into_iter().map(|(_, v)| v).collect()
    }

    fn all(&self) -> Vec<(String, Value)> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn publish(topic: &str, payload: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", "1883", "-t", topic, "-m", payload])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed");
}

fn name(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), unique())
}

#[test]
fn results_and_heartbeats_reach_mqtt_under_mirrored_topics() {
    let home = Home::new();
    let web = FakeServer::start(Mode::Text("ok\n".into()));
    let node = FakeServer::start(Mode::Text(chainlink_metrics(77)));
    let (http, chainlink) = (name("mqtt-http"), name("mqtt-cl"));
    let results = Subscriber::start(
        "raw_data/#",
        &format!("raw_data/probe/{}", std::process::id()),
    );
    let beats = Subscriber::start("health_check/heartbeat/#", "health_check/heartbeat/probe");
    let mut foreman = home.start(&["--mqtt-url", MQTT, "--heartbeat-interval", "3600"]);
    crate::monitors::add(&home, "http", &http, json!({"url": web.url()}), "0.2");
    crate::monitors::add(
        &home,
        "chainlink_node",
        &chainlink,
        json!({"node_prometheus_urls": [node.url()]}),
        "0.2",
    );
    let ours = |topic: &str, monitor: &str| {
        results
            .messages()
            .into_iter()
            .filter(|(t, v)| {
                t == topic
                    && (v["monitor"] == monitor
                        || v["prometheus"]["result"]["meta_data"]["monitor_name"] == monitor)
            })
            .count()
    };
    let http_topic = format!("raw_data/http/{http}");
    assert!(
        wait_until(Duration::from_secs(10), || ours(&http_topic, &http) >= 2
            && ours("raw_data/node/chainlink", &chainlink) >= 2),
        "results did not arrive: {:?}\n{}",
        results.messages(),
        foreman.log_text()
    );
    let (_, body) = results
        .messages()
        .into_iter()
        .find(|(t, _)| *t == http_topic)
        .unwrap();
    assert_eq!(body["kind"], "http");
    assert_eq!(body["ok"], true);
    assert_eq!(body["data"]["status"], 200);
    let (_, body) = results
        .messages()
        .into_iter()
        .find(|(t, v)| {
            t == "raw_data/node/chainlink"
                && v["prometheus"]["result"]["meta_data"]["monitor_name"] == chainlink.as_str()
        })
        .unwrap();
    assert_eq!(
        body["prometheus"]["result"]["data"]["head_tracker_current_head"],
        json!(77.0)
    );

    // The manager heartbeat at connect, and again at once when pinged; worker heartbeats
    // after rounds.
    let managers = |b: &Subscriber| {
        b.messages()
            .into_iter()
            .filter(|(t, v)| t == "health_check/heartbeat/manager" && v["pid"] == foreman.pid())
            .count()
    };
    assert!(wait_until(Duration::from_secs(5), || managers(&beats) >= 1));
    let before = managers(&beats);
    publish("health_check/ping", "{}");
    assert!(
        wait_until(Duration::from_secs(2), || managers(&beats) > before),
        "no heartbeat in answer to a ping"
    );
    assert!(beats.messages().iter().any(|(t, v)| {
        t == "health_check/heartbeat/worker" && v["component_name"] == http.as_str()
    }));

    let status: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["sink"]["kind"], "mqtt");
    assert_eq!(status["sink"]["broker"], "MQTT");
    assert_eq!(status["sink"]["state"], "connected");
    assert!(home.ok(&["status"]).contains("results: MQTT, connected"));
    assert!(foreman.has_log("MQTT: connected"));
    foreman.stop();
}

#[test]
fn an_mqtt_outage_loses_no_result_and_keeps_their_order() {
    let proxy = Proxy::start_to(1883);
    let monitor = name("mqtt-outage");
    let topic = format!("raw_data/http/{monitor}");
    let results = Subscriber::start(&topic, &topic);
    let url = format!("mqtt://127.0.0.1:{}", proxy.port());
    let foreman = outage_loses_nothing(
        &["--mqtt-url", &url],
        &proxy,
        &monitor,
        &|| results.bodies(),
        &|home| {
            let status = home.ok(&["status"]);
            assert!(status.contains("results: MQTT, disconnected"), "{status}");
        },
    );
    assert!(foreman.has_log("MQTT: connected"));
}

#[test]
fn results_waiting_for_mqtt_survive_kill_9() {
    let proxy = Proxy::start_to(1883);
    let monitor = name("mqtt-kill");
    let topic = format!("raw_data/http/{monitor}");
    let results = Subscriber::start(&topic, &topic);
    let url = format!("mqtt://127.0.0.1:{}", proxy.port());
    kill_9_loses_nothing(&["--mqtt-url", &url], &proxy, &monitor, &|| {
        results.bodies()
    });
}

#[test]
fn broker_urls_are_checked() {
    let home = Home::new();
    for (args, says) in [
        (vec!["--mqtt-url", "amqp://127.0.0.1"], "not an mqtt:// URL"),
        (vec!["--amqp-url", "mqtt://127.0.0.1"], "not an amqp:// URL"),
        (
            vec!["--broker-url", "nats://127.0.0.1"],
            "mqtt://127.0.0.1:1883",
        ),
        (
            vec!["--amqp-url", "amqp://x", "--mqtt-url", "mqtt://y"],
            "one broker",
        ),
        (vec!["--mqtt-url", MQTT, "--panic-configs"], "over RabbitMQ"),
    ] {
        let out = home.snapq(&[vec!["run"], args.clone()].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
