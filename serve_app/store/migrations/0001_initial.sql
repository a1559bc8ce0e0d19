-- photo3d initial schema: tasks are the durable work queue; task_events is their timeline.

CREATE TYPE task_status AS ENUM ('queued', 'running', 'succeeded', 'failed', 'canceled');

CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    account_id       text NOT NULL DEFAULT 'local',
    backend          text NOT NULL,
    status           task_status NOT NULL DEFAULT 'queued',
    priority         integer NOT NULL DEFAULT 0,
    options          jsonb NOT NULL DEFAULT '{}'::jsonb,
    inputs           jsonb NOT NULL DEFAULT '[]'::jsonb,   -- artifact keys of the input photos
    attempt          integer NOT NULL DEFAULT 0,            -- fencing token: bumped by every claim
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    run_after        timestamptz NOT NULL DEFAULT now(),    -- retry backoff
    lease_expires_at timestamptz,
    worker_id        text,
    progress         real NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
    stage            text,
    error_code       text,
    error_message    text,
    result           jsonb,
    idempotency_key  text,
    batch_id         text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at       timestamptz,                           -- first claim
    attempt_started_at timestamptz,                         -- current attempt's claim
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Claim order: priority, then age. Partial so the index only holds the backlog.
CREATE INDEX tasks_queued_idx ON tasks (backend, priority DESC, created_at, id) WHERE status = 'queued';
CREATE INDEX tasks_running_lease_idx ON tasks (lease_expires_at) WHERE status = 'running';
CREATE INDEX tasks_account_listing_idx ON tasks (account_id, created_at DESC, id DESC);
CREATE INDEX tasks_batch_idx ON tasks (batch_id) WHERE batch_id IS NOT NULL;
-- A client retry with the same Idempotency-Key finds the original task.
CREATE UNIQUE INDEX tasks_idempotency_idx ON tasks (account_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE task_events (
    id        bigserial PRIMARY KEY,
    task_id   uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempt   integer NOT NULL,
    status    task_status NOT NULL,
    stage     text,
    progress  real,
    worker_id text,
    message   text
);
CREATE INDEX task_events_task_idx ON task_events (task_id, id);

CREATE TABLE workers (
    id           text PRIMARY KEY,
    backend      text NOT NULL,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Every status or stage change lands in the timeline, whoever made it: one place, no forgetting.
CREATE FUNCTION tasks_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR NEW.status IS DISTINCT FROM OLD.status
       OR NEW.attempt IS DISTINCT FROM OLD.attempt
       OR NEW.stage IS DISTINCT FROM OLD.stage THEN
        INSERT INTO task_events (task_id, attempt, status, stage, progress, worker_id, message)
        VALUES (NEW.id, NEW.attempt, NEW.status, NEW.stage, NEW.progress, NEW.worker_id,
                CASE WHEN NEW.status IN ('failed', 'queued') THEN NEW.error_message END);
    END IF;
    -- Wake idle workers when work appears; tell event streams that this task moved.
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'queued') THEN
        PERFORM pg_notify('photo3d_queued', NEW.backend);
    END IF;
    PERFORM pg_notify('photo3d_task', NEW.id::text);
    RETURN NEW;
END;
$$;

CREATE TRIGGER tasks_record_event
    AFTER INSERT OR UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_record_event();
