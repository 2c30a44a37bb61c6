//! SPICE as sans-IO state machines: the link handshake every channel
//! connection starts with, and the security proxy that swaps the browser's
//! ticket for the stored password.
