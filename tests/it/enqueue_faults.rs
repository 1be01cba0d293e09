//! An enqueue that stored its task(s) says so (issue 13, item 2). A script that retries
//! `snapq enqueue` on failure must never run a task twice, so a task that was committed is
//! never reported as failed, whatever fails after the commit.
//!
//! The fault: the process may open only N files. For each N from "too few to open the
//! database" to "enough for everything", either the task is stored and the command exits 0
//! with its id, or nothing is stored and it exits non-zero. Some N lets the database work
//! but not the wake-up file: that enqueue must exit 0 and warn that the foreman was not
//! woken.

use std::os::unix::process::CommandExt;

use crate::support::Home;

fn with_open_files_limit(cmd: &mut std::process::Command, limit: u64) {
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // setrlimit(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn stored(home: &Home, line: &str) -> i64 {
    home.conn()
        .query_row(
            "SELECT count(*) FROM tasks WHERE kwargs LIKE '%' || ?1 || '%'",
            [line],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn a_stored_task_is_never_reported_as_failed() {
    let home = Home::new();
    let out = home.file("out.txt");
    // The database and wake-up directory exist, as under a foreman.
    home.ok(&["enqueue", "noop"]);
    let wake_file = home.file("wakeup").join("wake");
    let mut unwoken = Vec::new();
    for bulk in [false, true] {
        for limit in 3..=16u64 {
            let _ = std::fs::remove_file(&wake_file);
            let line = format!("bulk-{bulk}-limit-{limit}");
            let kwargs = serde_json::json!({"path": out, "line": line}).to_string();
            let mut cmd = home.cmd();
            if bulk {
                let input = home.file(&format!("{line}.jsonl"));
                std::fs::write(
                    &input,
                    format!("{{\"task\": \"append\", \"kwargs\": {kwargs}}}\n"),
                )
                .unwrap();
                // On stdin, so that the input takes no file of the limit's.
                cmd.args(["enqueue", "--file", "-"])
                    .stdin(std::fs::File::open(&input).unwrap());
            } else {
                cmd.args(["enqueue", "append", "--kwargs", &kwargs]);
            }
            with_open_files_limit(&mut cmd, limit);
            let result = cmd.output().unwrap();
            let stderr = String::from_utf8_lossy(&result.stderr);
            let n = stored(&home, &line);
            if n == 1 {
                assert_eq!(
                    result.status.code(),
                    Some(0),
                    "{line}: stored, yet reported as failed: {stderr}"
                );
                let printed = String::from_utf8_lossy(&result.stdout);
                assert!(!printed.trim().is_empty(), "{line}: printed nothing");
                if stderr.contains("the foreman was not woken") {
                    unwoken.push(line);
                }
            } else {
                assert_eq!(n, 0, "{line}");
                assert_ne!(
                    result.status.code(),
                    Some(0),
                    "{line}: not stored: {stderr}"
                );
                // Below a few files the dynamic loader fails before snapq runs at all.
                let started = !stderr.contains("error while loading shared libraries");
                assert!(
                    !started || stderr.contains("snapq: error:"),
                    "{line}: {stderr}"
                );
            }
        }
    }
    assert!(
        unwoken.iter().any(|l| l.starts_with("bulk-false"))
            && unwoken.iter().any(|l| l.starts_with("bulk-true")),
        "no limit let the database work but not the wake-up file: {unwoken:?}"
    );
}
