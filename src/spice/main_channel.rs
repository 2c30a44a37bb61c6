//! What the proxy does with the main channel once it is linked, without
//! I/O: it reads the session id from the server's MAIN_INIT (the other
//! channels link with it), drops the messages that would send the client
//! to another host on a migration, and drops agent data where the session's
//! rules say nothing crosses (clipboard, file transfer and display changes
//! all ride on the agent). Every other message passes unchanged, streamed:
//! a message's body is never held whole.

use super::wire::{self, msg, msgc};

/// Which way a filter looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Server to client.
    FromServer,
    /// Client to server.
    FromClient,
}

/// What a filter lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Agent data may pass this way.
    pub agent: bool,
}

#[derive(Debug)]
enum State {
    Header { have: usize },
    Body { left: u32, drop: bool, init: bool },
}

/// One direction of a main channel.
#[derive(Debug)]
pub struct MainFilter {
    side: Side,
    rules: Rules,
    mini: bool,
    header: [u8; 18],
    state: State,
    /// The first bytes of MAIN_INIT's body, until the session id is read.
    init: Vec<u8>,
    session_id: Option<u32>,
    dropped: u64,
}

impl MainFilter {
    pub fn new(side: Side, rules: Rules, mini_header: bool) -> MainFilter {
        MainFilter {
            side,
            rules,
            mini: mini_header,
            header: [0; 18],
            state: State::Header { have: 0 },
            init: Vec::new(),
            session_id: None,
            dropped: 0,
        }
    }

    /// The session id, once the server's MAIN_INIT passed.
    pub fn session_id(&self) -> Option<u32> {
        self.session_id
    }

    /// Messages dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn drops(&self, kind: u16) -> bool {
        match self.side {
            Side::FromServer => {
                msg::is_migration(kind) || (kind == msg::MAIN_AGENT_DATA && !self.rules.agent)
            }
            Side::FromClient => kind == msgc::MAIN_AGENT_DATA && !self.rules.agent,
        }
    }

    /// Appends to `out` what passes of `data`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.filter(data, out) {
            out.extend_from_slice(data);
        }
    }

    /// Filters `data`: true when all of it passes unchanged (the common
    /// case, and then nothing is copied: `out` is untouched); otherwise
    /// what passes is appended to `out`.
    pub fn filter(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        let hlen = wire::msg_header_len(self.mini);
        // Whether what passed so far is `data[..pos]` itself.
        let mut verbatim = true;
        let mut pos = 0;
        while pos < data.len() {
            match &mut self.state {
                State::Header { have } => {
                    let start = pos;
                    if *have > 0 {
                        // The header began in an earlier call: its bytes
                        // were held back, so they go out from `self.header`.
                        diverge(&mut verbatim, out, &data[..start]);
                    }
                    let take = (hlen - *have).min(data.len() - pos);
                    self.header[*have..*have + take].copy_from_slice(&data[pos..pos + take]);
                    *have += take;
                    pos += take;
                    if *have < hlen {
                        // Held back until the header is whole.
                        diverge(&mut verbatim, out, &data[..start]);
                        return verbatim;
                    }
                    let h = wire::msg_header(&self.header[..hlen], self.mini);
                    let drop = self.drops(h.kind);
                    if drop {
                        self.dropped += 1;
                        diverge(&mut verbatim, out, &data[..start]);
                    } else if !verbatim {
                        out.extend_from_slice(&self.header[..hlen]);
                    }
                    let init = self.side == Side::FromServer
                        && h.kind == msg::MAIN_INIT
                        && self.session_id.is_none();
                    self.state = if h.size == 0 {
                        State::Header { have: 0 }
                    } else {
                        State::Body {
                            left: h.size,
                            drop,
                            init,
                        }
                    };
                }
                State::Body { left, drop, init } => {
                    let take = (*left as usize).min(data.len() - pos);
                    let body = &data[pos..pos + take];
                    if *drop {
                        diverge(&mut verbatim, out, &data[..pos]);
                    } else if !verbatim {
                        out.extend_from_slice(body);
                    }
                    if *init && self.init.len() < 4 {
                        let need = 4 - self.init.len();
                        self.init.extend_from_slice(&body[..need.min(body.len())]);
                        if let Some(id) = wire::main_init_session_id(&self.init) {
                            self.session_id = Some(id);
                            *init = false;
                        }
                    }
                    *left -= take as u32;
                    pos += take;
                    if *left == 0 {
                        self.state = State::Header { have: 0 };
                    }
                }
            }
        }
        verbatim
    }
}

/// Leaves verbatim mode: what passed so far, `passed`, is copied out.
fn diverge(verbatim: &mut bool, out: &mut Vec<u8>, passed: &[u8]) {
    if *verbatim {
        out.extend_from_slice(passed);
        *verbatim = false;
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::build::message;
    use super::*;

    fn run(f: &mut MainFilter, data: &[u8], bytewise: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if bytewise {
            for b in data {
                f.feed(std::slice::from_ref(b), &mut out);
            }
        } else {
            f.feed(data, &mut out);
        }
        out
    }

    #[test]
    fn the_session_id_is_read_and_migrations_dropped() {
        for mini in [true, false] {
            for bytewise in [true, false] {
                let mut init = 0x1122_3344u32.to_le_bytes().to_vec();
                init.extend_from_slice(&[0; 28]);
                let mut stream = message(mini, msg::MAIN_INIT, &init);
                stream.extend(message(mini, 104, &[1, 0, 0, 0, 2, 0]));
                stream.extend(message(mini, msg::MAIN_MIGRATE_BEGIN, &[9; 40]));
                stream.extend(message(mini, msg::MAIN_MIGRATE_SWITCH_HOST, b"evil.host"));
                stream.extend(message(mini, msg::MAIN_AGENT_DATA, b"clip"));
                stream.extend(message(mini, 113, &[]));
                let mut f = MainFilter::new(Side::FromServer, Rules { agent: true }, mini);
                let out = run(&mut f, &stream, bytewise);
                assert_eq!(f.session_id(), Some(0x1122_3344));
                let mut expect = message(mini, msg::MAIN_INIT, &init);
                expect.extend(message(mini, 104, &[1, 0, 0, 0, 2, 0]));
                expect.extend(message(mini, msg::MAIN_AGENT_DATA, b"clip"));
                expect.extend(message(mini, 113, &[]));
                assert_eq!(out, expect);
                assert_eq!(f.dropped(), 2);
            }
        }
    }

    #[test]
    fn agent_data_stops_where_the_rules_say() {
        let mut from_vm = MainFilter::new(Side::FromServer, Rules { agent: false }, true);
        let data = message(true, msg::MAIN_AGENT_DATA, &[0x55; 3000]);
        assert!(run(&mut from_vm, &data, false).is_empty());
        let mut to_vm = MainFilter::new(Side::FromClient, Rules { agent: false }, true);
        let mut up = message(true, msgc::MAIN_AGENT_START, &[4, 0, 0, 0]);
        up.extend(message(true, msgc::MAIN_AGENT_DATA, b"file transfer"));
        up.extend(message(true, 105, &[2, 0]));
        let out = run(&mut to_vm, &up, true);
        let mut expect = message(true, msgc::MAIN_AGENT_START, &[4, 0, 0, 0]);
        expect.extend(message(true, 105, &[2, 0]));
        assert_eq!(out, expect);
        // The client's messages never set a session id.
        assert_eq!(to_vm.session_id(), None);
    }

    #[test]
    fn a_stream_that_loses_nothing_passes_without_a_copy_however_it_is_cut() {
        let mut stream = Vec::new();
        for i in 0..40u8 {
            stream.extend(message(
                true,
                msg::MAIN_AGENT_DATA,
                &vec![i; 10 + i as usize],
            ));
            if i % 7 == 0 {
                stream.extend(message(true, msg::MAIN_MIGRATE_BEGIN, &[i; 5]));
            }
        }
        let expect = {
            let mut f = MainFilter::new(Side::FromServer, Rules { agent: true }, true);
            run(&mut f, &stream, true)
        };
        // Cut at every width: whole-message chunks pass as they are, and
        // the output is the same however the stream is cut.
        for width in 1..64 {
            let mut f = MainFilter::new(Side::FromServer, Rules { agent: true }, true);
            let (mut got, mut verbatim) = (Vec::new(), 0);
            for chunk in stream.chunks(width) {
                let mut out = Vec::new();
                if f.filter(chunk, &mut out) {
                    assert!(out.is_empty());
                    got.extend_from_slice(chunk);
                    verbatim += 1;
                } else {
                    got.extend(out);
                }
            }
            assert_eq!(got, expect, "width {width}");
            assert!(width < 16 || verbatim > 0, "width {width}");
        }
        let mut f = MainFilter::new(Side::FromServer, Rules { agent: true }, true);
        let clean = message(true, msg::MAIN_AGENT_DATA, &[7; 2048]);
        let mut out = Vec::new();
        assert!(f.filter(&clean, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn a_huge_declared_size_streams_without_buffering() {
        let mut f = MainFilter::new(Side::FromServer, Rules { agent: true }, true);
        let mut head = 200u16.to_le_bytes().to_vec();
        head.extend_from_slice(&u32::MAX.to_le_bytes());
        let out = run(&mut f, &head, false);
        assert_eq!(out, head);
        let out = run(&mut f, &[1; 10_000], false);
        assert_eq!(out.len(), 10_000);
    }
}
