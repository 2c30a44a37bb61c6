-- vncbroker schema, version 4: reconnect tickets.
--
-- A live session of a single-use token may give its console page one
-- ticket (an HttpOnly cookie; only its SHA-256 is kept here). Once the
-- session's connection drops, the ticket reopens the console once, from the
-- same address, within the grace; the new session row names the one it
-- continues.
CREATE TABLE reconnect_tickets (
    ticket_hash BLOB    PRIMARY KEY CHECK (length(ticket_hash) = 32),
    session_id  INTEGER NOT NULL UNIQUE,
    token_id    INTEGER NOT NULL,
    client_ip   TEXT    NOT NULL,
    -- NULL while the session is live; once it dropped, the end of the grace.
    valid_until INTEGER
);
CREATE INDEX reconnect_tickets_token ON reconnect_tickets(token_id);

ALTER TABLE sessions ADD COLUMN resumed_from INTEGER;
