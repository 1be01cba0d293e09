//! Issue 17: retries. A task type with `retries` in tasks.toml runs at least once: a failure
//! puts it back with a growing backoff until its attempts run out (`dead`), a foreman's
//! `kill -9` puts its leases back, and a live foreman's lease is never taken from it.
//! Real binary, real child processes, real `kill -9`.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Home, read_lines, wait_until};

/// An executable script that appends "<attempt> <unix time>" to `runs`, then fails with
/// exit 3 until the run numbered `succeed_on` (never, if 0).
fn flaky_script(home: &Home, runs: &Path, succeed_on: usize) -> String {
    let path = home.file("flaky.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             echo \"$SNAPQ_ATTEMPT $(date +%s.%N)\" >> '{runs}'\n\
             n=$(wc -l < '{runs}')\n\
             echo \"run $n\"\n\
             [ {succeed_on} -ne 0 ] && [ \"$n\" -ge {succeed_on} ] && exit 0\n\
             exit 3\n",
            runs = runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn show(home: &Home, id: i64) -> Value {
    serde_json::from_str(&home.ok(&["show", &id.to_string(), "--json"])).unwrap()
}

fn status(home: &Home) -> Value {
    serde_json::from_str(&home.ok(&["status", "--json"])).unwrap()
}

/// The runs the script recorded: (attempt, time in seconds).
fn runs(path: &Path) -> Vec<(i64, f64)> {
    read_lines(path)
        .iter()
        .map(|l| {
            let (attempt, at) = l.split_once(' ').unwrap();
            (attempt.parse().unwrap(), at.parse().unwrap())
        })
        .collect()
}

#[test]
fn a_command_that_fails_twice_then_succeeds_runs_three_times_with_growing_gaps() {
    let home = Home::new();
    let runs_file = home.file("runs.txt");
    let flaky = flaky_script(&home, &runs_file, 3);
    home.tasks_file(&format!(
        "[tasks.flaky]\ncommand = [\"{flaky}\"]\nretries = 4\nbackoff = 0.5\nbackoff_max = 60\n"
    ));
    let _foreman = home.start(&[]);
    let id = home.enqueue(&["flaky"]);
    assert!(
        wait_until(Duration::from_secs(20), || show(&home, id)["state"]
            == "succeeded"),
        "{}",
        show(&home, id)
    );
    let record = show(&home, id);
    assert_eq!(record["attempt"], 3, "{record}");
    assert_eq!(record["output"], "run 3\n", "{record}");
    let runs = runs(&runs_file);
    assert_eq!(
        runs.iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "SNAPQ_ATTEMPT counts the runs"
    );
    // Backoff 0.5 s, doubling, each wait 80–120% of nominal: 0.4–0.6 s, then 0.8–1.2 s.
    // A retry never runs before its wait is over; it may start a little after it.
    let (first, second) = (runs[1].1 - runs[0].1, runs[2].1 - runs[1].1);
    assert!((0.4..0.6 + 0.5).contains(&first), "first gap {first:.3} s");
    assert!(
        (0.8..1.2 + 0.5).contains(&second),
        "second gap {second:.3} s"
    );
    assert!(second > first, "gaps {first:.3} s then {second:.3} s");
}

#[test]
fn a_task_that_always_fails_is_dead_after_its_retries_and_retry_runs_it_again() {
    let home = Home::new();
    let runs_file = home.file("runs.txt");
    let flaky = flaky_script(&home, &runs_file, 0);
    home.tasks_file(&format!(
        "[tasks.doomed]\ncommand = [\"{flaky}\"]\nretries = 2\nbackoff = 1\n"
    ));
    let foreman = home.start(&[]);
    let id = home.enqueue(&["doomed"]);

    // Between attempts: queued, its next attempt named, the last one's error kept.
    assert!(wait_until(Duration::from_secs(10), || runs(&runs_file)
        .len()
        == 1
        && show(&home, id)["state"] == "queued"));
    let waiting = show(&home, id);
    assert_eq!(waiting["attempt"], 2, "{waiting}");
    assert!(
        waiting["error"]
            .as_str()
            .unwrap()
            .contains("attempt 1 of 3 failed: exited with code 3"),
        "{waiting}"
    );
    assert_eq!(status(&home)["tasks"]["retrying"], 1);
    let listed = home.ok(&["history", "--state", "queued"]);
    assert!(listed.contains(&id.to_string()), "{listed}");

    assert!(
        wait_until(Duration::from_secs(15), || show(&home, id)["state"]
            == "dead"),
        "{}\n{}",
        show(&home, id),
        foreman.log_text()
    );
    let dead = show(&home, id);
    assert_eq!(dead["attempt"], 3, "retries = 2: three runs in all; {dead}");
    assert!(
        dead["error"].as_str().unwrap().contains("no retries left"),
        "{dead}"
    );
    assert_eq!(dead["exit_code"], 3);
    assert_eq!(runs(&runs_file).len(), 3);
    let s = status(&home);
    assert_eq!(s["tasks"]["last_hour"]["dead"], 1, "{s}");
    assert_eq!(s["tasks"]["retrying"], 0, "{s}");
    assert!(home.ok(&["status"]).contains("1 dead"));

    // `retry` puts it back by hand: the same id, its next attempt.
    let said = home.ok(&["retry", &id.to_string()]);
    assert_eq!(said, format!("task {id} queued again (attempt 4)\n"));
    assert!(wait_until(Duration::from_secs(10), || runs(&runs_file)
        .len()
        == 4
        && show(&home, id)["state"] == "dead"));
    assert_eq!(runs(&runs_file)[3].0, 4);

    // Refused: a task that succeeded, one that is queued, one that never was (exit 1).
    let ok = home.enqueue(&["noop"]);
    assert!(wait_until(
        Duration::from_secs(5),
        || show(&home, ok)["state"] == "succeeded"
    ));
    for (id, says) in [
        (ok, "is succeeded: only a task that ended failed, dead"),
        (999_999, "no task 999999"),
    ] {
        let out = home.snapq(&["retry", &id.to_string()]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }
    let later = home.enqueue(&["noop", "--delay", "3600"]);
    let out = home.snapq(&["retry", &later.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is queued"));
}

/// A built-in (no retries) keeps at-most-once: a failure is final.
#[test]
fn tasks_without_retries_are_not_retried() {
    let home = Home::new();
    let _foreman = home.start(&[]);
    let id = home.enqueue(&["fail"]);
    assert!(wait_until(
        Duration::from_secs(5),
        || show(&home, id)["state"] == "failed"
    ));
    std::thread::sleep(Duration::from_millis(500));
    let record = show(&home, id);
    assert_eq!(
        (record["state"].as_str(), record["attempt"].as_i64()),
        (Some("failed"), Some(1))
    );
    assert_eq!(home.queued(), 0);
}

const WORKERS: usize = 4;

/// The ids whose records say `running`: the leases held when a foreman died.
fn running_ids(home: &Home) -> HashSet<i64> {
    let conn = home.conn();
    let mut stmt = conn
        .prepare("SELECT id FROM task_records WHERE state = 'running'")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn kill_9_during_an_at_least_once_drain_loses_nothing_and_repeats_only_running_tasks() {
    let home = Home::new();
    let out = home.file("out.txt");
    home.tasks_file(
        "[tasks.append_alo]\n\
         command = [\"/bin/sh\", \"-c\", \"echo \\\"$1\\\" >> \\\"$2\\\"\", \"sh\", \"{line}\", \"{path}\"]\n\
         params = { line = \"string\", path = \"string\" }\n\
         retries = 5\n",
    );
    let total = 5_000;
    let lines: String = (0..total)
        .map(|i| {
            format!(
                "{{\"task\":\"append_alo\",\"kwargs\":{{\"line\":\"t-{i:06}\",\"path\":\"{}\"}}}}\n",
                out.display()
            )
        })
        .collect();
    assert_eq!(home.enqueue_lines(&lines), total);
    let lines_now = || read_lines(&out).len();

    let mut running_at_kills = HashSet::new();
    for _ in 0..4 {
        let before = lines_now();
        let mut foreman = home.start(&["--workers", &WORKERS.to_string()]);
        assert!(
            wait_until(Duration::from_secs(30), || lines_now() >= before + 400),
            "the foreman ran no tasks:\n{}",
            foreman.log_text()
        );
        foreman.kill9();
        // What the dead foreman held: these, and only these, may run twice.
        let held = running_ids(&home);
        assert!(
            held.len() <= WORKERS,
            "{} leases held by one foreman",
            held.len()
        );
        running_at_kills.extend(held);
    }
    assert!(lines_now() < total, "the drain ended before the last kill");
    assert!(
        !running_at_kills.is_empty(),
        "no kill caught a task running: the test proved nothing"
    );

    let burst = home.snapq(&["run", "--burst", "--workers", &WORKERS.to_string()]);
    assert!(
        burst.status.success(),
        "{}",
        String::from_utf8_lossy(&burst.stderr)
    );
    assert_eq!(home.queued(), 0, "the queue is not empty after --burst");

    let mut count: HashMap<String, usize> = HashMap::new();
    for line in read_lines(&out) {
        *count.entry(line).or_default() += 1;
    }
    for i in 0..total {
        let line = format!("t-{i:06}");
        let id = i as i64 + 1;
        match count.get(&line) {
            None => panic!("task {id} never ran: at least once failed"),
            Some(1) => {}
            Some(n) => assert!(
                running_at_kills.contains(&id),
                "task {id} ran {n} times but was not running at a kill"
            ),
        }
    }
    // Every record ended `succeeded`; the rescued ones on a later attempt.
    let conn = home.conn();
    let by_state: Vec<(String, i64)> = conn
        .prepare("SELECT state, count(*) FROM task_records GROUP BY state")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(by_state, [("succeeded".to_owned(), total as i64)]);
    let retried: i64 = conn
        .query_row(
            "SELECT count(*) FROM task_records WHERE attempt > 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        retried as usize >= running_at_kills.len(),
        "{retried} records on a later attempt, {} rescued",
        running_at_kills.len()
    );
}

#[test]
fn a_lease_of_a_live_foreman_is_not_rescued_by_another_foreman() {
    let home = Home::new();
    let runs_file = home.file("runs.txt");
    home.tasks_file(
        &format!(
            "[tasks.long]\ncommand = [\"/bin/sh\", \"-c\", \"echo $$ >> '{}'; sleep 20\"]\nretries = 3\n",
            runs_file.display()
        ),
    );
    let first = home.start(&["--no-pid-file", "--workers", "1"]);
    let id = home.enqueue(&["long"]);
    assert!(wait_until(
        Duration::from_secs(5),
        || show(&home, id)["state"] == "running"
    ));
    // A second foreman on the same database, beside it for the whole run.
    let second = home.start(&["--no-pid-file", "--workers", "1"]);
    assert!(
        wait_until(Duration::from_secs(30), || show(&home, id)["state"]
            == "succeeded"),
        "{}\n{}",
        first.log_text(),
        second.log_text()
    );
    let record = show(&home, id);
    assert_eq!(record["attempt"], 1, "{record}");
    assert_eq!(read_lines(&runs_file).len(), 1, "the task ran twice");
    assert!(second.events("task started").is_empty());
    assert!(!second.has_log("rescued"));
}
