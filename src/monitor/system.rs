//! `system`: this host's CPU utilisation, memory, load and disk usage per mount, read from
//! /proc (and statvfs), or the same figures from a node-exporter URL when one is
//! configured. CPU utilisation needs two readings, so the first round reports it as null
//! and keeps its counters in the round state for the next.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::http_fetch::{Client, FetchError, check_url, split_limits};
use super::{MonitorKind, Probe, Round, RoundError, parse_config, prometheus};

pub struct System;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Scrape this node exporter (`http://host:9100/metrics`) instead of reading /proc.
    #[serde(default)]
    node_exporter_url: Option<String>,
}

struct SystemProbe {
    exporter: Option<(String, Client)>,
}

impl MonitorKind for System {
    fn name(&self) -> &'static str {
        "system"
    }

    fn prepare(&self, config: &Value) -> Result<Arc<dyn Probe>, String> {
        let config_or_empty = if config.is_null() {
            json!({})
        } else {
            config.clone()
        };
        let (client, rest) = split_limits(&config_or_empty)?;
        let config: Config = parse_config(&rest)?;
        let exporter = match config.node_exporter_url {
            Some(url) => {
                check_url("node_exporter_url", &url)?;
                Some((url, client))
            }
            None => None,
        };
        Ok(Arc::new(SystemProbe { exporter }))
    }
}

/// The figures of one reading.
#[derive(Debug, Default)]
struct Reading {
    /// (busy, total) CPU time, any unit.
    cpu: Option<(f64, f64)>,
    memory_total: Option<f64>,
    memory_available: Option<f64>,
    load: [Option<f64>; 3],
    /// mount point → (size, available) in bytes.
    disks: BTreeMap<String, (f64, f64)>,
}

impl Probe for SystemProbe {
    fn round(&self, state: &Value) -> Round {
        let reading = match &self.exporter {
            Some((url, client)) => from_exporter(url, client),
            None => from_proc(),
        };
        match reading {
            Ok(r) => {
                let cpu_percent = match (r.cpu, state.get("cpu_busy"), state.get("cpu_total")) {
                    (Some((busy, total)), Some(b0), Some(t0)) => {
                        let (b0, t0) = (b0.as_f64().unwrap_or(0.0), t0.as_f64().unwrap_or(0.0));
                        let dt = total - t0;
                        (dt > 0.0).then(|| percent(busy - b0, dt))
                    }
                    _ => None,
                };
                let next_state = match r.cpu {
                    Some((busy, total)) => json!({"cpu_busy": busy, "cpu_total": total}),
                    None => Value::Null,
                };
                let used_percent = match (r.memory_total, r.memory_available) {
                    (Some(t), Some(a)) if t > 0.0 => Some(percent(t - a, t)),
                    _ => None,
                };
                let disks: serde_json::Map<String, Value> = r
                    .disks
                    .iter()
                    .map(|(mount, (size, avail))| {
                        let used = if *size > 0.0 {
                            percent(size - avail, *size)
                        } else {
                            0.0
                        };
                        (
                            mount.clone(),
                            json!({"size_bytes": bytes(*size), "available_bytes": bytes(*avail),
                                   "used_percent": used}),
                        )
                    })
                    .collect();
                Round {
                    outcome: Ok(json!({
                        "source": self.exporter.as_ref().map_or("/proc", |(u, _)| u.as_str()),
                        "cpu_percent": cpu_percent,
                        "memory_total_bytes": r.memory_total.map(bytes),
                        "memory_available_bytes": r.memory_available.map(bytes),
                        "memory_used_percent": used_percent,
                        "load1": r.load[0],
                        "load5": r.load[1],
                        "load15": r.load[2],
                        "disks": disks,
                    })),
                    state: next_state,
                    panic: None,
                }
            }
            Err(e) => Round {
                outcome: Err(e),
                state: state.clone(),
                panic: None,
            },
        }
    }
}

/// `part` of `whole` in percent, to two decimals: `12.82`, not `12.820512820512821`.
fn percent(part: f64, whole: f64) -> f64 {
    (10_000.0 * part / whole).round() / 100.0
}

/// A byte count as an integer: `24562290688`, not `24562290688.0`.
fn bytes(value: f64) -> u64 {
    value.max(0.0).round() as u64
}

fn from_proc() -> Result<Reading, RoundError> {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map_err(|e| RoundError::new("unreadable", format!("cannot read {path}: {e}")))
    };
    let mut r = Reading::default();
    let stat = read("/proc/stat")?;
    if let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) {
        let ticks: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal …: idle and iowait are not busy.
        let total: f64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
        r.cpu = Some((total - idle, total));
    }
    let meminfo = read("/proc/meminfo")?;
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|v| v * 1024.0)
    };
    r.memory_total = kib("MemTotal:");
    r.memory_available = kib("MemAvailable:");
    let loadavg = read("/proc/loadavg")?;
    for (slot, v) in r.load.iter_mut().zip(loadavg.split_whitespace()) {
        *slot = v.parse().ok();
    }
    let mounts = read("/proc/mounts")?;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(device), Some(mount), Some(fstype)) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        // Real file systems only: block devices and the usual local ones.
        let real =
            device.starts_with("/dev/") && !matches!(*fstype, "squashfs" | "iso9660" | "udf");
        if real
            && !r.disks.contains_key(*mount)
            && let Some(space) = statvfs(mount)
        {
            r.disks.insert((*mount).to_owned(), space);
        }
    }
    Ok(r)
}

/// (size, available to unprivileged users) in bytes.
fn statvfs(mount: &str) -> Option<(f64, f64)> {
    let path = std::ffi::CString::new(mount).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for the call to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let block = st.f_frsize as f64;
    Some((st.f_blocks as f64 * block, st.f_bavail as f64 * block))
}

fn from_exporter(url: &str, client: &Client) -> Result<Reading, RoundError> {
    let fetched = client.get(url).map_err(|e| match e {
        FetchError::Unreachable(m) => RoundError::new("unreachable", format!("{url}: {m}")),
        FetchError::BadAnswer(m) => RoundError::new("bad_response", format!("{url}: {m}")),
    })?;
    if fetched.status != 200 {
        return Err(RoundError::new(
            "bad_status",
            format!("{url} answered HTTP {}", fetched.status),
        ));
    }
    let samples = prometheus::parse(&fetched.body).map_err(|e| {
        RoundError::new(
            "unparseable",
            format!("{url} did not answer with Prometheus text: {e}"),
        )
    })?;
    let mut r = Reading::default();
    let mut busy = 0.0;
    let mut total = 0.0;
    for s in &samples {
        match s.name.as_str() {
            "node_cpu_seconds_total" => {
                total += s.value;
                if !matches!(s.label("mode"), Some("idle" | "iowait")) {
                    busy += s.value;
                }
            }
            "node_memory_MemTotal_bytes" => r.memory_total = Some(s.value),
            "node_memory_MemAvailable_bytes" => r.memory_available = Some(s.value),
            "node_load1" => r.load[0] = Some(s.value),
            "node_load5" => r.load[1] = Some(s.value),
            "node_load15" => r.load[2] = Some(s.value),
            "node_filesystem_size_bytes" | "node_filesystem_avail_bytes" => {
                if let Some(mount) = s.label("mountpoint") {
                    let entry = r.disks.entry(mount.to_owned()).or_insert((0.0, 0.0));
                    if s.name.ends_with("size_bytes") {
                        entry.0 = s.value;
                    } else {
                        entry.1 = s.value;
                    }
                }
            }
            _ => {}
        }
    }
    if total > 0.0 {
        r.cpu = Some((busy, total));
    }
    if r.memory_total.is_none() && r.load[0].is_none() {
        return Err(RoundError::new(
            "incomplete_data",
            format!(
                "{url} has none of node_memory_MemTotal_bytes, node_load1: not a node exporter?"
            ),
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host_twice() {
        let probe = System.prepare(&json!({})).unwrap();
        let first = probe.round(&Value::Null);
        let data = first.outcome.clone().unwrap();
        assert!(data["memory_total_bytes"].as_f64().unwrap() > 0.0);
        assert!(data["load1"].is_number());
        assert!(data["cpu_percent"].is_null());
        assert!(data["disks"].as_object().is_some());
        let second = probe.round(&first.state);
        let cpu = second.outcome.unwrap()["cpu_percent"].as_f64();
        assert!(cpu.is_none_or(|c| (0.0..=100.0).contains(&c)), "{cpu:?}");
        assert!(
            System
                .prepare(&json!({"node_exporter_url": "file:///x"}))
                .is_err()
        );
        assert!(System.prepare(&json!({"disk": "/"})).is_err());
    }
}
