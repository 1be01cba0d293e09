//! Opening the database: the one function that every connection goes through. It refuses
//! what it must not touch (a directory, a corrupt file, a newer schema) before it writes
//! anything, sets each pragma and reads it back (SQLite ignores a misspelt pragma in
//! silence), and applies the embedded migrations in order by `PRAGMA user_version`.

use std::path::Path;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::error::{Error, Result};

/// The schema, in order. The version of a database is the number of migrations applied.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_queue", include_str!("../migrations/0001_queue.sql")),
    (
        "0002_monitors",
        include_str!("../migrations/0002_monitors.sql"),
    ),
    ("0003_outbox", include_str!("../migrations/0003_outbox.sql")),
    (
        "0004_monitor_versions",
        include_str!("../migrations/0004_monitor_versions.sql"),
    ),
    (
        "0005_foreman_stopping",
        include_str!("../migrations/0005_foreman_stopping.sql"),
    ),
    (
        "0006_task_records",
        include_str!("../migrations/0006_task_records.sql"),
    ),
    (
        "0007_panic_configs",
        include_str!("../migrations/0007_panic_configs.sql"),
    ),
    (
        "0008_command_output",
        include_str!("../migrations/0008_command_output.sql"),
    ),
    (
        "0009_schedules",
        include_str!("../migrations/0009_schedules.sql"),
    ),
    (
        "0010_retries",
        include_str!("../migrations/0010_retries.sql"),
    ),
    (
        "0011_claim_by_id",
        include_str!("../migrations/0011_claim_by_id.sql"),
    ),
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a writer waits for the write lock before it reports the database as busy.
/// Four enqueuer processes and a foreman never come near it (tests/it/race.rs).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a commit survives; `--synchronous`. Both run in WAL mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Synchronous {
    /// Every commit is fsynced to the WAL: a committed enqueue or claim survives power
    /// loss and an OS crash.
    #[default]
    Full,
    /// Commits reach the OS but are fsynced only at checkpoints: they survive a crash or
    /// `kill -9` of any process, but power loss may roll back the last commits (an enqueue
    /// may vanish; a claimed task may be claimed again after the reboot).
    Normal,
}

impl Synchronous {
    fn pragma_value(self) -> i64 {
        match self {
            Synchronous::Full => 2,
            Synchronous::Normal => 1,
        }
    }
}

/// Opens (creating if needed) the snapq database at `path`, verified and migrated.
pub fn open(path: &Path, synchronous: Synchronous) -> Result<Connection> {
    if path.is_dir() {
        return Err(Error::BadPath {
            role: "database",
            path: path.to_owned(),
            problem: "is a directory; give --db a file path (e.g. DIR/snapq.sqlite3)".into(),
        });
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::BadPath {
            role: "database directory",
            path: parent.to_owned(),
            problem: format!("cannot be created ({e}); choose a writable --home or --db"),
        })?;
    }
    create_shared(path)?;
    // Several processes opening a fresh file at once (a foreman starting, `status`, enqueuers)
    // race to switch it to WAL and to create the schema. Some of those steps get SQLite's
    // BUSY without its busy handler being asked (SQLite returns it at once where waiting
    // could deadlock), which made a reader fail with "database is locked" right after a
    // foreman started (issue 13, item 19; reproduced with 4 enqueues and 4 statuses on a
    // fresh home). The whole opening is tried again until BUSY_TIMEOUT.
    let started = std::time::Instant::now();
    loop {
        match open_once(path, synchronous) {
            Err(e) if e.is_busy() && started.elapsed() < BUSY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            result => return result,
        }
    }
}

/// Creates a missing database file so that it can be shared the way its directory is: in
/// a directory writable by its group (the service's /var/lib/snapq, mode 2770) the file
/// is made writable by that group and owned by the directory's group, whatever the
/// creating process's umask and primary group. SQLite gives the `-wal` and `-shm` files the
/// database file's mode, so members of the group can then enqueue (issue 13, item 11: an
/// enqueuer with umask 022 made a database the others could only read). Elsewhere the file
/// is left for SQLite to create as usual.
fn create_shared(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(group) = crate::config::sharing_group(path.parent().unwrap_or(Path::new("."))) else {
        return Ok(());
    };
    if path.exists() {
        return Ok(());
    }
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o660)
        .open(path)
    {
        Ok(file) => file,
        // Another process made it first; it made it the same way.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => {
            return Err(Error::BadPath {
                role: "database",
                path: path.to_owned(),
                problem: format!("cannot be created ({e}); check the directory's permissions"),
            });
        }
    };
    crate::config::share_with(&file, group, 0o660)
        .map_err(Error::io("making the database group-writable", path))
}

fn open_once(path: &Path, synchronous: Synchronous) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| Error::BadPath {
        role: "database",
        path: path.to_owned(),
        problem: format!("cannot be opened ({e}); check the path and its permissions"),
    })?;
    conn.busy_handler(Some(busy_wait::<{ BUSY_TIMEOUT.as_millis() as u64 }>))
        .map_err(Error::sqlite("setting the busy handler"))?;
    // Plans that do not depend on bound values. Without this, SQLite marks a statement
    // whose plan could use a bound value (the claim's `LIMIT ?2`) for re-preparing
    // whenever its bindings are cleared — which the statement cache does after every run
    // — so the claim was parsed and planned again on every claim (BENCHMARKS.md,
    // "Profile of the drain"). Every query here is one indexed lookup or scan whose plan
    // does not depend on the values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(Error::sqlite("fixing query plans (QPSG)"))?;

    // A read first: a file that is not a database fails here, before any write could
    // touch it.
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| refuse(path, e))?;
    if found > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }

    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| refuse(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::BadDatabase {
            path: path.to_owned(),
            reason: format!(
                "cannot switch to WAL mode (journal mode is {mode}); WAL needs a local \
                 file system with shared memory, not a network share"
            ),
        });
    }
    set_and_verify(&conn, "synchronous", synchronous.pragma_value())?;
    migrate(&conn, path, found)?;
    Ok(conn)
}

/// SQLite's default busy handler sleeps in steps that grow to 100 ms, so a writer that
/// just missed the lock waits far longer than the lock is held (MEASUREMENTS.md: 0.2–0.9 s
/// for single inserts). The foreman's and an enqueuer's transactions last microseconds,
/// so short sleeps find the lock free much sooner. `MAX_MS` bounds the total wait.
fn busy_wait<const MAX_MS: u64>(attempt: i32) -> bool {
    const STEP_CAP: Duration = Duration::from_millis(1);
    let step = Duration::from_micros(50 << attempt.clamp(0, 5)).min(STEP_CAP);
    // Past the first few attempts each sleep is STEP_CAP long, so this bounds the total.
    let max_attempts = (MAX_MS as u128 * 1000 / STEP_CAP.as_micros()) as i32;
    if attempt >= max_attempts {
        return false;
    }
    std::thread::sleep(step);
    true
}

/// Makes `conn` give up on a held write lock after `LOOP_BUSY_TIMEOUT` instead of
/// `BUSY_TIMEOUT`: for the foreman loop's connections, which must keep turning (invariant
/// 11) and retry on their own schedule.
pub(crate) fn wait_briefly_when_busy(conn: &mut Connection) -> Result<()> {
    conn.busy_handler(Some(busy_wait::<{ LOOP_BUSY_TIMEOUT.as_millis() as u64 }>))
        .map_err(Error::sqlite("setting the busy handler"))
}

/// How long the foreman loop waits for a write lock another process holds before it goes
/// on with other work (and tries again later).
pub const LOOP_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

fn refuse(path: &Path, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => Error::BadDatabase {
            path: path.to_owned(),
            reason: "is not a SQLite database or is corrupt; move it aside (snapq creates a \
                     new one) or give --db another path"
                .into(),
        },
        Some(ErrorCode::ReadOnly) | Some(ErrorCode::CannotOpen) => Error::BadPath {
            role: "database",
            path: path.to_owned(),
            problem: format!("cannot be written ({e}); check its permissions"),
        },
        _ => Error::Sqlite {
            context: format!("opening {}", path.display()),
            source: e,
        },
    }
}

pub(crate) fn set_and_verify(conn: &Connection, pragma: &str, value: i64) -> Result<()> {
    conn.execute_batch(&format!("PRAGMA {pragma} = {value}"))
        .map_err(Error::sqlite(format!("setting PRAGMA {pragma}")))?;
    let read: i64 = conn
        .query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
        .map_err(Error::sqlite(format!("reading PRAGMA {pragma}")))?;
    if read != value {
        return Err(Error::Runtime(format!(
            "PRAGMA {pragma} reads {read} after setting it to {value}"
        )));
    }
    Ok(())
}

/// Runs `body` in a `BEGIN IMMEDIATE` transaction (the write lock taken first, so a busy
/// database fails at the start, not halfway): committed if it returns Ok, rolled back,
/// changing nothing, if it or the commit fails. `what` names the work in errors ("the
/// claim"). The statements come from the connection's cache: the loop runs this
/// thousands of times a second.
pub(crate) fn immediate<T>(
    conn: &Connection,
    what: &str,
    body: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let run = |sql: &str| conn.prepare_cached(sql)?.execute([]).map(drop);
    // The contexts are formatted only on an error: this is the drain's hot path.
    run("BEGIN IMMEDIATE").map_err(|e| Error::sqlite(format!("starting {what}"))(e))?;
    let result = body().and_then(|value| {
        run("COMMIT").map_err(|e| Error::sqlite(format!("committing {what}"))(e))?;
        Ok(value)
    });
    if result.is_err() && !conn.is_autocommit() {
        let _ = run("ROLLBACK");
    }
    result
}

fn migrate(conn: &Connection, path: &Path, found: i64) -> Result<()> {
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    // Two processes may open a fresh database at once: the write lock taken by BEGIN
    // IMMEDIATE orders them, and the version is read again under it.
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(Error::sqlite("starting the migration"))?;
    let result = (|| {
        let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        for (index, (_name, sql)) in MIGRATIONS.iter().enumerate() {
            let version = index as i64 + 1;
            if version > current {
                conn.execute_batch(sql)?;
                conn.execute_batch(&format!("PRAGMA user_version = {version}"))?;
            }
        }
        Ok::<_, rusqlite::Error>(())
    })();
    match result {
        Ok(()) => conn
            .execute_batch("COMMIT")
            .map_err(Error::sqlite("committing the migration")),
        Err(e)
            if matches!(
                e.sqlite_error_code(),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
            ) =>
        {
            let _ = conn.execute_batch("ROLLBACK");
            Err(Error::sqlite("applying the schema")(e))
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(Error::BadDatabase {
                path: path.to_owned(),
                reason: format!(
                    "is not a snapq database, or one damaged by hand: applying the schema \
                     failed ({e}); give --db another path"
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_file_gets_wal_sync_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite3");
        let conn = open(&path, Synchronous::Normal).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1);
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(conn);
        // Opening again is a no-op migration.
        open(&path, Synchronous::Full).unwrap();
    }

    #[test]
    fn garbage_and_newer_files_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.sqlite3");
        let junk = b"this is not a database, just some bytes\n".repeat(200);
        std::fs::write(&path, &junk).unwrap();
        let err = open(&path, Synchronous::Full).unwrap_err();
        assert!(matches!(err, Error::BadDatabase { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), junk);

        let newer = dir.path().join("newer.sqlite3");
        {
            let c = Connection::open(&newer).unwrap();
            c.execute_batch("PRAGMA user_version = 999").unwrap();
        }
        let before = std::fs::read(&newer).unwrap();
        let err = open(&newer, Synchronous::Full).unwrap_err();
        assert!(
            matches!(err, Error::SchemaTooNew { found: 999, .. }),
            "{err}"
        );
        assert_eq!(std::fs::read(&newer).unwrap(), before);
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path(), Synchronous::Full).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
