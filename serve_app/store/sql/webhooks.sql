-- Webhook endpoints, the outbox the tasks trigger fills, and the delivery log (`-- name: <name>`).

-- name: webhook_create
INSERT INTO webhook_endpoints (id, account_id, url, events, description, secret)
SELECT %(id)s, %(account_id)s, %(url)s, %(events)s, %(description)s, %(secret)s
WHERE (SELECT count(*) FROM webhook_endpoints WHERE account_id = %(account_id)s) < %(max_count)s
RETURNING *;

-- name: webhook_list
SELECT * FROM webhook_endpoints WHERE account_id = %(account_id)s ORDER BY created_at, id;

-- name: webhook_get
SELECT * FROM webhook_endpoints WHERE id = %(id)s AND account_id = %(account_id)s;

-- name: webhook_delete
DELETE FROM webhook_endpoints WHERE id = %(id)s AND account_id = %(account_id)s RETURNING id;

-- name: webhook_rotate
-- The old secret keeps signing (as a second signature) for a grace period.
UPDATE webhook_endpoints
SET previous_secret = secret,
    previous_expires_at = clock_timestamp() + make_interval(secs => %(grace_seconds)s),
    secret = %(secret)s
WHERE id = %(id)s AND account_id = %(account_id)s
RETURNING *;

-- name: webhook_deliveries
SELECT d.id, d.message_id, d.attempt, d.at, d.status_code, d.error, d.duration_ms,
       o.event, o.task_id, o.batch_id, o.delivered_at, o.failed_at, o.next_attempt_at
FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.message_id
WHERE d.endpoint_id = %(endpoint_id)s
ORDER BY d.id DESC
LIMIT %(limit)s;

-- name: webhook_claim
-- Due messages for this dispatcher; SKIP LOCKED lets every ingress replica run one. No endpoint
-- gets more than per_endpoint deliveries in flight, so one slow endpoint cannot take every slot
-- from the others. Pushing next_attempt_at past the delivery timeout is the lease: a replica
-- that dies mid-delivery leaves the message to be claimed again then. The attempts bump is the
-- fencing token.
WITH busy AS (
    SELECT endpoint_id, count(*) AS in_flight FROM webhook_outbox
    WHERE leased_until > clock_timestamp()
    GROUP BY endpoint_id
), ranked AS (
    SELECT o.id,
           coalesce(b.in_flight, 0)
               + row_number() OVER (PARTITION BY o.endpoint_id ORDER BY o.next_attempt_at, o.id)
               AS slot
    FROM webhook_outbox o LEFT JOIN busy b USING (endpoint_id)
    WHERE o.delivered_at IS NULL AND o.failed_at IS NULL AND o.next_attempt_at <= clock_timestamp()
), due AS (
    SELECT id FROM webhook_outbox
    WHERE id IN (SELECT id FROM ranked WHERE slot <= %(per_endpoint)s)
      AND delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= clock_timestamp()
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_outbox o
SET attempts = o.attempts + 1,
    next_attempt_at = clock_timestamp() + make_interval(secs => %(lease_seconds)s),
    leased_until = clock_timestamp() + make_interval(secs => %(lease_seconds)s)
FROM due, webhook_endpoints e
WHERE o.id = due.id AND e.id = o.endpoint_id
RETURNING o.id, o.endpoint_id, o.event, o.task_id, o.batch_id, o.snapshot, o.created_at,
          o.attempts,
          e.account_id, e.url, e.secret,
          CASE WHEN e.previous_expires_at > clock_timestamp() THEN e.previous_secret END
              AS previous_secret;

-- name: webhook_record_attempt
-- One statement: log the attempt and settle the message (delivered, retry later, or give up
-- when the next try would fall outside the retry window). Fenced by the attempt number.
WITH settled AS (
    UPDATE webhook_outbox
    SET delivered_at = CASE WHEN %(delivered)s THEN clock_timestamp() END,
        failed_at = CASE WHEN NOT %(delivered)s
                          AND created_at + make_interval(secs => %(window_seconds)s)
                              < clock_timestamp() + make_interval(secs => %(retry_in)s)
                         THEN clock_timestamp() END,
        next_attempt_at = clock_timestamp() + make_interval(secs => %(retry_in)s),
        leased_until = NULL,
        last_status = %(status_code)s,
        last_error = %(error)s
    WHERE id = %(id)s AND attempts = %(attempt)s AND delivered_at IS NULL AND failed_at IS NULL
    RETURNING id, endpoint_id, delivered_at, failed_at
), logged AS (
    INSERT INTO webhook_deliveries (message_id, endpoint_id, attempt, status_code, error,
                                    duration_ms)
    SELECT id, endpoint_id, %(attempt)s, %(status_code)s, %(error)s, %(duration_ms)s FROM settled
    RETURNING id
)
SELECT CASE WHEN s.delivered_at IS NOT NULL THEN 'delivered'
            WHEN s.failed_at IS NOT NULL THEN 'gave_up'
            ELSE 'failed' END AS outcome
FROM settled s, logged;

-- name: webhook_prune
-- Settled messages (and their attempt log) older than the retention are forgotten.
DELETE FROM webhook_outbox
WHERE (delivered_at IS NOT NULL OR failed_at IS NOT NULL)
  AND created_at < clock_timestamp() - make_interval(secs => %(retention_seconds)s);
