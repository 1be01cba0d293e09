//! A Rust program embedding snapq: its own task, enqueued through the library and through
//! the CLI (which learns the task's parameters from what the foreman recorded).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapq::db::Synchronous;
use snapq::foreman::{self, ForemanConfig, Stopped};
use snapq::registry::{Kind, Param, Registry, TaskSpec};
use snapq::{Enqueuer, NewTask};

use crate::support::Home;

#[test]
fn a_program_runs_its_own_tasks() {
    let home = Home::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let registry = || {
        let mut registry = Registry::with_builtins();
        let seen = Arc::clone(&seen);
        registry.register(
            TaskSpec {
                name: "double".into(),
                summary: "records twice its argument".into(),
                params: vec![Param::required("n", Kind::Number)],
                retry: None,
            },
            move |ctx, args| {
                let n = args.f64("n").ok_or("n is missing")?;
                seen.lock().unwrap().push((ctx.id, n * 2.0));
                Ok(())
            },
        );
        registry
    };
    let config = ForemanConfig {
        db: home.db_path(),
        wakeup_dir: home.file("wakeup"),
        pid_file: None,
        telemetry_dir: None,
        results_file: home.file("results.jsonl"),
        synchronous: Synchronous::Normal,
        workers: 2,
        batch: 10,
        graceful_timeout: Duration::from_secs(5),
        burst: true,
        safety_interval: foreman::SAFETY_INTERVAL,
        history_retention: Duration::from_secs(3600),
        history_max_rows: 1_000,
        live: None,
        tasks_file: None,
        queue: Default::default(),
    };

    let mut q = Enqueuer::with_registry(
        &config.db,
        &config.wakeup_dir,
        Synchronous::Normal,
        &registry(),
    )
    .unwrap();
    let id = q
        .enqueue(&NewTask {
            args: serde_json::json!([21]),
            ..NewTask::new("double")
        })
        .unwrap();
    let bad = q.enqueue(&NewTask {
        args: serde_json::json!(["x"]),
        ..NewTask::new("double")
    });
    assert!(bad.is_err(), "a string was accepted for a number");

    let (stopped, totals) = foreman::run(&config, registry()).unwrap();
    assert_eq!(stopped, Stopped::Drained);
    assert_eq!((totals.succeeded, totals.failed), (1, 0));
    assert_eq!(*seen.lock().unwrap(), vec![(id, 42.0)]);

    // The foreman recorded its tasks: the CLI now knows `double` and its parameters.
    let listed = home.ok(&["tasks"]);
    assert!(
        listed.contains("double") && listed.contains("\"n\": number"),
        "{listed}"
    );
    home.ok(&["enqueue", "double", "--kwargs", "{\"n\": 5}"]);
    let out = home.snapq(&["enqueue", "double", "--kwargs", "{\"n\": \"five\"}"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(home.queued(), 1);

    // A `snapq run` without the task logs the row as rejected and deletes it (invariant 7).
    let burst = home
        .cmd()
        .args(["run", "--burst", "--log-format", "json"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&burst.stderr);
    // A rejected task did not succeed: `--burst` says so with exit 3 (SPEC).
    assert_eq!(burst.status.code(), Some(3), "{log}");
    assert!(
        log.contains("task rejected and deleted, not retried"),
        "{log}"
    );
    assert!(log.contains("unknown task \\\"double\\\""), "{log}");
    assert_eq!(home.queued(), 0);
}

/// Issue 16: a Rust task with a timeout sees `TaskContext::cancelled` once it has run
/// that long; the built-in `sleep` honours it, and the task is recorded `timed_out` the
/// way a command is.
#[test]
fn a_rust_task_past_its_timeout_is_cancelled_and_recorded_timed_out() {
    let home = Home::new();
    let mut registry = Registry::with_builtins();
    assert!(registry.set_timeout("sleep", Duration::from_millis(500)));
    assert!(!registry.set_timeout("no-such-task", Duration::from_secs(1)));
    let config = ForemanConfig {
        db: home.db_path(),
        wakeup_dir: home.file("wakeup"),
        pid_file: None,
        telemetry_dir: None,
        burst: true,
        synchronous: Synchronous::Normal,
        ..ForemanConfig::in_home(home.path()).unwrap()
    };
    let id = home.enqueue(&["sleep", "--args", "[100]"]);
    let quick = home.enqueue(&["sleep", "--args", "[0.1]"]);
    let started = std::time::Instant::now();
    let (stopped, totals) = foreman::run(&config, registry).unwrap();
    assert_eq!(stopped, Stopped::Drained);
    assert_eq!((totals.succeeded, totals.failed), (1, 1));
    // The sleep checks every 0.1 s.
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );
    let record: serde_json::Value =
        serde_json::from_str(&home.ok(&["show", &id.to_string(), "--json"])).unwrap();
    assert_eq!(record["state"], "timed_out", "{record}");
    let error = record["error"].as_str().unwrap();
    assert!(
        error.contains("timeout of 0.5 s") && error.contains("cancelled"),
        "{error}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&home.ok(&["show", &quick.to_string(), "--json"])).unwrap();
    assert_eq!(record["state"], "succeeded", "{record}");
}
