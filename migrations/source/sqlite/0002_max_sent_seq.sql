-- The highest package number sent to a target, so that a package sent again after a
-- reconnect, a rewind or a restart of the source counts as retried.
ALTER TABLE job_targets ADD COLUMN max_sent_seq BIGINT NOT NULL DEFAULT 0;
