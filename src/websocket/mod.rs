//! The server side of RFC 6455, as the relay needs it.
//!
//! - [`upgrade`]: checks an upgrade request and computes the answer.
//! - [`frame`]: parses client frame headers and writes server frame headers,
//!   without I/O; payloads are unmasked word by word, in place.
//! - [`stream`]: a reader that hands out unmasked payload bytes as they
//!   arrive (a frame of any size costs no more memory than the fixed read
//!   buffer), and a writer that sends header and payload in one vectored
//!   write without copying the payload.
//!
//! It is ours rather than a general WebSocket library because the relay
//! wants exactly this: binary streams only, strict client rules (masking,
//! reserved bits, control-frame limits), no per-message allocation, and
//! reads that can be raced against the VNC socket without losing bytes.

pub mod frame;
pub mod pool;
pub mod stream;
pub mod upgrade;
