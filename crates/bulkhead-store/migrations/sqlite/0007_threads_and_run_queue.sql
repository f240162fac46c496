-- A session made before any run (a LangGraph thread) belongs to no agent
-- yet: agent = '' until its first run binds it. Its metadata is the JSON
-- object the client set (NULL: none).
ALTER TABLE sessions ADD COLUMN metadata TEXT;

-- The run queue: runs accepted but not started. A run is taken from it
-- by the transaction that opens it (the row deleted as the `runs` row is
-- made), so it is started once; a run cancelled before it started stays
-- here as 'interrupted'. `kwargs` is how the client asked for it (JSON),
-- copied onto the run when it starts.
CREATE TABLE queued_runs (
    id         TEXT PRIMARY KEY NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    owner      TEXT,
    agent      TEXT NOT NULL,
    input      TEXT NOT NULL,
    history    TEXT,
    kwargs     TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX queued_runs_by_session ON queued_runs(session_id, created_at);
CREATE INDEX queued_runs_pending ON queued_runs(created_at) WHERE status = 'pending';

ALTER TABLE runs ADD COLUMN kwargs TEXT;

-- What the model's calls of a run took in and gave out (tokens_used is
-- their sum), as usage a protocol reports per answer.
ALTER TABLE runs ADD COLUMN input_tokens INTEGER;
ALTER TABLE runs ADD COLUMN output_tokens INTEGER;
