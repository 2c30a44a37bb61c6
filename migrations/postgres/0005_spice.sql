-- vncbroker schema for PostgreSQL, version 5: SPICE consoles
-- (see migrations/sqlite/0005_spice.sql).
ALTER TABLE vms ADD COLUMN protocol TEXT NOT NULL DEFAULT 'vnc';
ALTER TABLE vms ADD COLUMN usb_redirect BOOLEAN;
ALTER TABLE vms ADD COLUMN microphone BOOLEAN;

ALTER TABLE tokens ADD COLUMN protocol TEXT NOT NULL DEFAULT 'vnc';
ALTER TABLE tokens ADD COLUMN usb_redirect BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE tokens ADD COLUMN microphone BOOLEAN NOT NULL DEFAULT FALSE;

ALTER TABLE sessions ADD COLUMN protocol TEXT NOT NULL DEFAULT 'vnc';
ALTER TABLE sessions ADD COLUMN spice_session_id BIGINT;
ALTER TABLE sessions ADD COLUMN channels BIGINT NOT NULL DEFAULT 1;
CREATE INDEX sessions_spice ON sessions(token_id, spice_session_id)
    WHERE spice_session_id IS NOT NULL;
