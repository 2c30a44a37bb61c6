//! The embedded SQLite backend: one file, WAL mode, migrated on open.
//!
//! SQLite calls block, so each runs on tokio's blocking pool behind one
//! connection mutex. A busy timeout bounds how long a locked file can stall a
//! call before it fails as [`StoreError::Unavailable`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use super::sql;
use super::{
    Cause, ConsoleView, Health, LiveSession, NewSession, NewToken, Opened, RecordedRevocation,
    RecordingState, Redemption, Registry, Resumed, Revocation, Revoked, SessionEnd, SessionFilter,
    SessionLog, SessionPolicy, SessionRecord, StoreError, Ticket, TicketEnd, TokenStore, User, Vm,
    VmPolicy, to_i64, to_u64,
};
use crate::policy::{Clipboard, Control};
use crate::protocol::Protocol;
use crate::token::TokenHash;

/// Versioned migrations, applied in order; `PRAGMA user_version` records the
/// last one applied.
/// A shared statement that names a later parameter first, with SQLite's
/// explicit numbers (`?2`), which bind by number rather than by order.
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

/// A control session of an exclusive VM: inserted only while no other
/// control session of the VM is live.
const INSERT_EXCLUSIVE_SESSION: &str =
    "INSERT INTO sessions (token_id, vm_id, user_name, client_addr, node, started_at,
                           view_only, recording, resumed_from, protocol, spice_session_id)
     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11
     WHERE NOT EXISTS (SELECT 1 FROM sessions
                       WHERE vm_id = ?2 AND ended_at IS NULL AND view_only = 0)";

/// A live session's ticket, replacing the one it had.
const SET_TICKET: &str =
    "INSERT INTO reconnect_tickets (ticket_hash, session_id, token_id, client_ip)
     SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = ?2 AND ended_at IS NULL)
     ON CONFLICT (session_id) DO UPDATE
       SET ticket_hash = excluded.ticket_hash, client_ip = excluded.client_ip, valid_until = NULL";

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/sqlite/0002_revocations.sql"),
    ),
    (
        3,
        include_str!("../../migrations/sqlite/0003_session_control.sql"),
    ),
    (
        4,
        include_str!("../../migrations/sqlite/0004_reconnect_tickets.sql"),
    ),
    (5, include_str!("../../migrations/sqlite/0005_spice.sql")),
];

const BUSY_TIMEOUT: Duration = Duration::from_millis(1500);
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;

pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database file at `path`.
    pub async fn open(path: String) -> Result<SqliteStore, StoreError> {
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection, StoreError> {
            owner_only(&path)?;
            let mut conn = Connection::open(&path).map_err(|e| {
                StoreError::unavailable(format!("cannot open {path}: {e}")).caused_by(e)
            })?;
            conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
            // Room for every statement the store prepares, so none is parsed
            // again on a busy path (rusqlite keeps 16 by default).
            conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            // journal_mode answers with a row, so it is read rather than executed.
            let mode: String = conn
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .map_err(map_err)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::unavailable(format!(
                    "{path}: could not switch to WAL mode (got {mode})"
                )));
            }
            conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
                .map_err(map_err)?;
            migrate(&mut conn)?;
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::internal(e.to_string()).caused_by(e))??;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::internal("connection mutex poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::internal(e.to_string()).caused_by(e))?
    }
}

/// The files SQLite keeps beside the database; they hold the same rows.
const COMPANIONS: &[&str] = &["-wal", "-shm", "-journal"];

/// Makes the database file (created here if missing) and any WAL, SHM or
/// journal file beside it mode 0600, whatever the umask: they hold password
/// hashes, sealed VNC passwords and session records. SQLite creates its
/// WAL and SHM files with the database file's mode, so they follow it.
fn owner_only(path: &str) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if path == ":memory:" || path.starts_with("file:") {
        return Ok(());
    }
    let private = std::fs::Permissions::from_mode(0o600);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        // The umask may have taken bits away from 0600, never added any, but
        // the mode is set outright all the same.
        Ok(file) => file.set_permissions(private.clone()).map_err(|e| {
            StoreError::unavailable(format!("cannot open {path}: {e}")).caused_by(e)
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(StoreError::unavailable(format!("cannot open {path}: {e}")).caused_by(e));
        }
    }
    let companions = COMPANIONS.iter().map(|s| format!("{path}{s}"));
    for file in std::iter::once(path.to_owned()).chain(companions) {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        if meta.permissions().mode() & 0o077 == 0 {
            continue;
        }
        match std::fs::set_permissions(&file, private.clone()) {
            Ok(()) => tracing::warn!(
                file = %file,
                was = format!("{:o}", meta.permissions().mode() & 0o777),
                "database file was readable by others; made it 0600"
            ),
            Err(e) => tracing::warn!(
                file = %file,
                error = %e,
                "database file is readable by others and cannot be made 0600"
            ),
        }
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(map_err)?;
    let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if current > newest {
        return Err(StoreError::unavailable(format!(
            "database schema version {current} is newer than this vncbroker knows ({newest})"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = conn.transaction().map_err(map_err)?;
        tx.execute_batch(sql).map_err(map_err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(map_err)?;
        tx.commit().map_err(map_err)?;
    }
    Ok(())
}

fn map_err(e: rusqlite::Error) -> StoreError {
    let text = e.to_string();
    let kind = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            // 787 is SQLITE_CONSTRAINT_FOREIGNKEY; the rest we map are keys.
            ErrorCode::ConstraintViolation if f.extended_code == 787 => StoreError::not_found(text),
            ErrorCode::ConstraintViolation => StoreError::conflict(text),
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::NotADatabase => StoreError::unavailable(text),
            _ => StoreError::internal(text),
        },
        _ => StoreError::internal(text),
    };
    kind.caused_by(e)
}

fn user_id(conn: &Connection, name: &str) -> Result<i64, StoreError> {
    conn.query_row(sql::USER_ID, [name], |r| r.get(0))
        .optional()
        .map_err(map_err)?
        .ok_or_else(|| StoreError::not_found(format!("user {name:?}")))
}

fn load_vm(conn: &Connection, id: i64) -> Result<Option<Vm>, StoreError> {
    // Cached: every console's set-up reads its VM.
    let row = conn
        .prepare_cached(
            "SELECT v.name, v.vnc_host, v.vnc_port, v.vnc_password, u.name,
                    v.control, v.clipboard, v.record, v.usb_redirect, v.microphone, v.protocol
             FROM vms v JOIN users u ON u.id = v.owner_id WHERE v.id = ?1",
        )
        .and_then(|mut st| {
            st.query_row([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    VmPolicy {
                        usb_redirect: r.get(8)?,
                        microphone: r.get(9)?,
                        ..vm_policy(r.get(5)?, r.get(6)?, r.get(7)?)
                    },
                    r.get::<_, String>(10)?,
                ))
            })
            .optional()
        })
        .map_err(map_err)?;
    let Some((name, vnc_host, vnc_port, vnc_password, owner, policy, protocol)) = row else {
        return Ok(None);
    };
    let protocol = Protocol::from_stored(&protocol)
        .ok_or_else(|| StoreError::internal(format!("vm {id}: unknown protocol {protocol:?}")))?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT u.name FROM vm_users a JOIN users u ON u.id = a.user_id
             WHERE a.vm_id = ?1 ORDER BY u.name",
        )
        .map_err(map_err)?;
    let allowed = stmt
        .query_map([id], |r| r.get::<_, String>(0))
        .map_err(map_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err)?;
    Ok(Some(Vm {
        id,
        name,
        vnc_host,
        vnc_port: u16::try_from(vnc_port)
            .map_err(|_| StoreError::internal(format!("vm {id}: bad port {vnc_port}")))?,
        vnc_password,
        owner,
        allowed,
        policy,
        protocol,
    }))
}

fn insert_allowed(conn: &Connection, vm_id: i64, allowed: &[String]) -> Result<(), StoreError> {
    for name in allowed {
        let uid = user_id(conn, name)?;
        conn.execute(
            "INSERT OR IGNORE INTO vm_users (vm_id, user_id) VALUES (?1, ?2)",
            params![vm_id, uid],
        )
        .map_err(map_err)?;
    }
    Ok(())
}

fn is_admin(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(sql::IS_ADMIN, [name], |r| r.get::<_, bool>(0))
        .optional()
        .map_err(map_err)?
        .unwrap_or(false))
}

fn last_seq(conn: &Connection) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT COALESCE(max(seq), 0) FROM revocations")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(map_err)
}

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        id: r.get(0)?,
        vm_id: r.get(1)?,
        user: r.get(2)?,
        client_addr: r.get(3)?,
        node: r.get(4)?,
        started_at: r.get(5)?,
        ended_at: r.get(6)?,
        bytes_to_client: to_u64(r.get::<_, i64>(7)?),
        bytes_to_server: to_u64(r.get::<_, i64>(8)?),
        close_reason: r.get(9)?,
        view_only: r.get(10)?,
        key_events: r.get::<_, Option<i64>>(11)?.map(to_u64),
        pointer_events: r.get::<_, Option<i64>>(12)?.map(to_u64),
        clipboard_bytes_to_vm: r.get::<_, Option<i64>>(13)?.map(to_u64),
        clipboard_bytes_from_vm: r.get::<_, Option<i64>>(14)?.map(to_u64),
        recording: r.get::<_, Option<String>>(15)?.is_some(),
        recording_state: r
            .get::<_, Option<String>>(15)?
            .as_deref()
            .map(RecordingState::parse),
        resumed_from: r.get(16)?,
        protocol: stored_protocol(r, 17)?,
        channels: to_u64(r.get::<_, i64>(18)?),
    })
}

/// A token row read with `sql::REDEMPTION_COLUMNS`.
fn redemption_row(r: &rusqlite::Row<'_>, revocation_seq: i64) -> rusqlite::Result<Redemption> {
    Ok(Redemption {
        token_id: r.get(0)?,
        vm_id: r.get(1)?,
        target_host: r.get(2)?,
        target_port: r.get(3)?,
        vnc_password: r.get(4)?,
        user_name: r.get(5)?,
        expires_at: r.get(6)?,
        caller_session: r.get(7)?,
        revocation_seq,
        policy: policy_row(r, 8)?,
        single_use: r.get(14)?,
        protocol: stored_protocol(r, 15)?,
    })
}

/// A protocol column; a value this version does not know fails the read,
/// so its console is refused rather than spoken to in the wrong protocol.
fn stored_protocol(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Protocol> {
    let s = r.get::<_, String>(at)?;
    Protocol::from_stored(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            at,
            rusqlite::types::Type::Text,
            format!("unknown protocol {s:?}").into(),
        )
    })
}

/// A token's session rules, from six columns starting at `at`: view_only,
/// exclusive, clipboard, record, usb_redirect, microphone.
fn policy_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<SessionPolicy> {
    Ok(SessionPolicy {
        view_only: r.get(at)?,
        exclusive: r.get(at + 1)?,
        // An unknown value (a newer version's) blocks both ways.
        clipboard: r
            .get::<_, String>(at + 2)?
            .parse()
            .unwrap_or(Clipboard::None),
        record: r.get(at + 3)?,
        usb_redirect: r.get(at + 4)?,
        microphone: r.get(at + 5)?,
    })
}

/// A VM's settings as stored; an unknown value (a newer version's) reads
/// as unset, taking the default.
fn vm_policy(control: Option<String>, clipboard: Option<String>, record: Option<bool>) -> VmPolicy {
    VmPolicy {
        control: control.and_then(|c| c.parse().ok()),
        clipboard: clipboard.and_then(|c| c.parse().ok()),
        record,
        usb_redirect: None,
        microphone: None,
    }
}

/// Records `r` inside the caller's transaction: revokes the tokens it
/// covers, counts the live sessions it ends, and appends it to the log.
fn record_revocation(conn: &Connection, r: &Revocation, now: i64) -> Result<Revoked, StoreError> {
    super::check_scope(r)?;
    let mut tokens = 0u64;
    if r.session_id.is_none() {
        let mut st = conn
            .prepare_cached(
                "UPDATE tokens SET revoked_at = ?1
                 WHERE revoked_at IS NULL AND (?2 IS NULL OR vm_id = ?2)
                   AND (?3 IS NULL OR user_name = ?3)
                 RETURNING expires_at > ?1 AND NOT (single_use = 1 AND used_at IS NOT NULL)",
            )
            .map_err(map_err)?;
        let live = st
            .query_map(params![now, r.vm_id, r.user], |row| row.get::<_, bool>(0))
            .map_err(map_err)?;
        for was_live in live {
            tokens += u64::from(was_live.map_err(map_err)?);
        }
    }
    let sessions: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM sessions
             WHERE ended_at IS NULL AND (?1 IS NULL OR vm_id = ?1)
               AND (?2 IS NULL OR user_name = ?2) AND (?3 IS NULL OR id = ?3)",
        )
        .and_then(|mut s| s.query_row(params![r.vm_id, r.user, r.session_id], |row| row.get(0)))
        .map_err(map_err)?;
    conn.prepare_cached(
        "INSERT INTO revocations (vm_id, user_name, session_id, reason, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            r.vm_id,
            r.user,
            r.session_id,
            r.cause.as_str(),
            now
        ])
    })
    .map_err(map_err)?;
    Ok(Revoked {
        seq: conn.last_insert_rowid(),
        tokens,
        sessions: to_u64(sessions),
    })
}

#[async_trait]
impl TokenStore for SqliteStore {
    async fn insert_token(&self, t: &NewToken) -> Result<i64, StoreError> {
        let t = t.clone();
        self.with(move |c| {
            c.prepare_cached(sql::INSERT_TOKEN)
                .and_then(|mut s| {
                    s.execute(params![
                        &t.hash[..],
                        t.vm_id,
                        t.target_host,
                        t.target_port,
                        t.vnc_password,
                        t.user_name,
                        t.created_at,
                        t.expires_at,
                        t.single_use,
                        t.caller_session,
                        t.policy.view_only,
                        t.policy.exclusive,
                        t.policy.clipboard.as_str(),
                        t.policy.record,
                        t.policy.usb_redirect,
                        t.policy.microphone,
                        t.protocol.as_str(),
                    ])
                })
                .map_err(map_err)?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn revoke(&self, r: &Revocation) -> Result<Revoked, StoreError> {
        let r = r.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(map_err)?;
            let done = record_revocation(&tx, &r, crate::now_unix())?;
            tx.commit().map_err(map_err)?;
            Ok(done)
        })
        .await
    }

    async fn purge_expired(&self, before: i64) -> Result<u64, StoreError> {
        self.with(move |c| {
            let n = c.execute(sql::PURGE_TOKENS, [before]).map_err(map_err)?;
            c.execute(sql::PURGE_TICKETS, [before]).map_err(map_err)?;
            Ok(n as u64)
        })
        .await
    }

    async fn redeem(&self, hash: &TokenHash, now: i64) -> Result<Option<Redemption>, StoreError> {
        let hash = *hash;
        self.with(move |c| {
            // Read before the token is taken: a revocation that lands in
            // between is then later than the session's view, so it applies.
            let revocation_seq = last_seq(c)?;
            let found = c
                .prepare_cached(&numbered(sql::REDEEMABLE))
                .and_then(|mut s| {
                    s.query_row(params![&hash[..], now], |r| {
                        Ok((
                            redemption_row(r, revocation_seq)?,
                            r.get::<_, Option<i64>>(16)?,
                        ))
                    })
                    .optional()
                })
                .map_err(map_err)?;
            match found {
                None => Ok(None),
                Some((r, Some(_first_used))) => Ok(Some(r)),
                // Its main channel claims it.
                Some((r, None)) if r.protocol == Protocol::Spice => Ok(Some(r)),
                Some((_, None)) => c
                    .prepare_cached(&numbered(sql::FIRST_USE))
                    .and_then(|mut s| {
                        s.query_row(params![&hash[..], now], |r| {
                            redemption_row(r, revocation_seq)
                        })
                        .optional()
                    })
                    .map_err(map_err),
            }
        })
        .await
    }

    async fn revocations_after(
        &self,
        seq: i64,
        limit: u32,
    ) -> Result<Vec<RecordedRevocation>, StoreError> {
        self.with(move |c| {
            c.prepare_cached(sql::REVOCATIONS_AFTER)
                .and_then(|mut s| {
                    s.query_map(params![seq, limit], |r| {
                        Ok(RecordedRevocation {
                            seq: r.get(0)?,
                            revocation: Revocation {
                                vm_id: r.get(1)?,
                                user: r.get(2)?,
                                session_id: r.get(3)?,
                                cause: Cause::parse(&r.get::<_, String>(4)?),
                            },
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()
                })
                .map_err(map_err)
        })
        .await
    }

    async fn last_revocation(&self) -> Result<i64, StoreError> {
        self.with(|c| last_seq(c)).await
    }

    async fn purge_revocations(&self, before: i64) -> Result<u64, StoreError> {
        self.with(move |c| {
            let n = c
                .execute(sql::PURGE_REVOCATIONS, [before])
                .map_err(map_err)?;
            Ok(n as u64)
        })
        .await
    }

    async fn console(&self, hash: &TokenHash, now: i64) -> Result<Option<ConsoleView>, StoreError> {
        let hash = *hash;
        self.with(move |c| {
            let token = c
                .prepare_cached(sql::CONSOLE_TOKEN)
                .and_then(|mut st| {
                    st.query_row(params![&hash[..], now], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            policy_row(r, 3)?,
                            stored_protocol(r, 9)?,
                        ))
                    })
                    .optional()
                })
                .map_err(map_err)?;
            let Some((token_id, single_use, expires_at, policy, protocol)) = token else {
                return Ok(None);
            };
            let live = c
                .prepare_cached(sql::LIVE_SESSIONS_OF_TOKEN)
                .and_then(|mut st| {
                    st.query_map([token_id], |r| {
                        Ok(LiveSession {
                            id: r.get(0)?,
                            client_addr: r.get(1)?,
                            started_at: r.get(2)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()
                })
                .map_err(map_err)?;
            Ok(Some(ConsoleView {
                token_id,
                single_use,
                expires_at,
                policy,
                protocol,
                live,
            }))
        })
        .await
    }

    async fn claim_main_channel(&self, token_id: i64, now: i64) -> Result<bool, StoreError> {
        self.with(move |c| {
            let n = c
                .prepare_cached(&numbered(sql::CLAIM_MAIN_CHANNEL))
                .and_then(|mut st| st.execute(params![token_id, now]))
                .map_err(map_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn set_ticket(&self, t: &Ticket) -> Result<(), StoreError> {
        let t = t.clone();
        self.with(move |c| {
            c.prepare_cached(SET_TICKET)
                .and_then(|mut st| {
                    st.execute(params![&t.hash[..], t.session_id, t.token_id, t.client_ip])
                })
                .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn resume(
        &self,
        token: &TokenHash,
        ticket: &TokenHash,
        client_ip: &str,
        now: i64,
    ) -> Result<Resumed, StoreError> {
        let (token, ticket, ip) = (*token, *ticket, client_ip.to_owned());
        self.with(move |c| {
            let revocation_seq = last_seq(c)?;
            let taken = c
                .prepare_cached(&numbered(sql::TAKE_TICKET))
                .and_then(|mut st| {
                    st.query_row(params![&ticket[..], ip, now, &token[..]], |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                    })
                    .optional()
                })
                .map_err(map_err)?;
            let Some((from, token_id)) = taken else {
                let pending = c
                    .prepare_cached(&numbered(sql::PENDING_TICKET))
                    .and_then(|mut st| st.exists(params![&ticket[..], ip, &token[..], now]))
                    .map_err(map_err)?;
                return Ok(if pending {
                    Resumed::Pending
                } else {
                    Resumed::Invalid
                });
            };
            let redemption = c
                .prepare_cached(sql::TOKEN_BY_ID)
                .and_then(|mut st| {
                    st.query_row([token_id], |r| redemption_row(r, revocation_seq))
                        .optional()
                })
                .map_err(map_err)?;
            Ok(match redemption {
                Some(redemption) => Resumed::Session { redemption, from },
                None => Resumed::Invalid,
            })
        })
        .await
    }

    /// SQLite has no way to tell another process's writes: proxies find
    /// revocations by polling alone.
    fn revocation_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
}

#[async_trait]
impl Health for SqliteStore {
    /// Reads the schema, so a locked or unreadable file fails it.
    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| {
            let mut st = c
                .prepare("SELECT id FROM sessions LIMIT 0")
                .map_err(map_err)?;
            st.query([])
                .and_then(|mut rows| rows.next().map(|_| ()))
                .map_err(map_err)
        })
        .await
    }
}

#[async_trait]
impl SessionLog for SqliteStore {
    async fn open_session(&self, s: &NewSession) -> Result<Opened, StoreError> {
        let s = s.clone();
        self.with(move |c| {
            // One statement: SQLite runs it alone, so the check and the
            // insert cannot be split by another node's insert.
            let exclusive = s.exclusive && !s.view_only;
            let sql = if exclusive {
                INSERT_EXCLUSIVE_SESSION
            } else {
                sql::INSERT_SESSION
            };
            let recording = s.recording.then_some(RecordingState::Recording.as_str());
            let n = c
                .prepare_cached(sql)
                .and_then(|mut st| {
                    st.execute(params![
                        s.token_id,
                        s.vm_id,
                        s.user_name,
                        s.client_addr,
                        s.node,
                        s.started_at,
                        s.view_only,
                        recording,
                        s.resumed_from,
                        s.protocol.as_str(),
                        s.spice_session_id,
                    ])
                })
                .map_err(map_err)?;
            if n == 0 {
                return Ok(Opened::ControlTaken);
            }
            Ok(Opened::Session(c.last_insert_rowid()))
        })
        .await
    }

    async fn spice_session(
        &self,
        token_id: i64,
        spice_session_id: u32,
    ) -> Result<Option<i64>, StoreError> {
        self.with(move |c| {
            c.prepare_cached(sql::SPICE_SESSION)
                .and_then(|mut st| {
                    st.query_row(params![token_id, spice_session_id], |r| r.get(0))
                        .optional()
                })
                .map_err(map_err)
        })
        .await
    }

    async fn add_channel(
        &self,
        id: i64,
        joined: bool,
        bytes_to_client: u64,
        bytes_to_server: u64,
    ) -> Result<(), StoreError> {
        self.with(move |c| {
            c.prepare_cached(&numbered(sql::ADD_CHANNEL))
                .and_then(|mut st| {
                    st.execute(params![
                        id,
                        i64::from(joined),
                        to_i64(bytes_to_client),
                        to_i64(bytes_to_server)
                    ])
                })
                .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn close_session(&self, id: i64, end: &SessionEnd) -> Result<(), StoreError> {
        let end = end.clone();
        self.with(move |c| {
            let audit = end.audit;
            let tx = c.transaction().map_err(map_err)?;
            tx.prepare_cached(&numbered(sql::CLOSE_SESSION))
                .and_then(|mut st| {
                    st.execute(params![
                        id,
                        end.ended_at,
                        to_i64(end.bytes_to_client),
                        to_i64(end.bytes_to_server),
                        end.reason,
                        audit.map(|a| to_i64(a.key_events)),
                        audit.map(|a| to_i64(a.pointer_events)),
                        audit.map(|a| to_i64(a.clipboard_bytes_to_vm)),
                        audit.and_then(|a| a.clipboard_bytes_from_vm).map(to_i64),
                        end.recording.map(RecordingState::as_str),
                    ])
                })
                .map_err(map_err)?;
            match end.ticket {
                TicketEnd::NoTicket => Ok(0),
                TicketEnd::Void => tx.execute(sql::VOID_TICKET, [id]),
                TicketEnd::ValidUntil(until) => {
                    tx.execute(&numbered(sql::ARM_TICKET), params![id, until])
                }
            }
            .map_err(map_err)?;
            tx.commit().map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRecord>, StoreError> {
        let f = filter.clone();
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "{}WHERE (?1 IS NULL OR vm_id = ?1) AND (?2 IS NULL OR user_name = ?2)
                       AND (?3 IS NULL OR started_at >= ?3) AND (?4 = 0 OR ended_at IS NULL)
                     ORDER BY started_at DESC, id DESC LIMIT ?5",
                    sql::SESSION_COLUMNS
                ))
                .map_err(map_err)?;
            let rows = stmt
                .query_map(
                    params![f.vm_id, f.user, f.since, f.live, f.limit],
                    session_row,
                )
                .map_err(map_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(map_err)
        })
        .await
    }

    async fn session(&self, id: i64) -> Result<Option<SessionRecord>, StoreError> {
        self.with(move |c| {
            c.prepare_cached(sql::SESSION_BY_ID)
                .and_then(|mut s| s.query_row([id], session_row).optional())
                .map_err(map_err)
        })
        .await
    }

    async fn close_orphaned_sessions(&self, node: &str, now: i64) -> Result<u64, StoreError> {
        let node = node.to_owned();
        self.with(move |c| {
            let tx = c.transaction().map_err(map_err)?;
            tx.execute(sql::VOID_ORPHANED_TICKETS, [&node])
                .map_err(map_err)?;
            let n = tx
                .execute(&numbered(sql::CLOSE_ORPHANED_SESSIONS), params![node, now])
                .map_err(map_err)?;
            tx.commit().map_err(map_err)?;
            Ok(n as u64)
        })
        .await
    }

    async fn purge_sessions(&self, before: i64) -> Result<u64, StoreError> {
        // A session ends after it starts, so `started_at < before` holds for
        // every row to delete and lets the sessions_started index bound the scan.
        self.with(move |c| {
            let n = c
                .execute(
                    "DELETE FROM sessions
                     WHERE started_at < ?1 AND ended_at IS NOT NULL AND ended_at < ?1",
                    [before],
                )
                .map_err(map_err)?;
            Ok(n as u64)
        })
        .await
    }
}

#[async_trait]
impl Registry for SqliteStore {
    async fn add_user(&self, name: &str, hash: &str, admin: bool) -> Result<i64, StoreError> {
        let (name, hash) = (name.to_owned(), hash.to_owned());
        let now = crate::now_unix();
        self.with(move |c| {
            c.execute(
                "INSERT INTO users (name, password_hash, admin, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![name, hash, admin, now],
            )
            .map_err(|e| match map_err(e) {
                StoreError::Conflict { source, .. } => StoreError::Conflict {
                    what: format!("user {name:?}"),
                    source,
                },
                other => other,
            })?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    async fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        let name = name.to_owned();
        self.with(move |c| {
            c.prepare_cached(sql::USER_BY_NAME)
                .and_then(|mut s| {
                    s.query_row([name], |r| {
                        Ok(User {
                            id: r.get(0)?,
                            name: r.get(1)?,
                            password_hash: r.get(2)?,
                            admin: r.get(3)?,
                        })
                    })
                    .optional()
                })
                .map_err(map_err)
        })
        .await
    }

    async fn users(&self) -> Result<Vec<User>, StoreError> {
        self.with(|c| {
            let mut s = c
                .prepare("SELECT id, name, password_hash, admin FROM users ORDER BY name")
                .map_err(map_err)?;
            let rows = s
                .query_map([], |r| {
                    Ok(User {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        password_hash: r.get(2)?,
                        admin: r.get(3)?,
                    })
                })
                .map_err(map_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(map_err)
        })
        .await
    }

    async fn set_password(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        let (name, hash) = (name.to_owned(), hash.to_owned());
        self.with(move |c| {
            let n = c
                .execute(
                    "UPDATE users SET password_hash = ?2 WHERE name = ?1",
                    params![name, hash],
                )
                .map_err(map_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn remove_user(&self, name: &str) -> Result<Option<Revoked>, StoreError> {
        let name = name.to_owned();
        self.with(move |c| {
            let tx = c.transaction().map_err(map_err)?;
            let Some(uid) = tx
                .query_row(sql::USER_ID, [&name], |r| r.get::<_, i64>(0))
                .optional()
                .map_err(map_err)?
            else {
                return Ok(None);
            };
            let owned = tx
                .prepare(sql::VMS_OWNED_BY)
                .and_then(|mut s| {
                    s.query_map([uid], |r| r.get::<_, i64>(0))?
                        .collect::<Result<Vec<_>, _>>()
                })
                .map_err(map_err)?;
            if !owned.is_empty() {
                return Err(StoreError::conflict(format!(
                    "user {name:?} owns VMs {owned:?}: remove them or give them another owner first"
                )));
            }
            let done = record_revocation(
                &tx,
                &Revocation::user(&name, None, Cause::UserRemoved),
                crate::now_unix(),
            )?;
            tx.execute(sql::DELETE_USER, [uid]).map_err(map_err)?;
            tx.commit().map_err(map_err)?;
            Ok(Some(done))
        })
        .await
    }

    async fn add_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        let vm = vm.clone();
        let now = crate::now_unix();
        self.with(move |c| {
            let tx = c.transaction().map_err(map_err)?;
            let owner = user_id(&tx, &vm.owner)?;
            tx.execute(
                "INSERT INTO vms (id, name, vnc_host, vnc_port, vnc_password, owner_id, created_at,
                                  control, clipboard, record, usb_redirect, microphone, protocol)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    vm.id,
                    vm.name,
                    vm.vnc_host,
                    vm.vnc_port,
                    vm.vnc_password,
                    owner,
                    now,
                    vm.policy.control.map(Control::as_str),
                    vm.policy.clipboard.map(Clipboard::as_str),
                    vm.policy.record,
                    vm.policy.usb_redirect,
                    vm.policy.microphone,
                    vm.protocol.as_str(),
                ],
            )
            .map_err(|e| match map_err(e) {
                StoreError::Conflict { source, .. } => StoreError::Conflict {
                    what: format!("vm {}", vm.id),
                    source,
                },
                other => other,
            })?;
            insert_allowed(&tx, vm.id, &vm.allowed)?;
            tx.commit().map_err(map_err)
        })
        .await
    }

    async fn update_vm(&self, vm: &Vm) -> Result<Option<Revoked>, StoreError> {
        let vm = vm.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(map_err)?;
            let Some(old) = load_vm(&tx, vm.id)? else {
                return Ok(None);
            };
            let owner = user_id(&tx, &vm.owner)?;
            tx.execute(
                "UPDATE vms SET name = ?2, vnc_host = ?3, vnc_port = ?4, vnc_password = ?5,
                                owner_id = ?6, control = ?7, clipboard = ?8, record = ?9,
                                usb_redirect = ?10, microphone = ?11, protocol = ?12
                 WHERE id = ?1",
                params![
                    vm.id,
                    vm.name,
                    vm.vnc_host,
                    vm.vnc_port,
                    vm.vnc_password,
                    owner,
                    vm.policy.control.map(Control::as_str),
                    vm.policy.clipboard.map(Clipboard::as_str),
                    vm.policy.record,
                    vm.policy.usb_redirect,
                    vm.policy.microphone,
                    vm.protocol.as_str(),
                ],
            )
            .map_err(map_err)?;
            tx.execute(sql::DELETE_VM_USERS, [vm.id]).map_err(map_err)?;
            insert_allowed(&tx, vm.id, &vm.allowed)?;
            let now = crate::now_unix();
            let mut done = Revoked::default();
            for r in super::withdrawn(&old, &vm) {
                if let Some(user) = &r.user
                    && is_admin(&tx, user)?
                {
                    continue;
                }
                done = done.and(record_revocation(&tx, &r, now)?);
            }
            tx.commit().map_err(map_err)?;
            Ok(Some(done))
        })
        .await
    }

    async fn vm(&self, id: i64) -> Result<Option<Vm>, StoreError> {
        self.with(move |c| load_vm(c, id)).await
    }

    async fn vms(&self) -> Result<Vec<Vm>, StoreError> {
        self.with(|c| {
            let ids = c
                .prepare("SELECT id FROM vms ORDER BY id")
                .and_then(|mut s| {
                    s.query_map([], |r| r.get::<_, i64>(0))?
                        .collect::<Result<Vec<_>, _>>()
                })
                .map_err(map_err)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(vm) = load_vm(c, id)? {
                    out.push(vm);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn remove_vm(&self, id: i64) -> Result<Option<Revoked>, StoreError> {
        self.with(move |c| {
            let tx = c.transaction().map_err(map_err)?;
            let n = tx.execute(sql::DELETE_VM, [id]).map_err(map_err)?;
            if n == 0 {
                return Ok(None);
            }
            let done = record_revocation(
                &tx,
                &Revocation::vm(id, Cause::VmRemoved),
                crate::now_unix(),
            )?;
            tx.commit().map_err(map_err)?;
            Ok(Some(done))
        })
        .await
    }

    async fn sealed_vnc_password(&self) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.query_row(sql::SEALED_VNC_PASSWORD, [], |r| r.get(0))
                .optional()
                .map_err(map_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    //! SQLite specifics; the behaviour every backend shares is tested in
    //! `store::tests`, against each backend.
    use super::*;

    #[tokio::test]
    async fn reopening_keeps_data_and_does_not_remigrate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db").to_string_lossy().into_owned();
        {
            let s = SqliteStore::open(path.clone()).await.unwrap();
            s.add_user("alice", "h", false).await.unwrap();
        }
        let s = SqliteStore::open(path).await.unwrap();
        assert_eq!(s.users().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn unsupported_urls_are_clear_errors() {
        let err = crate::store::open("mysql://x").await.err().unwrap();
        assert!(err.to_string().contains("unsupported"), "{err}");
        assert!(crate::store::open("sqlite://").await.is_err());
    }

    #[tokio::test]
    async fn purge_sessions_deletes_only_rows_that_ended_before_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("t.db").to_string_lossy().into_owned())
            .await
            .unwrap();
        s.ping().await.unwrap();
        let open = |started_at| NewSession {
            resumed_from: None,
            protocol: Default::default(),
            spice_session_id: None,
            token_id: 1,
            vm_id: 1,
            user_name: "alice".into(),
            client_addr: "127.0.0.1:1".into(),
            node: "n".into(),
            started_at,
            view_only: false,
            exclusive: false,
            recording: false,
        };
        let end = |ended_at| SessionEnd {
            ticket: TicketEnd::NoTicket,
            ended_at,
            bytes_to_client: 0,
            bytes_to_server: 0,
            reason: "client closed".into(),
            audit: None,
            recording: None,
        };
        let old = s
            .open_session(&open(100))
            .await
            .unwrap()
            .id()
            .expect("opened");
        s.close_session(old, &end(200)).await.unwrap();
        let _old_but_live = s
            .open_session(&open(100))
            .await
            .unwrap()
            .id()
            .expect("opened");
        let recent = s
            .open_session(&open(900))
            .await
            .unwrap()
            .id()
            .expect("opened");
        s.close_session(recent, &end(1000)).await.unwrap();
        let ended_at_cutoff = s
            .open_session(&open(400))
            .await
            .unwrap()
            .id()
            .expect("opened");
        s.close_session(ended_at_cutoff, &end(500)).await.unwrap();

        assert_eq!(s.purge_sessions(500).await.unwrap(), 1);
        let filter = SessionFilter {
            limit: 10,
            ..SessionFilter::default()
        };
        let mut left: Vec<i64> = s
            .sessions(&filter)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        left.sort();
        assert!(!left.contains(&old), "{left:?}");
        assert_eq!(left.len(), 3, "{left:?}");
        assert_eq!(s.purge_sessions(500).await.unwrap(), 0);
    }
}
