//! The broker under test: `vncbroker serve` as a child process on a fresh
//! database, its CLI, and the JSON API calls tests make.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use crate::http::{HttpResponse, basic_auth, http_request};
use crate::process::{clean_env, fd_count, signal, stop_child, tail};
use crate::rfb::rfb_handshake;
use crate::sqlite::{SessionRow, sqlite_session_rows};
use crate::ws::{Ws, WsOptions};
use crate::{START_TIMEOUT, STEP, poll_until};

/// The regular user every broker starts with; owns the VMs tests add.
pub const USER: &str = "alice";
pub const USER_PW: &str = "alice-Pw-Kk93vRtY";
/// The node name written into the test config (and so into session rows).
pub const NODE: &str = "itest-node";

/// The `vncbroker` binary cargo built beside the running test or tool:
/// `target/<profile>/vncbroker`, next to `target/<profile>/deps/<test>`.
pub fn bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running executable");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("vncbroker");
    assert!(
        bin.is_file(),
        "no vncbroker binary at {} (cargo build --bin vncbroker)",
        bin.display()
    );
    bin
}

/// Spawns `serve` as `cmd` says (its stderr already set up, to `log`),
/// waits up to `timeout` for its first stdout line, `listening on ADDR`,
/// and keeps draining stdout on a thread. On failure the child is stopped
/// and the error says why, with the tail of `log`.
pub fn spawn_serve(
    cmd: &mut Command,
    log: &Path,
    timeout: Duration,
) -> Result<(Child, SocketAddr), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning vncbroker serve: {e}"))?;
    let log_tail = || tail(&std::fs::read_to_string(log).unwrap_or_default()).to_owned();
    let Some(stdout) = child.stdout.take() else {
        stop_child(&mut child, Duration::from_secs(2));
        return Err("vncbroker serve has no stdout".into());
    };
    // The first line is read on a thread so it can time out; the thread
    // then keeps draining stdout, so a later line can never block it.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first);
        for _ in lines {}
    });
    let first = match rx.recv_timeout(timeout) {
        Ok(Some(Ok(line))) => line,
        other => {
            stop_child(&mut child, Duration::from_secs(2));
            return Err(format!(
                "vncbroker serve printed no first line ({other:?}); stderr:\n{}",
                log_tail()
            ));
        }
    };
    let addr = first
        .trim_end()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .filter(|a| a.port() != 0);
    match addr {
        Some(addr) => Ok((child, addr)),
        None => {
            stop_child(&mut child, Duration::from_secs(2));
            Err(format!("unexpected first stdout line {first:?}"))
        }
    }
}

/// `vm add` for VM `id` at 127.0.0.1:`port`, owned by `owner`.
pub fn vm_add_args<'a>(id: &'a str, port: &'a str, owner: &'a str) -> Vec<&'a str> {
    vec![
        "vm",
        "add",
        id,
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--owner",
        owner,
    ]
}

/// [`vm_add_args`], and the VNC password comes on stdin, to be sealed.
pub fn vm_add_password_args<'a>(id: &'a str, port: &'a str, owner: &'a str) -> Vec<&'a str> {
    let mut args = vm_add_args(id, port, owner);
    args.push("--password-stdin");
    args
}

/// Asks `port`'s JSON API for a token for `vm` as `user`, with no body,
/// and returns the answer as it is: for tests that expect a refusal.
pub async fn post_mint(port: u16, vm: i64, user: &str, pw: &str) -> HttpResponse {
    http_request(
        port,
        "POST",
        &format!("/api/v1/vms/{vm}/console-tokens"),
        &[("Authorization", basic_auth(user, pw))],
        b"",
    )
    .await
}

/// The JSON body of `r`, which must have `status`; `what` names the call.
fn json_answer(r: &HttpResponse, status: u16, what: &str) -> Value {
    assert_eq!(
        r.status,
        status,
        "{what} failed: {}",
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: the answer is not JSON: {e}"))
}

/// Runs a CLI subcommand of `bin` against `config` (if given) and `db_url`
/// (in `cwd` if given), with `stdin` as its input line; its stdout, or why it failed.
pub fn cli(
    bin: &Path,
    config: Option<&Path>,
    db_url: &str,
    cwd: Option<&Path>,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, String> {
    let mut cmd = Command::new(bin);
    clean_env(&mut cmd).args(args);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.args(["--database", db_url])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        writeln!(w, "{input}").map_err(|e| format!("writing to vncbroker {args:?}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for vncbroker {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "vncbroker {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running `vncbroker serve` on a fresh database in a temp dir.
pub struct Broker {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db_path: PathBuf,
    pub db_url: String,
    pub port: u16,
    pub log_path: PathBuf,
    child: Child,
}

/// A token as the JSON API returns it.
#[derive(Debug, Clone)]
pub struct Minted {
    pub token: String,
    pub url: String,
    pub path: String,
    pub expires_at: i64,
    pub ttl: i64,
    pub vm_id: i64,
    pub single_use: bool,
    pub view_only: bool,
}

impl Minted {
    fn from_json(v: &Value) -> Minted {
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("mint response lacks string {k}: {v}"))
                .to_owned()
        };
        let i = |k: &str| {
            v[k].as_i64()
                .unwrap_or_else(|| panic!("mint response lacks integer {k}: {v}"))
        };
        Minted {
            token: s("token"),
            url: s("url"),
            path: s("path"),
            expires_at: i("expires_at"),
            ttl: i("ttl"),
            vm_id: i("vm_id"),
            single_use: v["single_use"]
                .as_bool()
                .unwrap_or_else(|| panic!("mint response lacks single_use: {v}")),
            view_only: v["view_only"]
                .as_bool()
                .unwrap_or_else(|| panic!("mint response lacks view_only: {v}")),
        }
    }
}

impl Broker {
    /// Writes a config (plus `extra_toml`, which may hold tables such as
    /// `[proxy]`), creates the user [`USER`] and starts `serve`.
    pub fn start(extra_toml: &str) -> Broker {
        Broker::launch(extra_toml, None)
    }

    /// The same, with the server's open-files limit (soft and hard) set to
    /// `nofile` by prlimit(1).
    pub fn start_with_open_files(extra_toml: &str, nofile: u64) -> Broker {
        Broker::launch(extra_toml, Some(nofile))
    }

    fn launch(extra_toml: &str, nofile: Option<u64>) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-itest-")
            .tempdir()
            .expect("tempdir");
        let db_path = dir.path().join("vncbroker.db");
        let db_url = format!("sqlite://{}", db_path.display());
        assert!(db_url.starts_with("sqlite:///"));
        let config = dir.path().join("vncbroker.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndatabase = \"{db_url}\"\nnode_name = \"{NODE}\"\n\n{extra_toml}\n"
            ),
        )
        .expect("writing the config");

        let bin = bin();
        // Users first: the CLI creates and migrates the database.
        cli(
            &bin,
            Some(&config),
            &db_url,
            Some(dir.path()),
            &["user", "add", USER, "--password-stdin"],
            Some(USER_PW),
        )
        .unwrap_or_else(|e| panic!("{e}"));

        let log_path = dir.path().join("serve.stderr.log");
        let log = std::fs::File::create(&log_path).expect("creating the log file");
        // prlimit sets the limit and execs the server: same pid.
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        clean_env(&mut cmd)
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--database", &db_url, "--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            // Verbose logs make the secrets-in-logs checks meaningful.
            .env("RUST_LOG", "debug")
            .stderr(Stdio::from(log));
        let (child, addr) =
            spawn_serve(&mut cmd, &log_path, START_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        assert!(addr.ip().is_loopback(), "listening on {addr}");
        let port = addr.port();
        Broker {
            dir,
            config,
            db_path,
            db_url,
            port,
            log_path,
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn fd_count(&self) -> usize {
        fd_count(self.pid())
    }

    /// Panics (with the log tail) if the server has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "vncbroker exited with {status}; log:\n{}",
                tail(&self.log())
            );
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs a CLI subcommand against this broker's config and database.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> String {
        cli(
            &bin(),
            Some(&self.config),
            &self.db_url,
            Some(self.dir.path()),
            args,
            stdin,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn add_user(&self, name: &str, password: &str, admin: bool) {
        let mut args = vec!["user", "add", name];
        if admin {
            args.push("--admin");
        }
        args.push("--password-stdin");
        self.cli(&args, Some(password));
    }

    /// Registers VM `id` at 127.0.0.1:`port`, owned by [`USER`], with the
    /// VNC password stored if given.
    pub fn add_vm(&self, id: i64, port: u16, vnc_password: Option<&str>) {
        let (id_s, port_s) = (id.to_string(), port.to_string());
        let args = match vnc_password {
            Some(_) => vm_add_password_args(&id_s, &port_s, USER),
            None => vm_add_args(&id_s, &port_s, USER),
        };
        self.cli(&args, vnc_password);
    }

    /// Mints a token over the JSON API (HTTP Basic as `user`).
    pub async fn mint(
        &self,
        vm: i64,
        user: &str,
        pw: &str,
        ttl: Option<i64>,
        single_use: bool,
    ) -> Minted {
        let mut body = serde_json::Map::new();
        if let Some(ttl) = ttl {
            body.insert("ttl".into(), ttl.into());
        }
        body.insert("single_use".into(), single_use.into());
        let body = Value::Object(body).to_string();
        let r = http_request(
            self.port,
            "POST",
            &format!("/api/v1/vms/{vm}/console-tokens"),
            &[
                ("Authorization", basic_auth(user, pw)),
                ("Content-Type", "application/json".into()),
            ],
            body.as_bytes(),
        )
        .await;
        let v = json_answer(&r, 201, &format!("minting for VM {vm}"));
        let m = Minted::from_json(&v);
        assert_eq!(m.vm_id, vm);
        assert_eq!(m.single_use, single_use);
        m
    }

    /// Mints a reusable, view-only token as [`USER`].
    pub async fn mint_view_only(&self, vm: i64) -> Minted {
        let r = http_request(
            self.port,
            "POST",
            &format!("/api/v1/vms/{vm}/console-tokens"),
            &[
                ("Authorization", basic_auth(USER, USER_PW)),
                ("Content-Type", "application/json".into()),
            ],
            br#"{"view_only": true}"#,
        )
        .await;
        let m = Minted::from_json(&json_answer(&r, 201, "minting a view-only token"));
        assert!(m.view_only, "{m:?}");
        m
    }

    /// Mints a replay token for session `id` as `user` (an admin): the
    /// API's answer, `{token, url, session_id, expires_at}`.
    pub async fn replay_token(&self, id: i64, user: &str, pw: &str) -> Value {
        let r = http_request(
            self.port,
            "POST",
            &format!("/api/v1/sessions/{id}/replay-tokens"),
            &[("Authorization", basic_auth(user, pw))],
            b"",
        )
        .await;
        json_answer(&r, 201, &format!("a replay token for session {id}"))
    }

    /// A GET on the JSON API as `user`.
    pub async fn api_get(&self, path: &str, user: &str, pw: &str) -> HttpResponse {
        http_request(
            self.port,
            "GET",
            path,
            &[("Authorization", basic_auth(user, pw))],
            b"",
        )
        .await
    }

    /// Mints as [`USER`], reusable, default lifetime.
    pub async fn mint_default(&self, vm: i64) -> Minted {
        self.mint(vm, USER, USER_PW, None, false).await
    }

    /// Revokes every token of `vm` over the JSON API; returns `revoked`.
    pub async fn revoke(&self, vm: i64, user: &str, pw: &str) -> i64 {
        let r = http_request(
            self.port,
            "DELETE",
            &format!("/api/v1/vms/{vm}/console-tokens"),
            &[("Authorization", basic_auth(user, pw))],
            b"",
        )
        .await;
        let v = json_answer(&r, 200, &format!("revoking VM {vm}"));
        v["revoked"]
            .as_i64()
            .unwrap_or_else(|| panic!("no revoked count in {v}"))
    }

    /// Opens a WebSocket to `path_and_query` (e.g. `/websockify?token=...`).
    pub async fn ws(&self, path_and_query: &str) -> Ws {
        Ws::connect(self.port, path_and_query, &WsOptions::default())
            .await
            .unwrap_or_else(|e| panic!("WebSocket to {path_and_query}: {e}"))
    }

    /// Opens `/websockify?token=T` offering the `binary` subprotocol, as
    /// noVNC does.
    pub async fn ws_token(&self, token: &str) -> Ws {
        Ws::connect(
            self.port,
            &format!("/websockify?token={token}"),
            &WsOptions::binary(),
        )
        .await
        .unwrap_or_else(|e| panic!("WebSocket with a token: {e}"))
    }

    /// Mints a default token for `vm` and opens its console through the
    /// RFB handshake: a live session, for tests about what happens next.
    pub async fn open_console(&self, vm: i64) -> (Minted, Ws) {
        let t = self.mint_default(vm).await;
        let mut ws = self.ws_token(&t.token).await;
        rfb_handshake(&mut ws)
            .await
            .unwrap_or_else(|e| panic!("the RFB handshake for VM {vm}: {e}"));
        (t, ws)
    }

    /// All rows of the `sessions` table, oldest first.
    pub fn sessions(&self) -> Vec<SessionRow> {
        sqlite_session_rows(&self.db_path)
    }

    /// Waits until `count` session rows exist and all have ended.
    pub async fn ended_sessions(&self, count: usize) -> Vec<SessionRow> {
        poll_until(&format!("{count} ended session rows"), STEP, || {
            let rows = self.sessions();
            (rows.len() == count && rows.iter().all(|r| r.ended_at.is_some())).then_some(rows)
        })
        .await
    }

    /// Waits until the broker holds at most `baseline` fds again.
    pub async fn assert_fds_settle(&self, baseline: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.fd_count();
            if now <= baseline {
                return;
            }
            if Instant::now() >= deadline {
                let listing = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .map(|e| {
                                format!(
                                    "{} -> {}",
                                    e.file_name().to_string_lossy(),
                                    std::fs::read_link(e.path())
                                        .map(|p| p.display().to_string())
                                        .unwrap_or_default()
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                panic!("{what}: the broker holds {now} fds, {baseline} before:\n{listing}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "--- vncbroker stderr (tail) ---\n{}\n--- end ---",
                tail(&self.log())
            );
        }
    }
}

impl Broker {
    /// Sends `sig` (e.g. "-HUP", "-TERM") to the server process.
    pub fn signal(&self, sig: &str) {
        signal(&self.child.id().to_string(), sig);
    }

    /// Waits up to `timeout` for the server to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// A well-formed token (43 base64url characters) that was never minted.
pub fn unknown_token() -> String {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).unwrap();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}
