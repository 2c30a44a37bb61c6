//! The statements both backends run as they are: one text, written with
//! `$1`, `$2`, ... in the order they first appear, which SQLite numbers the
//! same way PostgreSQL does. Statements whose dialects differ (upserts,
//! clock, casts, collation) or that name a later parameter first stay with
//! their backend.

macro_rules! insert_token {
    () => {
        "INSERT INTO tokens (token_hash, vm_id, target_host, target_port, vnc_password,
                             user_name, created_at, expires_at, single_use, caller_session,
                             view_only, exclusive, clipboard, record, usb_redirect, microphone,
                             protocol)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    };
}

macro_rules! insert_session {
    () => {
        "INSERT INTO sessions (token_id, vm_id, user_name, client_addr, node, started_at,
                               view_only, recording, resumed_from, protocol, spice_session_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    };
}

/// The columns both backends' session rows are read from, in this order.
macro_rules! session_columns {
    () => {
        "SELECT id, vm_id, user_name, client_addr, node, started_at, ended_at,
                bytes_to_client, bytes_to_server, close_reason, view_only, key_events,
                pointer_events, clipboard_bytes_to_vm, clipboard_bytes_from_vm, recording,
                resumed_from, protocol, channels
         FROM sessions "
    };
}

pub(super) const INSERT_TOKEN: &str = insert_token!();
pub(super) const INSERT_TOKEN_RETURNING_ID: &str = concat!(insert_token!(), " RETURNING id");
pub(super) const PURGE_TOKENS: &str =
    "DELETE FROM tokens WHERE expires_at <= $1 OR revoked_at IS NOT NULL";
pub(super) const REVOCATIONS_AFTER: &str =
    "SELECT seq, vm_id, user_name, session_id, reason FROM revocations
     WHERE seq > $1 ORDER BY seq LIMIT $2";
pub(super) const PURGE_REVOCATIONS: &str = "DELETE FROM revocations WHERE created_at < $1";

pub(super) const INSERT_SESSION: &str = insert_session!();
pub(super) const INSERT_SESSION_RETURNING_ID: &str = concat!(insert_session!(), " RETURNING id");
pub(super) const SESSION_BY_ID: &str = concat!(session_columns!(), "WHERE id = $1");
pub(super) const SESSION_COLUMNS: &str = session_columns!();
/// The end of a session, with what the proxy saw of it; its bytes add to
/// those of the SPICE channels that ended before it. It names `$2` first:
/// SQLite runs it with explicit numbers.
pub(super) const CLOSE_SESSION: &str =
    "UPDATE sessions SET ended_at = $2, bytes_to_client = bytes_to_client + $3,
                         bytes_to_server = bytes_to_server + $4,
                         close_reason = $5, key_events = $6, pointer_events = $7,
                         clipboard_bytes_to_vm = $8, clipboard_bytes_from_vm = $9,
                         recording = $10
     WHERE id = $1";
/// Rows a node left open: they end now, and so does a recording they had
/// running. It names `$2` first: SQLite runs it with explicit numbers.
pub(super) const CLOSE_ORPHANED_SESSIONS: &str =
    "UPDATE sessions SET ended_at = $2, close_reason = 'node restarted',
                         recording = CASE WHEN recording IS NULL THEN NULL ELSE 'incomplete' END
     WHERE node = $1 AND ended_at IS NULL";

/// What the console page is told about a token it holds.
pub(super) const CONSOLE_TOKEN: &str =
    "SELECT id, single_use, expires_at, view_only, exclusive, clipboard, record, usb_redirect,
            microphone, protocol FROM tokens
     WHERE token_hash = $1 AND revoked_at IS NULL AND expires_at > $2";
pub(super) const LIVE_SESSIONS_OF_TOKEN: &str = "SELECT id, client_addr, started_at FROM sessions
     WHERE token_id = $1 AND ended_at IS NULL ORDER BY started_at DESC, id DESC LIMIT 16";
/// Takes a ticket whose session dropped, within its grace, for a token
/// that still opens consoles.
pub(super) const TAKE_TICKET: &str = "DELETE FROM reconnect_tickets
     WHERE ticket_hash = $1 AND client_ip = $2 AND valid_until IS NOT NULL AND valid_until > $3
       AND token_id = (SELECT id FROM tokens
                       WHERE token_hash = $4 AND revoked_at IS NULL AND expires_at > $3)
     RETURNING session_id, token_id";
/// A ticket whose session is still live, or whose drop was recorded
/// between `TAKE_TICKET` and this query: the client asks again.
pub(super) const PENDING_TICKET: &str =
    "SELECT 1 FROM reconnect_tickets r JOIN tokens t ON t.id = r.token_id
     WHERE r.ticket_hash = $1 AND r.client_ip = $2
       AND t.token_hash = $3 AND t.revoked_at IS NULL AND t.expires_at > $4
       AND (r.valid_until IS NULL OR r.valid_until > $4)";
/// The redemption columns, in the order the backends read them.
macro_rules! redemption_columns {
    () => {
        "id, vm_id, target_host, target_port, vnc_password, user_name, expires_at,
         caller_session, view_only, exclusive, clipboard, record, usb_redirect, microphone,
         single_use, protocol"
    };
}
pub(super) const REDEMPTION_COLUMNS: &str = redemption_columns!();
/// Tokens that open a console now. A used single-use SPICE token still
/// opens the channels that join its session.
macro_rules! redeemable_where {
    () => {
        "WHERE token_hash = $1 AND revoked_at IS NULL AND expires_at > $2
           AND (NOT single_use OR used_at IS NULL OR protocol = 'spice')"
    };
}
pub(super) const REDEEMABLE_WHERE: &str = redeemable_where!();
/// A token that opens a console now, with its first use (`used_at`) last.
/// A reusable token already used is redeemed by this read alone; only a
/// first use is written.
pub(super) const REDEEMABLE: &str = concat!(
    "SELECT ",
    redemption_columns!(),
    ", used_at FROM tokens ",
    redeemable_where!()
);

/// Marks a token's first use and reads it, in one statement: of concurrent
/// first redemptions of a single-use token, one matches.
pub(super) const FIRST_USE: &str = concat!(
    "UPDATE tokens SET used_at = COALESCE(used_at, $2) ",
    redeemable_where!(),
    " RETURNING ",
    redemption_columns!()
);
/// A SPICE main channel takes its token's use. It names `$2` first: SQLite
/// runs it with explicit numbers.
pub(super) const CLAIM_MAIN_CHANNEL: &str = "UPDATE tokens SET used_at = COALESCE(used_at, $2)
     WHERE id = $1 AND revoked_at IS NULL AND expires_at > $2
       AND (NOT single_use OR used_at IS NULL)";
/// The live SPICE session a channel joins.
pub(super) const SPICE_SESSION: &str = "SELECT id FROM sessions
     WHERE token_id = $1 AND spice_session_id = $2 AND ended_at IS NULL";
/// A SPICE channel joined (`$2` = 1) or moved its bytes. It names `$2`
/// first: SQLite runs it with explicit numbers.
pub(super) const ADD_CHANNEL: &str =
    "UPDATE sessions SET channels = channels + $2, bytes_to_client = bytes_to_client + $3,
                         bytes_to_server = bytes_to_server + $4
     WHERE id = $1";
pub(super) const TOKEN_BY_ID: &str = concat!(
    "SELECT ",
    redemption_columns!(),
    " FROM tokens WHERE id = $1"
);
/// A dropped session's ticket is valid until `$2`.
pub(super) const ARM_TICKET: &str =
    "UPDATE reconnect_tickets SET valid_until = $2 WHERE session_id = $1";
pub(super) const VOID_TICKET: &str = "DELETE FROM reconnect_tickets WHERE session_id = $1";
/// Tickets past their grace, or whose token is gone.
pub(super) const PURGE_TICKETS: &str = "DELETE FROM reconnect_tickets
     WHERE valid_until <= $1 OR token_id NOT IN (SELECT id FROM tokens)";
/// The tickets of the rows a node left open: they never become valid.
pub(super) const VOID_ORPHANED_TICKETS: &str = "DELETE FROM reconnect_tickets
     WHERE session_id IN (SELECT id FROM sessions WHERE node = $1 AND ended_at IS NULL)";

pub(super) const USER_ID: &str = "SELECT id FROM users WHERE name = $1";
pub(super) const USER_BY_NAME: &str =
    "SELECT id, name, password_hash, admin FROM users WHERE name = $1";
pub(super) const IS_ADMIN: &str = "SELECT admin FROM users WHERE name = $1";
pub(super) const VMS_OWNED_BY: &str = "SELECT id FROM vms WHERE owner_id = $1 ORDER BY id";
pub(super) const DELETE_USER: &str = "DELETE FROM users WHERE id = $1";
pub(super) const DELETE_VM_USERS: &str = "DELETE FROM vm_users WHERE vm_id = $1";
pub(super) const DELETE_VM: &str = "DELETE FROM vms WHERE id = $1";
pub(super) const SEALED_VNC_PASSWORD: &str =
    "SELECT vnc_password FROM vms WHERE vnc_password IS NOT NULL LIMIT 1";
