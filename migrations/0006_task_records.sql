-- Every task leaves a record (README, "What happened to a task"). The claim that deletes a
-- task's queue row writes its record, state 'running', in the same transaction; its end
-- writes the final state, batched into a later transaction of the foreman's. The queue
-- row's id is the record's id: an id names one task forever.
--
-- Times are Unix microseconds. Columns for what later features fill (exit code, signal,
-- output tail, attempts) are here from the start, NULL until then.
CREATE TABLE task_records (
    id          INTEGER PRIMARY KEY,
    task_name   TEXT    NOT NULL,
    args        TEXT    NOT NULL,
    kwargs      TEXT    NOT NULL,
    enqueued_at INTEGER NOT NULL,
    due_at      INTEGER NOT NULL,
    started_at  INTEGER,
    finished_at INTEGER,
    -- running, succeeded, failed, panicked, rejected, abandoned, lost, cancelled
    state       TEXT    NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 1,
    foreman_pid INTEGER,
    host        TEXT,
    error       TEXT,
    exit_code   INTEGER,
    signal      TEXT,
    output      TEXT
);

-- No secondary index: every one would be written twice a task (at the claim and at the
-- end) on the drain's hot path, and the readers do not need one. `history` walks the table
-- newest id first and stops at its limit; `mark_lost` scans it once when a foreman starts.
