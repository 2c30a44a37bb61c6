-- vncbroker schema, version 1.
-- Timestamps are Unix seconds. Tokens are stored only as their SHA-256.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    password_hash TEXT    NOT NULL,
    admin         INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL
);

CREATE TABLE vms (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    vnc_host     TEXT    NOT NULL,
    vnc_port     INTEGER NOT NULL CHECK (vnc_port BETWEEN 1 AND 65535),
    vnc_password TEXT,
    owner_id     INTEGER NOT NULL REFERENCES users(id),
    created_at   INTEGER NOT NULL
);

-- Users other than the owner who may open a VM's console.
CREATE TABLE vm_users (
    vm_id   INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (vm_id, user_id)
);

-- The target (host, port, password) is copied into the token at mint time:
-- the proxy connects only there, whatever the client asks for.
CREATE TABLE tokens (
    id           INTEGER PRIMARY KEY,
    token_hash   BLOB    NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    vm_id        INTEGER NOT NULL,
    target_host  TEXT    NOT NULL,
    target_port  INTEGER NOT NULL,
    vnc_password TEXT,
    user_name    TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    single_use   INTEGER NOT NULL DEFAULT 0,
    used_at      INTEGER,
    revoked_at   INTEGER
);
CREATE INDEX tokens_vm ON tokens(vm_id);
CREATE INDEX tokens_expires ON tokens(expires_at);
CREATE INDEX tokens_revoked ON tokens(revoked_at) WHERE revoked_at IS NOT NULL;

-- One row per proxied console session; kept after its token is purged.
CREATE TABLE sessions (
    id              INTEGER PRIMARY KEY,
    token_id        INTEGER,
    vm_id           INTEGER NOT NULL,
    user_name       TEXT    NOT NULL,
    client_addr     TEXT    NOT NULL,
    node            TEXT    NOT NULL,
    started_at      INTEGER NOT NULL,
    ended_at        INTEGER,
    bytes_to_client INTEGER NOT NULL DEFAULT 0,
    bytes_to_server INTEGER NOT NULL DEFAULT 0,
    close_reason    TEXT
);
CREATE INDEX sessions_vm ON sessions(vm_id);
CREATE INDEX sessions_started ON sessions(started_at);
