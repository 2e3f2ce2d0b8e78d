-- Source job store. Times are milliseconds since the Unix epoch.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    state TEXT NOT NULL,
    trigger_kind TEXT NOT NULL,
    requested_by TEXT NOT NULL DEFAULT '',
    options_json TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    error TEXT,
    summary TEXT,
    lease_owner TEXT,
    lease_expires_at BIGINT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    event_seq BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state_idx ON jobs (state, created_at);
CREATE INDEX jobs_channel_idx ON jobs (channel, created_at);

CREATE TABLE job_targets (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    target TEXT NOT NULL,
    url TEXT NOT NULL,
    site TEXT NOT NULL,
    state TEXT NOT NULL,
    planned BIGINT NOT NULL DEFAULT 0,
    items_total BIGINT NOT NULL DEFAULT 0,
    bytes_total BIGINT NOT NULL DEFAULT 0,
    deletes_total BIGINT NOT NULL DEFAULT 0,
    items_done BIGINT NOT NULL DEFAULT 0,
    bytes_done BIGINT NOT NULL DEFAULT 0,
    deletes_done BIGINT NOT NULL DEFAULT 0,
    packages_sent BIGINT NOT NULL DEFAULT 0,
    packages_acked BIGINT NOT NULL DEFAULT 0,
    packages_retried BIGINT NOT NULL DEFAULT 0,
    bytes_on_wire BIGINT NOT NULL DEFAULT 0,
    item_errors BIGINT NOT NULL DEFAULT 0,
    reconnects BIGINT NOT NULL DEFAULT 0,
    checkpoint_seq BIGINT NOT NULL DEFAULT 0,
    checkpoint_json TEXT NOT NULL DEFAULT '',
    error TEXT,
    PRIMARY KEY (job_id, target)
);

CREATE TABLE job_events (
    id BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    at BIGINT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    data_json TEXT NOT NULL DEFAULT '{}',
    UNIQUE (job_id, seq)
);

CREATE TABLE job_item_errors (
    id BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    target TEXT NOT NULL,
    path TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    retryable BIGINT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX job_item_errors_job_idx ON job_item_errors (job_id);

CREATE TABLE channel_target_state (
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    last_success_at BIGINT,
    last_job_id TEXT,
    PRIMARY KEY (channel, target)
);

CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
