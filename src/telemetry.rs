//! Telemetry: the foreman's own durations and resource use as CSV time series (SPEC
//! "Telemetry").
//!
//! Recording a sample (`Telemetry::record`) pushes 24 bytes onto the active buffer under a
//! mutex held only for the push: no I/O and, in the common case, no allocation. The mutex
//! is parking_lot's, which spins briefly before sleeping: with four threads recording at
//! once on two cores, std's mutex put the p99 of one sample at 1.07 µs, parking_lot's at
//! 0.18 µs (`cargo bench --bench telemetry`). The memory
//! for samples is fixed when telemetry starts: `BUFFERS` buffers that together hold at most
//! `CAP_BYTES` (512 KiB). When the active buffer is full the recorder swaps in an empty spare
//! and hands the full one to the telemetry thread; if no spare is left (the thread is that
//! far behind) the sample is dropped and counted, never waited for: a worker is never
//! blocked on a flush.
//!
//! The telemetry thread (`snapq-telemetry`) writes full buffers as they come, samples the
//! process once a second (RSS, CPU user and system seconds, threads, open descriptors, tasks
//! due and running), flushes the active buffer every `FLUSH_INTERVAL`, and flushes
//! everything when stopped. Each process writes its own files, `duration-<pid>.csv` and
//! `runtime-<pid>.csv`, appending one `write` per flush, so processes sharing a directory
//! never interleave rows.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

use crate::error::{Error, Result};

/// The most memory samples may take, across all buffers: half of SPEC's 1 MiB cap, which
/// holds ~21,800 samples (the writer drains them every 3 s or when a buffer fills) and
/// keeps the drain's peak RSS half a MiB lower (BENCHMARKS.md).
pub const CAP_BYTES: usize = 1 << 19;
/// How many buffers share `CAP_BYTES`: one active, the others spare or being written.
pub const BUFFERS: usize = 4;
/// Samples per buffer.
pub const SAMPLES_PER_BUFFER: usize = CAP_BYTES / BUFFERS / std::mem::size_of::<Sample>();
/// How often the active buffer is written out even when it is not full.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(3);
/// How often the process's resource use is sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// `tasks_due` is counted up to this many rows, so that a huge backlog does not make the
/// once-a-second sample expensive.
pub const DUE_COUNT_CAP: i64 = 100_000;

/// A telemetry file is rotated when it reaches this size: `duration-<pid>.csv` becomes
/// `duration-<pid>.1.csv` (the older ones move up by one) and a new file starts. A 1M-task
/// drain wrote 89 MB of durations into one file before (issue 13, item 17).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Rotated files kept per series and process, besides the one being written: at most
/// `(1 + KEEP_ROTATED) × MAX_FILE_BYTES` (64 MiB) a series while a foreman runs.
pub const KEEP_ROTATED: usize = 3;

/// Files of foremen no longer running that are kept when a foreman starts (the newest);
/// older ones are removed, so that restarts do not pile files up either.
pub const KEEP_DEAD_FILES: usize = 16;

/// The CSV header of both files, as QuantumLeap's writer (`server/telemetry/flush.py`,
/// `OBSERVATION_STORE_HEADER`, written by Python's csv module) has it: no spaces, which its
/// reader (`pandas_import.py`, pandas' `read_csv` with the plain names as column keys)
/// needs. Until 2026-12-02 snapq wrote a space after each comma.
pub const HEADER: &str = "Timepoint,Measurement,Label,PID";

/// An interned label (`task:noop`, `rss_bytes`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(u32);

/// Which file a label's samples go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    /// `duration-<pid>.csv`: seconds.
    Duration,
    /// `runtime-<pid>.csv`: resource figures.
    Runtime,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Nanoseconds since the Unix epoch.
    at_ns: i64,
    value: f64,
    label: Label,
}

/// The recording side, shared by the foreman's threads.
pub struct Telemetry {
    /// The buffer samples are pushed onto. Held only for a push or a swap, never for I/O.
    /// Lock order: `active` before `spare`.
    active: Mutex<Vec<Sample>>,
    /// Empty buffers waiting to become active; the telemetry thread returns them here after
    /// writing them out.
    spare: Mutex<Vec<Vec<Sample>>>,
    /// Full buffers to the telemetry thread. Unbounded in type, but at most `BUFFERS`
    /// buffers exist, so at most that many messages are ever queued.
    full_tx: Sender<Message>,
    /// Samples dropped because every buffer was full (the thread fell behind).
    dropped: AtomicU64,
    /// Label id → (name, series). Written when a label is interned (at startup), read by
    /// the telemetry thread when it formats rows.
    labels: RwLock<Vec<(String, Series)>>,
    pid: u32,
    /// Tasks due and running, for the runtime sample.
    pub queue: QueueFigures,
}

enum Message {
    Full(Vec<Sample>),
    Stop,
}

impl Telemetry {
    /// Interns a label; call at startup, not per sample.
    pub fn label(&self, name: &str, series: Series) -> Label {
        let mut labels = self.labels.write();
        if let Some(i) = labels.iter().position(|(n, s)| n == name && *s == series) {
            return Label(i as u32);
        }
        labels.push((name.to_owned(), series));
        Label((labels.len() - 1) as u32)
    }

    /// Records one sample, stamped now.
    pub fn record(&self, label: Label, value: f64) {
        let sample = Sample {
            at_ns: now_ns(),
            value,
            label,
        };
        let mut active = self.active.lock();
        if active.len() >= SAMPLES_PER_BUFFER {
            let spare = self.spare.lock().pop();
            match spare {
                Some(empty) => {
                    let full = std::mem::replace(&mut *active, empty);
                    // The thread only stops after the foreman's workers are done recording;
                    // a failed send means it is gone, and the samples with it.
                    let _ = self.full_tx.send(Message::Full(full));
                }
                None => {
                    // Relaxed: a statistic, read once at each flush.
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        active.push(sample);
    }

    /// The bytes reserved for samples now: never more than `CAP_BYTES`.
    pub fn reserved_bytes(&self) -> usize {
        let active = self.active.lock();
        let spare = self.spare.lock();
        // Buffers in flight to the thread are counted as the ones missing from here.
        let here = active.capacity() + spare.iter().map(Vec::capacity).sum::<usize>();
        let in_flight = BUFFERS - 1 - spare.len();
        (here + in_flight * SAMPLES_PER_BUFFER) * std::mem::size_of::<Sample>()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Swaps the active buffer for a spare, if it holds anything and a spare is free.
    fn take_active(&self) -> Option<Vec<Sample>> {
        let mut active = self.active.lock();
        if active.is_empty() {
            return None;
        }
        let empty = self.spare.lock().pop()?;
        Some(std::mem::replace(&mut *active, empty))
    }

    fn give_back(&self, mut buffer: Vec<Sample>) {
        buffer.clear();
        self.spare.lock().push(buffer);
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Queue figures for the once-a-second runtime sample, published by the foreman loop at
/// each heartbeat (it has the database; the telemetry thread then needs no connection of
/// its own). Written by the loop, read by the telemetry thread; independent figures, so
/// Relaxed. `due` is negative until the first publication.
#[derive(Debug)]
pub struct QueueFigures {
    due: AtomicI64,
    running: AtomicI64,
}

impl Default for QueueFigures {
    fn default() -> Self {
        QueueFigures {
            due: AtomicI64::new(-1),
            running: AtomicI64::new(0),
        }
    }
}

impl QueueFigures {
    pub fn publish(&self, due: i64, running: i64) {
        self.due.store(due, Ordering::Relaxed);
        self.running.store(running, Ordering::Relaxed);
    }

    fn read(&self) -> Option<(i64, i64)> {
        let due = self.due.load(Ordering::Relaxed);
        (due >= 0).then(|| (due, self.running.load(Ordering::Relaxed)))
    }
}

/// A running telemetry: the shared recorder and its thread. `stop` flushes everything.
pub struct Running {
    telemetry: Arc<Telemetry>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// Creates the directory if needed, checks it can be written, and starts the thread.
    pub fn start(dir: &Path) -> Result<Running> {
        let bad = |problem: String| Error::BadPath {
            role: "telemetry directory",
            path: dir.to_owned(),
            problem,
        };
        std::fs::create_dir_all(dir).map_err(|e| {
            bad(format!(
                "cannot be created ({e}); give --telemetry-dir a writable directory or run \
                 with --no-telemetry"
            ))
        })?;
        let pid = std::process::id();
        let files = Files {
            duration: dir.join(format!("duration-{pid}.csv")),
            runtime: dir.join(format!("runtime-{pid}.csv")),
        };
        prune_dead(dir);
        // Open both now, so an unwritable directory is reported at startup.
        for path in [&files.duration, &files.runtime] {
            append(path, "").map_err(|e| {
                bad(format!(
                    "cannot be written ({e}); fix its permissions or run with --no-telemetry"
                ))
            })?;
        }
        let (full_tx, full_rx) = unbounded();
        let mut buffers: Vec<Vec<Sample>> = (0..BUFFERS)
            .map(|_| Vec::with_capacity(SAMPLES_PER_BUFFER))
            .collect();
        let active = buffers.pop().unwrap_or_default();
        let telemetry = Arc::new(Telemetry {
            active: Mutex::new(active),
            spare: Mutex::new(buffers),
            full_tx,
            dropped: AtomicU64::new(0),
            labels: RwLock::new(Vec::new()),
            pid,
            queue: QueueFigures::default(),
        });
        let sampler = Sampler::new(&telemetry);
        let thread = {
            let telemetry = Arc::clone(&telemetry);
            std::thread::Builder::new()
                .name("snapq-telemetry".into())
                .spawn(move || run_thread(&telemetry, &full_rx, &files, sampler))
                .map_err(|e| Error::Runtime(format!("cannot start the telemetry thread: {e}")))?
        };
        Ok(Running {
            telemetry,
            thread: Some(thread),
        })
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Flushes every recorded sample and stops the thread.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.telemetry.full_tx.send(Message::Stop);
            let _ = thread.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_now();
    }
}

struct Files {
    duration: PathBuf,
    runtime: PathBuf,
}

fn run_thread(telemetry: &Telemetry, full_rx: &Receiver<Message>, files: &Files, sampler: Sampler) {
    let mut next_sample = Instant::now();
    let mut next_flush = Instant::now() + FLUSH_INTERVAL;
    let mut reported_drops = 0;
    loop {
        let now = Instant::now();
        if now >= next_sample {
            sampler.sample(telemetry);
            next_sample = now + SAMPLE_INTERVAL;
        }
        if now >= next_flush {
            if let Some(buffer) = telemetry.take_active() {
                write_out(telemetry, files, buffer);
            }
            next_flush = now + FLUSH_INTERVAL;
            let dropped = telemetry.dropped();
            if dropped > reported_drops {
                tracing::warn!(
                    dropped = dropped - reported_drops,
                    "telemetry samples dropped: the writer fell behind the recorders"
                );
                reported_drops = dropped;
            }
        }
        let wake = next_sample.min(next_flush);
        match full_rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(Message::Full(buffer)) => write_out(telemetry, files, buffer),
            Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    // Stopping: one last sample, then everything still queued or active.
    sampler.sample(telemetry);
    while let Ok(message) = full_rx.try_recv() {
        if let Message::Full(buffer) = message {
            write_out(telemetry, files, buffer);
        }
    }
    if let Some(buffer) = telemetry.take_active() {
        write_out(telemetry, files, buffer);
    }
}

/// Appends a buffer's rows to the two files. Rows are formatted straight into csv's own
/// 8 KiB write buffer, numbers through itoa and ryu: no allocation per row, and no copy of
/// the whole buffer as text (which cost ~0.5 MiB of RSS). Each process has files of its
/// own, so how the rows are split into writes does not matter.
fn write_out(telemetry: &Telemetry, files: &Files, buffer: Vec<Sample>) {
    let result = (|| -> std::io::Result<()> {
        let labels = telemetry.labels.read();
        let mut pid = itoa::Buffer::new();
        let pid = pid.format(telemetry.pid).to_owned();
        let mut duration = csv_appender(&files.duration)?;
        let mut runtime = csv_appender(&files.runtime)?;
        let (mut at, mut value) = (itoa::Buffer::new(), ryu::Buffer::new());
        for sample in &buffer {
            let Some((name, series)) = labels.get(sample.label.0 as usize) else {
                continue;
            };
            let writer = match series {
                Series::Duration => &mut duration,
                Series::Runtime => &mut runtime,
            };
            writer.write_field(at.format(sample.at_ns))?;
            writer.write_field(value.format(sample.value))?;
            writer.write_field(name)?;
            writer.write_field(&pid)?;
            writer.write_record(None::<&[u8]>)?;
        }
        duration.flush()?;
        runtime.flush()
    })();
    if let Err(e) = result {
        tracing::warn!(dir = %files.duration.parent().unwrap_or(Path::new("")).display(), "writing telemetry failed: {e}");
    }
    telemetry.give_back(buffer);
}

/// A CSV writer appending to `path` (header included if the file is new), after rotating
/// the file if it reached `MAX_FILE_BYTES`.
fn csv_appender(path: &Path) -> std::io::Result<csv::Writer<std::fs::File>> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= MAX_FILE_BYTES) {
        rotate(path)?;
    }
    append(path, "")?;
    let file = OpenOptions::new().append(true).open(path)?;
    Ok(csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(file))
}

/// `name-<pid>.csv` → `name-<pid>.1.csv`, `.1` → `.2`, …, dropping the one past
/// `KEEP_ROTATED`. Each process rotates only its own files.
fn rotate(path: &Path) -> std::io::Result<()> {
    let numbered = |n: usize| path.with_extension(format!("{n}.csv"));
    let _ = std::fs::remove_file(numbered(KEEP_ROTATED));
    for n in (1..KEEP_ROTATED).rev() {
        let _ = std::fs::rename(numbered(n), numbered(n + 1));
    }
    std::fs::rename(path, numbered(1))
}

/// Removes the telemetry files of processes no longer running, all but the newest
/// `KEEP_DEAD_FILES`. Files of live processes (another foreman sharing the directory) are
/// never touched.
fn prune_dead(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut dead: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let rest = name
                .strip_prefix("duration-")
                .or_else(|| name.strip_prefix("runtime-"))?
                .strip_suffix(".csv")?;
            let pid: i32 = rest.split('.').next()?.parse().ok()?;
            if crate::pidfile::process_exists(pid) {
                return None;
            }
            Some((entry.metadata().ok()?.modified().ok()?, entry.path()))
        })
        .collect();
    if dead.len() <= KEEP_DEAD_FILES {
        return;
    }
    dead.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    let old = dead.split_off(KEEP_DEAD_FILES);
    let removed = old
        .iter()
        .filter(|(_, path)| std::fs::remove_file(path).is_ok())
        .count();
    tracing::info!(
        dir = %dir.display(),
        removed,
        "removed telemetry files of foremen no longer running (the newest {KEEP_DEAD_FILES} are kept)"
    );
}

/// Appends `rows` in one write, writing the header first if the file is new.
fn append(path: &Path, rows: &str) -> std::io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    let mut text = String::new();
    if file.metadata()?.len() == 0 {
        text.push_str(HEADER);
        text.push('\n');
    }
    text.push_str(rows);
    if !text.is_empty() {
        file.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// The once-a-second runtime sample.
struct Sampler {
    /// QuantumLeap's own runtime series (`server/telemetry/sampler.py`, `ProcSampler`):
    /// getrusage's user and system seconds and maximum RSS (KiB on Linux), under its
    /// labels, so that its `TelemetryDB.user_time()`, `system_time()` and `max_rss()`
    /// find them.
    ql_user: Label,
    ql_system: Label,
    ql_max_rss: Label,
    rss: Label,
    user: Label,
    system: Label,
    threads: Label,
    fds: Label,
    due: Label,
    running: Label,
    /// Clock ticks per second, for /proc's CPU times.
    ticks: f64,
}

impl Sampler {
    fn new(t: &Telemetry) -> Sampler {
        Sampler {
            ql_user: t.label("user time", Series::Runtime),
            ql_system: t.label("system time", Series::Runtime),
            ql_max_rss: t.label("max rss", Series::Runtime),
            rss: t.label("rss_bytes", Series::Runtime),
            user: t.label("cpu_user_seconds", Series::Runtime),
            system: t.label("cpu_system_seconds", Series::Runtime),
            threads: t.label("threads", Series::Runtime),
            fds: t.label("open_fds", Series::Runtime),
            due: t.label("tasks_due", Series::Runtime),
            running: t.label("tasks_running", Series::Runtime),
            ticks: ProcStat::ticks_per_second(),
        }
    }

    fn sample(&self, t: &Telemetry) {
        // SAFETY: getrusage(2) writes into the zeroed struct it is given; no other memory.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            (libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0).then_some(usage)
        };
        if let Some(u) = usage {
            let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
            t.record(self.ql_user, seconds(u.ru_utime));
            t.record(self.ql_system, seconds(u.ru_stime));
            t.record(self.ql_max_rss, u.ru_maxrss as f64);
        }
        if let Some(stat) = ProcStat::read_self() {
            t.record(self.rss, stat.rss_bytes as f64);
            t.record(self.user, stat.utime_ticks as f64 / self.ticks);
            t.record(self.system, stat.stime_ticks as f64 / self.ticks);
            t.record(self.threads, stat.threads as f64);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            t.record(self.fds, fds.count() as f64);
        }
        if let Some((due, running)) = t.queue.read() {
            t.record(self.due, due as f64);
            t.record(self.running, running as f64);
        }
    }
}

/// The fields of /proc/self/stat that telemetry (and the live view's heartbeat) use.
pub(crate) struct ProcStat {
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    pub threads: u64,
    pub rss_bytes: u64,
}

impl ProcStat {
    /// Clock ticks per second, the unit of the CPU times.
    pub fn ticks_per_second() -> f64 {
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 { ticks as f64 } else { 100.0 }
    }

    pub fn read_self() -> Option<ProcStat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may contain spaces: split after
        // its closing parenthesis. Fields from 3 on are then numbered from index 0.
        let rest = &text[text.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        // SAFETY: sysconf only reads a configuration value.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        Some(ProcStat {
            utime_ticks: field(14)?,
            stime_ticks: field(15)?,
            threads: field(20)?,
            rss_bytes: field(24)? * page,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses() {
        let stat = ProcStat::read_self().unwrap();
        assert!(stat.threads >= 1);
        assert!(stat.rss_bytes > 0);
    }

    /// Issue 13, item 17: a file that reached its size is rotated, with at most
    /// `KEEP_ROTATED` old ones kept; the new file starts with the header.
    #[test]
    fn a_full_file_is_rotated_and_old_ones_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("duration-7.csv");
        for round in 0..KEEP_ROTATED + 2 {
            // A sparse file of the full size stands for one written full.
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            file.set_len(MAX_FILE_BYTES).unwrap();
            drop(file);
            let mut writer = csv_appender(&path).unwrap();
            writer
                .write_record(["1", "2", &format!("round-{round}"), "7"])
                .unwrap();
            writer.flush().unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(text, format!("{HEADER}\n1,2,round-{round},7\n"));
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "duration-7.1.csv",
                "duration-7.2.csv",
                "duration-7.3.csv",
                "duration-7.csv"
            ]
        );
        // The newest rotated file is the one written just before the last rotation.
        let newest = std::fs::read(dir.path().join("duration-7.1.csv")).unwrap();
        assert_eq!(newest.len() as u64, MAX_FILE_BYTES);
    }

    /// Files of dead processes beyond the newest KEEP_DEAD_FILES are removed at start;
    /// a live process's files are kept whatever their age.
    #[test]
    fn files_of_dead_foremen_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        // Pids above the kernel's pid_max are never running.
        let dead = |n: usize| format!("runtime-{}.csv", 999_999_000 + n);
        for n in 0..KEEP_DEAD_FILES + 5 {
            std::fs::write(dir.path().join(dead(n)), HEADER).unwrap();
            // Distinct modification times, oldest first.
            std::thread::sleep(Duration::from_millis(5));
        }
        let mine = format!("duration-{}.csv", std::process::id());
        std::fs::write(dir.path().join(&mine), HEADER).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        prune_dead(dir.path());
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left.len(), KEEP_DEAD_FILES + 2, "{left:?}");
        assert!(left.contains(&mine) && left.contains(&"notes.txt".to_owned()));
        for n in 0..5 {
            assert!(!left.contains(&dead(n)), "the oldest {} was kept", dead(n));
        }
    }

    #[test]
    fn samples_are_small() {
        assert_eq!(std::mem::size_of::<Sample>(), 24);
    }

    /// (label, value) of every row of a file written by `write_out`.
    fn rows(path: &Path) -> Vec<(String, f64)> {
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(HEADER));
        lines
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                assert_eq!(f.len(), 4, "{l}");
                assert_eq!(f[3], std::process::id().to_string());
                f[0].parse::<i64>().unwrap();
                (f[2].to_owned(), f[1].parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn samples_from_8_threads_are_all_written_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let running = Running::start(dir.path()).unwrap();
        const PER_THREAD: usize = 2_500;
        std::thread::scope(|s| {
            for t in 0..8 {
                let telemetry = Arc::clone(running.telemetry());
                s.spawn(move || {
                    let label = telemetry.label(&format!("task:t{t}"), Series::Duration);
                    for i in 0..PER_THREAD {
                        telemetry.record(label, i as f64);
                    }
                });
            }
        });
        // 20,000 samples: more than one buffer (so buffers were handed over while
        // recording) and fewer than all of them (so none could be dropped).
        const { assert!(8 * PER_THREAD > SAMPLES_PER_BUFFER) };
        const { assert!(8 * PER_THREAD < SAMPLES_PER_BUFFER * BUFFERS) };
        assert_eq!(running.telemetry().dropped(), 0);
        running.stop();
        let pid = std::process::id();
        let durations = rows(&dir.path().join(format!("duration-{pid}.csv")));
        for t in 0..8 {
            let mut values: Vec<f64> = durations
                .iter()
                .filter(|(l, _)| *l == format!("task:t{t}"))
                .map(|(_, v)| *v)
                .collect();
            values.sort_by(f64::total_cmp);
            let expected: Vec<f64> = (0..PER_THREAD).map(|i| i as f64).collect();
            assert_eq!(values, expected, "thread {t}");
        }
        // The runtime file has the sampler's figures.
        let runtime = rows(&dir.path().join(format!("runtime-{pid}.csv")));
        assert!(runtime.iter().any(|(l, v)| l == "rss_bytes" && *v > 0.0));
        assert!(runtime.iter().any(|(l, _)| l == "threads"));
    }

    #[test]
    fn the_buffer_never_exceeds_its_cap_and_losses_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let running = Running::start(dir.path()).unwrap();
        let telemetry = Arc::clone(running.telemetry());
        let label = telemetry.label("task:storm", Series::Duration);
        let done = std::sync::atomic::AtomicBool::new(false);
        const PER_THREAD: usize = 250_000;
        let max_reserved = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut max = 0;
                while !done.load(Ordering::Relaxed) {
                    max = max.max(telemetry.reserved_bytes());
                    std::thread::yield_now();
                }
                max
            });
            let writers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        for i in 0..PER_THREAD {
                            telemetry.record(label, i as f64);
                        }
                    })
                })
                .collect();
            for w in writers {
                w.join().unwrap();
            }
            done.store(true, Ordering::Relaxed);
            watcher.join().unwrap()
        });
        assert!(max_reserved > 0);
        assert!(max_reserved <= CAP_BYTES, "{max_reserved} bytes reserved");
        let dropped = telemetry.dropped() as usize;
        running.stop();
        let pid = std::process::id();
        let written = rows(&dir.path().join(format!("duration-{pid}.csv")))
            .iter()
            .filter(|(l, _)| l == "task:storm")
            .count();
        // Every sample is either written or counted as dropped.
        assert_eq!(written + dropped, 4 * PER_THREAD);
    }
}
