//! The test plays systemd: a real datagram socket as NOTIFY_SOCKET, a watchdog interval in
//! WATCHDOG_USEC, and the real foreman.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{Foreman, Home, wait_until};

/// Every datagram received, with when it came.
type Received = Arc<Mutex<Vec<(Instant, String)>>>;

fn listen(path: &std::path::Path) -> Received {
    let socket = UnixDatagram::bind(path).unwrap();
    let received: Received = Arc::default();
    let sink = Arc::clone(&received);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.lock().unwrap().push((Instant::now(), text));
        }
    });
    received
}

fn times_of(received: &Received, line: &str) -> Vec<Instant> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == line))
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn the_foreman_speaks_the_notify_protocol() {
    let home = Home::new();
    let socket = home.file("notify.sock");
    let received = listen(&socket);
    let mut cmd = home.cmd();
    cmd.env("NOTIFY_SOCKET", &socket)
        .env("WATCHDOG_USEC", "300000")
        .args(["run", "--log-format", "json"]);
    let mut foreman = Foreman::spawn(cmd);

    assert!(wait_until(Duration::from_secs(5), || !times_of(
        &received, "READY=1"
    )
    .is_empty()));
    {
        let all = received.lock().unwrap();
        let (_, first) = &all[0];
        assert!(first.contains("READY=1"), "the first message was {first:?}");
        assert!(first.contains("STATUS=0 of 4 workers busy"), "{first:?}");
    }
    // WATCHDOG=1 every half of 300 ms.
    assert!(wait_until(Duration::from_secs(5), || times_of(
        &received,
        "WATCHDOG=1"
    )
    .len()
        >= 8));
    let beats = times_of(&received, "WATCHDOG=1");
    let gaps: Vec<f64> = beats
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    assert!(
        (0.10..=0.25).contains(&mean),
        "WATCHDOG=1 every {mean:.3} s, not 0.15"
    );

    foreman.stop();
    assert!(wait_until(Duration::from_secs(2), || !times_of(
        &received,
        "STOPPING=1"
    )
    .is_empty()));
}

/// Issue 13, item 5: another process holding the write lock (a long bulk enqueue, a backup,
/// sqlite3 left in a transaction) does not stop the loop. The watchdog keeps being fed, STATUS=
/// says the database is busy, `status` still finds the foreman, and the rows committed when
/// the lock is released run.
#[test]
fn a_held_write_lock_does_not_stop_the_loop_or_its_watchdog() {
    let home = Home::new();
    let out = home.file("out.txt");
    let socket = home.file("notify.sock");
    let received = listen(&socket);
    let mut cmd = home.cmd();
    // systemd's WatchdogSec=2: a ping at least every second.
    cmd.env("NOTIFY_SOCKET", &socket)
        .env("WATCHDOG_USEC", "2000000")
        .args(["run", "--log-format", "json"]);
    let mut foreman = Foreman::spawn(cmd);
    assert!(wait_until(Duration::from_secs(5), || !times_of(
        &received, "READY=1"
    )
    .is_empty()));

    // Hold the lock for 6 s (systemd's default WatchdogSec in the unit is 10 s; the old
    // busy wait held the loop 10 s), with rows written inside the held transaction, and
    // wake the foreman so that it tries to claim.
    let conn = home.conn();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let kwargs = serde_json::json!({"path": out, "line": "after"}).to_string();
    conn.execute(
        "INSERT INTO tasks (task_name, kwargs) VALUES ('append', ?1)",
        [&kwargs],
    )
    .unwrap();
    std::fs::write(home.file("wakeup").join("held"), "").unwrap();
    let held_from = Instant::now();
    let mut status_during = None;
    while held_from.elapsed() < Duration::from_secs(6) {
        if status_during.is_none() && held_from.elapsed() > Duration::from_secs(4) {
            status_during = Some(home.snapq(&["status", "--json"]));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let held_until = Instant::now();
    conn.execute_batch("COMMIT").unwrap();

    let mut pings = times_of(&received, "WATCHDOG=1");
    pings.retain(|t| *t > held_from && *t < held_until);
    let mut edges = vec![held_from];
    edges.extend(pings);
    edges.push(held_until);
    let longest = edges
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .fold(0.0, f64::max);
    assert!(
        longest < 1.5,
        "no WATCHDOG=1 for {longest:.2} s while the database was busy:\n{}",
        foreman.log_text()
    );
    let said_busy = received
        .lock()
        .unwrap()
        .iter()
        .any(|(t, m)| *t > held_from && m.contains("database busy for"));
    assert!(said_busy, "no STATUS= said the database was busy");
    let status = status_during.unwrap();
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["foreman"]["pid"],
        foreman.pid(),
        "status did not find the foreman while the database was busy: {status}"
    );
    assert!(
        foreman.has_log("the database is busy"),
        "{}",
        foreman.log_text()
    );

    // The row committed at the release runs without another wake-up.
    assert!(
        wait_until(Duration::from_secs(3), || crate::support::read_lines(&out)
            == ["after"]),
        "{}",
        foreman.log_text()
    );
    assert!(wait_until(Duration::from_secs(3), || foreman
        .has_log("the database is free again")));
    foreman.stop();
}

/// Issue 13, item 12: sourcing `systemd/snapq.env` as README says gives an enqueuer the
/// service's paths, the same ones the unit sets for the service.
#[test]
fn the_env_file_gives_enqueuers_the_services_paths() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let out = std::process::Command::new("bash")
        .args([
            "-c",
            "env -i bash -c 'set -a; . \"$1\"; set +a; env' sh \"$0\"",
            dir.join("snapq.env").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let sourced: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("SNAPQ_"))
        .map(str::to_owned)
        .collect();
    let unit = std::fs::read_to_string(dir.join("snapq.service")).unwrap();
    let from_unit: Vec<String> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(str::to_owned)
        .collect();
    for needed in ["SNAPQ_HOME=", "SNAPQ_WAKEUP_DIR=", "SNAPQ_PID_FILE="] {
        let value = sourced.iter().find(|l| l.starts_with(needed));
        assert!(
            value.is_some(),
            "sourcing snapq.env sets no {needed}: {sourced:?}"
        );
        assert!(
            from_unit.contains(value.unwrap()),
            "snapq.env's {} differs from the unit's {from_unit:?}",
            value.unwrap()
        );
    }
}
