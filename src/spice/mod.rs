//! SPICE as sans-IO state machines: the link handshake every channel
//! connection starts with, the security proxy that swaps the client's
//! ticket for the stored password, and the main channel's filter.
//!
//! - [`wire`]: link messages and data-message headers.
//! - [`ticket`]: the password sealed with a server's key.
//! - [`link`]: one channel's link, as the proxy runs it.
//! - [`main_channel`]: the session id, and what the main channel drops.

pub mod link;
pub mod main_channel;
pub mod ticket;
pub mod wire;

use crate::policy::SessionPolicy;

/// Whether a session with `policy` may open a channel of `kind`: a
/// view-only one gets no inputs, and the client's devices (USB, smartcards,
/// shared folders) and microphone reach the VM only where the VM allows
/// them. Kinds this version does not know are refused.
pub fn channel_allowed(kind: u8, policy: &SessionPolicy) -> bool {
    use wire::channel as c;
    match kind {
        c::MAIN | c::DISPLAY | c::CURSOR | c::PLAYBACK | c::PORT => true,
        c::INPUTS => !policy.view_only,
        c::RECORD => policy.microphone && !policy.view_only,
        c::USBREDIR | c::SMARTCARD | c::WEBDAV => policy.usb_redirect && !policy.view_only,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::wire::channel as c;
    use super::*;

    #[test]
    fn channels_follow_the_policy() {
        let plain = SessionPolicy::default();
        for kind in [c::MAIN, c::DISPLAY, c::INPUTS, c::CURSOR, c::PLAYBACK] {
            assert!(channel_allowed(kind, &plain), "{}", c::name(kind));
        }
        for kind in [
            c::RECORD,
            c::USBREDIR,
            c::SMARTCARD,
            c::WEBDAV,
            c::TUNNEL,
            42,
        ] {
            assert!(!channel_allowed(kind, &plain), "{}", c::name(kind));
        }
        let devices = SessionPolicy {
            usb_redirect: true,
            microphone: true,
            ..plain
        };
        for kind in [c::RECORD, c::USBREDIR, c::SMARTCARD, c::WEBDAV] {
            assert!(channel_allowed(kind, &devices));
        }
        let viewer = SessionPolicy {
            view_only: true,
            ..devices
        };
        for kind in [c::INPUTS, c::RECORD, c::USBREDIR] {
            assert!(!channel_allowed(kind, &viewer), "{}", c::name(kind));
        }
        assert!(channel_allowed(c::DISPLAY, &viewer));
    }
}
