//! Session control enforced by the proxy, against TigerVNC's Xvnc and
//! QEMU: view-only sessions cannot act whatever the client sends, an
//! exclusive VM takes one control session, the clipboard policy holds both
//! ways, and sessions are recorded as the policy says.
//!
//! The client here is not noVNC: it sends raw RFB, as a modified page
//! would, so what the proxy enforces is tested, not what a page chooses.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use testkit::*;

const XVNC_PW: &str = "sc7Pw3Xq";
const QEMU_PW: &str = "qc4Rw8Lm";

fn key(keysym: u32, down: bool) -> Vec<u8> {
    let mut m = vec![4, u8::from(down), 0, 0];
    m.extend_from_slice(&keysym.to_be_bytes());
    m
}

/// KeyEvents typing `text` (ASCII letters and digits), then Return.
fn type_line(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for c in text.chars() {
        out.extend(key(c as u32, true));
        out.extend(key(c as u32, false));
    }
    out.extend(key(0xff0d, true));
    out.extend(key(0xff0d, false));
    out
}

fn pointer(x: u16, y: u16) -> Vec<u8> {
    let mut m = vec![5, 0];
    m.extend_from_slice(&x.to_be_bytes());
    m.extend_from_slice(&y.to_be_bytes());
    m
}

fn client_cut_text(text: &str) -> Vec<u8> {
    let mut m = vec![6, 0, 0, 0];
    m.extend_from_slice(&(text.len() as u32).to_be_bytes());
    m.extend_from_slice(text.as_bytes());
    m
}

/// The X clipboard of the Xvnc desktop, as xclip reads it.
fn x_clipboard(xvnc: &Xvnc) -> String {
    let out = Command::new("xclip")
        .args(["-display", &format!(":{}", xvnc.display)])
        .args(["-selection", "clipboard", "-o"])
        .output()
        .expect("running xclip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sets the X clipboard of the Xvnc desktop; xclip stays to serve it.
fn set_x_clipboard(xvnc: &Xvnc, text: &str) -> Child {
    use std::io::Write;
    let mut child = Command::new("xclip")
        .args(["-display", &format!(":{}", xvnc.display)])
        .args(["-selection", "clipboard", "-i", "-quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running xclip");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    drop(stdin);
    child
}

/// Reads server messages until a ServerCutText arrives (its text) or
/// `wait` passes (None). The client asks for no screen updates, so a
/// server sends nothing else here but Bell.
async fn server_cut_text(ws: &mut Ws, wait: Duration) -> Option<String> {
    let read = async {
        loop {
            let t = ws.read_exact(1).await.ok()?[0];
            match t {
                2 => continue,
                3 => {
                    let head = ws.read_exact(7).await.ok()?;
                    let len = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
                    let text = ws.read_exact(len).await.ok()?;
                    return Some(String::from_utf8_lossy(&text).into_owned());
                }
                other => panic!("unexpected server message type {other}"),
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

/// The handshake a modified client makes, with its own ClientInit shared
/// flag; returns the framebuffer size.
async fn handshake_shared(ws: &mut Ws, shared: u8) -> Result<(u16, u16), WsEnd> {
    assert_eq!(ws.read_exact(12).await?, b"RFB 003.008\n");
    ws.send(b"RFB 003.008\n").await?;
    assert_eq!(ws.read_exact(2).await?, [1, 1], "only None offered");
    ws.send(&[1]).await?;
    assert_eq!(ws.read_exact(4).await?, [0, 0, 0, 0]);
    ws.send(&[shared]).await?;
    let head = ws.read_exact(24).await?;
    let len = u32::from_be_bytes([head[20], head[21], head[22], head[23]]) as usize;
    ws.read_exact(len).await?;
    Ok((
        u16::from_be_bytes([head[0], head[1]]),
        u16::from_be_bytes([head[2], head[3]]),
    ))
}

async fn live_sessions(broker: &Broker, vm: i64) -> Vec<Value> {
    let r = broker
        .api_get(
            &format!("/api/v1/sessions?vm_id={vm}&live=true"),
            USER,
            USER_PW,
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["sessions"].as_array().cloned().unwrap_or_default()
}

async fn ended_row(broker: &Broker, id: i64) -> Value {
    poll_until(&format!("session {id} ended"), STEP, || {
        let out = broker.cli(&["sessions", "--json"], None);
        let rows: Vec<Value> = serde_json::from_str(&out).ok()?;
        rows.into_iter()
            .find(|r| r["id"] == id && !r["ended_at"].is_null())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_only_session_cannot_type_while_a_control_session_can() {
    let xvnc = Xvnc::start(XVNC_PW);
    let typewriter = Typewriter::start(&xvnc);
    let broker = Broker::start("");
    broker.add_vm(1, xvnc.port, Some(XVNC_PW));

    let control = broker.mint_default(1).await;
    let mut c = broker.ws_token(&control.token).await;
    handshake_shared(&mut c, 1).await.unwrap();
    typewriter.wait_for_window(&xvnc).await;
    // The pointer over the xterm gives it the keyboard.
    c.send(&pointer(100, 100)).await.unwrap();
    c.send(&type_line("first")).await.unwrap();
    poll_until(
        "the xterm to read what the control session types",
        STEP,
        || typewriter.typed().contains("first\n").then_some(()),
    )
    .await;

    // A modified client on a view-only link: it asks for an exclusive
    // connection (shared 0), moves the pointer, types, pastes and resizes.
    let viewer = broker.mint_view_only(1).await;
    let mut v = broker.ws_token(&viewer.token).await;
    let (w, h) = handshake_shared(&mut v, 0).await.unwrap();
    assert_eq!((w, h), (800, 600));
    v.send(&pointer(10, 10)).await.unwrap();
    v.send(&type_line("viewer")).await.unwrap();
    v.send(&client_cut_text("from-the-viewer")).await.unwrap();
    let mut resize = vec![251, 0, 0x02, 0x80, 0x01, 0xe0, 1, 0];
    resize.extend_from_slice(&[0u8; 16]);
    v.send(&resize).await.unwrap();
    // QEMU's extended key event, for a server that takes it.
    v.send(&[255, 0, 0, 1, 0, 0, 0, 0x78, 0, 0, 0, 0x2d])
        .await
        .unwrap();
    // Screen requests still pass: the viewer sees the desktop.
    v.send(&[3, 0, 0, 0, 0, 0, 0x03, 0x20, 0x02, 0x58])
        .await
        .unwrap();
    let first = v.read_exact(1).await.expect("a screen update");
    assert_eq!(first[0], 0, "FramebufferUpdate");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The control session was not disconnected by the viewer's shared 0,
    // and still types; the viewer's keys never arrived before it.
    c.send(&type_line("second")).await.unwrap();
    poll_until("the control session's second line", STEP, || {
        typewriter.typed().contains("second\n").then_some(())
    })
    .await;
    assert_eq!(typewriter.typed(), "first\nsecond\n");
    assert!(
        !x_clipboard(&xvnc).contains("from-the-viewer"),
        "the viewer's paste reached the desktop"
    );

    // Both are listed as live, one in control and one watching.
    let live = live_sessions(&broker, 1).await;
    assert_eq!(live.len(), 2, "{live:?}");
    let modes: Vec<bool> = live
        .iter()
        .map(|s| s["view_only"].as_bool().unwrap())
        .collect();
    assert!(modes.contains(&true) && modes.contains(&false), "{live:?}");
    let listing = broker.cli(&["sessions", "--live", "--vm", "1"], None);
    assert!(
        listing.contains("view") && listing.contains("control"),
        "{listing}"
    );

    v.close_normal().await;
    c.close_normal().await;
    let rows = broker.ended_sessions(2).await;
    let viewer_row = ended_row(&broker, rows[1].id).await;
    assert_eq!(viewer_row["view_only"], true);
    assert_eq!(viewer_row["key_events"], 0, "{viewer_row}");
    assert_eq!(viewer_row["pointer_events"], 0, "{viewer_row}");
    assert_eq!(viewer_row["clipboard_bytes_to_vm"], 0, "{viewer_row}");
    let control_row = ended_row(&broker, rows[0].id).await;
    assert_eq!(control_row["view_only"], false);
    assert!(
        control_row["key_events"].as_u64().unwrap() >= 24,
        "{control_row}"
    );
    assert_eq!(control_row["pointer_events"], 1, "{control_row}");
    let m = scrape(broker.port).await;
    assert!(metric(&m, "vncbroker_input_dropped_total") >= 15.0, "{m}");
    // Keystroke contents are never logged.
    assert!(!broker.log().contains("viewer\""), "typed text in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_vm_refuses_a_second_control_session_and_admits_viewers() {
    let xvnc = Xvnc::start(XVNC_PW);
    let broker = Broker::start("");
    broker.add_vm(2, xvnc.port, Some(XVNC_PW));
    broker.cli(&["vm", "set", "2", "--control", "exclusive"], None);
    let vms = broker.cli(&["vm", "list"], None);
    assert!(vms.contains("exclusive"), "{vms}");

    let (_, mut first) = broker.open_console(2).await;

    // A second control session is turned away with its own code, even from
    // the same user on the same link.
    let t = broker.mint_default(2).await;
    let mut second = broker.ws_token(&t.token).await;
    let err = rfb_handshake(&mut second)
        .await
        .expect_err("a second control session");
    match err {
        WsEnd::Closed(code, reason) => {
            assert_eq!(code, 4423, "{reason}");
            assert!(reason.contains("someone else has control"), "{reason}");
        }
        other => panic!("expected a close, got {other:?}"),
    }

    // A viewer is always let in.
    let viewer = broker.mint_view_only(2).await;
    let mut v = broker.ws_token(&viewer.token).await;
    handshake_shared(&mut v, 1).await.expect("a viewer joins");
    let live = live_sessions(&broker, 2).await;
    assert_eq!(live.len(), 2, "{live:?}");

    // Once the first leaves, control is free again.
    first.close_normal().await;
    poll_until("the first session's row to end", STEP, || {
        broker
            .sessions()
            .iter()
            .filter(|r| r.ended_at.is_none())
            .count()
            .eq(&1)
            .then_some(())
    })
    .await;
    let (_, mut third) = broker.open_console(2).await;
    third.close_normal().await;
    v.close_normal().await;
    let m = scrape(broker.port).await;
    assert_eq!(
        metric(
            &m,
            "vncbroker_sessions_failed_total{reason=\"control_taken\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_clipboard_policy_passes_or_blocks_real_cut_text_both_ways() {
    let xvnc = Xvnc::start(XVNC_PW);
    let broker = Broker::start("");
    broker.add_vm(3, xvnc.port, Some(XVNC_PW));
    for (policy, to_vm, from_vm) in [
        ("both", true, true),
        ("to-vm", true, false),
        ("from-vm", false, true),
        ("none", false, false),
    ] {
        broker.cli(&["vm", "set", "3", "--clipboard", policy], None);
        let t = broker.mint_default(3).await;
        let mut ws = broker.ws_token(&t.token).await;
        handshake_shared(&mut ws, 1).await.unwrap();

        let sent = format!("paste-into-vm-{policy}");
        ws.send(&client_cut_text(&sent)).await.unwrap();
        let arrived = async {
            for _ in 0..20 {
                if x_clipboard(&xvnc) == sent {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
        .await;
        assert_eq!(arrived, to_vm, "policy {policy}: text to the VM");

        let copied = format!("copied-in-vm-{policy}");
        let mut owner = set_x_clipboard(&xvnc, &copied);
        let got = server_cut_text(&mut ws, Duration::from_secs(3)).await;
        let _ = owner.kill();
        let _ = owner.wait();
        if from_vm {
            assert_eq!(got.as_deref(), Some(copied.as_str()), "policy {policy}");
        } else {
            assert_eq!(got, None, "policy {policy}: text from the VM");
        }
        ws.close_normal().await;
    }
    let rows = broker.ended_sessions(4).await;
    let last = ended_row(&broker, rows[3].id).await;
    assert_eq!(last["clipboard_bytes_to_vm"], 0, "{last}");
    assert_eq!(last["clipboard_bytes_from_vm"], 0, "{last}");
    let both = ended_row(&broker, rows[0].id).await;
    assert_eq!(
        both["clipboard_bytes_to_vm"],
        "paste-into-vm-both".len(),
        "{both}"
    );
    let m = scrape(broker.port).await;
    assert!(metric(&m, "vncbroker_clipboard_dropped_total{direction=\"to_vm\"}") >= 2.0);
    assert!(
        metric(
            &m,
            "vncbroker_clipboard_dropped_total{direction=\"from_vm\"}"
        ) >= 1.0
    );
}

fn recording_toml(dir: &Path, required: bool) -> String {
    format!(
        "[recording]\ndir = \"{}\"\nrequired = {required}\nowner_can_view = false\n",
        dir.display()
    )
}

/// Opens a console on `vm`, asks for the whole screen and waits for the
/// first update: a session with something on record.
async fn watch_screen(broker: &Broker, vm: i64) -> (Minted, Ws) {
    let (t, mut ws) = broker.open_console(vm).await;
    ws.send(&[3, 0, 0, 0, 0, 0, 0x02, 0x80, 0x01, 0xe0])
        .await
        .unwrap();
    let first = ws.read_exact(1).await.expect("a screen update");
    assert_eq!(first[0], 0);
    (t, ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_session_is_written_0600_downloaded_by_admins_and_replayed_by_token() {
    let qemu = Qemu::start(QEMU_PW);
    let rec_dir = tempfile::tempdir().unwrap();
    let dir = rec_dir.path().join("recordings");
    let broker = Broker::start(&recording_toml(&dir, false));
    broker.add_user("root", "rootpw", true);
    broker.add_vm(4, qemu.port, Some(QEMU_PW));
    broker.cli(&["vm", "set", "4", "--record", "yes"], None);

    let (_, mut ws) = watch_screen(&broker, 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws.close_normal().await;
    let rows = broker.ended_sessions(1).await;
    let id = rows[0].id;
    let row = ended_row(&broker, id).await;
    assert_eq!(row["recording"], true, "{row}");
    assert_eq!(row["recording_state"], "complete", "{row}");

    use std::os::unix::fs::PermissionsExt;
    let file = dir.join(format!("{id}.vncrec.zst"));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "recording file mode");
    let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "recording dir mode");

    // The owner may not download it (owner_can_view = false); an admin may.
    let path = format!("/api/v1/sessions/{id}/recording");
    let r = broker.api_get(&path, USER, USER_PW).await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let r = broker.api_get(&path, "root", "rootpw").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(&r.body[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd frame magic");

    // The exported stream is the recording decompressed: the header, then
    // what the browser received, starting with the proxy's handshake.
    let export = rec_dir.path().join("export.bin");
    broker.cli(
        &[
            "recording",
            "export",
            &id.to_string(),
            export.to_str().unwrap(),
        ],
        None,
    );
    let raw = std::fs::read(&export).unwrap();
    assert_eq!(&raw[..8], b"VNCBREC1");
    let hlen = u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]) as usize;
    let header: Value = serde_json::from_slice(&raw[12..12 + hlen]).unwrap();
    assert_eq!(header["session_id"], id);
    assert_eq!(header["vm_id"], 4);
    assert_eq!(header["user"], USER);
    let first_len = u32::from_be_bytes(raw[16 + hlen..20 + hlen].try_into().unwrap()) as usize;
    let first = &raw[20 + hlen..20 + hlen + first_len];
    assert!(first.starts_with(b"RFB 003.008\n"), "{first:?}");
    assert!(
        !raw.windows(QEMU_PW.len()).any(|w| w == QEMU_PW.as_bytes()),
        "the VNC password is in the recording"
    );

    // A replay token opens the same stream, without credentials.
    let v = broker.replay_token(id, "root", "rootpw").await;
    let token = v["token"].as_str().unwrap().to_owned();
    assert!(v["url"].as_str().unwrap().contains("/replay#token="), "{v}");
    let r = http_request(
        broker.port,
        "GET",
        "/api/v1/replay/data",
        &[("Authorization", format!("Bearer {token}"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, raw, "the replay stream is the exported one");
    let r = http_request(
        broker.port,
        "GET",
        "/api/v1/replay/data",
        &[("Authorization", format!("Bearer {token}x"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
}

/// A tmpfs of 64 KiB when this runs as root (a real full disk), else a
/// directory without write permission.
struct FullDisk {
    dir: PathBuf,
    mounted: bool,
    _parent: tempfile::TempDir,
}

impl FullDisk {
    fn new() -> FullDisk {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("full");
        std::fs::create_dir(&dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            // Fill it: a file still opens, its writes fail.
            let filler = dir.join("filler");
            let _ = std::fs::write(&filler, vec![0u8; 256 * 1024]);
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        }
        FullDisk {
            dir,
            mounted,
            _parent: parent,
        }
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_ends_a_required_recording_and_marks_an_optional_one_incomplete() {
    let qemu = Qemu::start(QEMU_PW);
    for required in [true, false] {
        let disk = FullDisk::new();
        let broker = Broker::start(&recording_toml(&disk.dir, required));
        broker.add_vm(5, qemu.port, Some(QEMU_PW));
        broker.cli(&["vm", "set", "5", "--record", "yes"], None);
        let t = broker.mint_default(5).await;
        let mut ws = broker.ws_token(&t.token).await;
        let opened = rfb_handshake(&mut ws).await;
        if required {
            // Either the file cannot be made (refused at once) or the
            // first screens do not fit (ended): 4507 either way.
            if opened.is_ok() {
                let _ = ws.send(&[3, 0, 0, 0, 0, 0, 0x02, 0x80, 0x01, 0xe0]).await;
            }
            let (code, reason) = ws.expect_close(STEP).await;
            assert_eq!(code, 4507, "{reason}");
            assert!(reason.contains("record"), "{reason}");
            let rows = broker.ended_sessions(1).await;
            let reason = rows[0].close_reason.clone().unwrap_or_default();
            assert!(reason.contains("record"), "{reason}");
        } else {
            opened.expect("an optional recording does not stop the session");
            for _ in 0..5 {
                ws.send(&[3, 0, 0, 0, 0, 0, 0x02, 0x80, 0x01, 0xe0])
                    .await
                    .unwrap();
                ws.read_exact(1).await.expect("the session goes on");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ws.close_normal().await;
            let rows = broker.ended_sessions(1).await;
            let row = ended_row(&broker, rows[0].id).await;
            assert_eq!(row["recording_state"], "incomplete", "{row}");
            assert_eq!(row["close_reason"], "client closed", "{row}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_session_rewrites_encodings_and_ends_on_messages_it_cannot_parse() {
    let xvnc = Xvnc::start(XVNC_PW);
    let broker = Broker::start("");
    broker.add_vm(6, xvnc.port, Some(XVNC_PW));
    broker.cli(&["vm", "set", "6", "--clipboard", "to-vm"], None);

    // What noVNC asks for, including encodings the proxy does not follow
    // (JPEG, the VMware cursor, ExtendedMouseButtons). TigerVNC would use
    // its VMware cursor if asked; the session surviving screen updates
    // shows the request was rewritten.
    let t = broker.mint_default(6).await;
    let mut ws = broker.ws_token(&t.token).await;
    handshake_shared(&mut ws, 1).await.unwrap();
    let encodings: [i32; 12] = [1, 7, -260, 16, 21, 5, 0, -239, 0x574d5664, -316, -223, -308];
    let mut set = vec![2, 0];
    set.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
    for e in encodings {
        set.extend_from_slice(&e.to_be_bytes());
    }
    ws.send(&set).await.unwrap();
    for incremental in [0u8, 1, 1] {
        ws.send(&[3, incremental, 0, 0, 0, 0, 0x03, 0x20, 0x02, 0x58])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Still alive: a paste goes through.
    ws.send(&client_cut_text("still-here")).await.unwrap();
    poll_until("the paste after the screen updates", STEP, || {
        (x_clipboard(&xvnc) == "still-here").then_some(())
    })
    .await;

    // A message type that does not exist ends the session with 1002.
    ws.send(&[77, 1, 2, 3]).await.unwrap();
    let (code, reason) = ws.expect_close(STEP).await;
    assert_eq!(code, 1002, "{reason}");
    assert!(reason.contains("unknown RFB message type 77"), "{reason}");
    let rows = broker.ended_sessions(1).await;
    let reason = rows[0].close_reason.clone().unwrap_or_default();
    assert!(reason.contains("client RFB error"), "{reason}");
}

/// A VNC server without authentication whose screen update is in an
/// encoding nobody asked for: the proxy must end the session rather than
/// lose track of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnc_server_that_sends_what_the_proxy_cannot_follow_is_cut_off_with_4500() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TinyServer::start(|mut s| async move {
        let _ = s.write_all(b"RFB 003.008\n").await;
        let mut buf = [0u8; 64];
        let _ = s.read_exact(&mut buf[..12]).await;
        let _ = s.write_all(&[1, 1]).await;
        let _ = s.read_exact(&mut buf[..1]).await;
        let _ = s.write_all(&[0, 0, 0, 0]).await;
        let _ = s.read_exact(&mut buf[..1]).await; // ClientInit
        let mut init = vec![
            0x02, 0x80, 0x01, 0xe0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ];
        init.extend_from_slice(&4u32.to_be_bytes());
        init.extend_from_slice(b"fake");
        let _ = s.write_all(&init).await;
        // One rectangle in encoding 21 (JPEG), which has no length field.
        let _ = s
            .write_all(&[
                0, 0, 0, 1, 0, 0, 0, 0, 0, 16, 0, 16, 0, 0, 0, 21, 0xff, 0xd8,
            ])
            .await;
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let broker = Broker::start("");
    broker.add_vm(7, server.port, None);
    broker.cli(&["vm", "set", "7", "--clipboard", "none"], None);
    let t = broker.mint_default(7).await;
    let mut ws = broker.ws_token(&t.token).await;
    handshake_shared(&mut ws, 1).await.unwrap();
    let (code, reason) = ws.expect_close(STEP).await;
    assert_eq!(code, 4500, "{reason}");
    assert!(reason.contains("encoding 21 (JPEG)"), "{reason}");
    let rows = broker.ended_sessions(1).await;
    let reason = rows[0].close_reason.clone().unwrap_or_default();
    assert!(reason.contains("server RFB error"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_session_to_a_server_that_wants_a_password_needs_it_stored() {
    let xvnc = Xvnc::start(XVNC_PW);
    let broker = Broker::start("");
    broker.add_vm(8, xvnc.port, None);
    let viewer = broker.mint_view_only(8).await;
    let mut ws = broker.ws_token(&viewer.token).await;
    let (code, reason) = ws.expect_close(STEP).await;
    assert_eq!(code, 4500, "{reason}");
    assert!(reason.contains("password"), "{reason}");
    // Without a rule to enforce, the browser's own handshake passes as ever.
    let t = broker.mint_default(8).await;
    let mut ws = broker.ws_token(&t.token).await;
    assert_eq!(ws.read_exact(12).await.unwrap(), b"RFB 003.008\n");
    ws.close_normal().await;
}
