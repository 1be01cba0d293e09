//! Results through the broker outbox (issue 4): `cargo bench --bench amqp`, with the
//! broker at 127.0.0.1:5672 (guest/guest); `SNAPQ_BENCH_BROKER_URL=mqtt://127.0.0.1:1883
//! cargo bench --bench amqp` for MQTT (Mosquitto).
//!
//! - Throughput: 20,000 results staged into the outbox (in transactions of 100, as the
//!   foreman records finished rounds), timed until the publisher has had every one
//!   confirmed by the broker and removed from the outbox.
//! - Latency: 200 single results, each timed from its commit (the end of the round) to its
//!   row leaving the outbox (the broker's confirm), polling every 50 µs.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use snapq::db::{self, Synchronous};
use snapq::monitor::RoundResult;
use snapq::sink::Sink;

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const RESULTS: usize = 20_000;
const SINGLES: usize = 200;

fn result(i: usize) -> RoundResult {
    RoundResult {
        monitor: format!("bench-{}", i % 100),
        kind: "http".into(),
        version: 1,
        ok: true,
        started_at: snapq::clock::format_micros(snapq::clock::now_micros()),
        duration_ms: 1.0,
        data: Some(
            serde_json::json!({"url": "http://127.0.0.1/health", "status": 200, "latency_ms": 0.4, "bytes": 3}),
        ),
        error: None,
        panic: None,
    }
}

fn depth(conn: &rusqlite::Connection) -> i64 {
    conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
        .unwrap()
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-amqp");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db_path = dir.join("snapq.sqlite3");
    let mut conn = db::open(&db_path, Synchronous::Normal).unwrap();
    // The same outbox and publisher whatever the broker: SNAPQ_BENCH_BROKER_URL picks it
    // (mqtt://127.0.0.1:1883 for Mosquitto).
    let url = std::env::var("SNAPQ_BENCH_BROKER_URL").unwrap_or_else(|_| BROKER.to_owned());
    let kind = snapq::brokers::for_url("SNAPQ_BENCH_BROKER_URL", &url).unwrap();
    println!("broker: {} at {url}", kind.title());
    let (mut sink, publisher) = snapq::outbox::start(
        kind,
        &url,
        db_path.clone(),
        Duration::from_secs(3600),
        1_000_000,
    )
    .unwrap();
    // Wait for the connection (its first heartbeat goes out first).
    let connected = Instant::now();
    while snapq::outbox::status(&conn).unwrap().state.as_deref() != Some("connected") {
        assert!(
            connected.elapsed() < Duration::from_secs(10),
            "no broker at {url}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let started = Instant::now();
    for batch in 0..RESULTS / 100 {
        let tx = conn.transaction().unwrap();
        for i in 0..100 {
            sink.stage(&tx, &result(batch * 100 + i)).unwrap();
        }
        tx.commit().unwrap();
        sink.committed().unwrap();
    }
    let staged = started.elapsed();
    while depth(&conn) > 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let all = started.elapsed();
    let rate = RESULTS as f64 / all.as_secs_f64();
    println!(
        "{RESULTS} results through the outbox, confirmed: {rate:.0}/s (staging alone {:.0}/s)  [target ≥ 5000/s: {}]",
        RESULTS as f64 / staged.as_secs_f64(),
        if rate >= 5000.0 { "met" } else { "MISSED" }
    );

    let mut latencies = Vec::with_capacity(SINGLES);
    for i in 0..SINGLES {
        std::thread::sleep(Duration::from_millis(5));
        let tx = conn.transaction().unwrap();
        sink.stage(&tx, &result(i)).unwrap();
        tx.commit().unwrap();
        let committed = Instant::now();
        sink.committed().unwrap();
        while depth(&conn) > 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
        latencies.push(committed.elapsed());
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "round end to broker confirm, {SINGLES} single results: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        ms(latencies[SINGLES / 2]),
        ms(latencies[SINGLES * 99 / 100]),
        ms(latencies[SINGLES - 1])
    );
    drop(publisher);
}
