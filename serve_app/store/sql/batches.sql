-- Named queries of bulk conversion batches (serve_app/store/batches.py).

-- name: start_batch
-- A rerun of the same batch (same id) picks it up again: running, no longer finished.
INSERT INTO batches (account_id, id, source, options)
VALUES (%(account_id)s, %(id)s, %(source)s, %(options)s)
ON CONFLICT (account_id, id) DO UPDATE
SET status = 'running', finished_at = NULL, source = EXCLUDED.source,
    options = EXCLUDED.options, updated_at = clock_timestamp()
RETURNING *;

-- name: update_batch
UPDATE batches
SET total = coalesce(%(total)s, total),
    rejected = coalesce(%(rejected)s, rejected),
    status = coalesce(%(status)s, status),
    finished_at = CASE WHEN coalesce(%(status)s, status) = 'running' THEN NULL
                       ELSE clock_timestamp() END,
    updated_at = clock_timestamp()
WHERE account_id = %(account_id)s AND id = %(id)s
RETURNING *;

-- name: batch_summary
-- One batch with its task counts; the account scopes it (another account's batch is not found).
SELECT b.*,
       count(t.id) FILTER (WHERE t.status = 'queued')    AS queued,
       count(t.id) FILTER (WHERE t.status = 'running')   AS running,
       count(t.id) FILTER (WHERE t.status = 'succeeded') AS succeeded,
       count(t.id) FILTER (WHERE t.status = 'failed')    AS failed,
       count(t.id) FILTER (WHERE t.status = 'canceled')  AS canceled,
       min(t.started_at)  AS first_started_at,
       max(t.finished_at) AS last_finished_at
FROM batches b
LEFT JOIN tasks t ON t.account_id = b.account_id AND t.batch_id = b.id
WHERE b.account_id = %(account_id)s AND b.id = %(id)s
GROUP BY b.account_id, b.id;

-- name: batch_failures
SELECT coalesce(error_code, 'unknown') AS code, count(*) AS n
FROM tasks
WHERE account_id = %(account_id)s AND batch_id = %(id)s AND status = 'failed'
GROUP BY 1 ORDER BY 2 DESC, 1;

-- name: list_batches
-- Keyset pagination, newest first, like list_tasks.
SELECT b.account_id, b.id
FROM batches b
WHERE b.account_id = %(account_id)s
  AND (%(cursor_created_at)s::timestamptz IS NULL
       OR (b.created_at, b.id) < (%(cursor_created_at)s::timestamptz, %(cursor_id)s::text))
ORDER BY b.created_at DESC, b.id DESC
LIMIT %(limit)s;

-- name: task_states
-- The current status of some of an account's tasks (the bulk job's items in flight).
SELECT * FROM tasks WHERE account_id = %(account_id)s AND id = ANY(%(ids)s);
