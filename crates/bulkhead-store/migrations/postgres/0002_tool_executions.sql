-- The audit trail of tool calls. Rows outlive their session on purpose:
-- deleting a conversation does not erase the record of what was executed.
CREATE TABLE tool_executions (
    id               TEXT PRIMARY KEY NOT NULL,
    session_id       TEXT NOT NULL,
    run_id           TEXT NOT NULL,
    call_id          TEXT NOT NULL,
    tool             TEXT NOT NULL,
    arguments        TEXT NOT NULL,
    backend          TEXT NOT NULL,
    limits           TEXT,
    status           TEXT NOT NULL,
    started_at       BIGINT NOT NULL,
    finished_at      BIGINT,
    exit_code        BIGINT,
    signal           BIGINT,
    killed_reason    TEXT,
    limits_hit       TEXT,
    stdout_bytes     BIGINT,
    stderr_bytes     BIGINT,
    stdout_truncated BOOLEAN,
    stderr_truncated BOOLEAN,
    stdout_sha256    TEXT,
    stderr_sha256    TEXT,
    duration_ms      BIGINT,
    error            TEXT
);
CREATE INDEX tool_executions_by_session ON tool_executions(session_id, started_at);
