-- Command tasks (README, "Your own tasks"): a record's `output` holds the tail of the
-- command's stdout and stderr, as the bytes came (a BLOB, not always UTF-8), and this says
-- whether earlier output was dropped to keep the tail within the task's `output_bytes`.
-- `state` may now also be 'timed_out'.
ALTER TABLE task_records ADD COLUMN output_truncated INTEGER;
