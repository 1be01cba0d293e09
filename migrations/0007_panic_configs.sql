-- Monitors started by PANIC's configurations (src/panic_configs.rs): NULL for monitors the
-- CLI made; for the others `panic:<base chain> <sub chain>`, the chain whose nodes_config
-- message is the whole truth about them. The CLI refuses to change these.
ALTER TABLE monitors ADD COLUMN managed_by TEXT;

-- What the configuration consumer did, for `snapq status`: one row while it runs.
CREATE TABLE panic_configs_status (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    queue TEXT NOT NULL,
    -- connecting | consuming | disconnected
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    received INTEGER NOT NULL DEFAULT 0,
    applied INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    last_rejection TEXT,
    updated_at INTEGER NOT NULL
);
