//! vncbroker: a console-access broker for VMs.
//!
//! It hands out short-lived console tokens over an OpenNebula-style XML-RPC
//! API and a JSON API, keeps them (hashed) in a database that any number of
//! nodes can share, and redeems them in a noVNC-compatible WebSocket proxy.
//!
//! # Layout
//!
//! Dependencies flow one way, down this list of rooms (`scripts/module-graph
//! --layers` checks it, in the test command):
//!
//! ```text
//! cli → demo → server → {api, proxy, console} → {service, config}
//!     → {inventory, store, token, auth} → {xmlrpc, websocket, rfb, spice, edge}
//!     → {metrics, limits, secrets, tls, logging, shutdown, policy, protocol,
//!        recording}
//! ```
//!
//! - [`cli`]: the `vncbroker` command line (serve, demo, user, vm, token,
//!   sessions).
//! - `demo`: a small built-in VNC server and the one-command quickstart
//!   (cargo feature `demo`, on by default).
//! - [`server`]: a node, wired by its role, its HTTP connections, the
//!   operational endpoints, reload on SIGHUP and the drain on SIGTERM.
//! - [`api`]: the HTTP surface: XML-RPC at `/RPC2` in oned's conventions
//!   and words ([`api::xmlrpc`]), JSON at `/api/v1` ([`api::json`]), and
//!   websockify's token lookup ([`api::websockify`]).
//! - [`proxy`]: the noVNC-compatible WebSocket-to-TCP relay that redeems
//!   tokens, with the session registry that ends revoked sessions.
//! - [`console`]: the console page built on noVNC's RFB module, embedded in
//!   the binary.
//! - [`service`]: the token service that both APIs, the proxy and the CLI
//!   call: mint, redeem and revoke, with their error kinds.
//! - [`config`]: the TOML configuration, with `VNCBROKER_*` environment and
//!   flag overrides.
//! - [`inventory`]: who may open which VM's console, and where that console
//!   is; the [`inventory::Inventory`] interface, the local registry, and
//!   OpenNebula's oned (with its VM-document parser).
//! - [`store`]: where tokens, sessions, users and VMs live; one small
//!   interface per caller ([`store::TokenStore`], [`store::SessionLog`],
//!   [`store::Registry`], [`store::Health`]), an embedded SQLite backend, a
//!   PostgreSQL one for several nodes, and the wrapper that times every call.
//! - [`token`]: what a console token is: generation, hashing, lifetime rules.
//! - [`auth`]: password hashing and the short-lived verification cache.
//! - [`xmlrpc`]: the XML-RPC codec, without I/O, for the API and for the
//!   OpenNebula client.
//! - [`websocket`]: the server side of RFC 6455 for the relay: upgrade
//!   checks and a streaming, zero-copy frame codec.
//! - [`rfb`]: RFB as sans-IO state machines: the wire format both roles
//!   share, the server handshake, the security-proxy handshake, and VNC
//!   authentication.
//! - [`spice`]: the SPICE link handshake as a sans-IO security proxy, one
//!   per channel connection, so the SPICE password stays with the broker.
//! - [`edge`]: what the HTTP edge says about a request: its `Origin`, and
//!   the client's address and scheme through trusted reverse proxies.
//! - [`metrics`]: Prometheus counters and histograms for `/metrics`, on
//!   `prometheus-client`; a leaf that the other modules report into.
//! - [`policy`]: what a session may do (view only, exclusive control,
//!   clipboard direction, recording), from VM settings and defaults.
//! - [`protocol`]: which protocol a VM's console speaks, VNC or SPICE.
//! - [`limits`]: per-address budgets of failed attempts, connection caps.
//! - [`secrets`]: VNC passwords sealed at rest, and the key file.
//! - [`tls`]: HTTPS/WSS on the listener with rustls.
//! - [`logging`]: the `tracing` subscriber, and its level on reload.
//! - [`shutdown`]: the stop signals, and the notice and wait of a drain.
//! - [`recording`]: session recordings, zstd-compressed files of what the
//!   browser received, written off the relay's path, and their reader.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod console;
#[cfg(feature = "demo")]
pub mod demo;
pub mod edge;
pub mod inventory;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod recording;
pub mod rfb;
pub mod secrets;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod spice;
pub mod store;
pub mod tls;
pub mod token;
pub mod websocket;
pub mod xmlrpc;

/// Current time as Unix seconds. Every timestamp the broker stores uses it.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
