-- vncbroker schema, version 3: session control and audit.
--
-- A token carries the rules its session follows, resolved at mint time
-- from the VM's settings, the broker's defaults and the caller's choice.
ALTER TABLE tokens ADD COLUMN view_only INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tokens ADD COLUMN exclusive INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tokens ADD COLUMN clipboard TEXT NOT NULL DEFAULT 'both';
ALTER TABLE tokens ADD COLUMN record INTEGER NOT NULL DEFAULT 0;

-- A VM's own settings; NULL takes the broker's default.
ALTER TABLE vms ADD COLUMN control TEXT;
ALTER TABLE vms ADD COLUMN clipboard TEXT;
ALTER TABLE vms ADD COLUMN record INTEGER;

-- What happened in a session. The counts are NULL for a session the proxy
-- relayed without following its messages. recording: NULL (not recorded),
-- 'recording', 'complete' or 'incomplete'.
ALTER TABLE sessions ADD COLUMN view_only INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN key_events INTEGER;
ALTER TABLE sessions ADD COLUMN pointer_events INTEGER;
ALTER TABLE sessions ADD COLUMN clipboard_bytes_to_vm INTEGER;
ALTER TABLE sessions ADD COLUMN clipboard_bytes_from_vm INTEGER;
ALTER TABLE sessions ADD COLUMN recording TEXT;
