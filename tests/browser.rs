//! What a person sees: headless Chromium (through playwright-core) on the
//! console page (control and view-only links), on the replay page, on stock
//! noVNC's vnc.html, on the README quickstart, and on a binary installed
//! with `cargo install` and run with nothing beside it.
//!
//! Screenshots land in `<repo>/test-artifacts/`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::*;

const QEMU_PW: &str = "bPw3Nc8V";
const EXPIRED_MESSAGE: &str = "This console link is invalid or has expired. Ask for a new one.";
/// How long a page may take to reach the state it waits for.
const PAGE_TIMEOUT_MS: u64 = 45_000;

/// The quickstart's release build and the install's share
/// `target/release`: they take turns, so that neither replaces the binary
/// there while the other is about to start it.
static RELEASE_BUILD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A child in its own process group; dropping it ends the whole group
/// (node and the Chromium it launched, or the demo script and its binary).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        stop_group(&mut self.0, Duration::from_secs(5));
    }
}

/// Runs `node tests/browser/SCRIPT ARGS...` from the repository root and
/// parses the JSON line it prints.
async fn run_node(script: &str, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let child = Command::new("node")
        .arg(Path::new("tests/browser").join(script))
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .expect("spawning node");
    let mut group = Group(child);
    // The script's own waits are bounded; this only catches a hang.
    let limit = Duration::from_millis(3 * PAGE_TIMEOUT_MS) + Duration::from_secs(60);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = group.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "node {script} ran over {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = String::from_utf8_lossy(&read_file(&out_path)).into_owned();
    let err = String::from_utf8_lossy(&read_file(&err_path)).into_owned();
    assert!(
        status.success(),
        "node {script} failed ({status}):\nstdout: {out}\nstderr: {err}"
    );
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("node {script} printed no JSON:\n{out}\nstderr: {err}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn assert_png(path: &Path) {
    let data = read_file(path);
    assert!(
        data.len() > 1000 && data.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a screenshot",
        path.display()
    );
}

fn shot(name: &str) -> PathBuf {
    let p = artifacts_dir().join(name);
    let _ = std::fs::remove_file(&p);
    p
}

/// Opens `url` on the console page until it is in `state`; the page's
/// result, and where its screenshot `shot_name` went.
async fn open_console_page(url: &str, state: &str, shot_name: &str) -> (Value, PathBuf) {
    let png = shot(shot_name);
    let timeout = PAGE_TIMEOUT_MS.to_string();
    let r = run_node(
        "open_console.mjs",
        &[url, png.to_str().unwrap(), state, &timeout],
    )
    .await;
    (r, png)
}

/// Runs `script URL SCREENSHOT TIMEOUT` on a console URL; its result, and
/// where its screenshot `shot_name` went.
async fn run_page(script: &str, url: &str, shot_name: &str) -> (Value, PathBuf) {
    let png = shot(shot_name);
    let timeout = PAGE_TIMEOUT_MS.to_string();
    let r = run_node(script, &[url, png.to_str().unwrap(), &timeout]).await;
    (r, png)
}

/// Asserts the console page connected and shows something.
fn assert_console_connected(r: &Value, shot_path: &Path) {
    assert_eq!(r["state"], "connected", "page result: {r:#}");
    let status = r["status"].as_str().unwrap_or_default();
    assert!(status.starts_with("Connected"), "status {status:?}: {r:#}");
    assert!(
        r["canvas"]["w"].as_u64().unwrap_or(0) > 0 && r["canvas"]["h"].as_u64().unwrap_or(0) > 0,
        "no canvas: {r:#}"
    );
    assert_eq!(r["nonBlank"], true, "the canvas stayed black: {r:#}");
    assert_png(shot_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_shows_a_qemu_vm() {
    let qemu = Qemu::start(QEMU_PW);
    let broker = Broker::start("");
    broker.add_vm(1, qemu.port, Some(QEMU_PW));
    let t = broker.mint_default(1).await;
    assert_eq!(
        t.url,
        format!("{}/console#token={}", broker.base_url(), t.token)
    );

    let (r, png) = open_console_page(&t.url, "connected", "console-qemu.png").await;
    assert_console_connected(&r, &png);
    assert_eq!(r["status"], "Connected: QEMU", "{r:#}");
    // The page dropped the token from the address bar.
    let location = r["location"].as_str().unwrap_or_default();
    assert!(!location.contains(&t.token), "location {location}");
    assert!(!broker.log().contains(QEMU_PW));
    broker.ended_sessions(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_explains_an_expired_link() {
    let qemu = Qemu::start(QEMU_PW);
    let broker = Broker::start("");
    broker.add_vm(1, qemu.port, Some(QEMU_PW));
    let t = broker.mint(1, USER, USER_PW, Some(1), false).await;
    poll_until("the token's expiry", Duration::from_secs(10), || {
        (now_unix() > t.expires_at).then_some(())
    })
    .await;

    let (r, png) = open_console_page(&t.url, "failed", "console-expired.png").await;
    assert_eq!(r["state"], "failed", "{r:#}");
    assert_eq!(r["status"], EXPIRED_MESSAGE, "{r:#}");
    assert_png(&png);
    assert!(broker.sessions().is_empty());
}

/// `python3 -m http.server` serving a directory on 127.0.0.1.
struct StaticServer {
    _group: Group,
    port: u16,
}

impl StaticServer {
    fn start(root: &str) -> StaticServer {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .args(["--directory", root])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawning python3 -m http.server");
        let mut group = Group(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !port_open(port) {
            if let Some(st) = group.0.try_wait().unwrap() {
                panic!("http.server exited with {st}");
            }
            assert!(Instant::now() < deadline, "http.server never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        StaticServer {
            _group: group,
            port,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_novnc_connects_through_the_proxy() {
    const NOVNC: &str = "/usr/share/novnc";
    assert!(
        Path::new(NOVNC).join("vnc.html").is_file(),
        "Debian's novnc package is not installed"
    );
    let qemu = Qemu::start(QEMU_PW);
    // vnc.html is served from another origin, so the broker must allow it:
    // without that line the upgrade is refused (see the origin tests).
    let web = StaticServer::start(NOVNC);
    let broker = Broker::start(&format!(
        "[proxy]\nallowed_origins = [\"http://127.0.0.1:{}\"]\n",
        web.port
    ));
    broker.add_vm(1, qemu.port, Some(QEMU_PW));
    let t = broker.mint_default(1).await;
    assert_eq!(t.path, format!("websockify?token={}", t.token));

    // What the demo banner tells stock noVNC users to pass.
    let path = t.path.replace('?', "%3F").replace('=', "%3D");
    let url = format!(
        "http://127.0.0.1:{}/vnc.html?host=127.0.0.1&port={}&path={path}&autoconnect=true&encrypt=0",
        web.port, broker.port
    );
    let png = shot("novnc-vnc-html.png");
    let r = run_node(
        "open_novnc.mjs",
        &[&url, png.to_str().unwrap(), &PAGE_TIMEOUT_MS.to_string()],
    )
    .await;
    assert_eq!(r["connected"], true, "noVNC did not connect: {r:#}");
    let status = r["status"].as_str().unwrap_or_default();
    assert!(
        status.starts_with("Connected") && status.contains("QEMU"),
        "status {status:?}: {r:#}"
    );
    assert_eq!(r["nonBlank"], true, "the canvas stayed black: {r:#}");
    assert_png(&png);
    let rows = broker.ended_sessions(1).await;
    assert!(rows[0].bytes_to_client > 0);
}

/// The README quickstart, verbatim: `scripts/demo --listen 127.0.0.1:0`
/// from the repository root (it builds the release binary first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quickstart_opens_a_working_console() {
    let build_log = artifacts_dir().join("quickstart-demo.stderr.log");
    let build_turn = RELEASE_BUILD.lock().await;
    let mut cmd = Command::new("scripts/demo");
    clean_env(&mut cmd);
    let child = cmd
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&build_log).unwrap())
        .process_group(0)
        .spawn()
        .expect("spawning scripts/demo");
    let mut demo = Group(child);
    let stdout = demo.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Up to ten minutes for the release build, then the banner.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut printed = Vec::new();
    let url = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                printed.push(line.clone());
                if let Some(rest) = line.split("Open the console:").nth(1) {
                    break rest.trim().to_owned();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(st) = demo.0.try_wait().unwrap() {
                    panic!(
                        "scripts/demo exited with {st} before printing a console URL; stdout: {printed:?}\nstderr: {}",
                        String::from_utf8_lossy(&read_file(&build_log))
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "no console URL within 10 minutes; stdout: {printed:?}"
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                "scripts/demo closed stdout; stdout: {printed:?}\nstderr: {}",
                String::from_utf8_lossy(&read_file(&build_log))
            ),
        }
    };
    drop(build_turn);
    assert!(
        printed[0].starts_with("listening on 127.0.0.1:"),
        "first line {:?}",
        printed[0]
    );
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/console#token="),
        "console URL {url:?}"
    );

    let (r, png) = open_console_page(&url, "connected", "console-demo.png").await;
    assert_console_connected(&r, &png);
    assert!(demo.0.try_wait().unwrap().is_none(), "the demo died");
    drop(demo);
}

/// Copies what a fresh clone of the repository holds (tracked files, and new
/// ones git does not ignore; so no node_modules) to `dest`, keeping
/// modification times so that cargo can reuse an earlier build of it.
fn clean_clone(dest: &Path) {
    let _ = std::fs::remove_dir_all(dest);
    let out = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(repo_root())
        .output()
        .expect("running git ls-files");
    assert!(
        out.status.success(),
        "git ls-files: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut copied = 0;
    for rel in out.stdout.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let rel = Path::new(std::str::from_utf8(rel).expect("UTF-8 file names"));
        let src = repo_root().join(rel);
        // Deleted in the work tree but not yet in the index: not in a clone.
        let Ok(meta) = std::fs::symlink_metadata(&src) else {
            continue;
        };
        let dst = dest.join(rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        if meta.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
            continue;
        }
        std::fs::copy(&src, &dst).unwrap();
        File::options()
            .write(true)
            .open(&dst)
            .and_then(|f| f.set_modified(meta.modified()?))
            .unwrap();
        copied += 1;
    }
    assert!(copied > 50, "only {copied} files in the clone");
    // Directories too: cargo looks at them for the build script's inputs.
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut todo = vec![dest.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                todo.push(entry.path());
            }
        }
        dirs.push(dir);
    }
    for dir in dirs.iter().rev() {
        let src = repo_root().join(dir.strip_prefix(dest).unwrap());
        let modified = std::fs::metadata(&src).and_then(|m| m.modified()).unwrap();
        File::open(dir)
            .and_then(|d| d.set_modified(modified))
            .unwrap();
    }
}

/// Runs the installed binary in `cwd`, with input on stdin; returns stdout.
fn run_installed(bin: &Path, cwd: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(bin);
    clean_env(&mut cmd);
    let mut child = cmd
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the installed vncbroker");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        writeln!(input, "{text}").unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "vncbroker {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn header<'a>(r: &'a HttpResponse, name: &str) -> &'a str {
    r.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// What an operator does: `cargo install` from a clean clone (no npm, no
/// node_modules), the clone deleted, then `vncbroker serve` in an empty
/// directory with no configuration. The console page it serves opens a VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_binary_alone_serves_a_working_console() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let source = tmp.join("clean-clone");
    clean_clone(&source);
    assert!(!source.join("node_modules").exists());
    let root = tempfile::Builder::new()
        .prefix("vncbroker-install-")
        .tempdir()
        .unwrap();
    let install_log = artifacts_dir().join("cargo-install.log");
    {
        // Reuses the dependencies this target directory already built in
        // release (the quickstart builds them too).
        let _turn = RELEASE_BUILD.lock().await;
        let log = File::create(&install_log).unwrap();
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["install", "--locked", "--offline", "--path"])
            .arg(&source)
            .arg("--root")
            .arg(root.path())
            .env("CARGO_TARGET_DIR", tmp.parent().unwrap())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let status = tokio::task::spawn_blocking(move || cmd.status())
            .await
            .unwrap()
            .expect("running cargo install");
        assert!(
            status.success(),
            "cargo install failed ({status}):\n{}",
            String::from_utf8_lossy(&read_file(&install_log))
        );
    }
    // Nothing of the source tree is left for the binary to lean on.
    std::fs::remove_dir_all(&source).unwrap();
    let bin = root.path().join("bin/vncbroker");
    assert!(bin.is_file(), "cargo install left no {}", bin.display());
    // The product alone: the load tools and the test kit stay in the tree.
    let mut installed: Vec<String> = std::fs::read_dir(root.path().join("bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    installed.sort();
    assert_eq!(installed, ["vncbroker"], "cargo install installed more");

    let empty = tempfile::Builder::new()
        .prefix("vncbroker-empty-")
        .tempdir()
        .unwrap();
    let cwd = empty.path();
    let qemu = Qemu::start(QEMU_PW);
    run_installed(
        &bin,
        cwd,
        &["user", "add", USER, "--password-stdin"],
        Some(USER_PW),
    );
    let port = qemu.port.to_string();
    run_installed(
        &bin,
        cwd,
        &vm_add_password_args("1", &port, USER),
        Some(QEMU_PW),
    );

    let log_path = artifacts_dir().join("installed-serve.stderr.log");
    let mut cmd = Command::new(&bin);
    clean_env(&mut cmd);
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(cwd)
        .stderr(File::create(&log_path).unwrap())
        .process_group(0);
    let (child, addr) = spawn_serve(&mut cmd, &log_path, START_TIMEOUT)
        .unwrap_or_else(|e| panic!("the installed vncbroker serve did not start: {e}"));
    let mut serve = Group(child);
    let broker_port = addr.port();

    // The page and noVNC come from memory, with their caching.
    let get = |path: String| async move { http_request(broker_port, "GET", &path, &[], b"").await };
    let page = get("/console".into()).await;
    assert_eq!(page.status, 200);
    assert_eq!(header(&page, "cache-control"), "no-store");
    let js = String::from_utf8_lossy(&get("/static/console.js".into()).await.body).into_owned();
    let rfb_path = js
        .split('\'')
        .find(|s| s.starts_with("/novnc/") && s.ends_with("/core/rfb.js"))
        .unwrap_or_else(|| panic!("console.js imports no noVNC: {js}"))
        .to_owned();
    assert_ne!(
        rfb_path, "/novnc/core/rfb.js",
        "noVNC is imported without its version"
    );
    let rfb = get(rfb_path.clone()).await;
    assert_eq!(rfb.status, 200, "{rfb_path}");
    assert_eq!(
        header(&rfb, "content-type"),
        "text/javascript; charset=utf-8"
    );
    assert!(
        header(&rfb, "cache-control").contains("immutable"),
        "{rfb_path}"
    );
    let etag = header(&rfb, "etag").to_owned();
    let again = http_request(
        broker_port,
        "GET",
        &rfb_path,
        &[("If-None-Match", etag.clone())],
        b"",
    )
    .await;
    assert_eq!(again.status, 304, "{rfb_path} with If-None-Match {etag}");

    let r = post_mint(broker_port, 1, USER, USER_PW).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let minted: Value = serde_json::from_slice(&r.body).unwrap();
    let url = minted["url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with(&format!("http://127.0.0.1:{broker_port}/console#token=")),
        "{url}"
    );

    let (r, png) = open_console_page(&url, "connected", "console-installed.png").await;
    assert_console_connected(&r, &png);
    assert_eq!(r["status"], "Connected: QEMU", "{r:#}");
    assert!(serve.0.try_wait().unwrap().is_none(), "serve died");
    drop(serve);
    // It wrote its database and nothing else there.
    for entry in std::fs::read_dir(cwd).unwrap() {
        let entry = entry.unwrap();
        assert!(
            entry.file_type().unwrap().is_file(),
            "{:?} in the working directory",
            entry.path()
        );
    }
    let log = String::from_utf8_lossy(&read_file(&log_path)).into_owned();
    assert!(
        log.contains("console page") && log.contains("built in"),
        "{log}"
    );
}

/// Runs `console_input.mjs` on `url`: what the page offers, and what it put
/// on its WebSocket when used as a person would, then when forced.
async fn try_input(url: &str, shot_name: &str) -> (Value, PathBuf) {
    let png = shot(shot_name);
    let r = run_node(
        "console_input.mjs",
        &[url, png.to_str().unwrap(), &PAGE_TIMEOUT_MS.to_string()],
    )
    .await;
    (r, png)
}

/// The row `sessions --json` gives for session `id`, once it has ended.
async fn ended_session_json(broker: &Broker, id: i64) -> Value {
    poll_until(&format!("session {id} ended"), STEP, || {
        let out = broker.cli(&["sessions", "--json"], None);
        let rows: Vec<Value> = serde_json::from_str(&out).ok()?;
        rows.into_iter()
            .find(|r| r["id"] == id && !r["ended_at"].is_null())
    })
    .await
}

fn wire_count(r: &Value, phase: &str, what: &str) -> u64 {
    assert!(
        r[phase]["error"].is_null(),
        "the page's stream could not be followed ({phase}): {r:#}"
    );
    r[phase][what]
        .as_u64()
        .unwrap_or_else(|| panic!("no {phase}.{what}: {r:#}"))
}

/// A view-only link: the page says so and offers no Ctrl-Alt-Del, and when
/// a modified page sends keys and pointer events anyway, the broker forwards
/// none of them. A control link on the same VM, used the same way, does
/// reach the VM, so the counters are not trivially zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_only_link_shows_view_only_and_the_page_cannot_type() {
    let qemu = Qemu::start(QEMU_PW);
    let broker = Broker::start("");
    broker.add_vm(1, qemu.port, Some(QEMU_PW));

    let viewer = broker.mint_view_only(1).await;
    assert_eq!(
        viewer.url,
        format!(
            "{}/console#token={}&view_only=1",
            broker.base_url(),
            viewer.token
        )
    );
    let (r, png) = try_input(&viewer.url, "console-view-only.png").await;
    assert_console_connected(&r, &png);
    assert_eq!(r["ui"]["badgeVisible"], true, "no view-only badge: {r:#}");
    assert_eq!(r["ui"]["badgeText"], "View only", "{r:#}");
    assert_eq!(r["ui"]["cadVisible"], false, "Ctrl-Alt-Del offered: {r:#}");
    assert_eq!(r["ui"]["bodyViewOnly"], "true", "{r:#}");
    assert_eq!(r["ui"]["rfbViewOnly"], true, "{r:#}");
    assert_eq!(r["asPerson"]["version"], "RFB 003.008\n", "{r:#}");
    // The page itself sent no input...
    assert_eq!(wire_count(&r, "asPerson", "keys"), 0, "{r:#}");
    assert_eq!(wire_count(&r, "asPerson", "pointers"), 0, "{r:#}");
    // ...and forced to, it did: two sendKey presses and releases, "xyz"
    // typed, a click and moves.
    let forced_keys = wire_count(&r, "forced", "keys");
    let forced_pointers = wire_count(&r, "forced", "pointers");
    assert!(
        forced_keys >= 10,
        "the forced page sent {forced_keys} keys: {r:#}"
    );
    assert!(
        forced_pointers >= 2,
        "the forced page sent {forced_pointers} pointer events: {r:#}"
    );
    let forced_input = forced_keys
        + forced_pointers
        + wire_count(&r, "forced", "cutTexts")
        + wire_count(&r, "forced", "otherInput");

    let rows = broker.ended_sessions(1).await;
    let row = ended_session_json(&broker, rows[0].id).await;
    assert_eq!(row["view_only"], true, "{row}");
    assert_eq!(row["key_events"], 0, "{row}");
    assert_eq!(row["pointer_events"], 0, "{row}");
    assert_eq!(row["clipboard_bytes_to_vm"], 0, "{row}");
    // Every input message the page sent was dropped by the broker.
    let dropped = metric(&scrape(broker.port).await, "vncbroker_input_dropped_total");
    assert_eq!(dropped, forced_input as f64, "dropped input vs sent: {r:#}");

    // A control link: no badge, Ctrl-Alt-Del offered, and typing arrives.
    let control = broker.mint_default(1).await;
    let (r, png) = try_input(&control.url, "console-control-input.png").await;
    assert_console_connected(&r, &png);
    assert_eq!(
        r["ui"]["badgeVisible"], false,
        "view-only badge shown: {r:#}"
    );
    assert_eq!(r["ui"]["cadVisible"], true, "{r:#}");
    assert!(r["ui"]["bodyViewOnly"].is_null(), "{r:#}");
    assert_eq!(r["ui"]["rfbViewOnly"], false, "{r:#}");
    let typed_keys = wire_count(&r, "asPerson", "keys");
    assert!(
        typed_keys >= 6,
        "typing \"abc\" sent {typed_keys} keys: {r:#}"
    );
    let keys = wire_count(&r, "forced", "keys");
    let pointers = wire_count(&r, "forced", "pointers");

    let rows = broker.ended_sessions(2).await;
    let row = ended_session_json(&broker, rows[1].id).await;
    assert_eq!(row["view_only"], false, "{row}");
    assert_eq!(row["key_events"], keys, "every key the page sent: {row}");
    assert_eq!(
        row["pointer_events"], pointers,
        "every pointer event: {row}"
    );
    let dropped_after = metric(&scrape(broker.port).await, "vncbroker_input_dropped_total");
    assert_eq!(
        dropped_after, dropped,
        "the control session's input was dropped"
    );
}

/// The pixels of a comparison that differ, the fraction of the screen they
/// are, and how many of the live screen's pixels are not black.
fn differing_pixels(cmp: &Value, what: &str, r: &Value) -> (u64, f64, u64) {
    let differing = cmp["differing"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: the screens differ in size: {r:#}"));
    let total = cmp["total"].as_u64().unwrap_or(0);
    assert!(total > 0, "{what}: an empty screen: {r:#}");
    let lit = cmp["lit"].as_u64().unwrap_or(0);
    (differing, differing as f64 / total as f64, lit)
}

/// A recorded session on QEMU, watched in the console page, then replayed
/// by an admin's replay link in the replay page: at the end of the replay
/// (played through, and sought to) the screen is the one the person saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_qemu_session_replays_the_same_screen_in_chromium() {
    let qemu = Qemu::start(QEMU_PW);
    let rec_dir = tempfile::tempdir().unwrap();
    let dir = rec_dir.path().join("recordings");
    let broker = Broker::start(&format!("[recording]\ndir = \"{}\"\n", dir.display()));
    broker.add_user("root", "rootpw", true);
    broker.add_vm(4, qemu.port, Some(QEMU_PW));
    broker.cli(&["vm", "set", "4", "--record", "yes"], None);

    let t = broker.mint_default(4).await;
    let live_page = shot("replay-live-page.png");
    let live_canvas = shot("replay-live-canvas.png");
    let r = run_node(
        "console_canvas.mjs",
        &[
            &t.url,
            live_page.to_str().unwrap(),
            live_canvas.to_str().unwrap(),
            "2000",
            &PAGE_TIMEOUT_MS.to_string(),
        ],
    )
    .await;
    assert_console_connected(&r, &live_page);
    assert_eq!(r["saved"], true, "{r:#}");
    assert_png(&live_canvas);
    let (live_w, live_h) = (&r["canvas"]["w"], &r["canvas"]["h"]);

    let rows = broker.ended_sessions(1).await;
    let id = rows[0].id;
    let row = ended_session_json(&broker, id).await;
    assert_eq!(row["recording"], true, "{row}");
    assert_eq!(row["recording_state"], "complete", "{row}");

    let v = broker.replay_token(id, "root", "rootpw").await;
    let token = v["token"].as_str().unwrap();
    let url = v["url"].as_str().unwrap();
    assert_eq!(url, format!("{}/replay#token={token}", broker.base_url()));
    assert_eq!(v["session_id"], id, "{v}");

    let replay_page = shot("replay-page.png");
    let replay_canvas = shot("replay-replayed-canvas.png");
    let r = run_node(
        "replay_compare.mjs",
        &[
            url,
            live_canvas.to_str().unwrap(),
            replay_page.to_str().unwrap(),
            replay_canvas.to_str().unwrap(),
            &PAGE_TIMEOUT_MS.to_string(),
        ],
    )
    .await;
    assert_png(&replay_page);
    assert_eq!(r["state"], "ended", "the replay did not end: {r:#}");
    let states: Vec<&str> = r["states"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        states.starts_with(&["loading", "playing"]) && states.contains(&"ended"),
        "states {states:?}: {r:#}"
    );
    assert_eq!(r["status"], "End of recording", "{r:#}");
    assert_eq!(r["complete"], "complete", "{r:#}");
    // The session lasted the page's 2 s of settling at least.
    let duration = r["duration"].as_f64().unwrap_or(0.0);
    assert!(duration >= 2000.0, "a {duration} ms recording: {r:#}");
    assert!(!r["location"].as_str().unwrap_or_default().contains(token));
    assert_eq!(r["saved"], true, "{r:#}");
    assert_png(&replay_canvas);

    // Played to its end, then sought to its end: the screen of the session.
    for what in ["played", "sought"] {
        let cmp = &r[what];
        assert_eq!((&cmp["w"], &cmp["h"]), (live_w, live_h), "{what}: {r:#}");
        let (n, fraction, lit) = differing_pixels(cmp, what, &r);
        // Text on black: fewer than 1% of the pixels differ (the text
        // cursor blinks), and far fewer than the text has, so a blank or
        // shifted screen cannot pass.
        assert!(
            fraction < 0.01 && n * 10 < lit,
            "{what}: {n} pixels ({:.3}%) differ from the live screen, whose text has {lit}: {r:#}",
            fraction * 100.0
        );
    }
    assert_eq!(r["afterSeekStart"]["position"], 0, "{r:#}");
    assert_eq!(r["afterSeekEnd"]["state"], "ended", "{r:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_an_xvnc_desktop_by_keyboard_and_by_type_text() {
    let xvnc = Xvnc::start(QEMU_PW);
    let typewriter = Typewriter::start(&xvnc);
    typewriter.wait_for_window(&xvnc).await;
    let broker = Broker::start("");
    broker.add_vm(1, xvnc.port, Some(QEMU_PW));
    let t = broker.mint_default(1).await;
    let png = shot("console-type-text.png");
    // Letters, digits, capitals, punctuation, a tab, a Latin-1 letter and
    // a second line: what a pasted command looks like.
    let panel_text = "echo Typed-By-Panel 42;\tok\u{e9}\nsecond line";
    let r = run_node(
        "type_text.mjs",
        &[
            &t.url,
            png.to_str().unwrap(),
            "keyboardtyping",
            panel_text,
            &PAGE_TIMEOUT_MS.to_string(),
        ],
    )
    .await;
    assert!(r["error"].is_null(), "{r:#}");
    assert_eq!(r["state"], "connected", "{r:#}");
    assert_eq!(r["typeToggle"]["hidden"], false, "{r:#}");
    assert_eq!(r["progressState"], "done", "{r:#}");
    assert_eq!(
        r["progress"],
        format!("Typed {0} of {0} characters", panel_text.chars().count()),
        "{r:#}"
    );
    assert_eq!(r["tooLongState"], "refused", "{r:#}");
    assert!(
        r["tooLong"].as_str().unwrap().contains("at most 10000"),
        "{r:#}"
    );
    // The panel's text ends without a newline: the xterm's shell has the
    // first two lines; the last one is still in its line buffer.
    poll_until("the typed lines in the xterm", STEP, || {
        let typed = typewriter.typed();
        (typed.contains("keyboardtyping\n") && typed.contains("Typed-By-Panel")).then_some(typed)
    })
    .await;
    let typed = typewriter.typed();
    assert_eq!(
        typed, "keyboardtyping\necho Typed-By-Panel 42;\tok\u{e9}\n",
        "what the xterm read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_portal_frames_the_console_gets_its_events_and_drives_it_and_another_cannot() {
    let xvnc = Xvnc::start(QEMU_PW);
    let typewriter = Typewriter::start(&xvnc);
    typewriter.wait_for_window(&xvnc).await;
    let (portal, other) = (
        format!("http://127.0.0.1:{}", free_port()),
        format!("http://127.0.0.1:{}", free_port()),
    );
    let broker = Broker::start(&format!("[proxy]\nallowed_origins = [\"{portal}\"]\n"));
    broker.add_vm(1, xvnc.port, Some(QEMU_PW));

    let t = broker.mint_default(1).await;
    let png = shot("embed-allowed-portal.png");
    let done = std::sync::atomic::AtomicBool::new(false);
    let page = async {
        let r = run_node(
            "embed_portal.mjs",
            &[&t.url, &portal, "from the portal\n", png.to_str().unwrap()],
        )
        .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    };
    // Once the portal's clipboard text is on the desktop, copy another.
    let desktop = async {
        let mut arrived = false;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            if !arrived && xvnc.clipboard() == "portal clipboard 789" {
                arrived = true;
            }
            if arrived {
                xvnc.set_clipboard("copied in the VM");
                tokio::time::sleep(Duration::from_millis(1000)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        arrived
    };
    let (r, clipboard_arrived) = tokio::join!(page, desktop);
    assert!(r["error"].is_null(), "{r:#}");
    assert!(
        clipboard_arrived,
        "the portal's clipboard command did not reach the VM"
    );
    let copied = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "vncbroker:clipboard" && e["text"] == "copied in the VM");
    assert!(copied, "no clipboard event for the portal: {r:#}");
    assert_eq!(r["frameLoaded"], true, "{r:#}");
    let states: Vec<&str> = r["states"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(states.contains(&"connected"), "{r:#}");
    poll_until("the portal's text in the xterm", STEP, || {
        typewriter
            .typed()
            .contains("from the portal\n")
            .then_some(())
    })
    .await;

    // The same page on an origin the broker does not list: the browser
    // refuses the frame (CSP frame-ancestors), no event reaches the page
    // and its command types nothing.
    let t = broker.mint_default(1).await;
    let png = shot("embed-other-portal.png");
    let r = run_node(
        "embed_portal.mjs",
        &[
            &t.url,
            &other,
            "from elsewhere\n",
            png.to_str().unwrap(),
            "5000",
        ],
    )
    .await;
    assert!(r["error"].is_null(), "{r:#}");
    assert_eq!(r["frameLoaded"], false, "{r:#}");
    assert_eq!(r["events"], serde_json::json!([]), "{r:#}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !typewriter.typed().contains("elsewhere"),
        "a command from a portal not allowed was typed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_menu_sends_sticky_ctrl_esc_tab_and_ctrl_alt_f2() {
    let xvnc = Xvnc::start(QEMU_PW);
    let typewriter = Typewriter::start_raw(&xvnc);
    typewriter.wait_for_window(&xvnc).await;
    let broker = Broker::start("");
    broker.add_vm(1, xvnc.port, Some(QEMU_PW));
    let t = broker.mint_default(1).await;
    let (r, png) = run_page("keys_menu.mjs", &t.url, "console-keys-menu.png").await;
    assert!(r["error"].is_null(), "{r:#}");
    assert_png(&png);
    assert_eq!(r["state"], "connected", "{r:#}");
    assert_eq!(r["ctrlPressed"], "true", "{r:#}");
    assert_eq!(r["ctrlPressedAfter"], "false", "Ctrl stayed down: {r:#}");
    let menu = r["menuButtons"].to_string();
    for key in [
        "Ctrl",
        "Alt",
        "Super",
        "Esc",
        "Tab",
        "PrintScreen",
        "Ctrl-Alt-F12",
    ] {
        assert!(menu.contains(key), "{key} missing from {menu}");
    }
    // Ctrl-C, Esc, Tab, then xterm's sequence for F2 with modifiers,
    // ESC [ 1 ; m Q, where m - 1 has the bits of Ctrl (4) and Alt (2).
    // (Xvnc adds Shift to reach Alt_L in its keymap: m is 8, not 7.)
    let got = poll_until("the keys in the raw terminal", STEP, || {
        let got = typewriter.bytes();
        (got.len() >= 9).then_some(got)
    })
    .await;
    let shown = String::from_utf8_lossy(&got).into_owned();
    assert_eq!(&got[..7], b"\x03\x1b\x09\x1b[1;", "{shown:?}");
    assert_eq!(got.len(), 9, "{shown:?}");
    assert_eq!(got[8], b'Q', "F2: {shown:?}");
    let modifiers = got[7].wrapping_sub(b'0').wrapping_sub(1);
    assert_eq!(modifiers & 6, 6, "Ctrl and Alt held for F2: {shown:?}");
}

/// A broker with VM 1 on an Xvnc, reached by the page through a relay whose
/// connections the test cuts (the relay's origin is allowed).
async fn broker_behind_a_cut_relay(extra_toml: &str) -> (Xvnc, Broker, CutRelay) {
    let xvnc = Xvnc::start(QEMU_PW);
    let relay_port = free_port();
    let broker = Broker::start(&format!(
        "[proxy]\nallowed_origins = [\"http://127.0.0.1:{relay_port}\"]\n{extra_toml}"
    ));
    broker.add_vm(1, xvnc.port, Some(QEMU_PW));
    let relay = CutRelay::start_on(relay_port, broker.port).await;
    (xvnc, broker, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_comes_back_after_its_connection_is_cut_on_reusable_and_single_use_links()
{
    let (_xvnc, broker, relay) = broker_behind_a_cut_relay("max_session_secs = 3600\n").await;
    let control = format!("http://127.0.0.1:{}", relay.control_port);
    for single_use in [false, true] {
        let t = broker.mint(1, USER, USER_PW, None, single_use).await;
        let url = format!("http://127.0.0.1:{}/console#token={}", relay.port, t.token);
        let before = broker.sessions().len();
        let r = run_node(
            "reconnect.mjs",
            &[&url, &control, "cut", "", "", &PAGE_TIMEOUT_MS.to_string()],
        )
        .await;
        assert!(r["error"].is_null(), "single_use {single_use}: {r:#}");
        assert_eq!(r["back"], true, "{r:#}");
        assert!(
            r["cut"].as_u64().unwrap_or(0) >= 1,
            "nothing was cut: {r:#}"
        );
        let states = r["states"].to_string();
        assert!(states.contains("reconnecting"), "{states}");
        let down = r["statusWhileDown"].as_str().unwrap_or_default();
        assert!(
            down.contains("connection to the console was lost") || down == "Reconnecting…",
            "{down:?}"
        );
        assert_eq!(r["final"]["state"], "connected", "{r:#}");
        assert!(
            r["remaining"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Ends in"),
            "{r:#}"
        );
        // The ticket is a cookie page scripts cannot read, for single-use
        // links alone.
        assert_eq!(r["scriptSeesTicket"], false, "{r:#}");
        let cookies = r["ticketCookie"].as_array().unwrap();
        if single_use {
            assert_eq!(cookies.len(), 1, "{r:#}");
            assert_eq!(cookies[0]["httpOnly"], true, "{r:#}");
            assert_eq!(cookies[0]["secure"], true, "{r:#}");
            assert_eq!(cookies[0]["sameSite"], "Strict", "{r:#}");
            assert_eq!(cookies[0]["path"], "/websockify", "{r:#}");
        } else {
            assert!(cookies.is_empty(), "{r:#}");
        }
        // Two sessions of the same token; the single-use one continues the
        // first in its row.
        let rows: Vec<_> = broker.ended_sessions(before + 2).await[before..].to_vec();
        assert_eq!(rows[0].token_id, rows[1].token_id);
        assert_eq!(
            rows[0].close_reason.as_deref(),
            Some("client connection lost")
        );
        assert_eq!(
            rows[1].resumed_from,
            single_use.then_some(rows[0].id),
            "{rows:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_console_says_so_and_does_not_reconnect() {
    let (_xvnc, broker, relay) = broker_behind_a_cut_relay("").await;
    let control = format!("http://127.0.0.1:{}", relay.control_port);
    let revoke = format!("{}/api/v1/vms/1/console-tokens", broker.base_url());
    let cred = format!("{USER}:{USER_PW}");
    for single_use in [false, true] {
        let t = broker.mint(1, USER, USER_PW, None, single_use).await;
        let url = format!("http://127.0.0.1:{}/console#token={}", relay.port, t.token);
        let before = broker.sessions().len();
        let r = run_node(
            "reconnect.mjs",
            &[
                &url,
                &control,
                "revoke",
                &revoke,
                &cred,
                &PAGE_TIMEOUT_MS.to_string(),
            ],
        )
        .await;
        assert!(r["error"].is_null(), "{r:#}");
        assert_eq!(r["revokeStatus"], 200, "{r:#}");
        assert_eq!(r["final"]["state"], "failed", "{r:#}");
        assert_eq!(r["final"]["status"], "Console access was revoked.", "{r:#}");
        assert_eq!(r["reconnectButton"], Value::Null, "{r:#}");
        let states: Vec<&str> = r["states"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s.as_str())
            .collect();
        assert_eq!(states.last(), Some(&"failed"), "{states:?}");
        assert!(
            !states.contains(&"reconnecting"),
            "the page tried to reconnect: {states:?}"
        );
        let rows = broker.ended_sessions(before + 1).await;
        assert_eq!(rows.len(), before + 1, "a second session opened: {rows:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clipboard_panel_copies_both_ways_and_a_vm_with_the_clipboard_off_gets_nothing() {
    let xvnc = Xvnc::start(QEMU_PW);
    let broker = Broker::start("");
    broker.add_vm(1, xvnc.port, Some(QEMU_PW));
    for mode in ["both", "to-vm", "from-vm", "none"] {
        broker.cli(&["vm", "set", "1", "--clipboard", mode], None);
        xvnc.set_clipboard("before");
        let t = broker.mint_default(1).await;
        let dir = tempfile::tempdir().unwrap();
        let sent = dir.path().join("sent");
        let done = std::sync::atomic::AtomicBool::new(false);
        let page = async {
            let r = run_node(
                "clipboard.mjs",
                &[
                    &t.url,
                    dir.path().to_str().unwrap(),
                    mode,
                    &PAGE_TIMEOUT_MS.to_string(),
                ],
            )
            .await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        };
        // The desktop's side: what arrived once the page sent, then a text
        // copied on the desktop, again until the page is done.
        let desktop = async {
            let until = Instant::now() + Duration::from_millis(2 * PAGE_TIMEOUT_MS);
            while !sent.exists() && !done.load(std::sync::atomic::Ordering::SeqCst) {
                assert!(Instant::now() < until, "the page never sent");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut arrived = String::new();
            for _ in 0..40 {
                arrived = xvnc.clipboard();
                if arrived != "before" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            while !done.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                xvnc.set_clipboard("from the VM 456");
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            arrived
        };
        let (r, arrived) = tokio::join!(page, desktop);
        assert!(r["error"].is_null(), "{mode}: {r:#}");
        assert_eq!(r["state"], "connected", "{r:#}");
        assert_eq!(r["policy"], mode, "{r:#}");
        if mode == "both" {
            assert_eq!(arrived, "to the VM 123", "{r:#}");
            assert_eq!(r["shown"], "from the VM 456", "{r:#}");
            assert_eq!(r["sendDisabled"], false, "{r:#}");
        } else if mode == "to-vm" {
            assert_eq!(arrived, "to the VM 123", "{r:#}");
            assert_eq!(r["fromVm"], serde_json::json!([]), "{r:#}");
            assert_eq!(r["shown"], "to the VM 123", "the VM's text showed: {r:#}");
            assert_eq!(
                r["note"], "Copying from the VM is turned off for this console.",
                "{r:#}"
            );
        } else if mode == "from-vm" {
            assert_eq!(
                arrived, "before",
                "the broker let a blocked text reach the VM"
            );
            assert_eq!(r["shown"], "from the VM 456", "{r:#}");
            assert_eq!(r["sendDisabled"], true, "{r:#}");
            assert_eq!(
                r["note"], "Copying to the VM is turned off for this console.",
                "{r:#}"
            );
        } else {
            assert_eq!(r["policy"], "none", "{r:#}");
            assert_eq!(
                arrived, "before",
                "the broker let a blocked text reach the VM"
            );
            assert_eq!(r["fromVm"], serde_json::json!([]), "{r:#}");
            assert_eq!(r["shown"], "", "{r:#}");
            assert_eq!(r["sendDisabled"], true, "{r:#}");
            assert_eq!(
                r["note"], "The clipboard is turned off for this console.",
                "{r:#}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_menu_sends_ctrl_alt_f2_to_qemu() {
    let qemu = Qemu::start_tracing_keys(QEMU_PW);
    let broker = Broker::start("");
    broker.add_vm(1, qemu.port, Some(QEMU_PW));
    let t = broker.mint_default(1).await;
    let (r, png) = run_page("keys_menu.mjs", &t.url, "console-keys-menu-qemu.png").await;
    assert!(r["error"].is_null(), "{r:#}");
    assert_png(&png);
    // QEMU's PS/2 keyboard got F2 (qcode 63) down with Ctrl and Alt held
    // (its modifier bits 0x1 and 0x4)...
    let log = poll_until("QEMU's keyboard to get Ctrl-Alt-F2", STEP, || {
        let log = qemu.log();
        log.lines()
            .any(|l| {
                l.starts_with("ps2_keyboard_event")
                    && l.contains("qcode 63 down 1")
                    && l.contains("modifiers 0x5")
            })
            .then_some(log)
    })
    .await;
    // ...from QEMU's extended key events, which carry the scancodes
    // (Ctrl 0x1d, Alt 0x38, F2 0x3c): no keymap takes part.
    let ext: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("vnc_key_event_ext down 1"))
        .collect();
    for key in [
        "keycode 0x1d [ctrl]",
        "keycode 0x38 [alt]",
        "keycode 0x3c [f2]",
    ] {
        assert!(ext.iter().any(|l| l.contains(key)), "{key} not in {ext:#?}");
    }
    assert!(
        !log.contains("vnc_key_event_map"),
        "a key went through QEMU's keymap: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_screen_fits_shows_actual_size_resizes_the_vm_and_the_page_works_at_phone_width() {
    let xvnc = Xvnc::start(QEMU_PW);
    let typewriter = Typewriter::start(&xvnc);
    typewriter.wait_for_window(&xvnc).await;
    let broker = Broker::start("");
    broker.add_vm(1, xvnc.port, Some(QEMU_PW));
    let t = broker.mint_default(1).await;
    let (r, png) = run_page("view.mjs", &t.url, "console-page.png").await;
    assert!(r["error"].is_null(), "{r:#}");
    let size = |k: &str, i: usize, what: &str| r[k][what][i].as_u64().unwrap_or(0);
    // Fit: the 800x600 desktop scaled into a 640-wide window.
    assert_eq!(
        (size("fit", 0, "fb"), size("fit", 1, "fb")),
        (800, 600),
        "{r:#}"
    );
    assert!(size("fit", 0, "shown") < 800, "not scaled down: {r:#}");
    assert_eq!(r["fit"]["scrolls"], false, "{r:#}");
    // Actual size: one pixel each, with scrollbars; kept after a reload.
    for k in ["actual", "afterReload"] {
        assert_eq!(size(k, 0, "shown"), 800, "{k}: {r:#}");
        assert_eq!(r[k]["scrolls"], true, "{k}: {r:#}");
        assert_eq!(r[k]["mode"], "actual", "{k}: {r:#}");
    }
    // Remote resize: Xvnc's desktop took the window's width.
    let w = size("remote", 0, "fb");
    assert!(w > 0 && w <= 640, "{r:#}");
    assert_eq!(r["remoteNote"], Value::Null, "{r:#}");
    // Phone width.
    assert_eq!(r["phone"]["offscreen"], serde_json::json!([]), "{r:#}");
    assert!(
        r["phone"]["scrollWidth"].as_u64() <= r["phone"]["innerWidth"].as_u64(),
        "{r:#}"
    );
    assert!(
        r["phone"]["canvasWidth"].as_u64().unwrap_or(0) > 300,
        "{r:#}"
    );
    assert_png(&png);
}

const SPICE_PW: &str = "Sp1ceKq7Vw";

/// QEMU with SPICE and `SPICE_PW`, registered as VM 1 with the password
/// stored, tracing the key events its PS/2 keyboard gets.
fn spice_vm(broker: &Broker) -> SpiceQemu {
    let qemu = SpiceQemu::start_with(Some(SPICE_PW), &["-trace", "ps2_keyboard_event"]);
    let port = qemu.port.to_string();
    let mut args = vm_add_password_args("1", &port, USER);
    args.extend(["--protocol", "spice"]);
    broker.cli(&args, Some(SPICE_PW));
    qemu
}

/// The (QEMU key code, pressed) pairs QEMU's keyboard got, in order.
fn ps2_keys(qemu: &SpiceQemu) -> Vec<(u32, bool)> {
    qemu.log()
        .lines()
        .filter(|l| l.contains("ps2_keyboard_event"))
        .filter_map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .skip_while(|w| *w != name)
                    .nth(1)?
                    .parse::<u32>()
                    .ok()
            };
            Some((field("qcode")?, field("down")? == 1))
        })
        .collect()
}

/// Whether `seq` holds `want` in order, not necessarily together.
fn in_order(seq: &[(u32, bool)], want: &[(u32, bool)]) -> bool {
    let mut rest = seq.iter();
    want.iter().all(|w| rest.any(|s| s == w))
}

async fn open_spice_page(url: &str, mode: &str, shot_name: &str) -> (Value, PathBuf) {
    let png = shot(shot_name);
    let timeout = PAGE_TIMEOUT_MS.to_string();
    let r = run_node(
        "spice_console.mjs",
        &[url, png.to_str().unwrap(), SPICE_PW, mode, &timeout],
    )
    .await;
    assert!(r["error"].is_null(), "{r:#}");
    (r, png)
}

/// spice-html5 in Chromium shows QEMU's screen through the proxy, on every
/// channel's socket to the same URL, and the SPICE password is nowhere in
/// the page or on its sockets: the proxy puts it in the server's ticket.
/// Type text and Ctrl-Alt-Del reach the VM's keyboard, and the clipboard
/// panel says SPICE consoles have none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spice_html5_in_chromium_shows_the_vms_screen_through_the_proxy_with_no_password_in_the_page()
 {
    let broker = Broker::start("");
    let qemu = spice_vm(&broker);
    let t = broker.mint_default(1).await;

    let (r, png) = open_spice_page(&t.url, "control", "console-spice.png").await;
    assert_console_connected(&r, &png);
    assert_eq!(r["status"], "Connected", "{r:#}");
    assert_eq!(r["passwordSeenIn"], serde_json::json!([]), "{r:#}");
    assert_eq!(r["passwordGiven"], "", "{r:#}");
    // Main, display, inputs and cursor at least, each its own socket.
    assert!(r["sockets"].as_u64().unwrap_or(0) >= 4, "{r:#}");
    assert!(r["framesReceived"].as_u64().unwrap_or(0) > 10, "{r:#}");
    assert_eq!(r["stillConnected"], true, "{r:#}");
    assert_eq!(r["ui"]["badgeVisible"], false, "{r:#}");
    assert_eq!(r["ui"]["cadVisible"], true, "{r:#}");

    assert_eq!(r["typed"], "Typed 2 of 2 characters", "{r:#}");
    assert!(
        r["untypable"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Cannot type “é”"),
        "{r:#}"
    );
    assert!(
        r["clipNote"]
            .as_str()
            .unwrap_or_default()
            .contains("Clipboard not available for SPICE consoles"),
        "{r:#}"
    );
    assert_eq!(r["clipSendDisabled"], true, "{r:#}");
    // QEMU key codes: a 36, b 53, shift 1, ctrl 5, alt 3, delete 104.
    let keys = ps2_keys(&qemu);
    let typed = [
        (36, true),
        (36, false),
        (1, true),
        (53, true),
        (53, false),
        (1, false),
    ];
    assert!(in_order(&keys, &typed), "typing \"aB\": {keys:?}");
    let cad = [
        (5, true),
        (3, true),
        (104, true),
        (104, false),
        (3, false),
        (5, false),
    ];
    assert!(in_order(&keys, &cad), "Ctrl-Alt-Del: {keys:?}");

    let rows = broker.ended_sessions(1).await;
    let row = ended_session_json(&broker, rows[0].id).await;
    assert_eq!(row["protocol"], "spice", "{row}");
    assert_eq!(row["view_only"], false, "{row}");
    assert!(!broker.log().contains(SPICE_PW));
}

/// A view-only SPICE link: the page says so and offers no input, the proxy
/// refuses its inputs channel and the console carries on without it, and
/// nothing the page does reaches the VM's keyboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_only_spice_link_shows_view_only_and_the_vm_gets_no_keys() {
    let broker = Broker::start("");
    let qemu = spice_vm(&broker);
    let viewer = broker.mint_view_only(1).await;

    let (r, png) = open_spice_page(&viewer.url, "view", "console-spice-view-only.png").await;
    assert_console_connected(&r, &png);
    assert_eq!(r["passwordSeenIn"], serde_json::json!([]), "{r:#}");
    assert_eq!(r["stillConnected"], true, "{r:#}");
    assert_eq!(r["ui"]["badgeVisible"], true, "no view-only badge: {r:#}");
    assert_eq!(r["ui"]["bodyViewOnly"], "true", "{r:#}");
    for offered in ["cadVisible", "keysVisible", "typeVisible", "clipVisible"] {
        assert_eq!(r["ui"][offered], false, "{offered}: {r:#}");
    }
    // spice-html5 asked for the inputs channel; the proxy refused it.
    assert_eq!(r["inputsState"], "error", "{r:#}");
    assert!(
        broker.log().contains("SPICE channel refused"),
        "{}",
        broker.log()
    );
    assert_eq!(ps2_keys(&qemu), [], "keys reached the VM");

    let rows = broker.ended_sessions(1).await;
    let row = ended_session_json(&broker, rows[0].id).await;
    assert_eq!(row["view_only"], true, "{row}");
    assert!(!broker.log().contains(SPICE_PW));
}

/// A SPICE console says in the same words as a VNC one why it closed, and
/// comes back in the same way: on a reusable link after a cut connection
/// (every channel's), never after a revocation; an expired link and a
/// stored password the VM refuses are explained. (The proxy does not yet take reconnect tickets on a SPICE
/// main channel, so a single-use link's cut is not tried here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spice_console_comes_back_after_a_cut_and_says_why_it_was_revoked_expired_or_refused() {
    let relay_port = free_port();
    let broker = Broker::start(&format!(
        "[proxy]\nallowed_origins = [\"http://127.0.0.1:{relay_port}\"]\nmax_session_secs = 3600\n"
    ));
    let qemu = spice_vm(&broker);
    let relay = CutRelay::start_on(relay_port, broker.port).await;
    let control = format!("http://127.0.0.1:{}", relay.control_port);
    let revoke = format!("{}/api/v1/vms/1/console-tokens", broker.base_url());
    let cred = format!("{USER}:{USER_PW}");
    let timeout = PAGE_TIMEOUT_MS.to_string();

    let t = broker.mint(1, USER, USER_PW, None, false).await;
    let url = format!("http://127.0.0.1:{}/console#token={}", relay.port, t.token);
    let r = run_node("reconnect.mjs", &[&url, &control, "cut", "", "", &timeout]).await;
    assert!(r["error"].is_null(), "{r:#}");
    assert_eq!(r["session"]["protocol"], "spice", "{r:#}");
    assert_eq!(r["back"], true, "{r:#}");
    assert!(r["cut"].as_u64().unwrap_or(0) >= 2, "{r:#}");
    assert!(r["states"].to_string().contains("reconnecting"), "{r:#}");
    assert_eq!(r["final"]["state"], "connected", "{r:#}");
    assert!(
        r["remaining"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Ends in"),
        "{r:#}"
    );
    let rows = broker.ended_sessions(2).await;
    assert_eq!(rows[0].token_id, rows[1].token_id);

    for single_use in [false, true] {
        let t = broker.mint(1, USER, USER_PW, None, single_use).await;
        let url = format!("http://127.0.0.1:{}/console#token={}", relay.port, t.token);
        let before = broker.sessions().len();
        let r = run_node(
            "reconnect.mjs",
            &[&url, &control, "revoke", &revoke, &cred, &timeout],
        )
        .await;
        assert!(r["error"].is_null(), "{r:#}");
        assert_eq!(r["revokeStatus"], 200, "{r:#}");
        assert_eq!(r["final"]["state"], "failed", "{r:#}");
        assert_eq!(r["final"]["status"], "Console access was revoked.", "{r:#}");
        assert_eq!(r["reconnectButton"], Value::Null, "{r:#}");
        assert!(!r["states"].to_string().contains("reconnecting"), "{r:#}");
        let rows = broker.ended_sessions(before + 1).await;
        assert_eq!(rows.len(), before + 1, "a second session opened: {rows:?}");
    }

    let t = broker.mint(1, USER, USER_PW, Some(1), false).await;
    poll_until("the token's expiry", Duration::from_secs(10), || {
        (now_unix() > t.expires_at).then_some(())
    })
    .await;
    let (r, png) = open_console_page(&t.url, "failed", "console-spice-expired.png").await;
    assert_eq!(r["status"], EXPIRED_MESSAGE, "{r:#}");
    assert_png(&png);

    // A stored password the SPICE server refuses: the proxy's close, not
    // spice-html5's "Permission denied.", is what the page says.
    let port = qemu.port.to_string();
    let mut args = vm_add_password_args("2", &port, USER);
    args.extend(["--protocol", "spice"]);
    broker.cli(&args, Some("not-the-password"));
    let t = broker.mint_default(2).await;
    let (r, png) = open_console_page(&t.url, "failed", "console-spice-refused.png").await;
    assert_eq!(
        r["status"], "The VM console refused the connection.",
        "{r:#}"
    );
    assert_png(&png);
    assert!(
        broker
            .log()
            .contains("the SPICE server refused the stored password"),
        "{}",
        broker.log()
    );
    assert!(!broker.log().contains(SPICE_PW));
}
