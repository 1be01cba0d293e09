//! The cost of recording one telemetry sample (issue 5): `cargo bench --bench telemetry`.
//!
//! Times 1,000,000 `Telemetry::record` calls one by one (each bracketed by `Instant::now`,
//! whose own cost is measured and reported beside), first from one thread, then from four
//! threads at once, with the telemetry thread writing buffers out as they fill.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use snapq::telemetry::{Running, Series};

const SAMPLES: usize = 1_000_000;

fn main() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-telemetry");
    let _ = std::fs::remove_dir_all(&dir);
    let running = Running::start(&dir).unwrap();
    let telemetry = Arc::clone(running.telemetry());

    let mut clock = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        clock.push(t.elapsed());
    }
    report(
        "Instant::now + elapsed alone (the timer's own cost)",
        &mut clock,
        None,
    );

    let label = telemetry.label("task:bench", Series::Duration);
    let mut one = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let t = Instant::now();
        telemetry.record(label, i as f64);
        one.push(t.elapsed());
    }
    report("record(), one thread", &mut one, Some(1.0));

    let mut four: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let telemetry = &telemetry;
                s.spawn(move || {
                    let mut own = Vec::with_capacity(SAMPLES / 4);
                    for i in 0..SAMPLES / 4 {
                        let t = Instant::now();
                        telemetry.record(label, i as f64);
                        own.push(t.elapsed());
                    }
                    own
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    report("record(), four threads at once", &mut four, Some(1.0));
    println!("samples dropped (writer behind): {}", telemetry.dropped());
    drop(telemetry);
    running.stop();
}

fn report(what: &str, times: &mut [Duration], target_us: Option<f64>) {
    times.sort();
    let at = |p: f64| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let verdict = match target_us {
        Some(t) if us(at(0.5)) <= t && us(at(0.99)) <= t => format!("  [target ≤ {t} µs: met]"),
        Some(t) => format!("  [target ≤ {t} µs: MISSED]"),
        None => String::new(),
    };
    println!(
        "{what}: median {:.3} µs, p99 {:.3} µs, max {:.1} µs{verdict}",
        us(at(0.5)),
        us(at(0.99)),
        us(times[times.len() - 1])
    );
}
