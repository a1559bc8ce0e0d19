-- Bulk conversion: one row per batch (a run of jobs/bulk_convert.py over one source). Its items
-- are the tasks carrying its batch_id; photos refused before queueing are counted here, by code,
-- since they never become tasks.
CREATE TABLE batches (
    account_id  text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    id          text NOT NULL,
    source      text NOT NULL DEFAULT '',
    options     jsonb NOT NULL DEFAULT '{}'::jsonb,
    total       integer,                                  -- items in the source; NULL while counting
    rejected    jsonb NOT NULL DEFAULT '{}'::jsonb,       -- error code -> items refused
    status      text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'completed', 'failed', 'stopped')),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    PRIMARY KEY (account_id, id)
);
CREATE INDEX batches_listing_idx ON batches (account_id, created_at DESC, id DESC);

-- The batch summary counts its tasks by status; the job polls its items in flight.
CREATE INDEX tasks_account_batch_idx ON tasks (account_id, batch_id, status)
    WHERE batch_id IS NOT NULL;
