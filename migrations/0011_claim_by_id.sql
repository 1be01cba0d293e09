-- Tasks due now are claimed in id order, without an index of their own (issue 15,
-- BENCHMARKS.md). `tasks_due` indexed every row by its due time, so every claim wrote one
-- of its pages besides the table's: with the task records, a claim wrote three pages
-- where it had written two. Now only delayed rows (`run_at` set) are indexed, by due
-- time; a row with `run_at` NULL is due now (as it always meant) and waits in the table's
-- own order, the order it was stored in, which its id gives. The claim walks the table
-- from the lowest id that may still hold one (src/queue.rs, `Cursor`) and merges it with
-- the delayed rows that have come due.
--
-- Rows written back under their old id (a retry, a rescue, a release) carry a `run_at`,
-- so they are found through this index however low their id.
DROP INDEX tasks_due;
CREATE INDEX tasks_delayed ON tasks (run_at, id) WHERE run_at IS NOT NULL;
