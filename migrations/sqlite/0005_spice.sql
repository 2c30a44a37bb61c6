-- vncbroker schema, version 5: SPICE consoles.
--
-- A VM's console speaks VNC or SPICE; its tokens keep the protocol they
-- were minted for. A SPICE console is one TCP connection per channel: its
-- session row is the main channel's, it keeps the SPICE session id the
-- server gave (so the other channels, wherever they land, can join it),
-- and counts the channels that joined. USB redirection and the microphone
-- are off unless the VM allows them (NULL: not allowed).
ALTER TABLE vms ADD COLUMN protocol TEXT NOT NULL DEFAULT 'vnc';
ALTER TABLE vms ADD COLUMN usb_redirect INTEGER;
ALTER TABLE vms ADD COLUMN microphone INTEGER;

ALTER TABLE tokens ADD COLUMN protocol TEXT NOT NULL DEFAULT 'vnc';
ALTER TABLE tokens ADD COLUMN usb_redirect INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tokens ADD COLUMN microphone INTEGER NOT NULL DEFAULT 0;

ALTER TABLE sessions ADD COLUMN protocol TEXT NOT NULL DEFAULT 'vnc';
ALTER TABLE sessions ADD COLUMN spice_session_id INTEGER;
ALTER TABLE sessions ADD COLUMN channels INTEGER NOT NULL DEFAULT 1;
CREATE INDEX sessions_spice ON sessions(token_id, spice_session_id)
    WHERE spice_session_id IS NOT NULL;
