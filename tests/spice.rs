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
            "none,id=snd0",
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
    // The display channel carries the screen.
    let (kind, _) = sp::message(&mut channels[0]).await.unwrap();
    assert!(kind > 0, "a display message");

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

    // One session row for the console; every channel's bytes land in it.
    let rows = broker.sessions();
    assert_eq!(rows.len(), 1, "{rows:?}");
    main.close_normal().await;
    // The server ends the session's other channels with its main one.
    for c in &mut channels {
        c.expect_end(Duration::from_secs(10)).await;
    }
    let rows = broker.ended_sessions(1).await;
    let (count, protocol) = channels_of(&broker, rows[0].id);
    assert_eq!((count, protocol.as_str()), (8, "spice"));
    assert!(rows[0].bytes_to_client > main.received.len() as i64);
    let mut all: Vec<&Ws> = channels.iter().collect();
    all.push(&main);
    assert_no_leak(&broker, &all);
    let metrics = scrape(broker.port).await;
    assert_eq!(
        metric(&metrics, "vncbroker_sessions_started_total{protocol=\"spice\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "vncbroker_spice_channels_total{channel=\"usbredir\",outcome=\"linked\"}"
        ),
        Some(2.0)
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
    let qemu = SpiceQemu::start(Some(SPICE_PW));
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
    add_spice_vm(&broker, 3, qemu.port, Some(SPICE_PW), &["--usb-redirect", "yes"]);
    let t = broker.mint_view_only(3).await;
    let (_main, session) = open_main(&broker, &t.token).await;
    let mut display = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut display, session, sp::CHANNEL_DISPLAY)
            .await
            .unwrap(),
        Linked::Ok
    );
    for kind in [sp::CHANNEL_INPUTS, sp::CHANNEL_USBREDIR, sp::CHANNEL_RECORD] {
        let mut c = ws(&broker, &t.token).await;
        assert_eq!(
            sp::link(&mut c, session, kind).await.unwrap(),
            Linked::Refused(sp::LINK_ERR_CHANNEL_NOT_AVAILABLE),
            "channel {kind}"
        );
        let (code, reason) = c.expect_close(Duration::from_secs(5)).await;
        assert_eq!(code, 4406);
        assert!(reason.contains("not available"), "{reason}");
    }
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
    // A server without ticketing takes any ticket: the client's passes.
    let open = SpiceQemu::start(None);
    let broker = Broker::start("");
    add_spice_vm(&broker, 6, open.port, None, &[]);
    let t = broker.mint_default(6).await;
    let (_main, session) = open_main(&broker, &t.token).await;
    let mut display = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut display, session, sp::CHANNEL_DISPLAY)
            .await
            .unwrap(),
        Linked::Ok
    );
    // A server with a password refuses the client's noise.
    let locked = SpiceQemu::start(Some(SPICE_PW));
    add_spice_vm(&broker, 7, locked.port, None, &[]);
    let t = broker.mint_default(7).await;
    let mut main = ws(&broker, &t.token).await;
    assert_eq!(
        sp::link(&mut main, 0, sp::CHANNEL_MAIN).await.unwrap(),
        Linked::Failed(sp::LINK_ERR_PERMISSION_DENIED)
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
