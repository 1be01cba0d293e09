//! PANIC's node configurations in over RabbitMQ (issue 14, item 4): snapq as PANIC's node
//! monitors manager.
//!
//! PANIC's config manager sends each chain's nodes configuration (its `nodes_config.ini`
//! as JSON: node id → section of string values) on the durable topic exchange `config`
//! under `chains.<base chain>.<sub chain>.nodes_config`. With `--panic-configs`, the
//! thread `snapq-panic-configs` consumes those messages from a durable queue bound with
//! `chains.*.*.nodes_config` (PANIC's own queue name by default, so messages sent while
//! snapq is down wait for it). For a Chainlink chain, the nodes in a message are the whole
//! truth about that chain: in one transaction, through the same store the CLI uses, a new
//! node starts a `chainlink_node` monitor, a changed one is updated (its next round, due
//! at once, uses the new config), and one missing from the message or with
//! `monitor_node` / `monitor_prometheus` false is removed. The monitors are marked as the
//! chain's (`managed_by`), so `monitor list` shows it and the CLI refuses to change them.
//!
//! Invariants, and why they hold:
//! - A message is acknowledged only after its transaction committed (or after it was
//!   found malformed, which changes nothing): a foreman killed in between leaves the
//!   message unacknowledged, and the broker hands it out again to the next consumer.
//!   Applying a message twice changes nothing the second time: it is a whole-truth
//!   replacement, not a delta.
//! - A malformed message (not JSON, not an object of sections, a missing or non-string
//!   key, a bad URL) is logged with what is wrong, counted in `snapq status`, acknowledged
//!   (sending it again would not mend it), and changes nothing: the whole message is
//!   checked before anything is written, and the writes share one transaction.
//! - A busy database is waited for (the message stays unacknowledged meanwhile); the
//!   thread stops within `RETRY` of the foreman's stop.
//! - Changes take effect within a second: after the commit the thread writes a wake file,
//!   exactly as `snapq monitor add` does, and the foreman reads the monitors at once.
//!
//! After each applied message and on each (re)connection, the managed Chainlink nodes are
//! published on the `monitorable` exchange under `chainlink.nodes`, as PANIC's managers
//! publish their monitorables (alerter/src/monitors/managers/manager.py).

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded, select};
use rusqlite::{Connection, params};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::clock::now_micros;
use crate::db::{self, Synchronous};
use crate::error::{Error, Result};
use crate::monitor::store::{self, Applied, Wanted};
use crate::rabbitmq::{Backoff, Broker, Incoming, redact};
use crate::wakeup::WakeDir;

/// PANIC's exchange for configurations.
pub const CONFIG_EXCHANGE: &str = "config";
/// PANIC's exchange for what its managers monitor.
pub const MONITORABLE_EXCHANGE: &str = "monitorable";
/// PANIC's binding for every chain's nodes configuration.
pub const NODES_CONFIG_BINDING: &str = "chains.*.*.nodes_config";
/// PANIC's node monitors manager's queue.
pub const DEFAULT_QUEUE: &str = "node_monitors_manager_configs_queue";
/// `managed_by` of the monitors a chain's configuration owns: this, then `<base> <sub>`.
const OWNER_PREFIX: &str = "panic:";
/// How long to wait before trying a busy database again, and the longest the thread
/// takes to notice a stop.
const RETRY: Duration = Duration::from_millis(200);
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// What the consumer needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub queue: String,
    /// Every managed monitor's interval.
    pub interval: Duration,
    /// Shown as `manager_name` in the monitorable list.
    pub manager_name: String,
    pub db: PathBuf,
    pub wakeup_dir: PathBuf,
    pub synchronous: Synchronous,
}

/// The running consumer; dropping it stops the thread and waits for it.
pub struct Consumer {
    /// Closed (dropped) to stop the thread.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Checks the settings and starts the consumer thread.
pub fn start(settings: Settings) -> Result<Consumer> {
    if settings.queue.is_empty() || settings.queue.len() > 255 {
        return Err(Error::bad_input(
            "--panic-configs-queue",
            "give a queue name of 1 to 255 bytes",
        ));
    }
    let conn = db::open(&settings.db, settings.synchronous)?;
    let wake = WakeDir::prepare(&settings.wakeup_dir)?;
    set_state(&conn, &settings.queue, "connecting", &redact(&settings.url));
    let (stop_tx, stop_rx) = bounded::<()>(0);
    let thread = std::thread::Builder::new()
        .name("snapq-panic-configs".into())
        .spawn(move || consume_loop(&settings, &conn, &wake, &stop_rx))
        .map_err(|e| Error::Runtime(format!("cannot start the PANIC configs thread: {e}")))?;
    Ok(Consumer {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Forgets the status of an earlier run that consumed configurations (this one does not).
pub fn clear_state(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM panic_configs_status", [])
        .map(drop)
        .map_err(Error::sqlite("clearing the PANIC configs status"))
}

/// Whether `stop` says to stop, waiting at most `wait` for it.
fn stopped(stop: &Receiver<()>, wait: Duration) -> bool {
    matches!(
        stop.recv_timeout(wait),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected)
    )
}

fn consume_loop(settings: &Settings, conn: &Connection, wake: &WakeDir, stop: &Receiver<()>) {
    let mut backoff = Backoff::new();
    loop {
        let broker = match connect(settings) {
            Ok(pair) => pair,
            Err(why) => {
                tracing::warn!(queue = %settings.queue, "PANIC configs: {why}; retrying in {:.1} s", backoff.wait().as_secs_f64());
                set_state(conn, &settings.queue, "disconnected", &why);
                if stopped(stop, backoff.wait()) {
                    return;
                }
                backoff.failed();
                continue;
            }
        };
        let (broker, deliveries) = broker;
        backoff.reset();
        set_state(conn, &settings.queue, "consuming", &redact(&settings.url));
        tracing::info!(queue = %settings.queue, "PANIC configs: consuming {NODES_CONFIG_BINDING}");
        publish_monitorables(&broker, conn, settings);
        let lost = loop {
            select! {
                recv(stop) -> _ => {
                    broker.close();
                    return;
                }
                recv(broker.errors()) -> e => break e.unwrap_or_else(|_| "the connection ended".into()),
                recv(deliveries) -> message => {
                    let Ok(message) = message else {
                        break "the consumer was cancelled".to_owned();
                    };
                    match handle(settings, conn, wake, &broker, &message, stop) {
                        Handled::Done => {}
                        Handled::Stopping => {
                            broker.close();
                            return;
                        }
                        Handled::Lost(why) => break why,
                    }
                }
            }
        };
        tracing::warn!(queue = %settings.queue, "PANIC configs: {lost}; reconnecting");
        set_state(conn, &settings.queue, "disconnected", &lost);
        broker.close();
        if stopped(stop, backoff.wait()) {
            return;
        }
    }
}

fn connect(settings: &Settings) -> std::result::Result<(Broker, Receiver<Incoming>), String> {
    let broker = Broker::connect(&settings.url)?;
    broker.declare_topic_exchange(CONFIG_EXCHANGE)?;
    broker.declare_topic_exchange(MONITORABLE_EXCHANGE)?;
    let deliveries =
        broker.consume_queue(&settings.queue, CONFIG_EXCHANGE, NODES_CONFIG_BINDING, 1)?;
    Ok((broker, deliveries))
}

enum Handled {
    Done,
    /// The foreman stops; the message stays unacknowledged.
    Stopping,
    /// The connection went before the message was acknowledged; it comes again.
    Lost(String),
}

fn handle(
    settings: &Settings,
    conn: &Connection,
    wake: &WakeDir,
    broker: &Broker,
    message: &Incoming,
    stop: &Receiver<()>,
) -> Handled {
    tracing::info!(routing_key = %message.routing_key, bytes = message.body.len(), "PANIC configs: received");
    count(conn, "received");
    let interval_us = i64::try_from(settings.interval.as_micros()).unwrap_or(i64::MAX);
    let outcome = match parse(&message.routing_key, &message.body, interval_us) {
        Err(why) => Err(why),
        Ok(None) => {
            tracing::info!(
                routing_key = %message.routing_key,
                "PANIC configs: not a Chainlink chain; snapq monitors Chainlink nodes only, ignored"
            );
            Ok(None)
        }
        Ok(Some((owner, wanted))) => loop {
            match apply(conn, &owner, &wanted) {
                Ok(applied) => break Ok(Some((owner, applied))),
                Err(Error::BadInput { what, message }) => break Err(format!("{what}: {message}")),
                Err(e) => {
                    tracing::warn!("PANIC configs: cannot apply {owner} yet ({e}); retrying");
                    if stopped(stop, RETRY) {
                        return Handled::Stopping;
                    }
                }
            }
        },
    };
    match &outcome {
        Err(why) => {
            tracing::warn!(
                routing_key = %message.routing_key,
                "PANIC configs: malformed message, acknowledged and ignored (nothing changed): {why}"
            );
            reject(conn, &format!("{}: {why}", message.routing_key));
        }
        Ok(Some((owner, applied))) => {
            wake.wake_after_commit("the configuration is");
            count(conn, "applied");
            tracing::info!(
                chain = owner.trim_start_matches(OWNER_PREFIX),
                started = ?applied.started,
                restarted = ?applied.restarted,
                stopped = ?applied.stopped,
                "PANIC configs: applied"
            );
        }
        Ok(None) => {}
    }
    if let Err(why) = broker.ack(message) {
        return Handled::Lost(why);
    }
    if matches!(outcome, Ok(Some(_))) {
        publish_monitorables(broker, conn, settings);
    }
    Handled::Done
}

/// Applies one chain's wanted monitors in one transaction.
fn apply(conn: &Connection, owner: &str, wanted: &[Wanted]) -> Result<Applied> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)
        .map_err(Error::sqlite("starting to apply a PANIC configuration"))?;
    let applied = store::apply_owned(&tx, owner, wanted)?;
    tx.commit()
        .map_err(Error::sqlite("committing a PANIC configuration"))?;
    Ok(applied)
}

/// A message's chain (`panic:<base> <sub>`) and the monitors it wants; `None` for a chain
/// that is not Chainlink. The error says what is wrong.
pub fn parse(
    routing_key: &str,
    body: &[u8],
    interval_us: i64,
) -> std::result::Result<Option<(String, Vec<Wanted>)>, String> {
    let parts: Vec<&str> = routing_key.split('.').collect();
    let [_, base, sub, _] = parts.as_slice() else {
        return Err(format!(
            "routing key {routing_key:?} is not chains.<base>.<sub>.nodes_config"
        ));
    };
    if !base.eq_ignore_ascii_case("chainlink") {
        return Ok(None);
    }
    let sections: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => map,
        Ok(other) => {
            return Err(format!(
                "the body is JSON but not an object of node sections: {}",
                short(&other.to_string())
            ));
        }
        Err(e) => return Err(format!("the body is not JSON: {e}")),
    };
    let mut wanted = Vec::new();
    for (key, section) in &sections {
        if key == "DEFAULT" {
            continue;
        }
        let section = section
            .as_object()
            .ok_or_else(|| format!("node {key:?}: not an object of string values"))?;
        let field = |name: &str| -> std::result::Result<&str, String> {
            match section.get(name) {
                Some(Value::String(s)) => Ok(s),
                Some(other) => Err(format!(
                    "node {key:?}: {name} must be a string, not {other}"
                )),
                None => Err(format!("node {key:?}: {name} is missing")),
            }
        };
        let flag = |name: &str| -> std::result::Result<bool, String> {
            let text = field(name)?;
            match text.to_ascii_lowercase().as_str() {
                "true" | "yes" | "y" => Ok(true),
                "false" | "no" | "n" => Ok(false),
                _ => Err(format!(
                    "node {key:?}: {name} must be \"true\" or \"false\", not {text:?}"
                )),
            }
        };
        let (id, parent_id, name, urls) = (
            field("id")?,
            field("parent_id")?,
            field("name")?,
            field("node_prometheus_urls")?,
        );
        let (monitor_node, monitor_prometheus) =
            (flag("monitor_node")?, flag("monitor_prometheus")?);
        let urls: Vec<&str> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let monitor = monitor_name(sub, key);
        let config = json!({
            "node_prometheus_urls": urls,
            "node_name": name,
            "node_id": id,
            "node_parent_id": parent_id,
        });
        let interval = Duration::from_micros(u64::try_from(interval_us).unwrap_or(0));
        if !(monitor_node && monitor_prometheus) {
            continue;
        }
        store::check_new("chainlink_node", &monitor, &config, interval)
            .map_err(|e| format!("node {key:?}: {e}"))?;
        wanted.push(Wanted {
            name: monitor,
            kind: "chainlink_node".into(),
            config,
            interval_us,
        });
    }
    Ok(Some((
        format!("{OWNER_PREFIX}{} {sub}", base.to_ascii_lowercase()),
        wanted,
    )))
}

/// The monitor of a node: `panic.<sub chain>.<node key>`, other characters as `_`.
fn monitor_name(sub: &str, key: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let name = format!("panic.{}.{}", clean(sub), clean(key));
    name.chars().take(200).collect()
}

fn short(text: &str) -> String {
    text.chars().take(80).collect()
}

/// Publishes the managed Chainlink nodes on `monitorable` / `chainlink.nodes`, as PANIC's
/// managers do: `{"manager_name", "sources": [{"chain_id", "chain_name", "source_id",
/// "source_name"}]}`. A failure is logged; the next applied message sends it again.
fn publish_monitorables(broker: &Broker, conn: &Connection, settings: &Settings) {
    let sources: Vec<Value> = match store::owned(conn, &format!("{OWNER_PREFIX}chainlink ")) {
        Ok(rows) => rows
            .into_iter()
            .map(|(owner, _, config)| {
                let sub = owner
                    .trim_start_matches(OWNER_PREFIX)
                    .split_once(' ')
                    .map_or("", |(_, sub)| sub)
                    .to_owned();
                json!({
                    "chain_id": config["node_parent_id"],
                    "chain_name": sub,
                    "source_id": config["node_id"],
                    "source_name": config["node_name"],
                })
            })
            .collect(),
        Err(e) => {
            tracing::warn!("PANIC configs: cannot read the managed monitors: {e}");
            return;
        }
    };
    let body = json!({"manager_name": settings.manager_name, "sources": sources}).to_string();
    if let Err(why) = broker.publish_confirmed(
        &[(MONITORABLE_EXCHANGE, "chainlink.nodes", &body)],
        PUBLISH_TIMEOUT,
    ) {
        tracing::warn!("PANIC configs: cannot publish the monitorable list: {why}");
    }
}

fn set_state(conn: &Connection, queue: &str, state: &str, detail: &str) {
    let result = conn.execute(
        "INSERT INTO panic_configs_status (id, queue, state, detail, updated_at) \
         VALUES (1, ?1, ?2, ?3, ?4) ON CONFLICT (id) DO UPDATE SET queue = ?1, state = ?2, \
         detail = ?3, updated_at = ?4",
        params![queue, state, detail, now_micros()],
    );
    if let Err(e) = result {
        tracing::warn!("PANIC configs: cannot record the state {state}: {e}");
    }
}

fn count(conn: &Connection, column: &str) {
    let sql = match column {
        "received" => "UPDATE panic_configs_status SET received = received + 1",
        _ => "UPDATE panic_configs_status SET applied = applied + 1",
    };
    if let Err(e) = conn.execute(sql, []) {
        tracing::warn!("PANIC configs: cannot count a message: {e}");
    }
}

fn reject(conn: &Connection, why: &str) {
    if let Err(e) = conn.execute(
        "UPDATE panic_configs_status SET rejected = rejected + 1, last_rejection = ?1",
        [why],
    ) {
        tracing::warn!("PANIC configs: cannot count a rejection: {e}");
    }
}

/// The consumer's line in `snapq status`.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigsStatus {
    pub queue: String,
    pub state: String,
    pub detail: String,
    pub received: i64,
    pub applied: i64,
    pub rejected: i64,
    pub last_rejection: Option<String>,
}

pub fn status(conn: &Connection) -> Result<Option<ConfigsStatus>> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT queue, state, detail, received, applied, rejected, last_rejection \
         FROM panic_configs_status",
        [],
        |r| {
            Ok(ConfigsStatus {
                queue: r.get(0)?,
                state: r.get(1)?,
                detail: r.get(2)?,
                received: r.get(3)?,
                applied: r.get(4)?,
                rejected: r.get(5)?,
                last_rejection: r.get(6)?,
            })
        },
    )
    .optional()
    .map_err(Error::sqlite("reading the PANIC configs status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, urls: &str, on: &str) -> Value {
        json!({"id": id, "parent_id": "chain_1", "name": format!("Node {id}"),
               "node_prometheus_urls": urls, "monitor_node": on, "monitor_prometheus": "true",
               "ethereum_addresses": "0x1"})
    }

    #[test]
    fn a_chains_message_becomes_its_monitors() {
        let body = json!({
            "DEFAULT": {},
            "node_1": node("node_1", "http://a:6688/metrics, http://b:6688/metrics", "true"),
            "node_2": node("node_2", "http://c:6688/metrics", "False"),
        });
        let (owner, wanted) = parse(
            "chains.chainlink.bsc.nodes_config",
            body.to_string().as_bytes(),
            10_000_000,
        )
        .unwrap()
        .unwrap();
        assert_eq!(owner, "panic:chainlink bsc");
        assert_eq!(wanted.len(), 1);
        assert_eq!(wanted[0].name, "panic.bsc.node_1");
        assert_eq!(
            wanted[0].config["node_prometheus_urls"],
            json!(["http://a:6688/metrics", "http://b:6688/metrics"])
        );
        assert_eq!(wanted[0].config["node_parent_id"], "chain_1");
        assert_eq!(
            parse("chains.cosmos.hub.nodes_config", b"{}", 1).unwrap(),
            None
        );
    }

    #[test]
    fn malformed_messages_say_what_is_wrong() {
        for (key, body, says) in [
            (
                "chains.chainlink.x.nodes_config",
                "nope".to_owned(),
                "not JSON",
            ),
            (
                "chains.chainlink.x.nodes_config",
                "[1]".to_owned(),
                "not an object",
            ),
            ("chainlink.nodes_config", "{}".to_owned(), "routing key"),
            (
                "chains.chainlink.x.nodes_config",
                json!({"n": {"id": "n"}}).to_string(),
                "parent_id is missing",
            ),
            (
                "chains.chainlink.x.nodes_config",
                json!({"n": node("n", "ftp://x", "true")}).to_string(),
                "node_prometheus_urls[0]",
            ),
            (
                "chains.chainlink.x.nodes_config",
                json!({"n": node("n", "http://x/metrics", "maybe")}).to_string(),
                "monitor_node must be",
            ),
        ] {
            let err = parse(key, body.as_bytes(), 1_000_000).unwrap_err();
            assert!(err.contains(says), "{body}: {err}");
        }
    }
}
