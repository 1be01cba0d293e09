//! Issue 16: command tasks from the tasks file, run by the real binary as real child
//! processes (scripts the tests write), with their arguments, environment, exit codes,
//! signals, timeouts, output, and the foreman's stop and death.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Home, wait_until};

fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes an executable shell script.
fn script(home: &Home, name: &str, body: &str) -> String {
    let path = home.file(name);
    write_mode(&path, &format!("#!/bin/sh\n{body}"), 0o755);
    path.display().to_string()
}

fn show(home: &Home, id: i64) -> Value {
    serde_json::from_str(&home.ok(&["show", &id.to_string(), "--json"])).unwrap()
}

fn alive(pid: &str) -> bool {
    snapq::pidfile::process_runs(pid.trim().parse().unwrap())
}

/// The pids a script wrote to `path`, one a line, once there are `count` of them.
fn pids(path: &Path, count: usize) -> Vec<String> {
    let mut found = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            found = std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            found.len() >= count
        }),
        "{} holds {found:?}",
        path.display()
    );
    found
}

#[test]
fn arguments_arrive_as_single_literal_arguments_with_env_and_cwd() {
    let home = Home::new();
    std::fs::create_dir(home.file("work")).unwrap();
    let args = script(
        &home,
        "args.sh",
        "out=$1; shift\n\
         printf '%s\\n' \"$#\" \"$@\" > \"$out\"\n\
         printf '%s|%s|%s|%s|%s\\n' \"$APP_ENV\" \"$SNAPQ_TASK_ID\" \"$SNAPQ_TASK_NAME\" \
         \"$SNAPQ_ATTEMPT\" \"$(pwd)\" >> \"$out\"\n",
    );
    home.tasks_file(
        &format!(
            "[tasks.args]\n\
             summary = \"prints its arguments\"\n\
             command = [\"{args}\", \"{{out}}\", \"--\", \"{{a}}\", \"{{b}}\", \"x{{c}}y\", \"{{{{lit}}}}\"]\n\
             params = {{ out = \"string\", a = \"string\", b = \"string\", c = {{ type = \"integer\", default = 7 }} }}\n\
             cwd = \"{work}\"\n\
             env = {{ APP_ENV = \"test env\" }}\n",
            work = home.file("work").display()
        ),
    );
    let hostile_a = "a b 'q' \"d\" -n";
    let hostile_b = "$(touch pwned); touch pwned2 `touch pwned3` -rf *";
    let out = home.file("out.txt");
    let kwargs = serde_json::json!({
        "out": out.to_str().unwrap(), "a": hostile_a, "b": hostile_b,
    })
    .to_string();
    let id = home.enqueue(&["args", "--kwargs", &kwargs]);

    // `snapq tasks` lists it with its parameters and command.
    // One line a task (SPEC), the command task's with its command.
    let listed = home.ok(&["tasks"]);
    let line = listed.lines().find(|l| l.starts_with("args ")).unwrap();
    assert!(
        line.contains("\"c\"?: integer") && line.contains(&format!("(runs [\"{args}\"")),
        "{listed}"
    );
    assert_eq!(listed.lines().count(), 6, "{listed}");
    let listed: Value = serde_json::from_str(&home.ok(&["tasks", "--json"])).unwrap();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "args")
        .unwrap();
    assert_eq!(entry["command"][0], args.as_str(), "{entry}");

    // Bad input for a command task: exit 2, nothing stored.
    for (kwargs, says) in [
        (
            r#"{"out": "o", "a": "x"}"#,
            "missing required parameter \"b\"",
        ),
        (
            r#"{"out": "o", "a": "x", "bb": "y"}"#,
            "no parameter named \"bb\"",
        ),
        (
            r#"{"out": "o", "a": "x", "b": "y", "c": 1.5}"#,
            "must be an integer",
        ),
        (r#"{"out": "o", "a": "x\u0000y", "b": "y"}"#, "NUL"),
    ] {
        let result = home.snapq(&["enqueue", "args", "--kwargs", kwargs]);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(2), "{kwargs}: {stderr}");
        assert!(stderr.contains(says), "{kwargs}: {stderr}");
    }
    assert_eq!(home.queued(), 1);

    home.ok(&["run", "--burst"]);
    let record = show(&home, id);
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["exit_code"], 0, "{record}");
    let printed = std::fs::read_to_string(&out).unwrap();
    let work = home.file("work");
    assert_eq!(
        printed,
        format!(
            "5\n--\n{hostile_a}\n{hostile_b}\nx7y\n{{lit}}\ntest env|{id}|args|1|{}\n",
            work.display()
        )
    );
    for name in ["pwned", "pwned2", "pwned3"] {
        assert!(!home.file(name).exists() && !work.join(name).exists());
    }
}

#[test]
fn exit_codes_signals_and_output_are_recorded() {
    let home = Home::new();
    home.tasks_file(
        "[tasks.exit3]\ncommand = [\"/bin/sh\", \"-c\", \"echo to stdout; echo to stderr >&2; exit 3\"]\n\
         [tasks.usr1]\ncommand = [\"/bin/sh\", \"-c\", \"kill -USR1 $$\"]\n\
         [tasks.missing]\ncommand = [\"/no/such/program\"]\n\
         [tasks.ok]\ncommand = [\"/bin/echo\", \"{word}\"]\nparams = { word = \"string\" }\n",
    );
    let exit3 = home.enqueue(&["exit3"]);
    let usr1 = home.enqueue(&["usr1"]);
    let missing = home.enqueue(&["missing"]);
    let ok = home.enqueue(&["ok", "--args", r#"["hello"]"#]);
    let burst = home.snapq(&["run", "--burst"]);
    let log = String::from_utf8_lossy(&burst.stderr);
    assert_eq!(burst.status.code(), Some(3), "{log}");
    assert!(
        log.contains("/no/such/program is not an executable file"),
        "{log}"
    );

    let r = show(&home, exit3);
    assert_eq!(
        (&r["state"], &r["exit_code"], &r["signal"]),
        (&"failed".into(), &3.into(), &Value::Null),
        "{r}"
    );
    assert_eq!(r["output"], "to stdout\nto stderr\n", "{r}");
    assert_eq!(r["error"], "exited with code 3", "{r}");
    let r = show(&home, usr1);
    assert_eq!(
        (&r["state"], &r["exit_code"], &r["signal"]),
        (&"failed".into(), &Value::Null, &"USR1".into()),
        "{r}"
    );
    let r = show(&home, missing);
    assert_eq!(r["state"], "rejected", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("/no/such/program"),
        "{r}"
    );
    let r = show(&home, ok);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(home.ok(&["logs", &ok.to_string()]), "hello\n");
    let text = home.ok(&["show", &exit3.to_string()]);
    assert!(
        text.starts_with(&format!("task {exit3} (exit3): failed, attempt 1\n"))
            && text.contains("exit code 3")
            && text.contains("    to stderr"),
        "{text}"
    );
    // A task with no record: exit 1, as `show`.
    assert_eq!(home.snapq(&["logs", "999"]).status.code(), Some(1));
}

#[test]
fn a_timed_out_command_and_its_grandchild_are_killed() {
    let home = Home::new();
    let pidfile = home.file("pids");
    // The shell ignores SIGTERM, so only the SIGKILL `kill_after` later ends it.
    home.tasks_file(&format!(
        "[tasks.hang]\n\
             command = [\"/bin/sh\", \"-c\", \"trap '' TERM; sleep 100 & echo $! > {}; wait\"]\n\
             timeout = 1\nkill_after = 1\n",
        pidfile.display()
    ));
    let id = home.enqueue(&["hang"]);
    let started = Instant::now();
    let burst = home.snapq(&["run", "--burst"]);
    assert_eq!(burst.status.code(), Some(3));
    let r = show(&home, id);
    assert_eq!(r["state"], "timed_out", "{r}");
    assert_eq!(r["signal"], "KILL", "{r}");
    let took = r["duration_seconds"].as_f64().unwrap();
    assert!((1.0..=2.5).contains(&took), "ran {took} s; {r}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let grandchild = pids(&pidfile, 1).remove(0);
    assert!(
        wait_until(Duration::from_millis(500), || !alive(&grandchild)),
        "the grandchild {grandchild} outlived the timeout"
    );
}

#[test]
fn sigterm_past_the_graceful_deadline_stops_commands_and_records_them_abandoned() {
    let home = Home::new();
    let pidfile = home.file("pids");
    home.tasks_file(
        &format!(
            "[tasks.long]\n\
             command = [\"/bin/sh\", \"-c\", \"echo $$ >> {p}; sleep 100 & echo $! >> {p}; wait\"]\n\
             kill_after = 1\n",
            p = pidfile.display()
        ),
    );
    let mut foreman = home.start(&["--graceful-timeout", "1"]);
    let id = home.enqueue(&["long"]);
    let pids = pids(&pidfile, 2);
    let signalled = Instant::now();
    foreman.signal(libc::SIGTERM);
    let status = foreman
        .wait_exit(Duration::from_secs(10))
        .expect("the foreman did not exit");
    assert!(status.success(), "{status}: {}", foreman.log_text());
    // The graceful second, then the command's SIGTERM (sh dies of it at once).
    assert!(
        signalled.elapsed() < Duration::from_millis(2_800),
        "{:?}",
        signalled.elapsed()
    );
    let r = show(&home, id);
    assert_eq!(r["state"], "abandoned", "{r}");
    assert_eq!(r["signal"], "TERM", "{r}");
    for pid in &pids {
        assert!(
            wait_until(Duration::from_millis(500), || !alive(pid)),
            "process {pid} outlived the foreman"
        );
    }
}

#[test]
fn kill_9_of_the_foreman_leaves_no_command_running() {
    let home = Home::new();
    let pidfile = home.file("pids");
    home.tasks_file(&format!(
        "[tasks.long]\ncommand = [\"/bin/sh\", \"-c\", \"echo $$ > {}; exec sleep 100\"]\n",
        pidfile.display()
    ));
    let mut foreman = home.start(&[]);
    home.enqueue(&["long"]);
    let pid = pids(&pidfile, 1).remove(0);
    assert!(alive(&pid));
    foreman.kill9();
    assert!(
        wait_until(Duration::from_secs(1), || !alive(&pid)),
        "the command {pid} outlived its foreman's kill -9"
    );
}

#[test]
fn a_flood_of_output_keeps_only_its_tail() {
    let home = Home::new();
    home.tasks_file(
        "[tasks.flood]\n\
         command = [\"/bin/sh\", \"-c\", \"head -c 1048576 /dev/zero | tr '\\\\0' a; echo END\"]\n\
         output_bytes = 1000\n",
    );
    let id = home.enqueue(&["flood"]);
    home.ok(&["run", "--burst"]);
    let r = show(&home, id);
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["output_truncated"], true, "{r}");
    let logs = home.cmd().args(["logs", &id.to_string()]).output().unwrap();
    assert_eq!(logs.stdout.len(), 1000);
    assert!(logs.stdout.ends_with(b"aaaEND\n"));
    let stored: i64 = home
        .conn()
        .query_row(
            "SELECT length(output) FROM task_records WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 1000);
}

#[test]
fn a_thousand_command_tasks_run_exactly_once_on_bounded_threads() {
    let home = Home::new();
    let out = home.file("ran.txt");
    home.tasks_file(&format!(
        "[tasks.mark]\ncommand = [\"/bin/sh\", \"-c\", \"echo $SNAPQ_TASK_ID >> {}\"]\n",
        out.display()
    ));
    let workers = 4;
    let foreman = home.start(&["--workers", &workers.to_string()]);
    let lines = "{\"task\": \"mark\"}\n".repeat(1000);
    let path = home.file("bulk.jsonl");
    std::fs::write(&path, lines).unwrap();
    let ids: Vec<i64> = home
        .ok(&["enqueue", "--file", path.to_str().unwrap(), "--ids"])
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let mut most_threads = 0;
    let done = wait_until(Duration::from_secs(60), || {
        most_threads = most_threads.max(foreman.threads());
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
            >= 1000
    });
    assert!(done, "{}", foreman.log_text());
    // Settle: nothing runs twice after the count is reached.
    std::thread::sleep(Duration::from_millis(300));
    let mut ran: Vec<i64> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    ran.sort_unstable();
    assert_eq!(ran, ids);
    assert!(
        most_threads <= workers + 4,
        "{most_threads} threads with {workers} workers"
    );
}

#[test]
fn a_tasks_file_others_can_write_or_that_is_malformed_is_refused() {
    let home = Home::new();
    let good = "[tasks.hi]\ncommand = [\"/bin/echo\", \"hi\"]\n";
    write_mode(&home.file("tasks.toml"), good, 0o664);
    for args in [&["run", "--burst"][..], &["enqueue", "noop"], &["tasks"]] {
        let out = home.snapq(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("tasks.toml") && stderr.contains("chmod go-w"),
            "{args:?}: {stderr}"
        );
    }
    home.tasks_file("[tasks.hi]\ncommand = [\"/bin/echo\", \"hi\"\n");
    let out = home.snapq(&["enqueue", "hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    // An explicit --tasks that is not there is an error; the default may be absent.
    let out = home.snapq(&["--tasks", "/no/such/tasks.toml", "enqueue", "noop"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/tasks.toml"));
    std::fs::remove_file(home.file("tasks.toml")).unwrap();
    home.enqueue(&["noop"]);
    assert_eq!(home.queued(), 1);
}

#[test]
fn sighup_picks_up_a_new_task_and_keeps_the_old_ones_on_a_bad_file() {
    let home = Home::new();
    let out = home.file("out.txt");
    let task = |name: &str| {
        format!(
            "[tasks.{name}]\ncommand = [\"/bin/sh\", \"-c\", \"echo {name} >> {}\"]\n",
            out.display()
        )
    };
    home.tasks_file(&task("one"));
    let foreman = home.start(&[]);
    let ran = |expected: &str| {
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&out).unwrap_or_default() == expected
        })
    };
    home.enqueue(&["one"]);
    assert!(ran("one\n"), "{}", foreman.log_text());

    let both = task("one") + &task("two");
    home.tasks_file(&both);
    foreman.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || foreman
            .has_log("tasks file read again")),
        "{}",
        foreman.log_text()
    );
    home.enqueue(&["two"]);
    assert!(ran("one\ntwo\n"), "{}", foreman.log_text());

    // A bad file: the foreman says so and keeps running `one` and `two`.
    home.tasks_file("[tasks.three\n");
    foreman.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || foreman
            .has_log("the tasks stay as they were")),
        "{}",
        foreman.log_text()
    );
    // Enqueued with a good copy of the file (the enqueuer refuses the bad one).
    let good = home.file("good.toml");
    write_mode(&good, &both, 0o644);
    home.ok(&["--tasks", good.to_str().unwrap(), "enqueue", "two"]);
    assert!(ran("one\ntwo\ntwo\n"), "{}", foreman.log_text());
}

/// README, "Your own tasks": its tasks file and commands work as written.
#[test]
fn the_readme_example_works_as_written() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split_once("## Your own tasks")
        .map(|(_, rest)| rest)
        .unwrap();
    let toml = section
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .unwrap();
    let home = Home::new();
    home.tasks_file(toml);
    let listed = home.ok(&["tasks"]);
    assert!(
        listed.contains("compress") && listed.contains("\"level\"?: integer"),
        "{listed}"
    );
    let report = home.file("report.txt");
    std::fs::write(&report, "hello\n").unwrap();
    let kwargs = serde_json::json!({"path": report.to_str().unwrap()}).to_string();
    let id = home.enqueue(&["compress", "--kwargs", &kwargs]);
    home.ok(&["run", "--burst"]);
    let shown = home.ok(&["show", &id.to_string()]);
    assert!(
        shown.contains("succeeded") && shown.contains("exit code 0"),
        "{shown}"
    );
    assert!(home.file("report.txt.gz").exists() && report.exists());
    // gzip --verbose names the file it compressed.
    assert!(
        home.ok(&["logs", &id.to_string()]).contains("report.txt"),
        "{shown}"
    );
}

/// With `--http`, each output line of a command is a `task.progress` message (no
/// fraction) on the task's channel.
#[test]
fn output_lines_stream_to_the_live_view_as_progress() {
    let home = Home::new();
    home.tasks_file(
        "[tasks.talk]\n\
         command = [\"/bin/sh\", \"-c\", \"echo first; sleep 0.2; echo second >&2; sleep 0.2; echo third\"]\n",
    );
    let (_foreman, addr) = crate::live::start_live(&home, &[]);
    let mut ws = crate::live::subscribe(&addr, "", &["*"]);
    let id = home.enqueue(&["talk"]);
    let channel = format!("task:{id}");
    let seen = crate::live::until(&mut ws, Duration::from_secs(10), |m| {
        m["channel"] == channel.as_str() && m["type"] == "task.finished"
    });
    let progress: Vec<&Value> = seen
        .iter()
        .filter(|m| m["channel"] == channel.as_str() && m["type"] == "task.progress")
        .collect();
    let lines: Vec<&str> = progress
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["first", "second", "third"], "{seen:?}");
    assert!(progress.iter().all(|m| m["fraction"].is_null()), "{seen:?}");
}
