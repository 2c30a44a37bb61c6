//! The PostgreSQL backend: one database shared by any number of nodes.
//!
//! Calls go through a small connection pool (deadpool) with short timeouts,
//! so that with the database unreachable every call fails within about two
//! seconds as [`StoreError::Unavailable`], and the pool heals by itself when
//! the database is back: a connection the server closed is noticed when it
//! is next taken from the pool, dropped, and replaced by a new one.
//!
//! Revocations are announced with `NOTIFY vncbroker_revoked` in the
//! transaction that revokes; a proxy node keeps one dedicated `LISTEN`
//! connection (reconnecting with backoff) and wakes its revocation watcher on
//! each notice. The watcher's periodic look stays as the fallback.
//!
//! The `database` setting is a libpq connection string ([`conninfo`]):
//! several hosts may be listed (a primary and its standbys), and the pool
//! and the LISTEN connection then go to whichever accepts writes, by
//! themselves again after a failover. TLS follows its `sslmode` ([`pgtls`]).
//!
//! [`conninfo`]: super::conninfo
//! [`pgtls`]: super::pgtls

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use std::pin::Pin;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::Socket;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Row};

use super::conninfo::{ConnInfo, SslMode};
use super::pgtls::{self, Connector};
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

/// Versioned migrations, applied in order; `schema_migrations` records the
/// ones applied.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_revocations.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_session_control.sql"),
    ),
    (
        4,
        include_str!("../../migrations/postgres/0004_reconnect_tickets.sql"),
    ),
    (5, include_str!("../../migrations/postgres/0005_spice.sql")),
];

/// The advisory lock that serialises migrations of nodes starting at once
/// ("vncbrokr" in ASCII).
const MIGRATION_LOCK: i64 = 0x766e_6362_726f_6b72;

/// The first key of the advisory locks that serialise the control sessions
/// of exclusive VMs (the second is the VM id, wrapped to 32 bits: two VMs
/// that share a lock only wait for each other a moment).
const EXCLUSIVE_LOCK: i32 = 0x766e_6362;

/// The channel revocations are announced on; the payload is the seq.
pub const REVOCATION_CHANNEL: &str = "vncbroker_revoked";

/// Connections per node.
const POOL_SIZE: usize = 8;
/// How long a call may wait for a free connection, for a new connection to
/// be set up (per host listed: each is tried in turn, and a host that has
/// not finished the handshake by then is passed over), and for a pooled one
/// to be checked.
const POOL_WAIT: Duration = Duration::from_secs(1);
const POOL_CREATE: Duration = Duration::from_secs(1);
const POOL_RECYCLE: Duration = Duration::from_secs(1);
/// TCP (or Unix socket) connect timeout per host, unless the URL sets one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Server-side limit on one statement, unless the URL's options set one.
const STATEMENT_TIMEOUT_MS: u64 = 3000;
/// Client-side limit on one store call, for a server that stops answering
/// without closing the connection (a network partition).
const CALL_TIMEOUT: Duration = Duration::from_millis(STATEMENT_TIMEOUT_MS + 1000);
/// The limit on [`Store::ping`], under `/readyz`'s own 3 s, so that a hung
/// server is noticed (and its connections dropped) by the ping itself.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the LISTEN connection checks that its server still answers (a
/// hung server sends no notices and no error), and how long it waits.
const LISTEN_PING: Duration = Duration::from_secs(3);
const LISTEN_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff of the LISTEN connection between reconnection attempts.
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(3);

pub struct PgStore {
    pool: Pool,
    /// One per listed host, for the dedicated LISTEN connection.
    hosts: Arc<[tokio_postgres::Config]>,
    tls: Connector,
    /// How long setting up one connection may take, all hosts tried.
    create_timeout: Duration,
    /// Woken on each revocation notice; created with the listener, on first use.
    signal: OnceLock<Arc<Notify>>,
    listener: Mutex<Option<JoinHandle<()>>>,
    listening: Arc<AtomicBool>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Ok(mut listener) = self.listener.lock()
            && let Some(task) = listener.take()
        {
            task.abort();
        }
    }
}

/// Runs `$body` (an expression of type `Result<_, StoreError>`, which may use
/// `?`) with a pooled connection bound to `$c`, within [`CALL_TIMEOUT`] (or
/// the limit given first). A connection that timed out is kept out of the
/// pool, and so are the idle ones: their server may be hung, and new
/// connections pass a hung host over for the next one listed.
macro_rules! with_conn {
    ($self:ident, |$c:ident| $body:expr) => {
        with_conn!($self, CALL_TIMEOUT, |$c| $body)
    };
    ($self:ident, $limit:expr, |$c:ident| $body:expr) => {{
        #[allow(unused_mut)]
        let mut $c = $self.conn().await?;
        let limit: Duration = $limit;
        let outcome = timed(limit, async { $body }).await;
        match outcome {
            Some(result) => result,
            None => {
                drop(Object::take($c));
                $self.drop_idle();
                Err(StoreError::unavailable(format!(
                    "PostgreSQL did not answer within {limit:?}"
                )))
            }
        }
    }};
}

async fn timed<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Option<Result<T, StoreError>> {
    tokio::time::timeout(limit, fut).await.ok()
}

/// The client and connection a connection attempt yields.
type Connected = (
    tokio_postgres::Client,
    tokio_postgres::Connection<Socket, <Connector as MakeTlsConnect<Socket>>::Stream>,
);

/// Connects to the first of `hosts` (one configuration per listed host)
/// that takes the connection, as the client's own multi-host connect does,
/// but gives each host but the last [`POOL_CREATE`] to finish the handshake:
/// a server that accepts connections and never answers (hung) is passed over.
/// The caller's deadline bounds the last.
async fn connect_first(
    hosts: &[tokio_postgres::Config],
    tls: &Connector,
) -> Result<Connected, tokio_postgres::Error> {
    let Some((last, earlier)) = hosts.split_last() else {
        // Never so (every connection string names a host): the client says why.
        return tokio_postgres::Config::new().connect(tls.clone()).await;
    };
    for (i, host) in earlier.iter().enumerate() {
        match tokio::time::timeout(POOL_CREATE, host.connect(tls.clone())).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => {
                tracing::debug!(host = i + 1, error = %describe(&e), "PostgreSQL host refused; trying the next")
            }
            Err(_) => tracing::warn!(
                host = i + 1,
                "PostgreSQL host did not answer within {POOL_CREATE:?}; trying the next"
            ),
        }
    }
    last.connect(tls.clone()).await
}

/// The pool's way of connecting: [`connect_first`].
struct FirstHost {
    hosts: Arc<[tokio_postgres::Config]>,
    tls: Connector,
}

impl deadpool_postgres::Connect for FirstHost {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<
                        (tokio_postgres::Client, JoinHandle<()>),
                        tokio_postgres::Error,
                    >,
                > + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            let (client, connection) = connect_first(&self.hosts, &self.tls).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %describe(&e), "PostgreSQL connection ended");
                }
            });
            Ok((client, task))
        })
    }
}

/// Our settings on every connection, unless the URL sets its own.
fn tune(config: &mut tokio_postgres::Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("vncbroker");
    }
    // Ours first, so options given in the URL win.
    let options = format!(
        "-c statement_timeout={STATEMENT_TIMEOUT_MS} -c idle_in_transaction_session_timeout=10000 {}",
        config.get_options().unwrap_or("")
    );
    config.options(options.trim_end());
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3);
}

impl PgStore {
    /// Connects to the database a libpq connection string (a `postgres://`
    /// URL or `keyword=value` pairs) names, and migrates it. Fails as
    /// [`StoreError::Unavailable`] if the string is unusable, the CA file
    /// cannot be read, or the database cannot be reached (a refused TLS
    /// handshake says why).
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let info: ConnInfo = url.parse().map_err(|e| {
            StoreError::unavailable(format!("invalid PostgreSQL connection string: {e}"))
        })?;
        let tls = pgtls::connector(&info)?;
        if info.ssl_mode == SslMode::Disable && !info.ssl_mode_given {
            tracing::debug!("PostgreSQL on this machine: plaintext (no sslmode given)");
        } else if info.ssl_mode == SslMode::Disable && !info.only_unix_sockets() {
            tracing::warn!(
                database = %info.redacted(),
                "sslmode=disable: the connection to PostgreSQL is not encrypted"
            );
        }
        let count = u32::try_from(info.hosts.len().max(1)).unwrap_or(u32::MAX);
        let mut config = info.config;
        tune(&mut config);
        let mut hosts = info.hosts;
        hosts.iter_mut().for_each(tune);
        let hosts: Arc<[tokio_postgres::Config]> = hosts.into();
        let create_timeout = POOL_CREATE * count;
        let manager = Manager::from_connect(
            config,
            FirstHost {
                hosts: Arc::clone(&hosts),
                tls: tls.clone(),
            },
            ManagerConfig {
                // Fast: a pooled connection is checked with is_closed() only.
                // A connection the server ended (a restart, an outage) has
                // closed by the time it is taken again, and is replaced.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(create_timeout))
            .recycle_timeout(Some(POOL_RECYCLE))
            .build()
            .map_err(|e| StoreError::internal(format!("building the connection pool: {e}")))?;
        let store = PgStore {
            pool,
            hosts,
            tls,
            create_timeout,
            signal: OnceLock::new(),
            listener: Mutex::new(None),
            listening: Arc::new(AtomicBool::new(false)),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Whether the LISTEN connection for revocation notices is up.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    async fn conn(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Closes the idle pooled connections (after one timed out: they are
    /// likely to the same hung server); new ones are made as needed.
    fn drop_idle(&self) {
        let dropped = self.pool.retain(|_, _| false).removed.len();
        tracing::warn!(
            idle_connections_closed = dropped,
            "PostgreSQL did not answer in time; reconnecting"
        );
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        // Nodes starting together wait here for the first one's migration.
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = '5min';
             SET LOCAL client_min_messages = warning;
             SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
             CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    BIGINT PRIMARY KEY,
                 applied_at BIGINT NOT NULL
             );"
        ))
        .await
        .map_err(pg_err)?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(max(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        let newest = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if current > newest {
            return Err(StoreError::unavailable(format!(
                "database schema version {current} is newer than this vncbroker knows ({newest})"
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql).await.map_err(pg_err)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &crate::now_unix()],
            )
            .await
            .map_err(pg_err)?;
            tracing::info!(version, "PostgreSQL schema migrated");
        }
        tx.commit().await.map_err(pg_err)
    }
}

/// Maps a PostgreSQL error: unique violations are conflicts, foreign-key
/// violations missing rows, connection trouble and timeouts unavailability.
pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    pg_kind(&e).caused_by(e)
}

/// The kind a PostgreSQL error is, with its message.
fn pg_kind(e: &tokio_postgres::Error) -> StoreError {
    let text = describe(e);
    if let Some(state) = e.code() {
        return if *state == SqlState::UNIQUE_VIOLATION {
            StoreError::conflict(text)
        } else if *state == SqlState::FOREIGN_KEY_VIOLATION {
            StoreError::not_found(text)
        } else if unavailable_state(state.code()) {
            StoreError::unavailable(text)
        } else {
            StoreError::internal(text)
        };
    }
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    // The client's own kinds are private; these are the ones about the
    // connection rather than about a query.
    let connection = matches!(
        e.to_string().as_str(),
        "timeout waiting for server"
            | "error connecting to server"
            | "error communicating with the server"
            | "error performing TLS handshake"
            | "authentication error"
    );
    if e.is_closed() || io || connection {
        StoreError::unavailable(text)
    } else {
        StoreError::internal(text)
    }
}

/// SQLSTATEs that say "not now" rather than "wrong".
fn unavailable_state(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources, too many connections
        || code.starts_with("57P") // admin or crash shutdown, cannot connect now
        || code.starts_with("28") // authentication failed
        || matches!(
            code,
            "57014" // query canceled: statement_timeout
                | "3D000" // the database does not exist
                | "40001" // serialization failure
                | "40P01" // deadlock detected
                | "55P03" // lock not available
                | "25006" // read-only transaction: a standby
        )
}

/// The error's text with its cause; the client's own Display omits it. A
/// refused TLS handshake says why in the operator's terms.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    if let Some(why) = pgtls::explain(e) {
        return format!("{e}: {why}");
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn pool_err(e: PoolError) -> StoreError {
    let kind = match &e {
        PoolError::Backend(e) => {
            StoreError::unavailable(format!("cannot connect to PostgreSQL: {}", describe(e)))
        }
        PoolError::Timeout(kind) => {
            StoreError::unavailable(format!("PostgreSQL connection pool timed out ({kind:?})"))
        }
        other => StoreError::unavailable(format!("PostgreSQL connection pool: {other}")),
    };
    kind.caused_by(e)
}

fn port(p: i32, what: &str) -> Result<u16, StoreError> {
    u16::try_from(p).map_err(|_| StoreError::internal(format!("{what}: bad port {p}")))
}

const VM_COLUMNS: &str = "SELECT v.id, v.name, v.vnc_host, v.vnc_port, v.vnc_password, u.name,
            COALESCE((SELECT array_agg(au.name ORDER BY au.name COLLATE \"C\")
                      FROM vm_users a JOIN users au ON au.id = a.user_id
                      WHERE a.vm_id = v.id), '{}'),
            v.control, v.clipboard, v.record, v.usb_redirect, v.microphone, v.protocol
     FROM vms v JOIN users u ON u.id = v.owner_id";

fn vm_row(r: &Row) -> Result<Vm, StoreError> {
    let id: i64 = r.get(0);
    Ok(Vm {
        id,
        name: r.get(1),
        vnc_host: r.get(2),
        vnc_port: port(r.get(3), &format!("vm {id}"))?,
        vnc_password: r.get(4),
        owner: r.get(5),
        allowed: r.get(6),
        // An unknown value (a newer version's) reads as unset.
        policy: VmPolicy {
            control: r.get::<_, Option<String>>(7).and_then(|c| c.parse().ok()),
            clipboard: r.get::<_, Option<String>>(8).and_then(|c| c.parse().ok()),
            record: r.get(9),
            usb_redirect: r.get(10),
            microphone: r.get(11),
        },
        protocol: stored_protocol(r, 12, &format!("vm {id}"))?,
    })
}

/// A protocol column; a value this version does not know fails the read,
/// so its console is refused rather than spoken to in the wrong protocol.
fn stored_protocol(r: &Row, at: usize, what: &str) -> Result<Protocol, StoreError> {
    let s: String = r.get(at);
    Protocol::from_stored(&s)
        .ok_or_else(|| StoreError::internal(format!("{what}: unknown protocol {s:?}")))
}

fn session_row(r: &Row) -> SessionRecord {
    SessionRecord {
        id: r.get(0),
        vm_id: r.get(1),
        user: r.get(2),
        client_addr: r.get(3),
        node: r.get(4),
        started_at: r.get(5),
        ended_at: r.get(6),
        bytes_to_client: to_u64(r.get::<_, i64>(7)),
        bytes_to_server: to_u64(r.get::<_, i64>(8)),
        close_reason: r.get(9),
        view_only: r.get(10),
        key_events: r.get::<_, Option<i64>>(11).map(to_u64),
        pointer_events: r.get::<_, Option<i64>>(12).map(to_u64),
        clipboard_bytes_to_vm: r.get::<_, Option<i64>>(13).map(to_u64),
        clipboard_bytes_from_vm: r.get::<_, Option<i64>>(14).map(to_u64),
        recording: r.get::<_, Option<String>>(15).is_some(),
        recording_state: r
            .get::<_, Option<String>>(15)
            .as_deref()
            .map(RecordingState::parse),
        resumed_from: r.get(16),
        // Read for listing: an unknown protocol shows as VNC's default.
        protocol: Protocol::from_stored(&r.get::<_, String>(17)).unwrap_or_default(),
        channels: to_u64(r.get::<_, i64>(18)),
    }
}

/// A token row read with `sql::REDEMPTION_COLUMNS`.
fn redemption_row(r: &Row, revocation_seq: i64) -> Result<Redemption, StoreError> {
    let token_id: i64 = r.get(0);
    Ok(Redemption {
        token_id,
        vm_id: r.get(1),
        target_host: r.get(2),
        target_port: port(r.get(3), &format!("token {token_id}"))?,
        vnc_password: r.get(4),
        user_name: r.get(5),
        expires_at: r.get(6),
        caller_session: r.get(7),
        revocation_seq,
        policy: policy_row(r, 8),
        single_use: r.get(14),
        protocol: stored_protocol(r, 15, &format!("token {token_id}"))?,
    })
}

/// A token's session rules, from six columns starting at `at`: view_only,
/// exclusive, clipboard, record, usb_redirect, microphone.
fn policy_row(r: &Row, at: usize) -> SessionPolicy {
    SessionPolicy {
        view_only: r.get(at),
        exclusive: r.get(at + 1),
        // An unknown value (a newer version's) blocks both ways.
        clipboard: r
            .get::<_, String>(at + 2)
            .parse()
            .unwrap_or(Clipboard::None),
        record: r.get(at + 3),
        usb_redirect: r.get(at + 4),
        microphone: r.get(at + 5),
    }
}

async fn insert_allowed(
    tx: &tokio_postgres::Transaction<'_>,
    vm_id: i64,
    allowed: &[String],
) -> Result<(), StoreError> {
    for name in allowed {
        let uid: i64 = tx
            .query_opt(sql::USER_ID, &[name])
            .await
            .map_err(pg_err)?
            .ok_or_else(|| StoreError::not_found(format!("user {name:?}")))?
            .get(0);
        tx.execute(
            "INSERT INTO vm_users (vm_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&vm_id, &uid],
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(())
}

/// Records `r` inside the caller's transaction: revokes the tokens it
/// covers, counts the live sessions it ends, appends it to the log and
/// announces it to every listening node at commit. The table lock makes
/// revocations commit in seq order, so a reader that has seen seq N has
/// seen every revocation before it. Times are the database's.
async fn record_revocation(
    tx: &tokio_postgres::Transaction<'_>,
    r: &Revocation,
) -> Result<Revoked, StoreError> {
    super::check_scope(r)?;
    tx.batch_execute("LOCK TABLE revocations IN SHARE ROW EXCLUSIVE MODE")
        .await
        .map_err(pg_err)?;
    let mut tokens = 0u64;
    if r.session_id.is_none() {
        let rows = tx
            .query(
                "WITH now AS (SELECT extract(epoch FROM now())::BIGINT AS t)
                 UPDATE tokens SET revoked_at = (SELECT t FROM now)
                 WHERE revoked_at IS NULL AND ($1::BIGINT IS NULL OR vm_id = $1)
                   AND ($2::TEXT IS NULL OR user_name = $2)
                 RETURNING expires_at > (SELECT t FROM now)
                           AND NOT (single_use AND used_at IS NOT NULL)",
                &[&r.vm_id, &r.user],
            )
            .await
            .map_err(pg_err)?;
        tokens = rows.iter().filter(|row| row.get::<_, bool>(0)).count() as u64;
    }
    let sessions: i64 = tx
        .query_one(
            "SELECT count(*) FROM sessions
             WHERE ended_at IS NULL AND ($1::BIGINT IS NULL OR vm_id = $1)
               AND ($2::TEXT IS NULL OR user_name = $2) AND ($3::BIGINT IS NULL OR id = $3)",
            &[&r.vm_id, &r.user, &r.session_id],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    let seq: i64 = tx
        .query_one(
            "INSERT INTO revocations (vm_id, user_name, session_id, reason)
             VALUES ($1, $2, $3, $4) RETURNING seq",
            &[&r.vm_id, &r.user, &r.session_id, &r.cause.as_str()],
        )
        .await
        .map_err(pg_err)?
        .get(0);
    // Delivered at commit, to every node listening.
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&REVOCATION_CHANNEL, &seq.to_string()],
    )
    .await
    .map_err(pg_err)?;
    Ok(Revoked {
        seq,
        tokens,
        sessions: to_u64(sessions),
    })
}

fn user_row(r: &Row) -> User {
    User {
        id: r.get(0),
        name: r.get(1),
        password_hash: r.get(2),
        admin: r.get(3),
    }
}

#[async_trait]
impl TokenStore for PgStore {
    async fn insert_token(&self, t: &NewToken) -> Result<i64, StoreError> {
        with_conn!(self, |c| {
            let st = c
                .prepare_cached(sql::INSERT_TOKEN_RETURNING_ID)
                .await
                .map_err(pg_err)?;
            let row = c
                .query_one(
                    &st,
                    &[
                        &&t.hash[..],
                        &t.vm_id,
                        &t.target_host,
                        &i32::from(t.target_port),
                        &t.vnc_password,
                        &t.user_name,
                        &t.created_at,
                        &t.expires_at,
                        &t.single_use,
                        &t.caller_session,
                        &t.policy.view_only,
                        &t.policy.exclusive,
                        &t.policy.clipboard.as_str(),
                        &t.policy.record,
                        &t.policy.usb_redirect,
                        &t.policy.microphone,
                        &t.protocol.as_str(),
                    ],
                )
                .await
                .map_err(pg_err)?;
            Ok(row.get(0))
        })
    }

    async fn revoke(&self, r: &Revocation) -> Result<Revoked, StoreError> {
        with_conn!(self, |c| {
            let tx = c.transaction().await.map_err(pg_err)?;
            let done = record_revocation(&tx, r).await?;
            tx.commit().await.map_err(pg_err)?;
            Ok(done)
        })
    }

    async fn purge_expired(&self, before: i64) -> Result<u64, StoreError> {
        with_conn!(self, |c| {
            let st = c.prepare_cached(sql::PURGE_TOKENS).await.map_err(pg_err)?;
            let n = c.execute(&st, &[&before]).await.map_err(pg_err)?;
            c.execute(sql::PURGE_TICKETS, &[&before])
                .await
                .map_err(pg_err)?;
            Ok(n)
        })
    }

    async fn redeem(&self, hash: &TokenHash, now: i64) -> Result<Option<Redemption>, StoreError> {
        with_conn!(self, |c| {
            // The revocation seq is read in the statement's snapshot, before
            // the row is taken: a revocation committed later has a later seq
            // and applies to the session. A reusable token already used is
            // redeemed by the read alone, which commits nothing.
            let read = c
                .prepare_cached(&format!(
                    "SELECT {}, used_at, (SELECT COALESCE(max(seq), 0)::BIGINT FROM revocations)
                     FROM tokens {}",
                    sql::REDEMPTION_COLUMNS,
                    sql::REDEEMABLE_WHERE
                ))
                .await
                .map_err(pg_err)?;
            let Some(r) = c
                .query_opt(&read, &[&&hash[..], &now])
                .await
                .map_err(pg_err)?
            else {
                return Ok(None);
            };
            let seq: i64 = r.get(17);
            let read = redemption_row(&r, seq)?;
            // A SPICE token's main channel claims it.
            if r.get::<_, Option<i64>>(16).is_some() || read.protocol == Protocol::Spice {
                return Ok(Some(read));
            }
            // A first use: one statement, so of concurrent redemptions of a
            // single-use token the first to lock the row wins and the others
            // re-check the condition on the updated row and match nothing.
            let take = c.prepare_cached(sql::FIRST_USE).await.map_err(pg_err)?;
            let Some(r) = c
                .query_opt(&take, &[&&hash[..], &now])
                .await
                .map_err(pg_err)?
            else {
                return Ok(None);
            };
            Ok(Some(redemption_row(&r, seq)?))
        })
    }

    async fn revocations_after(
        &self,
        seq: i64,
        limit: u32,
    ) -> Result<Vec<RecordedRevocation>, StoreError> {
        with_conn!(self, |c| {
            let st = c
                .prepare_cached(sql::REVOCATIONS_AFTER)
                .await
                .map_err(pg_err)?;
            let rows = c
                .query(&st, &[&seq, &i64::from(limit)])
                .await
                .map_err(pg_err)?;
            Ok(rows
                .iter()
                .map(|r| RecordedRevocation {
                    seq: r.get(0),
                    revocation: Revocation {
                        vm_id: r.get(1),
                        user: r.get(2),
                        session_id: r.get(3),
                        cause: Cause::parse(r.get(4)),
                    },
                })
                .collect())
        })
    }

    async fn last_revocation(&self) -> Result<i64, StoreError> {
        with_conn!(self, |c| {
            let row = c
                .query_one("SELECT COALESCE(max(seq), 0)::BIGINT FROM revocations", &[])
                .await
                .map_err(pg_err)?;
            Ok(row.get(0))
        })
    }

    async fn purge_revocations(&self, before: i64) -> Result<u64, StoreError> {
        with_conn!(self, |c| {
            c.execute(sql::PURGE_REVOCATIONS, &[&before])
                .await
                .map_err(pg_err)
        })
    }

    async fn console(&self, hash: &TokenHash, now: i64) -> Result<Option<ConsoleView>, StoreError> {
        with_conn!(self, |c| {
            let st = c.prepare_cached(sql::CONSOLE_TOKEN).await.map_err(pg_err)?;
            let Some(t) = c
                .query_opt(&st, &[&&hash[..], &now])
                .await
                .map_err(pg_err)?
            else {
                return Ok(None);
            };
            let token_id: i64 = t.get(0);
            let st = c
                .prepare_cached(sql::LIVE_SESSIONS_OF_TOKEN)
                .await
                .map_err(pg_err)?;
            let live = c
                .query(&st, &[&token_id])
                .await
                .map_err(pg_err)?
                .iter()
                .map(|r| LiveSession {
                    id: r.get(0),
                    client_addr: r.get(1),
                    started_at: r.get(2),
                })
                .collect();
            Ok(Some(ConsoleView {
                token_id,
                single_use: t.get(1),
                expires_at: t.get(2),
                policy: policy_row(&t, 3),
                protocol: stored_protocol(&t, 9, &format!("token {token_id}"))?,
                live,
            }))
        })
    }

    async fn claim_main_channel(&self, token_id: i64, now: i64) -> Result<bool, StoreError> {
        with_conn!(self, |c| {
            let st = c
                .prepare_cached(sql::CLAIM_MAIN_CHANNEL)
                .await
                .map_err(pg_err)?;
            Ok(c.execute(&st, &[&token_id, &now]).await.map_err(pg_err)? == 1)
        })
    }

    async fn set_ticket(&self, t: &Ticket) -> Result<(), StoreError> {
        with_conn!(self, |c| {
            c.execute(
                "INSERT INTO reconnect_tickets (ticket_hash, session_id, token_id, client_ip)
                 SELECT $1::BYTEA, $2::BIGINT, $3::BIGINT, $4::TEXT
                 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $2 AND ended_at IS NULL)
                 ON CONFLICT (session_id) DO UPDATE
                   SET ticket_hash = excluded.ticket_hash, client_ip = excluded.client_ip,
                       valid_until = NULL",
                &[&&t.hash[..], &t.session_id, &t.token_id, &t.client_ip],
            )
            .await
            .map_err(pg_err)?;
            Ok(())
        })
    }

    async fn resume(
        &self,
        token: &TokenHash,
        ticket: &TokenHash,
        client_ip: &str,
        now: i64,
    ) -> Result<Resumed, StoreError> {
        with_conn!(self, |c| {
            let seq: i64 = c
                .query_one("SELECT COALESCE(max(seq), 0)::BIGINT FROM revocations", &[])
                .await
                .map_err(pg_err)?
                .get(0);
            let taken = c
                .query_opt(
                    sql::TAKE_TICKET,
                    &[&&ticket[..], &client_ip, &now, &&token[..]],
                )
                .await
                .map_err(pg_err)?;
            let Some(taken) = taken else {
                let pending = c
                    .query_opt(
                        sql::PENDING_TICKET,
                        &[&&ticket[..], &client_ip, &&token[..], &now],
                    )
                    .await
                    .map_err(pg_err)?
                    .is_some();
                return Ok(if pending {
                    Resumed::Pending
                } else {
                    Resumed::Invalid
                });
            };
            let (from, token_id): (i64, i64) = (taken.get(0), taken.get(1));
            let st = c.prepare_cached(sql::TOKEN_BY_ID).await.map_err(pg_err)?;
            Ok(
                match c.query_opt(&st, &[&token_id]).await.map_err(pg_err)? {
                    Some(r) => Resumed::Session {
                        redemption: redemption_row(&r, seq)?,
                        from,
                    },
                    None => Resumed::Invalid,
                },
            )
        })
    }

    fn revocation_signal(&self) -> Option<Arc<Notify>> {
        let signal = self.signal.get_or_init(|| {
            let signal = Arc::new(Notify::new());
            // Started on first use, so CLI commands never open it.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let task = runtime.spawn(listen(
                    Arc::clone(&self.hosts),
                    self.tls.clone(),
                    self.create_timeout * 2,
                    Arc::clone(&signal),
                    Arc::clone(&self.listening),
                ));
                if let Ok(mut listener) = self.listener.lock() {
                    *listener = Some(task);
                }
            }
            signal
        });
        Some(Arc::clone(signal))
    }
}

#[async_trait]
impl SessionLog for PgStore {
    async fn open_session(&self, s: &NewSession) -> Result<Opened, StoreError> {
        let recording = s.recording.then_some(RecordingState::Recording.as_str());
        let protocol = s.protocol.as_str();
        let spice_session_id = s.spice_session_id.map(i64::from);
        let row: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
            &s.token_id,
            &s.vm_id,
            &s.user_name,
            &s.client_addr,
            &s.node,
            &s.started_at,
            &s.view_only,
            &recording,
            &s.resumed_from,
            &protocol,
            &spice_session_id,
        ];
        with_conn!(self, |c| {
            if s.exclusive && !s.view_only {
                // The VM's lock serialises the check and the insert of
                // control sessions from every node, until commit.
                let tx = c.transaction().await.map_err(pg_err)?;
                tx.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)",
                    &[&EXCLUSIVE_LOCK, &(s.vm_id as i32)],
                )
                .await
                .map_err(pg_err)?;
                let taken = tx
                    .query_opt(
                        "SELECT 1 FROM sessions
                         WHERE vm_id = $1 AND ended_at IS NULL AND NOT view_only LIMIT 1",
                        &[&s.vm_id],
                    )
                    .await
                    .map_err(pg_err)?
                    .is_some();
                if taken {
                    return Ok(Opened::ControlTaken);
                }
                let id = tx
                    .query_one(sql::INSERT_SESSION_RETURNING_ID, &row)
                    .await
                    .map_err(pg_err)?;
                tx.commit().await.map_err(pg_err)?;
                return Ok(Opened::Session(id.get(0)));
            }
            let st = c
                .prepare_cached(sql::INSERT_SESSION_RETURNING_ID)
                .await
                .map_err(pg_err)?;
            let id = c.query_one(&st, &row).await.map_err(pg_err)?;
            Ok(Opened::Session(id.get(0)))
        })
    }

    async fn spice_session(
        &self,
        token_id: i64,
        spice_session_id: u32,
    ) -> Result<Option<i64>, StoreError> {
        with_conn!(self, |c| {
            let st = c.prepare_cached(sql::SPICE_SESSION).await.map_err(pg_err)?;
            Ok(c.query_opt(&st, &[&token_id, &i64::from(spice_session_id)])
                .await
                .map_err(pg_err)?
                .map(|r| r.get(0)))
        })
    }

    async fn add_channel(
        &self,
        id: i64,
        joined: bool,
        bytes_to_client: u64,
        bytes_to_server: u64,
    ) -> Result<(), StoreError> {
        with_conn!(self, |c| {
            let st = c.prepare_cached(sql::ADD_CHANNEL).await.map_err(pg_err)?;
            c.execute(
                &st,
                &[
                    &id,
                    &i64::from(joined),
                    &to_i64(bytes_to_client),
                    &to_i64(bytes_to_server),
                ],
            )
            .await
            .map_err(pg_err)?;
            Ok(())
        })
    }

    async fn close_session(&self, id: i64, end: &SessionEnd) -> Result<(), StoreError> {
        with_conn!(self, |c| {
            let st = c.prepare_cached(sql::CLOSE_SESSION).await.map_err(pg_err)?;
            let audit = end.audit;
            c.execute(
                &st,
                &[
                    &id,
                    &end.ended_at,
                    &to_i64(end.bytes_to_client),
                    &to_i64(end.bytes_to_server),
                    &end.reason,
                    &audit.map(|a| to_i64(a.key_events)),
                    &audit.map(|a| to_i64(a.pointer_events)),
                    &audit.map(|a| to_i64(a.clipboard_bytes_to_vm)),
                    &audit.and_then(|a| a.clipboard_bytes_from_vm).map(to_i64),
                    &end.recording.map(RecordingState::as_str),
                ],
            )
            .await
            .map_err(pg_err)?;
            match end.ticket {
                TicketEnd::NoTicket => {}
                TicketEnd::Void => {
                    c.execute(sql::VOID_TICKET, &[&id]).await.map_err(pg_err)?;
                }
                TicketEnd::ValidUntil(until) => {
                    c.execute(sql::ARM_TICKET, &[&id, &until])
                        .await
                        .map_err(pg_err)?;
                }
            }
            Ok(())
        })
    }

    async fn sessions(&self, f: &SessionFilter) -> Result<Vec<SessionRecord>, StoreError> {
        with_conn!(self, |c| {
            let st = c
                .prepare_cached(&format!(
                    "{}WHERE ($1::BIGINT IS NULL OR vm_id = $1)
                       AND ($2::TEXT IS NULL OR user_name = $2)
                       AND ($3::BIGINT IS NULL OR started_at >= $3)
                       AND (NOT $4::BOOLEAN OR ended_at IS NULL)
                     ORDER BY started_at DESC, id DESC LIMIT $5",
                    sql::SESSION_COLUMNS
                ))
                .await
                .map_err(pg_err)?;
            let rows = c
                .query(
                    &st,
                    &[&f.vm_id, &f.user, &f.since, &f.live, &i64::from(f.limit)],
                )
                .await
                .map_err(pg_err)?;
            Ok(rows.iter().map(session_row).collect())
        })
    }

    async fn session(&self, id: i64) -> Result<Option<SessionRecord>, StoreError> {
        with_conn!(self, |c| {
            let st = c.prepare_cached(sql::SESSION_BY_ID).await.map_err(pg_err)?;
            Ok(c.query_opt(&st, &[&id])
                .await
                .map_err(pg_err)?
                .as_ref()
                .map(session_row))
        })
    }

    async fn close_orphaned_sessions(&self, node: &str, now: i64) -> Result<u64, StoreError> {
        with_conn!(self, |c| {
            let tx = c.transaction().await.map_err(pg_err)?;
            tx.execute(sql::VOID_ORPHANED_TICKETS, &[&node])
                .await
                .map_err(pg_err)?;
            let n = tx
                .execute(sql::CLOSE_ORPHANED_SESSIONS, &[&node, &now])
                .await
                .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(n)
        })
    }

    async fn purge_sessions(&self, before: i64) -> Result<u64, StoreError> {
        with_conn!(self, |c| {
            // Sessions end after they start, so the started_at bound holds
            // for every row to delete and lets sessions_started bound the scan.
            let st = c
                .prepare_cached(
                    "DELETE FROM sessions
                     WHERE started_at < $1 AND ended_at IS NOT NULL AND ended_at < $1",
                )
                .await
                .map_err(pg_err)?;
            c.execute(&st, &[&before]).await.map_err(pg_err)
        })
    }
}

#[async_trait]
impl Registry for PgStore {
    async fn add_user(&self, name: &str, hash: &str, admin: bool) -> Result<i64, StoreError> {
        let now = crate::now_unix();
        with_conn!(self, |c| {
            let st = c
                .prepare_cached(
                    "INSERT INTO users (name, password_hash, admin, created_at)
                     VALUES ($1, $2, $3, $4) RETURNING id",
                )
                .await
                .map_err(pg_err)?;
            let row = c
                .query_one(&st, &[&name, &hash, &admin, &now])
                .await
                .map_err(|e| match pg_err(e) {
                    StoreError::Conflict { source, .. } => StoreError::Conflict {
                        what: format!("user {name:?}"),
                        source,
                    },
                    other => other,
                })?;
            Ok(row.get(0))
        })
    }

    async fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        with_conn!(self, |c| {
            let st = c.prepare_cached(sql::USER_BY_NAME).await.map_err(pg_err)?;
            let row = c.query_opt(&st, &[&name]).await.map_err(pg_err)?;
            Ok(row.as_ref().map(user_row))
        })
    }

    async fn users(&self) -> Result<Vec<User>, StoreError> {
        with_conn!(self, |c| {
            let st = c
                .prepare_cached(
                    "SELECT id, name, password_hash, admin FROM users ORDER BY name COLLATE \"C\"",
                )
                .await
                .map_err(pg_err)?;
            let rows = c.query(&st, &[]).await.map_err(pg_err)?;
            Ok(rows.iter().map(user_row).collect())
        })
    }

    async fn set_password(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        with_conn!(self, |c| {
            let n = c
                .execute(
                    "UPDATE users SET password_hash = $2 WHERE name = $1",
                    &[&name, &hash],
                )
                .await
                .map_err(pg_err)?;
            Ok(n > 0)
        })
    }

    async fn remove_user(&self, name: &str) -> Result<Option<Revoked>, StoreError> {
        with_conn!(self, |c| {
            let tx = c.transaction().await.map_err(pg_err)?;
            let Some(uid) = tx
                .query_opt("SELECT id FROM users WHERE name = $1 FOR UPDATE", &[&name])
                .await
                .map_err(pg_err)?
                .map(|r| r.get::<_, i64>(0))
            else {
                return Ok(None);
            };
            let owned: Vec<i64> = tx
                .query(sql::VMS_OWNED_BY, &[&uid])
                .await
                .map_err(pg_err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !owned.is_empty() {
                return Err(StoreError::conflict(format!(
                    "user {name:?} owns VMs {owned:?}: remove them or give them another owner first"
                )));
            }
            let done =
                record_revocation(&tx, &Revocation::user(name, None, Cause::UserRemoved)).await?;
            tx.execute(sql::DELETE_USER, &[&uid])
                .await
                .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(Some(done))
        })
    }

    async fn add_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        let now = crate::now_unix();
        with_conn!(self, |c| {
            let tx = c.transaction().await.map_err(pg_err)?;
            let user_id = tx.prepare_cached(sql::USER_ID).await.map_err(pg_err)?;
            let owner: i64 = tx
                .query_opt(&user_id, &[&vm.owner])
                .await
                .map_err(pg_err)?
                .ok_or_else(|| StoreError::not_found(format!("user {:?}", vm.owner)))?
                .get(0);
            tx.execute(
                "INSERT INTO vms (id, name, vnc_host, vnc_port, vnc_password, owner_id, created_at,
                                  control, clipboard, record, usb_redirect, microphone, protocol)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                &[
                    &vm.id,
                    &vm.name,
                    &vm.vnc_host,
                    &i32::from(vm.vnc_port),
                    &vm.vnc_password,
                    &owner,
                    &now,
                    &vm.policy.control.map(Control::as_str),
                    &vm.policy.clipboard.map(Clipboard::as_str),
                    &vm.policy.record,
                    &vm.policy.usb_redirect,
                    &vm.policy.microphone,
                    &vm.protocol.as_str(),
                ],
            )
            .await
            .map_err(|e| match pg_err(e) {
                StoreError::Conflict { source, .. } => StoreError::Conflict {
                    what: format!("vm {}", vm.id),
                    source,
                },
                other => other,
            })?;
            insert_allowed(&tx, vm.id, &vm.allowed).await?;
            tx.commit().await.map_err(pg_err)
        })
    }

    async fn update_vm(&self, vm: &Vm) -> Result<Option<Revoked>, StoreError> {
        with_conn!(self, |c| {
            let tx = c.transaction().await.map_err(pg_err)?;
            let Some(old) = tx
                .query_opt(
                    &format!("{VM_COLUMNS} WHERE v.id = $1 FOR UPDATE OF v"),
                    &[&vm.id],
                )
                .await
                .map_err(pg_err)?
            else {
                return Ok(None);
            };
            let old = vm_row(&old)?;
            let owner: i64 = tx
                .query_opt(sql::USER_ID, &[&vm.owner])
                .await
                .map_err(pg_err)?
                .ok_or_else(|| StoreError::not_found(format!("user {:?}", vm.owner)))?
                .get(0);
            tx.execute(
                "UPDATE vms SET name = $2, vnc_host = $3, vnc_port = $4, vnc_password = $5,
                                owner_id = $6, control = $7, clipboard = $8, record = $9,
                                usb_redirect = $10, microphone = $11, protocol = $12
                 WHERE id = $1",
                &[
                    &vm.id,
                    &vm.name,
                    &vm.vnc_host,
                    &i32::from(vm.vnc_port),
                    &vm.vnc_password,
                    &owner,
                    &vm.policy.control.map(Control::as_str),
                    &vm.policy.clipboard.map(Clipboard::as_str),
                    &vm.policy.record,
                    &vm.policy.usb_redirect,
                    &vm.policy.microphone,
                    &vm.protocol.as_str(),
                ],
            )
            .await
            .map_err(pg_err)?;
            tx.execute(sql::DELETE_VM_USERS, &[&vm.id])
                .await
                .map_err(pg_err)?;
            insert_allowed(&tx, vm.id, &vm.allowed).await?;
            let mut done = Revoked::default();
            for r in super::withdrawn(&old, vm) {
                if let Some(user) = &r.user {
                    let admin = tx
                        .query_opt(sql::IS_ADMIN, &[user])
                        .await
                        .map_err(pg_err)?
                        .is_some_and(|row| row.get::<_, bool>(0));
                    if admin {
                        continue;
                    }
                }
                done = done.and(record_revocation(&tx, &r).await?);
            }
            tx.commit().await.map_err(pg_err)?;
            Ok(Some(done))
        })
    }

    async fn vm(&self, id: i64) -> Result<Option<Vm>, StoreError> {
        with_conn!(self, |c| {
            let st = c
                .prepare_cached(&format!("{VM_COLUMNS} WHERE v.id = $1"))
                .await
                .map_err(pg_err)?;
            match c.query_opt(&st, &[&id]).await.map_err(pg_err)? {
                Some(r) => vm_row(&r).map(Some),
                None => Ok(None),
            }
        })
    }

    async fn vms(&self) -> Result<Vec<Vm>, StoreError> {
        with_conn!(self, |c| {
            let st = c
                .prepare_cached(&format!("{VM_COLUMNS} ORDER BY v.id"))
                .await
                .map_err(pg_err)?;
            let rows = c.query(&st, &[]).await.map_err(pg_err)?;
            rows.iter().map(vm_row).collect()
        })
    }

    async fn remove_vm(&self, id: i64) -> Result<Option<Revoked>, StoreError> {
        with_conn!(self, |c| {
            let tx = c.transaction().await.map_err(pg_err)?;
            let removed = tx.execute(sql::DELETE_VM, &[&id]).await.map_err(pg_err)?;
            if removed == 0 {
                return Ok(None);
            }
            let done = record_revocation(&tx, &Revocation::vm(id, Cause::VmRemoved)).await?;
            tx.commit().await.map_err(pg_err)?;
            Ok(Some(done))
        })
    }

    async fn sealed_vnc_password(&self) -> Result<Option<String>, StoreError> {
        with_conn!(self, |c| {
            let row = c
                .query_opt(sql::SEALED_VNC_PASSWORD, &[])
                .await
                .map_err(pg_err)?;
            Ok(row.map(|r| r.get(0)))
        })
    }
}

#[async_trait]
impl Health for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        with_conn!(self, PING_TIMEOUT, |c| {
            c.simple_query("SELECT 1").await.map_err(pg_err)?;
            Ok(())
        })
    }
}

/// Keeps a LISTEN connection up for as long as the store lives, waking
/// `signal`'s waiters on every revocation notice.
async fn listen(
    hosts: Arc<[tokio_postgres::Config]>,
    tls: Connector,
    connect_timeout: Duration,
    signal: Arc<Notify>,
    listening: Arc<AtomicBool>,
) {
    let mut backoff = LISTEN_BACKOFF_MIN;
    let mut failures = 0u32;
    loop {
        let mut established = false;
        let result = listen_once(
            &hosts,
            &tls,
            connect_timeout,
            &signal,
            &listening,
            &mut established,
        )
        .await;
        listening.store(false, Ordering::SeqCst);
        if established {
            backoff = LISTEN_BACKOFF_MIN;
            failures = 0;
        }
        match result {
            Ok(()) => tracing::warn!("revocation notice connection closed; reconnecting"),
            // One warning per outage; the watcher's periodic look covers it.
            Err(e) if failures == 0 => {
                tracing::warn!(error = %e, "revocation notice connection failed; retrying")
            }
            Err(e) => tracing::debug!(error = %e, "revocation notice connection failed again"),
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

async fn listen_once(
    hosts: &[tokio_postgres::Config],
    tls: &Connector,
    connect_timeout: Duration,
    signal: &Notify,
    listening: &AtomicBool,
    established: &mut bool,
) -> Result<(), StoreError> {
    let (client, mut connection) = tokio::time::timeout(connect_timeout, connect_first(hosts, tls))
        .await
        .map_err(|_| StoreError::unavailable("connecting timed out"))?
        .map_err(pg_err)?;
    // Driving the connection through poll_message is what surfaces the
    // notifications; it also carries the LISTEN below.
    let mut messages = std::pin::pin!(async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    tracing::debug!(vm_id = n.payload(), "revocation notice");
                    signal.notify_waiters();
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(pg_err(e)),
                None => return Ok(()),
            }
        }
    });
    let listen = format!("LISTEN {REVOCATION_CHANNEL}");
    let no_answer = || {
        StoreError::unavailable(format!(
            "PostgreSQL did not answer within {LISTEN_PING_TIMEOUT:?}"
        ))
    };
    tokio::select! {
        ended = &mut messages => return ended,
        listened = tokio::time::timeout(LISTEN_PING_TIMEOUT, client.batch_execute(&listen)) => {
            listened.map_err(|_| no_answer())?.map_err(pg_err)?
        }
    }
    *established = true;
    listening.store(true, Ordering::SeqCst);
    tracing::info!("listening for revocation notices");
    // Revocations made while nobody listened: have the watchers look now.
    signal.notify_waiters();
    // A hung server sends neither notices nor an error: ask it now and then.
    let alive = async {
        loop {
            tokio::time::sleep(LISTEN_PING).await;
            tokio::time::timeout(LISTEN_PING_TIMEOUT, client.batch_execute("SELECT 1"))
                .await
                .map_err(|_| no_answer())?
                .map_err(pg_err)?;
        }
    };
    let ended = tokio::select! {
        ended = &mut messages => ended,
        failed = alive => failed,
    };
    drop(client);
    ended
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testpg;

    #[test]
    fn sqlstates_map_to_store_errors() {
        assert!(unavailable_state("08006"));
        assert!(unavailable_state("57P01"));
        assert!(unavailable_state("57014"));
        assert!(unavailable_state("53300"));
        assert!(!unavailable_state("42P01"));
        assert!(!unavailable_state("23514"));
    }

    #[tokio::test]
    async fn constraint_violations_map_to_conflict_and_not_found() {
        let db = testpg::TestDb::create("errmap").await;
        let store = PgStore::open(&db.url).await.unwrap();
        let c = store.conn().await.unwrap();
        let fk = c
            .execute(
                "INSERT INTO vms (id, name, vnc_host, vnc_port, owner_id, created_at)
                 VALUES (1, 'x', 'h', 5900, 424242, 0)",
                &[],
            )
            .await
            .unwrap_err();
        assert!(matches!(pg_err(fk), StoreError::NotFound { .. }));
        c.execute(
            "INSERT INTO users (name, password_hash, created_at) VALUES ('u', 'h', 0)",
            &[],
        )
        .await
        .unwrap();
        let dup = c
            .execute(
                "INSERT INTO users (name, password_hash, created_at) VALUES ('u', 'h', 0)",
                &[],
            )
            .await
            .unwrap_err();
        assert!(matches!(pg_err(dup), StoreError::Conflict { .. }));
        // The length check on token hashes.
        let short = c
            .execute(
                "INSERT INTO tokens (token_hash, vm_id, target_host, target_port, user_name,
                                     created_at, expires_at)
                 VALUES ('\\x00', 1, 'h', 1, 'u', 0, 1)",
                &[],
            )
            .await
            .unwrap_err();
        assert!(matches!(pg_err(short), StoreError::Internal { .. }));
        let timeout = c
            .batch_execute("SET statement_timeout = 50; SELECT pg_sleep(1)")
            .await
            .unwrap_err();
        assert!(
            matches!(pg_err(timeout), StoreError::Unavailable { .. }),
            "a statement timeout is unavailability"
        );
    }

    #[tokio::test]
    async fn concurrent_opens_migrate_once_and_reopening_keeps_data() {
        let db = testpg::TestDb::create("migrate").await;
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = db.url.clone();
                tokio::spawn(async move { PgStore::open(&url).await })
            })
            .collect();
        let mut stores = Vec::new();
        for o in opens {
            stores.push(o.await.unwrap().unwrap());
        }
        stores[0].add_user("alice", "h", false).await.unwrap();
        drop(stores);
        let store = PgStore::open(&db.url).await.unwrap();
        assert_eq!(store.users().await.unwrap().len(), 1);
        let c = store.conn().await.unwrap();
        let rows = c
            .query("SELECT version FROM schema_migrations", &[])
            .await
            .unwrap();
        let versions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(versions, vec![1, 2, 3, 4, 5]);
        // Pooled connections carry the statement timeout.
        let timeout: String = c
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(timeout, "3s");
        // A schema from a newer vncbroker is refused.
        c.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)",
            &[],
        )
        .await
        .unwrap();
        let err = PgStore::open(&db.url).await.err().unwrap();
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_database_fails_fast_as_unavailable() {
        let port = testpg::closed_port();
        let started = std::time::Instant::now();
        let err = crate::store::open(&format!("postgres://u@127.0.0.1:{port}/db"))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        for bad in [
            "postgres://u@db.example:5432/db",
            "postgres://u@127.0.0.1:5432/db?sslmode=verify-full",
            "postgresql://u@127.0.0.1:notaport/db",
        ] {
            let err = crate::store::open(bad).await.err().unwrap();
            assert!(
                matches!(err, StoreError::Unavailable { .. }),
                "{bad}: {err:?}"
            );
        }
    }
}
