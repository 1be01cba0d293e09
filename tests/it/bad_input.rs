//! Bad input gets exit 2, a message naming the problem, and no change to the queue.

use crate::support::Home;

/// Runs `snapq ARGS`, expecting exit 2 with `needle` in the message and the queue as it was.
fn refused(home: &Home, args: &[&str], needle: &str) {
    let before = home.queued();
    let out = home.snapq(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "snapq {args:?}: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "snapq {args:?}: expected {needle:?} in: {stderr}"
    );
    assert!(out.stdout.is_empty(), "snapq {args:?} printed to stdout");
    assert_eq!(home.queued(), before, "snapq {args:?} changed the queue");
}

#[test]
fn bad_enqueues_store_nothing() {
    let home = Home::new();
    home.ok(&["enqueue", "noop"]);
    refused(&home, &["enqueue", "noop", "--args", "[1,"], "--args");
    refused(
        &home,
        &["enqueue", "noop", "--args", "{\"a\": 1}"],
        "must be a JSON array",
    );
    refused(
        &home,
        &["enqueue", "noop", "--kwargs", "[]"],
        "must be a JSON object",
    );
    refused(
        &home,
        &["enqueue", "sleep", "--kwargs", "{\"seconds\": \"x\"}"],
        "\"seconds\" must be a number",
    );
    refused(
        &home,
        &["enqueue", "sleep"],
        "missing required parameter \"seconds\"",
    );
    refused(
        &home,
        &[
            "enqueue",
            "sleep",
            "--kwargs",
            "{\"seconds\": 1, \"extra\": 2}",
        ],
        "no parameter named \"extra\"",
    );
    refused(&home, &["enqueue", "nosuch"], "unknown task \"nosuch\"");
    refused(&home, &["enqueue", "noop", "--delay", "-1"], "negative");
    refused(
        &home,
        &["enqueue", "noop", "--delay", "soon"],
        "not a number of seconds",
    );
    refused(&home, &["enqueue", "noop", "--at", "tomorrow"], "RFC 3339");
    refused(
        &home,
        &[
            "enqueue",
            "noop",
            "--delay",
            "1",
            "--at",
            "2030-01-01T00:00:00Z",
        ],
        "cannot be used with",
    );
    refused(&home, &["enqueue"], "required");
    refused(&home, &["run", "--workers", "0"], "--workers");
    refused(&home, &["run", "--graceful-timeout", "-3"], "negative");
}

#[test]
fn a_bulk_file_with_one_bad_line_stores_nothing_and_names_the_line() {
    let home = Home::new();
    home.ok(&["enqueue", "noop"]);
    let good = "{\"task\":\"noop\"}\n";
    let file = home.file("bulk.jsonl");
    let cases = [
        (
            format!("{good}{good}{{\"task\":\"noop\",\"args\":[1]}}\n{good}"),
            "line 3",
            "at most 0",
        ),
        (
            format!("{good}\n{{\"task\": \"nosuch\"}}\n"),
            "line 3",
            "unknown task",
        ),
        (format!("{good}{{not json\n"), "line 2", "JSON"),
        (
            format!("{good}{{\"task\":\"noop\",\"delay\":-2}}\n"),
            "line 2",
            "negative",
        ),
        (
            "{\"task\":\"noop\",\"colour\":1}\n".to_string(),
            "line 1",
            "unknown field",
        ),
    ];
    for (content, line, what) in cases {
        std::fs::write(&file, content).unwrap();
        refused(&home, &["enqueue", "--file", file.to_str().unwrap()], line);
        refused(&home, &["enqueue", "--file", file.to_str().unwrap()], what);
    }
    refused(
        &home,
        &[
            "enqueue",
            "--file",
            home.file("missing.jsonl").to_str().unwrap(),
        ],
        "cannot be read",
    );
    // From stdin too.
    let out = crate::support::output_with_stdin(
        home.cmd().args(["enqueue", "--file", "-"]),
        b"{\"task\":\"noop\"}\n{\"task\":1}\n",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2 of stdin"));
    assert_eq!(home.queued(), 1);
}

#[test]
fn a_corrupt_database_is_refused_and_left_untouched() {
    let home = Home::new();
    let junk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(home.db_path(), &junk).unwrap();
    for args in [&["enqueue", "noop"][..], &["run", "--burst"], &["status"]] {
        let out = home.snapq(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "snapq {args:?}: {stderr}");
        assert!(
            stderr.contains("not a SQLite database or is corrupt"),
            "{stderr}"
        );
        assert!(stderr.contains("was not modified"), "{stderr}");
    }
    assert_eq!(std::fs::read(home.db_path()).unwrap(), junk);
    assert!(!home.file("snapq.sqlite3-wal").exists());
}

#[test]
fn a_database_path_that_is_a_directory_is_refused() {
    let home = Home::new();
    let dir = home.file("adir");
    std::fs::create_dir(&dir).unwrap();
    for args in [&["enqueue", "noop"][..], &["run", "--burst"]] {
        let out = home
            .cmd()
            .arg("--db")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("is a directory"), "{stderr}");
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn an_unusable_wakeup_directory_is_refused_before_anything_is_stored() {
    let home = Home::new();
    home.ok(&["enqueue", "noop"]);
    // A regular file where a directory is needed: unusable even for root.
    let file = home.file("plain-file");
    std::fs::write(&file, "").unwrap();
    let wakeup = file.join("wakeup");
    for args in [&["enqueue", "noop"][..], &["run", "--burst"]] {
        let out = home
            .cmd()
            .arg("--wakeup-dir")
            .arg(&wakeup)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("wake-up directory"), "{stderr}");
        assert!(stderr.contains("--wakeup-dir"), "{stderr}");
    }
    assert_eq!(home.queued(), 1);
}
