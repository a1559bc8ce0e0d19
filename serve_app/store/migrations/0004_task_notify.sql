-- Task-change notifications carry who owns the task, so one listener per ingress replica can
-- route them to that account's event streams without a query per notification.
--
-- Channels (the store's listen.py names them):
--   photo3d_queued  payload: the backend name. Sent when a task becomes queued; idle workers
--                   of that backend wake up and claim (they also poll: NOTIFY is only a hint).
--   photo3d_task    payload: {"task_id": "<uuid>", "account_id": "<id>"} (JSON text). Sent on
--                   every insert or update of a task; live event streams follow it.
CREATE OR REPLACE FUNCTION tasks_record_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT'
       OR NEW.status IS DISTINCT FROM OLD.status
       OR NEW.attempt IS DISTINCT FROM OLD.attempt
       OR NEW.stage IS DISTINCT FROM OLD.stage THEN
        INSERT INTO task_events (task_id, attempt, status, stage, progress, worker_id, message)
        VALUES (NEW.id, NEW.attempt, NEW.status, NEW.stage, NEW.progress, NEW.worker_id,
                CASE WHEN NEW.status IN ('failed', 'queued') THEN NEW.error_message END);
    END IF;
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'queued') THEN
        PERFORM pg_notify('photo3d_queued', NEW.backend);
    END IF;
    PERFORM pg_notify('photo3d_task',
                      json_build_object('task_id', NEW.id, 'account_id', NEW.account_id)::text);
    RETURN NEW;
END;
$$;
