//! SPICE consoles against QEMU's real SPICE server, through the broker's
//! WebSocket as spice-html5 uses it: the client's ticket is noise, the
//! broker's is sealed with the stored password.

use std::time::{Duration, Instant};

use testkit::spice::{self as sp, Linked, SpiceQemu};
use testkit::*;

const SPICE_PW: &str = "sPw9Kq2Lm7";

/// Registers VM `id` as a SPICE console at `port`, with `password` stored
/// and `flags` (device settings) given to `vm add`.
fn add_spice_vm(broker: &Broker, id: i64, port: u16, password: Option<&str>, flags: &[&str]) {
    let (id_s, port_s) = (id.to_string(), port.to_string());
    let mut args = match password {
        Some(_) => vm_add_password_args(&id_s, &port_s, USER),
        None => vm_add_args(&id_s, &port_s, USER),
    };
    args.extend(["--protocol", "spice"]);
    args.extend(flags);
    broker.cli(&args, password);
}

async fn ws(broker: &Broker, token: &str) -> Ws {
    broker.ws_token(token).await
}

/// Opens the main channel: linked, and the session id from MAIN_INIT.
async fn open_main(broker: &Broker, token: &str) -> (Ws, u32) {
    let mut main = ws(broker, token).await;
    let linked = sp::link(&mut main, 0, sp::CHANNEL_MAIN).await.unwrap();
    assert_eq!(linked, Linked::Ok, "{}", broker.log());
    let id = sp::main_init(&mut main).await.unwrap();
    sp::attach_channels(&mut main).await.unwrap();
    (main, id)
}

fn assert_no_leak(broker: &Broker, conns: &[&Ws]) {
    let log = broker.log();
    assert!(!log.is_empty());
    assert!(!log.contains(SPICE_PW), "the SPICE password is in the log");
    for c in conns {
        let needle = SPICE_PW.as_bytes();
        assert!(
            !c.received.windows(needle.len()).any(|w| w == needle),
            "the SPICE password reached the client"
        );
    }
}

/// QEMU with two USB redirection channels, so a console opens the 8
/// channels a typical VM has.
fn qemu_with_usb() -> SpiceQemu {
    SpiceQemu::start_with(
        Some(SPICE_PW),
        &[
            "-device",
            "qemu-xhci,id=xhci",
            "-chardev",
            "spicevmc,name=usbredir,id=usbredir1",
            "-device",
            "usb-redir,chardev=usbredir1,id=redir1",
            "-chardev",
            "spicevmc,name=usbredir,id=usbredir2",
            "-device",
            "usb-redir,chardev=usbredir2,id=redir2",
            "-audiodev",
            "spice,id=snd0",
            "-device",
            "intel-hda",
            "-device",
            "hda-duplex,audiodev=snd0",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_opens_one_console_of_eight_channels_once() {
    let qemu = qemu_with_usb();
    let broker = Broker::start("");
    add_spice_vm(
        &broker,
        1,
        qemu.port,
        Some(SPICE_PW),
        &["--usb-redirect", "yes", "--microphone", "yes"],
    );
    let t = broker.mint(1, USER, USER_PW, None, true).await;
    let (mut main, session) = open_main(&broker, &t.token).await;
    let mut channels = Vec::new();
    for (kind, id) in [
        (sp::CHANNEL_DISPLAY, 0),
        (sp::CHANNEL_INPUTS, 0),
        (sp::CHANNEL_CURSOR, 0),
        (sp::CHANNEL_PLAYBACK, 0),
        (sp::CHANNEL_RECORD, 0),
        (sp::CHANNEL_USBREDIR, 0),
        (sp::CHANNEL_USBREDIR, 1),
    ] {
        let mut c = ws(&broker, &t.token).await;
        let linked = sp::link_channel(&mut c, session, kind, id).await.unwrap();
        assert_eq!(linked, Linked::Ok, "channel {kind}/{id}: {}", qemu.log());
        channels.push(c);
    }
    // The display channel carries the screen once the client says its
    // cache sizes (DISPLAY_INIT): a surface, then drawing.
    let kinds = sp::start_display(&mut channels[0]).await.unwrap();
    assert!(
        kinds.contains(&314),
        "SURFACE_CREATE before drawing: {kinds:?}"
    );

    // A second main channel with the same single-use token is refused,
    // and so is a channel that names no session of this token.
    let mut second = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut second, 0, sp::CHANNEL_MAIN).await.unwrap(),
        Linked::Refused(sp::LINK_ERR_PERMISSION_DENIED)
    );
    let (code, _) = second.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4401);
    let mut stray = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut stray, session ^ 1, sp::CHANNEL_DISPLAY)
            .await
            .unwrap(),
        Linked::Refused(sp::LINK_ERR_BAD_CONNECTION_ID)
    );
    let (code, reason) = stray.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4406, "{reason}");

    // The console page's answer: the protocol, and no reconnect ticket (a
    // SPICE console's channels are not resumed one by one).
    let r = http_request(
        broker.port,
        "POST",
        "/console/session",
        &[
            ("Content-Type", "application/json".into()),
            ("Origin", broker.base_url()),
        ],
        serde_json::json!({ "token": t.token })
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let told: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(told["protocol"], "spice", "{told}");
    assert_eq!(told["reconnect_ticket"], false, "{told}");
    assert!(
        !r.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("set-cookie")),
        "{:?}",
        r.headers
    );

    // One session row for the console; every channel's bytes land in it.
    let rows = broker.sessions();
    assert_eq!(rows.len(), 1, "{rows:?}");
    main.close_normal().await;
    // The server ends the session's other channels with its main one.
    for c in &mut channels {
        c.expect_end(Duration::from_secs(10)).await;
    }
    let rows = broker.ended_sessions(1).await;
    // Each channel adds itself to the row as it ends.
    let (count, protocol) = poll_until("8 channels in the row", Duration::from_secs(10), || {
        let (n, p) = channels_of(&broker, rows[0].id);
        (n == 8).then_some((n, p))
    })
    .await;
    assert_eq!((count, protocol.as_str()), (8, "spice"));
    let rows = broker.sessions();
    assert!(rows[0].bytes_to_client > main.received.len() as i64);
    let mut all: Vec<&Ws> = channels.iter().collect();
    all.push(&main);
    assert_no_leak(&broker, &all);
    let metrics = scrape(broker.port).await;
    assert_eq!(
        metric(
            &metrics,
            "vncbroker_sessions_started_total{protocol=\"spice\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "vncbroker_spice_channels_total{channel=\"usbredir\",outcome=\"linked\"}"
        ),
        2.0
    );
}

/// The channel count and protocol of session `id`, from the database.
fn channels_of(broker: &Broker, id: i64) -> (i64, String) {
    let c = rusqlite::Connection::open(&broker.db_path).unwrap();
    c.query_row(
        "SELECT channels, protocol FROM sessions WHERE id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_ends_every_channel_within_two_seconds() {
    let qemu = qemu_with_usb();
    let broker = Broker::start("[proxy]\nrevocation_check_ms = 200\n");
    add_spice_vm(&broker, 2, qemu.port, Some(SPICE_PW), &[]);
    let t = broker.mint_default(2).await;
    let (main, session) = open_main(&broker, &t.token).await;
    let mut all = vec![main];
    for kind in [
        sp::CHANNEL_DISPLAY,
        sp::CHANNEL_INPUTS,
        sp::CHANNEL_CURSOR,
        sp::CHANNEL_PLAYBACK,
    ] {
        let mut c = ws(&broker, &t.token).await;
        assert_eq!(sp::link(&mut c, session, kind).await.unwrap(), Linked::Ok);
        all.push(c);
    }
    let at = Instant::now();
    assert_eq!(broker.revoke(2, USER, USER_PW).await, 1);
    for c in &mut all {
        let (code, reason) = c.expect_close(Duration::from_secs(5)).await;
        assert_eq!(code, 4410, "{reason}");
    }
    assert!(at.elapsed() < Duration::from_secs(2), "{:?}", at.elapsed());
    // A revoked token opens no channel.
    let mut late = ws(&broker, &t.token).await;
    let (code, _) = late.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_only_token_cannot_link_inputs_or_devices() {
    let qemu = SpiceQemu::start(Some(SPICE_PW));
    let broker = Broker::start("");
    add_spice_vm(
        &broker,
        3,
        qemu.port,
        Some(SPICE_PW),
        &["--usb-redirect", "yes"],
    );
    let t = broker.mint_view_only(3).await;
    let (mut main, session) = open_main(&broker, &t.token).await;
    let mut display = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut display, session, sp::CHANNEL_DISPLAY)
            .await
            .unwrap(),
        Linked::Ok
    );
    // The viewer sees the screen.
    sp::start_display(&mut display).await.unwrap();
    for kind in [sp::CHANNEL_INPUTS, sp::CHANNEL_USBREDIR, sp::CHANNEL_RECORD] {
        let mut c = ws(&broker, &t.token).await;
        assert_eq!(
            sp::link(&mut c, session, kind).await.unwrap(),
            Linked::Refused(sp::LINK_ERR_CHANNEL_NOT_AVAILABLE),
            "channel {kind}"
        );
        let (code, reason) = c.expect_close(Duration::from_secs(5)).await;
        assert_eq!(code, 4406);
        assert!(reason.contains("view only"), "{reason}");
    }
    // A SPICE server takes one client at a time: this console ends first.
    main.close_normal().await;
    broker.ended_sessions(1).await;
    // A control token of a VM that does not take devices gets inputs, but
    // no USB and no microphone.
    add_spice_vm(&broker, 4, qemu.port, Some(SPICE_PW), &[]);
    let t = broker.mint_default(4).await;
    let (_main2, session) = open_main(&broker, &t.token).await;
    let mut inputs = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut inputs, session, sp::CHANNEL_INPUTS)
            .await
            .unwrap(),
        Linked::Ok
    );
    let mut usb = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut usb, session, sp::CHANNEL_USBREDIR)
            .await
            .unwrap(),
        Linked::Refused(sp::LINK_ERR_CHANNEL_NOT_AVAILABLE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_stored_password_gets_a_clear_message() {
    let qemu = SpiceQemu::start(Some(SPICE_PW));
    let broker = Broker::start("");
    add_spice_vm(&broker, 5, qemu.port, Some("not-the-password"), &[]);
    let t = broker.mint_default(5).await;
    let mut main = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut main, 0, sp::CHANNEL_MAIN).await.unwrap(),
        Linked::Failed(sp::LINK_ERR_PERMISSION_DENIED)
    );
    let (code, reason) = main.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4500);
    assert_eq!(
        reason,
        "console unavailable: the SPICE server refused the stored password"
    );
    assert!(!broker.log().contains("not-the-password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_stored_password_the_server_decides() {
    // A server without ticketing takes any well-sealed ticket: the
    // client's own passes.
    let open = SpiceQemu::start(None);
    let broker = Broker::start("");
    add_spice_vm(&broker, 6, open.port, None, &[]);
    let t = broker.mint_default(6).await;
    let mut main = ws(&broker, &t.token).await;
    let linked = sp::link_as(&mut main, 0, sp::CHANNEL_MAIN, 0, Some(""))
        .await
        .unwrap();
    assert_eq!(linked, Linked::Ok);
    let session = sp::main_init(&mut main).await.unwrap();
    let mut display = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link_as(&mut display, session, sp::CHANNEL_DISPLAY, 0, Some("x"))
            .await
            .unwrap(),
        Linked::Ok
    );
    // A server with a password refuses the client's noise, and takes the
    // client's ticket if it knows the password.
    let locked = SpiceQemu::start(Some(SPICE_PW));
    add_spice_vm(&broker, 7, locked.port, None, &[]);
    let t = broker.mint_default(7).await;
    let mut main = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut main, 0, sp::CHANNEL_MAIN).await.unwrap(),
        Linked::Failed(sp::LINK_ERR_PERMISSION_DENIED)
    );
    let mut main = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link_as(&mut main, 0, sp::CHANNEL_MAIN, 0, Some(SPICE_PW))
            .await
            .unwrap(),
        Linked::Ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_link_messages_are_refused_and_the_broker_lives() {
    let qemu = SpiceQemu::start(Some(SPICE_PW));
    let mut broker = Broker::start("");
    add_spice_vm(&broker, 8, qemu.port, Some(SPICE_PW), &[]);
    let t = broker.mint_default(8).await;
    // Not SPICE at all, a huge declared size, and a flood.
    let mut huge = sp::link_message(0, sp::CHANNEL_MAIN);
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    for bytes in [b"RFB 003.008\n".to_vec(), huge, vec![0x52; 64 * 1024]] {
        let mut c = ws(&broker, &t.token).await;
        c.send(&bytes).await.unwrap();
        let (code, reason) = c.expect_close(Duration::from_secs(5)).await;
        assert_eq!(code, 1002, "{reason}");
        assert!(reason.starts_with("SPICE protocol error"), "{reason}");
    }
    // A client that says nothing is cut at the handshake timeout, and the
    // console still opens after all this.
    let (_main, _) = open_main(&broker, &t.token).await;
    broker.assert_alive();
}

/// Opens a CONNECT tunnel through the broker with `credential` as its
/// Basic proxy credential; returns the status line and, on 200, the tunnel.
async fn connect(broker: &Broker, credential: Option<&str>) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", broker.port))
        .await
        .unwrap();
    let mut req = "CONNECT vm-1:5900 HTTP/1.1\r\nHost: vm-1:5900\r\n".to_string();
    if let Some(c) = credential {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.encode(format!("vncbroker:{c}"));
        req.push_str(&format!("Proxy-Authorization: Basic {b}\r\n"));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    // The answer's head, byte by byte: nothing of the tunnel is read.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut b))
            .await
            .expect("an answer to CONNECT")
            .unwrap();
        assert!(n == 1, "closed before the answer's end: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    (head.lines().next().unwrap_or("").to_owned(), tcp)
}

/// The token of a `.vv` file's `proxy=http://<token>@host:port`.
fn vv_token(vv: &str) -> String {
    let proxy = vv
        .lines()
        .find_map(|l| l.strip_prefix("proxy="))
        .unwrap_or_else(|| panic!("no proxy= in {vv}"));
    let rest = proxy.split_once("://").unwrap().1;
    let user = rest.split_once('@').unwrap().0;
    user.strip_prefix("vncbroker:").unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_viewers_tunnel_carries_every_channel_with_the_token_as_credential() {
    let qemu = SpiceQemu::start(Some(SPICE_PW));
    let broker = Broker::start("");
    add_spice_vm(&broker, 9, qemu.port, Some(SPICE_PW), &[]);
    broker.add_vm(10, closed_port(), None);
    let vv = broker
        .api_get("/api/v1/vms/9/console.vv", USER, USER_PW)
        .await;
    assert_eq!(vv.status, 200);
    let vv = String::from_utf8(vv.body).unwrap();
    assert!(!vv.contains(SPICE_PW) && !vv.contains("password="), "{vv}");
    let token = vv_token(&vv);

    // No credential, a made-up one, and a VNC console's token.
    assert!(connect(&broker, None).await.0.contains(" 407 "));
    assert!(
        connect(&broker, Some(&unknown_token()))
            .await
            .0
            .contains(" 407 ")
    );
    let vnc = broker.mint_default(10).await;
    assert!(connect(&broker, Some(&vnc.token)).await.0.contains(" 403 "));

    // The main channel and the display, each through its own tunnel.
    let (status, mut main) = connect(&broker, Some(&token)).await;
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(
        sp::link(&mut main, 0, sp::CHANNEL_MAIN).await.unwrap(),
        Linked::Ok
    );
    let session = sp::main_init(&mut main).await.unwrap();
    sp::attach_channels(&mut main).await.unwrap();
    let (_, mut display) = connect(&broker, Some(&token)).await;
    assert_eq!(
        sp::link(&mut display, session, sp::CHANNEL_DISPLAY)
            .await
            .unwrap(),
        Linked::Ok
    );
    sp::start_display(&mut display).await.unwrap();
    let rows = broker.sessions();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].ended_at.is_none());

    // A revocation closes the tunnels too.
    assert_eq!(broker.revoke(9, USER, USER_PW).await, 1);
    for t in [&mut main, &mut display] {
        use tokio::io::AsyncReadExt;
        let mut sink = vec![0u8; 64 * 1024];
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match t.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "a tunnel outlived its revocation");
    }
    let rows = broker.ended_sessions(1).await;
    assert_eq!(rows[0].close_reason.as_deref(), Some("revoked"));
    assert!(!broker.log().contains(SPICE_PW));
    assert!(
        !broker.log().contains(&token),
        "the raw token is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_limits_end_every_channel() {
    let qemu = SpiceQemu::start(Some(SPICE_PW));
    // One console per user on this node, for 3 seconds.
    let broker = Broker::start("[proxy]\nmax_session_secs = 3\nmax_sessions_per_user = 1\n");
    add_spice_vm(&broker, 11, qemu.port, Some(SPICE_PW), &[]);
    let t = broker.mint_default(11).await;
    let (main, session) = open_main(&broker, &t.token).await;
    let mut all = vec![main];
    for kind in [sp::CHANNEL_DISPLAY, sp::CHANNEL_INPUTS, sp::CHANNEL_CURSOR] {
        let mut c = ws(&broker, &t.token).await;
        // Channels of a console are not consoles of their own.
        assert_eq!(sp::link(&mut c, session, kind).await.unwrap(), Linked::Ok);
        all.push(c);
    }
    // A second console is one too many, and a single-use link turned away
    // so is not used up.
    let once = broker.mint(11, USER, USER_PW, None, true).await;
    let mut second = ws(&broker, &once.token).await;
    assert_eq!(
        sp::link(&mut second, 0, sp::CHANNEL_MAIN).await.unwrap(),
        Linked::Refused(1)
    );
    assert_eq!(second.expect_close(Duration::from_secs(5)).await.0, 4429);
    // The console ends at its limit; its channels with it (at their own
    // limit, or as the server closes them when the main channel goes).
    let (code, reason) = all[0].expect_close(Duration::from_secs(10)).await;
    assert_eq!(code, 4411, "{reason}");
    for c in &mut all[1..] {
        let (code, reason) = c.expect_close(Duration::from_secs(3)).await;
        assert!(
            code == 4411 || reason == "the SPICE server closed the channel",
            "{code} {reason}"
        );
    }
    let rows = broker.ended_sessions(1).await;
    assert_eq!(rows[0].close_reason.as_deref(), Some("time limit"));
    let (_later, _) = open_main(&broker, &once.token).await;
}
