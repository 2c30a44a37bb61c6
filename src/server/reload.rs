//! What a SIGHUP may change in a running node, listed once.

use crate::config::{Config, TlsConfig};

/// The reloadable settings. A reload applies these and logs the names of
/// any other setting that changed, which needs a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Reloadable {
    pub default_ttl: i64,
    pub max_ttl: i64,
    pub single_use: bool,
    pub log_level: String,
    pub drain_timeout_secs: u64,
    pub retention_days: u32,
    /// Session defaults, for tokens minted after the reload.
    pub clipboard: crate::policy::Clipboard,
    pub record_default: bool,
    pub recording_retention_days: u32,
    /// The certificate and key files are read again; turning TLS on or off
    /// needs a restart.
    pub tls: TlsConfig,
}

impl Reloadable {
    pub fn of(cfg: &Config) -> Reloadable {
        Reloadable {
            default_ttl: cfg.tokens.default_ttl,
            max_ttl: cfg.tokens.max_ttl,
            single_use: cfg.tokens.single_use,
            log_level: cfg.log.level.clone(),
            drain_timeout_secs: cfg.server.drain_timeout_secs,
            retention_days: cfg.sessions.retention_days,
            clipboard: cfg.proxy.clipboard,
            record_default: cfg.recording.default,
            recording_retention_days: cfg.recording.retention_days,
            tls: cfg.tls.clone(),
        }
    }

    /// Writes these settings into `cfg`.
    pub fn put(self, cfg: &mut Config) {
        cfg.tokens.default_ttl = self.default_ttl;
        cfg.tokens.max_ttl = self.max_ttl;
        cfg.tokens.single_use = self.single_use;
        cfg.log.level = self.log_level;
        cfg.server.drain_timeout_secs = self.drain_timeout_secs;
        cfg.sessions.retention_days = self.retention_days;
        cfg.proxy.clipboard = self.clipboard;
        cfg.recording.default = self.record_default;
        cfg.recording.retention_days = self.recording_retention_days;
        cfg.tls = self.tls;
    }

    /// `cfg` with every reloadable setting blanked, except whether TLS is
    /// on: what must stay equal for a reload to need no restart.
    fn blanked(cfg: &Config) -> Config {
        let mut c = cfg.clone();
        let tls = TlsConfig {
            cert: c.tls.cert.as_ref().map(|_| String::new()),
            key: c.tls.key.as_ref().map(|_| String::new()),
        };
        Reloadable {
            tls,
            ..Reloadable::default()
        }
        .put(&mut c);
        c
    }
}

/// The settings that differ between `old` and `new` other than the
/// reloadable ones, by the name an operator looks for.
pub(super) fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (Reloadable::blanked(old), Reloadable::blanked(new));
    let mut changed = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("listen", a.listen != b.listen);
    check("public_url", a.public_url != b.public_url);
    check("database", a.database != b.database);
    check("node_name", a.node_name != b.node_name);
    check("role", a.role != b.role);
    check("tokens.purge_interval", a.tokens != b.tokens);
    check("[api]", a.api != b.api);
    check("[proxy]", a.proxy != b.proxy);
    check("[http]", a.http != b.http);
    check("[tls] (turning TLS on or off)", a.tls != b.tls);
    check("[inventory]", a.inventory != b.inventory);
    check("[websockify_api]", a.websockify_api != b.websockify_api);
    check("log.format", a.log != b.log);
    check("[recording]", a.recording != b.recording);
    if changed.is_empty() && a != b {
        changed.push("other settings");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloadable_settings_need_no_restart_and_the_rest_are_named() {
        let old = Config::default();
        let mut new = old.clone();
        new.tokens.default_ttl += 60;
        new.tokens.single_use = !new.tokens.single_use;
        new.log.level = "debug".into();
        new.server.drain_timeout_secs += 1;
        new.sessions.retention_days += 1;
        assert!(restart_needed(&old, &new).is_empty());
        new.proxy.max_sessions += 1;
        new.listen = "127.0.0.1:1".into();
        assert_eq!(restart_needed(&old, &new), vec!["listen", "[proxy]"]);
    }

    #[test]
    fn tls_counts_only_when_turned_on_or_off() {
        let mut old = Config::default();
        old.tls.cert = Some("a.pem".into());
        old.tls.key = Some("a.key".into());
        let mut new = old.clone();
        new.tls.cert = Some("b.pem".into());
        assert!(restart_needed(&old, &new).is_empty());
        new.tls = TlsConfig::default();
        assert_eq!(
            restart_needed(&old, &new),
            vec!["[tls] (turning TLS on or off)"]
        );
    }

    #[test]
    fn put_of_writes_back_what_of_read() {
        let mut cfg = Config::default();
        cfg.tokens.max_ttl = 7200;
        cfg.log.level = "warn".into();
        let mut other = Config::default();
        Reloadable::of(&cfg).put(&mut other);
        assert_eq!(other, cfg);
    }
}
