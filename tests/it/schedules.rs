//! Issue 18: schedules on the real binary — ticks fired by the foreman, exactly once with
//! two foremen, caught up after kill -9, paused and resumed, kept across restarts.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Foreman, Home, read_lines, wait_until};

/// `schedule add NAME append --every SECS`, appending to OUT.
fn add_every(home: &Home, name: &str, every: &str, out: &str, extra: &[&str]) {
    let kwargs = serde_json::json!({"path": out, "line": name}).to_string();
    let mut args = vec![
        "schedule", "add", name, "append", "--every", every, "--kwargs", &kwargs,
    ];
    args.extend_from_slice(extra);
    home.ok(&args);
}

/// The ticks a foreman logged as fired, as (schedule, tick).
fn fired(foreman: &Foreman) -> Vec<(String, String)> {
    foreman
        .events("schedule fired")
        .iter()
        .map(|e| {
            (
                e["schedule"].as_str().unwrap().to_owned(),
                e["tick"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_second_fires_ten_times_in_ten_seconds_and_each_task_runs() {
    let home = Home::new();
    let out = home.file("out.txt");
    let (foreman, addr) = crate::live::start_live(&home, &[]);
    let added = Instant::now();
    add_every(&home, "tick", "1", out.to_str().unwrap(), &[]);
    std::thread::sleep(Duration::from_secs(10).saturating_sub(added.elapsed()));
    let ticks = fired(&foreman).len();
    assert!((9..=11).contains(&ticks), "{ticks} ticks in 10 s");
    // Each tick's task ran (the last may still be on its way).
    assert!(wait_until(Duration::from_secs(2), || {
        read_lines(&out).len() >= ticks
    }));
    let shown: Value = serde_json::from_str(&home.ok(&["schedule", "show", "tick"])).unwrap();
    assert_eq!(shown["upcoming"].as_array().unwrap().len(), 5, "{shown}");
    // Paused, its last task's end is recorded soon after it ran.
    home.ok(&["schedule", "pause", "tick"]);
    let mut shown = Value::Null;
    assert!(
        wait_until(Duration::from_secs(3), || {
            shown = serde_json::from_str(&home.ok(&["schedule", "show", "tick"])).unwrap();
            shown["last_task_state"] == "succeeded"
        }),
        "{shown}"
    );

    // `status` and the live view show it.
    let status: Value = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["schedules"]["total"], 1, "{status}");
    assert_eq!(status["schedules"]["paused"], 1, "{status}");
    assert_eq!(
        status["schedules"]["last"]["state"], "succeeded",
        "{status}"
    );
    assert!(home.ok(&["status"]).contains("schedules: 1 (1 paused)"));
    let (code, body) = crate::live::get(&addr, "/api/schedules", &[]);
    assert_eq!(code, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed[0]["name"], "tick", "{listed}");
    assert_eq!(listed[0]["when"], "every 1 s", "{listed}");
}

#[test]
fn two_foremen_fire_each_tick_exactly_once() {
    let home = Home::new();
    let out = home.file("out.txt");
    let first = home.start(&["--no-pid-file"]);
    let second = home.start(&["--no-pid-file"]);
    add_every(&home, "tick", "0.5", out.to_str().unwrap(), &[]);
    std::thread::sleep(Duration::from_secs(20));
    let mut all = fired(&first);
    all.extend(fired(&second));
    let distinct: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(distinct.len(), all.len(), "a tick fired twice: {all:?}");
    assert!(
        (38..=42).contains(&all.len()),
        "{} ticks of 0.5 s in 20 s",
        all.len()
    );
    // Both took part or not, every tick's task ran once.
    assert!(wait_until(Duration::from_secs(2), || {
        read_lines(&out).len() >= all.len()
    }));
    let ran = read_lines(&out).len();
    assert!(ran <= all.len() + 1, "{ran} runs of {} ticks", all.len());
}

#[test]
fn after_kill_9_the_missed_ticks_fire_once_with_catch_up_one() {
    let home = Home::new();
    let out = home.file("out.txt");
    let mut foreman = home.start(&[]);
    add_every(&home, "tick", "1", out.to_str().unwrap(), &[]);
    assert!(wait_until(Duration::from_secs(5), || !fired(&foreman).is_empty()));
    foreman.kill9();
    // Five ticks pass with no foreman.
    std::thread::sleep(Duration::from_millis(5_500));
    let before = read_lines(&out).len();
    let restarted = home.start(&[]);
    let fired_at_once = wait_until(Duration::from_secs(1), || !fired(&restarted).is_empty());
    assert!(fired_at_once, "{}", restarted.log_text());
    let skipped = restarted
        .events("schedule ticks skipped (passed while no foreman ran; see its --catch-up)");
    assert_eq!(skipped.len(), 1, "{}", restarted.log_text());
    let n = skipped[0]["skipped"].as_u64().unwrap();
    assert!((4..=6).contains(&n), "skipped {n}");
    // One catch-up fire, not six: within the first half second after the start, one task.
    std::thread::sleep(Duration::from_millis(300));
    assert!(fired(&restarted).len() <= 2, "{:?}", fired(&restarted));
    assert!(wait_until(Duration::from_secs(2), || read_lines(&out)
        .len()
        > before));
}

#[test]
fn pause_stops_firing_resume_starts_at_the_next_tick_and_a_restart_keeps_it() {
    let home = Home::new();
    let out = home.file("out.txt");
    let mut foreman = home.start(&[]);
    add_every(
        &home,
        "tick",
        "1",
        out.to_str().unwrap(),
        &["--catch-up", "all"],
    );
    assert!(wait_until(Duration::from_secs(5), || !fired(&foreman).is_empty()));
    home.ok(&["schedule", "pause", "tick"]);
    let paused = fired(&foreman).len();
    std::thread::sleep(Duration::from_secs(3));
    assert!(fired(&foreman).len() <= paused + 1, "fired while paused");
    let list = home.ok(&["schedule", "list"]);
    assert!(list.contains("(paused)"), "{list}");
    // Resumed: the next tick is within a second, and the paused ones are not caught up.
    let count = fired(&foreman).len();
    home.ok(&["schedule", "resume", "tick"]);
    assert!(wait_until(Duration::from_millis(1_500), || fired(&foreman)
        .len()
        > count));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fired(&foreman).len(), count + 1);

    // A restart (SIGTERM, then a new foreman) keeps the schedule.
    foreman.stop();
    let next = home.start(&[]);
    assert!(wait_until(Duration::from_secs(3), || !fired(&next).is_empty()));
}

#[test]
fn bad_schedules_exit_2_and_store_nothing() {
    let home = Home::new();
    home.ok(&["schedule", "add", "ok", "noop", "--every", "60"]);
    for (args, says) in [
        (
            &["schedule", "add", "a", "noop", "--cron", "61 * * * *"][..],
            "not a cron expression",
        ),
        (
            &[
                "schedule",
                "add",
                "a",
                "noop",
                "--cron",
                "* * * * *",
                "--tz",
                "Mars/Base",
            ],
            "Mars/Base",
        ),
        (
            &["schedule", "add", "a", "noop", "--every", "0"],
            "too short",
        ),
        (
            &["schedule", "add", "a", "nosuch", "--every", "1"],
            "unknown task",
        ),
        (
            &[
                "schedule", "add", "a", "sleep", "--every", "1", "--args", "[\"x\"]",
            ],
            "must be a number",
        ),
        (&["schedule", "add", "a", "noop"], "--cron EXPR or --every"),
        (
            &["schedule", "add", "ok", "noop", "--every", "1"],
            "schedule update",
        ),
        (
            &["schedule", "add", "a b", "noop", "--every", "1"],
            "letters, digits",
        ),
    ] {
        let result = home.snapq(args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let listed: Value = serde_json::from_str(&home.ok(&["schedule", "list", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    // SPEC's fields of `schedule list --json`.
    assert_eq!(listed[0]["name"], "ok", "{listed}");
    assert_eq!(listed[0]["task"], "noop", "{listed}");
    assert_eq!(listed[0]["paused"], false, "{listed}");
    assert!(listed[0]["next_fire_at"].is_string(), "{listed}");
    assert_eq!(
        home.snapq(&["schedule", "remove", "nosuch"]).status.code(),
        Some(1)
    );
}

/// README, "Schedules": its commands work as written.
#[test]
fn the_readme_examples_work_as_written() {
    let readme = include_str!("../../README.md");
    let block = readme
        .split_once("## Schedules")
        .and_then(|(_, rest)| rest.split_once("```sh\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .unwrap();
    let home = Home::new();
    let bin_dir = std::path::Path::new(crate::support::BIN).parent().unwrap();
    // The block's `snapq` is the binary under test, in this home.
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let run = std::process::Command::new("/bin/sh")
        .args(["-e", "-c", block])
        .env("SNAPQ_HOME", home.path())
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let listed: Value = serde_json::from_str(&home.ok(&["schedule", "list", "--json"])).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["heartbeat-file", "nightly-report", "weekly"]);
    assert_eq!(listed[0]["when"], "every 30 s");
    assert_eq!(listed[1]["paused"], true);
}
