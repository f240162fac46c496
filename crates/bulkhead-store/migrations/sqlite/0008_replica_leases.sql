-- The same columns as PostgreSQL's 0008 (the schemas are kept alike), unused
-- on SQLite: one process owns an SQLite file, and recovers its runs at start.
CREATE TABLE replicas (
    id               TEXT PRIMARY KEY NOT NULL,
    started_at       BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL
);
ALTER TABLE runs ADD COLUMN replica_id TEXT;
