//! PostgreSQL connection strings as libpq takes them: a `postgres://` URL
//! (several `host:port` pairs allowed) or `keyword=value` pairs.
//!
//! The string is parsed once, here, into the client's settings and the TLS
//! policy. Nothing of the original text is ever shown: logs get
//! [`ConnInfo::redacted`], rebuilt from the parsed settings without the
//! password, and parse errors name parameters, never values.
//!
//! TLS: `sslmode` takes libpq's values. `prefer` is taken as `require` (it
//! never falls back to plaintext) and `allow` is refused. Without an
//! `sslmode`, a database on this machine (Unix sockets, `localhost`,
//! loopback addresses) is reached in plaintext and any other with
//! `verify-full`. `sslrootcert` names the CA file (`system`: the system's
//! trusted CAs); with it, `require` checks the certificate chain as libpq's
//! `verify-ca` does.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use tokio_postgres::config::{Host, TargetSessionAttrs};

/// How the connection is protected, after the defaults are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext.
    Disable,
    /// TLS; the certificate is checked only if a CA is given (as `verify-ca`).
    Require,
    /// TLS; the certificate chain must lead to the CA.
    VerifyCa,
    /// TLS; the chain must lead to the CA and the certificate name the host.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The CAs a server certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The operating system's trusted CAs (`sslrootcert=system`).
    System,
}

/// A parsed connection string.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's settings; its own `sslmode` is `disable` or `require`.
    pub config: tokio_postgres::Config,
    /// The same settings once per listed host, with that host alone, in the
    /// order given: connecting tries them in turn, each with its deadline,
    /// so a host that accepts connections but never answers is passed over.
    pub hosts: Vec<tokio_postgres::Config>,
    pub ssl_mode: SslMode,
    /// Whether `sslmode` was given, rather than chosen by the host rule.
    pub ssl_mode_given: bool,
    pub root_certs: Option<RootCerts>,
}

/// Why a connection string is unusable. The messages never quote the
/// string: only parameter names, positions and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Tls(String),
}

/// Parameters passed through to the client as they are.
const CLIENT_PARAMS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "host",
    "hostaddr",
    "port",
    "options",
    "application_name",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
    "sslnegotiation",
];

/// libpq parameters this client does not implement; named in the error.
const UNSUPPORTED_PARAMS: &[&str] = &[
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcompression",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslcertmode",
    "requiressl",
    "requirepeer",
    "require_auth",
    "gssencmode",
    "gsslib",
    "gssdelegation",
    "krbsrvname",
    "passfile",
    "service",
    "client_encoding",
    "fallback_application_name",
    "replication",
];

/// Whether `s` looks like a PostgreSQL connection string: a `postgres://`
/// or `postgresql://` URL, or libpq `keyword=value` pairs.
pub fn is_conninfo(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://") || {
        let first = s.trim_start().split(['=', ' ', '\t', '\n']).next();
        !s.contains("://")
            && s.contains('=')
            && first.is_some_and(|k| CLIENT_PARAMS.contains(&k) || k.starts_with("ssl"))
    }
}

impl FromStr for ConnInfo {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<ConnInfo, ConnInfoError> {
        if let Some(rest) = s
            .strip_prefix("postgres://")
            .or_else(|| s.strip_prefix("postgresql://"))
        {
            // A stray ? or & in a password splits the URL in the wrong place.
            let hint = |e: ConnInfoError| match e {
                ConnInfoError::Syntax(m) => ConnInfoError::Syntax(format!(
                    "{m} (in a URL, write ? & # in a password as %3F %26 %23)"
                )),
                other => other,
            };
            url_params(rest).and_then(build).map_err(hint)
        } else {
            keyword_params(s).and_then(build)
        }
    }
}

impl ConnInfo {
    /// The string for logs: a URL rebuilt from the parsed settings, with
    /// `***` where a password is set.
    pub fn redacted(&self) -> String {
        let c = &self.config;
        let mut out = String::from("postgres://");
        if let Some(user) = c.get_user() {
            out.push_str(&encode(user));
            if c.get_password().is_some() {
                out.push_str(":***");
            }
            out.push('@');
        } else if c.get_password().is_some() {
            out.push_str(":***@");
        }
        let ports = c.get_ports();
        let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let mut sockets = Vec::new();
        let mut tcp = Vec::new();
        for (i, h) in c.get_hosts().iter().enumerate() {
            match h {
                Host::Tcp(name) if name.contains(':') => tcp.push(format!("[{name}]:{}", port(i))),
                Host::Tcp(name) => tcp.push(format!("{}:{}", encode(name), port(i))),
                Host::Unix(path) => sockets.push(path.display().to_string()),
            }
        }
        out.push_str(&tcp.join(","));
        out.push('/');
        if let Some(db) = c.get_dbname() {
            out.push_str(&encode(db));
        }
        let mut query = Vec::new();
        if !sockets.is_empty() {
            query.push(format!("host={}", sockets.join(",")));
        }
        let addrs = c.get_hostaddrs();
        if !addrs.is_empty() {
            let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
            query.push(format!("hostaddr={}", list.join(",")));
        }
        query.push(format!("sslmode={}", self.ssl_mode.as_str()));
        match &self.root_certs {
            Some(RootCerts::File(p)) => query.push(format!("sslrootcert={}", p.display())),
            Some(RootCerts::System) => query.push("sslrootcert=system".into()),
            None => {}
        }
        match c.get_target_session_attrs() {
            TargetSessionAttrs::ReadWrite => query.push("target_session_attrs=read-write".into()),
            TargetSessionAttrs::ReadOnly => query.push("target_session_attrs=read-only".into()),
            _ => {}
        }
        out.push('?');
        out.push_str(&query.join("&"));
        out
    }

    /// Whether every host is a Unix socket.
    pub fn only_unix_sockets(&self) -> bool {
        !self.config.get_hosts().is_empty()
            && self.config.get_hostaddrs().is_empty()
            && self
                .config
                .get_hosts()
                .iter()
                .all(|h| matches!(h, Host::Unix(_)))
    }

    /// How many hosts the client may try, in order.
    pub fn host_count(&self) -> usize {
        self.config
            .get_hosts()
            .len()
            .max(self.config.get_hostaddrs().len())
    }
}

/// Shows a connection string for logs and errors: the redacted form when
/// it parses, and only that it does not otherwise.
pub fn redact(s: &str) -> String {
    match s.parse::<ConnInfo>() {
        Ok(info) => info.redacted(),
        Err(_) => "<unusable PostgreSQL connection string>".into(),
    }
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URL_RESERVED).to_string()
}

const URL_RESERVED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'%')
    .add(b'@')
    .add(b':')
    .add(b'/')
    .add(b'?')
    .add(b'&')
    .add(b'=')
    .add(b',')
    .add(b'#')
    .add(b'[')
    .add(b']');

fn decode(s: &str, what: &str) -> Result<String, ConnInfoError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ConnInfoError::Syntax(format!("{what} is not UTF-8 once percent-decoded")))
}

/// The parameters of `postgresql://[user[:password]@][host[:port][,...]][/dbname][?k=v&...]`
/// (`rest` is what follows the scheme). The user part ends at the last `@`
/// before the query, so a password may hold `/` and `@`; a `?` or `&` in one
/// must be written `%3F` or `%26`.
fn url_params(rest: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut params = Vec::new();
    let before_query = rest.split('?').next().unwrap_or("");
    let rest = match before_query.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                params.push(("user".to_owned(), decode(user, "the user name")?));
            }
            if let Some(p) = password {
                params.push(("password".to_owned(), decode(p, "the password")?));
            }
            &rest[at + 1..]
        }
        None => rest,
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (hostspec, rest) = rest.split_at(end);
    let (mut hosts, mut ports) = (Vec::new(), Vec::new());
    for (i, chunk) in hostspec.split(',').enumerate() {
        if chunk.is_empty() && hostspec.is_empty() {
            break;
        }
        let bad = || {
            ConnInfoError::Syntax(format!(
                "host {} of the URL is not host, host:port or [ipv6]:port",
                i + 1
            ))
        };
        let (host, port) = if let Some(v6) = chunk.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (addr, None),
                p => (addr, Some(p.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match chunk.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (chunk, None),
            }
        };
        if host.is_empty() && hostspec.contains(',') {
            return Err(bad());
        }
        if !host.is_empty() {
            hosts.push(decode(host, "a host")?);
        }
        ports.push(match port {
            Some(p) if !p.is_empty() => decode(p, "a port")?,
            _ => "5432".to_owned(),
        });
    }
    if !hosts.is_empty() {
        params.push(("host".to_owned(), hosts.join(",")));
    }
    if !hostspec.is_empty() {
        params.push(("port".to_owned(), ports.join(",")));
    }
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if let Some(db) = path.strip_prefix('/')
        && !db.is_empty()
    {
        params.push(("dbname".to_owned(), decode(db, "the database name")?));
    }
    for (i, pair) in query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ConnInfoError::Syntax(format!(
                "query parameter {} of the URL has no '=' (write & and = inside values as %26 and %3D)",
                i + 1
            ))
        })?;
        let key = decode(k, "a parameter name")?;
        check_known(&key, i + 1)?;
        let value = decode(v, &format!("parameter {key}"))?;
        params.push((key, value));
    }
    Ok(params)
}

/// The parameters of `keyword=value` pairs, separated by white space;
/// values may be single-quoted, with `\'` and `\\` inside.
fn keyword_params(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut params = Vec::new();
    let mut chars = s.chars().peekable();
    let mut n = 0;
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        n += 1;
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConnInfoError::Syntax(format!(
                "parameter {n} of the connection string is not keyword=value \
                 (quote values with spaces: password='a b')"
            )));
        }
        check_known(&key, n)?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(ConnInfoError::Syntax(format!(
                            "the quoted value of {key} is not closed"
                        )));
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        params.push((key, value));
    }
    Ok(params)
}

/// Refuses parameters the client would not honour. Unknown names are not
/// quoted: a typo in the string could as well be part of a password.
fn check_known(key: &str, n: usize) -> Result<(), ConnInfoError> {
    if CLIENT_PARAMS.contains(&key) || key == "sslmode" || key == "sslrootcert" {
        Ok(())
    } else if UNSUPPORTED_PARAMS.contains(&key) {
        Err(ConnInfoError::Unsupported(format!(
            "the connection parameter {key} is not supported by vncbroker"
        )))
    } else {
        Err(ConnInfoError::Unsupported(format!(
            "parameter {n} of the connection string is not a known connection parameter"
        )))
    }
}

fn build(params: Vec<(String, String)>) -> Result<ConnInfo, ConnInfoError> {
    // Later values win, as in libpq.
    let mut merged: Vec<(String, String)> = Vec::new();
    for (k, v) in params {
        merged.retain(|(key, _)| *key != k);
        merged.push((k, v));
    }
    let get = |k: &str| {
        merged
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let given_mode = get("sslmode").map(str::to_owned);
    let root_certs = match get("sslrootcert") {
        None | Some("") => None,
        Some("system") => Some(RootCerts::System),
        Some(path) => Some(RootCerts::File(PathBuf::from(path))),
    };
    let explicit_attrs = get("target_session_attrs").is_some();
    let client: Vec<(String, String)> = merged
        .iter()
        .filter(|(k, _)| k != "sslmode" && k != "sslrootcert")
        .cloned()
        .collect();
    let mut config = client_config(&client)?;
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err(ConnInfoError::Syntax(
            "no host: give one in the URL (postgres://USER@HOST/DB) or as \
             host=/var/run/postgresql for the Unix socket"
                .into(),
        ));
    }
    let n = config.get_hosts().len().max(config.get_hostaddrs().len());
    if n > 1 && !explicit_attrs {
        // A list of servers is a primary and its standbys: the broker writes.
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    let ssl_mode = ssl_mode(given_mode.as_deref(), all_local(&config))?;
    let given = given_mode.is_some();
    let mut info = ConnInfo {
        config,
        hosts: Vec::new(),
        ssl_mode,
        ssl_mode_given: given,
        root_certs,
    };
    let client_mode = client_ssl_mode(&info)?;
    info.config.ssl_mode(client_mode);
    info.hosts = if n > 1 {
        (0..n)
            .map(|i| {
                let mut one = client_config(&one_host(&client, i))?;
                one.ssl_mode(client_mode);
                one.target_session_attrs(info.config.get_target_session_attrs());
                Ok(one)
            })
            .collect::<Result<_, ConnInfoError>>()?
    } else {
        vec![info.config.clone()]
    };
    Ok(info)
}

/// The client's settings from keyword=value pairs, quoted here.
fn client_config(pairs: &[(String, String)]) -> Result<tokio_postgres::Config, ConnInfoError> {
    let mut text = String::new();
    for (k, v) in pairs {
        let quoted = v.replace('\\', "\\\\").replace('\'', "\\'");
        text.push_str(&format!("{k}='{quoted}' "));
    }
    tokio_postgres::Config::from_str(&text).map_err(|e| {
        // The client's parse errors name the parameter, not its value.
        ConnInfoError::Syntax(
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string()),
        )
    })
}

/// `pairs` with only the `i`th of the listed hosts, addresses and ports (a
/// single port applies to every host).
fn one_host(pairs: &[(String, String)], i: usize) -> Vec<(String, String)> {
    pairs
        .iter()
        .filter_map(|(k, v)| match k.as_str() {
            "host" | "hostaddr" | "port" => {
                let items: Vec<&str> = v.split(',').collect();
                let item = if k == "port" && items.len() == 1 {
                    items.first()
                } else {
                    items.get(i)
                };
                item.map(|item| (k.clone(), (*item).to_owned()))
            }
            _ => Some((k.clone(), v.clone())),
        })
        .collect()
}

/// The protection asked for, or the default for where the database is.
fn ssl_mode(given: Option<&str>, local: bool) -> Result<SslMode, ConnInfoError> {
    Ok(match given {
        None if local => SslMode::Disable,
        None => SslMode::VerifyFull,
        Some("disable") => SslMode::Disable,
        Some("prefer" | "require") => SslMode::Require,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some("allow") => {
            return Err(ConnInfoError::Tls(
                "sslmode=allow may connect in plaintext: use sslmode=verify-full (or require), \
                 or sslmode=disable to turn TLS off knowingly"
                    .into(),
            ));
        }
        Some(_) => {
            return Err(ConnInfoError::Tls(
                "sslmode must be disable, require (prefer means require here), verify-ca or \
                 verify-full"
                    .into(),
            ));
        }
    })
}

/// The client's own sslmode for `info`, once its TLS settings add up.
fn client_ssl_mode(info: &ConnInfo) -> Result<tokio_postgres::config::SslMode, ConnInfoError> {
    use tokio_postgres::config::SslMode as Client;
    let mode = info.ssl_mode;
    // As in libpq: TLS is not used on Unix sockets, whatever sslmode says.
    if mode == SslMode::Disable || info.only_unix_sockets() {
        return Ok(Client::Disable);
    }
    if info
        .config
        .get_hosts()
        .iter()
        .any(|h| matches!(h, Host::Unix(_)))
    {
        return Err(ConnInfoError::Tls(format!(
            "sslmode={}: a Unix socket cannot be listed with TCP hosts that use TLS; \
             list either sockets or TCP hosts",
            mode.as_str()
        )));
    }
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && info.root_certs.is_none() {
        let why = if info.ssl_mode_given {
            ""
        } else {
            " (the default for a database on another host)"
        };
        return Err(ConnInfoError::Tls(format!(
            "sslmode={}{why} needs the CA that signed the server's certificate: add \
             sslrootcert=/path/to/ca.pem (or sslrootcert=system for the system's trusted CAs) \
             to the database URL; sslmode=require encrypts without checking the server, \
             sslmode=disable turns TLS off",
            mode.as_str()
        )));
    }
    if info.root_certs == Some(RootCerts::System) && mode != SslMode::VerifyFull {
        return Err(ConnInfoError::Tls(format!(
            "sslrootcert=system trusts every public CA, so it needs sslmode=verify-full \
             (not {})",
            mode.as_str()
        )));
    }
    Ok(Client::Require)
}

/// Whether every host the client may reach is on this machine.
fn all_local(config: &tokio_postgres::Config) -> bool {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let n = hosts.len().max(addrs.len());
    (0..n).all(|i| match addrs.get(i) {
        Some(addr) => addr.is_loopback(),
        None => match hosts.get(i) {
            Some(Host::Unix(_)) => true,
            Some(Host::Tcp(name)) => {
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            None => false,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ConnInfo {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} does not parse: {e}"))
    }

    fn err(s: &str) -> ConnInfoError {
        match s.parse::<ConnInfo>() {
            Ok(info) => panic!("{s:?} parsed: {}", info.redacted()),
            Err(e) => e,
        }
    }

    #[test]
    fn passwords_in_every_form_are_parsed_and_never_shown() {
        let secret = "s3cr/t@pa:ss";
        let cases = [
            "postgres://broker:s3cr%2Ft%40pa%3Ass@db.example:5432/vnc?sslmode=require".to_owned(),
            // Unencoded / and @ and : in the password.
            format!("postgres://broker:{secret}@db.example/vnc?sslmode=require"),
            format!(
                "postgresql://broker@db.example/vnc?password={}&sslmode=require",
                "s3cr%2Ft%40pa%3Ass"
            ),
            format!("postgres://broker@db.example/vnc?sslmode=require&password={secret}"),
            format!("host=db.example user=broker password='{secret}' dbname=vnc sslmode=require"),
            format!("host=db.example user=broker password={secret} dbname=vnc sslmode=require"),
            "host=db.example user=broker password='s3cr/t@pa:ss' dbname=vnc sslmode=require"
                .to_owned(),
        ];
        for case in &cases {
            let info = parse(case);
            assert_eq!(
                info.config.get_password(),
                Some(secret.as_bytes()),
                "{case}"
            );
            assert_eq!(info.config.get_user(), Some("broker"));
            assert_eq!(info.config.get_dbname(), Some("vnc"));
            let shown = info.redacted();
            assert_eq!(
                shown, "postgres://broker:***@db.example:5432/vnc?sslmode=require",
                "{case}"
            );
            for part in ["s3cr", "pa:ss", "%2F", "t@pa"] {
                assert!(!redact(case).contains(part), "{case} -> {shown}");
            }
        }
        // Quotes and backslashes in a keyword value.
        let info = parse(r"host=localhost password='it\'s \\ here' user=u");
        assert_eq!(info.config.get_password(), Some(&br"it's \ here"[..]));
    }

    #[test]
    fn unusable_strings_show_nothing_of_themselves() {
        for bad in [
            "postgres://u:hunter2@db.example:notaport/x",
            "postgres://u@db/x?password=hunter2&hunter3",
            "postgres://u@db/x?pasword=hunter2",
            "host=db password=hunter2 extra",
            "host=db password='hunter2",
            "host=db hunter2=x",
            "postgres://u@db/x?sslmode=sometimes&password=hunter2",
        ] {
            let e = err(bad);
            assert!(!e.to_string().contains("hunter"), "{bad}: {e}");
            assert!(!redact(bad).contains("hunter"), "{bad}");
        }
        assert!(
            err("postgres://u@db/x?sslcert=/c.pem")
                .to_string()
                .contains("sslcert")
        );
        let e = err("postgres://u:hunter?2@db/x").to_string();
        assert!(e.contains("%3F") && !e.contains("hunter"), "{e}");
    }

    #[test]
    fn hosts_ports_and_sockets() {
        let info = parse("postgres://u@h1:5432,h2:5433,[::1]:5434/db?sslmode=disable");
        assert_eq!(
            info.config.get_hosts(),
            &[
                Host::Tcp("h1".into()),
                Host::Tcp("h2".into()),
                Host::Tcp("::1".into())
            ]
        );
        assert_eq!(info.config.get_ports(), &[5432, 5433, 5434]);
        // A list of servers means "the writable one" unless said otherwise.
        assert_eq!(
            info.config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            info.redacted(),
            "postgres://u@h1:5432,h2:5433,[::1]:5434/db?sslmode=disable&target_session_attrs=read-write"
        );
        assert_eq!(info.hosts.len(), 3);
        for (i, one) in info.hosts.iter().enumerate() {
            assert_eq!(one.get_hosts(), &info.config.get_hosts()[i..=i]);
            assert_eq!(one.get_ports(), &[5432 + i as u16]);
            assert_eq!(one.get_user(), Some("u"));
            assert_eq!(
                one.get_target_session_attrs(),
                TargetSessionAttrs::ReadWrite
            );
        }
        let shared_port = parse("host=h1,h2 port=6432 hostaddr=10.0.0.1,10.0.0.2 sslmode=require");
        assert_eq!(shared_port.hosts[1].get_ports(), &[6432]);
        assert_eq!(
            shared_port.hosts[1].get_hostaddrs(),
            &["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            shared_port.hosts[1].get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        let any = parse("postgres://u@h1,h2/db?sslmode=disable&target_session_attrs=any");
        assert_eq!(
            any.config.get_target_session_attrs(),
            TargetSessionAttrs::Any
        );

        let socket = parse("postgres://u@/db?host=%2Fvar%2Frun%2Fpostgresql");
        assert!(socket.only_unix_sockets());
        assert_eq!(socket.ssl_mode, SslMode::Disable);
        assert_eq!(
            socket.redacted(),
            "postgres://u@/db?host=/var/run/postgresql&sslmode=disable"
        );
        let socket = parse("host=/var/run/postgresql dbname=db user=u sslmode=verify-full");
        assert!(socket.only_unix_sockets());
        assert_eq!(
            socket.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable,
            "TLS is not used on a Unix socket"
        );
        assert!(matches!(
            err("postgres://u@db.example/db?host=/tmp,db.example&sslmode=require"),
            ConnInfoError::Tls(_)
        ));
        assert!(matches!(err("postgres:///db"), ConnInfoError::Syntax(_)));
        assert!(matches!(
            err("postgres://u@a,,b/db"),
            ConnInfoError::Syntax(_)
        ));
    }

    #[test]
    fn the_tls_default_depends_on_where_the_database_is() {
        for local in [
            "postgres://u@localhost/db",
            "postgres://u@127.0.0.1:5433/db",
            "postgres://u@[::1]/db",
            "postgres://u@127.0.0.1,localhost/db",
            "postgres://u@db.example/db?hostaddr=127.0.0.1",
            "host=/run/postgresql dbname=db",
        ] {
            let info = parse(local);
            assert_eq!(info.ssl_mode, SslMode::Disable, "{local}");
            assert!(!info.ssl_mode_given);
        }
        for remote in [
            "postgres://u@db.example/db",
            "postgres://u@10.0.0.5/db",
            "postgres://u@127.0.0.1,db.example/db",
            "postgres://u@localhost/db?hostaddr=10.0.0.5",
        ] {
            let e = err(remote).to_string();
            assert!(
                e.contains("verify-full") && e.contains("sslrootcert") && e.contains("default"),
                "{remote}: {e}"
            );
            let sep = if remote.contains('?') { '&' } else { '?' };
            let info = parse(&format!("{remote}{sep}sslrootcert=/etc/ca.pem"));
            assert_eq!(info.ssl_mode, SslMode::VerifyFull, "{remote}");
            assert_eq!(
                info.config.get_ssl_mode(),
                tokio_postgres::config::SslMode::Require
            );
        }
    }

    #[test]
    fn sslmodes() {
        let m = |s: &str| parse(s).ssl_mode;
        assert_eq!(m("postgres://u@db/x?sslmode=disable"), SslMode::Disable);
        assert_eq!(
            m("postgres://u@db/x?sslmode=prefer"),
            SslMode::Require,
            "prefer never falls back to plaintext"
        );
        assert_eq!(m("postgres://u@db/x?sslmode=require"), SslMode::Require);
        assert_eq!(
            m("postgres://u@localhost/x?sslmode=require"),
            SslMode::Require
        );
        assert_eq!(
            m("postgres://u@db/x?sslmode=verify-ca&sslrootcert=/ca.pem"),
            SslMode::VerifyCa
        );
        let full = parse("postgres://u@db/x?sslmode=verify-full&sslrootcert=/etc/pg/ca.pem");
        assert_eq!(full.ssl_mode, SslMode::VerifyFull);
        assert_eq!(
            full.root_certs,
            Some(RootCerts::File("/etc/pg/ca.pem".into()))
        );
        assert_eq!(
            full.redacted(),
            "postgres://u@db:5432/x?sslmode=verify-full&sslrootcert=/etc/pg/ca.pem"
        );
        assert_eq!(
            parse("postgres://u@db/x?sslrootcert=system").root_certs,
            Some(RootCerts::System)
        );
        for refused in [
            "postgres://u@db/x?sslmode=allow",
            "postgres://u@db/x?sslmode=verify-full",
            "postgres://u@db/x?sslmode=verify-ca",
            "postgres://u@db/x?sslmode=require&sslrootcert=system",
            "postgres://u@db/x?sslmode=on",
        ] {
            assert!(matches!(err(refused), ConnInfoError::Tls(_)), "{refused}");
        }
    }

    #[test]
    fn what_looks_like_a_connection_string() {
        assert!(is_conninfo("postgres://u@h/db"));
        assert!(is_conninfo("postgresql://h"));
        assert!(is_conninfo("host=db user=u"));
        assert!(is_conninfo("  dbname=x"));
        assert!(!is_conninfo("sqlite:///x.db"));
        assert!(!is_conninfo("mysql://u:p@h/db"));
        assert!(!is_conninfo("vncbroker.db"));
    }
}
