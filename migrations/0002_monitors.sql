-- Monitors: one row per named monitor. The schedule (`next_due`) and the last result live
-- only here, so a restart or `kill -9` of the foreman loses neither (src/monitor/store.rs).
-- Times are Unix microseconds.
CREATE TABLE monitors (
    name             TEXT    PRIMARY KEY,
    kind             TEXT    NOT NULL,
    config           TEXT    NOT NULL,            -- JSON, validated by the kind
    interval_us      INTEGER NOT NULL CHECK (interval_us > 0),
    -- Bumped by every update; a round's result is recorded only if its version is current.
    version          INTEGER NOT NULL DEFAULT 1,
    enabled          INTEGER NOT NULL DEFAULT 1,
    next_due         INTEGER NOT NULL,
    -- What the last round left for the next one (the Chainlink kind's last good source).
    state            TEXT    NOT NULL DEFAULT 'null',
    last_ok          INTEGER,                     -- 1 ok, 0 error, NULL never ran
    last_summary     TEXT,
    last_error       TEXT,
    last_run_at      INTEGER,
    last_duration_ms REAL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

CREATE INDEX monitors_due ON monitors (next_due) WHERE enabled = 1;
