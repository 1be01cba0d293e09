//! The RabbitMQ sink against the real broker on 127.0.0.1:5672 (`.ci/run` starts it).

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};

use crate::fake_http::{FakeServer, Mode, chainlink_metrics};
use crate::support::{Foreman, Home, wait_until};

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A message as the test's own consumer received it.
pub struct Received {
    pub routing_key: String,
    pub body: Vec<u8>,
    delivery_mode: Option<u8>,
}

/// The test's own RabbitMQ client: lapin used directly (not snapq's src/rabbitmq.rs, so
/// that what snapq publishes is read by code that is not snapq's).
pub struct TestBroker {
    connection: lapin::Connection,
    channel: lapin::Channel,
}

impl TestBroker {
    pub fn connect() -> TestBroker {
        async_global_executor::block_on(async {
            let connection = lapin::Connection::connect(BROKER, ConnectionProperties::default())
                .await
                .expect("RabbitMQ at 127.0.0.1:5672");
            let channel = connection.create_channel().await.unwrap();
            TestBroker {
                connection,
                channel,
            }
        })
    }

    /// Messages on `exchange` under `binding`, through an exclusive queue, without acks.
    pub fn subscribe(&self, exchange: &str, binding: &str) -> Receiver<Received> {
        let (tx, rx) = crossbeam_channel::unbounded();
        async_global_executor::block_on(async {
            let durable = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            let channel = &self.channel;
            channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Topic,
                    durable,
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let exclusive = QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            };
            let queue = channel
                .queue_declare("".into(), exclusive, FieldTable::default())
                .await
                .unwrap();
            channel
                .queue_bind(
                    queue.name().clone(),
                    exchange.into(),
                    binding.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let no_ack = BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            };
            let mut consumer = channel
                .basic_consume(
                    queue.name().clone(),
                    "".into(),
                    no_ack,
                    FieldTable::default(),
                )
                .await
                .unwrap();
            async_global_executor::spawn(async move {
                while let Some(Ok(d)) = consumer.next().await {
                    let received = Received {
                        routing_key: d.routing_key.to_string(),
                        delivery_mode: *d.properties.delivery_mode(),
                        body: d.data,
                    };
                    if tx.send(received).is_err() {
                        return;
                    }
                }
            })
            .detach();
        });
        rx
    }

    pub fn publish(&self, exchange: &str, key: &str, body: &[u8]) {
        async_global_executor::block_on(self.channel.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        ))
        .unwrap();
    }
}

impl TestBroker {
    /// Deletes a queue a test made (brokers persist between runs).
    pub fn delete_queue(&self, queue: &str) {
        let _ = async_global_executor::block_on(
            self.channel
                .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default()),
        );
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = async_global_executor::block_on(self.connection.close(200, "bye".into()));
    }
}

/// Collects the messages published on `raw_data` under `binding` for `within`, or until
/// `enough` of them satisfy `wanted` (other test runs may publish under the same key).
fn consume(
    binding: &str,
    enough: usize,
    within: Duration,
    wanted: impl Fn(&Value) -> bool,
    during: impl FnOnce(),
) -> Vec<(String, Value)> {
    let broker = TestBroker::connect();
    let consumer = broker.subscribe("raw_data", binding);
    during();
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.iter().filter(|(_, b)| wanted(b)).count() < enough {
        let Ok(d) = consumer.recv_deadline(deadline) else {
            break;
        };
        let body: Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(d.delivery_mode, Some(2), "not persistent");
        got.push((d.routing_key, body));
    }
    got
}

#[test]
fn chainlink_results_reach_rabbitmq_in_panics_shape() {
    let home = Home::new();
    let node = FakeServer::start(Mode::Text(chainlink_metrics(4242)));
    let name = format!("cl-{}", std::process::id());
    let mut foreman = home.start(&["--amqp-url", BROKER]);
    let ours = |b: &Value| b["prometheus"]["result"]["meta_data"]["monitor_name"] == name.as_str();
    let messages = consume("node.chainlink", 2, Duration::from_secs(10), ours, || {
        crate::monitors::add(
            &home,
            "chainlink_node",
            &name,
            json!({
                "node_prometheus_urls": [node.url()],
                "node_name": "Node One",
                "node_id": "n-1",
                "node_parent_id": "chain-x",
            }),
            "0.3",
        );
    });
    let ours: Vec<&Value> = messages
        .iter()
        .map(|(_, b)| b)
        .filter(|b| ours(b))
        .collect();
    assert!(
        !ours.is_empty(),
        "no message for {name}: {messages:?}\n{}",
        foreman.log_text()
    );
    let result = &ours[0]["prometheus"]["result"];
    assert_eq!(result["data"]["head_tracker_current_head"], json!(4242.0));
    assert_eq!(
        result["data"]["balance"],
        json!({"address": "0x1aB5", "balance": 12.5, "symbol": ""})
    );
    assert_eq!(result["data"]["run_status_update_total_errors"], 1);
    assert_eq!(result["meta_data"]["last_source_used"], node.url());
    assert!(result["meta_data"]["time"].as_f64().unwrap() > 1.7e9);
    assert_eq!(result["meta_data"]["node_name"], "Node One");
    assert_eq!(result["meta_data"]["node_id"], "n-1");
    assert_eq!(result["meta_data"]["node_parent_id"], "chain-x");
    // No results file with a broker configured; confirmed messages leave the outbox.
    assert!(
        !home.file("results.jsonl").exists()
            || std::fs::read_to_string(home.file("results.jsonl"))
                .unwrap()
                .is_empty()
    );
    let status: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["sink"]["kind"], "amqp");
    assert_eq!(status["sink"]["state"], "connected");
    assert!(
        !status["sink"]["detail"]
            .as_str()
            .unwrap()
            .contains("guest:guest"),
        "password shown"
    );
    foreman.stop();
}

#[test]
fn other_kinds_go_under_kind_dot_monitor() {
    let home = Home::new();
    let web = FakeServer::start(Mode::Text("ok\n".into()));
    let name = format!("web-{}", std::process::id());
    let _foreman = home.start(&["--amqp-url", BROKER]);
    let key = format!("http.{name}");
    let messages = consume(
        &key,
        1,
        Duration::from_secs(10),
        |_| true,
        || {
            home.ok(&[
                "monitor",
                "add",
                "http",
                &name,
                "--config",
                &json!({"url": web.url()}).to_string(),
            ]);
        },
    );
    let (routing_key, body) = messages.first().expect("no http result on raw_data");
    assert_eq!(routing_key, &key);
    assert_eq!(body["monitor"], name.as_str());
    assert_eq!(body["kind"], "http");
    assert_eq!(body["ok"], true);
    assert_eq!(body["data"]["status"], 200);
}

#[test]
fn wrong_credentials_are_reported_while_monitors_go_on() {
    let home = Home::new();
    let web = FakeServer::start(Mode::Text("ok\n".into()));
    let foreman = home.start(&["--amqp-url", "amqp://guest:wrong@127.0.0.1:5672/%2f"]);
    home.ok(&[
        "monitor",
        "add",
        "http",
        "w",
        "--interval",
        "0.2",
        "--config",
        &json!({"url": web.url()}).to_string(),
    ]);
    // The rounds go on and their results wait in the outbox.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
            s["sink"]["state"] == "disconnected" && s["sink"]["outbox_depth"].as_i64().unwrap() >= 3
        }),
        "{}",
        home.ok(&["status"])
    );
    let status: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    let detail = status["sink"]["detail"].as_str().unwrap();
    assert!(detail.to_lowercase().contains("connect"), "{detail}");
    assert!(
        foreman.has_log("RabbitMQ: cannot connect"),
        "{}",
        foreman.log_text()
    );
    let listed: Value = serde_json::from_str(&home.ok(&["monitor", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["last_status"], "ok");
    // Invariant 6 with RabbitMQ: retrying the connection again and again adds no thread
    // (4 workers + 4 of the foreman's own + at most 5 for RabbitMQ, src/foreman.rs).
    let mut attempts = std::collections::BTreeSet::new();
    assert!(wait_until(Duration::from_secs(15), || {
        let at: i64 = home
            .conn()
            .query_row("SELECT updated_at FROM sink_status", [], |r| r.get(0))
            .unwrap();
        attempts.insert(at);
        attempts.len() >= 4
    }));
    assert!(foreman.threads() <= 13, "{} threads", foreman.threads());
    let text = home.ok(&["status"]);
    assert!(text.contains("results: RabbitMQ, disconnected"), "{text}");
}

#[test]
fn a_malformed_url_is_bad_input() {
    let home = Home::new();
    let out = home.snapq(&["run", "--amqp-url", "http://127.0.0.1:5672"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an amqp:// URL"));
}

/// A consumer of `raw_data` under one binding, collecting in a thread of its own.
struct Consumer {
    got: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Consumer {
    fn start(binding: &str) -> Consumer {
        use std::sync::atomic::Ordering;
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let thread = {
            let (got, stop, binding) = (got.clone(), stop.clone(), binding.to_owned());
            std::thread::spawn(move || {
                let broker = TestBroker::connect();
                let consumer = broker.subscribe("raw_data", &binding);
                ready_tx.send(()).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(d) = consumer.recv_timeout(Duration::from_millis(50)) {
                        got.lock()
                            .unwrap()
                            .push(serde_json::from_slice(&d.body).unwrap());
                    }
                }
            })
        };
        ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Consumer {
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn messages(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loopback TCP proxy to the broker that can cut every connection and refuse new ones.
pub struct Proxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    streams: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start() -> Proxy {
        Proxy::start_to(5672)
    }

    /// A proxy to the broker listening on 127.0.0.1:`upstream_port`.
    pub fn start_to(upstream_port: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let streams = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let (cut, streams) = (cut.clone(), streams.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    if cut.load(Ordering::SeqCst) {
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        continue;
                    }
                    let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", upstream_port))
                    else {
                        continue;
                    };
                    let mut all = streams.lock().unwrap();
                    all.push(client.try_clone().unwrap());
                    all.push(upstream.try_clone().unwrap());
                    for (mut from, mut to) in [
                        (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                        (upstream, client),
                    ] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            });
        }
        Proxy { port, cut, streams }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts every connection through the proxy and refuses new ones until `restore`.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

pub fn outbox_depth(home: &Home) -> i64 {
    home.conn()
        .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
        .unwrap()
}

/// started_at of each delivered result, first deliveries only (delivery is at least once).
pub fn first_deliveries(messages: &[Value]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    messages
        .iter()
        .map(|m| m["started_at"].as_str().unwrap().to_owned())
        .filter(|s| seen.insert(s.clone()))
        .collect()
}

/// A broker outage, whatever the broker: `args` start a foreman publishing through
/// `proxy`, `delivered` reads what a consumer of the monitor's results got. Checks that
/// results pile up while the proxy is cut, then all arrive, in order.
pub fn outage_loses_nothing(
    args: &[&str],
    proxy: &Proxy,
    monitor: &str,
    delivered: &dyn Fn() -> Vec<Value>,
    while_cut: &dyn Fn(&Home),
) -> Foreman {
    let home = Home::new();
    let web = FakeServer::start(Mode::Text("ok\n".into()));
    let foreman = home.start(args);
    crate::monitors::add(&home, "http", monitor, json!({"url": web.url()}), "0.1");
    assert!(wait_until(Duration::from_secs(10), || delivered().len() >= 3));

    proxy.cut();
    // Results pile up in the outbox while the broker is out of reach.
    assert!(
        wait_until(Duration::from_secs(10), || outbox_depth(&home) >= 10),
        "the outbox did not grow:\n{}",
        home.ok(&["status"])
    );
    while_cut(&home);
    let during = delivered().len();
    std::thread::sleep(Duration::from_secs(1));
    proxy.restore();
    assert!(
        wait_until(Duration::from_secs(30), || outbox_depth(&home) == 0
            && delivered().len() > during + 10),
        "the backlog was not delivered:\n{}\n{}",
        home.ok(&["status"]),
        foreman.log_text()
    );
    home.ok(&["monitor", "remove", monitor]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(outbox_depth(&home), 0);
    std::thread::sleep(Duration::from_millis(500));

    let delivered = first_deliveries(&delivered());
    // In the order the rounds ran.
    let mut sorted = delivered.clone();
    sorted.sort();
    assert_eq!(delivered, sorted, "results arrived out of order");
    // Every round's result arrived: one request to the server per round, less at most the
    // one round running when the monitor was removed (its result is discarded).
    let rounds = web.hits();
    assert!(
        delivered.len() + 1 >= rounds && delivered.len() <= rounds,
        "{} results delivered for {rounds} rounds",
        delivered.len()
    );
    foreman
}

#[test]
fn a_broker_outage_loses_no_result_and_keeps_their_order() {
    let proxy = Proxy::start();
    let name = format!("outage-{}", std::process::id());
    let consumer = Consumer::start(&format!("http.{name}"));
    let foreman = outage_loses_nothing(
        &["--amqp-url", &proxy.url()],
        &proxy,
        &name,
        &|| consumer.messages(),
        &|_| {},
    );
    assert!(foreman.has_log("RabbitMQ: connected"));
}

/// A kill -9 with results waiting in the outbox, whatever the broker: they are all
/// delivered by the next foreman, first and in order.
pub fn kill_9_loses_nothing(
    args: &[&str],
    proxy: &Proxy,
    monitor: &str,
    delivered: &dyn Fn() -> Vec<Value>,
) {
    let home = Home::new();
    let web = FakeServer::start(Mode::Text("ok\n".into()));
    proxy.cut();
    let mut first = home.start(args);
    crate::monitors::add(&home, "http", monitor, json!({"url": web.url()}), "0.1");
    assert!(wait_until(Duration::from_secs(10), || outbox_depth(&home) >= 5));
    first.kill9();
    let waiting: Vec<String> = {
        let conn = home.conn();
        let mut stmt = conn.prepare("SELECT body FROM outbox ORDER BY id").unwrap();
        stmt.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|b| {
                serde_json::from_str::<Value>(&b.unwrap()).unwrap()["started_at"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    assert!(waiting.len() >= 5);
    proxy.restore();
    let _second = home.start(args);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let got = first_deliveries(&delivered());
            waiting.iter().all(|w| got.contains(w))
        }),
        "results from before the kill were not delivered"
    );
    // And in their order, ahead of the new ones.
    let got = first_deliveries(&delivered());
    assert_eq!(&got[..waiting.len()], &waiting[..]);
}

#[test]
fn results_waiting_in_the_outbox_survive_kill_9() {
    let proxy = Proxy::start();
    let name = format!("kill-{}", std::process::id());
    let consumer = Consumer::start(&format!("http.{name}"));
    kill_9_loses_nothing(&["--amqp-url", &proxy.url()], &proxy, &name, &|| {
        consumer.messages()
    });
}

/// Collects messages on `health_check` / `heartbeat.manager`.
fn heartbeats_while(within: Duration, during: impl FnOnce(&TestBroker)) -> Vec<(Instant, Value)> {
    let broker = TestBroker::connect();
    let consumer = broker.subscribe("health_check", "heartbeat.manager");
    during(&broker);
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while let Ok(d) = consumer.recv_deadline(deadline) {
        got.push((Instant::now(), serde_json::from_slice(&d.body).unwrap()));
    }
    got
}

#[test]
fn heartbeats_come_periodically_and_in_answer_to_a_ping() {
    let home = Home::new();
    let mut foreman = home.start(&["--amqp-url", BROKER, "--heartbeat-interval", "0.5"]);
    home.ok(&[
        "monitor",
        "add",
        "system",
        "host",
        "--interval",
        "60",
        "--config",
        "{}",
    ]);
    let ours = |beats: Vec<(Instant, Value)>| -> Vec<(Instant, Value)> {
        beats
            .into_iter()
            .filter(|(_, b)| b["pid"] == foreman.pid())
            .collect()
    };
    let periodic = ours(heartbeats_while(Duration::from_millis(2200), |_| {}));
    assert!(
        periodic.len() >= 3,
        "{} heartbeats in 2.2 s at 0.5 s",
        periodic.len()
    );
    // The last one: the first may have gone out on connecting, before the monitor existed.
    let beat = &periodic[periodic.len() - 1].1;
    assert_eq!(beat["component_name"], "snapq");
    assert!(
        beat["running_processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "host"),
        "{beat}"
    );
    assert_eq!(beat["dead_processes"], json!([]));
    assert!(beat["timestamp"].as_f64().unwrap() > 1.7e9);
    assert!(beat["uptime"].as_f64().unwrap() >= 0.0);
    assert!(beat["due"].is_i64() && beat["running"].is_i64());
    foreman.stop();

    // With a long interval, only a ping brings a heartbeat soon.
    let broker = TestBroker::connect();
    let consumer = broker.subscribe("health_check", "heartbeat.manager");
    let foreman = home.start(&["--amqp-url", BROKER, "--heartbeat-interval", "3600"]);
    let pid = foreman.pid();
    let next_ours = |within: Duration| -> Option<Value> {
        let deadline = Instant::now() + within;
        while let Ok(d) = consumer.recv_deadline(deadline) {
            let beat: Value = serde_json::from_slice(&d.body).unwrap();
            if beat["pid"] == pid {
                return Some(beat);
            }
        }
        None
    };
    // The heartbeat sent on connecting.
    assert!(
        next_ours(Duration::from_secs(10)).is_some(),
        "no heartbeat on connecting"
    );
    broker.publish("health_check", "ping", b"ping");
    assert!(
        next_ours(Duration::from_secs(1)).is_some(),
        "no heartbeat within 1 s of a ping"
    );
}

#[test]
fn the_outbox_is_capped_and_says_what_it_dropped() {
    let home = Home::new();
    let web = FakeServer::start(Mode::Text("ok\n".into()));
    // Nothing listens on port 1: the broker stays unreachable.
    let foreman = home.start(&[
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "--outbox-cap",
        "5",
    ]);
    home.ok(&[
        "monitor",
        "add",
        "http",
        "w",
        "--interval",
        "0.1",
        "--config",
        &json!({"url": web.url()}).to_string(),
    ]);
    assert!(wait_until(Duration::from_secs(10), || {
        let s: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
        s["sink"]["dropped"].as_i64().unwrap() >= 5
    }));
    let status: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert!(
        status["sink"]["outbox_depth"].as_i64().unwrap() <= 5,
        "{status}"
    );
    assert!(outbox_depth(&home) <= 5);
    assert!(
        foreman.has_log("the outbox is full"),
        "{}",
        foreman.log_text()
    );
    // An unreachable broker is reported like wrong credentials: in the log and in status.
    assert_eq!(status["sink"]["state"], "disconnected");
    assert!(
        status["sink"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("cannot connect"),
        "{status}"
    );
    assert!(
        foreman.has_log("RabbitMQ: cannot connect"),
        "{}",
        foreman.log_text()
    );
    assert!(home.ok(&["status"]).contains("dropped at the cap"));
}

/// Issue 14, item 3: after each round, the worker heartbeat PANIC's monitors send
/// (alerter/src/monitors/node/chainlink.py, `_monitor`; routing key `heartbeat.worker`,
/// alerter/src/utils/constants/rabbitmq.py); and a monitor whose rounds stopped coming is
/// in the manager heartbeat's `dead_processes`.
#[test]
fn worker_heartbeats_follow_rounds_and_stuck_monitors_are_dead() {
    let home = Home::new();
    let web = FakeServer::start(Mode::Text("ok\n".into()));
    let silent = FakeServer::start(Mode::Silent);
    let ok_name = format!("beat-ok-{}", std::process::id());
    let stuck_name = format!("beat-stuck-{}", std::process::id());
    let broker = TestBroker::connect();
    let workers = broker.subscribe("health_check", "heartbeat.worker");
    let managers = broker.subscribe("health_check", "heartbeat.manager");
    let foreman = home.start(&["--amqp-url", BROKER, "--heartbeat-interval", "0.5"]);
    let add = |name: &str, config: Value| {
        home.ok(&[
            "monitor",
            "add",
            "http",
            name,
            "--interval",
            "1",
            "--config",
            &config.to_string(),
        ]);
    };
    add(&ok_name, json!({"url": web.url()}));
    add(&stuck_name, json!({"url": silent.url(), "timeout": 30}));

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut beat = None;
    while beat.is_none() && Instant::now() < deadline {
        let Ok(d) = workers.recv_deadline(deadline) else {
            break;
        };
        let b: Value = serde_json::from_slice(&d.body).unwrap();
        if b["component_name"] == ok_name.as_str() {
            beat = Some(b);
        }
    }
    let beat = beat.unwrap_or_else(|| panic!("no worker heartbeat:\n{}", foreman.log_text()));
    assert_eq!(beat["is_alive"], true, "{beat}");
    assert!(beat["timestamp"].as_f64().unwrap() > 1.7e9, "{beat}");
    assert_eq!(beat.as_object().unwrap().len(), 3, "{beat}");

    // The stuck monitor's first round never ends: after 3 intervals and the slack it is
    // dead, while the other stays running.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = Value::Null;
    let found = loop {
        let Ok(d) = managers.recv_deadline(deadline) else {
            break false;
        };
        last = serde_json::from_slice(&d.body).unwrap();
        if last["pid"] != foreman.pid() {
            continue;
        }
        let dead = last["dead_processes"].as_array().unwrap();
        if dead.iter().any(|p| p == stuck_name.as_str()) {
            break true;
        }
    };
    assert!(found, "{stuck_name} never dead: {last}");
    let running = last["running_processes"].as_array().unwrap();
    assert!(running.iter().any(|p| p == ok_name.as_str()), "{last}");
    assert!(!running.iter().any(|p| p == stuck_name.as_str()), "{last}");
}
