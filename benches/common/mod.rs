//! What several benchmarks share (each bench is its own crate: `#[path]`-included).

/// A figure beside its target: `[target ≥ 60000 tasks/s: met]`, or how far it missed.
pub fn verdict(value: f64, target: f64, higher_is_better: bool, unit: &str) -> String {
    let met = if higher_is_better {
        value >= target
    } else {
        value <= target
    };
    let sign = if higher_is_better { "≥" } else { "≤" };
    if met {
        format!("[target {sign} {target} {unit}: met]")
    } else {
        let gap = 100.0 * (value - target).abs() / target;
        format!("[target {sign} {target} {unit}: MISSED by {gap:.0}%]")
    }
}

/// Runs `cmd` to its end, asserting it succeeded (its stderr in the message); how long it
/// took.
pub fn run_ok(cmd: &mut std::process::Command) -> std::time::Duration {
    let started = std::time::Instant::now();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}
