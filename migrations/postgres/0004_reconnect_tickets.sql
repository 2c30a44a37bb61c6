-- vncbroker schema for PostgreSQL, version 4: reconnect tickets
-- (see migrations/sqlite/0004_reconnect_tickets.sql).
CREATE TABLE reconnect_tickets (
    ticket_hash BYTEA   PRIMARY KEY CHECK (length(ticket_hash) = 32),
    session_id  BIGINT  NOT NULL UNIQUE,
    token_id    BIGINT  NOT NULL,
    client_ip   TEXT    NOT NULL,
    -- NULL while the session is live; once it dropped, the end of the grace.
    valid_until BIGINT
);
CREATE INDEX reconnect_tickets_token ON reconnect_tickets(token_id);

ALTER TABLE sessions ADD COLUMN resumed_from BIGINT;
