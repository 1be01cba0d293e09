//! The foreman's signals: SIGTERM and SIGINT (stop), SIGHUP (reload). The signal path
//! only records and pokes (STYLE 3): signal-hook's handler writes to a self-pipe, the
//! `snapq-signals` thread reads it and forwards the number to the loop's channel, where
//! the loop takes it like any other event (src/foreman.rs, invariant 8).

use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, unbounded};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::error::{Error, Result};

/// The signal path only records and pokes (STYLE 3): signal-hook's handler writes to a
/// self-pipe, this thread reads it and forwards the number to the loop's channel.
pub(crate) struct SignalThread {
    /// The signals received, in order: one message each.
    pub rx: Receiver<i32>,
    handle: Handle,
    /// Joined on drop, after `handle.close()` ends its iteration.
    thread: Option<JoinHandle<()>>,
}

impl SignalThread {
    /// Installs the handlers (from here on SIGTERM is the foreman's to handle, never the
    /// default death) and starts the thread.
    pub fn start() -> Result<SignalThread> {
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
            .map_err(|e| Error::Runtime(format!("cannot install signal handlers: {e}")))?;
        let handle = signals.handle();
        // Unbounded, but it carries one message per signal received.
        let (tx, rx) = unbounded();
        let thread = std::thread::Builder::new()
            .name("snapq-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if tx.send(signal).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::Runtime(format!("cannot start the signal thread: {e}")))?;
        Ok(SignalThread {
            rx,
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for SignalThread {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
