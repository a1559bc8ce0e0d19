-- Indexes for the hot queries (measured with EXPLAIN ANALYZE at 1M tasks, see docs/performance.md).

-- Every POST counts the account's interactive tasks in flight: without this it was a parallel
-- sequential scan of the whole table (306 ms at 1M rows).
CREATE INDEX tasks_active_idx ON tasks (account_id)
    WHERE status IN ('queued', 'running') AND batch_id IS NULL;

-- GET /tasks?status=… walks the account's tasks of one status newest first.
CREATE INDEX tasks_account_status_listing_idx ON tasks (account_id, status, created_at DESC, id DESC);
