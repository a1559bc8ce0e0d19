-- Billing: an append-only credit ledger per account, a cached balance updated in the same
-- transaction as every ledger row, Stripe events applied once per event id, and an outbox of
-- metered usage for Stripe Billing meter events.

-- The cached balance. It can only go down through a reservation that checks it first (one
-- UPDATE ... WHERE balance >= price, serialised by the row lock), so it never goes negative.
ALTER TABLE accounts
    ADD COLUMN balance            bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
    ADD COLUMN allowance_left     bigint NOT NULL DEFAULT 0 CHECK (allowance_left >= 0),
    ADD COLUMN signup_granted     boolean NOT NULL DEFAULT false,
    ADD COLUMN stripe_customer_id text UNIQUE,
    ADD COLUMN plan               text,          -- name of the plan in the billing config
    ADD COLUMN plan_status        text,          -- Stripe subscription status
    ADD COLUMN subscription_id    text,
    ADD COLUMN period_start       timestamptz,
    ADD COLUMN period_end         timestamptz,
    ADD COLUMN subscription_event_at bigint;     -- `created` of the newest subscription event applied

CREATE TYPE ledger_kind AS ENUM (
    'grant', 'purchase', 'allowance', 'reserve', 'capture', 'release', 'refund', 'expiry',
    'adjustment'
);

CREATE TABLE ledger (
    id              bigserial PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (id),
    kind            ledger_kind NOT NULL,
    amount          bigint NOT NULL,           -- signed change of the balance (capture: 0)
    balance_after   bigint NOT NULL,
    task_id         uuid,                      -- no FK: the history outlives a deleted task
    stripe_event_id text,
    reason          text,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ledger_account_idx ON ledger (account_id, id DESC);
-- A task reserves once and settles once: capture and release exclude each other.
CREATE UNIQUE INDEX ledger_task_reserve_idx ON ledger (task_id) WHERE kind = 'reserve';
CREATE UNIQUE INDEX ledger_task_settle_idx ON ledger (task_id) WHERE kind IN ('capture', 'release');
CREATE INDEX ledger_payment_idx ON ledger ((metadata ->> 'payment_intent'))
    WHERE metadata ? 'payment_intent';

-- Append-only: history is never rewritten.
CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only';
END;
$$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

-- What a task was reserved and charged; a task of a metered plan names its meter event instead.
ALTER TABLE tasks
    ADD COLUMN credits_reserved integer NOT NULL DEFAULT 0 CHECK (credits_reserved >= 0),
    ADD COLUMN credits_charged  integer NOT NULL DEFAULT 0 CHECK (credits_charged >= 0),
    ADD COLUMN meter_event      text;

CREATE TABLE stripe_events (
    id          text PRIMARY KEY,              -- evt_…: a replay finds its row and applies nothing
    type        text NOT NULL,
    created     bigint NOT NULL,
    account_id  text,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE meter_outbox (
    task_id      uuid PRIMARY KEY,             -- the meter event's identifier: reported once
    account_id   text NOT NULL,
    customer_id  text NOT NULL,
    event_name   text NOT NULL,
    value        integer NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts     integer NOT NULL DEFAULT 0,
    next_try_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_error   text,
    sent_at      timestamptz
);
CREATE INDEX meter_outbox_due_idx ON meter_outbox (next_try_at) WHERE sent_at IS NULL;

-- Settlement rides on the task's own state change, whichever statement makes it (finish,
-- stall recovery, cancel, delete): the change is already fenced by the attempt, so the money
-- moves in the same transaction, exactly once (the unique index on settlements).
CREATE FUNCTION tasks_settle_credits() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    task tasks;
    kind ledger_kind;
    change bigint;
    new_balance bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN
        task := OLD;
        IF OLD.status NOT IN ('queued', 'running') THEN
            RETURN OLD;
        END IF;
        kind := 'release';
    ELSIF NEW.status IS NOT DISTINCT FROM OLD.status THEN
        RETURN NEW;
    ELSIF NEW.status = 'succeeded' THEN
        task := NEW;
        kind := 'capture';
        IF NEW.meter_event IS NOT NULL THEN
            INSERT INTO meter_outbox (task_id, account_id, customer_id, event_name)
            SELECT NEW.id, NEW.account_id, a.stripe_customer_id, NEW.meter_event
            FROM accounts a WHERE a.id = NEW.account_id AND a.stripe_customer_id IS NOT NULL
            ON CONFLICT DO NOTHING;
        END IF;
    ELSIF NEW.status IN ('failed', 'canceled') THEN
        task := NEW;
        kind := 'release';
    ELSE
        RETURN NEW;
    END IF;
    -- The task row is locked by the statement that fired us, so no other settlement of this
    -- task can run concurrently; the unique index is the backstop.
    IF task.credits_reserved > 0 AND NOT EXISTS (
        SELECT 1 FROM ledger l WHERE l.task_id = task.id AND l.kind IN ('capture', 'release')
    ) THEN
        change := CASE WHEN kind = 'release' THEN task.credits_reserved ELSE 0 END;
        UPDATE accounts SET balance = balance + change WHERE id = task.account_id
        RETURNING balance INTO new_balance;
        INSERT INTO ledger (account_id, kind, amount, balance_after, task_id, reason, metadata)
        VALUES (task.account_id, kind, change, new_balance, task.id,
                CASE WHEN TG_OP = 'DELETE' THEN 'task deleted'
                     ELSE 'task ' || NEW.status::text END,
                jsonb_build_object('credits', task.credits_reserved, 'attempt', task.attempt));
        IF TG_OP = 'UPDATE' AND kind = 'capture' THEN
            NEW.credits_charged := NEW.credits_reserved;
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tasks_settle_credits BEFORE UPDATE OF status ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_settle_credits();
CREATE TRIGGER tasks_settle_credits_delete BEFORE DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION tasks_settle_credits();
