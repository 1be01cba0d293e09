//! `run --burst` tells a cron job what happened (issue 13, item 15): 0 when every task it
//! ran succeeded, 3 when any did not (the others still ran), 1 when it could not read the
//! queue.

use crate::support::{Home, read_lines};

#[test]
fn burst_exits_3_when_a_task_failed_and_still_runs_the_rest() {
    let home = Home::new();
    let out = home.file("out.txt");
    let append = serde_json::json!({"path": out, "line": "ran"}).to_string();
    home.ok(&["enqueue", "append", "--kwargs", &append]);
    assert_eq!(home.snapq(&["run", "--burst"]).status.code(), Some(0));

    home.ok(&[
        "enqueue",
        "fail",
        "--kwargs",
        "{\"message\": \"disk on fire\"}",
    ]);
    home.ok(&["enqueue", "panic"]);
    home.ok(&["enqueue", "append", "--kwargs", &append]);
    let burst = home.snapq(&["run", "--burst"]);
    let stderr = String::from_utf8_lossy(&burst.stderr);
    assert_eq!(burst.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("2 of 3 tasks did not succeed"), "{stderr}");
    assert_eq!(read_lines(&out), ["ran", "ran"]);
    assert_eq!(home.queued(), 0);
}

#[test]
fn burst_exits_1_when_it_cannot_read_the_queue() {
    let home = Home::new();
    home.ok(&["enqueue", "noop"]);
    // A database damaged by hand: the schema version says the queue is there, it is not.
    home.conn().execute_batch("DROP TABLE tasks").unwrap();
    let burst = home.snapq(&["run", "--burst"]);
    let stderr = String::from_utf8_lossy(&burst.stderr);
    assert_eq!(burst.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no such table: tasks"), "{stderr}");
}
