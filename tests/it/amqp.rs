//! The RabbitMQ sink against the real broker on 127.0.0.1:5672 (`.ci/run` starts it).

use std::time::{Duration, Instant};

use amiquip::{
    Connection, ConsumerMessage, ConsumerOptions, ExchangeDeclareOptions, ExchangeType, FieldTable,
    QueueDeclareOptions,
};
use serde_json::{Value, json};

use crate::fake_http::{FakeServer, Mode, chainlink_metrics};
use crate::support::{Home, wait_until};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Collects the messages published on `raw_data` under `binding` for `within`, or until
/// `enough` of them came.
fn consume(
    binding: &str,
    enough: usize,
    within: Duration,
    during: impl FnOnce(),
) -> Vec<(String, Value)> {
    let mut connection = Connection::insecure_open(BROKER).expect("RabbitMQ at 127.0.0.1:5672");
    let channel = connection.open_channel(None).unwrap();
    let exchange = channel
        .exchange_declare(
            ExchangeType::Topic,
            "raw_data",
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
        )
        .unwrap();
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
        )
        .unwrap();
    queue
        .bind(&exchange, binding, FieldTable::default())
        .unwrap();
    let consumer = queue
        .consume(ConsumerOptions {
            no_ack: true,
            ..ConsumerOptions::default()
        })
        .unwrap();
    during();
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < enough {
        let Ok(message) = consumer.receiver().recv_deadline(deadline) else {
            break;
        };
        if let ConsumerMessage::Delivery(d) = message {
            let body: Value = serde_json::from_slice(&d.body).unwrap();
            assert_eq!(d.properties.delivery_mode(), &Some(2), "not persistent");
            got.push((d.routing_key.clone(), body));
        }
    }
    let _ = connection.close();
    got
}

#[test]
fn chainlink_results_reach_rabbitmq_in_panics_shape() {
    let home = Home::new();
    let node = FakeServer::start(Mode::Text(chainlink_metrics(4242)));
    let name = format!("cl-{}", std::process::id());
    let mut foreman = home.start(&["--amqp-url", BROKER]);
    let messages = consume("node.chainlink", 2, Duration::from_secs(10), || {
        home.ok(&[
            "monitor",
            "add",
            "chainlink_node",
            &name,
            "--interval",
            "0.3",
            "--config",
            &json!({"node_prometheus_urls": [node.url()]}).to_string(),
        ]);
    });
    let ours: Vec<&Value> = messages
        .iter()
        .filter(|(_, b)| b["prometheus"]["result"]["meta_data"]["monitor_name"] == name.as_str())
        .map(|(_, b)| b)
        .collect();
    assert!(
        !ours.is_empty(),
        "no message for {name}: {messages:?}\n{}",
        foreman.log_text()
    );
    let result = &ours[0]["prometheus"]["result"];
    assert_eq!(result["data"]["head_tracker_current_head"], 4242);
    assert_eq!(result["meta_data"]["last_source_used"], node.url());
    assert!(result["meta_data"]["time"].as_f64().unwrap() > 1.7e9);
    assert!(result["meta_data"]["node_name"].is_string());
    assert!(result["meta_data"]["node_id"].is_string());
    assert!(result["meta_data"]["node_parent_id"].is_string());
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
    let messages = consume(&key, 1, Duration::from_secs(10), || {
        home.ok(&[
            "monitor",
            "add",
            "http",
            &name,
            "--config",
            &json!({"url": web.url()}).to_string(),
        ]);
    });
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
