-- Recovery looks only for running runs: index those alone, so finishing a
-- run removes its entry instead of moving it.
DROP INDEX runs_by_status;
CREATE INDEX runs_running ON runs(status) WHERE status = 'running';
