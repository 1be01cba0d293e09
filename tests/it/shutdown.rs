//! Invariants 2 and 3: SIGTERM stops claiming at once, waits for running tasks up to the
//! graceful deadline, and a second signal exits at once. The pid file goes with it.

use std::time::{Duration, Instant};

use crate::support::{Foreman, Home, append_lines, wait_until};

fn started_ids(foreman: &crate::support::Foreman) -> Vec<i64> {
    foreman
        .events("task started")
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect()
}

#[test]
fn sigterm_keeps_unstarted_tasks_and_lets_running_ones_finish() {
    let home = Home::new();
    let out = home.file("out.txt");
    // Two slow tasks fill both workers; the appends behind them must never start.
    let mut lines = String::from("{\"task\":\"sleep\",\"args\":[1.0]}\n").repeat(2);
    lines += &append_lines(&out, "later", 0..5);
    home.enqueue_lines(&lines);

    let mut foreman = home.start(&["--workers", "2", "--graceful-timeout", "10"]);
    assert!(wait_until(Duration::from_secs(10), || started_ids(
        &foreman
    )
    .len()
        == 2));
    let sent = Instant::now();
    foreman.signal(libc::SIGTERM);
    // The sleeps had up to a second left; the foreman waited for them...
    exits_0_having_finished(&mut foreman, 2);
    assert!(sent.elapsed() < Duration::from_secs(5));
    // ...and started nothing else.
    assert_eq!(started_ids(&foreman).len(), 2);
    assert!(!out.exists(), "a task started after SIGTERM");
    assert_eq!(home.queued(), 5, "unstarted tasks must stay queued");
    assert!(
        !home.file("snapq.pid").exists(),
        "the pid file was left behind"
    );

    // The next start runs them.
    home.ok(&["run", "--burst"]);
    assert_eq!(crate::support::read_lines(&out).len(), 5);
}

#[test]
fn a_short_graceful_deadline_is_honoured() {
    let home = Home::new();
    home.ok(&["enqueue", "sleep", "--args", "[60]"]);
    let mut foreman = home.start(&["--workers", "1", "--graceful-timeout", "0.5"]);
    assert!(wait_until(Duration::from_secs(10), || started_ids(
        &foreman
    )
    .len()
        == 1));
    let sent = Instant::now();
    foreman.signal(libc::SIGTERM);
    let status = foreman
        .wait_exit(Duration::from_secs(10))
        .expect("the foreman ignored its graceful deadline");
    let took = sent.elapsed();
    assert!(status.success(), "exit {status}");
    assert!(
        took >= Duration::from_millis(500),
        "exited before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2_500),
        "deadline 0.5 s, took {took:?}"
    );
    let abandoned =
        foreman.events("the graceful timeout passed: exiting with this task unfinished");
    assert_eq!(abandoned.len(), 1, "{}", foreman.log_text());
    assert_eq!(abandoned[0]["task"], "sleep");
    assert!(!home.file("snapq.pid").exists());
}

#[test]
fn a_second_signal_exits_at_once() {
    let home = Home::new();
    home.ok(&["enqueue", "sleep", "--args", "[60]"]);
    let mut foreman = home.start(&["--workers", "1", "--graceful-timeout", "60"]);
    assert!(wait_until(Duration::from_secs(10), || started_ids(
        &foreman
    )
    .len()
        == 1));
    foreman.signal(libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(5), || foreman.has_log("stopping")));
    let sent = Instant::now();
    foreman.signal(libc::SIGINT);
    foreman
        .wait_exit(Duration::from_secs(5))
        .expect("a second signal did not end the foreman");
    assert!(sent.elapsed() < Duration::from_secs(2));
    assert!(
        foreman.has_log("a second signal came"),
        "{}",
        foreman.log_text()
    );
    assert!(!home.file("snapq.pid").exists());
}

/// Issue 13, item 3: SIGHUP (`systemctl reload`) reloads and never stops the foreman: the
/// running task finishes, new tasks run, and even during a graceful stop it is not taken
/// for the second signal that stops at once.
#[test]
fn sighup_reloads_and_never_stops_the_foreman() {
    let home = Home::new();
    let out = home.file("out.txt");
    let mut foreman = home.start(&["--graceful-timeout", "10"]);
    home.ok(&["enqueue", "sleep", "--kwargs", "{\"seconds\": 1.0}"]);
    assert!(wait_until(Duration::from_secs(5), || started_ids(&foreman)
        .len()
        == 1));
    foreman.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || foreman
            .has_log("SIGHUP: reloaded")),
        "{}",
        foreman.log_text()
    );
    let kwargs = serde_json::json!({"path": out, "line": "after-hup"}).to_string();
    home.ok(&["enqueue", "append", "--kwargs", &kwargs]);
    assert!(wait_until(
        Duration::from_secs(5),
        || crate::support::read_lines(&out) == ["after-hup"]
    ));
    assert!(wait_until(Duration::from_secs(5), || foreman
        .events("task finished")
        .len()
        == 2));
    assert!(foreman.try_exit().is_none(), "SIGHUP stopped the foreman");

    // During a graceful stop, SIGHUP is not the second signal.
    home.ok(&["enqueue", "sleep", "--kwargs", "{\"seconds\": 1.5}"]);
    assert!(wait_until(Duration::from_secs(5), || started_ids(&foreman)
        .len()
        == 3));
    foreman.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    foreman.signal(libc::SIGHUP);
    // None abandoned.
    exits_0_having_finished(&mut foreman, 3);
    assert!(!home.file("snapq.pid").exists());
}

/// Waits for a stopped foreman to exit 0, having finished `tasks` tasks (none abandoned).
fn exits_0_having_finished(foreman: &mut Foreman, tasks: usize) {
    let status = foreman
        .wait_exit(Duration::from_secs(10))
        .expect("the foreman did not exit after SIGTERM");
    assert!(status.success(), "exit {status}:\n{}", foreman.log_text());
    assert_eq!(
        foreman.events("task finished").len(),
        tasks,
        "{}",
        foreman.log_text()
    );
}
