//! The core benchmark (issue 2): `cargo bench --bench core`.
//!
//! Reports, in one run:
//! - drain rate of 50,000 `noop` tasks by the real binary (`snapq run --burst`, 4 workers)
//!   with `--synchronous full` and `normal` (the median of three runs), its peak RSS and
//!   peak thread count;
//! - beside each, the raw SQLite claim rate with the same batch size and durability (the
//!   limit the foreman's loop can approach);
//! - the `normal` drain with telemetry on (the default) and `--no-telemetry`;
//! - wake-up latency (enqueue call → task start) p50/p99 over 200 single enqueues into an
//!   idle foreman, with the wake-up directory on disk and on tmpfs.
//!
//! - bulk enqueue of 200,000 lines through `snapq enqueue --file`, beside a raw insert of
//!   as many rows in one transaction; one `snapq enqueue` process, beside spawning `true`;
//!   inotify's create-to-wake latency through the notify crate (issue 6).
//!
//! - at most once beside at least once (issue 17): the same noop function drained by a
//!   foreman in this process, without and with a retry policy.
//!
//! Each figure is printed beside its target, with the gap when a target is missed.
#![allow(clippy::unwrap_used)]

#[path = "common/mod.rs"]
mod common;
use common::{run_ok, verdict};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use snapq::db::{self, Synchronous};
use snapq::foreman::{self, ForemanConfig};
use snapq::registry::{Registry, RetryPolicy, TaskSpec};
use snapq::{Enqueuer, NewTask};

const BIN: &str = env!("CARGO_BIN_EXE_snapq");
const TASKS: usize = 50_000;
const WORKERS: usize = 4;
const WAKEUPS: usize = 200;

fn main() {
    // `cargo bench` passes --bench; a filter argument is not supported.
    let scratch = scratch_dir();
    println!("snapq core benchmark ({} tasks, {WORKERS} workers)", TASKS);
    println!("scratch: {} (disk), /dev/shm (tmpfs)", scratch.display());
    println!();

    let mut peak_rss_kib = 0;
    for sync in [Synchronous::Normal, Synchronous::Full] {
        let target = match sync {
            Synchronous::Normal => 60_000.0,
            Synchronous::Full => 20_000.0,
        };
        let drain = drain(&scratch, sync, "warn", &[]);
        let limit = raw_claim_rate(&scratch, sync, WORKERS);
        peak_rss_kib = peak_rss_kib.max(drain.peak_rss_kib);
        println!(
            "drain {sync:?}: {:>9.0} tasks/s  (raw claim limit, batch {WORKERS}: {:>9.0}/s, {:.0}% of it)  {}",
            drain.rate,
            limit,
            100.0 * drain.rate / limit,
            verdict(drain.rate, target, true, "tasks/s")
        );
        println!(
            "      peak RSS {:.1} MiB, peak threads {}, wall {:.3} s",
            drain.peak_rss_kib as f64 / 1024.0,
            drain.max_threads,
            drain.wall.as_secs_f64()
        );
    }
    let logged = drain(&scratch, Synchronous::Normal, "info", &[]);
    println!(
        "drain Normal with default logging (info, one line per start and finish, to a pipe): {:.0} tasks/s",
        logged.rate
    );
    // Interleaved, so that the machine's drift hits both alike; medians of seven each.
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        on.push(drain_once(&scratch, Synchronous::Normal, "warn", &[]).rate);
        off.push(drain_once(&scratch, Synchronous::Normal, "warn", &["--no-telemetry"]).rate);
    }
    on.sort_by(f64::total_cmp);
    off.sort_by(f64::total_cmp);
    let (on, off) = (on[3], off[3]);
    let slower = 100.0 * (1.0 - on / off);
    println!(
        "drain Normal with telemetry {on:.0} tasks/s, with --no-telemetry {off:.0} tasks/s (medians of 7, interleaved): {slower:.1}% slower with it  {}",
        verdict(slower, 5.0, false, "% slower")
    );
    println!(
        "peak RSS over the drains: {:.1} MiB  {}",
        peak_rss_kib as f64 / 1024.0,
        verdict(peak_rss_kib as f64 / 1024.0, 8.0, false, "MiB")
    );
    delivery_modes(&scratch);
    println!();

    for (place, wake_root) in [
        ("disk", scratch.clone()),
        ("tmpfs", PathBuf::from("/dev/shm")),
    ] {
        for sync in [Synchronous::Full, Synchronous::Normal] {
            let (mut lat, mut calls) = wakeup_latency(&scratch, &wake_root, sync);
            lat.sort();
            calls.sort();
            let p50 = percentile(&lat, 0.50);
            let p99 = percentile(&lat, 0.99);
            println!(
                "wake-up {sync:?}, wake dir on {place}: p50 {:.3} ms {}, p99 {:.3} ms {}, max {:.3} ms",
                ms(p50),
                verdict(ms(p50), 1.0, false, "ms"),
                ms(p99),
                verdict(ms(p99), 2.5, false, "ms"),
                ms(*lat.last().unwrap())
            );
            println!(
                "      of which the enqueue call itself (insert, commit, wake file): p50 {:.3} ms, p99 {:.3} ms",
                ms(percentile(&calls, 0.50)),
                ms(percentile(&calls, 0.99)),
            );
        }
        let mut raw = inotify_latency(&wake_root);
        raw.sort();
        println!(
            "      limit: inotify create-to-wake through notify, wake dir on {place}: p50 {:.3} ms, p99 {:.3} ms",
            ms(percentile(&raw, 0.50)),
            ms(percentile(&raw, 0.99)),
        );
    }
    println!();
    enqueue_figures(&scratch);
    if let Some(baseline) = std::env::var_os("SNAPQ_BENCH_BASELINE_BIN") {
        println!();
        compare_with_baseline(&scratch, Path::new(&baseline));
    }
}

/// The drain of this build beside another snapq binary's (`SNAPQ_BENCH_BASELINE_BIN`,
/// e.g. the commit before task records), interleaved run by run so that the machine's
/// drift hits both alike; medians of five. Each binary enqueues its own tasks (through its
/// CLI: their schemas may differ) and drains them with `run --burst`.
///
/// The target is `SNAPQ_BENCH_BASELINE_TARGET` percent (default 90): issue 17 asks the
/// drain after the queue interface for within 10% of the commit before it; issue 15 asked
/// the drain with records for 80% of the commit before records.
fn compare_with_baseline(scratch: &Path, baseline: &Path) {
    let target: f64 = std::env::var("SNAPQ_BENCH_BASELINE_TARGET")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(90.0);
    let lines = "{\"task\":\"noop\"}\n".repeat(TASKS);
    let drain_cli = |bin: &Path, sync: &str| -> f64 {
        let home = fresh_home(scratch, "compare");
        let mut enqueue = Command::new(bin)
            .args(["--home", home.to_str().unwrap(), "--synchronous", sync])
            .args(["enqueue", "--file", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        enqueue
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        assert!(enqueue.wait().unwrap().success());
        let started = Instant::now();
        let status = Command::new(bin)
            .args(["--home", home.to_str().unwrap(), "--synchronous", sync])
            .args(["run", "--burst", "--workers", &WORKERS.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        TASKS as f64 / started.elapsed().as_secs_f64()
    };
    for sync in ["normal", "full"] {
        let (mut this, mut base) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            this.push(drain_cli(Path::new(BIN), sync));
            base.push(drain_cli(baseline, sync));
        }
        this.sort_by(f64::total_cmp);
        base.sort_by(f64::total_cmp);
        let (this, base) = (this[2], base[2]);
        println!(
            "drain {sync} beside {}: {this:.0} tasks/s, baseline {base:.0} tasks/s: {:.0}% of it (medians of 5, interleaved)  {}",
            baseline.display(),
            100.0 * this / base,
            verdict(100.0 * this / base, target, true, "% of the baseline")
        );
    }
}

/// Bulk enqueue through the binary beside a raw insert of as many rows in one transaction,
/// and one `snapq enqueue` process beside the spawn of `true`.
fn enqueue_figures(scratch: &Path) {
    const BULK: usize = 200_000;
    let home = fresh_home(scratch, "enqueue");
    let file = home.join("bulk.jsonl");
    std::fs::write(&file, "{\"task\":\"noop\"}\n".repeat(BULK)).unwrap();
    let run = |home: &Path, args: &[&str]| {
        run_ok(
            Command::new(BIN)
                .args(["--home", home.to_str().unwrap()])
                .args(args),
        )
    };
    for (sync, name) in [(Synchronous::Normal, "normal"), (Synchronous::Full, "full")] {
        let mut times: Vec<Duration> = (0..3)
            .map(|_| {
                run(
                    &home,
                    &[
                        "--synchronous",
                        name,
                        "enqueue",
                        "--file",
                        file.to_str().unwrap(),
                    ],
                )
            })
            .collect();
        times.sort();
        let rate = BULK as f64 / times[1].as_secs_f64();
        let limit = raw_insert_rate(scratch, sync, BULK);
        println!(
            "bulk enqueue {sync:?}, {BULK} lines through `snapq enqueue --file` (whole process): {rate:.0} tasks/s (raw insert in one transaction: {limit:.0}/s, {:.0}% of it)  {}",
            100.0 * rate / limit,
            verdict(rate, 500_000.0, true, "tasks/s")
        );
    }
    // One enqueue, the whole process, into a database an idle foreman holds open (as in
    // production: the last connection to close checkpoints the WAL, which costs more). A
    // home of its own: the one above holds 400,000 tasks, and a foreman draining them
    // would be measured instead.
    let home = fresh_home(scratch, "one");
    let mut foreman = Command::new(BIN)
        .args(["--home", home.to_str().unwrap(), "run", "--no-telemetry"])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut version: Vec<Duration> = (0..100).map(|_| run(&home, &["--version"])).collect();
    version.sort();
    println!(
        "`snapq --version` (the binary's start alone): p50 {:.2} ms",
        ms(percentile(&version, 0.50))
    );
    for name in ["normal", "full"] {
        let mut one: Vec<Duration> = (0..100)
            .map(|_| run(&home, &["--synchronous", name, "enqueue", "noop"]))
            .collect();
        one.sort();
        let mut spawn: Vec<Duration> = (0..100)
            .map(|_| {
                let started = Instant::now();
                Command::new("true").status().unwrap();
                started.elapsed()
            })
            .collect();
        spawn.sort();
        println!(
            "one `snapq --synchronous {name} enqueue noop` process, foreman running: p50 {:.2} ms {}, p99 {:.2} ms (spawning `true`: p50 {:.2} ms)",
            ms(percentile(&one, 0.50)),
            verdict(ms(percentile(&one, 0.50)), 3.0, false, "ms"),
            ms(percentile(&one, 0.99)),
            ms(percentile(&spawn, 0.50)),
        );
    }
    // SAFETY: SIGTERM to our own child, still running.
    unsafe { libc::kill(foreman.id() as i32, libc::SIGTERM) };
    foreman.wait().unwrap();
}

/// Inserts `rows` noop rows in one transaction with the enqueuer's statement: the ceiling.
fn raw_insert_rate(scratch: &Path, sync: Synchronous, rows: usize) -> f64 {
    let home = fresh_home(scratch, "insert");
    let mut conn = db::open(&home.join("snapq.sqlite3"), sync).unwrap();
    let started = Instant::now();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare("INSERT INTO tasks (task_name, args, kwargs, created_at, run_at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .unwrap();
        let now = snapq::clock::now_micros();
        for _ in 0..rows {
            insert
                .execute(rusqlite::params!["noop", "[]", "{}", now, None::<i64>])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    rows as f64 / started.elapsed().as_secs_f64()
}

/// Creates 200 files in a watched directory and times each create to its event arriving
/// through the notify crate: the floor of any wake-up.
fn inotify_latency(root: &Path) -> Vec<Duration> {
    use notify::Watcher;
    let dir = fresh_home(root, "snapq-bench-inotify");
    let (tx, rx) = crossbeam_channel::unbounded::<Instant>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| e.kind.is_create()) {
            let _ = tx.send(Instant::now());
        }
    })
    .unwrap();
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .unwrap();
    let mut latencies = Vec::with_capacity(WAKEUPS);
    for i in 0..WAKEUPS {
        std::thread::sleep(Duration::from_millis(5));
        let before = Instant::now();
        std::fs::File::create(dir.join(format!("f{i}"))).unwrap();
        let seen = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        latencies.push(seen - before);
    }
    latencies
}

fn scratch_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-core");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fresh_home(root: &Path, name: &str) -> PathBuf {
    let home = root.join(name);
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    home
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn enqueue_noops(db: &Path, wakeup: &Path, count: usize) {
    let mut q = Enqueuer::open(db, wakeup, Synchronous::Normal).unwrap();
    let tasks = vec![NewTask::new("noop"); count];
    assert_eq!(q.enqueue_many(&tasks).unwrap(), count);
}

struct Drain {
    rate: f64,
    wall: Duration,
    peak_rss_kib: u64,
    max_threads: u64,
}

/// The median-rate run of three.
fn drain(scratch: &Path, sync: Synchronous, log: &str, extra: &[&str]) -> Drain {
    let mut runs: Vec<Drain> = (0..3)
        .map(|_| drain_once(scratch, sync, log, extra))
        .collect();
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs.swap_remove(1)
}

/// Spawns `snapq run --burst` over TASKS pre-enqueued noops; the wall time includes the
/// process start (a few ms). Peak RSS is the kernel's high-water mark (VmHWM), read every
/// 2 ms while the process lives (wait4's ru_maxrss would count the benchmark's own pages
/// shared with the child before exec).
fn drain_once(scratch: &Path, sync: Synchronous, log: &str, extra: &[&str]) -> Drain {
    let home = fresh_home(scratch, "drain");
    let db = home.join("snapq.sqlite3");
    enqueue_noops(&db, &home.join("wakeup"), TASKS);
    let sync_name = match sync {
        Synchronous::Full => "full",
        Synchronous::Normal => "normal",
    };
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["--home", home.to_str().unwrap(), "--synchronous", sync_name])
        .args(["run", "--burst", "--workers", &WORKERS.to_string()])
        .args(extra)
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(if log == "warn" {
            Stdio::inherit()
        } else {
            Stdio::piped()
        })
        .spawn()
        .unwrap();
    let pid = child.id();
    // Drain a piped stderr so the child never blocks on it.
    let drain_pipe = child.stderr.take().map(|mut stderr| {
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()))
    });
    // Relaxed: each has one writer (the sampler); the reader joins the sampler first.
    let peaks = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let sampler = {
        let peaks = Arc::clone(&peaks);
        std::thread::spawn(move || {
            while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let field = |name: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                };
                if let (Some(hwm), Some(threads)) = (field("VmHWM:"), field("Threads:")) {
                    peaks.0.fetch_max(hwm, Ordering::Relaxed);
                    peaks.1.fetch_max(threads, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let status = child.wait().unwrap();
    let wall = started.elapsed();
    assert!(status.success(), "the drain failed: {status}");
    sampler.join().unwrap();
    if let Some(t) = drain_pipe {
        t.join().unwrap().unwrap();
    }
    let conn = db::open(&db, Synchronous::Normal).unwrap();
    let left: i64 = conn
        .query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "the drain left tasks behind");
    Drain {
        rate: TASKS as f64 / wall.as_secs_f64(),
        wall,
        peak_rss_kib: peaks.0.load(Ordering::Relaxed),
        max_threads: peaks.1.load(Ordering::Relaxed),
    }
}

/// At most once beside at least once: TASKS tasks of the same do-nothing function, `noop`
/// (no retry policy: the claim deletes the row) and `noop_retried` (3 retries: the claim
/// leases it, its end settles the lease), each drained by a foreman in this process
/// (`--burst`, WORKERS workers, no telemetry, no log subscriber), interleaved run by run;
/// medians of five.
fn delivery_modes(scratch: &Path) {
    let mut registry = Registry::with_builtins();
    registry.register(
        TaskSpec {
            name: "noop_retried".into(),
            summary: "does nothing, at least once".into(),
            params: vec![],
            retry: Some(RetryPolicy::new(3)),
        },
        |_, _| Ok(()),
    );
    for sync in [Synchronous::Normal, Synchronous::Full] {
        let (mut once, mut least) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            once.push(drain_in_process(scratch, sync, &registry, "noop"));
            least.push(drain_in_process(scratch, sync, &registry, "noop_retried"));
        }
        once.sort_by(f64::total_cmp);
        least.sort_by(f64::total_cmp);
        let (once, least) = (once[2], least[2]);
        println!(
            "drain {sync:?} in process: at most once {once:.0} tasks/s, at least once {least:.0} tasks/s ({:.0}% of it; medians of 5, interleaved)",
            100.0 * least / once
        );
    }
}

fn drain_in_process(scratch: &Path, sync: Synchronous, registry: &Registry, task: &str) -> f64 {
    let home = fresh_home(scratch, "modes");
    let db = home.join("snapq.sqlite3");
    let wakeup_dir = home.join("wakeup");
    let mut q = Enqueuer::with_registry(&db, &wakeup_dir, Synchronous::Normal, registry).unwrap();
    assert_eq!(
        q.enqueue_many(&vec![NewTask::new(task); TASKS]).unwrap(),
        TASKS
    );
    drop(q);
    let config = ForemanConfig {
        burst: true,
        synchronous: sync,
        workers: WORKERS,
        telemetry_dir: None,
        pid_file: None,
        ..ForemanConfig::in_home(&home).unwrap()
    };
    let started = Instant::now();
    let (_, totals) = foreman::run(&config, registry.clone()).unwrap();
    let rate = TASKS as f64 / started.elapsed().as_secs_f64();
    assert_eq!(totals.succeeded, TASKS as u64);
    let conn = db::open(&db, Synchronous::Normal).unwrap();
    let (left, once): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT count(*) FROM tasks), \
             (SELECT count(*) FROM task_records WHERE state = 'succeeded' AND attempt = 1)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (left, once),
        (0, TASKS as i64),
        "the drain left tasks behind"
    );
    rate
}

/// Claims TASKS rows in batches of `batch` with nothing else going on: the ceiling (the
/// best of three runs).
fn raw_claim_rate(scratch: &Path, sync: Synchronous, batch: usize) -> f64 {
    (0..3)
        .map(|_| raw_claim_once(scratch, sync, batch))
        .fold(0.0, f64::max)
}

fn raw_claim_once(scratch: &Path, sync: Synchronous, batch: usize) -> f64 {
    let home = fresh_home(scratch, "claim");
    let db = home.join("snapq.sqlite3");
    enqueue_noops(&db, &home.join("wakeup"), TASKS);
    let conn = db::open(&db, sync).unwrap();
    let now = snapq::clock::now_micros();
    let started = Instant::now();
    let mut claimed = 0;
    let mut cursor = snapq::queue::Cursor::default();
    while claimed < TASKS {
        let got = snapq::queue::claim(&conn, now, batch, &mut cursor).unwrap();
        assert!(!got.is_empty());
        claimed += got.len();
    }
    TASKS as f64 / started.elapsed().as_secs_f64()
}

/// Runs a foreman in this process with a task that reports when it starts, enqueues one
/// task at a time into it while it is idle, and returns enqueue-call → start latencies and
/// the durations of the enqueue calls.
fn wakeup_latency(
    scratch: &Path,
    wake_root: &Path,
    sync: Synchronous,
) -> (Vec<Duration>, Vec<Duration>) {
    let home = fresh_home(scratch, "wakeup");
    let wakeup_dir = fresh_home(wake_root, "snapq-bench-wakeup");
    let db = home.join("snapq.sqlite3");
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<(i64, Instant)>();
    let mut registry = Registry::with_builtins();
    registry.register(
        TaskSpec {
            name: "stamp".into(),
            summary: "reports its start time to the benchmark".into(),
            params: vec![],
            retry: None,
        },
        move |ctx, _| {
            started_tx
                .send((ctx.id, Instant::now()))
                .map_err(|e| e.to_string())?;
            Ok(())
        },
    );
    let config = ForemanConfig {
        db: db.clone(),
        wakeup_dir: wakeup_dir.clone(),
        pid_file: None,
        telemetry_dir: None,
        results_file: home.join("results.jsonl"),
        synchronous: sync,
        workers: WORKERS,
        batch: 100,
        graceful_timeout: Duration::from_secs(5),
        burst: false,
        safety_interval: foreman::SAFETY_INTERVAL,
        history_retention: Duration::from_secs(7 * 24 * 3600),
        history_max_rows: 100_000,
        live: None,
        tasks_file: None,
        queue: Default::default(),
    };
    let foreman = std::thread::spawn(move || foreman::run(&config, registry));
    // The foreman opens the database and records its task types; wait for that.
    let mut q = loop {
        if foreman.is_finished() {
            panic!("the foreman stopped: {:?}", foreman.join().unwrap().err());
        }
        if let Ok(q) = Enqueuer::open(&db, &wakeup_dir, sync)
            && q.catalog().specs().any(|s| s.name == "stamp")
        {
            break q;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut latencies = Vec::with_capacity(WAKEUPS);
    let mut calls = Vec::with_capacity(WAKEUPS);
    for _ in 0..WAKEUPS {
        // Idle: the foreman is blocked waiting for an event.
        std::thread::sleep(Duration::from_millis(5));
        let before = Instant::now();
        let id = q.enqueue(&NewTask::new("stamp")).unwrap();
        calls.push(before.elapsed());
        let (ran, started) = started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(ran, id, "task {ran} started when task {id} was enqueued");
        latencies.push(started - before);
    }
    // SAFETY: raise(3) sends SIGTERM to this process; the foreman's signal-hook handler
    // (installed by foreman::run) turns it into a graceful stop instead of death.
    unsafe { libc::raise(libc::SIGTERM) };
    foreman.join().unwrap().unwrap();
    (latencies, calls)
}
