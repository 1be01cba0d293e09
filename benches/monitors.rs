//! 1,000 `http` monitors every 10 s against one local server, for 60 s (issue 3):
//! `cargo bench --bench monitors`.
//!
//! The monitors are added through the library, their first rounds spread evenly over one
//! interval (as monitors added over time would be), and the real binary (`snapq run`, 4
//! workers, telemetry on) runs them against a keep-alive HTTP/1.1 server. `BENCH_ARGS`
//! adds arguments to `snapq run` (e.g. `BENCH_ARGS="--synchronous normal"`). Reported: peak RSS (VmHWM), CPU seconds used and as a
//! share of one core, rounds run, and how many started within 100 ms of their due time.
//! A round's due time is its monitor's first due time plus whole intervals: the schedule
//! is fixed-rate.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use snapq::db::{self, Synchronous};
use snapq::monitor::store;

const BIN: &str = env!("CARGO_BIN_EXE_snapq");
const MONITORS: usize = 1_000;
const INTERVAL: Duration = Duration::from_secs(10);
const RUN: Duration = Duration::from_secs(60);

fn main() {
    let home = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-monitors");
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let url = serve();

    let db_path = home.join("snapq.sqlite3");
    let conn = db::open(&db_path, Synchronous::Full).unwrap();
    let start = snapq::clock::now_micros() + 2_000_000;
    let spacing = INTERVAL.as_micros() as i64 / MONITORS as i64;
    let mut first_due = HashMap::new();
    for i in 0..MONITORS {
        let name = format!("web-{i:04}");
        store::add(&conn, "http", &name, &json!({ "url": url }), INTERVAL).unwrap();
        let due = start + i as i64 * spacing;
        conn.execute(
            "UPDATE monitors SET next_due = ?2 WHERE name = ?1",
            rusqlite::params![name, due],
        )
        .unwrap();
        first_due.insert(name, due);
    }
    drop(conn);

    println!("{MONITORS} http monitors every {INTERVAL:?} against {url}, for {RUN:?}");
    let mut child = Command::new(BIN)
        .args(["--home", home.to_str().unwrap(), "run", "--workers", "4"])
        .args(
            std::env::var("BENCH_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::sleep(RUN + Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // SAFETY: SIGTERM to our own child, which is still running.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    child.wait().unwrap();

    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks;
    let wall = (RUN + Duration::from_secs(2)).as_secs_f64();

    let mut rounds_by_monitor: HashMap<String, Vec<i64>> = HashMap::new();
    let mut failed = 0;
    for line in std::fs::read_to_string(home.join("results.jsonl"))
        .unwrap()
        .lines()
    {
        let r: Value = serde_json::from_str(line).unwrap();
        if r["ok"] != true {
            failed += 1;
        }
        let started = time::OffsetDateTime::parse(
            r["started_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        rounds_by_monitor
            .entry(r["monitor"].as_str().unwrap().to_owned())
            .or_default()
            .push((started.unix_timestamp_nanos() / 1_000) as i64);
    }
    let mut lateness_ms = Vec::new();
    for (name, mut starts) in rounds_by_monitor {
        starts.sort();
        let first = first_due[&name];
        for (k, started) in starts.iter().enumerate() {
            let due = first + k as i64 * INTERVAL.as_micros() as i64;
            lateness_ms.push((started - due) as f64 / 1e3);
        }
    }
    lateness_ms.sort_by(f64::total_cmp);
    let rounds = lateness_ms.len();
    let on_time = lateness_ms
        .iter()
        .filter(|l| (0.0..=100.0).contains(*l))
        .count();
    let early = lateness_ms.iter().filter(|l| **l < 0.0).count();
    let pct = |p: f64| lateness_ms[((rounds as f64 * p).ceil() as usize).clamp(1, rounds) - 1];
    let core_share = 100.0 * cpu / wall;
    println!(
        "peak RSS {:.1} MiB  [target ≤ 16 MiB: {}]",
        hwm_kib / 1024.0,
        if hwm_kib <= 16.0 * 1024.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "CPU {cpu:.2} s over {wall:.0} s = {core_share:.1}% of one core  [target ≤ 5%: {}]",
        if core_share <= 5.0 { "met" } else { "MISSED" }
    );
    println!(
        "rounds {rounds} (expected about {}), failed {failed}, started early {early}",
        MONITORS * (RUN.as_secs() / INTERVAL.as_secs()) as usize
    );
    println!(
        "started within 100 ms of due: {on_time} of {rounds} ({:.2}%); lateness p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        100.0 * on_time as f64 / rounds as f64,
        pct(0.5),
        pct(0.99),
        lateness_ms[rounds - 1]
    );
}

/// A minimal HTTP/1.1 server on 127.0.0.1 answering every request with a small 200 and
/// keeping connections alive, as web servers do.
fn serve() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                loop {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    // GET requests carry no body: drop this head, keep what follows.
                    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    head.drain(..end);
                    if stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}/health")
}
