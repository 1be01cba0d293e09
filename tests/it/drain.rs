//! At most once under `kill -9`, and bounded threads however many tasks pass.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::{Home, append_lines, read_lines, wait_until};

const WORKERS: usize = 4;

/// Invariant 1: a drain of 20,000 `append` tasks, killed with SIGKILL again and again.
/// No line may appear twice; at most `workers` tasks are lost per kill; a final `--burst`
/// empties the queue.
#[test]
fn kill_9_during_a_drain_never_runs_a_task_twice() {
    let home = Home::new();
    let out = home.file("out.txt");
    let total = 20_000;
    assert_eq!(
        home.enqueue_lines(&append_lines(&out, "t", 0..total)),
        total
    );
    let line_len = "t-000000\n".len() as u64;
    let lines_now = || std::fs::metadata(&out).map_or(0, |m| m.len() / line_len);

    let mut kills = 0;
    while lines_now() < (total as u64) * 9 / 10 && kills < 8 {
        let before = lines_now();
        let mut foreman = home.start(&["--workers", &WORKERS.to_string()]);
        // Let it run tasks, then kill it in the middle of the drain.
        assert!(
            wait_until(Duration::from_secs(30), || lines_now() >= before + 1_500),
            "the foreman ran no tasks:\n{}",
            foreman.log_text()
        );
        foreman.kill9();
        kills += 1;
    }
    assert!(kills >= 4, "only {kills} kills happened mid-drain");

    let burst = home.ok(&["run", "--burst", "--workers", &WORKERS.to_string()]);
    assert_eq!(burst, "");
    assert_eq!(home.queued(), 0, "the queue is not empty after --burst");

    let lines = read_lines(&out);
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "a task ran twice");
    let lost = total - unique.len();
    assert!(
        lost <= WORKERS * kills,
        "{lost} tasks lost in {kills} kills; at most {} may be",
        WORKERS * kills
    );

    // Invariant 9: every task that was running at a kill is `lost` in the history, every
    // other one `succeeded`; none is unaccounted for. (A task killed after its append but
    // before its end was recorded is `lost` too: snapq cannot know it finished.)
    let ids = |state: &str| -> HashSet<i64> {
        let out = home.ok(&["history", "--state", state, "--limit", "100000", "--json"]);
        let records: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        records.iter().map(|r| r["id"].as_i64().unwrap()).collect()
    };
    let (lost_ids, succeeded) = (ids("lost"), ids("succeeded"));
    assert_eq!(lost_ids.len() + succeeded.len(), total, "records missing");
    assert!(
        lost_ids.len() <= WORKERS * kills,
        "{} lost records",
        lost_ids.len()
    );
    // The bulk enqueue was the home's first: task i has id i + 1.
    for i in 0..total {
        if !unique.contains(&format!("t-{i:06}")) {
            let id = i as i64 + 1;
            assert!(
                lost_ids.contains(&id),
                "task {id} never ran, yet is not lost"
            );
        }
    }
}

/// Invariant 6: the thread count stays at most workers + 4 through 100,000 tasks.
#[test]
fn threads_stay_bounded_through_100k_tasks() {
    let home = Home::new();
    let total = 100_000;
    let lines: String = "{\"task\":\"noop\"}\n".repeat(total);
    assert_eq!(home.enqueue_lines(&lines), total);
    let mut cmd = home.cmd();
    cmd.env("RUST_LOG", "warn")
        .args(["run", "--burst", "--workers", &WORKERS.to_string()]);
    let mut foreman = crate::support::Foreman::spawn_unready(cmd);
    let mut max_threads = 0;
    let exited = wait_until(Duration::from_secs(120), || {
        max_threads = max_threads.max(foreman.threads());
        foreman.try_exit().is_some()
    });
    assert!(exited, "the burst did not finish");
    assert!(foreman.exit.unwrap().success(), "{}", foreman.log_text());
    assert_eq!(home.queued(), 0);
    assert!(max_threads > 0, "never saw the process");
    assert!(
        max_threads <= WORKERS + 4,
        "{max_threads} threads with {WORKERS} workers"
    );
}

/// Invariant 1 across processes: two foremen on one database (each with its own pid file)
/// split a drain without running any task twice.
#[test]
fn two_foremen_on_one_database_never_share_a_task() {
    let home = Home::new();
    let out = home.file("out.txt");
    let total = 5_000;
    let start = |pid_file: &str| {
        let mut cmd = home.cmd();
        cmd.args(["--pid-file", home.file(pid_file).to_str().unwrap()])
            .args(["run", "--workers", "2", "--log-format", "json"]);
        crate::support::Foreman::spawn(cmd)
    };
    let a = start("a.pid");
    let b = start("b.pid");
    // Enqueued once both are ready, so both are woken by it.
    home.enqueue_lines(&append_lines(&out, "t", 0..total));
    assert!(
        wait_until(Duration::from_secs(60), || read_lines(&out).len() >= total),
        "{} of {total} ran",
        read_lines(&out).len()
    );
    let lines = read_lines(&out);
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(lines.len(), total, "a task ran twice");
    assert_eq!(unique.len(), total);
    // Both took part (their log lines may trail the file a little).
    assert!(wait_until(Duration::from_secs(5), || {
        !a.events("task finished").is_empty() && !b.events("task finished").is_empty()
    }));
}
