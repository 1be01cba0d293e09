//! The live view's fan-out benchmark (issue 7): `cargo bench --bench live`.
//!
//! A real foreman (`snapq run --workers 4 --synchronous normal`) drains 50,000 `noop`
//! tasks enqueued at once, first without the live view, then with `--http` and 100
//! WebSocket clients subscribed to every channel (`*`), interleaved, seven times each (this machine drifts by ±20% between runs).
//! The drain time runs from the commit of the 50,000 rows to the start of a last `append`
//! task queued behind them (the benchmark watches for its file). Reported: the drain
//! rates and the slowdown, the foreman's peak RSS (VmHWM) in both, and what the live view
//! held after the drain (`/metrics`: channels and messages kept, clients cut off for being
//! too slow, events dropped) beside its caps.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use snapq::db::Synchronous;
use snapq::live::Limits;
use snapq::queue::When;
use snapq::{Enqueuer, NewTask};
use tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_snapq");
const TASKS: usize = 50_000;
const CLIENTS: usize = 100;
const RUNS: usize = 7;

fn main() {
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-live");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let mut plain = Vec::new();
    let mut live = Vec::new();
    for run in 0..RUNS {
        plain.push(drain(&scratch, None));
        live.push(drain(&scratch, Some(clients())));
        let (p, l) = (&plain[run], &live[run]);
        println!(
            "run {}: without live view {:.0} tasks/s, {:.1} MiB; with {} clients {:.0} tasks/s, {:.1} MiB",
            run + 1,
            p.rate,
            p.peak_rss_mib,
            l.received.len(),
            l.rate,
            l.peak_rss_mib
        );
    }
    let median = |runs: &mut Vec<Drained>| {
        runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        runs.swap_remove(runs.len() / 2)
    };
    let p = median(&mut plain);
    let l = median(&mut live);
    let slowdown = 100.0 * (1.0 - l.rate / p.rate);
    println!();
    println!(
        "drain of {TASKS} noops, 4 workers, normal: {:.0} tasks/s without the live view, \
         {:.0} tasks/s with it and {} clients on '*' (medians of {RUNS}): slowdown {slowdown:.1}% \
         [target ≤ 10%: {}]",
        p.rate,
        l.rate,
        l.received.len(),
        if slowdown <= 10.0 { "met" } else { "MISSED" }
    );
    println!(
        "peak RSS: {:.1} MiB without, {:.1} MiB with the live view",
        p.peak_rss_mib, l.peak_rss_mib
    );
    let caps = Limits::default();
    let figures = l.figures.unwrap();
    println!(
        "live view after the drain: {} channels kept (cap {}), {} messages kept (cap {}), \
         {} events dropped",
        figures.channels, caps.max_channels, figures.messages, caps.max_messages, figures.dropped
    );
    if let (Some(min), Some(max)) = (l.received.first(), l.received.last()) {
        println!(
            "clients: {} of {} cut off as too slow (feed cap {} messages); messages received \
             per client: min {min}, median {}, max {max} (of {} published)",
            figures.cut_off,
            l.received.len(),
            caps.client_queue,
            l.received[l.received.len() / 2],
            2 * TASKS + 2
        );
    }
}

struct Figures {
    channels: u64,
    messages: u64,
    cut_off: u64,
    dropped: u64,
}

struct Drained {
    rate: f64,
    peak_rss_mib: f64,
    /// Messages each client received, sorted.
    received: Vec<u64>,
    figures: Option<Figures>,
}

/// The clients of the live runs: CLIENTS, or LIVE_BENCH_CLIENTS (0: the live view with no
/// client, to see what the view costs by itself).
fn clients() -> usize {
    std::env::var("LIVE_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CLIENTS)
}

/// Starts a foreman — with the live view and that many subscribers if `live` is given —,
/// enqueues the tasks, times the drain.
fn drain(scratch: &Path, live: Option<usize>) -> Drained {
    let home = scratch.join(if live.is_some() { "home-live" } else { "home" });
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["--home", home.to_str().unwrap(), "--synchronous", "normal"])
        .args(["run", "--workers", "4"])
        .env("RUST_LOG", "warn,snapq::foreman=info,snapq::live=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if live.is_some() {
        cmd.args(["--http", "127.0.0.1:0"]);
    }
    let clients = live.unwrap_or(0);
    let mut child = cmd.spawn().unwrap();
    let addr = wait_ready(&mut child, live.is_some());
    let peak = peak_rss_sampler(child.id());

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<JoinHandle<u64>> = (0..clients)
        .map(|_| {
            let addr = addr.clone().unwrap();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || read_feed(&addr, &stop))
        })
        .collect();
    // Let every subscription reach the hub.
    std::thread::sleep(Duration::from_millis(500));

    let sentinel = home.join("sentinel");
    let mut tasks = vec![NewTask::new("noop"); TASKS];
    tasks.push(NewTask {
        task: "append".into(),
        args: json!([]),
        kwargs: json!({"path": sentinel.to_str().unwrap(), "line": "done"}),
        when: When::Now,
    });
    let mut q = Enqueuer::open(
        &home.join("snapq.sqlite3"),
        &home.join("wakeup"),
        Synchronous::Normal,
    )
    .unwrap();
    q.enqueue_many(&tasks).unwrap();
    let started = Instant::now();
    while !sentinel.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the drain stalled"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
    let wall = started.elapsed();

    // Let the clients take what is still on its way, then read the live view's figures.
    std::thread::sleep(Duration::from_secs(2));
    let figures = addr.as_deref().map(metrics);
    stop.store(true, Ordering::SeqCst);
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let mut received: Vec<u64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    received.sort_unstable();
    Drained {
        rate: (TASKS + 1) as f64 / wall.as_secs_f64(),
        peak_rss_mib: peak.load(Ordering::Relaxed) as f64 / 1024.0,
        received,
        figures,
    }
}

/// Waits for "foreman ready" (and the live view's address); the rest of stderr is drained
/// on a thread of its own so the foreman never blocks on it.
fn wait_ready(child: &mut Child, live: bool) -> Option<String> {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = None;
    let mut ready = false;
    while !(ready && (addr.is_some() || !live)) {
        let line = lines.next().unwrap().unwrap();
        if line.contains("foreman ready") {
            ready = true;
        }
        if let Some(at) = line.find("url=http://") {
            let rest = &line[at + "url=http://".len()..];
            addr = Some(rest.split('/').next().unwrap().to_owned());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    addr
}

/// The process's VmHWM in KiB, sampled every 2 ms while it lives.
fn peak_rss_sampler(pid: u32) -> Arc<AtomicU64> {
    // Relaxed: a maximum with one writer; read after the process ended.
    let peak = Arc::new(AtomicU64::new(0));
    let writer = Arc::clone(&peak);
    std::thread::spawn(move || {
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            {
                writer.fetch_max(kib, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    peak
}

/// One client on `*`: counts the messages it receives until cut off or told to stop.
fn read_feed(addr: &str, stop: &AtomicBool) -> u64 {
    if std::env::var_os("LIVE_BENCH_NICE_CLIENTS").is_some() {
        // Browsers run on other machines: with this set, the clients take only the CPU
        // the foreman leaves (nice 19), as the live view's own threads do.
        // SAFETY: lowers this thread's own priority; no preconditions.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    }
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/events")).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    ws.send(Message::text(r#"{"subscribe":["*"]}"#)).unwrap();
    let mut received = 0;
    while !stop.load(Ordering::SeqCst) {
        match ws.read() {
            Ok(Message::Text(_)) => received += 1,
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    received
}

/// The live view's own figures from `/metrics`.
fn metrics(addr: &str) -> Figures {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let samples =
        snapq::monitor::prometheus::parse(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    let value = |name: &str| {
        samples
            .iter()
            .find(|s| s.name == name)
            .map_or(0, |s| s.value as u64)
    };
    Figures {
        channels: value("snapq_live_channels"),
        messages: value("snapq_live_messages"),
        cut_off: value("snapq_live_clients_cut_off_total"),
        dropped: value("snapq_live_events_dropped_total"),
    }
}
