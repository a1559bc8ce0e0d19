-- Queue position without counting the queue, and a batch listing that walks an index (issue 11;
-- figures in docs/performance.md, "At scale").
--
-- Every GET of a queued task counted the queued tasks ahead of it: 100,000 index entries at a
-- 100k-deep queue. Now get_task counts exactly only up to a cap; beyond it, the position comes
-- from enqueue numbers: each (backend, priority) level numbers its tasks as they are queued, so
-- "tasks ahead at my level" is at most my number minus the number of the level's oldest queued
-- task, an index lookup instead of a count.

-- One sequence per level (backend, priority), created when the level gets its first task. A
-- sequence, not a counter row: nextval takes no lock, so concurrent submissions never wait on each
-- other, and a bulk INSERT of many tasks stays linear (a counter row, updated again and again in
-- one transaction, made it quadratic). Numbers of inserts that were rolled back, or skipped by
-- ON CONFLICT, are gaps: the estimate stays an upper bound.
CREATE TABLE queue_levels (
    backend  text NOT NULL,
    priority integer NOT NULL,
    seq      text NOT NULL,   -- name of the level's sequence (text, not regclass: pg_upgrade-safe)
    PRIMARY KEY (backend, priority)
);

CREATE FUNCTION queue_level_seq(p_backend text, p_priority integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    found text;
BEGIN
    SELECT seq INTO found FROM queue_levels WHERE backend = p_backend AND priority = p_priority;
    IF found IS NULL THEN
        -- A new level: one creator at a time; each statement here sees what others committed.
        PERFORM pg_advisory_xact_lock(hashtext('photo3d.queue_levels'));
        SELECT seq INTO found FROM queue_levels WHERE backend = p_backend AND priority = p_priority;
        IF found IS NULL THEN
            found := 'tasks_queue_seq_' || md5(p_backend || '/' || p_priority);
            EXECUTE format('CREATE SEQUENCE IF NOT EXISTS %I', found);
            INSERT INTO queue_levels (backend, priority, seq) VALUES (p_backend, p_priority, found);
        END IF;
    END IF;
    RETURN found;
END;
$$;

-- NULL for tasks that are not queued, and for a task queued again for a retry: it keeps its
-- place near the front (claims order by age); the estimate adds the level's retrying tasks.
ALTER TABLE tasks ADD COLUMN queue_seq bigint;

-- Number the tasks already queued, in claim order, without waking every listener per row.
ALTER TABLE tasks DISABLE TRIGGER tasks_record_event;
UPDATE tasks t SET queue_seq = r.seq
FROM (
    SELECT id, row_number() OVER (PARTITION BY backend, priority ORDER BY created_at, id) AS seq
    FROM tasks WHERE status = 'queued'
) r
WHERE t.id = r.id;
ALTER TABLE tasks ENABLE TRIGGER tasks_record_event;

DO $$
DECLARE
    level record;
BEGIN
    FOR level IN
        SELECT backend, priority, max(queue_seq) AS last FROM tasks
        WHERE status = 'queued' GROUP BY backend, priority
    LOOP
        PERFORM setval(queue_level_seq(level.backend, level.priority)::regclass, level.last);
    END LOOP;
END;
$$;

-- The head of each level, min(queue_seq) of its queued tasks, is one index descent; so is the
-- count of its tasks waiting for a retry (queue_seq NULL, sorted last).
CREATE INDEX tasks_queue_seq_idx ON tasks (backend, priority, queue_seq) WHERE status = 'queued';

CREATE FUNCTION tasks_number_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.queue_seq := nextval(queue_level_seq(NEW.backend, NEW.priority)::regclass);
    ELSE
        NEW.queue_seq := NULL;  -- back in the queue for a retry (see above)
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tasks_number_queued_insert
    BEFORE INSERT ON tasks
    FOR EACH ROW WHEN (NEW.status = 'queued')
    EXECUTE FUNCTION tasks_number_queued();

CREATE TRIGGER tasks_number_queued_requeue
    BEFORE UPDATE OF status ON tasks
    FOR EACH ROW WHEN (NEW.status = 'queued' AND OLD.status IS DISTINCT FROM 'queued')
    EXECUTE FUNCTION tasks_number_queued();

-- GET /tasks?batch_id=…: the batch's tasks newest first, without walking the account's other
-- tasks to find them (an old batch sits under all the newer interactive ones).
CREATE INDEX tasks_batch_listing_idx ON tasks (account_id, batch_id, created_at DESC, id DESC)
    WHERE batch_id IS NOT NULL;
