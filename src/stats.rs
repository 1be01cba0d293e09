//! `snapq stats`: a summary of the telemetry CSV files of every process that wrote to the
//! telemetry directory.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::clock::format_micros;
use crate::error::{Error, Result};
use crate::telemetry::{HEADER, now_ns};

/// Count, mean and nearest-rank percentiles of one label's values (seconds).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Summarises `values` (any order). The p-th percentile is the nearest-rank value: the
    /// smallest value with at least p% of the values at or below it.
    pub fn of(values: &mut [f64]) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let rank = |p: f64| values[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Some(Summary {
            count: n,
            mean: values.iter().sum::<f64>() / n as f64,
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: values[n - 1],
        })
    }
}

/// The latest value of a runtime figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latest {
    pub value: f64,
    pub at: String,
    pub pid: u32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub dir: String,
    /// Durations and waits by label (`task:noop`, `wait:noop`, …), in seconds.
    pub durations: BTreeMap<String, Summary>,
    /// The latest runtime figures by label (`rss_bytes`, …).
    pub runtime: BTreeMap<String, Latest>,
}

/// Reads every telemetry file in `dir`, keeping samples no older than `since` (ns ago).
pub fn read(dir: &Path, since: Option<std::time::Duration>) -> Result<Stats> {
    let cutoff = since.map_or(i64::MIN, |d| {
        now_ns().saturating_sub(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    });
    let mut stats = Stats {
        dir: dir.display().to_string(),
        ..Stats::default()
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(stats),
        Err(e) => return Err(Error::io("reading the telemetry directory", dir)(e)),
    };
    let mut durations: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut latest: BTreeMap<String, (i64, Latest)> = BTreeMap::new();
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let runtime = name.starts_with("runtime-");
        if !(runtime || name.starts_with("duration-")) || !name.ends_with(".csv") {
            continue;
        }
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .flexible(false)
            .from_path(&path)
            .map_err(|e| Error::BadInput {
                what: format!("telemetry file {}", path.display()),
                message: e.to_string(),
            })?;
        let header: Vec<String> = match reader.headers() {
            Ok(h) => h.iter().map(str::to_owned).collect(),
            Err(_) => continue,
        };
        // Trimmed: files snapq wrote before 2026-12-02 had a space after each comma.
        if !header.iter().map(String::as_str).eq(HEADER.split(',')) {
            if !header.is_empty() {
                tracing::warn!(path = %path.display(), "skipping a file whose header is not {HEADER:?}");
            }
            continue;
        }
        for record in reader.records() {
            // A row cut short by a crash mid-write is skipped, not fatal.
            let Ok(record) = record else { continue };
            let (Some(at), Some(value), Some(label), Some(pid)) = (
                record.get(0).and_then(|v| v.parse::<i64>().ok()),
                record.get(1).and_then(|v| v.parse::<f64>().ok()),
                record.get(2),
                record.get(3).and_then(|v| v.parse::<u32>().ok()),
            ) else {
                continue;
            };
            if at < cutoff {
                continue;
            }
            if runtime {
                let entry = latest.entry(label.to_owned());
                let fresh = (
                    at,
                    Latest {
                        value,
                        at: format_micros(at / 1_000),
                        pid,
                    },
                );
                match entry {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(fresh);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if o.get().0 <= at {
                            o.insert(fresh);
                        }
                    }
                }
            } else {
                durations.entry(label.to_owned()).or_default().push(value);
            }
        }
    }
    for (label, mut values) in durations {
        if let Some(summary) = Summary::of(&mut values) {
            stats.durations.insert(label, summary);
        }
    }
    stats.runtime = latest.into_iter().map(|(k, (_, v))| (k, v)).collect();
    Ok(stats)
}

impl Stats {
    pub fn is_empty(&self) -> bool {
        self.durations.is_empty() && self.runtime.is_empty()
    }

    /// The text `snapq stats` prints; durations in milliseconds.
    pub fn render(&self) -> String {
        if self.is_empty() {
            return format!(
                "no telemetry in {} yet: it is written by a running foreman (`snapq run`, \
                 telemetry is on unless --no-telemetry) every few seconds and when it stops\n",
                self.dir
            );
        }
        let mut out = String::new();
        if !self.durations.is_empty() {
            let width = self
                .durations
                .keys()
                .map(String::len)
                .max()
                .unwrap_or(5)
                .max(5);
            out.push_str(&format!(
                "{:width$}  {:>9}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}\n",
                "label", "count", "mean ms", "p50 ms", "p95 ms", "p99 ms", "max ms"
            ));
            for (label, s) in &self.durations {
                out.push_str(&format!(
                    "{label:width$}  {:>9}  {:>10.3}  {:>10.3}  {:>10.3}  {:>10.3}  {:>10.3}\n",
                    s.count,
                    s.mean * 1e3,
                    s.p50 * 1e3,
                    s.p95 * 1e3,
                    s.p99 * 1e3,
                    s.max * 1e3
                ));
            }
        }
        if !self.runtime.is_empty() {
            out.push_str("\nlatest runtime figures:\n");
            for (label, l) in &self.runtime {
                let value = if label == "rss_bytes" {
                    format!("{:.1} MiB", l.value / (1024.0 * 1024.0))
                } else {
                    format!("{}", l.value)
                };
                out.push_str(&format!(
                    "  {label:20} {value:>12}  (pid {}, {})\n",
                    l.pid, l.at
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_by_hand() {
        // 1..=20: p50 is the 10th value, p95 the 19th, p99 the 20th.
        let mut values: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        let s = Summary::of(&mut values).unwrap();
        assert_eq!(s.count, 20);
        assert_eq!(s.mean, 10.5);
        assert_eq!((s.p50, s.p95, s.p99, s.max), (10.0, 19.0, 20.0, 20.0));
        let mut one = vec![0.25];
        let s = Summary::of(&mut one).unwrap();
        assert_eq!((s.p50, s.p99, s.max), (0.25, 0.25, 0.25));
        assert!(Summary::of(&mut []).is_none());
    }
}
