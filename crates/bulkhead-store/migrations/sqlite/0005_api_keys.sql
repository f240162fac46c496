-- API keys. Only a SHA-256 digest of each key is kept: the key itself is
-- shown once, when it is made. Limits are NULL when the key has none.
CREATE TABLE api_keys (
    id                  TEXT PRIMARY KEY NOT NULL,
    name                TEXT NOT NULL,
    -- Keys of one tenant share their sessions (rotation: a new key in the
    -- same tenant, then revoke the old one).
    tenant              TEXT NOT NULL,
    digest              TEXT NOT NULL,
    created_at          INTEGER NOT NULL,
    last_used_at        INTEGER,
    revoked_at          INTEGER,
    requests_per_minute INTEGER,
    max_concurrent_runs INTEGER,
    tokens_per_day      INTEGER
);

-- The tenant a session belongs to; NULL for sessions made with
-- AUTH_MODE=none, which no key can reach.
ALTER TABLE sessions ADD COLUMN owner TEXT;
