//! Prometheus metrics, served at `GET /metrics`.
//!
//! A leaf: the other modules report into it with label values they own
//! (`StoreOp::label`, the XML-RPC method and result-code labels, `End`'s
//! [`SessionOutcome`], the proxy's [`Refused`]), and it imports none of them.
//! Every label value comes from a fixed list or from the router (matched
//! route templates and HTTP status codes), so no client can grow the label
//! sets.
//!
//! Registration, counting and exposition are `prometheus-client`'s. Its
//! output is the OpenMetrics text; [`Metrics::render`] serves it in the
//! Prometheus text format (version 0.0.4) that this endpoint has always
//! spoken, so scrapers and dashboards see the same families, series and
//! bucket bounds.
//!
//! Recording is done through [`global`]; [`Metrics`] values can also be made
//! on their own (the unit tests do).

use std::collections::HashSet;
use std::sync::LazyLock;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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
/// The relay's `End` says which one it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOutcome {
    ClientClosed,
    /// The browser's connection went away without a WebSocket close.
    ClientLost,
    ServerClosed,
    ClientProtocolError,
    ServerError,
    Revoked,
    AccessWithdrawn,
    VmGone,
    VmMoved,
    StoreUnavailable,
    Shutdown,
    Idle,
    ClientUnresponsive,
    TimeLimit,
    TokenExpired,
    /// The VNC server sent a message the proxy could not follow.
    ServerProtocolError,
    /// A required recording could not be written.
    RecordingFailed,
}

impl SessionOutcome {
    /// Every outcome, each a series from the first scrape.
    pub const ALL: &[SessionOutcome] = &[
        SessionOutcome::ClientClosed,
        SessionOutcome::ClientLost,
        SessionOutcome::ServerClosed,
        SessionOutcome::ClientProtocolError,
        SessionOutcome::ServerError,
        SessionOutcome::Revoked,
        SessionOutcome::AccessWithdrawn,
        SessionOutcome::VmGone,
        SessionOutcome::VmMoved,
        SessionOutcome::StoreUnavailable,
        SessionOutcome::Shutdown,
        SessionOutcome::Idle,
        SessionOutcome::ClientUnresponsive,
        SessionOutcome::TimeLimit,
        SessionOutcome::TokenExpired,
        SessionOutcome::ServerProtocolError,
        SessionOutcome::RecordingFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SessionOutcome::ClientClosed => "client_closed",
            SessionOutcome::ClientLost => "client_lost",
            SessionOutcome::ServerClosed => "server_closed",
            SessionOutcome::ClientProtocolError => "client_protocol_error",
            SessionOutcome::ServerError => "server_error",
            SessionOutcome::Revoked => "revoked",
            SessionOutcome::AccessWithdrawn => "access_withdrawn",
            SessionOutcome::VmGone => "vm_gone",
            SessionOutcome::VmMoved => "vm_moved",
            SessionOutcome::StoreUnavailable => "store_unavailable",
            SessionOutcome::Shutdown => "shutdown",
            SessionOutcome::Idle => "idle",
            SessionOutcome::ClientUnresponsive => "client_unresponsive",
            SessionOutcome::TimeLimit => "time_limit",
            SessionOutcome::TokenExpired => "token_expired",
            SessionOutcome::ServerProtocolError => "server_protocol_error",
            SessionOutcome::RecordingFailed => "recording_failed",
        }
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
    /// The VM is exclusive and another control session is live.
    ControlTaken,
    /// The session must be recorded and its recording could not start.
    RecordingUnavailable,
    /// A reconnect ticket came back before the broker saw its session drop.
    ReconnectPending,
    /// The token was good, but the SPICE link failed.
    SpiceLink,
    /// A SPICE channel the session may not open, or that names no live
    /// session of its token.
    SpiceChannel,
}

impl Refused {
    /// Every reason, each a series from the first scrape.
    pub const ALL: &[Refused] = &[
        Refused::NoToken,
        Refused::InvalidToken,
        Refused::Moved,
        Refused::StoreUnavailable,
        Refused::SessionLimit,
        Refused::Unreachable,
        Refused::VncHandshake,
        Refused::HandshakeTimeout,
        Refused::Withdrawn,
        Refused::ControlTaken,
        Refused::RecordingUnavailable,
        Refused::ReconnectPending,
        Refused::SpiceLink,
        Refused::SpiceChannel,
    ];

    /// Token refusals go to `vncbroker_tokens_refused_total`; failures after
    /// a token was accepted to `vncbroker_sessions_failed_total`.
    fn is_token_refusal(self) -> bool {
        matches!(
            self,
            Refused::NoToken | Refused::InvalidToken | Refused::Moved | Refused::StoreUnavailable
        )
    }

    pub fn label(self) -> &'static str {
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
            Refused::ControlTaken => "control_taken",
            Refused::RecordingUnavailable => "recording_unavailable",
            Refused::ReconnectPending => "reconnect_pending",
            Refused::SpiceLink => "spice_link",
            Refused::SpiceChannel => "spice_channel",
        }
    }
}

/// Why a connection was turned away, as the `reason` label of
/// `vncbroker_connections_refused_total`: over the cap per address, over
/// the total cap, or dropped unanswered because too many refusals were in
/// progress.
pub const CONNECTION_REFUSALS: &[&str] = &["per_address", "total", "unanswered"];

/// Which deadline ended an HTTP request, as the `kind` label of
/// `vncbroker_http_timeouts_total`.
pub const HTTP_TIMEOUTS: &[&str] = &["body", "request"];

/// Put into a response's extensions by the XML-RPC handler, so the request
/// is counted under the called method rather than `POST /RPC2`.
#[derive(Debug, Clone, Copy)]
pub struct ApiMethod(pub &'static str);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodStatusLabels {
    method: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct XmlRpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpKindLabels {
    op: &'static str,
    kind: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn api_histogram() -> Histogram {
    Histogram::new(API_BUCKETS.iter().copied())
}

fn store_histogram() -> Histogram {
    Histogram::new(STORE_BUCKETS.iter().copied())
}

/// A family's `# HELP` and `# TYPE` lines, in the Prometheus text format.
struct Header {
    /// The name the encoder gives the family (`x` for the counter `x_total`).
    family: &'static str,
    lines: String,
}

/// Registers a family whose series appear on first use. The encoder leaves
/// out a family with no series, but every family is announced from the
/// first scrape, so its header is kept for [`text_format`] to add.
fn lazy(
    r: &mut Registry,
    headers: &mut Vec<Header>,
    kind: &'static str,
    family: &'static str,
    help: &'static str,
    metric: impl prometheus_client::registry::Metric,
) {
    let name = match kind {
        "counter" => format!("{family}_total"),
        _ => family.to_owned(),
    };
    headers.push(Header {
        family,
        lines: format!("# HELP {name} {help}.\n# TYPE {name} {kind}\n"),
    });
    r.register(family, help, metric);
}

/// Values read at scrape time rather than counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Live console sessions on this node.
    pub sessions_active: usize,
    /// Whether the node is draining for shutdown.
    pub draining: bool,
}

/// Every metric of the broker, registered once.
pub struct Metrics {
    registry: Registry,
    /// The families whose series appear on first use, as they are announced.
    headers: Vec<Header>,
    draining: Gauge,
    sessions_active: Gauge,
    sessions_total: Family<OutcomeLabel, Counter>,
    sessions_started: Family<ProtocolLabel, Counter>,
    spice_channels: Family<ChannelLabel, Counter>,
    session_duration: Histogram,
    sessions_failed: Family<ReasonLabel, Counter>,
    bytes_to_client: Counter,
    bytes_to_server: Counter,
    clipboard_dropped: Family<DirectionLabel, Counter>,
    input_dropped: Counter,
    recordings: Family<OutcomeLabel, Counter>,
    tokens_minted: Counter,
    recheck_failures: Counter,
    tokens_redeemed: Counter,
    tokens_refused: Family<ReasonLabel, Counter>,
    api_requests: Family<MethodStatusLabels, Counter>,
    api_duration: Histograms<MethodLabel>,
    xmlrpc_results: Family<XmlRpcLabels, Counter>,
    store_duration: Histograms<OpLabel>,
    store_errors: Family<OpKindLabels, Counter>,
    password_verifications: Counter,
    password_checks_busy: Counter,
    connections_open: Gauge,
    connections_refused: Family<ReasonLabel, Counter>,
    http_timeouts: Family<KindLabel, Counter>,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        // Help texts get their final full stop from the registry. Counter
        // names get their `_total` there too.
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("vncbroker_build_info", "The running version", build_info);
        let start_time = Gauge::<i64>::default();
        start_time.set(crate::now_unix());
        registry.register(
            "vncbroker_start_time_seconds",
            "When the process started, in Unix seconds",
            start_time,
        );
        let m = Metrics {
            draining: Gauge::default(),
            sessions_active: Gauge::default(),
            sessions_total: Family::default(),
            sessions_started: Family::default(),
            spice_channels: Family::default(),
            session_duration: Histogram::new(SESSION_BUCKETS.iter().copied()),
            sessions_failed: Family::default(),
            bytes_to_client: Counter::default(),
            bytes_to_server: Counter::default(),
            clipboard_dropped: Family::default(),
            input_dropped: Counter::default(),
            recordings: Family::default(),
            tokens_minted: Counter::default(),
            recheck_failures: Counter::default(),
            tokens_redeemed: Counter::default(),
            tokens_refused: Family::default(),
            api_requests: Family::default(),
            api_duration: Family::new_with_constructor(api_histogram),
            xmlrpc_results: Family::default(),
            store_duration: Family::new_with_constructor(store_histogram),
            store_errors: Family::default(),
            password_verifications: Counter::default(),
            password_checks_busy: Counter::default(),
            connections_open: Gauge::default(),
            connections_refused: Family::default(),
            http_timeouts: Family::default(),
            registry: Registry::default(),
            headers: Vec::new(),
        };
        let r = &mut registry;
        let mut headers = Vec::new();
        r.register(
            "vncbroker_draining",
            "1 while the node drains for shutdown and takes no new sessions",
            m.draining.clone(),
        );
        r.register(
            "vncbroker_sessions_active",
            "Console sessions open on this node",
            m.sessions_active.clone(),
        );
        r.register(
            "vncbroker_sessions",
            "Console sessions ended, by how they ended",
            m.sessions_total.clone(),
        );
        r.register(
            "vncbroker_sessions_started",
            "Console sessions started, by protocol (a SPICE session is its main channel)",
            m.sessions_started.clone(),
        );
        r.register(
            "vncbroker_spice_channels",
            "SPICE channel connections, by channel type and outcome (linked, or refused by \
             the session's rules, the link or the server)",
            m.spice_channels.clone(),
        );
        r.register(
            "vncbroker_session_duration_seconds",
            "How long ended console sessions lasted",
            m.session_duration.clone(),
        );
        r.register(
            "vncbroker_sessions_failed",
            "Connections whose token was accepted but whose session could not start, by reason",
            m.sessions_failed.clone(),
        );
        r.register(
            "vncbroker_bytes_to_client",
            "Bytes relayed from VNC servers to browsers",
            m.bytes_to_client.clone(),
        );
        r.register(
            "vncbroker_bytes_to_server",
            "Bytes relayed from browsers to VNC servers",
            m.bytes_to_server.clone(),
        );
        r.register(
            "vncbroker_clipboard_dropped",
            "Clipboard transfers the proxy dropped (policy, or over the size limit), by direction",
            m.clipboard_dropped.clone(),
        );
        r.register(
            "vncbroker_input_dropped",
            "Input messages from view-only sessions that the proxy did not forward",
            m.input_dropped.clone(),
        );
        r.register(
            "vncbroker_recordings",
            "Session recordings finished, by outcome (complete, incomplete, failed)",
            m.recordings.clone(),
        );
        r.register(
            "vncbroker_tokens_minted",
            "Console tokens minted",
            m.tokens_minted.clone(),
        );
        r.register(
            "vncbroker_recheck_failures",
            "Live sessions the inventory could not re-check (unreachable); they went on",
            m.recheck_failures.clone(),
        );
        r.register(
            "vncbroker_tokens_redeemed",
            "Console tokens accepted for a session",
            m.tokens_redeemed.clone(),
        );
        r.register(
            "vncbroker_tokens_refused",
            "Connections refused for their token, by reason",
            m.tokens_refused.clone(),
        );
        lazy(
            r,
            &mut headers,
            "counter",
            "vncbroker_api_requests",
            "API requests, by XML-RPC method or JSON route, and HTTP status",
            m.api_requests.clone(),
        );
        lazy(
            r,
            &mut headers,
            "histogram",
            "vncbroker_api_request_duration_seconds",
            "API request latency, by XML-RPC method or JSON route",
            m.api_duration.clone(),
        );
        lazy(
            r,
            &mut headers,
            "counter",
            "vncbroker_xmlrpc_results",
            "XML-RPC calls by method and OpenNebula result code (0x0000 success, 0x0100 \
             authentication, 0x0200 authorization, 0x0400 no such object, 0x0800 action, \
             0x1000 API, 0x2000 internal; -32601 no such method)",
            m.xmlrpc_results.clone(),
        );
        lazy(
            r,
            &mut headers,
            "histogram",
            "vncbroker_store_duration_seconds",
            "Database call latency, by operation",
            m.store_duration.clone(),
        );
        lazy(
            r,
            &mut headers,
            "counter",
            "vncbroker_store_errors",
            "Failed database calls, by operation and error kind",
            m.store_errors.clone(),
        );
        r.register(
            "vncbroker_password_verifications",
            "argon2 password verifications run (including the dummy ones for unknown users)",
            m.password_verifications.clone(),
        );
        r.register(
            "vncbroker_password_checks_busy",
            "Password checks answered busy because the verification queue was full",
            m.password_checks_busy.clone(),
        );
        r.register(
            "vncbroker_connections_open",
            "Client connections admitted and still open",
            m.connections_open.clone(),
        );
        r.register(
            "vncbroker_connections_refused",
            "Connections turned away by the connection caps, by reason",
            m.connections_refused.clone(),
        );
        r.register(
            "vncbroker_http_timeouts",
            "HTTP requests ended by a deadline: the body's or the whole request's",
            m.http_timeouts.clone(),
        );
        // Known label values start at 0, so rates work from the first scrape.
        for reason in CONNECTION_REFUSALS {
            drop(m.connections_refused.get_or_create(&ReasonLabel { reason }));
        }
        for direction in ["to_vm", "from_vm"] {
            drop(
                m.clipboard_dropped
                    .get_or_create(&DirectionLabel { direction }),
            );
        }
        for protocol in ["vnc", "spice"] {
            drop(
                m.sessions_started
                    .get_or_create(&ProtocolLabel { protocol }),
            );
        }
        for outcome in ["complete", "incomplete", "failed"] {
            drop(m.recordings.get_or_create(&OutcomeLabel { outcome }));
        }
        for kind in HTTP_TIMEOUTS {
            drop(m.http_timeouts.get_or_create(&KindLabel { kind }));
        }
        for o in SessionOutcome::ALL {
            drop(
                m.sessions_total
                    .get_or_create(&OutcomeLabel { outcome: o.label() }),
            );
        }
        for r in Refused::ALL {
            let family = if r.is_token_refusal() {
                &m.tokens_refused
            } else {
                &m.sessions_failed
            };
            drop(family.get_or_create(&ReasonLabel { reason: r.label() }));
        }
        Metrics {
            registry,
            headers,
            ..m
        }
    }

    /// An argon2 verification ran (a dummy one for an unknown user included).
    pub fn password_verification(&self) {
        self.password_verifications.inc();
    }

    /// A password check was answered "busy": the verification queue was full.
    pub fn password_check_busy(&self) {
        self.password_checks_busy.inc();
    }

    /// A connection was admitted.
    pub fn connection_opened(&self) {
        self.connections_open.inc();
    }

    /// An admitted connection closed.
    pub fn connection_closed(&self) {
        let _ = self
            .connections_open
            .inner()
            .fetch_update(Relaxed, Relaxed, |n| Some((n - 1).max(0)));
    }

    /// A connection was turned away; `reason` is one of [`CONNECTION_REFUSALS`].
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A request ran out of time; `kind` is one of [`HTTP_TIMEOUTS`].
    pub fn http_timeout(&self, kind: &'static str) {
        self.http_timeouts.get_or_create(&KindLabel { kind }).inc();
    }

    /// A console session ended after `duration`.
    pub fn session_ended(&self, outcome: SessionOutcome, duration: Duration) {
        self.sessions_total
            .get_or_create(&OutcomeLabel {
                outcome: outcome.label(),
            })
            .inc();
        self.session_duration.observe(duration.as_secs_f64());
    }

    /// A console session started (its row was written).
    pub fn session_started(&self, protocol: crate::protocol::Protocol) {
        self.sessions_started
            .get_or_create(&ProtocolLabel {
                protocol: protocol.as_str(),
            })
            .inc();
    }

    /// A SPICE channel connection linked or was turned away.
    pub fn spice_channel(&self, channel: &'static str, outcome: &'static str) {
        self.spice_channels
            .get_or_create(&ChannelLabel { channel, outcome })
            .inc();
    }

    /// Bytes relayed from the VNC server to the browser.
    pub fn bytes_to_client(&self, n: usize) {
        self.bytes_to_client.inc_by(n as u64);
    }

    /// Bytes relayed from the browser to the VNC server.
    pub fn bytes_to_server(&self, n: usize) {
        self.bytes_to_server.inc_by(n as u64);
    }

    /// Clipboard transfers dropped in one direction.
    pub fn clipboard_dropped(&self, to_vm: u64, from_vm: u64) {
        for (direction, n) in [("to_vm", to_vm), ("from_vm", from_vm)] {
            if n > 0 {
                self.clipboard_dropped
                    .get_or_create(&DirectionLabel { direction })
                    .inc_by(n);
            }
        }
    }

    /// Input messages of a view-only session that were not forwarded.
    pub fn input_dropped(&self, n: u64) {
        self.input_dropped.inc_by(n);
    }

    /// A recording finished: `complete`, `incomplete` or `failed`.
    pub fn recording_finished(&self, outcome: &'static str) {
        self.recordings
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn token_minted(&self) {
        self.tokens_minted.inc();
    }

    /// Live sessions the inventory could not re-check (it was unreachable);
    /// they went on.
    pub fn recheck_failed(&self, sessions: u64) {
        self.recheck_failures.inc_by(sessions);
    }

    /// The store accepted a token for a session (proxy or websockify lookup).
    pub fn token_redeemed(&self) {
        self.tokens_redeemed.inc();
    }

    /// The proxy turned a connection away.
    pub fn refused(&self, why: Refused) {
        let family = if why.is_token_refusal() {
            &self.tokens_refused
        } else {
            &self.sessions_failed
        };
        family
            .get_or_create(&ReasonLabel {
                reason: why.label(),
            })
            .inc();
    }

    /// An API request finished. `method` is an XML-RPC method label or a
    /// route such as `POST /api/v1/sessions`.
    pub fn api_request(&self, method: &str, status: u16, elapsed: Duration) {
        self.api_requests
            .get_or_create(&MethodStatusLabels {
                method: method.to_owned(),
                status,
            })
            .inc();
        self.api_duration
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// An XML-RPC call answered: `method` and `code` are the API's labels
    /// for the method and for the OpenNebula result or fault code.
    pub fn xmlrpc_result(&self, method: &'static str, code: &'static str) {
        self.xmlrpc_results
            .get_or_create(&XmlRpcLabels { method, code })
            .inc();
    }

    /// A store call `op` took `elapsed`, and failed with an error of kind
    /// `error` if it did.
    pub fn store_call(&self, op: &'static str, elapsed: Duration, error: Option<&'static str>) {
        self.store_duration
            .get_or_create(&OpLabel { op })
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = error {
            self.store_errors
                .get_or_create(&OpKindLabels { op, kind })
                .inc();
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self, gauges: Gauges) -> String {
        self.sessions_active
            .set(i64::try_from(gauges.sessions_active).unwrap_or(i64::MAX));
        self.draining.set(i64::from(gauges.draining));
        let mut open = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut open, &self.registry);
        let mut text = text_format(&open);
        for h in &self.headers {
            if !open.contains(&format!("# TYPE {} ", h.family)) {
                text.push_str(&h.lines);
            }
        }
        text
    }
}

/// The Prometheus text format of an OpenMetrics text: a counter family is
/// announced under its sample name (`x_total`), bucket bounds are written
/// as shortest decimals (`le="10"`, not `"10.0"`), and the OpenMetrics-only
/// lines (`# EOF`, `# UNIT`) go.
fn text_format(open: &str) -> String {
    let counters: HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + 64 * counters.len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match header {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => push_sample(&mut out, line),
        }
        out.push('\n');
    }
    out
}

/// A sample line; a histogram bucket's `le` bound, which the encoder puts
/// first, goes last and in its shortest form (`{method="x",le="10"}`).
fn push_sample(out: &mut String, line: &str) {
    const LE: &str = "{le=\"";
    let bucket = line.find(LE).and_then(|i| {
        let from = i + LE.len();
        let len = line[from..].find('"')?;
        let close = line.rfind('}')?;
        (close > from + len).then_some((i, &line[from..from + len], from + len + 1, close))
    });
    let Some((open, bound, after, close)) = bucket else {
        out.push_str(line);
        return;
    };
    out.push_str(&line[..=open]);
    // What follows the bound: `,other="labels"` or nothing.
    if let Some(others) = line[after..close].strip_prefix(',') {
        out.push_str(others);
        out.push(',');
    }
    out.push_str("le=\"");
    match bound.parse::<f64>() {
        Ok(v) if v.is_finite() => out.push_str(&v.to_string()),
        _ => out.push_str(bound),
    }
    out.push('"');
    out.push_str(&line[close..]);
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
        m.session_ended(SessionOutcome::ClientClosed, Duration::from_secs(5));
        m.session_ended(SessionOutcome::Shutdown, Duration::from_secs(50));
        m.api_request(
            "POST /api/v1/vms/{id}/console-tokens",
            201,
            Duration::from_millis(3),
        );
        m.api_request("other", 200, Duration::from_secs(20));
        m.xmlrpc_result("one.vm.novnctoken", "0x0100");
        m.store_call("redeem", Duration::from_micros(300), None);
        m.store_call("redeem", Duration::from_millis(2), Some("unavailable"));
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
            sample(&t, "vncbroker_sessions_total{outcome=\"idle\"}"),
            Some(0.0),
            "every outcome starts at zero"
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
                "vncbroker_store_duration_seconds_bucket{op=\"redeem\",le=\"0.0001\"}"
            ),
            Some(0.0),
            "small bounds are written as decimals"
        );
        assert_eq!(
            sample(
                &t,
                "vncbroker_store_errors_total{op=\"redeem\",kind=\"unavailable\"}"
            ),
            Some(1.0)
        );
        assert!(!t.contains("# EOF"), "{t}");

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
    fn every_family_is_announced_before_its_first_series() {
        let t = Metrics::new().render(Gauges::default());
        for family in [
            "vncbroker_api_requests_total counter",
            "vncbroker_api_request_duration_seconds histogram",
            "vncbroker_xmlrpc_results_total counter",
            "vncbroker_store_duration_seconds histogram",
            "vncbroker_store_errors_total counter",
        ] {
            assert_eq!(t.matches(&format!("# TYPE {family}\n")).count(), 1, "{t}");
        }
        let m = Metrics::new();
        m.store_call("ping", Duration::from_millis(1), Some("internal"));
        let t = m.render(Gauges::default());
        assert_eq!(
            t.matches("# TYPE vncbroker_store_errors_total counter\n")
                .count(),
            1,
            "announced once when it has series: {t}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.api_request("a\"b\\c\nd", 200, Duration::from_millis(1));
        let t = m.render(Gauges::default());
        assert!(
            t.contains("vncbroker_api_requests_total{method=\"a\\\"b\\\\c\\nd\",status=\"200\"} 1"),
            "{t}"
        );
    }
}
