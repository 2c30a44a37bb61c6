//! Logging set-up: a `tracing` subscriber on standard error, as text or
//! JSON, whose level a configuration reload can change.
//!
//! `RUST_LOG`, when set, wins over the configured level, at start and on
//! every reload.

use tracing_subscriber::EnvFilter;

type FilterReload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the filter of the subscriber [`init`] installed.
static LOG_FILTER: std::sync::OnceLock<FilterReload> = std::sync::OnceLock::new();

/// Installs the subscriber: `level` is an `EnvFilter` directive (`info`,
/// `vncbroker=debug`), `format` is `json` or anything else for text. A
/// second call (or another subscriber already installed) changes nothing.
pub fn init(level: &str, format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // The filter sits behind a reload handle, so SIGHUP can change the level.
    let reload: Option<FilterReload> = if format == "json" {
        let builder = builder.json().with_filter_reloading();
        let handle = builder.reload_handle();
        builder
            .try_init()
            .ok()
            .map(|()| Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())) as _)
    } else {
        let builder = builder.with_filter_reloading();
        let handle = builder.reload_handle();
        builder
            .try_init()
            .ok()
            .map(|()| Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())) as _)
    };
    if let Some(r) = reload {
        let _ = LOG_FILTER.set(r);
    }
}

/// Whether `level` is a valid filter, checked before a reload applies
/// anything.
pub fn check_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("log.level {level:?}: {e}"))
}

/// Applies a new level. `Ok(false)` when nothing changed because `RUST_LOG`
/// is set (it wins) or the subscriber is not the one [`init`] installed.
pub fn reload_level(level: &str) -> Result<bool, String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(false);
    }
    let Some(reload) = LOG_FILTER.get() else {
        return Ok(false);
    };
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?;
    reload(filter).map(|()| true)
}
