//! The library's one error type. Every message says what is wrong and what to do; paths,
//! ids and line numbers travel as data. `exit_code` is the only place that maps an error to
//! the process's exit status (SPEC: 2 bad usage or input, 3 tasks of a `--burst` run
//! failed, 1 anything else).

use std::path::PathBuf;

/// Everything snapq can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A task name that no registry knows.
    #[error("unknown task {name:?}; known tasks: {known} (see `snapq tasks`)")]
    UnknownTask { name: String, known: String },

    /// Arguments that do not fit the task's declared parameters.
    #[error("bad arguments for task {task:?}: {message}")]
    BadArguments { task: String, message: String },

    /// A command-line value or a document that cannot be used as it is.
    #[error("bad {what}: {message}")]
    BadInput { what: String, message: String },

    /// One line of a bulk JSON Lines input is bad; nothing from the input was stored.
    #[error("line {line} of {source_name}: {error}; nothing was enqueued, fix the line and retry")]
    BadLine {
        line: usize,
        source_name: String,
        error: Box<Error>,
    },

    /// The database file exists but is not a usable snapq database.
    #[error("{path}: {reason}; the file was not modified")]
    BadDatabase { path: PathBuf, reason: String },

    /// The database was written by a newer snapq.
    #[error(
        "{path}: schema version {found} is newer than this snapq supports ({supported}); \
         upgrade snapq, the file was not modified"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    /// A path given (or defaulted) that cannot be used as the role it is given.
    #[error("{role} {path}: {problem}")]
    BadPath {
        role: &'static str,
        path: PathBuf,
        problem: String,
    },

    /// Another foreman holds the pid file.
    #[error(
        "another snapq foreman (pid {pid}) is running with pid file {path}; stop it first, \
         or give this one its own --home or --pid-file"
    )]
    ForemanRunning { pid: i32, path: PathBuf },

    /// A SQLite failure while doing `context`.
    #[error("database {context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },

    /// An I/O failure on `path` while doing `context`.
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A failure of the machinery the foreman stands on (threads, signals, inotify).
    #[error("{0}")]
    Runtime(String),

    /// A task id that is neither queued nor recorded, or a task `cancel` cannot take back.
    #[error("{0}")]
    NotThere(String),

    /// An operation the queue backend in use cannot do (src/backend/mod.rs): the message
    /// names the backend and what to do instead. Nothing was changed.
    #[error("{0}")]
    Unsupported(String),

    /// `run --burst` ran every due task, and some of them did not succeed.
    #[error(
        "{failed} of {ran} tasks did not succeed (failed, panicked or rejected: see the log \
         above); the others ran"
    )]
    TasksFailed { failed: u64, ran: u64 },
}

impl Error {
    /// The process exit status for this error: 2 when the input (arguments, a file, a
    /// path) was wrong and nothing was written, 1 for faults of the environment.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::UnknownTask { .. }
            | Error::BadArguments { .. }
            | Error::BadInput { .. }
            | Error::BadLine { .. }
            | Error::BadDatabase { .. }
            | Error::SchemaTooNew { .. }
            | Error::BadPath { .. }
            | Error::Unsupported(_) => 2,
            Error::ForemanRunning { .. }
            | Error::Sqlite { .. }
            | Error::Io { .. }
            | Error::Runtime(_)
            | Error::NotThere(_) => 1,
            Error::TasksFailed { .. } => 3,
        }
    }

    /// Whether this is SQLite saying another connection holds the lock it needs (after the
    /// connection's busy handler gave up).
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Sqlite { source, .. }
            if matches!(source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)))
    }

    pub(crate) fn sqlite(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Error {
        let context = context.into();
        move |source| Error::Sqlite { context, source }
    }

    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            context,
            path,
            source,
        }
    }

    pub(crate) fn bad_input(what: impl Into<String>, message: impl Into<String>) -> Error {
        Error::BadInput {
            what: what.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
