-- Schedules (README, "Schedules"): one row per named schedule. The next tick (`next_fire`)
-- lives only here, and the foreman moves it on in the transaction that enqueues the tick's
-- task (src/schedules.rs): two foremen, a restart or a crash can never fire a tick twice
-- or skip one silently. Times are Unix microseconds.
CREATE TABLE schedules (
    name         TEXT    PRIMARY KEY,
    -- Either a 5-field cron expression with its IANA zone, or an interval.
    cron         TEXT,
    tz           TEXT,
    every_us     INTEGER CHECK (every_us > 0),
    task_name    TEXT    NOT NULL,
    args         TEXT    NOT NULL DEFAULT '[]',
    kwargs       TEXT    NOT NULL DEFAULT '{}',
    catch_up     TEXT    NOT NULL DEFAULT 'one' CHECK (catch_up IN ('none', 'one', 'all')),
    jitter_us    INTEGER NOT NULL DEFAULT 0 CHECK (jitter_us >= 0),
    paused       INTEGER NOT NULL DEFAULT 0,
    -- The nominal time of the next tick to fire.
    next_fire    INTEGER NOT NULL,
    -- The last tick fired, and the task it enqueued.
    last_fire    INTEGER,
    last_task_id INTEGER,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    CHECK ((cron IS NULL) != (every_us IS NULL))
);

CREATE INDEX schedules_due ON schedules (next_fire) WHERE paused = 0;
