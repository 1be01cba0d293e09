//! Issue 15: every task leaves a record, and `show`, `history` and `cancel` read it, on the
//! real binary.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Home, wait_until};

fn show(home: &Home, id: i64) -> Value {
    serde_json::from_str(&home.ok(&["show", &id.to_string(), "--json"])).unwrap()
}

fn enqueue(home: &Home, args: &[&str]) -> i64 {
    home.enqueue(args)
}

#[test]
fn every_state_shows_in_show_and_history() {
    let home = Home::new();
    let ok = enqueue(&home, &["noop"]);
    let failed = enqueue(&home, &["fail", "--kwargs", r#"{"message": "disk full"}"#]);
    let panicked = enqueue(&home, &["panic"]);
    // A row another program wrote, for a task no foreman knows.
    let conn = home.conn();
    conn.execute("INSERT INTO tasks (task_name) VALUES ('nosuch')", [])
        .unwrap();
    let rejected = conn.last_insert_rowid();
    let queued = enqueue(&home, &["noop", "--delay", "3600"]);
    let cancelled = enqueue(&home, &["noop", "--delay", "3600"]);
    assert_eq!(home.snapq(&["run", "--burst"]).status.code(), Some(3));
    home.ok(&["cancel", &cancelled.to_string()]);

    for (id, state) in [
        (ok, "succeeded"),
        (failed, "failed"),
        (panicked, "panicked"),
        (rejected, "rejected"),
        (queued, "queued"),
        (cancelled, "cancelled"),
    ] {
        let record = show(&home, id);
        assert_eq!(record["state"], state, "{record}");
        assert_eq!(record["id"], id);
        for field in [
            "task",
            "args",
            "kwargs",
            "attempt",
            "enqueued_at",
            "due_at",
            "started_at",
            "finished_at",
            "duration_seconds",
            "error",
            "exit_code",
            "signal",
            "output",
        ] {
            assert!(record.get(field).is_some(), "{field} missing: {record}");
        }
    }
    assert_eq!(show(&home, failed)["error"], "disk full");
    assert!(show(&home, ok)["duration_seconds"].as_f64().unwrap() >= 0.0);
    assert!(
        show(&home, rejected)["error"]
            .as_str()
            .unwrap()
            .contains("unknown task")
    );
    assert_eq!(show(&home, queued)["started_at"], Value::Null);

    // Running: a sleep while a foreman runs it; then abandoned at a short graceful deadline.
    let mut foreman = home.start(&["--graceful-timeout", "0.3"]);
    let running = enqueue(&home, &["sleep", "--kwargs", r#"{"seconds": 5}"#]);
    assert!(wait_until(Duration::from_secs(5), || show(&home, running)
        ["state"]
        == "running"));
    assert_eq!(show(&home, running)["foreman_pid"], foreman.pid());
    let refused = home.snapq(&["cancel", &running.to_string()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is running"));
    foreman.signal(libc::SIGTERM);
    foreman.wait_exit(Duration::from_secs(5)).unwrap();
    let abandoned = show(&home, running);
    assert_eq!(abandoned["state"], "abandoned", "{abandoned}");
    // status counts the last hour's troubles from the records.
    let status: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(
        status["tasks"]["last_hour"],
        serde_json::json!({"failed": 3, "lost": 0, "abandoned": 1, "dead": 0}),
        "{status}"
    );
    assert!(
        home.ok(&["status"])
            .contains("last hour: 3 failed, 0 lost, 1 abandoned")
    );

    // history: newest first, filtered by state and task.
    let all: Vec<Value> = serde_json::from_str(&home.ok(&["history", "--json"])).unwrap();
    let ids: Vec<i64> = all.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted, "not newest first");
    // Records only: the queued task is not one yet.
    assert_eq!(ids.len(), 6, "{all:?}");
    assert!(!ids.contains(&queued));
    let failures: Vec<Value> = serde_json::from_str(&home.ok(&[
        "history", "--state", "failed", "--state", "panicked", "--json",
    ]))
    .unwrap();
    let states: HashSet<&str> = failures
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, HashSet::from(["failed", "panicked"]));
    let text = home.ok(&["history", "--task", "fail"]);
    assert!(
        text.contains("disk full") && !text.contains("noop"),
        "{text}"
    );

    // Unknown ids and states.
    let unknown = home.snapq(&["show", "999999"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no task 999999"));
    let bad = home.snapq(&["history", "--state", "done"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("succeeded"));
}

/// A foreman killed with four sleeps running: the next foreman finds them `lost`, names
/// each in its log, and runs none of them again.
#[test]
fn tasks_running_at_a_kill_9_are_lost_and_not_run_again() {
    let home = Home::new();
    let mut foreman = home.start(&["--workers", "4"]);
    let ids: Vec<i64> = (0..4)
        .map(|_| enqueue(&home, &["sleep", "--kwargs", r#"{"seconds": 30}"#]))
        .collect();
    assert!(wait_until(Duration::from_secs(5), || ids
        .iter()
        .all(|id| show(&home, *id)["state"] == "running")));
    foreman.kill9();
    let next = home.start(&[]);
    for id in &ids {
        let record = show(&home, *id);
        assert_eq!(record["state"], "lost", "{record}");
        assert!(
            next.events(
                "task lost: it was running when its foreman ended (kill -9, a crash, \
                         a power loss); recorded as lost, not run again"
            )
            .iter()
            .any(|e| e["id"] == *id),
            "{}",
            next.log_text()
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        next.events("task started").is_empty(),
        "{}",
        next.log_text()
    );
    assert_eq!(home.queued(), 0);
    let status: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["tasks"]["last_hour"]["lost"], 4, "{status}");
}

/// Retention: about the newest `--history-max-rows` records are kept, and records older
/// than `--history-retention` go; pruning runs in short transactions, so an enqueuer
/// beside it never waits more than 50 ms.
#[test]
fn old_records_are_pruned_in_short_transactions() {
    let home = Home::new();
    let total = 20_000;
    home.enqueue_lines(&"{\"task\":\"noop\"}\n".repeat(total));
    home.ok(&["run", "--burst", "--synchronous", "normal"]);
    let count = |home: &Home| -> i64 {
        home.conn()
            .query_row("SELECT count(*) FROM task_records", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(count(&home), total as i64);

    // A foreman keeping 50: it prunes ~20,000 records over its heartbeats while this test
    // enqueues beside it, one task at a time, timing each enqueue.
    let foreman = home.start(&["--history-max-rows", "50"]);
    let mut q = snapq::Enqueuer::open(
        &home.db_path(),
        &home.file("wakeup"),
        snapq::db::Synchronous::Normal,
    )
    .unwrap();
    let mut slowest = Duration::ZERO;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count(&home) > 60 && std::time::Instant::now() < deadline {
        let started = std::time::Instant::now();
        q.enqueue(&snapq::NewTask::new("noop")).unwrap();
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        count(&home) <= 60,
        "{} records left:\n{}",
        count(&home),
        foreman.log_text()
    );
    assert!(
        slowest <= Duration::from_millis(50),
        "an enqueue waited {slowest:?} beside the pruning"
    );
    // The newest are the ones kept.
    let newest: i64 = home
        .conn()
        .query_row("SELECT max(id) FROM task_records", [], |r| r.get(0))
        .unwrap();
    let oldest_kept: i64 = home
        .conn()
        .query_row("SELECT min(id) FROM task_records", [], |r| r.get(0))
        .unwrap();
    assert!(newest - oldest_kept < 60, "{oldest_kept}..{newest}");
    drop(foreman);

    // Retention: with 1 s, records that ended more than a second ago go.
    let _foreman = home.start(&["--history-retention", "1"]);
    assert!(
        wait_until(Duration::from_secs(10), || count(&home) == 0),
        "{} records left",
        count(&home)
    );
}

/// A live foreman notices another one on the same database die: that one's running tasks
/// are `lost` within seconds, without waiting for a restart.
#[test]
fn a_live_foreman_records_the_tasks_of_a_dead_one_as_lost() {
    let home = Home::new();
    let mut doomed = home.start(&["--no-pid-file", "--workers", "2"]);
    let ids: Vec<i64> = (0..2)
        .map(|_| enqueue(&home, &["sleep", "--kwargs", r#"{"seconds": 60}"#]))
        .collect();
    assert!(wait_until(Duration::from_secs(5), || ids
        .iter()
        .all(|id| show(&home, *id)["state"] == "running")));
    // The survivor starts while the doomed one is alive: it keeps the tasks running.
    let survivor = home.start(&["--no-pid-file"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ids.iter().all(|id| show(&home, *id)["state"] == "running"));
    doomed.kill9();
    assert!(
        wait_until(Duration::from_secs(10), || ids
            .iter()
            .all(|id| show(&home, *id)["state"] == "lost")),
        "{}",
        survivor.log_text()
    );
    assert!(survivor.has_log("a foreman on this database died"));
    assert!(survivor.events("task started").is_empty());
}
