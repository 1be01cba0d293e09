//! `/metrics`: the live view's counters and the database's figures in the Prometheus text
//! format (version 0.0.4), so an existing Prometheus can scrape snapq.
//!
//! Task counters are counted by the hub from the events it receives, since this process
//! started (Prometheus handles the reset on restart); queue and monitor figures are read
//! from the database at each scrape, so they cover every foreman and every monitor.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use crate::monitor::RoundResult;
use crate::monitor::store::MonitorInfo;
use crate::queue::Counts;

/// Upper bounds (seconds) of the task duration histogram's buckets.
const BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// Per task name: starts, ends and the duration histogram.
#[derive(Debug, Default, Clone)]
pub(crate) struct TaskCounts {
    pub started: u64,
    pub finished: u64,
    pub failed: u64,
    /// Non-cumulative: `buckets[i]` counts durations in (BUCKETS[i-1], BUCKETS[i]].
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

impl TaskCounts {
    pub fn finished(&mut self, duration: Duration) {
        self.finished += 1;
        self.observe(duration);
    }

    pub fn failed(&mut self, duration: Duration) {
        self.failed += 1;
        self.observe(duration);
    }

    fn observe(&mut self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }
}

/// Monitor rounds seen by this process, by monitor name.
#[derive(Debug, Default, Clone)]
pub(crate) struct MonitorCounts {
    pub kind: String,
    pub ok: u64,
    pub failed: u64,
}

/// What the hub counts and `/metrics` renders. Shared under one mutex (src/live/hub.rs).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub tasks: BTreeMap<Arc<str>, TaskCounts>,
    /// The page's charts: one sample a heartbeat, the last `SERIES_SAMPLES` (15 minutes),
    /// oldest first; `/api/series` serves them.
    pub series: std::collections::VecDeque<Sample>,
    pub monitors: BTreeMap<String, MonitorCounts>,
    pub clients: usize,
    pub clients_cut_off: u64,
    pub channels: usize,
    pub messages: usize,
}

impl Counters {
    pub fn task(&mut self, name: &Arc<str>) -> &mut TaskCounts {
        self.tasks.entry(Arc::clone(name)).or_default()
    }

    pub fn monitor(&mut self, result: &RoundResult) {
        let counts = self.monitors.entry(result.monitor.clone()).or_default();
        counts.kind.clone_from(&result.kind);
        if result.ok {
            counts.ok += 1;
        } else {
            counts.failed += 1;
        }
    }
}

/// How many heartbeat samples the charts keep: 15 minutes at one a second.
pub(crate) const SERIES_SAMPLES: usize = 900;

/// One point of the page's charts, made at each heartbeat from what happened since the
/// previous one.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Sample {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// Tasks finished (succeeded) and failed per second over the interval.
    pub finished_per_second: f64,
    pub failed_per_second: f64,
    /// Tasks due and not started, at the heartbeat (null when the database was busy).
    pub due: Option<i64>,
    /// The 95th percentile of how long the tasks started in the interval waited past
    /// their due time, in ms (null when none started).
    pub wait_p95_ms: Option<f64>,
}

/// What the database says at scrape time.
pub(crate) struct DbFigures {
    pub counts: Option<Counts>,
    pub monitors: Vec<MonitorInfo>,
    pub now: i64,
}

/// The whole exposition.
pub(crate) fn render(counters: &Counters, db: &DbFigures, running: usize, dropped: u64) -> String {
    let mut out = String::with_capacity(4096);
    // Queue depth. Each family's HELP and TYPE come right before its own sample: with all
    // three headers first, Python's prometheus_client parser read the first two families
    // as having no sample.
    if let Some(c) = &db.counts {
        let oldest = c
            .oldest_due
            .map_or(0.0, |t| (db.now - t).max(0) as f64 / 1e6);
        for (name, help, value) in [
            (
                "snapq_tasks_due",
                "Tasks due now and not yet claimed.",
                c.due as f64,
            ),
            (
                "snapq_tasks_delayed",
                "Tasks waiting for their run time.",
                c.delayed as f64,
            ),
            (
                "snapq_oldest_due_task_age_seconds",
                "How long the oldest due task has waited (0 when none is due).",
                oldest,
            ),
        ] {
            header(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
    }
    header(
        &mut out,
        "snapq_tasks_running",
        "gauge",
        "Tasks running in this foreman now.",
    );
    let _ = writeln!(out, "snapq_tasks_running {running}");

    for (metric, help, pick) in [
        (
            "snapq_tasks_started_total",
            "Tasks started by this foreman, by task name.",
            (|t: &TaskCounts| t.started) as fn(&TaskCounts) -> u64,
        ),
        (
            "snapq_tasks_finished_total",
            "Tasks that returned without error, by task name.",
            |t: &TaskCounts| t.finished,
        ),
        (
            "snapq_tasks_failed_total",
            "Tasks that failed, panicked, timed out or were rejected or abandoned, by task name.",
            |t: &TaskCounts| t.failed,
        ),
    ] {
        header(&mut out, metric, "counter", help);
        for (name, counts) in &counters.tasks {
            let _ = writeln!(
                out,
                "{metric}{{task=\"{}\"}} {}",
                escape(name),
                pick(counts)
            );
        }
    }

    let metric = "snapq_task_duration_seconds";
    header(
        &mut out,
        metric,
        "histogram",
        "How long tasks ran, by task name.",
    );
    for (name, counts) in &counters.tasks {
        let task = escape(name);
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(counts.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{metric}_bucket{{task=\"{task}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{metric}_bucket{{task=\"{task}\",le=\"+Inf\"}} {}",
            counts.count
        );
        let _ = writeln!(
            out,
            "{metric}_sum{{task=\"{task}\"}} {}",
            counts.sum_seconds
        );
        let _ = writeln!(out, "{metric}_count{{task=\"{task}\"}} {}", counts.count);
    }

    header(
        &mut out,
        "snapq_monitor_up",
        "gauge",
        "1 if the monitor's last round succeeded, 0 if it failed (no sample before its first round).",
    );
    for m in &db.monitors {
        let up = match m.last_status.as_deref() {
            Some("ok") => 1,
            Some(_) => 0,
            None => continue,
        };
        let _ = writeln!(
            out,
            "snapq_monitor_up{{monitor=\"{}\",kind=\"{}\"}} {up}",
            escape(&m.name),
            escape(&m.kind)
        );
    }
    header(
        &mut out,
        "snapq_monitor_last_duration_seconds",
        "gauge",
        "How long the monitor's last round took.",
    );
    for m in &db.monitors {
        if let Some(ms) = m.last_duration_ms {
            let _ = writeln!(
                out,
                "snapq_monitor_last_duration_seconds{{monitor=\"{}\",kind=\"{}\"}} {}",
                escape(&m.name),
                escape(&m.kind),
                ms / 1e3
            );
        }
    }
    for (metric, help, ok) in [
        (
            "snapq_monitor_rounds_ok_total",
            "Monitor rounds that succeeded in this foreman.",
            true,
        ),
        (
            "snapq_monitor_rounds_failed_total",
            "Monitor rounds that failed in this foreman.",
            false,
        ),
    ] {
        header(&mut out, metric, "counter", help);
        for (name, counts) in &counters.monitors {
            let n = if ok { counts.ok } else { counts.failed };
            let _ = writeln!(
                out,
                "{metric}{{monitor=\"{}\",kind=\"{}\"}} {n}",
                escape(name),
                escape(&counts.kind)
            );
        }
    }

    header(
        &mut out,
        "snapq_live_clients",
        "gauge",
        "WebSocket clients subscribed now.",
    );
    let _ = writeln!(out, "snapq_live_clients {}", counters.clients);
    header(
        &mut out,
        "snapq_live_clients_cut_off_total",
        "counter",
        "WebSocket clients disconnected for falling too far behind.",
    );
    let _ = writeln!(
        out,
        "snapq_live_clients_cut_off_total {}",
        counters.clients_cut_off
    );
    header(
        &mut out,
        "snapq_live_channels",
        "gauge",
        "Channels whose history is kept.",
    );
    let _ = writeln!(out, "snapq_live_channels {}", counters.channels);
    header(
        &mut out,
        "snapq_live_messages",
        "gauge",
        "Messages kept over all channels.",
    );
    let _ = writeln!(out, "snapq_live_messages {}", counters.messages);
    header(
        &mut out,
        "snapq_live_events_dropped_total",
        "counter",
        "Events dropped because the live view's hub had fallen behind.",
    );
    let _ = writeln!(out, "snapq_live_events_dropped_total {dropped}");
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::prometheus;

    #[test]
    fn the_exposition_parses_and_the_histogram_is_cumulative() {
        let mut counters = Counters::default();
        let (noop, weird): (Arc<str>, Arc<str>) = (Arc::from("noop"), Arc::from("we\"ird"));
        counters.task(&noop).started = 3;
        counters.task(&noop).finished(Duration::from_micros(200));
        counters.task(&noop).finished(Duration::from_millis(20));
        counters.task(&weird).failed(Duration::from_secs(2));
        let db = DbFigures {
            counts: None,
            monitors: Vec::new(),
            now: 0,
        };
        let text = render(&counters, &db, 1, 0);
        let samples = prometheus::parse(&text).unwrap();
        let bucket = |le: &str| {
            samples
                .iter()
                .find(|s| {
                    s.name == "snapq_task_duration_seconds_bucket"
                        && s.label("task") == Some("noop")
                        && s.label("le") == Some(le)
                })
                .map(|s| s.value)
        };
        assert_eq!(bucket("0.0005"), Some(1.0));
        assert_eq!(bucket("0.05"), Some(2.0));
        assert_eq!(bucket("+Inf"), Some(2.0));
        assert!(
            samples
                .iter()
                .any(|s| s.name == "snapq_tasks_failed_total" && s.label("task") == Some("we\"ird"))
        );
    }
}
