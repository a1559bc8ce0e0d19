-- Results are kept for a configurable time; then their files are deleted and the task says so.
ALTER TABLE tasks ADD COLUMN expired_at timestamptz;
CREATE INDEX tasks_finished_idx ON tasks (finished_at)
    WHERE status IN ('succeeded', 'failed', 'canceled') AND expired_at IS NULL;
