//! Configuration: a TOML file, then `VNCBROKER_*` environment variables,
//! then command-line flags, each overriding the one before.
//!
//! Every key is documented in `vncbroker.example.toml` at the repository root.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::token::Policy;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP listener binds (API, and later the proxy).
    pub listen: String,
    /// Base URL that clients reach this node at; console URLs are built from
    /// it. Defaults to `http://<bound address>`.
    pub public_url: Option<String>,
    /// `sqlite://PATH`, or PostgreSQL's libpq connection string (a
    /// `postgres://` URL or `keyword=value` pairs). Shown only through
    /// [`Config::database_redacted`].
    pub database: String,
    /// This node's name in session records; defaults to host name and port.
    pub node_name: Option<String>,
    /// What this node serves: the API, the proxy, or both.
    pub role: Role,
    pub tokens: TokensConfig,
    pub api: ApiConfig,
    pub proxy: ProxyConfig,
    pub http: HttpConfig,
    pub tls: TlsConfig,
    pub inventory: InventoryConfig,
    pub websockify_api: WebsockifyApiConfig,
    pub secrets: SecretsConfig,
    pub log: LogConfig,
    pub server: ServerConfig,
    pub sessions: SessionsConfig,
    pub recording: RecordingConfig,
}

/// Session recordings: what the browser received, compressed, one file per
/// recorded session.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordingConfig {
    /// Where this node writes recordings (mode 0700, files 0600). Unset: no
    /// recording; a session that must be recorded is then handled as
    /// `required` says.
    pub dir: Option<String>,
    /// Whether sessions of VMs that do not say are recorded.
    pub default: bool,
    /// A recording that cannot be written (no directory, the disk full, the
    /// writer behind) ends its session; otherwise the recording is marked
    /// incomplete and the session goes on.
    pub required: bool,
    /// Recordings older than this are deleted, in days (0: never).
    pub retention_days: u32,
    /// Whether a session's own user may download and replay its recording
    /// (admins always may).
    pub owner_can_view: bool,
    /// Most bytes of one session waiting to be written; beyond that the
    /// writer is behind.
    pub queue_bytes: usize,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            dir: None,
            default: false,
            required: false,
            retention_days: 30,
            owner_can_view: false,
            queue_bytes: 8 << 20,
        }
    }
}

/// Where the key that seals stored VNC passwords lives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// A file holding 32 random bytes in base64. Unset: `vncbroker.key`
    /// beside an SQLite database, created on first start. Nodes sharing a
    /// PostgreSQL database must all name the same key file.
    pub key_file: Option<String>,
}

/// Process lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// On SIGTERM, how long live sessions may go on before they are closed
    /// (1001), in seconds.
    pub drain_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            drain_timeout_secs: 30,
        }
    }
}

/// The recorded sessions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Session records that ended longer ago than this are deleted, in days
    /// (0: keep them forever).
    pub retention_days: u32,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig { retention_days: 90 }
    }
}

/// The websockify JSONTokenApi-compatible endpoint. It reveals targets, so
/// it is off unless enabled, and then answers only callers that present
/// the secret or come from an allowed address.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebsockifyApiConfig {
    pub enabled: bool,
    /// Shared secret, given as `?secret=` in the token-source URL.
    pub secret: Option<String>,
    /// Client addresses (IPs) allowed without the secret.
    pub allow: Vec<std::net::IpAddr>,
}

impl std::fmt::Debug for WebsockifyApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebsockifyApiConfig")
            .field("enabled", &self.enabled)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("allow", &self.allow)
            .finish()
    }
}

/// Where VMs and permissions come from.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InventoryConfig {
    /// `local` (the broker's own users and VMs) or `opennebula`.
    pub kind: InventoryKind,
    /// oned's XML-RPC endpoint, e.g. `http://frontend:2633/RPC2`.
    pub endpoint: String,
    /// How long a call to oned may take, in milliseconds.
    pub timeout_ms: u64,
    /// A session string ("user:password") of an account that may read every
    /// VM; when set, the proxy re-reads the VM when a token is redeemed and
    /// refuses if its host or port changed since minting.
    pub service_session: Option<String>,
}

impl std::fmt::Debug for InventoryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InventoryConfig")
            .field("kind", &self.kind)
            .field("endpoint", &self.endpoint)
            .field("timeout_ms", &self.timeout_ms)
            .field(
                "service_session",
                &self.service_session.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InventoryKind {
    Local,
    OpenNebula,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        InventoryConfig {
            kind: InventoryKind::Local,
            endpoint: "http://127.0.0.1:2633/RPC2".into(),
            timeout_ms: 5000,
            service_session: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// How long a client has to send its request headers (and, with TLS, to
    /// finish the TLS handshake), in milliseconds.
    pub header_timeout_ms: u64,
    /// How long a client has, once its headers are in, to send the whole
    /// request body, in milliseconds; later, the request gets 408.
    pub body_timeout_ms: u64,
    /// How long a request may take from its headers to the end of its
    /// answer, in milliseconds; later, it gets 503 or its connection is
    /// closed. WebSocket sessions are not requests in this sense.
    pub request_timeout_ms: u64,
    /// Reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are
    /// believed; from anyone else those headers are ignored.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Failed token redemptions and logins allowed per client address per
    /// minute; past it, requests get 429 (0x0100 over XML-RPC) after
    /// `failure_delay_ms`. 0 turns the limit off.
    pub failures_per_minute: u32,
    pub failure_delay_ms: u64,
    /// Password verifications (argon2 runs) in progress at once per client
    /// address; further ones wait for them (0: no cap).
    pub password_checks_per_address: u32,
    /// Open client connections in all (0: from the open-files limit).
    pub max_connections: usize,
    /// Open client connections (and, behind trusted proxies, requests and
    /// WebSockets in progress) per client address, an IPv4 address or an
    /// IPv6 /64 (0: no cap).
    pub max_connections_per_address: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout_ms: 5000,
            body_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            trusted_proxies: Vec::new(),
            failures_per_minute: 30,
            failure_delay_ms: 1000,
            password_checks_per_address: 2,
            max_connections: 0,
            max_connections_per_address: 256,
        }
    }
}

/// HTTPS/WSS on the listener: both files or neither.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<String>,
}

/// What a node serves on its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The APIs, the proxy and the console page.
    All,
    /// The XML-RPC and JSON APIs only.
    Api,
    /// The proxy and the console page only.
    Proxy,
}

impl Role {
    pub fn serves_api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }

    pub fn serves_proxy(self) -> bool {
        matches!(self, Role::All | Role::Proxy)
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "all" => Ok(Role::All),
            "api" => Ok(Role::Api),
            "proxy" => Ok(Role::Proxy),
            other => Err(format!("unknown role {other:?}: use all, api or proxy")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// How long connecting to a VNC server may take, in milliseconds.
    pub connect_timeout_ms: u64,
    /// How long the RFB security handshake may take, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Largest WebSocket message (and frame) accepted from a browser.
    pub max_message_bytes: usize,
    /// How often the store is checked for revoked tokens of live sessions,
    /// in milliseconds.
    pub revocation_check_ms: u64,
    /// Directory with a console page (console.html and its /static/ files)
    /// to serve instead of the one built into the binary.
    pub web_root: Option<String>,
    /// Web origins (besides the public URL's) whose pages may open consoles,
    /// e.g. a customer portal embedding the console page.
    pub allowed_origins: Vec<String>,
    /// Whether a WebSocket request without an Origin header (a non-browser
    /// client) may connect.
    pub allow_missing_origin: bool,
    /// Concurrent sessions allowed on this node in all, per VM and per user
    /// (0: no limit).
    pub max_sessions: usize,
    pub max_sessions_per_vm: usize,
    pub max_sessions_per_user: usize,
    /// A session with no bytes either way for this long is closed (0: never).
    pub idle_timeout_secs: u64,
    /// A session is closed after this long (0: never).
    pub max_session_secs: u64,
    /// Close a session when its token expires, like Nova's
    /// enforce_session_timeout; otherwise a token only has to be valid when
    /// the session starts.
    pub end_at_token_expiry: bool,
    /// How often the proxy pings the browser, in seconds (0: never).
    pub ping_interval_secs: u64,
    /// How often every live session is re-checked with the inventory (its
    /// VM still exists, runs and is where the token points; its user may
    /// still open it), in seconds (0: never).
    pub recheck_interval_secs: u64,
    /// A browser that has not answered a ping for this long is dropped.
    pub pong_timeout_secs: u64,
    /// A browser that has not taken a write (one WebSocket frame) within
    /// this long has stopped reading and is dropped, in seconds (0: never).
    pub client_write_timeout_secs: u64,
    /// Directory of a noVNC (the @novnc/novnc npm package) to serve under
    /// /novnc/ instead of the one built into the binary.
    pub novnc_root: Option<String>,
    /// Which way clipboard text may go for VMs that do not say: both,
    /// to-vm, from-vm or none.
    pub clipboard: crate::policy::Clipboard,
    /// Longest clipboard text passed either way, in bytes; a longer one is
    /// dropped (and counted), the session goes on.
    pub max_clipboard_bytes: u32,
    /// How long after its connection drops a single-use token's console
    /// may come back with its reconnect ticket, in seconds (0: no tickets).
    pub reconnect_grace_secs: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout_ms: 5000,
            handshake_timeout_ms: 10_000,
            max_message_bytes: 4 << 20,
            revocation_check_ms: 1000,
            web_root: None,
            allowed_origins: Vec::new(),
            allow_missing_origin: true,
            max_sessions: 0,
            max_sessions_per_vm: 0,
            max_sessions_per_user: 0,
            idle_timeout_secs: 0,
            max_session_secs: 0,
            end_at_token_expiry: false,
            ping_interval_secs: 30,
            recheck_interval_secs: 60,
            pong_timeout_secs: 90,
            client_write_timeout_secs: 30,
            novnc_root: None,
            clipboard: crate::policy::Clipboard::Both,
            max_clipboard_bytes: 1 << 20,
            reconnect_grace_secs: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokensConfig {
    /// Lifetime of a token whose request names none, in seconds.
    pub default_ttl: i64,
    /// Longest lifetime a request may ask for, in seconds.
    pub max_ttl: i64,
    /// Whether tokens are single-use unless the request says otherwise.
    pub single_use: bool,
    /// How often expired tokens are deleted, in seconds.
    pub purge_interval: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a successful password check is remembered, in seconds
    /// (0 turns the cache off).
    pub auth_cache_ttl: u64,
    /// How many successful password checks are remembered at most.
    pub auth_cache_size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `vncbroker=debug`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8640".into(),
            public_url: None,
            database: "sqlite://vncbroker.db".into(),
            node_name: None,
            role: Role::All,
            tokens: TokensConfig::default(),
            api: ApiConfig::default(),
            proxy: ProxyConfig::default(),
            http: HttpConfig::default(),
            tls: TlsConfig::default(),
            inventory: InventoryConfig::default(),
            websockify_api: WebsockifyApiConfig::default(),
            secrets: SecretsConfig::default(),
            log: LogConfig::default(),
            server: ServerConfig::default(),
            sessions: SessionsConfig::default(),
            recording: RecordingConfig::default(),
        }
    }
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            default_ttl: 600,
            max_ttl: 3600,
            single_use: false,
            purge_interval: 60,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_body_bytes: 1 << 20,
            auth_cache_ttl: 60,
            auth_cache_size: 10_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a config file; a missing `path` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown,
            message: e.to_string(),
        })
    }

    /// Applies `VNCBROKER_*` overrides, read through `var` so tests need not
    /// touch the process environment.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parsed<T: std::str::FromStr>(name: &str, v: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                name: name.into(),
                message: e.to_string(),
            })
        }
        if let Some(v) = var("VNCBROKER_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = var("VNCBROKER_PUBLIC_URL") {
            self.public_url = Some(v);
        }
        if let Some(v) = var("VNCBROKER_DATABASE") {
            self.database = v;
        }
        if let Some(v) = var("VNCBROKER_NODE_NAME") {
            self.node_name = Some(v);
        }
        if let Some(v) = var("VNCBROKER_ROLE") {
            self.role = parsed("VNCBROKER_ROLE", v)?;
        }
        if let Some(v) = var("VNCBROKER_WEB_ROOT") {
            self.proxy.web_root = Some(v);
        }
        if let Some(v) = var("VNCBROKER_DEFAULT_TTL") {
            self.tokens.default_ttl = parsed("VNCBROKER_DEFAULT_TTL", v)?;
        }
        if let Some(v) = var("VNCBROKER_MAX_TTL") {
            self.tokens.max_ttl = parsed("VNCBROKER_MAX_TTL", v)?;
        }
        if let Some(v) = var("VNCBROKER_SINGLE_USE") {
            self.tokens.single_use = parsed("VNCBROKER_SINGLE_USE", v)?;
        }
        if let Some(v) = var("VNCBROKER_TLS_CERT") {
            self.tls.cert = Some(v);
        }
        if let Some(v) = var("VNCBROKER_TLS_KEY") {
            self.tls.key = Some(v);
        }
        if let Some(v) = var("VNCBROKER_ONED_ENDPOINT") {
            self.inventory.endpoint = v;
        }
        if let Some(v) = var("VNCBROKER_ONED_SERVICE_SESSION") {
            self.inventory.service_session = Some(v);
        }
        if let Some(v) = var("VNCBROKER_KEY_FILE") {
            self.secrets.key_file = Some(v);
        }
        if let Some(v) = var("VNCBROKER_LOG_FORMAT") {
            self.log.format = v;
        }
        if let Some(v) = var("VNCBROKER_LOG_LEVEL") {
            self.log.level = v;
        }
        Ok(())
    }

    /// Checks values that parse but make no sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.tokens;
        if t.default_ttl <= 0 || t.max_ttl <= 0 {
            return Err(ConfigError::Invalid(
                "tokens.default_ttl and tokens.max_ttl must be positive".into(),
            ));
        }
        if t.default_ttl > t.max_ttl {
            return Err(ConfigError::Invalid(format!(
                "tokens.default_ttl ({}) exceeds tokens.max_ttl ({})",
                t.default_ttl, t.max_ttl
            )));
        }
        if t.purge_interval == 0 {
            return Err(ConfigError::Invalid(
                "tokens.purge_interval must be at least 1".into(),
            ));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "api.max_body_bytes must be at least 1024".into(),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key must be set together".into(),
            ));
        }
        let w = &self.websockify_api;
        if w.enabled && w.secret.as_deref().is_none_or(str::is_empty) && w.allow.is_empty() {
            return Err(ConfigError::Invalid(
                "websockify_api.enabled needs a secret or an allow list".into(),
            ));
        }
        if w.secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::Invalid(
                "websockify_api.secret must be at least 16 characters".into(),
            ));
        }
        if self.inventory.timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "inventory.timeout_ms must be positive".into(),
            ));
        }
        let h = &self.http;
        if h.header_timeout_ms == 0 || h.body_timeout_ms == 0 || h.request_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "http.header_timeout_ms, body_timeout_ms and request_timeout_ms must be positive"
                    .into(),
            ));
        }
        let p = &self.proxy;
        if p.connect_timeout_ms == 0 || p.handshake_timeout_ms == 0 || p.revocation_check_ms == 0 {
            return Err(ConfigError::Invalid(
                "proxy timeouts and revocation_check_ms must be positive".into(),
            ));
        }
        for o in &p.allowed_origins {
            if crate::edge::Origin::parse(o).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "proxy.allowed_origins: {o:?} is not an origin like https://portal.example.com"
                )));
            }
        }
        if p.ping_interval_secs > 0 && p.pong_timeout_secs <= p.ping_interval_secs {
            return Err(ConfigError::Invalid(
                "proxy.pong_timeout_secs must exceed proxy.ping_interval_secs".into(),
            ));
        }
        if self.recording.queue_bytes < 64 * 1024 {
            return Err(ConfigError::Invalid(
                "recording.queue_bytes must be at least 65536".into(),
            ));
        }
        if p.max_message_bytes < 4096 {
            return Err(ConfigError::Invalid(
                "proxy.max_message_bytes must be at least 4096".into(),
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid(format!(
                "log.format must be \"text\" or \"json\", not {:?}",
                self.log.format
            )));
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "public_url must start with http:// or https://, not {url:?}"
            )));
        }
        Ok(())
    }

    /// What sessions of VMs without their own settings follow.
    pub fn session_defaults(&self) -> crate::policy::Defaults {
        crate::policy::Defaults {
            clipboard: self.proxy.clipboard,
            record: self.recording.default,
        }
    }

    pub fn policy(&self) -> Policy {
        Policy {
            default_ttl: self.tokens.default_ttl,
            max_ttl: self.tokens.max_ttl,
            single_use: self.tokens.single_use,
        }
    }

    /// The `database` setting for logs: rebuilt from its parsed settings,
    /// without the password (see [`crate::store::redact_database_url`]).
    pub fn database_redacted(&self) -> String {
        crate::store::redact_database_url(&self.database)
    }

    pub fn auth_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.api.auth_cache_ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_example_file_parses_and_matches_the_defaults() {
        let text = include_str!("../vncbroker.example.toml");
        let cfg: Config = toml::from_str(text).unwrap();
        let mut expected = Config {
            public_url: cfg.public_url.clone(),
            node_name: cfg.node_name.clone(),
            ..Config::default()
        };
        expected.proxy.web_root = cfg.proxy.web_root.clone();
        expected.proxy.novnc_root = cfg.proxy.novnc_root.clone();
        assert_eq!(cfg, expected);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<Config>("listn = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
        assert!(toml::from_str::<Config>("[tokens]\ndefault_ttl = \"long\"").is_err());
    }

    #[test]
    fn env_overrides_and_bad_env_values() {
        let env: HashMap<&str, &str> = [
            ("VNCBROKER_LISTEN", "0.0.0.0:1"),
            ("VNCBROKER_DEFAULT_TTL", "30"),
            ("VNCBROKER_SINGLE_USE", "true"),
        ]
        .into();
        let mut cfg = Config::default();
        cfg.apply_env(|k| env.get(k).map(|v| v.to_string()))
            .unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:1");
        assert_eq!(cfg.tokens.default_ttl, 30);
        assert!(cfg.tokens.single_use);
        let err = cfg
            .apply_env(|k| (k == "VNCBROKER_MAX_TTL").then(|| "ten".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("VNCBROKER_MAX_TTL"));
    }

    #[test]
    fn the_database_password_is_never_shown() {
        for (url, shown) in [
            (
                "postgres://u:secret@db:5432/x?sslmode=require",
                "postgres://u:***@db:5432/x?sslmode=require",
            ),
            (
                "postgres://u@db/x?password=se/cret&sslmode=require",
                "postgres://u:***@db:5432/x?sslmode=require",
            ),
            (
                "postgres://u:se/c@ret@db/x?sslmode=require",
                "postgres://u:***@db:5432/x?sslmode=require",
            ),
            (
                "host=db user=u password='se cret' dbname=x sslmode=require",
                "postgres://u:***@db:5432/x?sslmode=require",
            ),
            ("sqlite:///a/b.db", "sqlite:///a/b.db"),
            (
                "postgres://u:secret@db:nope/x",
                "<unusable PostgreSQL connection string>",
            ),
            ("u:secret@db/x", "<unsupported database setting>"),
        ] {
            let cfg = Config {
                database: url.into(),
                ..Config::default()
            };
            assert_eq!(cfg.database_redacted(), shown, "{url}");
        }
    }

    #[test]
    fn validation() {
        let mut cfg = Config::default();
        cfg.tokens.default_ttl = 7200;
        assert!(cfg.validate().is_err());
        let mut cfg = Config::default();
        cfg.log.format = "xml".into();
        assert!(cfg.validate().is_err());
        let cfg = Config {
            public_url: Some("ftp://x".into()),
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = Config::load(Some(Path::new("/nonexistent/vncbroker.toml")));
        assert!(matches!(cfg, Err(ConfigError::Read { .. })));
    }
}
