//! Delayed tasks run no earlier than due and within 50 ms after.

use std::time::{Duration, Instant};

use crate::support::{Home, wait_until};

#[test]
fn delayed_tasks_run_on_time() {
    let home = Home::new();
    let foreman = home.start(&[]);
    let mut expected = Vec::new();
    for (i, delay) in [0.3, 0.7, 0.7, 1.1].into_iter().enumerate() {
        let out = home.file(&format!("delayed-{i}.txt"));
        let args = format!("{{\"path\":{:?},\"line\":\"x\"}}", out.to_str().unwrap());
        let before = Instant::now();
        let id: i64 = home
            .ok(&[
                "enqueue",
                "append",
                "--kwargs",
                &args,
                "--delay",
                &delay.to_string(),
            ])
            .trim()
            .parse()
            .unwrap();
        expected.push((id, out, before + Duration::from_secs_f64(delay)));
    }
    // One by absolute time too.
    let at_out = home.file("at.txt");
    // The instant is read first, so the true due time is no earlier than `at_due`.
    let at_due = Instant::now() + Duration::from_micros(900_000);
    let at_micros = snapq::clock::now_micros() + 900_000;
    let at = snapq::clock::format_micros(at_micros);
    let args = format!("{{\"path\":{:?},\"line\":\"x\"}}", at_out.to_str().unwrap());
    let at_id: i64 = home
        .ok(&["enqueue", "append", "--kwargs", &args, "--at", &at])
        .trim()
        .parse()
        .unwrap();
    expected.push((at_id, at_out, at_due));

    for (id, out, due) in &expected {
        assert!(
            wait_until(Duration::from_secs(5), || out.exists()),
            "task {id} never ran"
        );
        // Seen from outside: the file did not appear before the task was due.
        assert!(Instant::now() >= *due, "task {id} ran early");
    }
    for (id, _, _) in &expected {
        // The file can appear before the log line reaches our reader: wait for the line.
        let start = |f: &crate::support::Foreman| {
            f.events("task started")
                .into_iter()
                .find(|e| e["id"] == *id)
        };
        assert!(
            wait_until(Duration::from_secs(5), || start(&foreman).is_some()),
            "no start logged for task {id}"
        );
        let event = start(&foreman).unwrap();
        // Seen by the foreman: start time minus due time.
        let late_ms = event["late_ms"].as_f64().unwrap();
        assert!(
            (0.0..=50.0).contains(&late_ms),
            "task {id} started {late_ms} ms after its due time:\n{}",
            foreman.log_text()
        );
    }
}
