//! The task registry: names, declared parameters and the functions that run them.
//!
//! Arguments are bound against the declared parameters twice: by the enqueuer, before
//! anything is written (so bad input exits 2 and stores nothing), and by the worker that
//! runs the task (a row written by another program may carry anything, invariant 7).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::now_micros;
use crate::error::{Error, Result};
use crate::live::{Event, Publisher};
use crate::tasks_file::CommandTask;

/// The JSON type a parameter accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Any JSON number.
    Number,
    /// A JSON number without a fraction (`3`, not `3.5`).
    Integer,
    /// A JSON string.
    String,
    /// `true` or `false`.
    Bool,
    /// Anything at all.
    Any,
}

impl Kind {
    pub fn accepts(self, value: &Value) -> bool {
        match self {
            Kind::Number => value.is_number(),
            Kind::Integer => value.is_i64() || value.is_u64(),
            Kind::String => value.is_string(),
            Kind::Bool => value.is_boolean(),
            Kind::Any => true,
        }
    }
}

impl Kind {
    /// The type with its article, for messages ("an integer").
    pub fn described(self) -> &'static str {
        match self {
            Kind::Number => "a number",
            Kind::Integer => "an integer",
            Kind::String => "a string",
            Kind::Bool => "a bool",
            Kind::Any => "any JSON value",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Number => "number",
            Kind::Integer => "integer",
            Kind::String => "string",
            Kind::Bool => "bool",
            Kind::Any => "any",
        })
    }
}

/// One declared parameter of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Param {
    pub name: String,
    pub kind: Kind,
    pub required: bool,
    /// The value becomes a command-line argument (a command task's): a string holding a
    /// NUL byte, which no argv can carry, is refused when binding.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub argv: bool,
}

impl Param {
    pub fn required(name: &str, kind: Kind) -> Param {
        Param {
            name: name.to_owned(),
            kind,
            required: true,
            argv: false,
        }
    }

    pub fn optional(name: &str, kind: Kind) -> Param {
        Param {
            name: name.to_owned(),
            kind,
            required: false,
            argv: false,
        }
    }
}

/// What a task is: its name, one line for `snapq tasks`, its parameters, and whether it
/// is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: String,
    pub summary: String,
    pub params: Vec<Param>,
    /// `Some`: the task is run at least once (SPEC invariant 10): its claim leases it, and a
    /// failure or a foreman's death puts it back with backoff until its attempts run out.
    /// `None` (the built-ins): at most once, as invariant 1 says.
    #[serde(skip)]
    pub retry: Option<RetryPolicy>,
}

/// How a task type is retried (`retries`, `backoff`, `backoff_max` in tasks.toml).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Runs after the first; at least 1 (0 retries is no policy: at most once).
    pub retries: u32,
    /// The wait before the first retry; each further retry waits twice the one before.
    pub backoff: Duration,
    /// The longest wait between two attempts.
    pub backoff_max: Duration,
    /// Each wait is drawn from 80% to 120% of its nominal length, so that tasks that failed
    /// together (a database that went down) do not all come back at the same moment.
    pub jitter: bool,
}

impl RetryPolicy {
    /// The defaults of tasks.toml: `backoff` 2 s, `backoff_max` 3600 s, jitter on.
    pub fn new(retries: u32) -> RetryPolicy {
        RetryPolicy {
            retries,
            backoff: Duration::from_secs(2),
            backoff_max: Duration::from_secs(3600),
            jitter: true,
        }
    }

    /// How many runs in all: the first and the retries.
    pub fn max_attempts(&self) -> i64 {
        i64::from(self.retries) + 1
    }

    /// The wait after attempt `failed` (from 1) failed: `backoff` doubled per earlier
    /// retry, at most `backoff_max`, then jittered with `unit` (0 to 1, random).
    pub fn delay(&self, failed: i64, unit: f64) -> Duration {
        let doublings = failed.clamp(1, 64) - 1;
        let nominal = (self.backoff.as_secs_f64() * 2f64.powi(doublings as i32))
            .min(self.backoff_max.as_secs_f64());
        let factor = if self.jitter {
            0.8 + 0.4 * unit.clamp(0.0, 1.0)
        } else {
            1.0
        };
        Duration::try_from_secs_f64(nominal * factor).unwrap_or(self.backoff_max)
    }
}

impl TaskSpec {
    /// Binds positional `args` (a JSON array) and `kwargs` (a JSON object) to the declared
    /// parameters, checking count, names and types.
    pub fn bind(&self, args: &Value, kwargs: &Value) -> Result<Args> {
        let bad = |message: String| Error::BadArguments {
            task: self.name.clone(),
            message,
        };
        let positional = args
            .as_array()
            .ok_or_else(|| bad(format!("args must be a JSON array, not {args}")))?;
        let named = kwargs
            .as_object()
            .ok_or_else(|| bad(format!("kwargs must be a JSON object, not {kwargs}")))?;
        if positional.len() > self.params.len() {
            return Err(bad(format!(
                "{} positional arguments given, it takes at most {} ({})",
                positional.len(),
                self.params.len(),
                self.signature()
            )));
        }
        let mut bound = Map::new();
        for (param, value) in self.params.iter().zip(positional) {
            bound.insert(param.name.clone(), value.clone());
        }
        for (name, value) in named {
            if !self.params.iter().any(|p| &p.name == name) {
                return Err(bad(format!(
                    "no parameter named {name:?} (it takes {})",
                    self.signature()
                )));
            }
            if bound.insert(name.clone(), value.clone()).is_some() {
                return Err(bad(format!(
                    "{name:?} is given both by position and by name"
                )));
            }
        }
        for param in &self.params {
            match bound.get(&param.name) {
                None if param.required => {
                    return Err(bad(format!(
                        "missing required parameter {:?} (it takes {})",
                        param.name,
                        self.signature()
                    )));
                }
                Some(value) if !param.kind.accepts(value) => {
                    return Err(bad(format!(
                        "{:?} must be {}, not {value}",
                        param.name,
                        param.kind.described()
                    )));
                }
                Some(Value::String(text)) if param.argv && text.contains('\0') => {
                    return Err(bad(format!(
                        "{:?} contains a NUL byte, which no command-line argument can carry",
                        param.name
                    )));
                }
                _ => {}
            }
        }
        Ok(Args(bound))
    }

    /// `{"seconds": number}` style, for messages and `snapq tasks`.
    pub fn signature(&self) -> String {
        let fields: Vec<String> = self
            .params
            .iter()
            .map(|p| {
                let optional = if p.required { "" } else { "?" };
                format!("\"{}\"{optional}: {}", p.name, p.kind)
            })
            .collect();
        format!("{{{}}}", fields.join(", "))
    }
}

/// Arguments bound to a task's parameters, by name.
#[derive(Debug, Clone, Default)]
pub struct Args(Map<String, Value>);

impl Args {
    /// Every bound argument, by name.
    pub fn by_name(&self) -> &Map<String, Value> {
        &self.0
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    pub fn f64(&self, name: &str) -> Option<f64> {
        self.get(name).and_then(Value::as_f64)
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(Value::as_str)
    }
}

/// What a running task knows about itself, and how it reports progress.
#[derive(Debug)]
pub struct TaskContext {
    pub id: i64,
    pub name: Arc<str>,
    /// Which run of the task this is, from 1 (a task with retries comes back with the
    /// next).
    pub attempt: i64,
    /// Where progress goes: the live view, when the foreman serves one.
    live: Option<Publisher>,
    /// When progress was last reported (Unix µs), for the rate limit. Only the task's own
    /// thread (or threads it lends the context to) touch it; Relaxed, a hint.
    last_progress: AtomicI64,
    /// When the task's `timeout` runs out, if it has one.
    deadline: Option<Instant>,
    /// Set by the foreman when it stops past its graceful deadline (`Pool::stop_tasks`);
    /// shared by every task of the pool. Relaxed: a request to stop, read at the task's
    /// next check, guarding no other data.
    stop: Option<Arc<AtomicBool>>,
}

/// The shortest gap between two progress reports of one task that are passed on; reports
/// in between are skipped (except a final 100%), so a task that reports in a tight loop
/// costs the live view nothing.
const PROGRESS_EVERY_MICROS: i64 = 50_000;

impl TaskContext {
    /// A context that reports progress nowhere (for running a task function directly).
    pub fn new(id: i64, name: Arc<str>) -> TaskContext {
        TaskContext::with_live(id, name, None)
    }

    pub(crate) fn with_live(id: i64, name: Arc<str>, live: Option<Publisher>) -> TaskContext {
        TaskContext {
            id,
            name,
            attempt: 1,
            live,
            last_progress: AtomicI64::new(i64::MIN),
            deadline: None,
            stop: None,
        }
    }

    /// The same context with a timeout (from now) and the pool's stop flag.
    pub(crate) fn cancellable(
        mut self,
        timeout: Option<Duration>,
        stop: Arc<AtomicBool>,
    ) -> TaskContext {
        self.deadline = timeout.map(|t| Instant::now() + t);
        self.stop = Some(stop);
        self
    }

    /// Whether the task should stop now: its `timeout` has run out, or the foreman is
    /// stopping and its graceful deadline has passed. A task that can take long checks
    /// this between steps and returns (any error will do): the foreman records it
    /// `timed_out` (or `abandoned`) however it returns. Nothing stops a task that never
    /// checks: it runs on, and is recorded the same way when it ends.
    pub fn cancelled(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
            || self
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// The output lines of a command task go out as progress, with no fraction.
    pub(crate) fn wants_progress(&self) -> bool {
        self.live.is_some()
    }

    /// Reports how far the task is: `fraction` from 0 to 1 (`NaN` for "unknown") and a
    /// short message. Shown live on the `task:<id>` channel and the page; at most 20
    /// reports a second are passed on. Costs nothing without a live view.
    pub fn progress(&self, fraction: f64, message: impl Into<String>) {
        let Some(live) = &self.live else {
            return;
        };
        let now = now_micros();
        let last = self.last_progress.load(Ordering::Relaxed);
        if fraction < 1.0 && now.saturating_sub(last) < PROGRESS_EVERY_MICROS {
            return;
        }
        self.last_progress.store(now, Ordering::Relaxed);
        live.publish(Event::TaskProgress {
            id: self.id,
            task: Arc::clone(&self.name),
            at: now,
            fraction: (!fraction.is_nan()).then(|| fraction.clamp(0.0, 1.0)),
            message: message.into().into_boxed_str(),
        });
    }
}

/// The error a task returns; any error type converts into it.
pub type TaskError = Box<dyn std::error::Error + Send + Sync>;

/// The function that runs a task.
pub type TaskFn = dyn Fn(&TaskContext, &Args) -> Result<(), TaskError> + Send + Sync;

/// How a task runs: a function in this process, or a command from the tasks file.
#[derive(Clone)]
pub(crate) enum Runner {
    Rust {
        run: Arc<TaskFn>,
        /// `Registry::set_timeout`: past it `TaskContext::cancelled` says so, and the
        /// task is recorded `timed_out` when it returns.
        timeout: Option<Duration>,
    },
    Command(Arc<CommandTask>),
}

#[derive(Clone)]
pub(crate) struct Entry {
    /// Dense, from 0 in registration order: lets the pool keep per-task data in a Vec.
    pub id: usize,
    pub spec: TaskSpec,
    /// The name shared with every context and log line, allocated once.
    pub name: Arc<str>,
    pub runner: Runner,
}

/// The tasks a foreman can run and an enqueuer may name. Cloning is cheap (the functions
/// are shared): a foreman keeps its programme's registry and adds the tasks file's
/// commands to a clone at each load.
#[derive(Clone)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl Registry {
    /// An empty registry, for programs that want none of the built-in tasks.
    pub fn empty() -> Registry {
        Registry {
            entries: BTreeMap::new(),
        }
    }

    /// The built-in tasks of SPEC: `noop`, `sleep`, `append`, `fail`, `panic`.
    pub fn with_builtins() -> Registry {
        let mut r = Registry::empty();
        r.register(
            spec("noop", "does nothing (benchmarks, smoke checks)", vec![]),
            |_, _| Ok(()),
        );
        r.register(
            spec(
                "sleep",
                "sleeps for the given seconds",
                vec![Param::required("seconds", Kind::Number)],
            ),
            |ctx, args| {
                let seconds = args.f64("seconds").unwrap_or(0.0);
                let total = Duration::try_from_secs_f64(seconds)
                    .map_err(|_| format!("cannot sleep {seconds} seconds"))?;
                // In steps, reporting progress after each, so the live view has something
                // to show; the end is kept to the requested time.
                let start = Instant::now();
                loop {
                    let slept = start.elapsed();
                    let Some(left) = total.checked_sub(slept).filter(|d| !d.is_zero()) else {
                        break;
                    };
                    if ctx.cancelled() {
                        return Err(format!(
                            "stopped after {:.1} of {seconds} s: cancelled",
                            slept.as_secs_f64()
                        )
                        .into());
                    }
                    std::thread::sleep(left.min(SLEEP_STEP));
                    let slept = start.elapsed().min(total);
                    ctx.progress(
                        slept.as_secs_f64() / total.as_secs_f64(),
                        format!("slept {:.1} of {seconds} s", slept.as_secs_f64()),
                    );
                }
                Ok(())
            },
        );
        r.register(
            spec(
                "append",
                "appends one line to a file, creating it if needed",
                vec![
                    Param::required("path", Kind::String),
                    Param::required("line", Kind::String),
                ],
            ),
            |_, args| {
                let path = args.str("path").unwrap_or_default();
                let line = args.str("line").unwrap_or_default();
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open {path} for appending: {e}"))?;
                // One write of the whole line: O_APPEND makes it land in one piece even
                // when several workers append to the same file.
                let mut buf = String::with_capacity(line.len() + 1);
                buf.push_str(line);
                buf.push('\n');
                file.write_all(buf.as_bytes())
                    .map_err(|e| format!("cannot append to {path}: {e}"))?;
                Ok(())
            },
        );
        r.register(
            spec(
                "fail",
                "returns an error with the given message",
                vec![Param::optional("message", Kind::String)],
            ),
            |_, args| Err(args.str("message").unwrap_or("failed on purpose").into()),
        );
        r.register(
            spec(
                "panic",
                "panics with the given message (tests that a panic is contained)",
                vec![Param::optional("message", Kind::String)],
            ),
            |_, args| panic!("{}", args.str("message").unwrap_or("panicked on purpose")),
        );
        r
    }

    /// Registers (or replaces) a task.
    pub fn register<F>(&mut self, spec: TaskSpec, run: F)
    where
        F: Fn(&TaskContext, &Args) -> Result<(), TaskError> + Send + Sync + 'static,
    {
        self.insert(
            spec,
            Runner::Rust {
                run: Arc::new(run),
                timeout: None,
            },
        );
    }

    fn insert(&mut self, spec: TaskSpec, runner: Runner) {
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let id = self
            .entries
            .get(&spec.name)
            .map_or(self.entries.len(), |old| old.id);
        self.entries.insert(
            spec.name.clone(),
            Entry {
                id,
                spec,
                name,
                runner,
            },
        );
    }

    /// Gives a registered Rust task a timeout: past it `TaskContext::cancelled` is true,
    /// and the task is recorded `timed_out` when it returns (whatever it returns). Returns
    /// false if no Rust task of that name is registered.
    pub fn set_timeout(&mut self, name: &str, limit: Duration) -> bool {
        match self.entries.get_mut(name).map(|e| &mut e.runner) {
            Some(Runner::Rust { timeout, .. }) => {
                *timeout = Some(limit);
                true
            }
            _ => false,
        }
    }

    /// The task types run at least once, with their policies (the foreman leases them at
    /// claim, and settles their failures by putting them back).
    pub fn retry_policies(&self) -> std::collections::HashMap<String, RetryPolicy> {
        self.entries
            .values()
            .filter_map(|e| Some((e.spec.name.clone(), e.spec.retry?)))
            .collect()
    }

    /// Adds the command tasks of a tasks file. A name this registry already has (a
    /// built-in, a task of the programme) is refused: the file cannot shadow them.
    pub fn add_commands(&mut self, tasks: Vec<CommandTask>, file: &Path) -> Result<()> {
        if let Some(clash) = tasks.iter().find(|t| self.entries.contains_key(&t.name)) {
            return Err(Error::BadPath {
                role: "tasks file",
                path: file.to_owned(),
                problem: format!(
                    "[tasks.{}]: {:?} is already a task of snapq's own; give the command \
                     task another name",
                    clash.name, clash.name
                ),
            });
        }
        for task in tasks {
            self.insert(task.spec(), Runner::Command(Arc::new(task)));
        }
        Ok(())
    }

    /// The longest `kill_after` of the command tasks: how long stopping them may take.
    pub(crate) fn max_kill_after(&self) -> Option<Duration> {
        self.entries
            .values()
            .filter_map(|e| match &e.runner {
                Runner::Command(c) => Some(c.kill_after),
                Runner::Rust { .. } => None,
            })
            .max()
    }

    /// The command tasks.
    pub fn commands(&self) -> impl Iterator<Item = &CommandTask> {
        self.entries.values().filter_map(|e| match &e.runner {
            Runner::Command(c) => Some(c.as_ref()),
            Runner::Rust { .. } => None,
        })
    }

    /// Whether `name` is a command task (for `snapq tasks`).
    pub fn command(&self, name: &str) -> Option<&CommandTask> {
        match &self.entries.get(name)?.runner {
            Runner::Command(c) => Some(c),
            Runner::Rust { .. } => None,
        }
    }

    /// The number of entry ids in use (`Entry::id` is below it).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub(crate) fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    pub fn spec(&self, name: &str) -> Option<&TaskSpec> {
        self.entries.get(name).map(|e| &e.spec)
    }

    pub fn specs(&self) -> impl Iterator<Item = &TaskSpec> {
        self.entries.values().map(|e| &e.spec)
    }

    pub fn names(&self) -> String {
        let names: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        names.join(", ")
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::with_builtins()
    }
}

/// How often the built-in `sleep` reports its progress.
const SLEEP_STEP: Duration = Duration::from_millis(100);

fn spec(name: &str, summary: &str, params: Vec<Param>) -> TaskSpec {
    TaskSpec {
        name: name.to_owned(),
        summary: summary.to_owned(),
        params,
        retry: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn binding_checks_names_types_and_counts() {
        let r = Registry::with_builtins();
        let append = r.spec("append").unwrap();
        let ok = append
            .bind(&json!(["/tmp/x"]), &json!({"line": "hello"}))
            .unwrap();
        assert_eq!(ok.str("line"), Some("hello"));
        assert!(append.bind(&json!([]), &json!({"path": "/tmp/x"})).is_err());
        assert!(append.bind(&json!([1, "a"]), &json!({})).is_err());
        assert!(append.bind(&json!(["a", "b", "c"]), &json!({})).is_err());
        assert!(
            append
                .bind(&json!([]), &json!({"path": "a", "line": "b", "colour": 1}))
                .is_err()
        );
        assert!(
            append
                .bind(&json!(["a"]), &json!({"path": "a", "line": "b"}))
                .is_err()
        );
        assert!(append.bind(&json!({}), &json!({})).is_err());
        let sleep = r.spec("sleep").unwrap();
        assert!(sleep.bind(&json!(["1"]), &json!({})).is_err());
        assert!(sleep.bind(&json!([0.5]), &json!({})).is_ok());
    }

    #[test]
    fn retry_waits_double_up_to_the_cap_within_the_jitter() {
        let policy = RetryPolicy {
            retries: 10,
            backoff: Duration::from_secs(2),
            backoff_max: Duration::from_secs(10),
            jitter: false,
        };
        let secs = |policy: &RetryPolicy, attempt, unit| policy.delay(attempt, unit).as_secs_f64();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        let waits: Vec<f64> = (1..=5).map(|a| secs(&policy, a, 0.5)).collect();
        assert!(
            waits
                .iter()
                .zip([2.0, 4.0, 8.0, 10.0, 10.0])
                .all(|(&w, e)| close(w, e)),
            "{waits:?}"
        );
        let jittered = RetryPolicy {
            jitter: true,
            ..policy
        };
        assert!(close(secs(&jittered, 1, 0.0), 1.6));
        assert!(close(secs(&jittered, 1, 1.0), 2.4));
        assert!(close(secs(&jittered, 2, 0.5), 4.0));
        assert_eq!(jittered.max_attempts(), 11);
        // Far past the cap, still the cap (no overflow).
        assert!(close(secs(&policy, 1_000, 0.5), 10.0));
    }
}
