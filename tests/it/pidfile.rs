//! Invariant 4: a live foreman's pid file refuses a second one; a stale one is replaced.

use std::time::Duration;

use crate::support::Home;

#[test]
fn a_live_pid_file_refuses_a_second_foreman() {
    let home = Home::new();
    let first = home.start(&[]);
    let pid_file = home.file("snapq.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        first.pid().to_string()
    );
    let second = home.snapq(&["run"]);
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another snapq foreman"), "{stderr}");
    assert!(stderr.contains(&first.pid().to_string()), "{stderr}");
    // The refused start left the running foreman's pid file alone.
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        first.pid().to_string()
    );
    // status finds the live foreman.
    let status: serde_json::Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["foreman"]["pid"], first.pid());
}

#[test]
fn stale_pid_files_are_replaced_with_a_warning() {
    let home = Home::new();
    let pid_file = home.file("snapq.pid");
    // No such process (above any pid_max), then a live process that is not snapq.
    for (stale, why) in [
        ("4194399", "is not running"),
        ("1", "is not a snapq process"),
    ] {
        std::fs::write(&pid_file, format!("{stale}\n")).unwrap();
        let mut foreman = home.start(&[]);
        assert_eq!(
            std::fs::read_to_string(&pid_file).unwrap().trim(),
            foreman.pid().to_string()
        );
        let warned = foreman.events(&format!("replacing a stale pid file: pid {stale} {why}"));
        assert_eq!(warned.len(), 1, "{}", foreman.log_text());
        foreman.stop();
        assert!(!pid_file.exists());
    }
}

#[test]
fn no_pid_file_writes_none() {
    let home = Home::new();
    let mut cmd = home.cmd();
    cmd.env("SNAPQ_NO_PID_FILE", "1")
        .args(["run", "--log-format", "json"]);
    let mut foreman = crate::support::Foreman::spawn(cmd);
    assert!(!home.file("snapq.pid").exists());
    foreman.stop();
}

/// A foreman killed with -9 while it starts commands is restarted at once, as systemd
/// would: the restart is not refused. (A command between its clone and its exec shares
/// the dead foreman's lock on the pid file for a moment; before the wait for it, about
/// one restart in 15 was refused as "another snapq foreman is running".)
#[test]
fn a_foreman_killed_while_it_starts_commands_restarts_at_once() {
    let home = Home::new();
    home.tasks_file("[tasks.t]\ncommand = [\"/bin/sh\", \"-c\", \"true\"]\n");
    home.enqueue_lines(&"{\"task\":\"t\"}\n".repeat(50_000));
    let mut foreman = home.start(&["--workers", "4"]);
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(150));
        foreman.kill9();
        // Asserts that it becomes ready.
        foreman = home.start(&["--workers", "4"]);
    }
    foreman.stop();
}
