-- Replicas sharing this database, each holding a lease it renews while it
-- lives (timestamps from the database's clock, so that replicas whose
-- clocks disagree judge leases alike). A run executing is owned by the
-- replica named on it: when that replica's lease lapses (it died, or lost
-- the database for longer than the lease), another replica ends the run
-- `interrupted` and frees its session.
CREATE TABLE replicas (
    id               TEXT PRIMARY KEY NOT NULL,
    started_at       BIGINT NOT NULL,
    lease_expires_at BIGINT NOT NULL
);
-- The replica that executes (or last executed) the run; NULL on SQLite.
ALTER TABLE runs ADD COLUMN replica_id TEXT;
