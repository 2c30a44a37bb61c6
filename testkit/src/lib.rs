//! Test kit for vncbroker: runs the real `vncbroker` binary, real VNC
//! servers (QEMU's VNC and SPICE, TigerVNC's Xvnc) and a private PostgreSQL, and talks to
//! them as clients do: HTTP/1.1, WebSocket and the browser side of RFB.
//!
//! It drives the broker only as a process and over the network, so the
//! broker's own unit tests can use it too without a second copy of the
//! crate. Every process started here is killed and reaped when its handle
//! drops, also when a test panics.

pub mod broker;
pub mod frames;
pub mod http;
pub mod net;
pub mod pg;
pub mod process;
pub mod qemu;
pub mod rfb;
pub mod spice;
pub mod sqlite;
pub mod ws;
pub mod xvnc;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use broker::{
    Broker, Minted, NODE, USER, USER_PW, bin, post_mint, spawn_serve, unknown_token, vm_add_args,
    vm_add_password_args,
};
pub use http::{HttpResponse, basic_auth, http_request, metric, request_head, scrape};
pub use net::{CutRelay, TinyServer, closed_port, free_port, port_open};
pub use process::{clean_env, fd_count, steady_count, stop_child, stop_group, tail};
pub use qemu::Qemu;
pub use rfb::{ServerInit, rfb_handshake};
pub use spice::SpiceQemu;
pub use sqlite::{SessionRow, sqlite_session_rows};
pub use ws::{Ws, WsEnd, WsOptions};
pub use xvnc::{Typewriter, Xvnc};

/// How long a broker, QEMU or Xvnc may take to come up on a loaded machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(40);
/// Default deadline for one network step (a read, a close frame...).
pub const STEP: Duration = Duration::from_secs(20);

/// The repository (the workspace root).
pub fn repo_root() -> PathBuf {
    let kit = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    kit.parent().map(PathBuf::from).unwrap_or(kit)
}

/// `<repo>/test-artifacts`, created on demand (ignored by git).
pub fn artifacts_dir() -> PathBuf {
    let d = repo_root().join("test-artifacts");
    std::fs::create_dir_all(&d).expect("creating test-artifacts");
    d
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn poll_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a file fully (for a small log or screenshot).
pub fn read_file(path: &std::path::Path) -> Vec<u8> {
    use std::io::Read;
    let mut v = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    v
}
