//! vncbroker: a console-access broker for VMs.
//!
//! It hands out short-lived console tokens over an OpenNebula-style XML-RPC
//! API and a JSON API, keeps them (hashed) in a database that any number of
//! nodes can share, and redeems them in a noVNC-compatible WebSocket proxy.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration, with `VNCBROKER_*` environment and
//!   flag overrides.
//! - [`cli`]: the `vncbroker` command line (serve, demo, user, vm, token,
//!   sessions).
//! - [`token`]: what a console token is: generation, hashing, lifetime rules.
//! - [`store`]: where tokens, sessions, users and VMs live; one small
//!   interface per caller ([`store::TokenStore`], [`store::SessionLog`],
//!   [`store::Registry`], [`store::Health`]), an embedded SQLite backend, a
//!   PostgreSQL one for several nodes, and the wrapper that times every call.
//! - [`inventory`]: who may open which VM's console, and where that console
//!   is; the [`inventory::Inventory`] interface, the local registry, and
//!   OpenNebula's oned (with its VM-document parser).
//! - [`auth`]: password hashing and the short-lived verification cache.
//! - [`limits`]: per-address budgets of failed token and password attempts.
//! - [`service`]: the token service that both APIs and the CLI call: mint and
//!   revoke, with their error kinds.
//! - [`api`]: the HTTP surface: XML-RPC at `/RPC2` ([`api::xmlrpc`]), JSON
//!   at `/api/v1` ([`api::json`]), and websockify's token lookup
//!   ([`api::websockify`]).
//! - [`proxy`]: the noVNC-compatible WebSocket-to-TCP relay that redeems
//!   tokens, with the session registry that ends revoked sessions.
//! - [`websocket`]: the server side of RFC 6455 for the relay: upgrade
//!   checks and a streaming, zero-copy frame codec.
//! - [`rfb`]: RFB as sans-IO state machines: the wire format both roles
//!   share, the server handshake, the security-proxy handshake, and VNC
//!   authentication.
//! - [`console`]: the console page built on noVNC's RFB module.
//! - `demo`: a small built-in VNC server and the one-command quickstart
//!   (cargo feature `demo`, on by default).
//! - [`secrets`]: VNC passwords sealed at rest, and the key file.
//! - [`tls`]: HTTPS/WSS on the listener with rustls.
//! - [`metrics`]: Prometheus counters and histograms for `/metrics`, on
//!   `prometheus-client`; a leaf that the other modules report into.
//! - [`server`]: binds the listener, wires the parts together by the node's
//!   role, serves the health and metrics endpoints, runs the background
//!   jobs, reloads on SIGHUP and drains live sessions on SIGTERM.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod console;
#[cfg(feature = "demo")]
pub mod demo;
pub mod inventory;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod rfb;
pub mod secrets;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod token;
pub mod websocket;

/// Current time as Unix seconds. Every timestamp the broker stores uses it.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
