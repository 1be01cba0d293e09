//! Telemetry from the real binary: the CSV files, the flush on SIGTERM, processes sharing
//! a directory, `--no-telemetry`, and `snapq stats` against a hand-computed case.

use std::path::Path;
use std::time::Duration;

use crate::support::{Foreman, Home, wait_until};

/// Every row of a telemetry file, checked: the exact header, four fields a row.
fn rows(path: &Path) -> Vec<(i64, f64, String, u32)> {
    let text = std::fs::read_to_string(path).unwrap();
    let (header, body) = text.split_once('\n').unwrap();
    assert_eq!(
        header,
        "Timepoint,Measurement,Label,PID",
        "{}",
        path.display()
    );
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(body.as_bytes())
        .into_records()
        .map(|r| {
            let r = r.unwrap();
            assert_eq!(r.len(), 4, "{r:?}");
            (
                r[0].parse().unwrap(),
                r[1].parse().unwrap(),
                r[2].to_owned(),
                r[3].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_sigtermed_foreman_flushes_every_sample() {
    let home = Home::new();
    let n = 300;
    home.enqueue_lines(&"{\"task\":\"noop\"}\n".repeat(n));
    let mut foreman = home.start(&[]);
    assert!(wait_until(Duration::from_secs(10), || home.queued() == 0));
    assert!(wait_until(Duration::from_secs(10), || {
        foreman.events("task finished").len() == n
    }));
    // Well before the periodic flush (3 s): only the stop can have written them.
    foreman.stop();
    let pid = foreman.pid() as u32;
    let durations = rows(&home.file("telemetry").join(format!("duration-{pid}.csv")));
    let count = |label: &str| durations.iter().filter(|r| r.2 == label).count();
    assert_eq!(count("task:noop"), n);
    assert_eq!(count("wait:noop"), n);
    let now_ns = snapq::telemetry::now_ns();
    for (at, value, _, row_pid) in &durations {
        assert_eq!(*row_pid, pid);
        assert!(*value >= 0.0);
        assert!(
            now_ns - at < 60_000_000_000,
            "timepoint {at} is not ns since the epoch"
        );
    }
    let runtime = rows(&home.file("telemetry").join(format!("runtime-{pid}.csv")));
    for label in [
        "rss_bytes",
        "cpu_user_seconds",
        "cpu_system_seconds",
        "threads",
        "open_fds",
        "tasks_due",
        "tasks_running",
    ] {
        assert!(runtime.iter().any(|r| r.2 == label), "no {label} sample");
    }
}

#[test]
fn foremen_sharing_a_telemetry_directory_keep_their_own_files() {
    let shared = Home::new();
    let dir = shared.file("telemetry");
    let homes = [Home::new(), Home::new()];
    let mut pids = Vec::new();
    for home in &homes {
        home.enqueue_lines(&"{\"task\":\"noop\"}\n".repeat(100));
        let mut cmd = home.cmd();
        cmd.arg("--telemetry-dir")
            .arg(&dir)
            .args(["run", "--burst"]);
        let mut burst = Foreman::spawn_unready(cmd);
        assert!(burst.wait_exit(Duration::from_secs(30)).unwrap().success());
        pids.push(burst.pid() as u32);
    }
    for pid in &pids {
        let durations = rows(&dir.join(format!("duration-{pid}.csv")));
        assert_eq!(durations.iter().filter(|r| r.2 == "task:noop").count(), 100);
        assert!(durations.iter().all(|r| r.3 == *pid));
    }
    let stats: serde_json::Value = serde_json::from_str(&shared.ok(&[
        "--telemetry-dir",
        dir.to_str().unwrap(),
        "stats",
        "--json",
    ]))
    .unwrap();
    assert_eq!(stats["durations"]["task:noop"]["count"], 200);
}

#[test]
fn no_telemetry_writes_nothing() {
    let home = Home::new();
    home.ok(&["enqueue", "noop"]);
    home.ok(&["run", "--burst", "--no-telemetry"]);
    assert!(!home.file("telemetry").exists());
    let out = home.ok(&["stats"]);
    assert!(out.contains("no telemetry in"), "{out}");
}

#[test]
fn stats_match_a_hand_computed_case() {
    let home = Home::new();
    let dir = home.file("telemetry");
    std::fs::create_dir_all(&dir).unwrap();
    let now = snapq::telemetry::now_ns();
    let hour_ago = now - 3_600_000_000_000;
    // The old header (a space after each comma) is still read.
    let mut text = String::from("Timepoint, Measurement, Label, PID\n");
    // task:x takes 1, 2, …, 20 ms (written out of order), wait:x 5 ms twice.
    for ms in [
        7, 1, 20, 13, 2, 3, 19, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18,
    ] {
        text += &format!("{now},{},task:x,42\n", f64::from(ms) / 1e3);
    }
    text += &format!("{now},0.005,wait:x,42\n{now},0.005,wait:x,42\n");
    // An hour old: in the totals, not in --since 10m.
    text += &format!("{hour_ago},1.5,task:old,42\n");
    std::fs::write(dir.join("duration-42.csv"), text).unwrap();
    std::fs::write(
        dir.join("runtime-42.csv"),
        format!(
            "Timepoint,Measurement,Label,PID\n{hour_ago},1000,rss_bytes,42\n{now},2048,rss_bytes,42\n"
        ),
    )
    .unwrap();

    let stats: serde_json::Value = serde_json::from_str(&home.ok(&["stats", "--json"])).unwrap();
    let x = &stats["durations"]["task:x"];
    assert_eq!(x["count"], 20);
    // Nearest rank: p50 is the 10th of 20 values, p95 the 19th, p99 the 20th.
    let close = |v: &serde_json::Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-12;
    assert!(close(&x["mean"], 0.0105), "{x}");
    assert!(close(&x["p50"], 0.010), "{x}");
    assert!(close(&x["p95"], 0.019), "{x}");
    assert!(close(&x["p99"], 0.020), "{x}");
    assert!(close(&x["max"], 0.020), "{x}");
    assert_eq!(stats["durations"]["wait:x"]["count"], 2);
    assert_eq!(stats["durations"]["task:old"]["count"], 1);
    assert_eq!(stats["runtime"]["rss_bytes"]["value"], 2048.0);

    let recent: serde_json::Value =
        serde_json::from_str(&home.ok(&["stats", "--json", "--since", "10m"])).unwrap();
    assert!(recent["durations"]["task:old"].is_null());
    assert_eq!(recent["durations"]["task:x"]["count"], 20);

    let text = home.ok(&["stats"]);
    assert!(text.contains("task:x"), "{text}");
    assert!(text.contains("10.500"), "mean in ms: {text}");
    let bad = home.snapq(&["stats", "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// Issue 14, item 5: QuantumLeap's own reader loads the files. What it does was read in
/// orchestracities/ngsi-timeseries-api, src/server/telemetry/pandas_import.py (and
/// flush.py, sampler.py, monitor.py for the names): every `duration*.csv` and
/// `runtime*.csv` of the directory through pandas' `read_csv` with the Timepoint column
/// converted from epoch nanoseconds, then series picked by the exact column names
/// `Timepoint`, `Measurement`, `Label`, `PID`, and the runtime labels `user time`,
/// `system time` and `max rss`. The script below does the same with pandas.
#[test]
fn quantumleaps_reader_loads_the_telemetry_files() {
    let Some(python) = crate::support::python_with(&["pandas"]) else {
        return;
    };
    let home = Home::new();
    home.enqueue_lines(&"{\"task\":\"noop\"}\n".repeat(20));
    let mut foreman = home.start(&[]);
    assert!(wait_until(Duration::from_secs(5), || home.queued() == 0));
    // At least two runtime samples (one a second).
    std::thread::sleep(Duration::from_millis(1500));
    foreman.stop();
    let script = r#"
import glob, os, sys
import pandas as pd

d = sys.argv[1]
def load(prefix):
    frames = [pd.read_csv(p, converters={"Timepoint": lambda t: pd.to_datetime(int(t), unit="ns", origin="unix")})
              for p in glob.glob(os.path.join(d, f"{prefix}*.csv"))]
    return pd.concat(frames, ignore_index=True)

def series(frame, label):
    proj = frame[frame["Label"] == label][["Timepoint", "Measurement", "PID"]]
    return proj.set_index("Timepoint")["Measurement"]

durations = load("duration")
runtime = load("runtime")
assert len(series(durations, "task:noop")) == 20, durations["Label"].unique()
for label in ["user time", "system time", "max rss"]:
    s = series(runtime, label)
    assert len(s) >= 1, (label, runtime["Label"].unique())
    assert (s >= 0).all(), (label, s)
assert series(runtime, "max rss").max() > 1000, "max rss is in KiB"
year = series(durations, "task:noop").index.max().year
assert year >= 2025, year
print("ok")
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(home.file("telemetry"))
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
