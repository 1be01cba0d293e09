//! Logging: tracing to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON.

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber. Colour only on a terminal; no timestamps of our own
/// when journald, which adds its own, reads stderr (`JOURNAL_STREAM` is set by systemd).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(crate::cli::stderr_is_terminal());
    // A second init (a test calling `cli::execute` twice) keeps the first subscriber.
    let _ = match (format, under_journald) {
        (LogFormat::Text, false) => builder.try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
    };
}

/// Sends panic reports through the log (one line, with the thread and location) instead
/// of the default multi-line message on stderr. A task's panic is also reported by its
/// worker as "task panicked" with the task's id (src/pool.rs).
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = crate::pool::panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            thread = thread.name().unwrap_or("?"),
            location,
            "panic: {message}"
        );
    }));
}
