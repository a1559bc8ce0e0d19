-- Queries behind the queue gauges (photo3d_queue_*, photo3d_workers_live), loaded by name.
-- The QueueMonitor deployment runs them every few seconds: each is one pass over the partial
-- index of queued tasks or the small running set, never over finished tasks.

-- name: queue_depth
-- Tasks waiting or running, by backend and status.
SELECT backend, status::text AS status, count(*) AS tasks
FROM tasks WHERE status IN ('queued', 'running')
GROUP BY backend, status;

-- name: oldest_queued
-- Age of the oldest task that could run now (a retry still in its backoff is not late yet).
SELECT backend,
       extract(epoch FROM clock_timestamp() - min(greatest(created_at, run_after))) AS age_s
FROM tasks WHERE status = 'queued' AND run_after <= clock_timestamp()
GROUP BY backend;
