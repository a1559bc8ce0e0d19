-- Queries of billing: the credit ledger, Stripe events applied once, the meter outbox.
-- Every balance change is one statement that writes the ledger row and the cached balance.

-- name: reserve_credits
-- Runs in the transaction that inserted the task: the balance check and the debit are one
-- UPDATE, so concurrent submissions queue on the account's row lock and never overdraw it.
-- Allowance credits are spent first. No row back = not enough credits (the caller rolls back).
WITH debit AS (
    UPDATE accounts
    SET balance = balance - %(price)s,
        allowance_left = greatest(allowance_left - %(price)s, 0)
    WHERE id = %(account_id)s AND balance >= %(price)s
    RETURNING id, balance
), entry AS (
    INSERT INTO ledger (account_id, kind, amount, balance_after, task_id, metadata)
    SELECT id, 'reserve', -%(price)s, balance, %(task_id)s, %(metadata)s FROM debit
    RETURNING balance_after
), mark AS (
    UPDATE tasks SET credits_reserved = %(price)s
    WHERE id = %(task_id)s AND EXISTS (SELECT 1 FROM debit)
)
SELECT balance_after AS balance FROM entry;

-- name: mark_metered
-- A task of a metered plan: nothing is reserved; its success is reported as a meter event.
UPDATE tasks SET meter_event = %(event_name)s WHERE id = %(task_id)s;

-- name: post_ledger
-- One credit movement (grant, purchase, allowance, refund, expiry, adjustment). A debit takes
-- at most what the balance holds (the balance never goes negative); the row records what moved.
WITH cur AS (
    SELECT id, balance, allowance_left FROM accounts WHERE id = %(account_id)s FOR UPDATE
), moved AS (
    UPDATE accounts a
    SET balance = greatest(cur.balance + %(amount)s, 0),
        allowance_left = least(greatest(cur.allowance_left + %(allowance_delta)s, 0),
                               greatest(cur.balance + %(amount)s, 0))
    FROM cur WHERE a.id = cur.id
    RETURNING a.id, a.balance, a.balance - cur.balance AS change
)
INSERT INTO ledger (account_id, kind, amount, balance_after, stripe_event_id, reason, metadata)
SELECT id, %(kind)s::ledger_kind, change, balance, %(stripe_event_id)s, %(reason)s, %(metadata)s FROM moved
RETURNING *;

-- name: claim_signup_grant
UPDATE accounts SET signup_granted = true
WHERE id = %(account_id)s AND NOT signup_granted
RETURNING id;

-- name: billing_account
SELECT id, balance, allowance_left, stripe_customer_id, plan, plan_status, subscription_id,
       period_start, period_end
FROM accounts WHERE id = %(account_id)s;

-- name: account_by_customer
SELECT id FROM accounts WHERE stripe_customer_id = %(customer_id)s;

-- name: set_customer
-- The first customer id seen for an account sticks (Checkout may be opened twice); a customer
-- already linked to another account is never moved.
UPDATE accounts a SET stripe_customer_id = coalesce(a.stripe_customer_id, %(customer_id)s)
WHERE a.id = %(account_id)s
  AND NOT EXISTS (SELECT 1 FROM accounts o
                  WHERE o.stripe_customer_id = %(customer_id)s AND o.id <> a.id)
RETURNING stripe_customer_id;

-- name: set_subscription
-- Only an event at least as new as the last one applied changes the plan: deliveries may come
-- in any order.
UPDATE accounts
SET plan = %(plan)s, plan_status = %(status)s, subscription_id = %(subscription_id)s,
    period_start = coalesce(%(period_start)s, period_start),
    period_end = coalesce(%(period_end)s, period_end),
    subscription_event_at = %(created)s,
    stripe_customer_id = CASE
        WHEN EXISTS (SELECT 1 FROM accounts o
                     WHERE o.stripe_customer_id = %(customer_id)s AND o.id <> accounts.id)
        THEN stripe_customer_id
        ELSE coalesce(stripe_customer_id, %(customer_id)s) END
WHERE id = %(account_id)s
  AND (subscription_event_at IS NULL OR subscription_event_at <= %(created)s)
RETURNING id;

-- name: record_stripe_event
-- The once-per-event gate: a replayed event id inserts nothing, and the caller applies nothing.
INSERT INTO stripe_events (id, type, created, account_id)
VALUES (%(id)s, %(type)s, %(created)s, %(account_id)s)
ON CONFLICT (id) DO NOTHING
RETURNING id;

-- name: payment_credits
-- Credits bought with one payment and what refunds already asked back.
SELECT coalesce(sum(amount) FILTER (WHERE kind = 'purchase'), 0) AS bought,
       coalesce(sum((metadata ->> 'requested')::bigint) FILTER (WHERE kind = 'refund'), 0)
           AS refunded,
       min(account_id) AS account_id
FROM ledger
WHERE metadata ->> 'payment_intent' = %(payment_intent)s;

-- name: list_ledger
SELECT id, kind, amount, balance_after, task_id, reason, metadata, created_at
FROM ledger
WHERE account_id = %(account_id)s AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: ledger_totals
-- The ledger's sum and the cached balance read in one snapshot: they must always agree.
SELECT coalesce(sum(amount), 0)::bigint AS total, count(*) AS entries,
       (SELECT balance FROM accounts WHERE id = %(account_id)s) AS balance
FROM ledger WHERE account_id = %(account_id)s;

-- name: usage_since
-- Generations that succeeded in the current period (charged in credits or metered).
SELECT count(*) AS generations, coalesce(sum(credits_charged), 0) AS credits
FROM tasks
WHERE account_id = %(account_id)s AND status = 'succeeded'
  AND finished_at >= coalesce(%(since)s::timestamptz, date_trunc('month', clock_timestamp()));

-- name: claim_meter_events
-- Take due meter events for one delivery round; the lease (next_try_at) keeps two deliverers
-- from sending the same row at once, and the identifier makes a resend harmless.
UPDATE meter_outbox
SET attempts = attempts + 1,
    next_try_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s)
WHERE task_id IN (
    SELECT task_id FROM meter_outbox
    WHERE sent_at IS NULL AND next_try_at <= clock_timestamp()
    ORDER BY next_try_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING task_id, account_id, customer_id, event_name, value, created_at, attempts;

-- name: meter_event_sent
UPDATE meter_outbox SET sent_at = clock_timestamp(), last_error = NULL
WHERE task_id = %(task_id)s AND sent_at IS NULL;

-- name: meter_event_failed
-- Exponential backoff, capped at an hour: Stripe being down delays reporting, loses nothing.
UPDATE meter_outbox
SET next_try_at = clock_timestamp()
        + make_interval(secs => least(3600, %(backoff_seconds)s * power(2, least(attempts, 12)))),
    last_error = %(error)s
WHERE task_id = %(task_id)s AND sent_at IS NULL;

-- name: meter_outbox_pending
SELECT count(*) FILTER (WHERE sent_at IS NULL) AS pending,
       count(*) FILTER (WHERE sent_at IS NOT NULL) AS sent
FROM meter_outbox;
