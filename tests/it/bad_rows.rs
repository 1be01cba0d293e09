//! Rows that other programs wrote badly (issue 13, item 1): a row that cannot be read is one
//! rejected task, logged with its id and counted as failed; the good rows claimed in the
//! same batch run. What SQLite's type affinity makes reasonable is accepted.

use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::params;
use rusqlite::types::Value;

use crate::support::{Home, read_lines};

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn append_kwargs(out: &std::path::Path, line: &str) -> String {
    serde_json::json!({"path": out, "line": line}).to_string()
}

#[test]
fn an_unreadable_row_is_rejected_alone_and_its_batch_runs() {
    let home = Home::new();
    let out = home.file("out.txt");
    // The schema, made by snapq itself.
    home.ok(&[
        "enqueue",
        "append",
        "--kwargs",
        &append_kwargs(&out, "good-0"),
    ]);
    let conn = home.conn();
    let now = now_us();
    let insert = |name: &str, args: Value, kwargs: Value, created: Value, run_at: Value| {
        conn.execute(
            "INSERT INTO tasks (task_name, args, kwargs, created_at, run_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, args, kwargs, created, run_at],
        )
        .unwrap();
        conn.last_insert_rowid()
    };
    let text = |s: String| Value::Text(s);
    let kw = |line: &str| text(append_kwargs(&out, line));
    // Accepted: a Python writer's float microseconds, and JSON sent as bytes.
    insert(
        "append",
        text("[]".into()),
        kw("real-run-at"),
        Value::Integer(now),
        Value::Real(now as f64 - 1_000.5),
    );
    insert(
        "append",
        Value::Blob(b"[]".to_vec()),
        Value::Blob(append_kwargs(&out, "blob-json").into_bytes()),
        Value::Real(now as f64),
        Value::Null,
    );
    // Unreadable: bytes that are not UTF-8, as a BLOB and as TEXT; a due time as text.
    let bad_blob = insert(
        "append",
        Value::Blob(vec![0xff, 0xfe, b'[', b']']),
        kw("never-1"),
        Value::Integer(now),
        Value::Null,
    );
    conn.execute(
        "INSERT INTO tasks (task_name, kwargs, created_at) \
         VALUES ('append', CAST(x'7bff7d' AS TEXT), ?1)",
        [now],
    )
    .unwrap();
    let bad_text = conn.last_insert_rowid();
    let bad_time = insert(
        "append",
        text("[]".into()),
        kw("never-2"),
        Value::Integer(now),
        text("2026-12-02T10:00:00Z".into()),
    );
    for i in 1..=5 {
        insert(
            "append",
            text("[]".into()),
            kw(&format!("good-{i}")),
            Value::Integer(now),
            Value::Null,
        );
    }

    // `status` reads such rows too, and counts them all as due.
    let status: serde_json::Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["tasks"]["due"], 11, "{status}");

    // One batch takes them all; every good row runs, each bad one is rejected by id.
    let burst = home
        .cmd()
        .args(["run", "--burst", "--batch", "100", "--log-format", "json"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&burst.stderr);
    let mut lines = read_lines(&out);
    lines.sort();
    assert_eq!(
        lines,
        [
            "blob-json",
            "good-0",
            "good-1",
            "good-2",
            "good-3",
            "good-4",
            "good-5",
            "real-run-at"
        ],
        "{log}"
    );
    let rejected: Vec<(i64, String)> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["message"] == "task rejected and deleted, not retried")
        .map(|e| {
            (
                e["id"].as_i64().unwrap(),
                e["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let ids: Vec<i64> = rejected.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 3, "{log}");
    for id in [bad_blob, bad_text, bad_time] {
        assert!(ids.contains(&id), "row {id} was not rejected by id:\n{log}");
    }
    for (id, error) in &rejected {
        assert!(error.contains("cannot be read"), "row {id}: {error}");
    }
    assert!(
        rejected
            .iter()
            .any(|(_, e)| e.contains("run_at is the text")),
        "{rejected:?}"
    );
    // The queue is empty: nothing was left behind, nothing will be retried.
    assert_eq!(home.queued(), 0);
    // Three tasks did not succeed: a cron job sees it (item 15).
    assert_eq!(burst.status.code(), Some(3), "{log}");
    assert!(
        log.contains("3 of 11 tasks did not succeed"),
        "the exit's message:\n{log}"
    );
}

/// A running foreman finds a row whose due time is text at its next safety re-read (not on
/// every claim) and rejects it; it does not spin on it meanwhile.
#[test]
fn a_running_foreman_sweeps_rows_whose_due_time_is_text() {
    let home = Home::new();
    let foreman = home.start(&["--safety-interval", "3"]);
    let conn = home.conn();
    conn.execute(
        "INSERT INTO tasks (task_name, created_at, run_at) VALUES ('noop', ?1, 'tomorrow')",
        [now_us()],
    )
    .unwrap();
    let id = conn.last_insert_rowid();
    std::fs::write(home.file("wakeup").join("bad"), "").unwrap();
    assert!(
        crate::support::wait_until(std::time::Duration::from_secs(5), || foreman
            .events("task rejected and deleted, not retried")
            .iter()
            .any(|e| e["id"] == id)),
        "{}",
        foreman.log_text()
    );
    assert_eq!(home.queued(), 0);
    // CPU time of the foreman over that wait: an idle loop, not one spinning on the row.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", foreman.pid())).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    assert!(ticks < 100, "the foreman used {ticks} clock ticks of CPU");
}
