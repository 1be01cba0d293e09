//! The worker pool: a fixed set of named threads, started once (invariant 6).
//!
//! The foreman sends a claimed task only when it counts a free slot, so the job channel
//! never fills. Each task runs inside `catch_unwind` under a `Slot` guard whose `Drop`
//! reports the outcome back to the foreman: a panic never leaks a slot (invariant 7).
//! Workers never touch the queue (invariant 8): they get rows already claimed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use serde_json::Value;

use crate::clock::now_micros;
use crate::error::{Error, Result};
use crate::live::{Event, Publisher};
use crate::monitor::{Probe, Round, RoundError};
use crate::queue::Claimed;
use crate::registry::{Registry, TaskContext};
use crate::telemetry::{Label, Series, Telemetry};

/// How a task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    /// The task returned an error.
    Failed(String),
    /// The task panicked.
    Panicked(String),
    /// The row could not be run: unknown name or arguments that do not bind.
    Rejected(String),
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
}

/// How long an idle worker polls (yielding the CPU) for its next job while the foreman has
/// a backlog, before it sleeps on the channel. Waking a sleeping thread costs tens of µs on
/// these VMs; polling for the next claim instead took the 4-worker drain of noops from
/// ~55k to ~65k tasks/s with `normal`, and from ~11k to ~16k with `full` (BENCHMARKS.md;
/// 100 µs gave the lower figures).
const WORKER_SPIN: Duration = Duration::from_millis(1);

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
        let mut handles = Vec::with_capacity(workers);
        let backlog = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            timing: telemetry.map(|t| Timing::new(t, &registry)),
            registry,
            done,
            backlog: Arc::clone(&backlog),
            live,
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
        })
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
        })
    }

    /// Closes the job channel and joins every worker. Call it only when no task runs.
    pub fn join(mut self) {
        self.jobs = None;
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

/// What every worker shares, read-only.
struct Shared {
    registry: Arc<Registry>,
    done: Sender<Done>,
    /// See `Pool::backlog`.
    backlog: Arc<AtomicBool>,
    timing: Option<Timing>,
    /// The live view's event queue, if the foreman serves one (src/live/mod.rs).
    live: Option<Publisher>,
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

/// The next job: polled for (yielding the CPU) while there is a backlog, then waited for.
fn next_job(jobs: &Receiver<Job>, backlog: &AtomicBool) -> Option<Job> {
    let until = Instant::now() + WORKER_SPIN;
    while backlog.load(Ordering::Relaxed) && Instant::now() < until {
        if let Ok(task) = jobs.try_recv() {
            return Some(task);
        }
        std::thread::yield_now();
    }
    jobs.recv().ok()
}

fn work(jobs: &Receiver<Job>, shared: &Shared) {
    while let Some(job) = next_job(jobs, &shared.backlog) {
        let task = match job {
            Job::Task(task) => task,
            Job::Round(round) => {
                run_round(round, shared);
                continue;
            }
        };
        let mut slot = Slot {
            done: &shared.done,
            id: task.id,
            name: None,
            started: Instant::now(),
            // Stays Panicked only if something below unwinds past catch_unwind.
            outcome: Outcome::Panicked("the worker unwound outside the task".into()),
            timing: None,
            live: shared.live.as_ref(),
            ran: false,
        };
        slot.outcome = run_one(&task, shared, &mut slot);
    }
}

fn run_one<'a>(task: &Claimed, shared: &'a Shared, slot: &mut Slot<'a>) -> Outcome {
    let registry = &shared.registry;
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
    let ctx = TaskContext::with_live(task.id, Arc::clone(&entry.name), shared.live.clone());
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
    if let Some(timing) = &shared.timing {
        let (duration, wait) = timing.labels[entry.id];
        let waited = (now - task.created_at).max(0) as f64 / 1e6;
        timing.telemetry.record(wait, waited);
        slot.timing = Some((&timing.telemetry, duration));
    }
    slot.started = Instant::now();
    match catch_unwind(AssertUnwindSafe(|| (entry.run)(&ctx, &args))) {
        Ok(Ok(())) => Outcome::Succeeded,
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(payload) => Outcome::Panicked(panic_message(payload.as_ref())),
    }
}

fn run_round(job: RoundJob, shared: &Shared) {
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
    if let Some(timing) = &shared.timing
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
    let _ = shared.done.send(Done {
        key: JobKey::Round(job.name, job.version),
        outcome: Outcome::Round(Box::new(RoundDone {
            kind: job.kind,
            round,
            started_us,
        })),
        duration,
    });
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
    id: i64,
    name: Option<Arc<str>>,
    started: Instant,
    outcome: Outcome,
    /// Where to record the task's duration, once it has started running.
    timing: Option<(&'a Telemetry, Label)>,
    /// Where to publish the task's end.
    live: Option<&'a Publisher>,
    /// Whether the task started (a rejected row did not).
    ran: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        if let Some((telemetry, label)) = self.timing {
            telemetry.record(label, duration.as_secs_f64());
        }
        let ms = round_ms(duration);
        let id = self.id;
        let task = self.name.as_deref().unwrap_or("?");
        match &self.outcome {
            // `%task`, as at the start: `task=noop`, not `task="noop"`.
            Outcome::Succeeded => tracing::info!(id, %task, ms, "task finished"),
            Outcome::Failed(error) => tracing::warn!(id, %task, ms, error, "task failed"),
            Outcome::Panicked(error) => tracing::error!(id, %task, ms, error, "task panicked"),
            Outcome::Rejected(error) => {
                tracing::error!(id, %task, error, "task rejected and deleted, not retried")
            }
            Outcome::Round(_) => {}
        }
        if let Some(live) = self.live {
            if self.ran {
                live.task_ended();
            }
            self.publish_end(live, duration);
        }
        // The foreman is gone only if it abandoned us at its deadline.
        let _ = self.done.send(Done {
            key: JobKey::Task(id),
            outcome: std::mem::replace(&mut self.outcome, Outcome::Succeeded),
            duration,
        });
    }
}

impl Slot<'_> {
    fn publish_end(&self, live: &Publisher, duration: Duration) {
        let at = now_micros();
        let (reason, error) = match &self.outcome {
            Outcome::Succeeded => {
                live.publish(Event::TaskFinished {
                    id: self.id,
                    task: self.name.clone().unwrap_or_else(|| Arc::from("?")),
                    at,
                    duration,
                });
                return;
            }
            Outcome::Failed(e) => ("failed", e),
            Outcome::Panicked(e) => ("panicked", e),
            Outcome::Rejected(e) => ("rejected", e),
            Outcome::Round(_) => return,
        };
        live.publish(Event::TaskFailed {
            id: self.id,
            task: self.name.clone(),
            at,
            duration: self.ran.then_some(duration),
            reason,
            error: error.as_str().into(),
        });
    }
}
