-- Retries (README, "Retries: at least once"). A task type with a retry policy is leased at
-- claim: its queue row is deleted and its record written `running` as for any task, and
-- the record, which names its foreman, is the lease. `max_attempts` says the claim was a
-- lease (NULL: at most once, as before). A failure, or the death of the lease's foreman,
-- writes the row back into `tasks` under the same id with `attempt` + 1, and the record
-- says `queued` until the next claim; after the last attempt the record is `dead`.
--
-- `attempt` is a new column of the public queue table, with a default: a writer that
-- never heard of it enqueues attempt 1, as before.
ALTER TABLE tasks ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE task_records ADD COLUMN max_attempts INTEGER;

-- `snapq status` counts the tasks waiting for their next attempt: few rows, so a partial
-- index, which an ordinary enqueue (attempt 1) does not write.
CREATE INDEX tasks_retrying ON tasks (id) WHERE attempt > 1;
