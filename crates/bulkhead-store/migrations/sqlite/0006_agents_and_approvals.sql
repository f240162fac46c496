-- The agent (of AGENTS_FILE, or `default`) a session belongs to, for life.
ALTER TABLE sessions ADD COLUMN agent TEXT NOT NULL DEFAULT 'default';

-- Human approval of tool calls. A call waiting for a person is a
-- tool_executions row with status 'awaiting_approval' (its run is
-- 'awaiting_approval' too); the decision is recorded on the same row: who
-- made it (a key id, 'anonymous' with AUTH_MODE=none, or 'expiry'), when,
-- what, and the person's comment.
ALTER TABLE tool_executions ADD COLUMN approval_expires_at INTEGER;
ALTER TABLE tool_executions ADD COLUMN approval_decision TEXT;
ALTER TABLE tool_executions ADD COLUMN approval_decided_by TEXT;
ALTER TABLE tool_executions ADD COLUMN approval_decided_at INTEGER;
ALTER TABLE tool_executions ADD COLUMN approval_comment TEXT;
CREATE INDEX tool_executions_awaiting ON tool_executions(approval_expires_at)
    WHERE status = 'awaiting_approval';
