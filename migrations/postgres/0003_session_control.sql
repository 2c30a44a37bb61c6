-- vncbroker schema for PostgreSQL, version 3: session control and audit
-- (see migrations/sqlite/0003_session_control.sql).
--
-- A token carries the rules its session follows, resolved at mint time
-- from the VM's settings, the broker's defaults and the caller's choice.
ALTER TABLE tokens ADD COLUMN view_only BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE tokens ADD COLUMN exclusive BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE tokens ADD COLUMN clipboard TEXT NOT NULL DEFAULT 'both';
ALTER TABLE tokens ADD COLUMN record BOOLEAN NOT NULL DEFAULT false;

-- A VM's own settings; NULL takes the broker's default.
ALTER TABLE vms ADD COLUMN control TEXT;
ALTER TABLE vms ADD COLUMN clipboard TEXT;
ALTER TABLE vms ADD COLUMN record BOOLEAN;

-- What happened in a session. The counts are NULL for a session the proxy
-- relayed without following its messages. recording: NULL (not recorded),
-- 'recording', 'complete' or 'incomplete'.
ALTER TABLE sessions ADD COLUMN view_only BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE sessions ADD COLUMN key_events BIGINT;
ALTER TABLE sessions ADD COLUMN pointer_events BIGINT;
ALTER TABLE sessions ADD COLUMN clipboard_bytes_to_vm BIGINT;
ALTER TABLE sessions ADD COLUMN clipboard_bytes_from_vm BIGINT;
ALTER TABLE sessions ADD COLUMN recording TEXT;
