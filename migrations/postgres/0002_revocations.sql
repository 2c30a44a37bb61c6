-- vncbroker schema for PostgreSQL, version 2: revocations as an ordered log
-- (see migrations/sqlite/0002_revocations.sql). A revoking transaction
-- takes a lock on the table before it inserts, so rows become visible in
-- seq order and a proxy that remembers the last seq it applied misses none.
CREATE TABLE revocations (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vm_id      BIGINT,
    user_name  TEXT,
    session_id BIGINT,
    reason     TEXT   NOT NULL,
    created_at BIGINT NOT NULL DEFAULT (extract(epoch FROM now())::BIGINT)
);
CREATE INDEX revocations_created ON revocations(created_at);

ALTER TABLE tokens ADD COLUMN caller_session TEXT;

CREATE INDEX sessions_open ON sessions(vm_id) WHERE ended_at IS NULL;
