//! What the relay does with a session whose messages it follows: the
//! browser's through [`ClientFilter`] (view-only, clipboard to the VM,
//! input counts), the VNC server's through [`ServerFilter`] where the
//! policy needs it (clipboard from the VM), and what the browser receives
//! into the session's [`Recorder`].
//!
//! A session whose policy needs none of this is not inspected at all: the
//! relay then passes bytes without looking at them.

use std::sync::{Arc, Mutex};

use crate::policy::SessionPolicy;
use crate::recording::{Recorder, Stopped};
use crate::rfb::client_messages::{ClientFilter, ClientRules, ClientStreamError};
use crate::rfb::server_messages::{self, ServerFilter, ServerRules, ServerStreamError};
use crate::rfb::wire::PixelFormat;
use crate::store::Audit;

/// Why an inspected relay must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("{0}")]
    Client(#[from] ClientStreamError),
    #[error("{0}")]
    Server(#[from] ServerStreamError),
    /// A required recording stopped.
    #[error("{0}")]
    Recording(Stopped),
}

/// The browser's pixel format as forwarded to the server, handed from the
/// upstream side to the downstream parser.
type Format = Arc<Mutex<Option<PixelFormat>>>;

/// The browser-to-server side.
pub struct Upstream {
    filter: ClientFilter,
    out: Vec<u8>,
    format: Option<Format>,
}

/// The server-to-browser side.
pub struct Downstream {
    filter: Option<ServerFilter>,
    out: Vec<u8>,
    format: Option<Format>,
    tap: Tap,
}

/// Where what the browser receives is recorded, if the session is.
struct Tap {
    recorder: Option<Recorder>,
    /// Whether a stopped recording ends the session.
    required: bool,
    /// The recording stopped early and the session went on: the recorder
    /// knows it too, and says so when it is finished.
    stopped: bool,
}

impl Tap {
    fn record(&mut self, data: &[u8]) -> Result<(), Broken> {
        let Some(rec) = self.recorder.as_mut().filter(|_| !self.stopped) else {
            return Ok(());
        };
        if data.is_empty() {
            return Ok(());
        }
        match rec.record(data) {
            Ok(()) => Ok(()),
            Err(why) => {
                tracing::warn!(reason = %why, required = self.required, "session recording stopped");
                self.stopped = true;
                if self.required {
                    Err(Broken::Recording(why))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The two sides of an inspected session.
pub fn sides(
    policy: &SessionPolicy,
    max_clipboard: u32,
    recorder: Option<Recorder>,
    required: bool,
) -> (Upstream, Downstream) {
    let parse_server = policy.needs_server_parsing();
    let format: Option<Format> = parse_server.then(Format::default);
    let client = ClientFilter::new(ClientRules {
        view_only: policy.view_only,
        // A viewer must never disconnect the person in control, and a
        // control session must not drop the viewers: always shared.
        force_shared: true,
        clipboard_to_vm: policy.clipboard.to_vm() && !policy.view_only,
        max_clipboard,
        parseable: parse_server.then_some(server_messages::can_parse as fn(i32) -> bool),
    });
    let server = parse_server.then(|| {
        ServerFilter::new(ServerRules {
            clipboard_from_vm: policy.clipboard.from_vm(),
            max_clipboard,
        })
    });
    (
        Upstream {
            filter: client,
            out: Vec::new(),
            format: format.clone(),
        },
        Downstream {
            filter: server,
            out: Vec::new(),
            format,
            tap: Tap {
                recorder,
                required,
                stopped: false,
            },
        },
    )
}

/// A scratch buffer that gave back a large message's room once done, so
/// an idle session does not keep it.
fn trim(out: &mut Vec<u8>) {
    out.clear();
    if out.capacity() > 64 * 1024 {
        out.shrink_to(64 * 1024);
    }
}

impl Upstream {
    /// What goes to the server for `data` from the browser.
    pub fn pass(&mut self, data: &[u8]) -> Result<&[u8], Broken> {
        trim(&mut self.out);
        self.filter.feed(data, &mut self.out)?;
        if let Some(shared) = &self.format
            && let Some(pf) = self.filter.take_pixel_format()
        {
            *shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(pf);
        }
        Ok(&self.out)
    }
}

impl super::relay::Filter for Upstream {
    fn pass<'a>(&'a mut self, data: &'a [u8]) -> Result<&'a [u8], super::relay::End> {
        Upstream::pass(self, data).map_err(Into::into)
    }
}

impl super::relay::Filter for Downstream {
    fn pass<'a>(&'a mut self, data: &'a [u8]) -> Result<&'a [u8], super::relay::End> {
        Downstream::pass(self, data).map_err(Into::into)
    }
}

impl Downstream {
    /// What goes to the browser for `data` from the server (recorded on
    /// the way, when the session is).
    pub fn pass<'a>(&'a mut self, data: &'a [u8]) -> Result<&'a [u8], Broken> {
        let sent: &[u8] = match &mut self.filter {
            Some(filter) => {
                if let Some(shared) = &self.format
                    && let Some(pf) = shared.lock().unwrap_or_else(|e| e.into_inner()).take()
                {
                    filter.set_pixel_format(pf);
                }
                trim(&mut self.out);
                filter.feed(data, &mut self.out)?;
                &self.out
            }
            None => data,
        };
        self.tap.record(sent)?;
        Ok(sent)
    }

    /// Records what the browser was sent outside the relay (the proxy's
    /// side of the handshake).
    pub fn record_sent(&mut self, data: &[u8]) -> Result<(), Broken> {
        self.tap.record(data)
    }

    /// Takes the recorder, to finish it once the session is over.
    pub fn take_recorder(&mut self) -> Option<Recorder> {
        self.tap.recorder.take()
    }
}

/// What the proxy saw of a session, for its row, and the drops for
/// `/metrics`.
pub fn audit(up: &Upstream, down: &Downstream) -> Audit {
    let input = up.filter.counts();
    let output = down.filter.as_ref().map(|f| f.counts());
    let dropped_from_vm = output.map_or(0, |o| o.dropped_clipboard);
    crate::metrics::global().clipboard_dropped(input.dropped_clipboard, dropped_from_vm);
    crate::metrics::global().input_dropped(input.dropped_input);
    Audit {
        key_events: input.key_events,
        pointer_events: input.pointer_events,
        clipboard_bytes_to_vm: input.clipboard_bytes_to_vm,
        clipboard_bytes_from_vm: output.map(|o| o.clipboard_bytes_from_vm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Clipboard;

    #[test]
    fn each_side_follows_only_what_the_policy_needs() {
        let viewer = SessionPolicy {
            view_only: true,
            ..SessionPolicy::default()
        };
        let (mut up, mut down) = sides(&viewer, 1024, None, false);
        assert!(
            down.filter.is_none(),
            "a viewer's server stream is not parsed"
        );
        // ClientInit forced shared, then a key event and a screen request.
        let mut input = vec![0u8, 4, 1, 0, 0, 0, 0, 0, 0x61];
        input.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 16, 0, 16]);
        assert_eq!(
            up.pass(&input).unwrap(),
            [1, 3, 0, 0, 0, 0, 0, 0, 16, 0, 16]
        );
        // Anything from the server passes untouched, whatever it is.
        assert_eq!(down.pass(b"\xffnot rfb").unwrap(), b"\xffnot rfb");
        let seen = audit(&up, &down);
        assert_eq!(seen.key_events, 0);
        assert_eq!(seen.clipboard_bytes_from_vm, None);

        let blocked = SessionPolicy {
            clipboard: Clipboard::ToVm,
            ..SessionPolicy::default()
        };
        let (mut up, mut down) = sides(&blocked, 1024, None, false);
        assert!(down.filter.is_some());
        // The browser's pixel format reaches the server parser: a 16 bpp
        // raw 1x1 rectangle is 2 bytes.
        let mut pf = vec![
            0u8, 0, 0, 0, 16, 16, 0, 1, 0, 31, 0, 63, 0, 31, 11, 5, 0, 0, 0, 0,
        ];
        pf.insert(0, 1); // ClientInit first
        up.pass(&pf).unwrap();
        let mut init = vec![
            0, 1, 0, 1, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ];
        init.extend_from_slice(&0u32.to_be_bytes());
        let mut update = vec![0u8, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 7, 7];
        let cut = [3u8, 0, 0, 0, 0, 0, 0, 2, b'h', b'i'];
        update.extend_from_slice(&cut);
        update.push(2); // Bell: still in sync after the 2-byte pixel
        let mut all = init.clone();
        all.extend_from_slice(&update);
        let out = down.pass(&all).unwrap().to_vec();
        let mut expected = init;
        expected.extend_from_slice(&update[..18]);
        expected.push(2);
        assert_eq!(out, expected, "the cut text from the VM is gone");
        assert_eq!(audit(&up, &down).clipboard_bytes_from_vm, Some(0));
    }
}
