-- Queries of the task queue, loaded by name (`-- name: <name>`). Each state change is one statement.

-- name: insert_task
INSERT INTO tasks (id, account_id, backend, priority, options, inputs, max_attempts,
                   idempotency_key, batch_id, request_hash)
VALUES (%(id)s, %(account_id)s, %(backend)s, %(priority)s, %(options)s, %(inputs)s,
        %(max_attempts)s, %(idempotency_key)s, %(batch_id)s, %(request_hash)s)
ON CONFLICT (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *;

-- name: get_task_by_idempotency_key
SELECT * FROM tasks WHERE account_id = %(account_id)s AND idempotency_key = %(idempotency_key)s;

-- name: claim_task
-- Oldest task of the highest priority for one backend; SKIP LOCKED lets many workers claim at
-- once without waiting on each other. The attempt bump is the fencing token. One backend per
-- statement (not `backend = ANY(…)`), so the planner walks tasks_queued_idx in order and stops at
-- the first row instead of sorting the whole backlog (0.3 ms instead of 20 ms at 20k queued).
WITH next AS (
    SELECT id FROM tasks
    WHERE status = 'queued' AND backend = %(backend)s AND run_after <= now()
    ORDER BY priority DESC, created_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks t
SET status = 'running',
    attempt = t.attempt + 1,
    worker_id = %(worker_id)s,
    lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s),
    started_at = coalesce(t.started_at, clock_timestamp()),
    attempt_started_at = clock_timestamp(),
    progress = 0,
    stage = 'starting',
    error_code = NULL,
    error_message = NULL,
    updated_at = clock_timestamp()
FROM next
WHERE t.id = next.id
RETURNING t.*;

-- name: heartbeat
-- Extends the lease only while this attempt still owns the task (fenced by attempt).
UPDATE tasks
SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s),
    progress = coalesce(%(progress)s, progress),
    stage = coalesce(%(stage)s, stage),
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id;

-- name: finish_succeeded
UPDATE tasks
SET status = 'succeeded', result = %(result)s, progress = 1, stage = 'done',
    lease_expires_at = NULL, finished_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING *;

-- name: preview_ready
-- The worker renders the preview after marking the task succeeded; fenced like the result.
UPDATE tasks
SET result = jsonb_set(jsonb_set(result, '{preview,ready}', 'true'),
                       '{preview,bytes}', to_jsonb(%(bytes)s::bigint)),
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'succeeded' AND result IS NOT NULL
RETURNING id;

-- name: finish_failed
-- A failure ends the task when it is permanent or the attempts are used up; otherwise the task
-- goes back to the queue after an exponential backoff.
UPDATE tasks
SET status = CASE WHEN %(permanent)s OR attempt >= max_attempts
                  THEN 'failed'::task_status ELSE 'queued'::task_status END,
    run_after = clock_timestamp()
                + make_interval(secs => %(backoff_seconds)s * power(2, greatest(attempt - 1, 0))),
    error_code = %(error_code)s,
    error_message = %(error_message)s,
    stage = CASE WHEN %(permanent)s OR attempt >= max_attempts THEN 'failed' ELSE 'retrying' END,
    lease_expires_at = NULL,
    worker_id = NULL,
    finished_at = CASE WHEN %(permanent)s OR attempt >= max_attempts
                       THEN clock_timestamp() END,
    updated_at = clock_timestamp()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING *;

-- name: recover_stalled
-- Tasks whose worker stopped heartbeating (crash, kill, lost connection): retry or fail.
UPDATE tasks
SET status = CASE WHEN attempt >= max_attempts THEN 'failed'::task_status
                  ELSE 'queued'::task_status END,
    run_after = clock_timestamp()
                + make_interval(secs => %(backoff_seconds)s * power(2, greatest(attempt - 1, 0))),
    error_code = 'worker_lost',
    error_message = CASE WHEN attempt >= max_attempts
        THEN format('the worker running attempt %%s of %%s stopped responding; no attempts left',
                    attempt, max_attempts)
        ELSE format('the worker running attempt %%s stopped responding; retrying', attempt) END,
    stage = CASE WHEN attempt >= max_attempts THEN 'failed' ELSE 'retrying' END,
    lease_expires_at = NULL,
    worker_id = NULL,
    finished_at = CASE WHEN attempt >= max_attempts THEN clock_timestamp() END,
    updated_at = clock_timestamp()
WHERE id IN (
    SELECT id FROM tasks
    WHERE status = 'running' AND lease_expires_at < clock_timestamp()
    FOR UPDATE SKIP LOCKED
)
RETURNING id, status, attempt;

-- name: cancel_task
UPDATE tasks
SET status = 'canceled', stage = 'canceled', lease_expires_at = NULL,
    finished_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE id = %(id)s AND account_id = %(account_id)s AND status IN ('queued', 'running')
RETURNING *;

-- name: get_task
-- queue_position: the queued tasks a worker of the same backend takes before this one (higher
-- priority first, then older), never another backend's. Each part (higher priority; same
-- priority and older) is counted exactly up to %(exact_up_to)s tasks, which stays cheap however
-- deep the queue. A part past that is estimated from the enqueue numbers (queue_seq, one sequence
-- per backend and priority, migration 0012): for a level, its newest number minus the number of
-- its oldest queued task, plus its tasks queued again for a retry (they have no number). An upper
-- bound: it also counts the tasks that left the middle of the queue (canceled, deleted);
-- queue_position_estimated says which it is.
SELECT t.*,
       ahead.higher + ahead.same AS queue_position,
       ahead.estimated AS queue_position_estimated
FROM tasks t
LEFT JOIN LATERAL (
    SELECT CASE WHEN hi.n < %(exact_up_to)s THEN hi.n ELSE greatest(hi.n, (
               SELECT coalesce(sum(coalesce(pg_sequence_last_value(l.seq::regclass) - head.seq + 1,
                                            0) + retrying.n), 0)
               FROM queue_levels l,
                    LATERAL (SELECT min(h.queue_seq) AS seq FROM tasks h
                             WHERE h.status = 'queued'
                               AND h.backend = l.backend AND h.priority = l.priority) head,
                    LATERAL (SELECT count(*) AS n FROM tasks r
                             WHERE r.status = 'queued' AND r.queue_seq IS NULL
                               AND r.backend = l.backend AND r.priority = l.priority) retrying
               WHERE l.backend = t.backend AND l.priority > t.priority)) END AS higher,
           CASE WHEN same.n < %(exact_up_to)s THEN same.n ELSE greatest(same.n, (
               SELECT t.queue_seq - min(h.queue_seq) FROM tasks h
               WHERE h.status = 'queued'
                 AND h.backend = t.backend AND h.priority = t.priority) + (
               SELECT count(*) FROM tasks r
               WHERE r.status = 'queued' AND r.queue_seq IS NULL
                 AND r.backend = t.backend AND r.priority = t.priority)) END AS same,
           hi.n >= %(exact_up_to)s OR same.n >= %(exact_up_to)s AS estimated
    FROM (SELECT count(*) AS n FROM (
              SELECT 1 FROM tasks q
              WHERE q.status = 'queued' AND q.backend = t.backend AND q.priority > t.priority
              LIMIT %(exact_up_to)s) x) hi,
         (SELECT count(*) AS n FROM (
              SELECT 1 FROM tasks q
              WHERE q.status = 'queued' AND q.backend = t.backend AND q.priority = t.priority
                AND (q.created_at, q.id) < (t.created_at, t.id)
              LIMIT %(exact_up_to)s) x) same
) ahead ON t.status = 'queued'
WHERE t.id = %(id)s AND t.account_id = %(account_id)s;

-- name: get_task_any_account
SELECT * FROM tasks WHERE id = %(id)s;

-- name: list_tasks
-- Keyset pagination, newest first: the cursor is the (created_at, id) of the last row seen.
SELECT * FROM tasks
WHERE account_id = %(account_id)s
  AND (%(status)s::task_status IS NULL OR status = %(status)s::task_status)
  AND (%(batch_id)s::text IS NULL OR batch_id = %(batch_id)s::text)
  AND (%(cursor_created_at)s::timestamptz IS NULL
       OR (created_at, id) < (%(cursor_created_at)s::timestamptz, %(cursor_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: task_events
SELECT id, at, attempt, status, stage, progress, worker_id, message
FROM task_events WHERE task_id = %(id)s AND id > %(after_id)s ORDER BY id;

-- name: delete_task
DELETE FROM tasks WHERE id = %(id)s AND account_id = %(account_id)s RETURNING *;

-- name: upsert_worker
INSERT INTO workers (id, backend, hostname, pid)
VALUES (%(id)s, %(backend)s, %(hostname)s, %(pid)s)
ON CONFLICT (id) DO UPDATE SET last_seen_at = clock_timestamp();

-- name: delete_worker
DELETE FROM workers WHERE id = %(id)s;

-- name: live_workers
SELECT backend, count(*) AS workers FROM workers
WHERE last_seen_at > clock_timestamp() - make_interval(secs => %(alive_seconds)s)
GROUP BY backend;

-- name: backlog
-- What the autoscaler scales on, per backend: tasks ready to run (a task waiting out its retry
-- backoff needs no replica yet) and tasks running.
SELECT backend,
       count(*) FILTER (WHERE status = 'queued' AND run_after <= now()) AS queued,
       count(*) FILTER (WHERE status = 'running') AS running
FROM tasks WHERE status IN ('queued', 'running') AND backend = ANY(%(backends)s)
GROUP BY backend;

-- name: create_account
-- No row back means the id is taken: two concurrent creations of one id get one row, never an
-- error, and no check-then-insert race.
INSERT INTO accounts (id, name, is_admin) VALUES (%(id)s, %(name)s, %(is_admin)s)
ON CONFLICT (id) DO NOTHING
RETURNING *;

-- name: get_account
SELECT * FROM accounts WHERE id = %(id)s;

-- name: list_accounts
SELECT * FROM accounts ORDER BY created_at;

-- name: create_api_key
INSERT INTO api_keys (prefix, account_id, secret_hash, name)
VALUES (%(prefix)s, %(account_id)s, %(secret_hash)s, %(name)s)
RETURNING prefix, account_id, name, created_at, last_used_at, revoked_at;

-- name: authenticate_key
-- Look the key up by its prefix and touch last_used_at (at most once a minute, to spare writes).
WITH found AS (
    SELECT k.prefix, k.secret_hash, k.account_id, a.is_admin
    FROM api_keys k JOIN accounts a ON a.id = k.account_id
    WHERE k.prefix = %(prefix)s AND k.revoked_at IS NULL AND a.disabled_at IS NULL
), touched AS (
    UPDATE api_keys SET last_used_at = clock_timestamp()
    WHERE prefix = %(prefix)s AND revoked_at IS NULL
      AND (last_used_at IS NULL OR last_used_at < clock_timestamp() - interval '1 minute')
)
SELECT * FROM found;

-- name: list_api_keys
SELECT prefix, account_id, name, created_at, last_used_at, revoked_at
FROM api_keys WHERE (%(account_id)s::text IS NULL OR account_id = %(account_id)s::text)
ORDER BY created_at;

-- name: revoke_api_key
UPDATE api_keys SET revoked_at = clock_timestamp()
WHERE prefix = %(prefix)s AND revoked_at IS NULL
  AND (%(account_id)s::text IS NULL OR account_id = %(account_id)s::text)
RETURNING prefix, account_id, name, created_at, last_used_at, revoked_at;

-- name: count_request
-- One statement per request: count it in the current window and return the new count.
INSERT INTO rate_windows (key_prefix, window_start, requests)
VALUES (%(key)s, to_timestamp(floor(extract(epoch FROM clock_timestamp()) / %(window)s) * %(window)s), 1)
ON CONFLICT (key_prefix, window_start) DO UPDATE SET requests = rate_windows.requests + 1
RETURNING requests,
          extract(epoch FROM window_start + make_interval(secs => %(window)s) - clock_timestamp())
              AS reset_s;

-- name: prune_rate_windows
-- Counters of windows that have ended count nothing any more.
DELETE FROM rate_windows
WHERE window_start + make_interval(secs => %(window)s) < clock_timestamp();

-- name: expired_tasks
-- Finished tasks past their retention whose files are still kept, oldest first.
SELECT id FROM tasks
WHERE status IN ('succeeded', 'failed', 'canceled') AND expired_at IS NULL
  AND finished_at < clock_timestamp() - make_interval(secs => %(retention_seconds)s)
ORDER BY finished_at
LIMIT %(limit)s;

-- name: mark_expired
UPDATE tasks SET expired_at = clock_timestamp(), result = NULL, updated_at = clock_timestamp()
WHERE id = %(id)s AND expired_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- Limits that hold under races (issue 10). Each runs under a per-account advisory lock
-- (Database.fetch_one_locked), so the count and the insert cannot interleave with another's.

-- name: insert_task_within_limit
-- The task is inserted only while the account has fewer than max_active interactive tasks
-- queued or running. Interactive only: a bulk job bounds its own items in flight
-- (PHOTO3D_MAX_BATCH_IN_FLIGHT), so a catalogue never locks its account's people out of the API.
INSERT INTO tasks (id, account_id, backend, priority, options, inputs, max_attempts,
                   idempotency_key, batch_id, request_hash)
SELECT %(id)s, %(account_id)s, %(backend)s, %(priority)s, %(options)s, %(inputs)s,
       %(max_attempts)s, %(idempotency_key)s, %(batch_id)s, %(request_hash)s
WHERE (SELECT count(*) FROM tasks
       WHERE account_id = %(account_id)s AND status IN ('queued', 'running')
         AND batch_id IS NULL) < %(max_active)s
ON CONFLICT (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *;

-- name: create_api_key_within_limit
INSERT INTO api_keys (prefix, account_id, secret_hash, name)
SELECT %(prefix)s, %(account_id)s, %(secret_hash)s, %(name)s
WHERE (SELECT count(*) FROM api_keys
       WHERE account_id = %(account_id)s AND revoked_at IS NULL) < %(max_keys)s
RETURNING prefix, account_id, name, created_at, last_used_at, revoked_at;

-- name: count_request_and_account
-- Counts one request against its key's window and its account's window in one statement.
WITH w AS (
    SELECT to_timestamp(floor(extract(epoch FROM clock_timestamp()) / %(window)s) * %(window)s)
           AS start
)
INSERT INTO rate_windows (key_prefix, window_start, requests)
SELECT bucket, w.start, 1 FROM w, unnest(ARRAY[%(key)s::text, %(account)s::text]) AS bucket
ON CONFLICT (key_prefix, window_start) DO UPDATE SET requests = rate_windows.requests + 1
RETURNING key_prefix AS bucket, requests,
          extract(epoch FROM window_start + make_interval(secs => %(window)s) - clock_timestamp())
              AS reset_s;
