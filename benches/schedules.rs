//! The schedules' idle cost (issue 18): `cargo bench --bench schedules`.
//!
//! A foreman (`snapq run`, the real binary) with 1,000 schedules none of which is due in
//! the next minutes, and beside it in the same run a foreman with none: the CPU each uses
//! over 60 s and how often its loop thread woke (voluntary context switches). With no
//! polling for schedules both wake for their heartbeat only (once a second).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapq::db::{self, Synchronous};
use snapq::schedules::{self, Cadence, CatchUp, NewSchedule};

const BIN: &str = env!("CARGO_BIN_EXE_snapq");
const SCHEDULES: usize = 1_000;
const WATCH: Duration = Duration::from_secs(60);

fn main() {
    let scratch = tempfile::Builder::new()
        .prefix("snapq-bench-schedules-")
        .tempdir()
        .unwrap();
    println!(
        "snapq schedules idle cost ({SCHEDULES} schedules, {} s)",
        WATCH.as_secs()
    );
    let with = scratch.path().join("with");
    let without = scratch.path().join("without");
    for home in [&with, &without] {
        std::fs::create_dir_all(home).unwrap();
    }
    let conn = db::open(&with.join("snapq.sqlite3"), Synchronous::Normal).unwrap();
    for i in 0..SCHEDULES {
        // Hourly at a minute that is not the next few; and intervals of an hour or more.
        let when = if i % 2 == 0 {
            Cadence::cron(&format!("{} 3 * * *", i % 60), Some("UTC")).unwrap()
        } else {
            Cadence::every(Duration::from_secs(3_600 + i as u64)).unwrap()
        };
        schedules::add(
            &conn,
            &NewSchedule {
                name: format!("s{i}"),
                when,
                task: "noop".into(),
                args: serde_json::json!([]),
                kwargs: serde_json::json!({}),
                catch_up: CatchUp::One,
                jitter: Duration::ZERO,
            },
        )
        .unwrap();
    }
    drop(conn);
    // Both foremen run at once, so the machine's noise falls on both.
    let mut a = start(&with);
    let mut b = start(&without);
    std::thread::sleep(Duration::from_secs(3));
    let (cpu_a, wakes_a) = sample(&a);
    let (cpu_b, wakes_b) = sample(&b);
    let started = Instant::now();
    std::thread::sleep(WATCH);
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu_a2, wakes_a2) = sample(&a);
    let (cpu_b2, wakes_b2) = sample(&b);
    for (label, cpu, wakes) in [
        ("1,000 schedules", cpu_a2 - cpu_a, wakes_a2 - wakes_a),
        ("no schedules   ", cpu_b2 - cpu_b, wakes_b2 - wakes_b),
    ] {
        println!(
            "{label}: CPU {:.0} ms in {elapsed:.0} s ({:.3}% of a core); loop thread woke {} times ({:.1}/s)",
            cpu * 1e3,
            100.0 * cpu / elapsed,
            wakes,
            wakes as f64 / elapsed
        );
    }
    for child in [&mut a, &mut b] {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap();
    }
}

fn start(home: &Path) -> Child {
    Command::new(BIN)
        .env("SNAPQ_HOME", home)
        .env("RUST_LOG", "warn")
        .args(["run", "--no-telemetry"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The process's CPU seconds (utime + stime), and the voluntary context switches of its
/// main thread (the foreman loop; its tid is the pid).
fn sample(child: &Child) -> (f64, u64) {
    let pid = child.id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap();
    let wakes = status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    (cpu, wakes)
}
