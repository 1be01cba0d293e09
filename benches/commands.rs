//! The command tasks benchmark (issue 16): `cargo bench --bench commands`.
//!
//! Reports, in one run:
//! - the machine's limit: spawning and waiting for `/bin/true` with `std::process::Command`
//!   (what snapq uses) on 1 and on 4 threads, nothing else;
//! - `snapq run --burst` draining 5,000 queued `/bin/true` command tasks with 4 workers
//!   (`--synchronous normal`), as a share of the 4-thread limit (target: at least 80%),
//!   and the foreman's own CPU per task (its threads only; the children's CPU is theirs);
//! - end to end, the way task-spooler is used: 5,000 client processes each queueing one
//!   `/bin/true` into a running server with 4 slots, until all have run — `snapq enqueue`
//!   into `snapq run`, and `tsp -n /bin/true` into task-spooler when `tsp` is installed
//!   (Debian's `task-spooler`; the figure is skipped otherwise).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snapq::db::Synchronous;
use snapq::registry::Registry;
use snapq::tasks_file::TasksFile;
use snapq::{Enqueuer, NewTask};

const BIN: &str = env!("CARGO_BIN_EXE_snapq");
const TASKS: usize = 5_000;
const WORKERS: usize = 4;

fn main() {
    let scratch = tempfile::Builder::new()
        .prefix("snapq-bench-commands-")
        .tempdir()
        .unwrap();
    println!("snapq command tasks benchmark ({TASKS} /bin/true tasks, {WORKERS} workers)");
    println!();

    let one = spawn_limit(1, TASKS / 5);
    let four = spawn_limit(WORKERS, TASKS);
    println!("limit: spawn+wait /bin/true, 1 thread:  {one:>7.0}/s");
    println!("limit: spawn+wait /bin/true, {WORKERS} threads: {four:>7.0}/s");

    let (rate, cpu) = drain(scratch.path());
    println!(
        "snapq drain, {WORKERS} workers:         {rate:>7.0}/s  ({:.0}% of the {WORKERS}-thread limit; target 80%: {})",
        100.0 * rate / four,
        if rate >= 0.8 * four { "met" } else { "MISSED" }
    );
    println!(
        "snapq foreman CPU per command task: {:.0} µs (its own threads: claim, record, spawn, poll, reap)",
        cpu.as_secs_f64() * 1e6 / TASKS as f64
    );

    println!();
    let snapq = end_to_end_snapq(scratch.path());
    println!("end to end, 5,000 client processes each queueing one /bin/true, 4 slots:");
    println!("  snapq enqueue → snapq run:     {snapq:>7.0} jobs/s");
    match end_to_end_tsp(scratch.path()) {
        Some(rate) => println!("  tsp -n /bin/true (task-spooler): {rate:>7.0} jobs/s"),
        None => println!("  task-spooler: not installed (apt-get install task-spooler), skipped"),
    }
}

/// Spawns and waits for `/bin/true` `total` times on `threads` threads; returns runs/s.
fn spawn_limit(threads: usize, total: usize) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..total / threads {
                    let status = Command::new("/bin/true")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .unwrap();
                    assert!(status.success());
                }
            });
        }
    });
    total as f64 / started.elapsed().as_secs_f64()
}

fn tasks_toml(home: &Path) -> PathBuf {
    let path = home.join("tasks.toml");
    std::fs::write(&path, "[tasks.t]\ncommand = [\"/bin/true\"]\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// 5,000 queued command tasks drained by `snapq run --burst`; returns tasks/s and the
/// CPU the foreman's own threads used (not its children's).
fn drain(root: &Path) -> (f64, Duration) {
    let home = root.join("drain");
    std::fs::create_dir_all(&home).unwrap();
    let tasks_file = TasksFile {
        path: tasks_toml(&home),
        required: true,
    };
    let registry = tasks_file
        .with_commands(&Registry::with_builtins())
        .unwrap();
    let mut q = Enqueuer::with_registry(
        &home.join("snapq.sqlite3"),
        &home.join("wakeup"),
        Synchronous::Normal,
        &registry,
    )
    .unwrap();
    q.enqueue_many(&vec![NewTask::new("t"); TASKS]).unwrap();
    drop(q);
    let started = Instant::now();
    let mut foreman = Command::new(BIN)
        .env("SNAPQ_HOME", &home)
        .env("RUST_LOG", "warn")
        .args([
            "--synchronous",
            "normal",
            "run",
            "--burst",
            "--no-telemetry",
            "--workers",
            &WORKERS.to_string(),
        ])
        .spawn()
        .unwrap();
    let pid = foreman.id() as libc::pid_t;
    // Wait for the exit without reaping, so /proc still has the final CPU times.
    // SAFETY: waitid on our own child fills `info`.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        );
        assert_eq!(r, 0);
    }
    let elapsed = started.elapsed();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    // utime and stime (fields 14 and 15 of stat(5); the 12th and 13th after the name).
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks;
    assert!(foreman.wait().unwrap().success());
    let conn = rusqlite::Connection::open(home.join("snapq.sqlite3")).unwrap();
    let succeeded: i64 = conn
        .query_row(
            "SELECT count(*) FROM task_records WHERE state = 'succeeded'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(succeeded as usize, TASKS);
    (
        TASKS as f64 / elapsed.as_secs_f64(),
        Duration::from_secs_f64(cpu),
    )
}

/// Runs `clients` client commands, `parallel` at a time (as scripts and cron jobs would
/// enqueue), each made by `client`.
fn run_clients(parallel: usize, client: impl Fn() -> Command + Sync) {
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| {
                for _ in 0..TASKS / parallel {
                    let out = client().stdout(Stdio::null()).output().unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            });
        }
    });
}

fn end_to_end_snapq(root: &Path) -> f64 {
    let home = root.join("e2e");
    std::fs::create_dir_all(&home).unwrap();
    tasks_toml(&home);
    let snapq = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.env("SNAPQ_HOME", &home)
            .env("SNAPQ_SYNCHRONOUS", "normal")
            .env("RUST_LOG", "warn")
            .args(args);
        cmd
    };
    let mut foreman = snapq(&["run", "--workers", "4", "--no-telemetry"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ready once it has written its heartbeat row.
    let db = home.join("snapq.sqlite3");
    let ready = || -> bool {
        let Ok(conn) = rusqlite::Connection::open(&db) else {
            return false;
        };
        conn.query_row("SELECT count(*) FROM foremen", [], |r| r.get::<_, i64>(0))
            .is_ok_and(|n| n > 0)
    };
    while !db.exists() || !ready() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    run_clients(2, || snapq(&["enqueue", "t"]));
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    loop {
        let ended: i64 = conn
            .query_row(
                "SELECT count(*) FROM task_records WHERE state = 'succeeded'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if ended as usize >= TASKS {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rate = TASKS as f64 / started.elapsed().as_secs_f64();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(foreman.id() as i32, libc::SIGTERM) };
    foreman.wait().unwrap();
    rate
}

fn end_to_end_tsp(root: &Path) -> Option<f64> {
    let found = Command::new("tsp").arg("-V").output().is_ok();
    if !found {
        return None;
    }
    let socket = root.join("tsp.socket");
    let tsp = |args: &[&str]| {
        let mut cmd = Command::new("tsp");
        cmd.env("TS_SOCKET", &socket)
            .env("TS_MAXFINISHED", (TASKS * 2).to_string())
            .env("TMPDIR", root)
            .args(args);
        cmd
    };
    tsp(&["-S", "4"]).output().unwrap();
    let started = Instant::now();
    run_clients(2, || tsp(&["-n", "/bin/true"]));
    // -w waits for the last job queued; then every earlier one has run too only if each
    // slot is done: wait until the list holds no queued or running job.
    loop {
        let list = tsp(&[]).output().unwrap();
        let text = String::from_utf8_lossy(&list.stdout);
        if !text.contains("queued") && !text.contains("running") {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rate = TASKS as f64 / started.elapsed().as_secs_f64();
    tsp(&["-K"]).output().unwrap();
    Some(rate)
}
