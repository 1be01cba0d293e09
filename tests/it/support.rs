//! The fixture: a home in its own temp dir, the real binary, and a foreman process that is
//! killed and reaped on drop. Waiting is always polling to a deadline, never a fixed sleep.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_snapq");

/// A snapq home directory in a fresh temp dir.
pub struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        Home {
            dir: tempfile::Builder::new()
                .prefix("snapq-it-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` as HOME/tasks.toml, readable by all and writable by its owner only
    /// (snapq refuses a tasks file others can write).
    pub fn tasks_file(&self, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.file("tasks.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    pub fn db_path(&self) -> PathBuf {
        self.file("snapq.sqlite3")
    }

    /// `snapq` with this home and nothing inherited from the caller's SNAPQ_* settings.
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(BIN);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SNAPQ_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("SNAPQ_HOME", self.path())
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `snapq ARGS` to completion.
    pub fn snapq(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs `snapq ARGS`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.snapq(args);
        assert!(
            out.status.success(),
            "snapq {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Enqueues JSON Lines through `snapq enqueue --file`.
    pub fn enqueue_lines(&self, lines: &str) -> usize {
        let path = self.file(&format!("bulk-{}.jsonl", unique()));
        std::fs::write(&path, lines).unwrap();
        self.ok(&["enqueue", "--file", path.to_str().unwrap()])
            .trim()
            .parse()
            .unwrap()
    }

    /// `snapq enqueue ARGS`, asserting success; returns the new task's id.
    pub fn enqueue(&self, args: &[&str]) -> i64 {
        let mut all = vec!["enqueue"];
        all.extend_from_slice(args);
        self.ok(&all).trim().parse().unwrap()
    }

    /// Starts `snapq run ARGS` and waits until it logs that it is ready.
    pub fn start(&self, args: &[&str]) -> Foreman {
        let mut cmd = self.cmd();
        cmd.arg("run").args(args).args(["--log-format", "json"]);
        Foreman::spawn(cmd)
    }

    /// A connection of the test's own, to look at the queue as any program could.
    pub fn conn(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.db_path()).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn
    }

    pub fn queued(&self) -> i64 {
        self.conn()
            .query_row("SELECT count(*) FROM tasks", [], |r| r.get(0))
            .unwrap()
    }
}

/// A running `snapq run`, its stderr collected line by line.
pub struct Foreman {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    pub exit: Option<ExitStatus>,
}

impl Foreman {
    pub fn spawn(cmd: Command) -> Foreman {
        let mut foreman = Foreman::spawn_unready(cmd);
        let ready = wait_until(Duration::from_secs(20), || {
            foreman.has_log("foreman ready") || foreman.try_exit().is_some()
        });
        assert!(
            ready && foreman.exit.is_none(),
            "the foreman did not become ready (exit {:?}):\n{}",
            foreman.exit,
            foreman.log_text()
        );
        foreman
    }

    /// Spawns without waiting for readiness (a `--burst` run may be done before).
    pub fn spawn_unready(mut cmd: Command) -> Foreman {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Foreman {
            child,
            log,
            reader: Some(reader),
            exit: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().unwrap();
        }
        self.exit
    }

    /// Waits for the process to exit; `None` if it is still running at the deadline.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.try_exit().is_some());
        let status = self.exit;
        if status.is_some()
            && let Some(reader) = self.reader.take()
        {
            let _ = reader.join();
        }
        status
    }

    /// SIGTERM, then asserts a clean exit within 10 s.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let status = self
            .wait_exit(Duration::from_secs(10))
            .expect("the foreman did not exit within 10 s of SIGTERM");
        assert!(status.success(), "exit {status}:\n{}", self.log_text());
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
            .expect("kill -9 did not end the foreman");
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.lines().join("\n")
    }

    pub fn has_log(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// The JSON log events whose message is `message`.
    pub fn events(&self, message: &str) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    /// How many threads the process has now (0 once it is gone).
    pub fn threads(&self) -> usize {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Foreman {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `cond` every millisecond until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A name no other call in this process returns.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Only uniqueness matters, so relaxed ordering suffices.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// JSON Lines for `count` append tasks writing `prefix-NNNNNN` lines to `out`.
pub fn append_lines(out: &Path, prefix: &str, range: std::ops::Range<usize>) -> String {
    let path = out.to_str().unwrap();
    range
        .map(|i| {
            format!(
                "{{\"task\":\"append\",\"kwargs\":{{\"path\":{path:?},\"line\":\"{prefix}-{i:06}\"}}}}\n"
            )
        })
        .collect()
}

/// The lines of a file (empty if it does not exist).
pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A Python with `modules` importable, for tests that check snapq's output with another
/// system's own reader: `SNAPQ_TEST_PYTHON`, else the venv `.ci/run` makes in
/// target/py. `None` (and the test says it was skipped) when neither has them.
pub fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("SNAPQ_TEST_PYTHON").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python")),
    ];
    let found = candidates.into_iter().flatten().find(|python| {
        Command::new(python)
            .arg("-c")
            .arg(format!("import {}", modules.join(", ")))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found.is_none() {
        eprintln!("skipped: no Python with {modules:?}; `bash .ci/run` installs them in target/py");
    }
    found
}

/// Runs `cmd` with `input` on its stdin; returns its output (stdout and stderr captured).
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}
