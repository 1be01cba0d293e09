//! The systemd notify protocol: READY=1 once the foreman can take work, STATUS= with its
//! figures, STOPPING=1 on a signal, and WATCHDOG=1 at half of `WATCHDOG_USEC`, sent from
//! the foreman loop itself, so a loop that stops turning is restarted by systemd. Without
//! `NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

pub struct Notifier {
    /// Half the watchdog interval systemd asked for, if it asked.
    watchdog_every: Option<Duration>,
    next_watchdog: Option<Instant>,
    last_status: String,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let watchdog_every = sd_notify::watchdog_enabled().map(|d| d / 2);
        if let Some(every) = watchdog_every {
            tracing::info!(
                every_ms = every.as_millis() as u64,
                "systemd watchdog enabled"
            );
        }
        Notifier {
            watchdog_every,
            next_watchdog: watchdog_every.map(|e| Instant::now() + e),
            last_status: String::new(),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }

    pub fn ready(&mut self, status: &str) {
        self.last_status = status.to_owned();
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// Sends STATUS= if it changed.
    pub fn status(&mut self, status: &str) {
        if status != self.last_status {
            self.last_status = status.to_owned();
            self.send(&[NotifyState::Status(status)]);
        }
    }

    pub fn stopping(&mut self, status: &str) {
        self.last_status = status.to_owned();
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// When the loop must wake to send WATCHDOG=1, if the watchdog is on.
    pub fn next_watchdog(&self) -> Option<Instant> {
        self.next_watchdog
    }

    /// Sends WATCHDOG=1 if it is due. Call it from the loop, every turn.
    pub fn watchdog(&mut self) {
        if let (Some(every), Some(next)) = (self.watchdog_every, self.next_watchdog) {
            let now = Instant::now();
            if now >= next {
                self.send(&[NotifyState::Watchdog]);
                self.next_watchdog = Some(now + every);
            }
        }
    }
}
