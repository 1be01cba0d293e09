//! The live page in real headless Chromium (Debian's chromium and chromium-driver), driven
//! over the WebDriver protocol: what an operator sees, checked against the feed's own
//! timing. Screenshots go to target/test-artifacts/.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::Message;

use crate::live::{start_live, subscribe};
use crate::support::{Home, wait_until};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// A chromedriver process and one browser session in it; both end on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "this test needs Debian's chromium and chromium-driver: \
             apt-get install chromium chromium-driver (.ci/run installs them)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let ready = wait_until(Duration::from_secs(20), || {
            agent
                .get(format!("{base}/status"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .is_some_and(|v| v["value"]["ready"] == true)
        });
        assert!(ready, "chromedriver did not become ready");
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            agent,
            _profile: profile,
        };
        let args = json!([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--window-size=1400,1000",
            format!("--user-data-dir={}", browser._profile.path().display()),
        ]);
        let created = browser.command(
            "POST",
            "/session",
            json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }}}),
        );
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        browser
    }

    /// One WebDriver command; returns its `value`.
    fn command(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let response = match method {
            "POST" => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.to_string()),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self.agent.get(&url).call(),
        };
        let mut text = String::new();
        response
            .unwrap()
            .body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert!(
            value["value"].get("error").is_none(),
            "WebDriver {method} {path}: {text}"
        );
        value["value"].clone()
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    fn open(&self, url: &str) {
        self.command("POST", &self.session_path("/url"), json!({ "url": url }));
    }

    /// Runs `script` (a function body) in the page; returns what it returns.
    fn eval(&self, script: &str) -> Value {
        self.command(
            "POST",
            &self.session_path("/execute/sync"),
            json!({"script": script, "args": []}),
        )
    }

    /// Saves a PNG of the window.
    fn screenshot(&self, name: &str) -> PathBuf {
        let data = self.command("GET", &self.session_path("/screenshot"), Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().unwrap())
            .unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("test-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let url = format!("{}{}", self.base, self.session_path(""));
            let _ = self.agent.delete(&url).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What the page shows of one task: in the running table (with its progress) or in the
/// finished table (with its outcome).
const TASK_ROW: &str = r#"
    const id = "__ID__";
    const run = document.querySelector('#running tr[data-task-id="' + id + '"]');
    const done = document.querySelector('#finished tr[data-task-id="' + id + '"]');
    return {
        conn: document.getElementById("conn").className,
        running: !!run,
        progress: run ? run.querySelector("progress").value : null,
        message: run ? run.querySelector(".progress-message").textContent : null,
        elapsed: run ? run.querySelector(".elapsed").textContent : null,
        outcome: done ? done.querySelector(".outcome").textContent : null,
        due: document.getElementById("queue-due").textContent,
        rss: document.getElementById("foreman-rss").textContent,
    };
"#;

#[test]
fn the_page_shows_a_sleep_task_running_with_progress_then_finished_within_a_second() {
    let home = Home::new();
    let (mut foreman, addr) = start_live(&home, &[]);
    // Something in every table, for the screenshot.
    crate::monitors::add(&home, "system", "this-host", json!({}), "1");
    home.enqueue_lines("{\"task\":\"noop\"}\n{\"task\":\"noop\"}\n");
    home.ok(&["enqueue", "fail", "--kwargs", r#"{"message": "disk full"}"#]);

    let browser = Browser::start();
    browser.open(&format!("http://{addr}/"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            browser.eval("return document.getElementById('conn').className") == "live"
        }),
        "the page did not connect to the feed"
    );
    // The feed, read by the test too, tells when each event happened.
    let mut feed = subscribe(&addr, "", &["*"]);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = feed.get_mut() {
        s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    }
    let id: i64 = home
        .ok(&["enqueue", "sleep", "--kwargs", r#"{"seconds": 2.5}"#])
        .trim()
        .parse()
        .unwrap();
    let channel = format!("task:{id}");
    let script = TASK_ROW.replace("__ID__", &id.to_string());

    let mut sent: [Option<Instant>; 3] = [None; 3]; // started, progress ≥ 0.5, finished
    let mut shown: [Option<Instant>; 3] = [None; 3];
    let mut running_shot = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while shown[2].is_none() && Instant::now() < deadline {
        while let Ok(Message::Text(text)) = feed.read() {
            let m: Value = serde_json::from_str(&text).unwrap();
            if m["channel"] != channel.as_str() {
                continue;
            }
            let slot = match m["type"].as_str().unwrap() {
                "task.started" => 0,
                "task.progress" if m["fraction"].as_f64().unwrap() >= 0.5 => 1,
                "task.finished" => 2,
                _ => continue,
            };
            sent[slot].get_or_insert_with(Instant::now);
        }
        let row = browser.eval(&script);
        let now = Instant::now();
        if row["running"] == true {
            shown[0].get_or_insert(now);
            if row["progress"].as_f64().unwrap_or(0.0) >= 0.5 {
                shown[1].get_or_insert(now);
                assert!(
                    row["message"].as_str().unwrap().starts_with("slept "),
                    "{row}"
                );
                if running_shot.is_none() {
                    running_shot = Some(browser.screenshot("live-page-running.png"));
                }
            }
        }
        if row["outcome"] == "finished" {
            shown[2].get_or_insert(now);
            assert_eq!(row["running"], false, "{row}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let finished_shot = browser.screenshot("live-page.png");
    let names = ["running", "progress past half", "finished"];
    for i in 0..3 {
        let (Some(sent), Some(shown)) = (sent[i], shown[i]) else {
            panic!(
                "the page never showed the task {} (feed {:?}, page {:?}); last row {}",
                names[i],
                sent[i],
                shown[i],
                browser.eval(&script)
            );
        };
        let lag = shown.saturating_duration_since(sent);
        assert!(
            lag <= Duration::from_secs(1),
            "the page showed the task {} {lag:?} after the feed said so",
            names[i]
        );
    }
    let row = browser.eval(&script);
    assert_eq!(row["due"], "0", "{row}");
    assert!(row["rss"].as_str().unwrap().ends_with("MiB"), "{row}");
    assert!(running_shot.is_some_and(|p| p.exists()));
    assert!(finished_shot.exists());

    // Issue 13, item 17: at 1280 px the monitor table fits (long values are cut, not
    // scrolled to), and a failure stays in view after 150 successes.
    browser.command(
        "POST",
        &browser.session_path("/window/rect"),
        json!({"width": 1280, "height": 900}),
    );
    home.enqueue_lines(&"{\"task\":\"noop\"}\n".repeat(150));
    let fits = r#"
        const wrap = document.querySelector('#monitors').parentElement;
        const failed = document.querySelector('#failures tr[data-task-id="3"] .outcome');
        const finished = document.querySelector('#finished tr[data-task-id="3"]');
        const link = document.querySelector('#failures tr[data-task-id="3"] a.record');
        return {
            record: link ? link.getAttribute('href') : null,
            fits: wrap.scrollWidth <= wrap.clientWidth,
            page_fits: document.documentElement.scrollWidth <= window.innerWidth,
            failure: failed ? failed.textContent : null,
            in_finished: !!finished,
        };
    "#;
    let mut shown = Value::Null;
    assert!(
        wait_until(Duration::from_secs(5), || {
            shown = browser.eval(fits);
            shown["in_finished"] == false
        }),
        "150 successes did not push the failure out of 'finished': {shown}"
    );
    assert_eq!(shown["failure"], "failed", "{shown}");
    // Issue 15: the failure links to its record, which the link serves.
    assert_eq!(shown["record"], "/api/tasks/3", "{shown}");
    let record = browser.eval(
        r#"const r = new XMLHttpRequest();
           r.open('GET', document.querySelector('#failures tr[data-task-id="3"] a.record').href, false);
           r.send();
           return {status: r.status, body: JSON.parse(r.responseText)};"#,
    );
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["body"]["state"], "failed", "{record}");
    assert_eq!(record["body"]["id"], 3, "{record}");
    assert_eq!(shown["fits"], true, "{shown}");
    assert_eq!(shown["page_fits"], true, "{shown}");
    browser.screenshot("live-page-1280.png");

    // Issue 15: the last 15 minutes charted from the heartbeats (finished and failed per
    // second, queue depth, wait p95); the 150 tasks above make the finished line rise.
    let charts = r#"
        const points = id => Number(document.getElementById(id).dataset.points || 0);
        // Samples are about a second apart: their sum is about the tasks finished.
        const total = state.series.reduce((n, s) => n + s.finished_per_second, 0);
        return {finished: points('chart-finished'), failed: points('chart-failed'),
                due: points('chart-due'), wait: points('chart-wait'), total_finished: total};
    "#;
    let mut drawn = Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            drawn = browser.eval(charts);
            drawn["finished"].as_u64() >= Some(3)
                && drawn["failed"].as_u64() >= Some(3)
                && drawn["due"].as_u64() >= Some(3)
                && drawn["wait"].as_u64() >= Some(1)
                // The 150 tasks above are in the line.
                && drawn["total_finished"].as_f64() >= Some(140.0)
        }),
        "the charts were not drawn: {drawn}"
    );

    browser.screenshot("live-page-charts.png");

    // Issue 13, item 16: during a graceful stop the page says "stopping" (not "live") and
    // still shows the task that runs.
    let id: i64 = home
        .ok(&["enqueue", "sleep", "--kwargs", r#"{"seconds": 3}"#])
        .trim()
        .parse()
        .unwrap();
    let script = TASK_ROW.replace("__ID__", &id.to_string());
    assert!(wait_until(Duration::from_secs(5), || browser.eval(&script)
        ["running"]
        == true));
    foreman.signal(libc::SIGTERM);
    let mut row = Value::Null;
    assert!(
        wait_until(Duration::from_secs(3), || {
            row = browser.eval(&script);
            row["conn"] == "stopping"
        }),
        "the page did not show the stop: {row}"
    );
    assert_eq!(row["running"], true, "{row}");
    let text = browser.eval("return document.getElementById('conn').textContent");
    assert!(
        text.as_str().unwrap().contains("waiting for 1 running"),
        "{text}"
    );
    assert!(browser.screenshot("live-page-stopping.png").exists());
    let exit = foreman.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(exit.success());
}
