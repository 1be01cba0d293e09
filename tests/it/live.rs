//! The live view: real HTTP and real WebSocket clients against the real foreman's
//! `--http` server on 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use snapq::monitor::prometheus;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use crate::support::{Foreman, Home, wait_until};

/// Starts a foreman serving the live view on a free port; returns it and `host:port`.
pub(crate) fn start_live(home: &Home, extra: &[&str]) -> (Foreman, String) {
    let mut args = vec!["--http", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let foreman = home.start(&args);
    let mut addr = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            if let Some(event) = foreman.events("live view listening").first() {
                let url = event["url"].as_str().unwrap();
                addr = url
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_owned();
                return true;
            }
            false
        }),
        "no 'live view listening' line:\n{}",
        foreman.log_text()
    );
    (foreman, addr)
}

/// A plain HTTP GET; returns the status and the body.
pub(crate) fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// A WebSocket client subscribed to `channels`.
pub(crate) fn subscribe(addr: &str, query: &str, channels: &[&str]) -> Ws {
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/events{query}")).unwrap();
    if let MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    let request = serde_json::json!({ "subscribe": channels }).to_string();
    ws.send(Message::text(request)).unwrap();
    ws
}

/// The next JSON message, or `None` if none came within the socket's read timeout.
fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("the feed broke: {e}"),
        }
    }
}

/// Messages until one satisfies `last` (included), or panics after `timeout`.
pub(crate) fn until(ws: &mut Ws, timeout: Duration, last: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while Instant::now() < deadline {
        if let Some(m) = next(ws) {
            let done = last(&m);
            got.push(m);
            if done {
                return got;
            }
        }
    }
    panic!("the awaited message did not come within {timeout:?}; got {got:?}");
}

/// Reads up to the close frame; returns the text messages before it and the frame.
fn read_to_close<S: Read + Write>(
    ws: &mut WebSocket<S>,
) -> (usize, tungstenite::protocol::CloseFrame) {
    let mut received = 0;
    loop {
        match ws.read() {
            Ok(Message::Text(_)) => received += 1,
            Ok(Message::Close(frame)) => {
                return (
                    received,
                    frame.expect("the close frame has a code and reason"),
                );
            }
            Ok(_) => {}
            Err(e) => panic!("expected a close frame after {received} messages, got {e}"),
        }
    }
}

fn types(messages: &[Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect()
}

fn enqueue_sleep(home: &Home, seconds: f64) -> i64 {
    home.ok(&[
        "enqueue",
        "sleep",
        "--kwargs",
        &format!("{{\"seconds\": {seconds}}}"),
    ])
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn a_late_subscriber_gets_the_whole_history_in_order_then_live_messages() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &[]);
    // One client from the start, on every channel.
    let mut early = subscribe(&addr, "", &["*"]);
    let id = enqueue_sleep(&home, 0.8);
    let channel = format!("task:{id}");
    // A second client joins while the task runs, a third after it finished.
    let mut first = until(&mut early, Duration::from_secs(10), |m| {
        m["channel"] == channel.as_str() && m["type"] == "task.progress"
    });
    let mut middle = subscribe(&addr, "", &[&channel]);
    first.extend(until(&mut early, Duration::from_secs(10), |m| {
        m["channel"] == channel.as_str() && m["type"] == "task.finished"
    }));
    let live: Vec<Value> = first
        .into_iter()
        .filter(|m| m["channel"] == channel.as_str())
        .collect();
    let mut late = subscribe(&addr, "", &[&channel]);
    let replayed = until(&mut late, Duration::from_secs(5), |m| {
        m["type"] == "task.finished"
    });
    let joined = until(&mut middle, Duration::from_secs(5), |m| {
        m["type"] == "task.finished"
    });

    // Started, progress reports from the sleep task, finished; seq 1, 2, 3… without gaps.
    let kinds = types(&live);
    assert_eq!(kinds.first(), Some(&"task.started"), "{live:?}");
    assert_eq!(kinds.last(), Some(&"task.finished"), "{live:?}");
    assert!(
        kinds.iter().filter(|k| **k == "task.progress").count() >= 3,
        "a 0.8 s sleep reports progress every 0.1 s: {kinds:?}"
    );
    for (i, m) in live.iter().enumerate() {
        assert_eq!(m["seq"], i as u64 + 1, "{live:?}");
        assert_eq!(m["id"], id);
        assert_eq!(m["task"], "sleep");
    }
    let last_progress = live.iter().rev().find(|m| m["type"] == "task.progress");
    assert_eq!(last_progress.unwrap()["fraction"], 1.0);
    // The late and the middle subscriber saw exactly what the early one saw live.
    assert_eq!(replayed, live);
    assert_eq!(joined, live);
    // And nothing more arrives for that channel.
    assert_eq!(next(&mut late), None);

    // Live messages follow the replay on the same connection.
    let second = enqueue_sleep(&home, 0.1);
    let mut more = subscribe(&addr, "", &[&format!("task:{second}")]);
    let after = until(&mut more, Duration::from_secs(10), |m| {
        m["type"] == "task.finished"
    });
    assert_eq!(types(&after).first(), Some(&"task.started"));
    foreman.stop();
}

#[test]
fn a_channel_is_forgotten_after_the_retention() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &["--http-retention", "1"]);
    let id = enqueue_sleep(&home, 0.0);
    let channel = format!("task:{id}");
    let mut watcher = subscribe(&addr, "", &[&channel]);
    let history = until(&mut watcher, Duration::from_secs(10), |m| {
        m["type"] == "task.finished"
    });
    let ended = Instant::now();
    // Still there within the retention...
    let mut soon = subscribe(&addr, "", &[&channel]);
    assert_eq!(
        until(&mut soon, Duration::from_secs(2), |m| m["type"]
            == "task.finished"),
        history
    );
    assert!(
        ended.elapsed() < Duration::from_secs(1),
        "the check above came too late"
    );
    // ...and gone once it passed (the hub sweeps every second): a late subscriber gets
    // the task's final state from its record (issue 15), one message, not the history.
    std::thread::sleep(Duration::from_millis(2_500));
    let mut late = subscribe(&addr, "", &[&channel]);
    let record = next(&mut late).expect("the final state from the record");
    assert_eq!(record["type"], "task.finished", "{record}");
    assert_eq!(record["record"], true, "{record}");
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["id"], id, "{record}");
    assert_eq!(next(&mut late), None, "the history outlived the retention");
    foreman.stop();
}

#[test]
fn records_of_tasks_that_ended_before_the_foreman_started_are_served_and_replayed() {
    let home = Home::new();
    let failed: i64 = home
        .ok(&["enqueue", "fail", "--kwargs", r#"{"message": "disk full"}"#])
        .trim()
        .parse()
        .unwrap();
    let succeeded = enqueue_sleep(&home, 0.0);
    let out = home.snapq(&["run", "--burst"]);
    assert_eq!(out.status.code(), Some(3), "one task failed");
    let (mut foreman, addr) = start_live(&home, &[]);

    // /api/tasks/<id>: the record, as `snapq show ID --json` prints it.
    let (status, body) = get(&addr, &format!("/api/tasks/{failed}"), &[]);
    assert_eq!(status, 200, "{body}");
    let record: Value = serde_json::from_str(&body).unwrap();
    let shown: Value =
        serde_json::from_str(&home.ok(&["show", &failed.to_string(), "--json"])).unwrap();
    assert_eq!(record, shown);
    assert_eq!(record["state"], "failed");
    let (status, body) = get(&addr, "/api/tasks/987654", &[]);
    assert_eq!(status, 404);
    assert!(body.contains("no task 987654"), "{body}");
    for bad in ["abc", "007", "1x"] {
        let (status, body) = get(&addr, &format!("/api/tasks/{bad}"), &[]);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("not a task id"), "{body}");
    }

    // A subscriber to their channels gets each one's final state from its record.
    let channels = [format!("task:{failed}"), format!("task:{succeeded}")];
    let mut ws = subscribe(&addr, "", &[&channels[0], &channels[1]]);
    let got = until(&mut ws, Duration::from_secs(5), |m| m["id"] == succeeded);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["type"], "task.failed");
    assert_eq!(got[0]["channel"], channels[0].as_str());
    assert_eq!(got[0]["reason"], "failed");
    assert_eq!(got[0]["state"], "failed");
    assert_eq!(got[0]["record"], true);
    assert!(
        got[0]["error"].as_str().unwrap().contains("disk full"),
        "{got:?}"
    );
    assert!(got[0]["at"].is_string());
    assert_eq!(got[1]["type"], "task.finished");
    assert_eq!(got[1]["state"], "succeeded");
    assert!(got[1]["duration_ms"].as_f64().unwrap() >= 0.0);
    // The charts' samples: one a heartbeat, oldest first.
    std::thread::sleep(Duration::from_millis(2_100));
    let (status, body) = get(&addr, "/api/series", &[]);
    assert_eq!(status, 200, "{body}");
    let series: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert!(series.len() >= 2, "{body}");
    for sample in &series {
        for field in ["at_ms", "finished_per_second", "failed_per_second", "due"] {
            assert!(sample[field].is_number(), "{field}: {sample}");
        }
        assert!(sample.get("wait_p95_ms").is_some(), "{sample}");
    }
    assert!(
        series
            .windows(2)
            .all(|w| w[0]["at_ms"].as_i64() < w[1]["at_ms"].as_i64())
    );
    // A task still queued gets no record message: its live messages will come.
    let queued = home
        .ok(&[
            "enqueue",
            "sleep",
            "--kwargs",
            r#"{"seconds": 0}"#,
            "--delay",
            "60",
        ])
        .trim()
        .parse::<i64>()
        .unwrap();
    let mut ws = subscribe(&addr, "", &[&format!("task:{queued}")]);
    assert_eq!(next(&mut ws), None);
    foreman.stop();
}

#[test]
fn a_slow_client_is_cut_off_while_a_fast_one_and_the_foreman_keep_going() {
    let home = Home::new();
    const TASKS: usize = 40_000;
    let lines: String = (0..TASKS).map(|_| "{\"task\":\"noop\"}\n").collect();
    let (mut foreman, addr) = start_live(
        &home,
        &[
            "--http-client-queue",
            "20000",
            "--synchronous",
            "normal",
            "--no-telemetry",
        ],
    );
    // The slow client subscribes and then never reads.
    let stream = TcpStream::connect(&addr).unwrap();
    let (mut slow, _) = tungstenite::client(format!("ws://{addr}/events"), stream).unwrap();
    slow.send(Message::text(r#"{"subscribe":["*"]}"#)).unwrap();
    // The fast one reads everything on its own thread, doing as little as it can per
    // message (this test runs beside the others, on two cores): a look for the type, no
    // JSON parsing. The feed holds 20,000 messages for it, the slow one's sockets far fewer
    // than the 80,000 the drain publishes.
    let fast_addr = addr.clone();
    let fast = std::thread::spawn(move || {
        let mut ws = subscribe(&fast_addr, "", &["*"]);
        let mut finished = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while finished < TASKS && Instant::now() < deadline {
            match ws.read() {
                Ok(Message::Text(text)) => {
                    if text.starts_with(r#"{"type":"task.finished""#) {
                        finished += 1;
                    }
                }
                Ok(Message::Close(frame)) => panic!("the fast client was closed: {frame:?}"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("the fast client's feed broke: {e}"),
            }
        }
        finished
    });
    std::thread::sleep(Duration::from_millis(300));
    home.enqueue_lines(&lines);
    assert_eq!(
        fast.join().unwrap(),
        TASKS,
        "the fast client missed messages"
    );
    assert!(
        wait_until(Duration::from_secs(30), || home.queued() == 0),
        "the foreman did not drain the queue"
    );

    // The slow client now reads what was buffered for it, then the close frame.
    slow.get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (received, close) = read_to_close(&mut slow);
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("too slow"), "{close:?}");
    assert!(
        received < 2 * TASKS,
        "the slow client was not cut off early"
    );
    let (status, metrics) = get(&addr, "/metrics", &[]);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("snapq_live_clients_cut_off_total 1"),
        "{metrics}"
    );
    foreman.stop();
}

#[test]
fn a_wrong_or_missing_token_gets_401_on_every_route() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &["--http-token", "s3cret-Token"]);
    for path in ["/", "/api/status", "/api/monitors", "/metrics", "/events"] {
        assert_eq!(get(&addr, path, &[]).0, 401, "{path} without a token");
        let wrong = format!("{path}?token=s3cret-Tokem");
        assert_eq!(get(&addr, &wrong, &[]).0, 401, "{path} with a wrong token");
        let header = [("Authorization", "Bearer nope")];
        assert_eq!(
            get(&addr, path, &header).0,
            401,
            "{path} with a wrong header"
        );
    }
    let (status, body) = get(&addr, "/api/status?token=s3cret-Token", &[]);
    assert_eq!(status, 200);
    let status_doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status_doc["foreman"]["pid"], foreman.pid());
    let header = [("Authorization", "Bearer s3cret-Token")];
    assert_eq!(get(&addr, "/metrics", &header).0, 200);
    let (status, page) = get(&addr, "/?token=s3cret-Token", &[]);
    assert_eq!(status, 200);
    assert!(page.contains("<title>snapq"));

    // Only GET is served.
    let mut stream = TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "POST /api/status?token=s3cret-Token HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(response.contains("Allow: GET"), "{response}");

    // The WebSocket handshake is refused without the token, accepted with it.
    match tungstenite::connect(format!("ws://{addr}/events")) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected a 401, got {:?}", other.map(|_| ())),
    }
    let mut ws = subscribe(&addr, "?token=s3cret-Token", &["foreman"]);
    let beat = until(&mut ws, Duration::from_secs(5), |m| {
        m["type"] == "heartbeat"
    });
    assert_eq!(beat.last().unwrap()["pid"], foreman.pid());
    foreman.stop();
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_tasks_and_monitors() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &[]);
    crate::monitors::add(&home, "system", "box", serde_json::json!({}), "0.5");
    let mut feed = subscribe(&addr, "", &["monitor:box"]);
    let result = until(&mut feed, Duration::from_secs(10), |m| {
        m["type"] == "monitor.result"
    });
    let result = result.last().unwrap();
    assert_eq!(result["channel"], "monitor:box");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["kind"], "system");

    // The page's monitor list: `monitor list --json` without the configs.
    let (status, body) = get(&addr, "/api/monitors", &[]);
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed[0]["name"], "box", "{listed}");
    assert_eq!(listed[0]["last_status"], "ok", "{listed}");
    assert!(listed[0].get("config").is_none(), "{listed}");

    home.enqueue_lines(&"{\"task\":\"noop\"}\n".repeat(5));
    home.ok(&["enqueue", "fail", "--kwargs", r#"{"message": "boom"}"#]);
    let (status, text) = get(&addr, "/metrics", &[]);
    assert_eq!(status, 200);
    let metric_with = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        prometheus::parse(&get(&addr, "/metrics", &[]).1)
            .unwrap()
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
            .map(|s| s.value)
    };
    let metric = |name: &str, label: (&str, &str)| metric_with(name, &[label]);
    prometheus::parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            metric("snapq_tasks_finished_total", ("task", "noop")) == Some(5.0)
                && metric("snapq_tasks_failed_total", ("task", "fail")) == Some(1.0)
        }),
        "{}",
        get(&addr, "/metrics", &[]).1
    );
    assert_eq!(
        metric("snapq_task_duration_seconds_count", ("task", "noop")),
        Some(5.0)
    );
    assert_eq!(
        metric_with(
            "snapq_task_duration_seconds_bucket",
            &[("task", "noop"), ("le", "+Inf")]
        ),
        Some(5.0)
    );
    assert_eq!(metric("snapq_monitor_up", ("monitor", "box")), Some(1.0));
    let samples = prometheus::parse(&get(&addr, "/metrics", &[]).1).unwrap();
    let due = samples
        .iter()
        .find(|s| s.name == "snapq_tasks_due")
        .unwrap();
    assert_eq!(due.value, 0.0);
    foreman.stop();
}

#[test]
fn the_running_gauge_and_the_heartbeat_count_a_task_while_it_runs() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &[]);
    let running = || {
        prometheus::parse(&get(&addr, "/metrics", &[]).1)
            .unwrap()
            .iter()
            .find(|s| s.name == "snapq_tasks_running")
            .map(|s| s.value)
    };
    assert_eq!(running(), Some(0.0));
    let mut beats = subscribe(&addr, "", &["foreman"]);
    let id = enqueue_sleep(&home, 2.0);
    assert!(wait_until(Duration::from_secs(5), || running() == Some(1.0)));
    // Heartbeats come once a second: one sent while the task runs says so.
    until(&mut beats, Duration::from_secs(5), |m| m["running"] == 1);
    assert!(
        wait_until(Duration::from_secs(10), || running() == Some(0.0)),
        "task {id} still counted running:\n{}",
        foreman.log_text()
    );
    until(&mut beats, Duration::from_secs(5), |m| m["running"] == 0);
    foreman.stop();
}

#[test]
fn bad_live_view_settings_exit_2_naming_the_flag() {
    let home = Home::new();
    for (args, needle) in [
        (vec!["--http", "nowhere"], "--http"),
        (
            vec!["--http", "127.0.0.1:0", "--http-token", "a b"],
            "--http-token",
        ),
    ] {
        let mut all = vec!["run"];
        all.extend(args);
        let out = home.snapq(&all);
        assert_eq!(out.status.code(), Some(2), "{all:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{stderr}");
    }
    // A port already taken: the second foreman's database is untouched (no pid file left).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = listener.local_addr().unwrap().to_string();
    let out = home.snapq(&["run", "--http", &taken]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(!home.file("snapq.pid").exists());
}

#[test]
fn on_sigterm_every_client_is_told_the_foreman_is_stopping() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &[]);
    // Two clients: one reading, one that never reads anything after subscribing.
    let mut reading = subscribe(&addr, "", &["*"]);
    let mut idle = subscribe(&addr, "", &["task:1"]);
    // The heartbeat proves the subscription is in.
    until(&mut reading, Duration::from_secs(5), |m| {
        m["type"] == "heartbeat"
    });
    foreman.stop();
    for ws in [&mut reading, &mut idle] {
        let (_, close) = read_to_close(ws);
        assert_eq!(u16::from(close.code), 1001);
        assert!(close.reason.contains("stopping"), "{close:?}");
    }
}

/// Issue 13, item 8: DNS rebinding. A page on a name its owner points at 127.0.0.1 sends
/// that name as Host (and a matching Origin): it gets 421 on every route, before the
/// token; IP literals, localhost and names given with --http-allow-host are served. An
/// address beyond loopback without a token is refused at start.
#[test]
fn a_foreign_host_name_is_refused_on_every_route() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &["--http-allow-host", "snapq.internal"]);
    let port = addr.rsplit(':').next().unwrap();
    let raw = |host: &str, path: &str, extra: &str| -> String {
        let mut stream = TcpStream::connect(&addr).unwrap();
        // Answers end with the connection; an accepted WebSocket stays open, and its head
        // is all this reads of it.
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    };
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let rebound = format!("attacker.example:{port}");
    for path in ["/", "/api/status", "/api/monitors", "/metrics"] {
        let response = raw(&rebound, path, "");
        assert!(response.starts_with("HTTP/1.1 421"), "{path}: {response}");
        assert!(response.contains("--http-allow-host"), "{response}");
        assert!(!response.contains("\"foreman\""), "{response}");
    }
    let origin = format!("Origin: http://{rebound}\r\n{upgrade}");
    let response = raw(&rebound, "/events", &origin);
    assert!(response.starts_with("HTTP/1.1 421"), "{response}");

    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        format!("snapq.internal:{port}"),
    ] {
        let response = raw(&host, "/api/status", "");
        assert!(response.starts_with("HTTP/1.1 200"), "{host}: {response}");
    }
    let origin = format!("Origin: http://localhost:{port}\r\n{upgrade}");
    let response = raw(&format!("localhost:{port}"), "/events", &origin);
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    foreman.stop();

    // Beyond loopback without a token: refused at start, naming the flag.
    let out = home.snapq(&["run", "--http", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--http-token"), "{stderr}");
    assert!(!home.file("snapq.pid").exists());
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Issue 13, item 10: one client sending ever more channel names grew the foreman to
/// 914 MiB. Names are bounded per message and per client; past the bound the client gets
/// an error message and the foreman's memory stays put.
#[test]
fn channel_names_are_bounded_per_message_and_per_client() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &[]);
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/events")).unwrap();
    if let MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
    }
    let names = |from: usize, n: usize| -> String {
        let list: Vec<String> = (from..from + n).map(|i| format!("task:{i}")).collect();
        serde_json::json!({ "subscribe": list }).to_string()
    };
    ws.send(Message::text(names(0, 101))).unwrap();
    let error = next(&mut ws).expect("no answer to 101 names");
    assert_eq!(error["type"], "error", "{error}");
    assert!(
        error["error"].as_str().unwrap().contains("at most 100"),
        "{error}"
    );
    for chunk in 0..10 {
        ws.send(Message::text(names(chunk * 100, 100))).unwrap();
    }
    ws.send(Message::text(names(1_000, 1))).unwrap();
    let error = next(&mut ws).expect("no answer past 1,000 channels");
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("at most 1000 channels"),
        "{error}"
    );
    // A hostile client goes on: 200,000 more names. The foreman's memory does not follow.
    if let MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    let before = rss_kib(foreman.pid());
    for chunk in 0..2_000 {
        ws.send(Message::text(names(10_000 + chunk * 100, 100)))
            .unwrap();
        while let Some(m) = next(&mut ws).filter(|_| chunk % 100 == 99) {
            assert_eq!(m["type"], "error");
        }
    }
    let grown_kib = rss_kib(foreman.pid()).saturating_sub(before);
    assert!(
        grown_kib < 8 * 1024,
        "the foreman grew {grown_kib} KiB for a client's refused names"
    );
    foreman.stop();
}

/// Issue 13, item 9: strangers cannot hold the live view's slots. A request head dripped a
/// byte at a time is cut off at 5 s; one address holds at most a quarter of the slots
/// while others are still served; a WebSocket that never subscribes, or that does not
/// answer pings, is closed (1008).
#[test]
fn idle_and_dripping_clients_cannot_hold_the_slots() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(
        &home,
        &["--http-max-connections", "8", "--http-ping-interval", "1"],
    );

    // A head dripped one byte a second: 408 and closed within the 5 s for the whole head.
    let dripped = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let mut stream = TcpStream::connect(&addr).unwrap();
            let started = Instant::now();
            let mut answer = String::new();
            for byte in b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: aaaaaaaaaaaaaaaaaaaa" {
                if stream.write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1000));
                if started.elapsed() > Duration::from_secs(8) {
                    break;
                }
            }
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let _ = stream.read_to_string(&mut answer);
            (started.elapsed(), answer)
        }
    });

    let (took, answer) = dripped.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        took < Duration::from_secs(8),
        "the dripped head held its slot {took:?}"
    );

    // (Each step here runs alone: every connection comes from 127.0.0.1 and counts in its
    // share.) Two quiet connections take 127.0.0.1's share (8 / 4); the next is refused at
    // once, and once one goes, the address is served again.
    let quiet: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut refused = TcpStream::connect(&addr).unwrap();
    let mut answer = String::new();
    refused.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    drop(quiet);
    assert!(wait_until(Duration::from_secs(7), || get(
        &addr,
        "/api/status",
        &[]
    )
    .0 == 200));

    // A WebSocket that never subscribes is closed after 10 s.
    let (mut silent, _) = tungstenite::connect(format!("ws://{addr}/events")).unwrap();
    if let MaybeTlsStream::Plain(s) = silent.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    let connected = Instant::now();
    loop {
        // Pings come meanwhile (and are answered at this read): answering is not enough.
        match silent.read() {
            Ok(Message::Ping(_)) => continue,
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 1008);
                assert!(frame.reason.contains("no subscription"), "{frame:?}");
                break;
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    let took = connected.elapsed();
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(13)).contains(&took),
        "closed after {took:?}"
    );

    // One that subscribes but never reads (so never answers a ping) is pinged after 1 s of
    // silence and closed 1 s later: raw bytes show the ping, then the close frame.
    let mut deaf = subscribe(&addr, "", &["task:999999999"]);
    let MaybeTlsStream::Plain(raw) = deaf.get_mut() else {
        unreachable!()
    };
    std::thread::sleep(Duration::from_secs(4));
    raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut bytes = Vec::new();
    let _ = raw.read_to_end(&mut bytes);
    let ping = bytes.windows(2).position(|w| w == [0x89, 0x00]);
    let close = bytes.iter().position(|b| *b == 0x88);
    assert!(ping.is_some() && close > ping, "{bytes:?}");
    let close = close.unwrap();
    assert_eq!(
        &bytes[close + 2..close + 4],
        &1008u16.to_be_bytes(),
        "{bytes:?}"
    );
    foreman.stop();
}

/// Issue 13, item 16: during a graceful stop, `status` says "stopping" with the task still
/// running, and so does the live view's heartbeat (and the page, from it).
#[test]
fn a_graceful_stop_is_shown_as_stopping_with_what_still_runs() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &["--graceful-timeout", "20"]);
    let mut ws = subscribe(&addr, "", &["foreman"]);
    home.ok(&["enqueue", "sleep", "--kwargs", "{\"seconds\": 3}"]);
    assert!(wait_until(Duration::from_secs(5), || !foreman
        .events("task started")
        .is_empty()));
    foreman.signal(libc::SIGTERM);

    let mut status = Value::Null;
    assert!(
        wait_until(Duration::from_secs(3), || {
            status = serde_json::from_str(&home.ok(&["status", "--json"])).unwrap();
            status["foreman"]["state"] == "stopping"
        }),
        "{status}"
    );
    assert_eq!(status["foreman"]["running"], 1, "{status}");
    assert!(status["foreman"]["stop_deadline"].is_string(), "{status}");
    assert_eq!(status["tasks"]["running"], 1, "{status}");
    let text = home.ok(&["status"]);
    assert!(text.starts_with("foreman: stopping"), "{text}");

    let beats = until(&mut ws, Duration::from_secs(3), |m| {
        m["type"] == "heartbeat" && m["state"] == "stopping"
    });
    let beat = beats.last().unwrap();
    assert_eq!(beat["running"], 1, "{beat}");
    assert!(beat["stop_deadline"].is_string(), "{beat}");

    let exit = foreman.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(exit.success());
    assert_eq!(foreman.events("task finished").len(), 1);
}

/// Issue 14, item 5: Python's prometheus_client, the parser Prometheus' own Python tools
/// use (`prometheus_client.parser.text_string_to_metric_families`), reads every family of
/// /metrics with its samples: each family's HELP and TYPE come right before them.
#[test]
fn prometheus_clients_own_parser_reads_every_family_with_its_samples() {
    let Some(python) = crate::support::python_with(&["prometheus_client"]) else {
        return;
    };
    let home = Home::new();
    home.enqueue_lines("{\"task\":\"noop\"}\n{\"task\":\"fail\"}\n");
    home.ok(&["enqueue", "noop", "--delay", "3600"]);
    let (mut foreman, addr) = start_live(&home, &[]);
    // Both tasks ran and the live view counted them.
    let mut text = String::new();
    assert!(wait_until(Duration::from_secs(5), || {
        text = get(&addr, "/metrics", &[]).1;
        text.contains("snapq_tasks_failed_total{task=\"fail\"} 1")
            && text.contains("snapq_tasks_due 0")
    }));
    foreman.stop();
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
print(json.dumps({f.name: [s.value for s in f.samples] for f in text_string_to_metric_families(sys.stdin.read())}))
"#;
    let out = crate::support::output_with_stdin(
        std::process::Command::new(python).arg("-c").arg(script),
        text.as_bytes(),
    );
    assert!(out.status.success());
    let families: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (name, want) in [
        ("snapq_tasks_due", 0.0),
        ("snapq_tasks_delayed", 1.0),
        ("snapq_oldest_due_task_age_seconds", 0.0),
        ("snapq_tasks_running", 0.0),
    ] {
        let values: Vec<f64> = families[name]
            .as_array()
            .unwrap_or_else(|| panic!("no family {name}: {families}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(values, [want], "{name}: {families}");
    }
    // prometheus_client names counters without their _total suffix.
    for name in ["snapq_tasks_started", "snapq_tasks_failed"] {
        assert!(
            !families[name].as_array().unwrap().is_empty(),
            "{name} has no samples: {families}\n{text}"
        );
    }
}
