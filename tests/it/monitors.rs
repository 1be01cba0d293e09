//! Monitors against real HTTP servers on 127.0.0.1, run by the real foreman.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_http::{FakeServer, Mode, chainlink_metrics};
use crate::support::{Foreman, Home, wait_until};

/// The results of `monitor` in results.jsonl, in order.
fn results(home: &Home, monitor: &str) -> Vec<Value> {
    std::fs::read_to_string(home.file("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["monitor"] == monitor)
        .collect()
}

pub(crate) fn add(home: &Home, kind: &str, name: &str, config: Value, interval: &str) {
    home.ok(&[
        "monitor",
        "add",
        kind,
        name,
        "--config",
        &config.to_string(),
        "--interval",
        interval,
    ]);
}

/// Waits for a result of `monitor` after the first `after` that satisfies `pred`.
fn wait_result(
    home: &Home,
    monitor: &str,
    after: usize,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let mut found = None;
    wait_until(timeout, || {
        found = results(home, monitor)
            .into_iter()
            .skip(after)
            .find(|r| pred(r));
        found.is_some()
    });
    found
}

#[test]
fn chainlink_fails_over_and_sticks_to_the_last_good_source() {
    let home = Home::new();
    let a = FakeServer::start(Mode::Text(chainlink_metrics(100)));
    let b = FakeServer::start(Mode::Text(chainlink_metrics(200)));
    let (url_a, url_b) = (a.url(), b.url());
    let foreman = home.start(&[]);
    add(
        &home,
        "chainlink_node",
        "node1",
        json!({"node_prometheus_urls": [url_a, url_b]}),
        "0.2",
    );
    let by = |url: &str| {
        let url = url.to_owned();
        move |r: &Value| r["ok"] == true && r["data"]["source"] == url.as_str()
    };

    let first = wait_result(&home, "node1", 0, Duration::from_secs(5), by(&url_a))
        .unwrap_or_else(|| panic!("no result from A:\n{}", foreman.log_text()));
    // PANIC-compatible data: each metric under its own name.
    assert_eq!(first["kind"], "chainlink_node");
    assert_eq!(first["version"], 1);
    assert_eq!(first["data"]["head_tracker_current_head"], 100);
    assert_eq!(first["data"]["eth_balance"]["0x1aB5"], 12.5);
    assert_eq!(first["data"]["run_status_update_total"], 1);
    assert!(first["started_at"].as_str().unwrap().ends_with('Z'));
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);

    // A goes away: the next rounds use B.
    let port_a = a.stop();
    let n = results(&home, "node1").len();
    let failed_over = wait_result(&home, "node1", n, Duration::from_secs(5), by(&url_b));
    assert!(
        failed_over.is_some(),
        "no failover to B:\n{}",
        foreman.log_text()
    );
    assert_eq!(
        failed_over.unwrap()["data"]["head_tracker_current_head"],
        200
    );

    // A comes back: B answered last, so B stays first.
    let a = FakeServer::start_on(port_a, Mode::Text(chainlink_metrics(101)));
    let n = results(&home, "node1").len();
    assert!(wait_until(Duration::from_secs(5), || results(
        &home, "node1"
    )
    .len()
        >= n + 3));
    let since_a_back = &results(&home, "node1")[n..];
    assert!(
        since_a_back
            .iter()
            .all(|r| r["data"]["source"] == url_b.as_str()),
        "left the last good source: {since_a_back:?}"
    );
    assert_eq!(a.hits(), 0, "A was tried although B answered last");

    // B goes away: back to A.
    drop(b);
    let n = results(&home, "node1").len();
    assert!(wait_result(&home, "node1", n, Duration::from_secs(5), by(&url_a)).is_some());
    // Both gone: the node is down.
    drop(a);
    let n = results(&home, "node1").len();
    let down = wait_result(&home, "node1", n, Duration::from_secs(5), |r| {
        r["ok"] == false
    })
    .expect("no error with both sources gone");
    assert_eq!(down["error"]["code"], "node_down");
    assert!(
        down["error"]["message"]
            .as_str()
            .unwrap()
            .contains("node is down")
    );
    assert!(down.get("data").is_none());
}

#[test]
fn an_update_takes_effect_within_a_second_with_a_newer_version() {
    let home = Home::new();
    let a = FakeServer::start(Mode::Text(chainlink_metrics(1)));
    let b = FakeServer::start(Mode::Text(chainlink_metrics(2)));
    let _foreman = home.start(&[]);
    // A long interval: only the update can bring the next round this soon.
    add(
        &home,
        "chainlink_node",
        "n",
        json!({"node_prometheus_urls": [a.url()]}),
        "60",
    );
    assert!(wait_result(&home, "n", 0, Duration::from_secs(5), |r| r["ok"] == true).is_some());
    let updated_at = Instant::now();
    let out = home.ok(&[
        "monitor",
        "update",
        "n",
        "--config",
        &json!({"node_prometheus_urls": [b.url()]}).to_string(),
    ]);
    assert!(out.contains("version 2"), "{out}");
    let second = wait_result(&home, "n", 1, Duration::from_secs(1), |_| true);
    let took = updated_at.elapsed();
    let second = second.unwrap_or_else(|| panic!("no round within 1 s of the update ({took:?})"));
    assert_eq!(second["version"], 2);
    assert_eq!(second["data"]["source"], b.url());
    let shown: Value = serde_json::from_str(&home.ok(&["monitor", "show", "n"])).unwrap();
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["last_status"], "ok");
}

/// A foreman whose monitor `name` has a round hanging on a silent server (timeout 1.5 s),
/// and a second server that answers at once.
struct Hanging {
    home: Home,
    silent: FakeServer,
    fast: FakeServer,
    foreman: Foreman,
}

fn with_a_round_hanging(name: &str) -> Hanging {
    let home = Home::new();
    let silent = FakeServer::start(Mode::Silent);
    let fast = FakeServer::start(Mode::Text("up 1\n".into()));
    let foreman = home.start(&[]);
    add(
        &home,
        "http",
        name,
        json!({"url": silent.url(), "timeout": 1.5}),
        "0.2",
    );
    // The round is under way: the server has its connection.
    assert!(wait_until(Duration::from_secs(5), || silent.hits() >= 1));
    Hanging {
        home,
        silent,
        fast,
        foreman,
    }
}

#[test]
fn after_remove_no_result_comes_not_even_from_a_running_round() {
    let Hanging {
        home,
        silent: _silent,
        fast,
        foreman,
    } = with_a_round_hanging("slow");
    add(&home, "http", "quick", json!({"url": fast.url()}), "0.1");
    // The quick one has produced results.
    assert!(wait_until(Duration::from_secs(5), || results(
        &home, "quick"
    )
    .len()
        >= 2));
    home.ok(&["monitor", "remove", "slow"]);
    home.ok(&["monitor", "remove", "quick"]);
    let (slow_n, quick_n) = (results(&home, "slow").len(), results(&home, "quick").len());
    // Longer than the slow round's timeout and many quick intervals.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        results(&home, "slow").len(),
        slow_n,
        "a removed monitor's round was recorded"
    );
    assert_eq!(
        results(&home, "quick").len(),
        quick_n,
        "a removed monitor ran again"
    );
    assert!(
        foreman.has_log("discarded the result"),
        "{}",
        foreman.log_text()
    );
    let list: Value = serde_json::from_str(&home.ok(&["monitor", "list", "--json"])).unwrap();
    assert_eq!(list, json!([]));
}

#[test]
fn a_slow_target_times_out_while_other_monitors_keep_their_schedule() {
    let home = Home::new();
    let silent = FakeServer::start(Mode::Silent);
    let fast = FakeServer::start(Mode::Text("up 1\n".into()));
    let _foreman = home.start(&["--workers", "2"]);
    add(
        &home,
        "http",
        "slow",
        json!({"url": silent.url(), "timeout": 1.0}),
        "0.5",
    );
    add(&home, "http", "steady", json!({"url": fast.url()}), "0.25");
    assert!(wait_until(Duration::from_secs(10), || results(
        &home, "slow"
    )
    .len()
        >= 2));
    let slow = results(&home, "slow");
    for r in &slow {
        assert_eq!(r["ok"], false);
        assert_eq!(r["error"]["code"], "unreachable");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("timed out"),
            "{r}"
        );
        let ms = r["duration_ms"].as_f64().unwrap();
        assert!((900.0..3000.0).contains(&ms), "a 1 s timeout took {ms} ms");
    }
    // The steady monitor ran every 0.25 s throughout: no gap between its rounds' starts
    // grew past the interval plus 100 ms.
    let starts: Vec<f64> = results(&home, "steady")
        .iter()
        .map(|r| {
            let t = time::OffsetDateTime::parse(
                r["started_at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            t.unix_timestamp_nanos() as f64 / 1e9
        })
        .collect();
    assert!(starts.len() >= 6, "{} steady rounds", starts.len());
    for pair in starts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap <= 0.35,
            "steady rounds {gap:.3} s apart with a 0.25 s interval"
        );
    }
}

#[test]
fn rounds_resume_after_kill_9_without_any_command() {
    let home = Home::new();
    let server = FakeServer::start(Mode::Text("up 1\n".into()));
    let mut first = home.start(&[]);
    add(&home, "http", "web", json!({"url": server.url()}), "0.3");
    assert!(wait_until(Duration::from_secs(5), || !results(
        &home, "web"
    )
    .is_empty()));
    first.kill9();
    let n = results(&home, "web").len();
    let restarted = Instant::now();
    let _second = home.start(&[]);
    assert!(
        wait_until(Duration::from_secs(3), || results(&home, "web").len()
            >= n + 2),
        "no rounds after the restart"
    );
    assert!(restarted.elapsed() < Duration::from_secs(3));
}

#[test]
fn garbage_and_oversized_answers_are_errors_and_memory_stays_bounded() {
    let home = Home::new();
    let garbage = FakeServer::start(Mode::Garbage);
    let html = FakeServer::start(Mode::Text("<html><body>not metrics</body></html>".into()));
    let huge = FakeServer::start(Mode::Huge(100 << 20));
    let foreman = home.start(&[]);
    add(
        &home,
        "chainlink_node",
        "garbage",
        json!({"node_prometheus_urls": [garbage.url()]}),
        "0.5",
    );
    add(
        &home,
        "chainlink_node",
        "html",
        json!({"node_prometheus_urls": [html.url()]}),
        "0.5",
    );
    add(
        &home,
        "chainlink_node",
        "huge",
        json!({"node_prometheus_urls": [huge.url()]}),
        "0.5",
    );
    for (name, code) in [
        ("garbage", "bad_response"),
        ("html", "unparseable"),
        ("huge", "bad_response"),
    ] {
        let r = wait_result(&home, name, 0, Duration::from_secs(10), |_| true)
            .unwrap_or_else(|| panic!("no result for {name}"));
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["error"]["code"], code, "{r}");
    }
    let huge_error = results(&home, "huge")[0]["error"]["message"].clone();
    assert!(
        huge_error.as_str().unwrap().contains("larger than"),
        "{huge_error}"
    );
    // Let a few more 100 MiB answers be refused, then look at the high-water mark.
    assert!(wait_until(Duration::from_secs(10), || results(
        &home, "huge"
    )
    .len()
        >= 3));
    let status = std::fs::read_to_string(format!("/proc/{}/status", foreman.pid())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap();
    // The cap is 8 MiB a response; 100 MiB never gets near memory.
    assert!(hwm_kib < 48 * 1024, "peak RSS {hwm_kib} KiB");
}

#[test]
fn bad_monitor_configs_exit_2_name_the_field_and_store_nothing() {
    let home = Home::new();
    let cases: [(&[&str], &str); 9] = [
        (
            &[
                "chainlink_node",
                "n",
                "--config",
                "{\"node_prometheus_urls\": []}",
            ],
            "node_prometheus_urls",
        ),
        (
            &[
                "chainlink_node",
                "n",
                "--config",
                "{\"node_prometheus_urls\": [\"ftp://x/metrics\"]}",
            ],
            "node_prometheus_urls[0]",
        ),
        (
            &[
                "chainlink_node",
                "n",
                "--config",
                "{\"node_prometheus_urls\": \"http://x\"}",
            ],
            "node_prometheus_urls",
        ),
        (
            &[
                "chainlink_node",
                "n",
                "--config",
                "{\"node_prometheus_urls\": [\"http://x\"], \"timeout\": \"10\"}",
            ],
            "timeout",
        ),
        (&["http", "h", "--config", "{\"url\": 5}"], "url"),
        (&["http", "h", "--config", "{not json"], "--config"),
        (
            &["nosuch", "x", "--config", "{}"],
            "kinds are: chainlink_node, http, system",
        ),
        (
            &["system", "s", "--config", "{}", "--interval", "0"],
            "--interval",
        ),
        (
            &["system", "s", "--config", "{}", "--interval", "-5"],
            "negative",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["monitor", "add"];
        full.extend_from_slice(args);
        let out = home.snapq(&full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
    }
    // Nothing was stored; the database was not even created.
    assert!(!home.db_path().exists());
    // Updating or removing what does not exist is bad input too.
    for args in [
        &["monitor", "remove", "ghost"][..],
        &["monitor", "update", "ghost", "--interval", "5"],
    ] {
        let out = home.snapq(args);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no monitor named \"ghost\""));
    }
    home.ok(&["monitor", "add", "system", "s", "--config", "{}"]);
    let out = home.snapq(&["monitor", "add", "system", "s", "--config", "{}"]);
    assert_eq!(out.status.code(), Some(2));
    let out = home.snapq(&["monitor", "update", "s", "--config", "{\"disk\": 1}"]);
    assert_eq!(out.status.code(), Some(2));
    let shown: Value = serde_json::from_str(&home.ok(&["monitor", "show", "s"])).unwrap();
    assert_eq!(shown["version"], 1, "a refused update changed the monitor");
}

/// Issue 13, item 4: two foremen on one database (here one home, no pid file) start each
/// round once between them: the move of a round's schedule is claimed like a task.
#[test]
fn two_foremen_on_one_database_start_each_round_once() {
    let home = Home::new();
    let server = FakeServer::start(Mode::Text("up 1\n".into()));
    let _a = home.start(&["--no-pid-file"]);
    let _b = home.start(&["--no-pid-file"]);
    let added = Instant::now();
    add(&home, "http", "once", json!({"url": server.url()}), "0.25");
    std::thread::sleep(Duration::from_secs(4));
    let hits = server.hits();
    let ticks = added.elapsed().as_secs_f64() / 0.25;
    // One round a tick, plus one for the first round at once; two foremen each starting
    // every round would make twice as many.
    assert!(
        (hits as f64) <= ticks + 1.0,
        "{hits} rounds in {ticks:.1} ticks: rounds were started twice"
    );
    assert!(
        (hits as f64) >= ticks / 2.0,
        "only {hits} rounds in {ticks:.1} ticks"
    );
    assert_eq!(results(&home, "once").len(), hits);
}

/// Issue 13, item 20: a monitor removed and added again under the same name within a round
/// is a new monitor: its rounds use the new config at once, and a round of the old one
/// still running is discarded.
#[test]
fn a_monitor_removed_and_added_again_is_a_new_monitor() {
    let Hanging {
        home,
        silent,
        fast,
        foreman,
    } = with_a_round_hanging("m");
    home.ok(&["monitor", "remove", "m"]);
    add(&home, "http", "m", json!({"url": fast.url()}), "0.2");
    let shown: Value = serde_json::from_str(&home.ok(&["monitor", "show", "m"])).unwrap();
    assert_eq!(shown["version"], 2, "{shown}");
    let first = wait_result(&home, "m", 0, Duration::from_secs(1), |_| true)
        .unwrap_or_else(|| panic!("no round of the new monitor:\n{}", foreman.log_text()));
    assert_eq!(first["version"], 2);
    assert_eq!(first["data"]["url"], fast.url(), "{first}");
    // The old round's timeout passes: its result is discarded, and no later round goes to
    // the old URL.
    std::thread::sleep(Duration::from_millis(2000));
    let old_hits = silent.hits();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(silent.hits(), old_hits, "rounds still go to the old URL");
    for r in results(&home, "m") {
        assert_eq!(r["version"], 2, "a result of the removed monitor: {r}");
        assert_eq!(r["data"]["url"], fast.url(), "{r}");
    }
    assert!(
        foreman.has_log("discarded the result"),
        "{}",
        foreman.log_text()
    );
}

/// Issue 13, item 7: a Chainlink round is bounded in time over all its sources
/// (`round_timeout`), not one `timeout` per source; and a config with more sources than the
/// cap is refused with exit 2.
#[test]
fn a_chainlink_round_ends_at_its_round_timeout_whatever_its_sources() {
    let home = Home::new();
    let silent: Vec<FakeServer> = (0..6).map(|_| FakeServer::start(Mode::Silent)).collect();
    let urls: Vec<String> = silent.iter().map(FakeServer::url).collect();
    let foreman = home.start(&[]);
    add(
        &home,
        "chainlink_node",
        "many",
        json!({"node_prometheus_urls": urls, "timeout": 1.0, "round_timeout": 2.5}),
        "60",
    );
    let result = wait_result(&home, "many", 0, Duration::from_secs(10), |_| true)
        .unwrap_or_else(|| panic!("no result within 10 s:\n{}", foreman.log_text()));
    assert_eq!(result["error"]["code"], "node_down", "{result}");
    let message = result["error"]["message"].as_str().unwrap();
    assert!(message.contains("round_timeout"), "{message}");
    let took = result["duration_ms"].as_f64().unwrap();
    assert!(
        (2_400.0..3_500.0).contains(&took),
        "the round took {took} ms with a round_timeout of 2.5 s and six 1 s sources"
    );
    // Only the sources tried within the round's time were called.
    let called: usize = silent.iter().map(FakeServer::hits).sum();
    assert_eq!(called, 3, "{message}");

    let many: Vec<String> = (0..33)
        .map(|i| format!("http://127.0.0.1:{}/metrics", 10_000 + i))
        .collect();
    for (config, needle) in [
        (json!({"node_prometheus_urls": many}), "at most 32 sources"),
        (
            json!({"node_prometheus_urls": ["http://127.0.0.1:1/metrics"], "round_timeout": 0}),
            "round_timeout",
        ),
    ] {
        let out = home.snapq(&[
            "monitor",
            "add",
            "chainlink_node",
            "refused",
            "--config",
            &config.to_string(),
        ]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{stderr}");
    }
    assert!(!home.ok(&["monitor", "list"]).contains("refused"));
}
