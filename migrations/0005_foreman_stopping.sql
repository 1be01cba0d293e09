-- A foreman's graceful stop, for `snapq status` and the live page: NULL while it runs;
-- from SIGTERM on, the time (Unix microseconds) by which it exits whatever still runs.
ALTER TABLE foremen ADD COLUMN stop_deadline INTEGER;
