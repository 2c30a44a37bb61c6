//! SPICE VMs in the local registry, and the remote-viewer (`.vv`) files the
//! broker writes for them: over the JSON API and `token mint --vv`, against
//! the real binary. The file must carry no password, name the broker as its
//! proxy with a token the broker reads back, and never be written for a VNC
//! VM.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use testkit::*;

/// The broker's public address, as the file must name it.
const PUBLIC: &str = "https://console.example.test";
const SPICE_PW: &str = "spice-Pw-Zq81";

fn broker() -> Broker {
    let b = Broker::start(&format!(
        "public_url = \"{PUBLIC}\"\n\n[websockify_api]\nenabled = true\nallow = [\"127.0.0.1\"]\n"
    ));
    b.cli(
        &[
            "vm",
            "add",
            "5",
            "--host",
            "127.0.0.1",
            "--port",
            "5905",
            "--owner",
            USER,
            "--protocol",
            "spice",
            "--usb-redirect",
            "yes",
            "--password-stdin",
        ],
        Some(SPICE_PW),
    );
    b.add_vm(6, 5906, None);
    b
}

fn header<'a>(r: &'a HttpResponse, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn key<'a>(vv: &'a str, name: &str) -> Option<&'a str> {
    vv.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The token of a file's `proxy=<scheme>://<token>@host:port`.
fn proxy_token(vv: &str) -> String {
    let proxy = key(vv, "proxy").unwrap_or_else(|| panic!("no proxy= in {vv}"));
    let rest = proxy
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("{proxy}"));
    let (user, host) = rest.split_once('@').unwrap_or_else(|| panic!("{proxy}"));
    let token = user
        .strip_prefix("vncbroker:")
        .unwrap_or_else(|| panic!("{proxy}"));
    assert_eq!(host, "console.example.test:443", "{proxy}");
    token.to_owned()
}

/// What the broker's websockify lookup redeems a token to.
async fn redeem(b: &Broker, token: &str) -> (u16, Value) {
    let r = http_request(
        b.port,
        "GET",
        &format!("/api/v1/websockify/{token}"),
        &[],
        b"",
    )
    .await;
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or_default(),
    )
}

/// The status of a CONNECT to the broker with `token` as the proxy
/// credential, as remote-viewer opens its tunnels.
async fn tunnel_status(b: &Broker, token: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", b.port))
        .await
        .unwrap();
    let auth = STANDARD.encode(format!("vncbroker:{token}"));
    let req = format!(
        "CONNECT vm-5:5900 HTTP/1.1\r\nHost: vm-5:5900\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

async fn vv_file(b: &Broker, vm: i64, query: &str) -> HttpResponse {
    b.api_get(
        &format!("/api/v1/vms/{vm}/console.vv{query}"),
        USER,
        USER_PW,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spice_vms_file_has_no_password_and_its_proxy_credential_redeems() {
    let b = broker();
    let vms = b.cli(&["vm", "list"], None);
    assert!(vms.contains("PROTOCOL") && vms.contains("spice"), "{vms}");

    let r = vv_file(&b, 5, "?ttl=120").await;
    let vv = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "{vv}");
    assert_eq!(
        header(&r, "content-type"),
        Some("application/x-virt-viewer")
    );
    assert_eq!(
        header(&r, "content-disposition"),
        Some("attachment; filename=\"vm-5.vv\"")
    );
    assert_eq!(header(&r, "cache-control"), Some("no-store"));
    assert!(vv.starts_with("[virt-viewer]\n"), "{vv}");
    assert_eq!(key(&vv, "type"), Some("spice"));
    assert_eq!(key(&vv, "host"), Some("vm-5"));
    assert_eq!(key(&vv, "port"), Some("5900"));
    assert_eq!(key(&vv, "delete-this-file"), Some("1"));
    assert_eq!(key(&vv, "enable-usbredir"), Some("1"));
    assert!(
        !vv.contains("password") && !vv.contains(SPICE_PW),
        "the file holds a password: {vv}"
    );
    let token = proxy_token(&vv);
    assert_eq!(token.len(), 64, "{token}");
    assert!(
        token
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "{token}"
    );

    // remote-viewer puts the proxy URL's user and password into
    // Proxy-Authorization; the broker reads the token back.
    let auth = format!("Basic {}", STANDARD.encode(format!("vncbroker:{token}")));
    let read = vncbroker::edge::proxy_credential(auth.as_bytes()).expect("a credential");
    assert_eq!(read, token);
    // It opens the console through the broker's own tunnel (tests/spice.rs
    // links channels through it); an outside websockify gets no SPICE
    // target, which it would relay without the link proxy.
    let (status, answer) = redeem(&b, &read).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "wrong_protocol", "{answer}");
    assert!(!b.log().contains(&token), "the token is in the log");

    // A file a second time is a new token.
    let again = String::from_utf8_lossy(&vv_file(&b, 5, "").await.body).into_owned();
    assert_ne!(proxy_token(&again), token);
    assert_eq!(b.revoke(5, USER, USER_PW).await, 2);
    assert_eq!(redeem(&b, &token).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnc_vms_file_is_refused_and_bad_requests_say_why() {
    let b = broker();
    let r = vv_file(&b, 6, "").await;
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "wrong_protocol", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("VNC") && message.contains("SPICE"),
        "{message}"
    );
    // No token was minted for it.
    assert_eq!(b.revoke(6, USER, USER_PW).await, 0);

    let r = http_request(b.port, "GET", "/api/v1/vms/5/console.vv", &[], b"").await;
    assert_eq!(r.status, 401);
    assert!(header(&r, "www-authenticate").is_some());
    assert_eq!(
        b.api_get("/api/v1/vms/5/console.vv", USER, "wrong")
            .await
            .status,
        401
    );
    assert_eq!(vv_file(&b, 5, "?colour=red").await.status, 400);
    assert_eq!(vv_file(&b, 5, "?ttl=99999999").await.status, 400);
    assert_eq!(vv_file(&b, 99, "").await.status, 404);
    assert_eq!(
        b.api_get("/api/v1/vms/x/console.vv", USER, USER_PW)
            .await
            .status,
        400
    );
    assert_eq!(b.revoke(5, USER, USER_PW).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_answers_say_the_protocol_and_the_cli_writes_files() {
    let b = broker();
    for (vm, protocol) in [(5, "spice"), (6, "vnc")] {
        let r = post_mint(b.port, vm, USER, USER_PW).await;
        assert_eq!(r.status, 201);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["protocol"], protocol, "{v}");
        // Console-page tokens keep their base64url form.
        assert_eq!(v["token"].as_str().map(str::len), Some(43), "{v}");
        let cli: Value = serde_json::from_str(&b.cli(&["token", "mint", &vm.to_string()], None))
            .expect("token mint prints JSON");
        assert_eq!(cli["protocol"], protocol, "{cli}");
    }

    let vv = b.cli(&["token", "mint", "5", "--vv", "--single-use"], None);
    assert_eq!(key(&vv, "type"), Some("spice"), "{vv}");
    assert!(!vv.contains("password"), "{vv}");
    let token = proxy_token(&vv);
    assert_eq!(tunnel_status(&b, &token).await, 200);

    let path = b.dir.path().join("vm-5.vv");
    let out = b.cli(
        &["token", "mint", "5", "--vv", "-o", path.to_str().unwrap()],
        None,
    );
    assert_eq!(out, "");
    let written = std::fs::read_to_string(&path).unwrap();
    assert_eq!(tunnel_status(&b, &proxy_token(&written)).await, 200);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    // An existing file is not overwritten, and a VNC VM gets no file.
    for (vm, why) in [("5", "creating"), ("6", "VNC console")] {
        let err = testkit::broker::cli(
            &testkit::bin(),
            Some(&b.config),
            &b.db_url,
            Some(b.dir.path()),
            &["token", "mint", vm, "--vv", "-o", path.to_str().unwrap()],
            None,
        )
        .expect_err("token mint --vv must fail");
        assert!(err.contains(why), "{err}");
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), written);
}

/// A process killed when the test ends, passing or not.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        stop_child(&mut self.0, std::time::Duration::from_secs(3));
    }
}

/// Pixels of VGA text's light grey (168, 168, 168) in an XWD screenshot of
/// a 32-bit TrueColor screen: SeaBIOS's messages, when the VM's screen is
/// shown.
fn vga_text_pixels(xwd: &[u8]) -> usize {
    if xwd.len() < 100 {
        return 0;
    }
    let word =
        |i: usize| u32::from_be_bytes([xwd[i * 4], xwd[i * 4 + 1], xwd[i * 4 + 2], xwd[i * 4 + 3]]);
    let (header, width, height, bytes_per_line, colours) =
        (word(0), word(4), word(5), word(12), word(19));
    let Some(image) = xwd.get((header + colours * 12) as usize..) else {
        return 0;
    };
    if image.len() < (height * bytes_per_line) as usize || bytes_per_line < width * 4 {
        return 0;
    }
    (0..height as usize)
        .flat_map(|y| {
            let row = &image[y * bytes_per_line as usize..];
            (0..width as usize).map(move |x| &row[x * 4..x * 4 + 3])
        })
        .filter(|p| p == &[168, 168, 168])
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_viewer_shows_the_vms_screen_through_the_broker() {
    use std::process::{Command, Stdio};
    use std::time::Duration;
    let qemu = testkit::SpiceQemu::start(Some(SPICE_PW));
    let b = Broker::start("");
    b.cli(
        &[
            "vm",
            "add",
            "7",
            "--host",
            "127.0.0.1",
            "--port",
            &qemu.port.to_string(),
            "--owner",
            USER,
            "--protocol",
            "spice",
            "--password-stdin",
        ],
        Some(SPICE_PW),
    );
    let r = vv_file(&b, 7, "").await;
    assert_eq!(r.status, 200);
    // The file names the broker's configured address; this broker listens
    // on a port of its own.
    let vv: String = String::from_utf8(r.body)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("proxy=") {
            Some(p) => format!("proxy={}:{}", p.rsplit_once(':').unwrap().0, b.port),
            None if l == "delete-this-file=1" => "delete-this-file=0".into(),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!vv.contains(SPICE_PW) && !vv.contains("password"), "{vv}");
    let file = b.dir.path().join("vm-7.vv");
    std::fs::write(&file, format!("{vv}\n")).unwrap();

    // Xvfb picks a free display and says which.
    let mut xvfb = Command::new("Xvfb")
        .args([
            "-displayfd",
            "1",
            "-screen",
            "0",
            "1024x768x24",
            "-nolisten",
            "tcp",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("Xvfb (package xvfb)");
    let mut out = xvfb.stdout.take().unwrap();
    let xvfb = Reaped(xvfb);
    let display = {
        use std::io::Read;
        let mut s = String::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            s.push(byte[0] as char);
        }
        format!(":{}", s.trim())
    };
    let viewer = Reaped(
        Command::new("remote-viewer")
            .arg(&file)
            .env("DISPLAY", &display)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(b.dir.path().join("rv.log")).unwrap(),
            ))
            .spawn()
            .expect("remote-viewer (package virt-viewer)"),
    );
    // The VM's screen appears in the viewer's window.
    let shot = b.dir.path().join("screen.xwd");
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut text = 0;
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let xwd = Command::new("xwd")
            .args(["-root", "-silent", "-display", &display])
            .output()
            .expect("xwd (package x11-apps)");
        text = vga_text_pixels(&xwd.stdout);
        if text > 500 {
            std::fs::write(&shot, &xwd.stdout).unwrap();
            break;
        }
    }
    let _ = std::fs::copy(&shot, artifacts_dir().join("remote-viewer-screen.xwd"));
    assert!(
        text > 500,
        "the VM's text never showed in remote-viewer; its log: {}",
        std::fs::read_to_string(b.dir.path().join("rv.log")).unwrap_or_default()
    );
    let live = b.sessions();
    assert_eq!(live.len(), 1, "{live:?}");
    drop(viewer);
    drop(xvfb);
    let rows = b.ended_sessions(1).await;
    assert!(rows[0].bytes_to_client > 10_000, "{rows:?}");
    assert!(!b.log().contains(SPICE_PW));
}
