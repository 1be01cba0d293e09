//! Issue 19: the task queue on RabbitMQ. Several foreman processes, each with its own home,
//! consume one queue on the real broker (a queue of this run's own, deleted afterwards);
//! real `kill -9`, SIGTERM and a connection closed by the broker.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;

use crate::amqp::BROKER;
use crate::support::{Foreman, Home, append_lines, read_lines, wait_until};

/// A queue name of this run's own; its queues and exchanges go when it drops.
struct Queue(String);

impl Queue {
    fn new(what: &str) -> Queue {
        Queue(format!(
            "snapq-it-{what}-{}-{}",
            std::process::id(),
            snapq::clock::now_micros()
        ))
    }

    /// The global flags that point a command at it.
    fn flags(&self) -> Vec<&str> {
        vec!["--queue", BROKER, "--queue-name", &self.0]
    }

    /// How many messages wait in `suffix` ("" for the queue itself, ".dead").
    fn waiting(&self, suffix: &str) -> u32 {
        let broker = snapq::rabbitmq::Broker::connect(BROKER).unwrap();
        let n = broker
            .declare_queue(&format!("{}{suffix}", self.0), true, Default::default())
            .unwrap();
        broker.close();
        n
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let _ = snapq::backend::rabbitmq::delete_topology(BROKER, &self.0);
    }
}

fn with<'a>(queue: &'a Queue, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = queue.flags();
    all.extend_from_slice(args);
    all
}

fn start(home: &Home, queue: &Queue, extra: &[&str]) -> Foreman {
    home.start(&with(queue, extra))
}

fn show(home: &Home, id: i64) -> Value {
    serde_json::from_str(&home.ok(&["show", &id.to_string(), "--json"])).unwrap()
}

/// The `line` kwarg of each record of `home` in `state`.
fn lines_in_state(home: &Home, state: &str) -> HashSet<String> {
    let conn = home.conn();
    let mut stmt = conn
        .prepare("SELECT kwargs FROM task_records WHERE state = ?1")
        .unwrap();
    stmt.query_map([state], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|k| {
            let kwargs: Value = serde_json::from_str(&k.unwrap()).unwrap();
            kwargs["line"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

/// How many tasks of type `task` the foreman of `home` ran to success.
fn succeeded(home: &Home, task: &str) -> i64 {
    home.conn()
        .query_row(
            "SELECT count(*) FROM task_records WHERE task_name = ?1 AND state = 'succeeded'",
            [task],
            |r| r.get(0),
        )
        .unwrap_or(0)
}

/// Waits until the queue is empty and `out` stopped growing for a second.
fn drained(queue: &Queue, out: &std::path::Path, within: Duration) -> bool {
    let mut last = usize::MAX;
    let mut stable_since = std::time::Instant::now();
    wait_until(within, || {
        let now = read_lines(out).len();
        if now != last {
            last = now;
            stable_since = std::time::Instant::now();
        }
        queue.waiting("") == 0 && stable_since.elapsed() >= Duration::from_secs(1)
    })
}

#[test]
fn enqueue_run_show_and_what_rabbitmq_cannot_do() {
    let queue = Queue::new("basics");
    let (enqueuer, worker) = (Home::new(), Home::new());
    let out = worker.file("out.txt");
    let kwargs = format!(r#"{{"path": {:?}, "line": "hello"}}"#, out.display());
    // Enqueued before any foreman: the enqueuer declared the queue, so it waits.
    let id: i64 = enqueuer
        .ok(&with(&queue, &["enqueue", "append", "--kwargs", &kwargs]))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(queue.waiting(""), 1);
    let status = enqueuer.ok(&with(&queue, &["status"]));
    assert!(status.contains("tasks due: at least 1"), "{status}");
    assert!(status.contains("tasks delayed: at least 0"), "{status}");
    // A delayed task waits in the ladder, which its enqueue declared: status counts it.
    enqueuer.ok(&with(&queue, &["enqueue", "noop", "--delay", "3600"]));
    let status = enqueuer.ok(&with(&queue, &["status"]));
    assert!(status.contains("tasks due: at least 1"), "{status}");
    assert!(status.contains("tasks delayed: at least 1"), "{status}");
    let _foreman = start(&worker, &queue, &[]);
    assert!(wait_until(Duration::from_secs(10), || read_lines(&out) == ["hello"]));
    assert!(wait_until(
        Duration::from_secs(5),
        || show(&worker, id)["state"] == "succeeded"
    ));
    // The enqueuer's machine never ran it: the end the worker's foreman published on the
    // queue's events stream answers, naming the host that has the whole record.
    let mut shown = Value::Null;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = enqueuer.snapq(&with(&queue, &["show", &id.to_string(), "--json"]));
            shown = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            shown["state"] == "succeeded"
        }),
        "{shown}"
    );
    assert_eq!(shown["task"], "append");
    assert!(shown["recorded_on"].is_string(), "{shown}");
    let said = enqueuer.ok(&with(&queue, &["show", &id.to_string()]));
    assert!(
        said.contains("succeeded") && said.contains("ran on "),
        "{said}"
    );
    // An id no foreman ran: exit 1, saying where it may be.
    let out = enqueuer.snapq(&with(&queue, &["show", &(id + 1).to_string()]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("may wait in the queue"));
    // What a broker cannot do, and a bad URL: exit 2, naming the problem.
    let out = enqueuer.snapq(&with(&queue, &["cancel", &id.to_string()]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the rabbitmq queue cannot"));
    // A retry takes only a task that ended badly, and only where it was recorded.
    let out = worker.snapq(&with(&queue, &["retry", &id.to_string()]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is succeeded"));
    let out = enqueuer.snapq(&with(&queue, &["retry", &id.to_string()]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("each machine knows only"));
    assert_eq!(queue.waiting(""), 0);
    let out = enqueuer.snapq(&["--queue", "redis://x", "enqueue", "noop"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a queue URL"));
    // Arguments are checked before anything is published.
    let out = enqueuer.snapq(&with(&queue, &["enqueue", "append", "--kwargs", "{}"]));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(queue.waiting(""), 0);
}

/// Three foremen drain 10,000 `append` tasks; one is killed with -9 midway. At most once:
/// no line twice, and the lines that never ran are among what the killed one was running.
#[test]
fn three_foremen_and_a_kill_9_lose_only_the_killed_ones_running_tasks() {
    let queue = Queue::new("kill9");
    let homes = [Home::new(), Home::new(), Home::new()];
    let out = homes[0].file("out.txt");
    let total = 10_000;
    let path = homes[0].file("bulk.jsonl");
    std::fs::write(&path, append_lines(&out, "t", 0..total)).unwrap();
    let sent = homes[0].ok(&with(
        &queue,
        &["enqueue", "--file", path.to_str().unwrap()],
    ));
    assert_eq!(sent.trim(), total.to_string());
    let mut foremen: Vec<Foreman> = homes
        .iter()
        .map(|h| start(h, &queue, &["--workers", "4"]))
        .collect();
    assert!(wait_until(Duration::from_secs(30), || read_lines(&out)
        .len()
        >= 3_000));
    foremen[1].kill9();
    let running_at_kill = lines_in_state(&homes[1], "running");
    assert!(running_at_kill.len() <= 4, "{running_at_kill:?}");
    assert!(
        drained(&queue, &out, Duration::from_secs(60)),
        "the two left did not drain the queue"
    );
    let lines = read_lines(&out);
    let mut seen = HashSet::new();
    for line in &lines {
        assert!(seen.insert(line.clone()), "{line} ran twice");
    }
    let missing: Vec<String> = (0..total)
        .map(|i| format!("t-{i:06}"))
        .filter(|l| !seen.contains(l))
        .collect();
    assert!(
        missing.iter().all(|l| running_at_kill.contains(l)),
        "lost {missing:?}, but the killed foreman was running {running_at_kill:?}"
    );
    // Every foreman that lived ran some.
    for (i, home) in homes.iter().enumerate() {
        if i != 1 {
            assert!(
                !lines_in_state(home, "succeeded").is_empty(),
                "foreman {i} ran none"
            );
        }
    }
}

/// The same with at-least-once tasks (a command task with retries): nothing lost, and
/// the only lines that ran twice are among what the killed foreman was running.
#[test]
fn three_foremen_and_a_kill_9_lose_no_at_least_once_task() {
    let queue = Queue::new("kill9-alo");
    let homes = [Home::new(), Home::new(), Home::new()];
    let out = homes[0].file("out.txt");
    for home in &homes {
        home.tasks_file(
            "[tasks.append_alo]\n\
             command = [\"/bin/sh\", \"-c\", \"echo \\\"$1\\\" >> \\\"$2\\\"\", \"sh\", \"{line}\", \"{path}\"]\n\
             params = { line = \"string\", path = \"string\" }\n\
             retries = 5\n",
        );
    }
    let total = 3_000;
    let lines: String = (0..total)
        .map(|i| {
            format!(
                "{{\"task\":\"append_alo\",\"kwargs\":{{\"line\":\"t-{i:06}\",\"path\":{:?}}}}}\n",
                out.display()
            )
        })
        .collect();
    let path = homes[0].file("bulk.jsonl");
    std::fs::write(&path, lines).unwrap();
    homes[0].ok(&with(
        &queue,
        &["enqueue", "--file", path.to_str().unwrap()],
    ));
    let mut foremen: Vec<Foreman> = homes
        .iter()
        .map(|h| start(h, &queue, &["--workers", "4"]))
        .collect();
    assert!(wait_until(Duration::from_secs(60), || read_lines(&out)
        .len()
        >= 800));
    foremen[1].kill9();
    let running_at_kill = lines_in_state(&homes[1], "running");
    assert!(running_at_kill.len() <= 4, "{running_at_kill:?}");
    assert!(
        drained(&queue, &out, Duration::from_secs(120)),
        "the two left did not drain the queue"
    );
    let mut count: HashMap<String, usize> = HashMap::new();
    for line in read_lines(&out) {
        *count.entry(line).or_default() += 1;
    }
    for i in 0..total {
        let line = format!("t-{i:06}");
        match count.get(&line) {
            None => panic!("{line} never ran: at least once failed"),
            Some(1) => {}
            Some(n) => assert!(
                running_at_kill.contains(&line),
                "{line} ran {n} times but the killed foreman was not running it"
            ),
        }
    }
}

/// SIGTERM of one of two foremen mid-drain: nothing lost, nothing twice.
#[test]
fn sigterm_of_one_foreman_loses_nothing_and_repeats_nothing() {
    let queue = Queue::new("sigterm");
    let homes = [Home::new(), Home::new()];
    let out = homes[0].file("out.txt");
    let total = 4_000;
    let path = homes[0].file("bulk.jsonl");
    std::fs::write(&path, append_lines(&out, "t", 0..total)).unwrap();
    homes[0].ok(&with(
        &queue,
        &["enqueue", "--file", path.to_str().unwrap()],
    ));
    let mut stopping = start(&homes[0], &queue, &["--workers", "4"]);
    let _other = start(&homes[1], &queue, &["--workers", "4"]);
    assert!(wait_until(Duration::from_secs(30), || read_lines(&out)
        .len()
        >= 1_000));
    stopping.signal(libc::SIGTERM);
    assert!(stopping.wait_exit(Duration::from_secs(30)).is_some());
    assert!(drained(&queue, &out, Duration::from_secs(60)));
    let lines = read_lines(&out);
    let unique: HashSet<&String> = lines.iter().collect();
    assert_eq!(unique.len(), lines.len(), "a task ran twice");
    assert_eq!(unique.len(), total, "tasks were lost");
}

/// A home's schedules fire from its foreman into the RabbitMQ queue: each tick's task is
/// published once and runs once, on whichever foreman of the queue takes it.
#[test]
fn schedules_fire_into_the_rabbitmq_queue_once_a_tick() {
    let queue = Queue::new("schedules");
    let (scheduler, other) = (Home::new(), Home::new());
    let out = scheduler.file("out.txt");
    let kwargs = serde_json::json!({"path": out, "line": "tick"}).to_string();
    scheduler.ok(&[
        "schedule", "add", "tick", "append", "--every", "1", "--kwargs", &kwargs,
    ]);
    let foreman = start(&scheduler, &queue, &[]);
    let _other = start(&other, &queue, &[]);
    std::thread::sleep(Duration::from_secs(6));
    scheduler.ok(&["schedule", "pause", "tick"]);
    std::thread::sleep(Duration::from_millis(1500));
    let fired = foreman.events("schedule fired").len();
    assert!((4..=8).contains(&fired), "{fired} ticks in 6 s");
    assert!(
        wait_until(Duration::from_secs(5), || read_lines(&out).len() == fired),
        "{} tasks ran for {fired} ticks",
        read_lines(&out).len()
    );
    // Through the broker: each run is recorded by the foreman that took it.
    assert_eq!(
        succeeded(&scheduler, "append") + succeeded(&other, "append"),
        fired as i64
    );
    assert_eq!(queue.waiting(""), 0);
}

/// A foreman whose tasks take long holds few deliveries (one beside each worker's): of
/// twelve 1-second tasks enqueued while it is busy it takes five (two running, three
/// waiting), and a second foreman started a moment later runs the rest. With the 8 a
/// worker kept for short tasks, the first one would hold all twelve.
#[test]
fn a_foreman_busy_with_long_tasks_leaves_the_waiting_ones_to_another() {
    let queue = Queue::new("prefetch");
    let (first, second) = (Home::new(), Home::new());
    let sleeps_done = |home: &Home| succeeded(home, "sleep");
    let busy = start(&first, &queue, &["--workers", "2"]);
    // One long task: the foreman learns what its tasks take.
    first.ok(&with(
        &queue,
        &["enqueue", "sleep", "--kwargs", r#"{"seconds": 0.3}"#],
    ));
    assert!(wait_until(Duration::from_secs(10), || sleeps_done(&first) == 1));
    let jobs = first.file("jobs.jsonl");
    std::fs::write(
        &jobs,
        "{\"task\": \"sleep\", \"kwargs\": {\"seconds\": 1.0}}\n".repeat(12),
    )
    .unwrap();
    first.ok(&with(
        &queue,
        &["enqueue", "--file", jobs.to_str().unwrap()],
    ));
    std::thread::sleep(Duration::from_millis(300));
    let _other = start(&second, &queue, &["--workers", "2"]);
    assert!(
        wait_until(Duration::from_secs(15), || sleeps_done(&first)
            + sleeps_done(&second)
            == 13),
        "{} + {} of 13",
        sleeps_done(&first),
        sleeps_done(&second)
    );
    let ran_second = sleeps_done(&second);
    assert!(
        ran_second >= 4,
        "{ran_second} of 12 ran on the second foreman"
    );
    assert!(
        !busy
            .events("RabbitMQ: tasks take long lately: holding up to 3 deliveries")
            .is_empty()
    );
}

/// A queue of the events stream's name that is not a stream (as on a broker without
/// streams): the foreman says its tasks' ends stay on its machine, and runs them.
#[test]
fn without_the_events_stream_the_tasks_run_all_the_same() {
    let queue = Queue::new("noevents");
    let broker = snapq::rabbitmq::Broker::connect(BROKER).unwrap();
    broker
        .declare_queue(&format!("{}.events", queue.0), false, Default::default())
        .unwrap();
    broker.close();
    let home = Home::new();
    let out = home.file("out.txt");
    let foreman = start(&home, &queue, &[]);
    let kwargs = format!(r#"{{"path": {:?}, "line": "hello"}}"#, out.display());
    home.ok(&with(&queue, &["enqueue", "append", "--kwargs", &kwargs]));
    assert!(wait_until(Duration::from_secs(10), || read_lines(&out) == ["hello"]));
    assert!(foreman.has_log("cannot keep the events stream"));
}

/// Delays of 1 to 5 s start within a second of their due time, never before it.
#[test]
fn delays_run_within_a_second_of_due() {
    let queue = Queue::new("delays");
    let home = Home::new();
    let foreman = start(&home, &queue, &[]);
    let ids: Vec<i64> = (1..=5)
        .map(|s| {
            home.ok(&with(
                &queue,
                &["enqueue", "noop", "--delay", &s.to_string()],
            ))
            .trim()
            .parse()
            .unwrap()
        })
        .collect();
    assert!(wait_until(Duration::from_secs(15), || foreman
        .events("task started")
        .len()
        == 5));
    let late: HashMap<i64, f64> = foreman
        .events("task started")
        .iter()
        .map(|e| (e["id"].as_i64().unwrap(), e["late_ms"].as_f64().unwrap()))
        .collect();
    for id in ids {
        let late = late[&id];
        assert!(
            (0.0..1000.0).contains(&late),
            "task {id} started {late} ms after due"
        );
    }
}

/// A task that fails every attempt ends in the dead queue, with its error.
#[test]
fn a_task_out_of_attempts_lands_in_the_dead_queue_and_retry_runs_it_again() {
    let queue = Queue::new("dead");
    let home = Home::new();
    home.tasks_file("[tasks.doomed]\ncommand = [\"/bin/false\"]\nretries = 1\nbackoff = 0.5\n");
    let _foreman = start(&home, &queue, &[]);
    let id: i64 = home
        .ok(&with(&queue, &["enqueue", "doomed"]))
        .trim()
        .parse()
        .unwrap();
    let dead_after = |tasks_in_dead_queue: u32, attempt: i64| {
        assert!(
            wait_until(Duration::from_secs(15), || queue.waiting(".dead")
                == tasks_in_dead_queue),
            "{}",
            show(&home, id)
        );
        // The foreman writes the record once the broker has confirmed the dead queue's
        // copy and taken the ack (src/backend/rabbitmq.rs, `settle_leases`): it may trail
        // the count by a moment (a CI run read `running` here once).
        let mut record = Value::Null;
        wait_until(Duration::from_secs(5), || {
            record = show(&home, id);
            record["state"] != "running"
        });
        assert_eq!(
            (record["state"].as_str(), record["attempt"].as_i64()),
            (Some("dead"), Some(attempt))
        );
    };
    dead_after(1, 2);
    assert_eq!(queue.waiting(""), 0);
    // `snapq retry` publishes it again for one more attempt; out of attempts still, it
    // goes to the dead queue again after that run.
    let said = home.ok(&with(&queue, &["retry", &id.to_string()]));
    assert_eq!(said.trim(), format!("task {id} queued again (attempt 3)"));
    dead_after(2, 3);
}

const POISON: &str =
    "[tasks.poison]\ncommand = [\"/bin/sh\", \"-c\", \"kill -9 $PPID\"]\nretries = 2\n";

/// Enqueues a task that kills the foreman that runs it (an at-least-once command that sends
/// SIGKILL to its parent), then an `append` of "after" to `out`; returns the first's id.
fn poison_then_append(home: &Home, queue: &Queue, out: &std::path::Path) -> i64 {
    home.tasks_file(POISON);
    let id = home
        .ok(&with(queue, &["enqueue", "poison"]))
        .trim()
        .parse()
        .unwrap();
    let kwargs = format!(
        "{{\"path\": {:?}, \"line\": \"after\"}}",
        out.to_str().unwrap()
    );
    home.ok(&with(queue, &["enqueue", "append", "--kwargs", &kwargs]));
    id
}

/// Runs a foreman of one worker in `home` and waits for it to be killed; returns its log.
fn killed_foreman(home: &Home, queue: &Queue) -> crate::support::Foreman {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = home.cmd();
    cmd.args(with(
        queue,
        &["run", "--workers", "1", "--log-format", "json"],
    ));
    let mut foreman = crate::support::Foreman::spawn_unready(cmd);
    let status = foreman
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the foreman was not killed:\n{}", foreman.log_text()));
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{}",
        foreman.log_text()
    );
    foreman
}

/// After the poison task went to the dead queue, a foreman runs the `append` behind it once.
fn the_append_runs_once_after(home: &Home, queue: &Queue, out: &std::path::Path) {
    assert!(
        read_lines(out).is_empty(),
        "the append ran beside the poison task"
    );
    let mut foreman = start(home, queue, &["--workers", "1"]);
    assert!(
        wait_until(Duration::from_secs(20), || read_lines(out).len() == 1),
        "ran {:?}; {} waiting, {} in the dead queue:\n{}",
        read_lines(out),
        queue.waiting(""),
        queue.waiting(".dead"),
        foreman.log_text()
    );
    foreman.stop();
    assert_eq!(read_lines(out), ["after"]);
    assert_eq!((queue.waiting(""), queue.waiting(".dead")), (0, 1));
}

/// A task that kills every foreman that runs it, each foreman on a machine of its own (a
/// home of its own: no record of the deaths before): the broker hands it out again each
/// time it sees a foreman's connection die, and after `DELIVERY_LIMIT` deliveries moves it
/// to the dead queue (README, "Several machines"). RabbitMQ 3.10 counts every delivery a
/// dying consumer held, so the task queued behind it, which each of those foremen received
/// too, would have followed it there unrun; a foreman runs a task handed out again with
/// nothing else held, and that one runs once afterwards.
#[test]
fn a_task_that_kills_every_foreman_lands_in_the_dead_queue_alone() {
    let queue = Queue::new("poison");
    let first = Home::new();
    let out = first.file("out.txt");
    poison_then_append(&first, &queue, &out);
    let limit = snapq::backend::rabbitmq::DELIVERY_LIMIT as usize;
    let mut killed = 0;
    while queue.waiting(".dead") == 0 {
        assert!(
            killed <= limit + 1,
            "still not in the dead queue after {killed} foremen were killed"
        );
        let home = Home::new();
        home.tasks_file(POISON);
        killed_foreman(&home, &queue);
        killed += 1;
    }
    assert!(
        killed >= limit,
        "dead-lettered after only {killed} deliveries"
    );
    the_append_runs_once_after(&first, &queue, &out);
}

/// The same task with foremen of one machine (one home): each foreman finds in its record
/// which attempt its predecessor died running and logs it, and after the last of its 3
/// attempts the next foreman moves it to the dead queue itself, with why, instead of
/// running it again, and runs the task behind it, once.
#[test]
fn a_task_that_kills_its_foreman_on_each_attempt_is_dead_after_the_last() {
    let queue = Queue::new("poison-here");
    let home = Home::new();
    let out = home.file("out.txt");
    let id = poison_then_append(&home, &queue, &out);
    for attempt in 1..=3 {
        let foreman = killed_foreman(&home, &queue);
        // Each foreman after the first names the task its predecessor died running.
        let abandoned = foreman.events(
            "task abandoned here: it was running when its foreman ended; it has retries, and \
             the broker hands it out again",
        );
        assert!(
            attempt == 1 || abandoned.iter().any(|e| e["task"] == "poison"),
            "{}",
            foreman.log_text()
        );
    }
    let mut foreman = start(&home, &queue, &["--workers", "1"]);
    assert!(
        wait_until(Duration::from_secs(20), || queue.waiting(".dead") == 1),
        "{}",
        foreman.log_text()
    );
    assert!(foreman.try_exit().is_none(), "{}", foreman.log_text());
    let record = show(&home, id);
    assert_eq!(
        (record["state"].as_str(), record["attempt"].as_i64()),
        (Some("dead"), Some(3)),
        "{record}"
    );
    assert!(
        record["error"]
            .as_str()
            .is_some_and(|e| e.contains("its foreman died while attempt 3, its last, ran")),
        "{record}"
    );
    // That foreman goes on with the task behind it, once.
    assert!(
        wait_until(Duration::from_secs(20), || read_lines(&out).len() == 1),
        "{}",
        foreman.log_text()
    );
    foreman.stop();
    assert_eq!(read_lines(&out), ["after"]);
    assert_eq!((queue.waiting(""), queue.waiting(".dead")), (0, 1));
}

/// The local port of `pid`'s connection to the broker, from `ss`.
fn broker_connection_of(pid: u32) -> Option<String> {
    let out = std::process::Command::new("ss")
        .args(["-tnpH", "state", "established", "( dport = :5672 )"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!("pid={pid},")))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
}

/// The broker closes the foreman's connection (`rabbitmqctl close_connection`) while it
/// drains: it connects again, and every task still runs, none twice.
#[test]
fn a_connection_closed_by_the_broker_is_survived() {
    let queue = Queue::new("closed");
    let home = Home::new();
    let out = home.file("out.txt");
    let total = 3_000;
    let path = home.file("bulk.jsonl");
    std::fs::write(&path, append_lines(&out, "t", 0..total)).unwrap();
    home.ok(&with(
        &queue,
        &["enqueue", "--file", path.to_str().unwrap()],
    ));
    let foreman = start(&home, &queue, &["--workers", "2"]);
    assert!(wait_until(Duration::from_secs(30), || read_lines(&out)
        .len()
        >= 500));
    let local = broker_connection_of(foreman.pid() as u32).expect("the foreman's connection");
    let port = local.rsplit(':').next().unwrap().to_owned();
    // rabbitmqctl names a connection by its Erlang pid: the one whose peer is that port.
    let listed = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "--no-table-headers",
            "-q",
            "pid",
            "peer_port",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let erlang_pid = listed
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(port.as_str()))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no connection from port {port} in {listed}"))
        .to_owned();
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &erlang_pid, "closed by the test"])
        .output()
        .unwrap();
    assert!(
        closed.status.success(),
        "{}",
        String::from_utf8_lossy(&closed.stderr)
    );
    assert!(
        drained(&queue, &out, Duration::from_secs(60)),
        "{}",
        foreman.log_text()
    );
    assert!(foreman.has_log("connected"), "{}", foreman.log_text());
    let lines = read_lines(&out);
    let unique: HashSet<&String> = lines.iter().collect();
    let mut count: HashMap<&String, usize> = HashMap::new();
    for l in &lines {
        *count.entry(l).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "ran twice: {twice:?}\n{}",
        foreman
            .lines()
            .iter()
            .filter(|l| l.contains("RabbitMQ") || l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // At most once: a task acknowledged when the connection went may be lost (recorded).
    let lost = lines_in_state(&home, "lost");
    assert!(
        total - unique.len() <= lost.len(),
        "{} missing, {} recorded lost",
        total - unique.len(),
        lost.len()
    );
}

/// `run --burst` on RabbitMQ runs what is ready and exits 0.
#[test]
fn burst_drains_the_ready_tasks_and_exits() {
    let queue = Queue::new("burst");
    let home = Home::new();
    let lines = "{\"task\":\"noop\"}\n".repeat(500);
    let path = home.file("bulk.jsonl");
    std::fs::write(&path, lines).unwrap();
    home.ok(&with(
        &queue,
        &["enqueue", "--file", path.to_str().unwrap()],
    ));
    // A delayed task is not ready: --burst does not wait for it.
    home.ok(&with(&queue, &["enqueue", "noop", "--delay", "3600"]));
    let out = home.snapq(&with(&queue, &["run", "--burst", "--workers", "4"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(succeeded(&home, "noop"), 500);
    assert_eq!(queue.waiting(""), 0);
}
