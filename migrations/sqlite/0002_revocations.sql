-- vncbroker schema, version 2: revocations as an ordered log.
--
-- Every revocation (a VM's tokens revoked, a VM or user removed, a user
-- taken off a VM, one session ended) is one row. Its seq orders it: a proxy
-- remembers the last seq it has applied, and a session ends for a row whose
-- seq is later than the last one its token's redemption saw, if the row
-- matches it. No node's clock takes part.
CREATE TABLE revocations (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    -- What the row matches; NULL matches anything.
    vm_id      INTEGER,
    user_name  TEXT,
    session_id INTEGER,
    reason     TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX revocations_created ON revocations(created_at);

-- The caller's own session string, sealed, for inventories that re-check a
-- live session's rights with it (OpenNebula).
ALTER TABLE tokens ADD COLUMN caller_session TEXT;

CREATE INDEX sessions_open ON sessions(vm_id) WHERE ended_at IS NULL;
