-- Tables keyed by text ids become WITHOUT ROWID: the primary key is the
-- table, so an insert updates one B-tree instead of the table plus an index
-- of its key. The status index keeps only running runs (all that recovery
-- looks for), so finishing a run no longer moves an entry within it.
--
-- SQLite's procedure for changing a table's shape: rebuild it with foreign
-- keys off (the store runs migrations on a connection without them, since
-- the pragma cannot change inside the migration's transaction; otherwise
-- dropping the old `sessions` would cascade into every run). Rows are copied
-- as they are, so the keys that held before hold after.

CREATE TABLE sessions_rebuilt (
    id            TEXT PRIMARY KEY NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    active_run_id TEXT,
    locked_at     INTEGER
) WITHOUT ROWID;
INSERT INTO sessions_rebuilt (id, created_at, updated_at, active_run_id, locked_at)
    SELECT id, created_at, updated_at, active_run_id, locked_at FROM sessions;
DROP TABLE sessions;
ALTER TABLE sessions_rebuilt RENAME TO sessions;

CREATE TABLE runs_rebuilt (
    id            TEXT PRIMARY KEY NOT NULL,
    session_id    TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    status        TEXT NOT NULL,
    input         TEXT NOT NULL,
    output        TEXT,
    tokens_used   INTEGER NOT NULL DEFAULT 0,
    steps         INTEGER NOT NULL DEFAULT 0,
    error_code    TEXT,
    error_message TEXT,
    created_at    INTEGER NOT NULL,
    finished_at   INTEGER
) WITHOUT ROWID;
INSERT INTO runs_rebuilt (id, session_id, status, input, output, tokens_used, steps,
                          error_code, error_message, created_at, finished_at)
    SELECT id, session_id, status, input, output, tokens_used, steps,
           error_code, error_message, created_at, finished_at FROM runs;
DROP TABLE runs;
ALTER TABLE runs_rebuilt RENAME TO runs;
CREATE INDEX runs_by_session ON runs(session_id, created_at);
CREATE INDEX runs_running ON runs(status) WHERE status = 'running';

CREATE TABLE run_events_rebuilt (
    run_id     TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
INSERT INTO run_events_rebuilt (run_id, seq, kind, data, created_at)
    SELECT run_id, seq, kind, data, created_at FROM run_events;
DROP TABLE run_events;
ALTER TABLE run_events_rebuilt RENAME TO run_events;
