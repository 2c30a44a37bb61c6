//! Prometheus metrics, served at `GET /metrics` in the text exposition
//! format.
//!
//! A small registry of atomics, with no dependency: every label value comes
//! from a fixed list (outcomes, refusal reasons, store operations, XML-RPC
//! method names with unknown ones folded into `other`) or from the router
//! (matched route templates and HTTP status codes), so no client can grow
//! the label sets.
//!
//! Recording is done through [`global`]; [`Metrics`] values can also be made
//! on their own (the unit tests do).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::inventory::Lapse;
use crate::proxy::relay::End;
use crate::proxy::sessions::Stop;
use crate::store::{
    NewSession, NewToken, RecordedRevocation, Redemption, Revocation, Revoked, SessionEnd,
    SessionFilter, SessionRecord, Store, StoreError, User, Vm,
};
use crate::token::TokenHash;

/// The `Content-Type` of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const API_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const SESSION_BUCKETS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
];

/// How a session ended, as the `outcome` label of `vncbroker_sessions_total`.
pub const SESSION_OUTCOMES: &[&str] = &[
    "client_closed",
    "server_closed",
    "client_protocol_error",
    "server_error",
    "revoked",
    "access_withdrawn",
    "vm_gone",
    "vm_moved",
    "store_unavailable",
    "shutdown",
    "idle",
    "client_unresponsive",
    "time_limit",
    "token_expired",
];

/// The `outcome` label for a relay's end.
pub fn session_outcome(end: &End) -> &'static str {
    match end {
        End::ClientClosed => "client_closed",
        End::ServerClosed => "server_closed",
        End::TextFrame | End::ClientProtocol { .. } => "client_protocol_error",
        End::ServerError(_) => "server_error",
        End::Stopped(Stop::Revoked(_)) => "revoked",
        End::Stopped(Stop::Lapsed(Lapse::AccessLost | Lapse::CredentialRejected)) => {
            "access_withdrawn"
        }
        End::Stopped(Stop::Lapsed(Lapse::VmGone | Lapse::VmStopped)) => "vm_gone",
        End::Stopped(Stop::Lapsed(Lapse::VmMoved)) => "vm_moved",
        End::Stopped(Stop::StoreDown) => "store_unavailable",
        End::Stopped(Stop::Shutdown) => "shutdown",
        End::Idle => "idle",
        End::PongTimeout | End::WriteTimeout => "client_unresponsive",
        End::MaxDuration => "time_limit",
        End::TokenExpired => "token_expired",
    }
}

/// Why the proxy turned a connection away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No token in the request.
    NoToken,
    /// Unknown, expired, revoked, used up or malformed.
    InvalidToken,
    /// The VM moved since the token was minted.
    Moved,
    /// The store (or the inventory) could not answer.
    StoreUnavailable,
    /// The token was good, but a session limit was reached.
    SessionLimit,
    /// The token was good, but the VNC server could not be reached.
    Unreachable,
    /// The token was good, but the VNC handshake failed.
    VncHandshake,
    /// The token was good, but the VNC handshake timed out.
    HandshakeTimeout,
    /// Access was withdrawn while the session was being set up.
    Withdrawn,
}

impl Refused {
    const ALL: &[Refused] = &[
        Refused::NoToken,
        Refused::InvalidToken,
        Refused::Moved,
        Refused::StoreUnavailable,
        Refused::SessionLimit,
        Refused::Unreachable,
        Refused::VncHandshake,
        Refused::HandshakeTimeout,
        Refused::Withdrawn,
    ];

    /// Token refusals go to `vncbroker_tokens_refused_total`; failures after
    /// a token was accepted to `vncbroker_sessions_failed_total`.
    fn is_token_refusal(self) -> bool {
        matches!(
            self,
            Refused::NoToken | Refused::InvalidToken | Refused::Moved | Refused::StoreUnavailable
        )
    }

    fn label(self) -> &'static str {
        match self {
            Refused::NoToken => "no_token",
            Refused::InvalidToken => "invalid",
            Refused::Moved => "moved",
            Refused::StoreUnavailable => "store_unavailable",
            Refused::SessionLimit => "session_limit",
            Refused::Unreachable => "unreachable",
            Refused::VncHandshake => "vnc_handshake",
            Refused::HandshakeTimeout => "handshake_timeout",
            Refused::Withdrawn => "withdrawn",
        }
    }
}

/// The XML-RPC method names used as labels; anything else is `other`.
const XMLRPC_METHODS: &[&str] = &[
    crate::api::xmlrpc::METHOD_TOKEN,
    crate::api::xmlrpc::METHOD_TOKEN_ALIAS,
    crate::api::xmlrpc::METHOD_REVOKE,
    "system.listMethods",
];

/// The label for an XML-RPC method name: known names as they are, anything
/// else `other`.
pub fn xmlrpc_method_label(name: &str) -> &'static str {
    XMLRPC_METHODS
        .iter()
        .find(|m| **m == name)
        .copied()
        .unwrap_or("other")
}

/// Put into a response's extensions by the XML-RPC handler, so the request
/// is counted under the called method rather than `POST /RPC2`.
#[derive(Debug, Clone, Copy)]
pub struct ApiMethod(pub &'static str);

/// The store operations, as the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StoreOp {
    InsertToken,
    Revoke,
    PurgeExpired,
    Redeem,
    RevocationsAfter,
    LastRevocation,
    PurgeRevocations,
    OpenSession,
    CloseSession,
    CloseOrphanedSessions,
    Sessions,
    Session,
    PurgeSessions,
    Ping,
    AddUser,
    User,
    Users,
    SetPassword,
    RemoveUser,
    AddVm,
    UpdateVm,
    Vm,
    Vms,
    RemoveVm,
}

impl StoreOp {
    fn label(self) -> &'static str {
        match self {
            StoreOp::InsertToken => "insert_token",
            StoreOp::Revoke => "revoke",
            StoreOp::PurgeExpired => "purge_expired",
            StoreOp::Redeem => "redeem",
            StoreOp::RevocationsAfter => "revocations_after",
            StoreOp::LastRevocation => "last_revocation",
            StoreOp::PurgeRevocations => "purge_revocations",
            StoreOp::OpenSession => "open_session",
            StoreOp::CloseSession => "close_session",
            StoreOp::CloseOrphanedSessions => "close_orphaned_sessions",
            StoreOp::Sessions => "sessions",
            StoreOp::Session => "session",
            StoreOp::PurgeSessions => "purge_sessions",
            StoreOp::Ping => "ping",
            StoreOp::AddUser => "add_user",
            StoreOp::User => "user",
            StoreOp::Users => "users",
            StoreOp::SetPassword => "set_password",
            StoreOp::RemoveUser => "remove_user",
            StoreOp::AddVm => "add_vm",
            StoreOp::UpdateVm => "update_vm",
            StoreOp::Vm => "vm",
            StoreOp::Vms => "vms",
            StoreOp::RemoveVm => "remove_vm",
        }
    }
}

fn store_error_kind(e: &StoreError) -> &'static str {
    match e {
        StoreError::Conflict(_) => "conflict",
        StoreError::NotFound(_) => "not_found",
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Internal(_) => "internal",
    }
}

/// A cumulative histogram with fixed upper bounds.
struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more for `+Inf`.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |s| {
            Some((f64::from_bits(s) + v).to_bits())
        });
        self.count.fetch_add(1, Relaxed);
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines; `labels` is either
    /// empty or `k="v",...` without braces.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut acc = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Relaxed);
            let le = match self.bounds.get(i) {
                Some(bound) => bound.to_string(),
                None => "+Inf".into(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {acc}");
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = f64::from_bits(self.sum.load(Relaxed));
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {}", acc);
    }
}

/// Values read at scrape time rather than counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Live console sessions on this node.
    pub sessions_active: usize,
    /// Whether the node is draining for shutdown.
    pub draining: bool,
}

/// Every counter and histogram of the broker.
pub struct Metrics {
    started: i64,
    sessions_total: Mutex<BTreeMap<&'static str, u64>>,
    session_duration: Histogram,
    bytes_to_client: AtomicU64,
    bytes_to_server: AtomicU64,
    tokens_minted: AtomicU64,
    tokens_redeemed: AtomicU64,
    recheck_failures: AtomicU64,
    tokens_refused: Mutex<BTreeMap<&'static str, u64>>,
    sessions_failed: Mutex<BTreeMap<&'static str, u64>>,
    /// (method or route, HTTP status) -> count.
    api_requests: Mutex<BTreeMap<(String, u16), u64>>,
    api_duration: Mutex<BTreeMap<String, Arc<Histogram>>>,
    /// (XML-RPC method, OpenNebula result code) -> count.
    xmlrpc_results: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    store_duration: Mutex<BTreeMap<StoreOp, Arc<Histogram>>>,
    store_errors: Mutex<BTreeMap<(StoreOp, &'static str), u64>>,
    password_verifications: AtomicU64,
    password_checks_busy: AtomicU64,
    connections_open: AtomicU64,
    connections_refused: Mutex<BTreeMap<&'static str, u64>>,
    http_timeouts: Mutex<BTreeMap<&'static str, u64>>,
}

/// Why a connection was turned away, as the `reason` label of
/// `vncbroker_connections_refused_total`: over the cap per address, over
/// the total cap, or dropped unanswered because too many refusals were in
/// progress.
pub const CONNECTION_REFUSALS: &[&str] = &["per_address", "total", "unanswered"];

/// Which deadline ended an HTTP request, as the `kind` label of
/// `vncbroker_http_timeouts_total`.
pub const HTTP_TIMEOUTS: &[&str] = &["body", "request"];

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key).or_default() += 1;
    }
}

fn histogram<K: Ord + Clone>(
    map: &Mutex<BTreeMap<K, Arc<Histogram>>>,
    key: &K,
    bounds: &'static [f64],
) -> Option<Arc<Histogram>> {
    let mut m = map.lock().ok()?;
    Some(Arc::clone(
        m.entry(key.clone())
            .or_insert_with(|| Arc::new(Histogram::new(bounds))),
    ))
}

/// Escapes a label value for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        // Known label values start at 0, so rates work from the first scrape.
        let zeros = |labels: Vec<&'static str>| {
            Mutex::new(
                labels
                    .into_iter()
                    .map(|l| (l, 0))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let (token_reasons, failure_reasons): (Vec<Refused>, Vec<Refused>) =
            Refused::ALL.iter().partition(|r| r.is_token_refusal());
        Metrics {
            started: crate::now_unix(),
            sessions_total: zeros(SESSION_OUTCOMES.to_vec()),
            session_duration: Histogram::new(SESSION_BUCKETS),
            bytes_to_client: AtomicU64::new(0),
            bytes_to_server: AtomicU64::new(0),
            tokens_minted: AtomicU64::new(0),
            recheck_failures: AtomicU64::new(0),
            tokens_redeemed: AtomicU64::new(0),
            tokens_refused: zeros(token_reasons.iter().map(|r| r.label()).collect()),
            sessions_failed: zeros(failure_reasons.iter().map(|r| r.label()).collect()),
            api_requests: Mutex::default(),
            api_duration: Mutex::default(),
            xmlrpc_results: Mutex::default(),
            store_duration: Mutex::default(),
            store_errors: Mutex::default(),
            password_verifications: AtomicU64::new(0),
            password_checks_busy: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            connections_refused: zeros(CONNECTION_REFUSALS.to_vec()),
            http_timeouts: zeros(HTTP_TIMEOUTS.to_vec()),
        }
    }

    /// An argon2 verification ran (a dummy one for an unknown user included).
    pub fn password_verification(&self) {
        self.password_verifications.fetch_add(1, Relaxed);
    }

    /// A password check was answered "busy": the verification queue was full.
    pub fn password_check_busy(&self) {
        self.password_checks_busy.fetch_add(1, Relaxed);
    }

    /// A connection was admitted.
    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Relaxed);
    }

    /// An admitted connection closed.
    pub fn connection_closed(&self) {
        let _ = self
            .connections_open
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }

    /// A connection was turned away; `reason` is one of [`CONNECTION_REFUSALS`].
    pub fn connection_refused(&self, reason: &'static str) {
        bump(&self.connections_refused, reason);
    }

    /// A request ran out of time; `kind` is one of [`HTTP_TIMEOUTS`].
    pub fn http_timeout(&self, kind: &'static str) {
        bump(&self.http_timeouts, kind);
    }

    /// A console session ended after `duration`.
    pub fn session_ended(&self, end: &End, duration: Duration) {
        bump(&self.sessions_total, session_outcome(end));
        self.session_duration.observe(duration.as_secs_f64());
    }

    /// Bytes relayed from the VNC server to the browser.
    pub fn bytes_to_client(&self, n: usize) {
        self.bytes_to_client.fetch_add(n as u64, Relaxed);
    }

    /// Bytes relayed from the browser to the VNC server.
    pub fn bytes_to_server(&self, n: usize) {
        self.bytes_to_server.fetch_add(n as u64, Relaxed);
    }

    pub fn token_minted(&self) {
        self.tokens_minted.fetch_add(1, Relaxed);
    }

    /// Live sessions the inventory could not re-check (it was unreachable);
    /// they went on.
    pub fn recheck_failed(&self, sessions: u64) {
        self.recheck_failures.fetch_add(sessions, Relaxed);
    }

    /// The store accepted a token for a session (proxy or websockify lookup).
    pub fn token_redeemed(&self) {
        self.tokens_redeemed.fetch_add(1, Relaxed);
    }

    /// The proxy turned a connection away.
    pub fn refused(&self, why: Refused) {
        if why.is_token_refusal() {
            bump(&self.tokens_refused, why.label());
        } else {
            bump(&self.sessions_failed, why.label());
        }
    }

    /// An API request finished. `method` is an XML-RPC method label or a
    /// route such as `POST /api/v1/sessions`.
    pub fn api_request(&self, method: &str, status: u16, elapsed: Duration) {
        if let Ok(mut m) = self.api_requests.lock() {
            *m.entry((method.to_owned(), status)).or_default() += 1;
        }
        if let Some(h) = histogram(&self.api_duration, &method.to_owned(), API_BUCKETS) {
            h.observe(elapsed.as_secs_f64());
        }
    }

    /// An XML-RPC call answered with an OpenNebula result code (0 for
    /// success), or a fault code (negative). Codes passed through from oned
    /// that are not OpenNebula's known ones count as `other`.
    pub fn xmlrpc_result(&self, method: &'static str, code: i64) {
        let code = match code {
            0x0000 => "0x0000",
            0x0100 => "0x0100",
            0x0200 => "0x0200",
            0x0400 => "0x0400",
            0x0800 => "0x0800",
            0x1000 => "0x1000",
            0x2000 => "0x2000",
            -32700 => "-32700",
            -32601 => "-32601",
            _ => "other",
        };
        bump(&self.xmlrpc_results, (method, code));
    }

    /// A store call took `elapsed` and failed with `error`, if it did.
    pub fn store_call(&self, op: StoreOp, elapsed: Duration, error: Option<&StoreError>) {
        if let Some(h) = histogram(&self.store_duration, &op, STORE_BUCKETS) {
            h.observe(elapsed.as_secs_f64());
        }
        if let Some(e) = error {
            bump(&self.store_errors, (op, store_error_kind(e)));
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::with_capacity(8192);
        let o = &mut out;

        header(o, "vncbroker_build_info", "gauge", "The running version.");
        let _ = writeln!(
            o,
            "vncbroker_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        header(
            o,
            "vncbroker_start_time_seconds",
            "gauge",
            "When the process started, in Unix seconds.",
        );
        let _ = writeln!(o, "vncbroker_start_time_seconds {}", self.started);
        header(
            o,
            "vncbroker_draining",
            "gauge",
            "1 while the node drains for shutdown and takes no new sessions.",
        );
        let _ = writeln!(o, "vncbroker_draining {}", u8::from(gauges.draining));

        header(
            o,
            "vncbroker_sessions_active",
            "gauge",
            "Console sessions open on this node.",
        );
        let _ = writeln!(o, "vncbroker_sessions_active {}", gauges.sessions_active);
        header(
            o,
            "vncbroker_sessions_total",
            "counter",
            "Console sessions ended, by how they ended.",
        );
        if let Ok(m) = self.sessions_total.lock() {
            for (outcome, n) in m.iter() {
                let _ = writeln!(o, "vncbroker_sessions_total{{outcome=\"{outcome}\"}} {n}");
            }
        }
        header(
            o,
            "vncbroker_session_duration_seconds",
            "histogram",
            "How long ended console sessions lasted.",
        );
        self.session_duration
            .render(o, "vncbroker_session_duration_seconds", "");
        header(
            o,
            "vncbroker_sessions_failed_total",
            "counter",
            "Connections whose token was accepted but whose session could not start, by reason.",
        );
        if let Ok(m) = self.sessions_failed.lock() {
            for (reason, n) in m.iter() {
                let _ = writeln!(
                    o,
                    "vncbroker_sessions_failed_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }

        header(
            o,
            "vncbroker_bytes_to_client_total",
            "counter",
            "Bytes relayed from VNC servers to browsers.",
        );
        let _ = writeln!(
            o,
            "vncbroker_bytes_to_client_total {}",
            self.bytes_to_client.load(Relaxed)
        );
        header(
            o,
            "vncbroker_bytes_to_server_total",
            "counter",
            "Bytes relayed from browsers to VNC servers.",
        );
        let _ = writeln!(
            o,
            "vncbroker_bytes_to_server_total {}",
            self.bytes_to_server.load(Relaxed)
        );

        header(
            o,
            "vncbroker_tokens_minted_total",
            "counter",
            "Console tokens minted.",
        );
        let _ = writeln!(
            o,
            "vncbroker_tokens_minted_total {}",
            self.tokens_minted.load(Relaxed)
        );

        header(
            o,
            "vncbroker_recheck_failures_total",
            "counter",
            "Live sessions the inventory could not re-check (unreachable); they went on.",
        );
        let _ = writeln!(
            o,
            "vncbroker_recheck_failures_total {}",
            self.recheck_failures.load(Relaxed)
        );
        header(
            o,
            "vncbroker_tokens_redeemed_total",
            "counter",
            "Console tokens accepted for a session.",
        );
        let _ = writeln!(
            o,
            "vncbroker_tokens_redeemed_total {}",
            self.tokens_redeemed.load(Relaxed)
        );
        header(
            o,
            "vncbroker_tokens_refused_total",
            "counter",
            "Connections refused for their token, by reason.",
        );
        if let Ok(m) = self.tokens_refused.lock() {
            for (reason, n) in m.iter() {
                let _ = writeln!(
                    o,
                    "vncbroker_tokens_refused_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }

        header(
            o,
            "vncbroker_api_requests_total",
            "counter",
            "API requests, by XML-RPC method or JSON route, and HTTP status.",
        );
        if let Ok(m) = self.api_requests.lock() {
            for ((method, status), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "vncbroker_api_requests_total{{method=\"{}\",status=\"{status}\"}} {n}",
                    escape(method)
                );
            }
        }
        header(
            o,
            "vncbroker_api_request_duration_seconds",
            "histogram",
            "API request latency, by XML-RPC method or JSON route.",
        );
        let api: Vec<_> = self
            .api_duration
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect())
            .unwrap_or_default();
        for (method, h) in api {
            h.render(
                o,
                "vncbroker_api_request_duration_seconds",
                &format!("method=\"{}\"", escape(&method)),
            );
        }
        header(
            o,
            "vncbroker_xmlrpc_results_total",
            "counter",
            "XML-RPC calls by method and OpenNebula result code (0x0000 success, 0x0100 \
             authentication, 0x0200 authorization, 0x0400 no such object, 0x0800 action, \
             0x1000 API, 0x2000 internal; -32601 no such method).",
        );
        if let Ok(m) = self.xmlrpc_results.lock() {
            for ((method, code), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "vncbroker_xmlrpc_results_total{{method=\"{method}\",code=\"{code}\"}} {n}"
                );
            }
        }

        header(
            o,
            "vncbroker_store_duration_seconds",
            "histogram",
            "Database call latency, by operation.",
        );
        let store: Vec<_> = self
            .store_duration
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, Arc::clone(v))).collect())
            .unwrap_or_default();
        for (op, h) in store {
            h.render(
                o,
                "vncbroker_store_duration_seconds",
                &format!("op=\"{}\"", op.label()),
            );
        }
        header(
            o,
            "vncbroker_store_errors_total",
            "counter",
            "Failed database calls, by operation and error kind.",
        );
        if let Ok(m) = self.store_errors.lock() {
            for ((op, kind), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "vncbroker_store_errors_total{{op=\"{}\",kind=\"{kind}\"}} {n}",
                    op.label()
                );
            }
        }

        header(
            o,
            "vncbroker_password_verifications_total",
            "counter",
            "argon2 password verifications run (including the dummy ones for unknown users).",
        );
        let _ = writeln!(
            o,
            "vncbroker_password_verifications_total {}",
            self.password_verifications.load(Relaxed)
        );
        header(
            o,
            "vncbroker_password_checks_busy_total",
            "counter",
            "Password checks answered busy because the verification queue was full.",
        );
        let _ = writeln!(
            o,
            "vncbroker_password_checks_busy_total {}",
            self.password_checks_busy.load(Relaxed)
        );
        header(
            o,
            "vncbroker_connections_open",
            "gauge",
            "Client connections admitted and still open.",
        );
        let _ = writeln!(
            o,
            "vncbroker_connections_open {}",
            self.connections_open.load(Relaxed)
        );
        header(
            o,
            "vncbroker_connections_refused_total",
            "counter",
            "Connections turned away by the connection caps, by reason.",
        );
        if let Ok(m) = self.connections_refused.lock() {
            for (reason, n) in m.iter() {
                let _ = writeln!(
                    o,
                    "vncbroker_connections_refused_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        header(
            o,
            "vncbroker_http_timeouts_total",
            "counter",
            "HTTP requests ended by a deadline: the body's or the whole request's.",
        );
        if let Ok(m) = self.http_timeouts.lock() {
            for (kind, n) in m.iter() {
                let _ = writeln!(o, "vncbroker_http_timeouts_total{{kind=\"{kind}\"}} {n}");
            }
        }
        out
    }
}

/// Counts API requests: wraps the API routes (see the server), labelling
/// each by the XML-RPC method the handler reported, or else by its route.
pub async fn track_api(
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let verb: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    };
    let route = matched
        .as_ref()
        .map(|m| m.as_str())
        .unwrap_or("unmatched")
        .to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    let method = match resp.extensions().get::<ApiMethod>() {
        Some(ApiMethod(m)) => (*m).to_owned(),
        None => format!("{verb} {route}"),
    };
    global().api_request(&method, resp.status().as_u16(), start.elapsed());
    resp
}

/// A store that times every call and counts failures, around another.
///
/// Every [`Store`] method is forwarded, including those with default
/// implementations (a new trait method must be forwarded here too, or the
/// wrapper would silently use the default).
pub struct TimedStore {
    inner: Arc<dyn Store>,
    metrics: &'static Metrics,
}

impl TimedStore {
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(TimedStore {
            inner,
            metrics: global(),
        })
    }

    async fn timed<T>(
        &self,
        op: StoreOp,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = call.await;
        self.metrics
            .store_call(op, start.elapsed(), r.as_ref().err());
        r
    }
}

#[async_trait]
impl Store for TimedStore {
    async fn insert_token(&self, token: &NewToken) -> Result<i64, StoreError> {
        self.timed(StoreOp::InsertToken, self.inner.insert_token(token))
            .await
    }
    async fn revoke(&self, r: &Revocation) -> Result<Revoked, StoreError> {
        self.timed(StoreOp::Revoke, self.inner.revoke(r)).await
    }
    async fn purge_expired(&self, before: i64) -> Result<u64, StoreError> {
        self.timed(StoreOp::PurgeExpired, self.inner.purge_expired(before))
            .await
    }
    async fn redeem(&self, hash: &TokenHash, now: i64) -> Result<Option<Redemption>, StoreError> {
        self.timed(StoreOp::Redeem, self.inner.redeem(hash, now))
            .await
    }
    async fn revocations_after(
        &self,
        seq: i64,
        limit: u32,
    ) -> Result<Vec<RecordedRevocation>, StoreError> {
        self.timed(
            StoreOp::RevocationsAfter,
            self.inner.revocations_after(seq, limit),
        )
        .await
    }
    async fn last_revocation(&self) -> Result<i64, StoreError> {
        self.timed(StoreOp::LastRevocation, self.inner.last_revocation())
            .await
    }
    async fn purge_revocations(&self, before: i64) -> Result<u64, StoreError> {
        self.timed(
            StoreOp::PurgeRevocations,
            self.inner.purge_revocations(before),
        )
        .await
    }
    async fn session(&self, id: i64) -> Result<Option<SessionRecord>, StoreError> {
        self.timed(StoreOp::Session, self.inner.session(id)).await
    }
    async fn set_password(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        self.timed(StoreOp::SetPassword, self.inner.set_password(name, hash))
            .await
    }
    async fn remove_user(&self, name: &str) -> Result<Option<Revoked>, StoreError> {
        self.timed(StoreOp::RemoveUser, self.inner.remove_user(name))
            .await
    }
    async fn update_vm(&self, vm: &Vm) -> Result<Option<Revoked>, StoreError> {
        self.timed(StoreOp::UpdateVm, self.inner.update_vm(vm))
            .await
    }
    async fn open_session(&self, session: &NewSession) -> Result<i64, StoreError> {
        self.timed(StoreOp::OpenSession, self.inner.open_session(session))
            .await
    }
    async fn close_session(&self, id: i64, end: &SessionEnd) -> Result<(), StoreError> {
        self.timed(StoreOp::CloseSession, self.inner.close_session(id, end))
            .await
    }
    async fn close_orphaned_sessions(&self, node: &str, now: i64) -> Result<u64, StoreError> {
        self.timed(
            StoreOp::CloseOrphanedSessions,
            self.inner.close_orphaned_sessions(node, now),
        )
        .await
    }
    async fn sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRecord>, StoreError> {
        self.timed(StoreOp::Sessions, self.inner.sessions(filter))
            .await
    }
    async fn purge_sessions(&self, before: i64) -> Result<u64, StoreError> {
        self.timed(StoreOp::PurgeSessions, self.inner.purge_sessions(before))
            .await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(StoreOp::Ping, self.inner.ping()).await
    }
    async fn add_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<i64, StoreError> {
        self.timed(
            StoreOp::AddUser,
            self.inner.add_user(name, password_hash, admin),
        )
        .await
    }
    async fn user(&self, name: &str) -> Result<Option<User>, StoreError> {
        self.timed(StoreOp::User, self.inner.user(name)).await
    }
    async fn users(&self) -> Result<Vec<User>, StoreError> {
        self.timed(StoreOp::Users, self.inner.users()).await
    }
    async fn add_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        self.timed(StoreOp::AddVm, self.inner.add_vm(vm)).await
    }
    async fn vm(&self, id: i64) -> Result<Option<Vm>, StoreError> {
        self.timed(StoreOp::Vm, self.inner.vm(id)).await
    }
    async fn vms(&self) -> Result<Vec<Vm>, StoreError> {
        self.timed(StoreOp::Vms, self.inner.vms()).await
    }
    async fn remove_vm(&self, id: i64) -> Result<Option<Revoked>, StoreError> {
        self.timed(StoreOp::RemoveVm, self.inner.remove_vm(id))
            .await
    }
    fn revocation_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.inner.revocation_signal()
    }
    async fn sealed_vnc_password(&self) -> Result<Option<String>, StoreError> {
        self.inner.sealed_vnc_password().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of one sample line, e.g. `name{labels}`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_histograms_and_labels_render_in_the_text_format() {
        let m = Metrics::new();
        m.token_minted();
        m.token_minted();
        m.token_redeemed();
        m.refused(Refused::InvalidToken);
        m.refused(Refused::Unreachable);
        m.bytes_to_client(100);
        m.bytes_to_server(7);
        m.session_ended(&End::ClientClosed, Duration::from_secs(5));
        m.session_ended(&End::Stopped(Stop::Shutdown), Duration::from_secs(50));
        m.api_request(
            "POST /api/v1/vms/{id}/console-tokens",
            201,
            Duration::from_millis(3),
        );
        m.api_request(xmlrpc_method_label("no.such"), 200, Duration::from_secs(20));
        m.xmlrpc_result(xmlrpc_method_label("one.vm.novnctoken"), 0x100);
        m.store_call(StoreOp::Redeem, Duration::from_micros(300), None);
        m.store_call(
            StoreOp::Redeem,
            Duration::from_millis(2),
            Some(&StoreError::Unavailable("x".into())),
        );
        m.password_verification();
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        m.connection_refused("per_address");
        m.http_timeout("body");
        let t = m.render(Gauges {
            sessions_active: 3,
            draining: true,
        });

        assert_eq!(
            sample(&t, "vncbroker_password_verifications_total"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "vncbroker_password_checks_busy_total"),
            Some(0.0)
        );
        assert_eq!(sample(&t, "vncbroker_connections_open"), Some(1.0));
        assert_eq!(
            sample(
                &t,
                "vncbroker_connections_refused_total{reason=\"per_address\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "vncbroker_connections_refused_total{reason=\"total\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&t, "vncbroker_http_timeouts_total{kind=\"body\"}"),
            Some(1.0)
        );

        assert_eq!(sample(&t, "vncbroker_sessions_active"), Some(3.0));
        assert_eq!(sample(&t, "vncbroker_draining"), Some(1.0));
        assert_eq!(sample(&t, "vncbroker_tokens_minted_total"), Some(2.0));
        assert_eq!(sample(&t, "vncbroker_tokens_redeemed_total"), Some(1.0));
        assert_eq!(
            sample(&t, "vncbroker_tokens_refused_total{reason=\"invalid\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "vncbroker_tokens_refused_total{reason=\"no_token\"}"),
            Some(0.0),
            "known reasons start at zero"
        );
        assert_eq!(
            sample(
                &t,
                "vncbroker_sessions_failed_total{reason=\"unreachable\"}"
            ),
            Some(1.0)
        );
        assert_eq!(sample(&t, "vncbroker_bytes_to_client_total"), Some(100.0));
        assert_eq!(sample(&t, "vncbroker_bytes_to_server_total"), Some(7.0));
        assert_eq!(
            sample(&t, "vncbroker_sessions_total{outcome=\"client_closed\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "vncbroker_sessions_total{outcome=\"shutdown\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "vncbroker_session_duration_seconds_bucket{le=\"10\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "vncbroker_session_duration_seconds_bucket{le=\"+Inf\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&t, "vncbroker_session_duration_seconds_sum"),
            Some(55.0)
        );
        assert_eq!(
            sample(
                &t,
                "vncbroker_api_requests_total{method=\"POST /api/v1/vms/{id}/console-tokens\",status=\"201\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "vncbroker_api_requests_total{method=\"other\",status=\"200\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "vncbroker_api_request_duration_seconds_bucket{method=\"other\",le=\"10\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &t,
                "vncbroker_api_request_duration_seconds_bucket{method=\"other\",le=\"+Inf\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "vncbroker_xmlrpc_results_total{method=\"one.vm.novnctoken\",code=\"0x0100\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&t, "vncbroker_store_duration_seconds_count{op=\"redeem\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &t,
                "vncbroker_store_duration_seconds_bucket{op=\"redeem\",le=\"0.0005\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &t,
                "vncbroker_store_errors_total{op=\"redeem\",kind=\"unavailable\"}"
            ),
            Some(1.0)
        );

        // Every sample line belongs to a family announced by a TYPE line.
        let mut typed = std::collections::HashSet::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "untyped sample {line:?}");
            }
        }
    }

    #[test]
    fn unknown_xmlrpc_methods_fold_into_other_and_labels_are_escaped() {
        assert_eq!(
            xmlrpc_method_label("one.vm.novnctoken"),
            "one.vm.novnctoken"
        );
        assert_eq!(xmlrpc_method_label("one.vm.token"), "one.vm.token");
        assert_eq!(xmlrpc_method_label("x\"y"), "other");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
