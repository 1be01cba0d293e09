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
fn the_foreman_speaks_the_notify_protocol_and_its_watchdog_stops_with_the_loop() {
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

    // Block the loop: hold the database's write lock, then wake the foreman, whose claim
    // now waits for the lock. A blocked loop must not tell systemd it is alive.
    let conn = home.conn();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    std::fs::write(home.file("wakeup").join("block"), "").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let blocked_from = Instant::now();
    std::thread::sleep(Duration::from_millis(1200));
    let during = times_of(&received, "WATCHDOG=1")
        .into_iter()
        .filter(|t| *t > blocked_from && *t < blocked_from + Duration::from_millis(1200))
        .count();
    assert_eq!(during, 0, "WATCHDOG=1 sent while the loop was blocked");
    conn.execute_batch("COMMIT").unwrap();
    let released = Instant::now();
    assert!(
        wait_until(Duration::from_secs(2), || times_of(&received, "WATCHDOG=1")
            .iter()
            .any(|t| *t > released)),
        "the watchdog did not resume"
    );

    foreman.stop();
    assert!(wait_until(Duration::from_secs(2), || !times_of(
        &received,
        "STOPPING=1"
    )
    .is_empty()));
}
