-- Integrators (#15): webhook endpoints, the webhook outbox and its delivery log; the request
-- hash that tells an Idempotency-Key retry from a different request reusing the key.

CREATE TABLE webhook_endpoints (
    id                   uuid PRIMARY KEY,
    account_id           text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    url                  text NOT NULL,
    events               text[] NOT NULL,
    description          text NOT NULL DEFAULT '',
    -- The signing secret must be kept readable: HMAC needs it (as Stripe and Svix keep theirs).
    secret               text NOT NULL,
    -- After a rotation the old secret still signs (a second signature) until this time, so a
    -- receiver can switch secrets without dropping a delivery.
    previous_secret      text,
    previous_expires_at  timestamptz,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX webhook_endpoints_account_idx ON webhook_endpoints (account_id, created_at);

-- One row per (event, endpoint): the message. Its id is the `webhook-id` of every attempt.
-- task_id has no foreign key: deleting a task must not un-send the event about it. Batch events
-- are written by the statement that ends the batch (update_batch in sql/batches.sql).
CREATE TABLE webhook_outbox (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    endpoint_id      uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event            text NOT NULL,
    task_id          uuid,
    batch_id         text,                              -- batch.completed: the batch's id
    -- What the trigger knew at the status change; the payload sent is rebuilt from the task row
    -- at delivery time (fresh signed links) and falls back to this if the task was deleted.
    snapshot         jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts         integer NOT NULL DEFAULT 0,        -- bumped by every claim: fencing token
    next_attempt_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    leased_until     timestamptz,                       -- set while a dispatcher delivers it
    delivered_at     timestamptz,
    failed_at        timestamptz,                       -- gave up: retry window is over
    last_status      integer,
    last_error       text
);
CREATE INDEX webhook_outbox_due_idx ON webhook_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
CREATE INDEX webhook_outbox_endpoint_idx ON webhook_outbox (endpoint_id, created_at DESC);
CREATE INDEX webhook_outbox_leased_idx ON webhook_outbox (endpoint_id) WHERE leased_until IS NOT NULL;

-- Every attempt, as the deliveries listing shows it.
CREATE TABLE webhook_deliveries (
    id           bigserial PRIMARY KEY,
    message_id   uuid NOT NULL REFERENCES webhook_outbox (id) ON DELETE CASCADE,
    endpoint_id  uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    status_code  integer,            -- NULL: no HTTP answer (timeout, refused, forbidden address)
    error        text,
    duration_ms  integer NOT NULL
);
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, id DESC);

-- The outbox rows are written by the same statement (so the same transaction) that ends the
-- task: whoever ends it (worker, cancel, stalled-lease recovery), the event cannot be lost or
-- sent for a change that rolled back.
CREATE FUNCTION tasks_enqueue_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_name text := 'task.' || NEW.status::text;
BEGIN
    INSERT INTO webhook_outbox (endpoint_id, event, task_id, snapshot)
    SELECT e.id, event_name, NEW.id,
           jsonb_build_object('id', NEW.id, 'status', NEW.status, 'backend', NEW.backend,
                              'error', CASE WHEN NEW.error_code IS NOT NULL THEN
                                  jsonb_build_object('code', NEW.error_code,
                                                     'message', coalesce(NEW.error_message, ''))
                              END,
                              'finished_at', NEW.finished_at, 'batch_id', NEW.batch_id)
    FROM webhook_endpoints e
    WHERE e.account_id = NEW.account_id AND event_name = ANY (e.events);
    RETURN NEW;
END;
$$;

CREATE TRIGGER tasks_enqueue_webhooks
    AFTER UPDATE OF status ON tasks
    FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'canceled')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION tasks_enqueue_webhooks();

-- sha256 of the canonical request (photos + options): an Idempotency-Key sent again with a
-- different request is refused instead of silently answering with the first task.
ALTER TABLE tasks ADD COLUMN request_hash text;
