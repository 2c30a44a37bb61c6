//! RFB (VNC) protocol handling, sans-IO: state machines that take bytes in
//! and hand bytes out, so they are tested and fuzzed without sockets and
//! driven by any transport.
//!
//! - [`wire`]: what both roles share: versions, security types, strings,
//!   the pixel format, the bounded input buffer.
//! - [`server`]: the server side of the handshake, up to ServerInit (the
//!   demo VNC server, and the browser side of the security proxy).
//! - [`SecurityProxy`]: the security-proxy handshake, a server towards the
//!   browser and a client towards the VNC server.
//! - [`vncauth`]: VNC Authentication's challenge-response.
//! - [`client_messages`]: the session phase from the browser to the VNC
//!   server, filtered by the console's rules (view-only, clipboard,
//!   encodings).
//! - [`server_messages`]: the session phase from the VNC server to the
//!   browser, parsed so cut texts can be dropped by policy without losing
//!   the message boundaries.

pub mod client_messages;
mod security_proxy;
pub mod server;
pub mod server_messages;
#[cfg(test)]
mod testing;
pub mod vncauth;
pub mod wire;

pub use security_proxy::{RfbError, SecurityProxy};
pub use wire::{MAX_BUFFERED, MAX_REASON_LEN};
