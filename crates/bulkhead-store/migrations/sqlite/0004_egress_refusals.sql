-- The destinations the egress proxy refused a tool call's programs: a JSON
-- array of {host, port, address?, rule}, empty when none; NULL for calls
-- that ran no sandboxed program.
ALTER TABLE tool_executions ADD COLUMN egress_refusals TEXT;
