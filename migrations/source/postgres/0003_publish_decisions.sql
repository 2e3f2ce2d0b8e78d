-- The decision of an atomic job's two-phase commit, recorded once every target has
-- prepared and before any is told to switch: a source that restarts between the phases
-- finds it and tells the targets the same. No row: not decided (the targets keep their
-- previous generation).
CREATE TABLE publish_decisions (
    job_id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    -- The generation number the targets publish the job's content as.
    generation BIGINT NOT NULL,
    decided_at BIGINT NOT NULL
);
CREATE INDEX publish_decisions_channel_idx ON publish_decisions (channel, generation);
