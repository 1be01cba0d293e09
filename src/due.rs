//! What comes due in the foreman's loop besides tasks: monitors' rounds and schedules'
//! ticks. Both are rows with a next time in the database, moved on in the transaction
//! that acts on them (src/monitor/store.rs, src/schedules.rs). For each kind the loop
//! keeps one `Due`: whether some row may be due now, and the earliest next time it read;
//! it waits until the earliest of them (`Foreman::deadline`), never polls.

use std::time::Duration;

use crate::clock::micros_of;

/// One kind of row that comes due at its own time.
#[derive(Debug)]
pub(crate) struct Due {
    /// Rows may be due now: set by a wake-up (the CLI changed rows), the safety re-read,
    /// when `next` passes, and when the loop stopped reading due rows before the end;
    /// cleared when the loop reads them.
    maybe: bool,
    /// The earliest next time the loop read (Unix µs).
    next: Option<i64>,
    /// How long after `next` the loop wakes for it (rounds wait a little, so that rounds
    /// due together start together).
    slack_us: i64,
    /// False in a `--burst` foreman: it acts on no rows of this kind.
    active: bool,
}

impl Due {
    pub fn new(active: bool, slack: Duration) -> Due {
        Due {
            maybe: active,
            next: None,
            slack_us: micros_of(slack),
            active,
        }
    }

    /// Rows may have changed (a wake-up, a reload), or more were due than the loop took.
    pub fn poke(&mut self) {
        self.maybe = self.active;
    }

    /// The loop's wait ended: rows may be due if `next` passed or on the safety re-read.
    pub fn check(&mut self, now: i64, safety: bool) {
        if self.active && (safety || self.next.is_some_and(|t| t <= now)) {
            self.maybe = true;
        }
    }

    pub fn maybe_due(&self) -> bool {
        self.maybe
    }

    /// The loop is reading the due rows now.
    pub fn take(&mut self) {
        self.maybe = false;
    }

    /// The earliest next time, as the loop read it (None: no row).
    pub fn set_next(&mut self, next: Option<i64>) {
        self.next = next;
    }

    /// When the loop must wake for this kind.
    pub fn wake_at(&self) -> Option<i64> {
        self.next.map(|t| t.saturating_add(self.slack_us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_comes_due_when_its_time_passes_or_it_is_poked() {
        let mut due = Due::new(true, Duration::from_millis(20));
        assert!(due.maybe_due());
        due.take();
        due.set_next(Some(1_000));
        assert_eq!(due.wake_at(), Some(21_000));
        due.check(999, false);
        assert!(!due.maybe_due());
        due.check(1_000, false);
        assert!(due.maybe_due());
        due.take();
        due.poke();
        assert!(due.maybe_due());
        // A burst foreman acts on none.
        let mut burst = Due::new(false, Duration::ZERO);
        burst.poke();
        burst.check(i64::MAX, true);
        assert!(!burst.maybe_due());
    }
}
