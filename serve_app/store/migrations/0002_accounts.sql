-- Accounts and API keys: every task belongs to an account; keys are stored hashed.

CREATE TABLE accounts (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    is_admin    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    disabled_at timestamptz
);

-- The single-user account of local mode (AUTH_REQUIRED=false) owns tasks made without a key.
INSERT INTO accounts (id, name) VALUES ('local', 'local user');

ALTER TABLE tasks ADD CONSTRAINT tasks_account_fk
    FOREIGN KEY (account_id) REFERENCES accounts (id) ON DELETE CASCADE;

CREATE TABLE api_keys (
    prefix       text PRIMARY KEY,           -- shown in listings, identifies the key
    account_id   text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    secret_hash  bytea NOT NULL,             -- sha256 of the whole key; the key itself is never stored
    name         text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_account_idx ON api_keys (account_id);

-- Fixed-window request counters shared by every ingress replica.
CREATE UNLOGGED TABLE rate_windows (
    key_prefix   text NOT NULL,
    window_start timestamptz NOT NULL,
    requests     integer NOT NULL,
    PRIMARY KEY (key_prefix, window_start)
);
