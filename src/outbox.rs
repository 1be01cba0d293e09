//! The broker sink (SPEC "Monitors", issue 4), behind the `Sink` trait, whatever the broker
//! (src/brokers/: RabbitMQ, MQTT).
//!
//! A round's result is first written to the `outbox` table, in the transaction that records
//! the round (`OutboxSink::stage`). The publisher thread (`snapq-<broker>`) owns one
//! long-lived connection (a `Link` of the broker's kind): it sends outbox rows in id order,
//! durably, and deletes rows only once the broker confirmed them (RabbitMQ's publisher
//! confirms, MQTT's PUBACK at QoS 1). A broker that is down, restarted or cut off costs
//! nothing but a growing outbox: the thread notices the loss by the connection's own
//! errors (a failed publish, the connection closing, no confirm within
//! `CONFIRM_TIMEOUT`), reconnects with backoff and sends the backlog in order. Delivery is
//! at least once: a message whose confirm was lost with the connection is sent again.
//!
//! Message shapes follow PANIC's (src/panic.rs), so its consumers can read them: a
//! Chainlink round on `raw_data` / `node.chainlink`, other kinds on `raw_data` /
//! `<kind>.<monitor>` as snapq's own result object, heartbeats on `health_check`. Each
//! broker kind maps (exchange, routing key) to its own addressing.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use rusqlite::{Connection, Transaction, params};
use serde_json::{Value, json};

use crate::brokers::{BrokerKind, Plan};
use crate::clock::now_micros;
use crate::db::{self, Synchronous};
use crate::error::{Error, Result};
use crate::monitor::RoundResult;
use crate::panic::{NodeNames, message_for, node_names, worker_heartbeats};
use crate::rabbitmq::{Backoff, redact};
use crate::sink::Sink;

/// Where round results go (PANIC's name).
pub const RESULTS_EXCHANGE: &str = "raw_data";
/// Where heartbeats go (PANIC's name).
pub const HEALTH_EXCHANGE: &str = "health_check";
/// PANIC's routing key for its workers' (monitors') heartbeats on `health_check`.
pub const WORKER_HEARTBEAT: &str = "heartbeat.worker";
/// A monitor whose last round started more than this many intervals ago (and more than
/// `DEAD_SLACK` past the last of them) is dead in the manager heartbeat.
const DEAD_AFTER_INTERVALS: i64 = 3;
const DEAD_SLACK_MICROS: i64 = 2_000_000;
/// How long the publisher waits for the broker to confirm a batch.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Outbox rows sent before waiting for their confirms.
const BATCH: i64 = 1024;

/// Stages results into the outbox and pokes the publisher after commit.
pub struct OutboxSink {
    /// The broker kind's name: its row in `sink_status`.
    sink: &'static str,
    /// Capacity one: a poke waiting means "look at the outbox", more would repeat it.
    poke: Sender<()>,
    staged: bool,
    /// The most rows the outbox keeps; past it the oldest are dropped (and counted).
    cap: i64,
    /// Whether the last stage found the outbox at its cap (to warn once per episode).
    capped: bool,
}

impl Sink for OutboxSink {
    fn stage(&mut self, tx: &Transaction<'_>, result: &RoundResult) -> Result<()> {
        let names = if result.kind == "chainlink_node" {
            node_names(tx, &result.monitor)
        } else {
            NodeNames::default()
        };
        let (routing_key, body) = message_for(result, &names);
        tx.prepare_cached(
            "INSERT INTO outbox (exchange, routing_key, body, created_at) VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut s| {
            s.execute(params![
                RESULTS_EXCHANGE,
                routing_key,
                body.to_string(),
                now_micros()
            ])
        })
        .map_err(Error::sqlite("adding a result to the outbox"))?;
        self.staged = true;
        // Rows leave the outbox oldest first, so its ids are contiguous and the span of
        // ids is its depth (two index lookups, whatever the depth).
        let dropped = tx
            .prepare_cached("DELETE FROM outbox WHERE id <= (SELECT max(id) FROM outbox) - ?1")
            .and_then(|mut s| s.execute([self.cap]))
            .map_err(Error::sqlite("trimming the outbox"))?;
        if dropped > 0 {
            tx.execute(
                "UPDATE sink_status SET dropped = dropped + ?1 WHERE sink = ?2",
                params![dropped as i64, self.sink],
            )
            .map_err(Error::sqlite("counting dropped results"))?;
            if !self.capped {
                tracing::warn!(
                    cap = self.cap,
                    "the outbox is full (the broker unreachable?): dropping its oldest results; \
                     raise --outbox-cap or bring the broker back"
                );
            }
        }
        self.capped = dropped > 0;
        Ok(())
    }

    fn committed(&mut self) -> Result<()> {
        if std::mem::take(&mut self.staged) {
            let _ = self.poke.try_send(());
        }
        Ok(())
    }

    fn rolled_back(&mut self) {
        // The outbox rows went with the transaction; nothing to send.
        self.staged = false;
    }
}

/// The running publisher; stopping it ends its thread (rows stay in the outbox).
pub struct OutboxPublisher {
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for OutboxPublisher {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts the publisher thread for `url` on the broker `kind` (chosen by the URL's
/// scheme, src/brokers/mod.rs), which also sends heartbeats every `heartbeat_interval`
/// and in answer to a `ping`. A broker that cannot be reached is not an error here: the
/// publisher retries, and says so in the log and in `snapq status`.
pub fn start(
    kind: &'static dyn BrokerKind,
    url: &str,
    db_path: PathBuf,
    heartbeat_interval: Duration,
    outbox_cap: u64,
) -> Result<(OutboxSink, OutboxPublisher)> {
    let conn = db::open(&db_path, Synchronous::Normal)?;
    // One sink at a time: a row of another broker is an earlier run's.
    conn.execute("DELETE FROM sink_status WHERE sink <> ?1", [kind.name()])
        .map_err(Error::sqlite("clearing an earlier sink's state"))?;
    set_state(&conn, kind, "connecting", &redact(url));
    let (poke_tx, poke_rx) = bounded(1);
    let (stop_tx, stop_rx) = bounded(1);
    let url = url.to_owned();
    let thread = std::thread::Builder::new()
        .name(format!("snapq-{}", kind.name()))
        .spawn(move || {
            publish_loop(&Publishing {
                kind,
                url: &url,
                conn: &conn,
                poke: &poke_rx,
                stop: &stop_rx,
                heartbeat_interval,
            });
        })
        .map_err(|e| Error::Runtime(format!("cannot start the publisher thread: {e}")))?;
    Ok((
        OutboxSink {
            sink: kind.name(),
            poke: poke_tx,
            staged: false,
            cap: i64::try_from(outbox_cap).unwrap_or(i64::MAX),
            capped: false,
        },
        OutboxPublisher {
            stop: stop_tx,
            thread: Some(thread),
        },
    ))
}

fn set_state(conn: &Connection, kind: &dyn BrokerKind, state: &str, detail: &str) {
    let result = conn.execute(
        "INSERT INTO sink_status (sink, state, detail, updated_at) VALUES (?4, ?1, ?2, ?3) \
         ON CONFLICT (sink) DO UPDATE SET state = ?1, detail = ?2, updated_at = ?3",
        params![state, detail, now_micros(), kind.name()],
    );
    if let Err(e) = result {
        tracing::warn!("could not record the {} sink's state: {e}", kind.title());
    }
}

/// What the publisher thread works with.
struct Publishing<'a> {
    kind: &'a dyn BrokerKind,
    url: &'a str,
    conn: &'a Connection,
    /// Rows were committed to the outbox.
    poke: &'a Receiver<()>,
    /// The foreman is done: stop (rows stay in the outbox).
    stop: &'a Receiver<()>,
    heartbeat_interval: Duration,
}

fn publish_loop(p: &Publishing<'_>) {
    let Publishing {
        kind,
        url,
        conn,
        stop,
        ..
    } = *p;
    let mut backoff = Backoff::new();
    let mut last_error = String::new();
    loop {
        let mut connected = false;
        let outcome = session(p, &mut connected);
        if connected {
            // A connection that worked starts the backoff and the error log afresh.
            backoff.reset();
            last_error.clear();
        }
        match outcome {
            Ok(()) => return,
            Err(e) => {
                if e != last_error {
                    tracing::error!(
                        broker = %redact(url),
                        "{}: {e}; results wait in the outbox, retrying in {:.1} s",
                        kind.title(),
                        backoff.wait().as_secs_f64()
                    );
                    last_error = e.clone();
                }
                set_state(conn, kind, "disconnected", &e);
            }
        }
        if stop.recv_timeout(backoff.wait()).is_ok() {
            return;
        }
        backoff.failed();
    }
}

/// One connection's life: connect, declare, then send heartbeats and the outbox until an
/// error or stop. Returns Ok only when asked to stop; sets `connected` once it was.
fn session(p: &Publishing<'_>, connected: &mut bool) -> Result<(), String> {
    let Publishing {
        kind,
        url,
        conn,
        poke,
        stop,
        heartbeat_interval,
    } = *p;
    // PANIC's health checker sends `ping` on health_check and waits for heartbeats.
    let broker = kind.connect(
        url,
        &Plan {
            exchanges: &[RESULTS_EXCHANGE, HEALTH_EXCHANGE],
            ping: (HEALTH_EXCHANGE, "ping"),
        },
    )?;
    let pings = broker.pings();
    tracing::info!(broker = %redact(url), "{}: connected", kind.title());
    set_state(conn, kind, "connected", &redact(url));
    *connected = true;
    let mut next_heartbeat = Instant::now();
    // One batch in flight while the next is read and sent: its last outbox id and its
    // confirms. Rows are deleted only once their own batch is confirmed, in order; a
    // failure drops both batches' confirms and the next connection sends from the oldest
    // row still in the outbox. `sent` is the last id handed to the broker.
    let mut in_flight: Option<(i64, Box<dyn crate::brokers::InFlight + '_>)> = None;
    let mut sent: i64 = 0;
    let settle = |batch: Option<(i64, Box<dyn crate::brokers::InFlight + '_>)>| {
        let Some((last_id, confirms)) = batch else {
            return Ok(());
        };
        confirms.wait(CONFIRM_TIMEOUT)?;
        conn.execute("DELETE FROM outbox WHERE id <= ?1", [last_id])
            .map(drop)
            .map_err(|e| format!("removing confirmed rows from the outbox: {e}"))
    };
    let result = (|| loop {
        if stop.try_recv().is_ok() {
            return Ok(());
        }
        if let Ok(error) = broker.errors().try_recv() {
            return Err(error);
        }
        let pinged = pings.try_recv().is_ok();
        if pinged || Instant::now() >= next_heartbeat {
            let body = heartbeat(conn).to_string();
            broker.publish_confirmed(
                &[(HEALTH_EXCHANGE, "heartbeat.manager", &body)],
                CONFIRM_TIMEOUT,
            )?;
            if !pinged {
                next_heartbeat = Instant::now() + heartbeat_interval;
            }
        }
        let rows = pending(conn, sent).map_err(|e| format!("reading the outbox: {e}"))?;
        let Some(&(last_id, ..)) = rows.last() else {
            if in_flight.is_some() {
                settle(in_flight.take())?;
                continue;
            }
            // Nothing to send: wait for a poke, a ping, a stop, a connection error, the next
            // heartbeat, or a second (a safety net).
            let wait = next_heartbeat
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            crossbeam_channel::select! {
                recv(poke) -> _ => {},
                recv(pings) -> ping => {
                    if ping.is_ok() {
                        // Answered at the top of the loop.
                        next_heartbeat = Instant::now();
                    }
                },
                recv(broker.errors()) -> error => {
                    if let Ok(error) = error {
                        return Err(error);
                    }
                },
                recv(stop) -> _ => return Ok(()),
                default(wait) => {},
            }
            continue;
        };
        // After each round's result, the worker heartbeat PANIC's monitors send after each
        // of theirs (its health checker takes a monitor that stops sending them for dead):
        // one per monitor of the batch.
        let worker_beats = worker_heartbeats(
            rows.iter()
                .filter(|(_, exchange, ..)| exchange == RESULTS_EXCHANGE)
                .map(|(.., body)| body.as_str()),
        );
        let messages: Vec<_> = rows
            .iter()
            .map(|(_, exchange, key, body)| (exchange.as_str(), key.as_str(), body.as_str()))
            .chain(
                worker_beats
                    .iter()
                    .map(|beat| (HEALTH_EXCHANGE, WORKER_HEARTBEAT, beat.as_str())),
            )
            .collect();
        let confirms = broker.publish(&messages, CONFIRM_TIMEOUT)?;
        sent = last_id;
        settle(in_flight.replace((last_id, confirms)))?;
    })();
    drop(in_flight);
    broker.close();
    result
}

/// The heartbeat of PANIC's managers, plus snapq's own figures. The "processes" of a
/// snapq foreman are its enabled monitors: running while their rounds come, dead when the
/// last one started more than `DEAD_AFTER_INTERVALS` intervals (and `DEAD_SLACK_MICROS`)
/// ago — a round stuck past its interval, or a foreman too busy to start them.
fn heartbeat(conn: &Connection) -> Value {
    let pid = std::process::id();
    let (running, started_at): (i64, i64) = conn
        .query_row(
            "SELECT running, started_at FROM foremen WHERE pid = ?1",
            [pid],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap_or((0, now_micros()));
    let due = crate::queue::count_due_capped(conn, now_micros(), crate::telemetry::DUE_COUNT_CAP)
        .unwrap_or(-1);
    let now = now_micros();
    let monitors: Vec<(String, bool)> = conn
        .prepare_cached(
            "SELECT name, coalesce(last_run_at, created_at) < ?1 - ?2 * interval_us - ?3 \
             FROM monitors WHERE enabled = 1 ORDER BY name",
        )
        .and_then(|mut s| {
            s.query_map(params![now, DEAD_AFTER_INTERVALS, DEAD_SLACK_MICROS], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect()
        })
        .unwrap_or_default();
    let (dead, alive): (Vec<_>, Vec<_>) = monitors.into_iter().partition(|(_, dead)| *dead);
    let names = |list: Vec<(String, bool)>| list.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    json!({
        "component_name": "snapq",
        "running_processes": names(alive),
        "dead_processes": names(dead),
        "timestamp": now as f64 / 1e6,
        "pid": pid,
        "uptime": (now - started_at).max(0) as f64 / 1e6,
        "due": due,
        "running": running,
    })
}

type Row = (i64, String, String, String);

/// The next batch of rows after id `after`, oldest first.
fn pending(conn: &Connection, after: i64) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, exchange, routing_key, body FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map([after, BATCH], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })?;
    rows.collect()
}

/// The broker sink's figures for `snapq status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SinkStatus {
    /// `file`, or the broker kind's name (`amqp`, `mqtt`).
    pub kind: String,
    /// What people call that broker ("RabbitMQ"); absent for the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    pub state: Option<String>,
    pub detail: Option<String>,
    pub outbox_depth: i64,
    pub oldest_unsent_age_seconds: Option<f64>,
    /// Results dropped because the outbox was at its cap.
    pub dropped: i64,
}

pub fn status(conn: &Connection) -> Result<SinkStatus> {
    let (sink, state, detail, dropped): (String, Option<String>, Option<String>, i64) = conn
        .query_row(
            "SELECT sink, state, detail, dropped FROM sink_status ORDER BY updated_at DESC",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(("file".into(), None, None, 0)),
            e => Err(e),
        })
        .map_err(Error::sqlite("reading the sink's state"))?;
    let (depth, oldest): (i64, Option<i64>) = conn
        .query_row("SELECT count(*), min(created_at) FROM outbox", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(Error::sqlite("reading the outbox"))?;
    Ok(SinkStatus {
        broker: crate::brokers::by_name(&sink).map(|k| k.title().to_owned()),
        kind: sink,
        state,
        detail,
        outbox_depth: depth,
        oldest_unsent_age_seconds: oldest.map(|t| (now_micros() - t).max(0) as f64 / 1e6),
        dropped,
    })
}

/// Forgets the broker sink's state (a foreman writing to the results file).
pub fn clear_state(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM sink_status", [])
        .map(drop)
        .map_err(Error::sqlite("clearing the sink's state"))
}
