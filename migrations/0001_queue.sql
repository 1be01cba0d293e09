-- The queue. `tasks` is a public interface: programs in other languages insert rows here
-- directly (README, "Enqueueing without snapq"). Its columns and their meaning are part of
-- the contract; new columns must come with defaults.
--
-- Times are Unix microseconds. `run_at` NULL means "due at created_at", i.e. now.
-- AUTOINCREMENT keeps ids from being reused when the table empties, so a task id printed
-- by `snapq enqueue` names one task forever (logs, the live view's `task:<id>` channel).
CREATE TABLE tasks (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_name  TEXT    NOT NULL,
    args       TEXT    NOT NULL DEFAULT '[]',
    kwargs     TEXT    NOT NULL DEFAULT '{}',
    -- The default lets a shell writer omit it; julianday() works on every SQLite a writer
    -- may link (unixepoch('subsec') needs 3.42).
    created_at INTEGER NOT NULL
        DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
    run_at     INTEGER
);

-- The claim order: due time, then id. The claim and next-due queries use exactly this
-- expression so that SQLite walks the index instead of sorting (src/queue.rs).
CREATE INDEX tasks_due ON tasks (coalesce(run_at, created_at), id);

-- One row per live foreman, written by that foreman only, at least every second
-- (`snapq status` tells alive from stale by `beat_at`).
CREATE TABLE foremen (
    pid        INTEGER PRIMARY KEY,
    started_at INTEGER NOT NULL,
    beat_at    INTEGER NOT NULL,
    workers    INTEGER NOT NULL,
    running    INTEGER NOT NULL DEFAULT 0
);

-- The task names a foreman registered, with their declared parameters, recorded when it
-- starts, so that `snapq enqueue` and `snapq tasks` know the tasks of a program that embeds
-- snapq as a library.
CREATE TABLE task_types (
    name       TEXT PRIMARY KEY,
    summary    TEXT NOT NULL,
    params     TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
