//! The worker pool: a fixed set of named threads, started once (invariant 6).
//!
//! The foreman sends a claimed task or a monitor round only when it counts a free slot,
//! so the job channel never fills. Every job, task or round, runs inside `catch_unwind`
//! under a `Slot` guard whose `Drop` reports the outcome back to the foreman: a panic
//! never leaks a slot (invariant 7).
//! Workers never touch the queue (invariant 8): they get rows already claimed.
//!
//! Idle workers do not wait on the job channel itself: a receiver blocked there is woken
//! by every send, and waking a sleeping thread costs tens of µs on these VMs. Up to
//! `Pool::set_pollers` idle workers poll the channel while the foreman has a backlog; the
//! others sleep until a wake token (`Idle`) comes. A job sent while fewer poll wakes a
//! sleeper; a worker that takes a job and sees more queued wakes one more, so a queued job
//! does not wait for a running one while a worker sleeps. Except while jobs take less than
//! `TINY_JOB` lately (a drain of noops): then the worker runs the queued ones itself, one
//! after the other, which costs less than waking a helper; should its job run long after
//! all, the foreman's loop wakes a sleeper once jobs have sat queued for
//! `Pool::QUEUED_GRACE` (`Pool::attend`). The foreman lets every idle worker poll on
//! SQLite, whose claims come back in microseconds, and one on a broker, whose claims wait
//! for a round trip during which pollers would only take the CPU the broker needs.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded};
use serde_json::Value;

use crate::clock::now_micros;
use crate::command::{self, Ended};
use crate::error::{Error, Result};
use crate::live::{Event, Publisher};
use crate::monitor::{Probe, Round, RoundError};
use crate::queue::Claimed;
use crate::registry::{Args, Entry, Registry, Runner, TaskContext};
use crate::tasks_file::CommandTask;
use crate::telemetry::{Label, Series, Telemetry};

/// How a task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    /// The task returned an error.
    Failed(String),
    /// The task panicked.
    Panicked(String),
    /// The row could not be run: unknown name or arguments that do not bind, or a
    /// command that could not be started.
    Rejected(String),
    /// The task ran past its timeout (a command was killed; a Rust task returned late).
    TimedOut(String),
    /// The foreman stopped it at its graceful deadline (a command, killed).
    Abandoned(String),
    /// A monitor round ended (with data or an error of its own).
    Round(Box<RoundDone>),
}

/// What a worker runs.
pub enum Job {
    /// A task, claimed (deleted) from the queue.
    Task(Claimed),
    /// One round of a monitor.
    Round(RoundJob),
}

/// One round of a monitor: its probe (the validated config) and the state its last round
/// left.
pub struct RoundJob {
    pub name: String,
    pub kind: String,
    pub version: i64,
    pub probe: Arc<dyn Probe>,
    pub state: Value,
}

/// Names a job in the foreman's `running` map.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobKey {
    Task(i64),
    /// A monitor's round, by name and config version: rounds of one version never overlap.
    Round(String, i64),
}

/// A finished task, as reported to the foreman.
#[derive(Debug)]
pub struct Done {
    pub key: JobKey,
    pub outcome: Outcome,
    pub duration: Duration,
    /// How a command task's process ended, and its output (None for other jobs).
    pub command: Option<Box<CommandEnd>>,
}

/// How a command's process ended, for its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandEnd {
    pub exit_code: Option<i32>,
    /// The signal's name (`SIGKILL`), if a signal ended it.
    pub signal: Option<String>,
    /// The tail of its stdout and stderr.
    pub output: Vec<u8>,
    /// Whether output before the tail was dropped.
    pub truncated: bool,
}

/// A finished round, as reported to the foreman.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundDone {
    pub kind: String,
    pub round: Round,
    /// When the round started, Unix µs.
    pub started_us: i64,
}

pub(crate) struct Pool {
    /// Claimed tasks to the workers. Capacity = worker count; the foreman sends only when
    /// it has a free slot, so a send never blocks. `None` once the pool is shutting down.
    jobs: Option<Sender<Job>>,
    handles: Vec<JoinHandle<()>>,
    /// Whether the foreman has a backlog: its last claim filled every slot it asked for.
    /// Written by the foreman after each claim, read by idle workers to decide whether to
    /// poll for their next job; a hint, so Relaxed.
    backlog: Arc<AtomicBool>,
    shared: Arc<Shared>,
    /// When the foreman last sent a job (`attend` measures the grace from it). The
    /// foreman's thread alone owns the pool: a Cell.
    last_submit: Cell<Instant>,
}

/// How long an idle worker polls (yielding the CPU) for its next job while the foreman has
/// a backlog, before it sleeps. Waking a sleeping thread costs tens of µs on
/// these VMs; polling for the next claim instead took the 4-worker drain of noops from
/// ~55k to ~65k tasks/s with `normal`, and from ~11k to ~16k with `full` (BENCHMARKS.md;
/// 100 µs gave the lower figures).
const WORKER_SPIN: Duration = Duration::from_millis(1);

/// Jobs shorter than this lately (a moving average) are run back to back by the worker
/// that finds them queued: about what waking a sleeping worker costs on these VMs. A
/// helper woken for each batch of noops took the SQLite drain from 85k to 55k tasks/s.
const TINY_JOB: Duration = Duration::from_micros(50);

impl Pool {
    /// Starts `workers` threads named `snapq-worker-N`; each reports finished tasks on
    /// `done` (whose capacity must be at least `workers`, one outstanding report a slot),
    /// records each task's wait and duration in `telemetry`, if given, and publishes each
    /// task's start, progress and end to `live`, if given.
    pub fn start(
        workers: usize,
        registry: Arc<Registry>,
        done: Sender<Done>,
        telemetry: Option<Arc<Telemetry>>,
        live: Option<Publisher>,
    ) -> Result<Pool> {
        let (jobs_tx, jobs_rx) = bounded::<Job>(workers);
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(workers);
        let backlog = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            current: RwLock::new(Arc::new(Current::new(registry, telemetry.as_ref()))),
            telemetry,
            done,
            backlog: Arc::clone(&backlog),
            live,
            stop: Arc::new(AtomicBool::new(false)),
            commands_running: AtomicUsize::new(0),
            idle: Idle::new(workers),
        });
        for n in 0..workers {
            let jobs = jobs_rx.clone();
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("snapq-worker-{n}"))
                .spawn(move || work(&jobs, &shared))
                .map_err(|e| Error::Runtime(format!("cannot start worker thread {n}: {e}")))?;
            handles.push(handle);
        }
        Ok(Pool {
            jobs: Some(jobs_tx),
            handles,
            backlog,
            shared,
            last_submit: Cell::new(Instant::now()),
        })
    }

    /// Tasks claimed from now on run with `registry` (SIGHUP's reload of the tasks file);
    /// tasks running keep the entry they started with.
    pub fn reload(&self, registry: Registry) {
        let current = Arc::new(Current::new(
            Arc::new(registry),
            self.shared.telemetry.as_ref(),
        ));
        // A poisoned lock only means a worker panicked while cloning the Arc; the value
        // is whole either way.
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = current;
    }

    /// How many command tasks run now.
    pub fn commands_running(&self) -> usize {
        self.shared.commands_running.load(Ordering::Relaxed)
    }

    /// Asks every running task to stop (the graceful deadline passed): commands get
    /// SIGTERM, then SIGKILL `kill_after` later; Rust tasks see `TaskContext::cancelled`.
    pub fn stop_tasks(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }

    /// How long jobs may sit queued with nobody taking them before `attend` wakes a
    /// sleeping worker for them.
    pub const QUEUED_GRACE: Duration = Duration::from_millis(1);

    /// Wakes a sleeping worker for jobs still queued `QUEUED_GRACE` after the last was
    /// sent (queued behind a running one that seemed tiny and runs long). Returns when to
    /// call it again while jobs are queued, None if none are.
    pub fn attend(&self) -> Option<Instant> {
        let jobs = self.jobs.as_ref()?;
        if jobs.is_empty() {
            return None;
        }
        if self.last_submit.get().elapsed() >= Self::QUEUED_GRACE {
            self.shared.idle.wake_one();
        }
        Some(Instant::now() + Self::QUEUED_GRACE)
    }

    /// How many idle workers may poll for jobs at once.
    pub fn set_pollers(&self, most: usize) {
        self.shared
            .idle
            .most_polling
            .store(most.max(1), Ordering::Relaxed);
    }

    /// Tells idle workers whether a next job is likely to come soon (`WORKER_SPIN`).
    pub fn set_backlog(&self, backlog: bool) {
        self.backlog.store(backlog, Ordering::Relaxed);
    }

    /// Hands a claimed task to a free worker. The caller guarantees a free slot.
    pub fn submit(&self, job: Job) -> Result<()> {
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| Error::Runtime("the worker pool is shut down".into()))?;
        jobs.try_send(job).map_err(|e| {
            Error::Runtime(format!(
                "no free worker although a slot was counted free: {e}"
            ))
        })?;
        self.last_submit.set(Instant::now());
        // Pairs with the fence a poller passes before its last look (`next_job`): either it
        // sees this job or this sees it gone and wakes a sleeper.
        fence(Ordering::SeqCst);
        self.shared.idle.wake_one();
        Ok(())
    }

    /// Closes the job channel and joins every worker. Call it only when no task runs.
    pub fn join(mut self) {
        self.jobs = None;
        self.shared.idle.wake_all();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }

    /// Leaves the workers running (tasks past the graceful deadline); they end with the
    /// process.
    pub fn abandon(mut self) {
        self.jobs = None;
        self.handles.clear();
    }
}

/// What every worker shares.
struct Shared {
    /// The tasks and their telemetry labels. The lock protects the swap on reload
    /// (`Pool::reload`, the foreman's thread); a worker holds it only to clone the Arc
    /// when a task starts.
    current: RwLock<Arc<Current>>,
    telemetry: Option<Arc<Telemetry>>,
    done: Sender<Done>,
    /// See `Pool::backlog`.
    backlog: Arc<AtomicBool>,
    /// The live view's event queue, if the foreman serves one (src/live/mod.rs).
    live: Option<Publisher>,
    /// Set once, by `Pool::stop_tasks`; read by running commands every poll step and by
    /// Rust tasks through `TaskContext::cancelled`. Relaxed: a request that guards no
    /// other data.
    stop: Arc<AtomicBool>,
    /// Command tasks running now: counted up and down by the workers around each one,
    /// read by the foreman when it stops. Relaxed: a count, no data hangs on it.
    commands_running: AtomicUsize,
    idle: Idle,
}

/// How idle workers wait for their next job (the module's comment).
struct Idle {
    /// Idle workers polling the job channel, plus wake tokens sent with `true` and not yet
    /// taken (a token passes its count to the worker that takes it): at most
    /// `most_polling`. Changed with fetch-update or fetch-sub, SeqCst: with the fences in
    /// `Pool::submit` and `next_job` it makes sure a job sent as the last poller leaves is
    /// either seen by it or wakes a sleeper.
    polling: AtomicUsize,
    /// Wake tokens to sleeping workers: `true` to poll (counted in `polling`), `false` to
    /// look once (the pool is closing). Capacity: one a worker, beside the one counted.
    tokens_tx: Sender<bool>,
    tokens_rx: Receiver<bool>,
    /// How long jobs take lately (µs, a moving average of about the last eight, tasks and
    /// monitor rounds alike), for `TINY_JOB`. A hint that guards no data: Relaxed.
    typical_us: AtomicU64,
    /// How many idle workers may poll at once (`Pool::set_pollers`); a hint: Relaxed.
    most_polling: AtomicUsize,
}

impl Idle {
    fn new(workers: usize) -> Idle {
        let (tokens_tx, tokens_rx) = bounded(workers + 1);
        Idle {
            polling: AtomicUsize::new(0),
            tokens_tx,
            tokens_rx,
            most_polling: AtomicUsize::new(workers),
            // Not tiny until jobs show it: a pool that starts with long jobs wakes helpers.
            typical_us: AtomicU64::new(8 * TINY_JOB.as_micros() as u64),
        }
    }

    /// Counts one more poller in `polling` unless `most_polling` are counted already.
    fn take_poll(&self) -> bool {
        let most = self.most_polling.load(Ordering::Relaxed);
        self.polling
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < most).then_some(n + 1)
            })
            .is_ok()
    }

    /// Wakes a sleeping worker to poll for jobs, unless `most_polling` workers poll or are
    /// woken to already.
    fn wake_one(&self) {
        if self.take_poll() && self.tokens_tx.try_send(true).is_err() {
            // Only once `wake_all` has filled the channel (the pool is closing): give the
            // count back rather than leave it saying somebody polls.
            self.polling.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Wakes every sleeping worker once (the job channel is closed: they leave).
    fn wake_all(&self) {
        while self.tokens_tx.try_send(false).is_ok() {}
    }
}

/// The registry the workers run tasks from, with its telemetry labels.
struct Current {
    registry: Arc<Registry>,
    timing: Option<Timing>,
}

impl Current {
    fn new(registry: Arc<Registry>, telemetry: Option<&Arc<Telemetry>>) -> Current {
        Current {
            timing: telemetry.map(|t| Timing::new(Arc::clone(t), &registry)),
            registry,
        }
    }
}

/// Telemetry labels for each registered task and monitor kind, interned once at startup
/// so that recording a sample costs no lookup or allocation.
struct Timing {
    telemetry: Arc<Telemetry>,
    /// Indexed by `Entry::id`: (`task:<name>`, `wait:<name>`).
    labels: Vec<(Label, Label)>,
    /// (kind, `monitor:<kind>`) for every monitor kind.
    rounds: Vec<(&'static str, Label)>,
}

impl Timing {
    fn new(telemetry: Arc<Telemetry>, registry: &Registry) -> Timing {
        let mut labels = vec![None; registry.len()];
        for entry in registry.entries() {
            labels[entry.id] = Some((
                telemetry.label(&format!("task:{}", entry.name), Series::Duration),
                telemetry.label(&format!("wait:{}", entry.name), Series::Duration),
            ));
        }
        let fallback = telemetry.label("task:?", Series::Duration);
        let rounds = crate::monitor::KINDS
            .iter()
            .map(|k| {
                (
                    k.name(),
                    telemetry.label(&format!("monitor:{}", k.name()), Series::Duration),
                )
            })
            .collect();
        Timing {
            rounds,
            labels: labels
                .into_iter()
                .map(|l| l.unwrap_or((fallback, fallback)))
                .collect(),
            telemetry,
        }
    }
}

impl Timing {
    fn round_label(&self, kind: &str) -> Option<Label> {
        self.rounds
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, l)| *l)
    }
}

/// The next job, or None once the pool is closed: taken if one waits; else polled for
/// (yielding the CPU) while the foreman has a backlog, by `most_polling` workers at most; else slept
/// for until a wake token comes (`Idle`). `polling` says whether this worker is counted in
/// `Idle::polling`.
fn next_job(jobs: &Receiver<Job>, shared: &Shared, polling: &mut bool) -> Option<Job> {
    let idle = &shared.idle;
    let backlog = || shared.backlog.load(Ordering::Relaxed);
    loop {
        if !*polling && backlog() && idle.take_poll() {
            *polling = true;
        }
        if *polling {
            let until = Instant::now() + WORKER_SPIN;
            loop {
                match jobs.try_recv() {
                    Ok(job) => {
                        idle.polling.fetch_sub(1, Ordering::SeqCst);
                        *polling = false;
                        return Some(job);
                    }
                    Err(TryRecvError::Disconnected) => return None,
                    Err(TryRecvError::Empty) => {}
                }
                if !backlog() || Instant::now() >= until {
                    break;
                }
                std::thread::yield_now();
            }
            idle.polling.fetch_sub(1, Ordering::SeqCst);
            *polling = false;
        }
        // The last look before sleeping: pairs with the fence in `Pool::submit`.
        fence(Ordering::SeqCst);
        match jobs.try_recv() {
            Ok(job) => return Some(job),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
        match idle.tokens_rx.recv() {
            Ok(to_poll) => *polling = to_poll,
            Err(_) => return None,
        }
    }
}

/// One job path: a task or a monitor round runs under a `Slot` guard, whose drop reports
/// it to the foreman however it ends, unwinding included.
fn work(jobs: &Receiver<Job>, shared: &Shared) {
    let idle = &shared.idle;
    let mut polling = false;
    while let Some(job) = next_job(jobs, shared, &mut polling) {
        // More queued behind this one: a sleeper takes them (if fewer than the allowed
        // pollers poll), rather than wait for this job to end, unless jobs are tiny
        // lately (`TINY_JOB`).
        let typical = idle.typical_us.load(Ordering::Relaxed);
        if !jobs.is_empty() && typical >= TINY_JOB.as_micros() as u64 {
            idle.wake_one();
        }
        let began = Instant::now();
        let key = match &job {
            Job::Task(task) => JobKey::Task(task.id),
            Job::Round(round) => JobKey::Round(round.name.clone(), round.version),
        };
        let mut slot = Slot {
            done: &shared.done,
            key,
            name: None,
            started: began,
            // Stays Panicked only if something below unwinds past catch_unwind.
            outcome: Outcome::Panicked("the worker unwound outside the task".into()),
            timing: None,
            command: None,
            live: shared.live.as_ref(),
            ran: false,
        };
        slot.outcome = match job {
            Job::Task(task) => run_one(&task, shared, &mut slot),
            Job::Round(round) => run_round(round, shared),
        };
        let took = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
        let typical = idle.typical_us.load(Ordering::Relaxed);
        idle.typical_us
            .store(typical / 8 * 7 + took / 8, Ordering::Relaxed);
    }
}

fn run_one<'a>(task: &Claimed, shared: &'a Shared, slot: &mut Slot<'a>) -> Outcome {
    let current = Arc::clone(&shared.current.read().unwrap_or_else(|e| e.into_inner()));
    let registry = &current.registry;
    if let Some(problem) = &task.unreadable {
        slot.name = Some(Arc::from(task.task_name.as_str()));
        return Outcome::Rejected(problem.clone());
    }
    let Some(entry) = registry.entry(&task.task_name) else {
        slot.name = Some(Arc::from(task.task_name.as_str()));
        return Outcome::Rejected(format!(
            "unknown task {:?}; this foreman knows: {}",
            task.task_name,
            registry.names()
        ));
    };
    slot.name = Some(Arc::clone(&entry.name));
    let parse = |what: &str, text: &str| {
        serde_json::from_str::<Value>(text)
            .map_err(|e| format!("{what} {text:?} is not valid JSON: {e}"))
    };
    let bound = parse("args", &task.args)
        .and_then(|args| Ok((args, parse("kwargs", &task.kwargs)?)))
        .and_then(|(args, kwargs)| entry.spec.bind(&args, &kwargs).map_err(|e| e.to_string()));
    let args = match bound {
        Ok(args) => args,
        Err(message) => return Outcome::Rejected(message),
    };
    let timeout = match &entry.runner {
        Runner::Rust { timeout, .. } => *timeout,
        Runner::Command(command) => command.timeout,
    };
    let mut ctx = TaskContext::with_live(task.id, Arc::clone(&entry.name), shared.live.clone())
        .cancellable(timeout, Arc::clone(&shared.stop));
    ctx.attempt = task.attempt;
    // How long after its due time the task starts: the foreman's lateness, which is
    // what an operator watches (the wait since creation includes any --delay).
    let now = now_micros();
    let late_ms = (now - task.due) as f64 / 1e3;
    tracing::info!(id = task.id, task = %entry.name, late_ms, "task started");
    if let Some(live) = &shared.live {
        // Uncounted when the slot drops (`Slot::drop`, unwinding included).
        live.task_started();
        live.publish(Event::TaskStarted {
            id: task.id,
            task: Arc::clone(&entry.name),
            at: now,
            late_ms,
        });
    }
    slot.ran = true;
    if let Some(timing) = &current.timing {
        let (duration, wait) = timing.labels[entry.id];
        let waited = (now - task.created_at).max(0) as f64 / 1e6;
        timing.telemetry.record(wait, waited);
        slot.timing = Some((Arc::clone(&timing.telemetry), duration));
    }
    slot.started = Instant::now();
    match &entry.runner {
        Runner::Rust { run, timeout } => {
            let outcome = match catch_unwind(AssertUnwindSafe(|| run(&ctx, &args))) {
                Ok(Ok(())) => Outcome::Succeeded,
                Ok(Err(e)) => Outcome::Failed(e.to_string()),
                Err(payload) => Outcome::Panicked(panic_message(payload.as_ref())),
            };
            match timeout {
                _ if shared.stop.load(Ordering::Relaxed) => Outcome::Abandoned(format!(
                    "the foreman stopped it at its graceful deadline ({})",
                    match outcome {
                        Outcome::Succeeded => "it returned success after it".to_owned(),
                        Outcome::Failed(e) | Outcome::Panicked(e) => e,
                        _ => String::new(),
                    }
                )),
                Some(limit) if slot.started.elapsed() >= *limit => Outcome::TimedOut(format!(
                    "ran past its timeout of {} s ({})",
                    limit.as_secs_f64(),
                    match outcome {
                        Outcome::Succeeded => "it returned success after it".to_owned(),
                        Outcome::Failed(e) | Outcome::Panicked(e) => e,
                        _ => String::new(),
                    }
                )),
                _ => outcome,
            }
        }
        Runner::Command(command) => run_command(task, entry, command, &args, &ctx, shared, slot),
    }
}

/// Runs a command task on this worker (src/command.rs) and says how it ended; its exit
/// code, signal and output go to the slot, for the record.
fn run_command(
    task: &Claimed,
    entry: &Entry,
    command: &CommandTask,
    args: &Args,
    ctx: &TaskContext,
    shared: &Shared,
    slot: &mut Slot<'_>,
) -> Outcome {
    let argv = match command.argv(args.by_name()) {
        Ok(argv) => argv,
        Err(e) => return Outcome::Rejected(e),
    };
    let env = [
        ("SNAPQ_TASK_ID", task.id.to_string()),
        ("SNAPQ_TASK_NAME", entry.spec.name.clone()),
        ("SNAPQ_ATTEMPT", task.attempt.to_string()),
    ];
    let mut progress = |line: &[u8]| ctx.progress(f64::NAN, String::from_utf8_lossy(line));
    let on_line: Option<&mut command::OnLine<'_>> = if ctx.wants_progress() {
        Some(&mut progress)
    } else {
        None
    };
    shared.commands_running.fetch_add(1, Ordering::Relaxed);
    let run = command::run(command, &argv, &env, &shared.stop, on_line);
    shared.commands_running.fetch_sub(1, Ordering::Relaxed);
    let signal = run.signal.map(signal_name);
    let how = match (&run.exit_code, &signal) {
        (Some(code), _) => format!("it exited with code {code}"),
        (None, Some(signal)) => format!("SIG{signal} ended it"),
        (None, None) => String::new(),
    };
    let outcome = match &run.ended {
        Ended::Exited(0) => Outcome::Succeeded,
        Ended::Exited(code) => Outcome::Failed(format!("exited with code {code}")),
        Ended::Signalled(_) => Outcome::Failed(match &signal {
            Some(signal) => format!("killed by SIG{signal}"),
            None => "killed by a signal".to_owned(),
        }),
        Ended::TimedOut => Outcome::TimedOut(format!(
            "ran past its timeout of {} s: SIGTERM to its process group, SIGKILL {} s later if needed; {how}",
            command.timeout.map_or(0.0, |t| t.as_secs_f64()),
            command.kill_after.as_secs_f64()
        )),
        Ended::Stopped => Outcome::Abandoned(format!(
            "the foreman stopped it at its graceful deadline: SIGTERM to its process group, SIGKILL {} s later if needed; {how}",
            command.kill_after.as_secs_f64()
        )),
        Ended::NotStarted(e) => {
            return Outcome::Rejected(format!("could not start the command: {e}"));
        }
    };
    slot.command = Some(Box::new(CommandEnd {
        exit_code: run.exit_code,
        signal,
        output: run.output,
        truncated: run.truncated,
    }));
    outcome
}

/// A signal's name as SPEC has it in records, without the `SIG` prefix (`KILL` for 9),
/// from the C library's own table (glibc 2.32); `signal N` for one it does not name.
fn signal_name(signal: i32) -> String {
    unsafe extern "C" {
        fn sigabbrev_np(sig: libc::c_int) -> *const libc::c_char;
    }
    // SAFETY: sigabbrev_np returns a pointer to a static string, or null.
    let name = unsafe { sigabbrev_np(signal) };
    if name.is_null() {
        return format!("signal {signal}");
    }
    // SAFETY: non-null: a NUL-terminated static string.
    unsafe { std::ffi::CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// Runs one round of a monitor; its result goes to the foreman as the slot's outcome.
fn run_round(job: RoundJob, shared: &Shared) -> Outcome {
    let started = Instant::now();
    let started_us = now_micros();
    let round =
        catch_unwind(AssertUnwindSafe(|| job.probe.round(&job.state))).unwrap_or_else(|payload| {
            Round {
                outcome: Err(RoundError::new(
                    "panicked",
                    format!("the round panicked: {}", panic_message(payload.as_ref())),
                )),
                state: job.state.clone(),
                panic: None,
            }
        });
    let duration = started.elapsed();
    let current = Arc::clone(&shared.current.read().unwrap_or_else(|e| e.into_inner()));
    if let Some(timing) = &current.timing
        && let Some(label) = timing.round_label(&job.kind)
    {
        timing.telemetry.record(label, duration.as_secs_f64());
    }
    let ms = round_ms(duration);
    match &round.outcome {
        Ok(_) => tracing::debug!(monitor = %job.name, kind = %job.kind, ms, "monitor round ok"),
        Err(e) => tracing::warn!(
            monitor = %job.name,
            kind = %job.kind,
            ms,
            code = %e.code,
            error = %e.message,
            "monitor round failed"
        ),
    }
    Outcome::Round(Box::new(RoundDone {
        kind: job.kind,
        round,
        started_us,
    }))
}

/// Milliseconds to the microsecond, so log lines read `ms=0.183`, not `0.18254900000000002`.
pub(crate) fn round_ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".into()
    }
}

/// A worker slot in use. Dropping it — after the task, or while unwinding — logs the
/// outcome and frees the slot by reporting to the foreman.
struct Slot<'a> {
    done: &'a Sender<Done>,
    /// The task's id, or the round's monitor and version.
    key: JobKey,
    name: Option<Arc<str>>,
    started: Instant,
    outcome: Outcome,
    /// Where to record the task's duration, once it has started running.
    timing: Option<(Arc<Telemetry>, Label)>,
    /// A command task's end, for its record.
    command: Option<Box<CommandEnd>>,
    /// Where to publish the task's end.
    live: Option<&'a Publisher>,
    /// Whether the task started (a rejected row did not).
    ran: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        if let Some((telemetry, label)) = &self.timing {
            telemetry.record(*label, duration.as_secs_f64());
        }
        let ms = round_ms(duration);
        let key = std::mem::replace(&mut self.key, JobKey::Task(0));
        let JobKey::Task(id) = key else {
            // A round: `run_round` logged it; a panic outside its catch_unwind leaves the
            // outcome Panicked, and the foreman frees the slot without a result.
            let _ = self.done.send(Done {
                key,
                outcome: std::mem::replace(&mut self.outcome, Outcome::Succeeded),
                duration,
                command: None,
            });
            return;
        };
        let task = self.name.as_deref().unwrap_or("?");
        match &self.outcome {
            // `%task`, as at the start: `task=noop`, not `task="noop"`.
            Outcome::Succeeded => tracing::info!(id, %task, ms, "task finished"),
            Outcome::Failed(error) => tracing::warn!(id, %task, ms, error, "task failed"),
            Outcome::Panicked(error) => tracing::error!(id, %task, ms, error, "task panicked"),
            Outcome::Rejected(error) => {
                tracing::error!(id, %task, error, "task rejected and deleted, not retried")
            }
            Outcome::TimedOut(error) => tracing::warn!(id, %task, ms, error, "task timed out"),
            Outcome::Abandoned(error) => {
                tracing::warn!(id, %task, ms, error, "task stopped at the graceful deadline")
            }
            Outcome::Round(_) => {}
        }
        if let Some(live) = self.live {
            if self.ran {
                live.task_ended();
            }
            self.publish_end(id, live, duration);
        }
        // The foreman is gone only if it abandoned us at its deadline.
        let _ = self.done.send(Done {
            key: JobKey::Task(id),
            outcome: std::mem::replace(&mut self.outcome, Outcome::Succeeded),
            duration,
            command: self.command.take(),
        });
    }
}

impl Slot<'_> {
    fn publish_end(&self, id: i64, live: &Publisher, duration: Duration) {
        let at = now_micros();
        let (reason, error) = match &self.outcome {
            Outcome::Succeeded => {
                live.publish(Event::TaskFinished {
                    id,
                    task: self.name.clone().unwrap_or_else(|| Arc::from("?")),
                    at,
                    duration,
                });
                return;
            }
            Outcome::Failed(e) => ("failed", e),
            Outcome::Panicked(e) => ("panicked", e),
            Outcome::Rejected(e) => ("rejected", e),
            Outcome::TimedOut(e) => ("timed_out", e),
            Outcome::Abandoned(e) => ("abandoned", e),
            Outcome::Round(_) => return,
        };
        live.publish(Event::TaskFailed {
            id,
            task: self.name.clone(),
            at,
            duration: self.ran.then_some(duration),
            reason,
            error: error.as_str().into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: i64, task: &str, args: &str) -> Job {
        Job::Task(Claimed {
            id,
            task_name: task.into(),
            args: args.into(),
            kwargs: "{}".into(),
            created_at: now_micros(),
            due: now_micros(),
            attempt: 1,
            unreadable: None,
        })
    }

    fn pool(workers: usize) -> (Pool, Receiver<Done>) {
        let (done_tx, done_rx) = bounded(workers);
        let pool = Pool::start(
            workers,
            Arc::new(Registry::with_builtins()),
            done_tx,
            None,
            None,
        )
        .unwrap();
        (pool, done_rx)
    }

    #[test]
    fn jobs_sent_together_run_side_by_side_whether_workers_poll_or_sleep() {
        for (backlog, pollers) in [(false, 4), (true, 1), (true, 4)] {
            let (pool, done) = pool(4);
            pool.set_backlog(backlog);
            pool.set_pollers(pollers);
            // Let the workers settle: asleep, or one of them polling.
            std::thread::sleep(Duration::from_millis(20));
            let started = Instant::now();
            for id in 0..4 {
                pool.submit(job(id, "sleep", "[0.3]")).unwrap();
            }
            for _ in 0..4 {
                let d = done.recv_timeout(Duration::from_secs(5)).unwrap();
                assert_eq!(d.outcome, Outcome::Succeeded);
            }
            // One after another would take 1.2 s: each queued job woke a sleeper.
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(900),
                "4 jobs of 0.3 s took {took:?} (backlog {backlog}, {pollers} polling)"
            );
            pool.join();
        }
    }

    #[test]
    fn a_job_sent_as_the_poller_gives_up_is_never_left_waiting() {
        // Jobs sent at moments around the end of the polling window (WORKER_SPIN), when
        // the last poller leaves for sleep: each must be taken at once, not at the next job.
        let (pool, done) = pool(2);
        pool.set_backlog(true);
        pool.set_pollers(1);
        for round in 0..300u64 {
            let pause = WORKER_SPIN + Duration::from_micros((round * 37) % 400);
            std::thread::sleep(if round % 3 == 0 {
                Duration::ZERO
            } else {
                pause
            });
            pool.submit(job(round as i64, "noop", "[]")).unwrap();
            let d = done
                .recv_timeout(Duration::from_secs(2))
                .expect("a job sent to idle workers was not taken");
            assert_eq!(d.key, JobKey::Task(round as i64));
        }
        pool.join();
    }

    #[test]
    fn jobs_queued_behind_a_long_one_after_tiny_ones_get_a_worker_from_attend() {
        let (pool, done) = pool(4);
        pool.set_backlog(true);
        pool.set_pollers(1);
        // Tiny jobs lately: a worker that finds more queued runs them itself.
        for id in 0..200 {
            pool.submit(job(id, "noop", "[]")).unwrap();
            done.recv_timeout(Duration::from_secs(2)).unwrap();
        }
        let started = Instant::now();
        pool.submit(job(1_000, "sleep", "[0.5]")).unwrap();
        for id in 1_001..1_004 {
            pool.submit(job(id, "noop", "[]")).unwrap();
        }
        // What the foreman's loop does each turn while jobs are queued.
        let mut ended = Vec::new();
        while ended.len() < 3 {
            let next = pool
                .attend()
                .unwrap_or_else(|| Instant::now() + Pool::QUEUED_GRACE);
            if let Ok(d) = done.recv_deadline(next) {
                ended.push((d.key, started.elapsed()));
            }
        }
        for (key, at) in &ended {
            assert_ne!(key, &JobKey::Task(1_000), "the long job ended first");
            assert!(
                *at < Duration::from_millis(250),
                "{key:?} waited {at:?} behind the 0.5 s job"
            );
        }
        done.recv_timeout(Duration::from_secs(2)).unwrap();
        pool.join();
    }

    #[test]
    fn join_ends_workers_asleep_and_polling() {
        for backlog in [false, true] {
            let (pool, done) = pool(3);
            pool.set_backlog(backlog);
            pool.submit(job(1, "noop", "[]")).unwrap();
            done.recv_timeout(Duration::from_secs(2)).unwrap();
            let (tx, rx) = bounded(1);
            std::thread::spawn(move || {
                pool.join();
                let _ = tx.send(());
            });
            rx.recv_timeout(Duration::from_secs(5))
                .expect("join did not return");
        }
    }

    #[test]
    fn signals_are_named_as_spec_has_them() {
        assert_eq!(signal_name(libc::SIGKILL), "KILL");
        assert_eq!(signal_name(libc::SIGTERM), "TERM");
        assert_eq!(signal_name(libc::SIGUSR1), "USR1");
        assert_eq!(signal_name(1_000), "signal 1000");
    }
}
