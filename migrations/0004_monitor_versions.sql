-- The last version of each monitor name that was removed. A monitor added again under the
-- same name continues from it, so a round of the removed monitor still running (or a
-- foreman's cached config of it) can never be taken for the new one's: versions of a name
-- never repeat (src/monitor/store.rs).
CREATE TABLE monitor_retired (
    name    TEXT    PRIMARY KEY,
    version INTEGER NOT NULL
);
