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
-- The statement that ends a batch also writes its batch.completed webhook messages (#15), so
-- the event commits with the status change. `before` locks the row first (the UPDATE joins it)
-- and holds the status it had then, so a batch ending twice at once sends one event.
WITH before AS (
    SELECT account_id, id, status AS old_status FROM batches
    WHERE account_id = %(account_id)s AND id = %(id)s
    FOR UPDATE
), updated AS (
    UPDATE batches b
    SET total = coalesce(%(total)s, b.total),
        rejected = coalesce(%(rejected)s, b.rejected),
        status = coalesce(%(status)s, b.status),
        finished_at = CASE WHEN coalesce(%(status)s, b.status) = 'running' THEN NULL
                           ELSE clock_timestamp() END,
        updated_at = clock_timestamp()
    FROM before
    WHERE b.account_id = before.account_id AND b.id = before.id
    RETURNING b.*
), webhook_messages AS (
    INSERT INTO webhook_outbox (endpoint_id, event, batch_id, snapshot)
    SELECT e.id, 'batch.completed', u.id,
           jsonb_build_object('id', u.id, 'status', u.status, 'finished_at', u.finished_at)
    FROM updated u, before o, webhook_endpoints e
    WHERE o.old_status = 'running' AND u.status <> 'running'
      AND e.account_id = u.account_id AND 'batch.completed' = ANY (e.events)
)
SELECT * FROM updated;

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
