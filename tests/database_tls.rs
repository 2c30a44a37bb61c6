//! TLS to PostgreSQL, against private servers started with `ssl=on` and a
//! CA and server certificate made with openssl for the test.
//!
//! The servers let the role `broker` in only over TLS, with a SCRAM
//! password (`hostssl`; plaintext is rejected), so a node that works as
//! `broker` has used TLS; `pg_stat_ssl` confirms it. The password holds `/`,
//! `@` and `:`, and is given in the URL's user part, as `?password=`, and as
//! a keyword; no log line, `/metrics` answer or error message may show it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::pg::{PgOptions, PgServer, TLS_HOST, TestPki};
use testkit::{
    START_TIMEOUT, USER, USER_PW, clean_env, http_request, post_mint, spawn_serve, stop_child,
    vm_add_password_args,
};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_vncbroker");

const PW: &str = "Tls/Pass@word:9";
/// `PW` percent-encoded, as it may appear in a query string.
const PW_ENCODED: &str = "Tls%2FPass%40word%3A9";
/// Pieces of the password that must never be shown.
const PW_PIECES: &[&str] = &["Tls/Pass", "Pass@word", "word:9", "Tls%2FPass", "Pass%40"];

/// A TLS server with the `broker` role and a database it owns.
struct TlsDb {
    pki: TestPki,
    server: PgServer,
    db: &'static str,
    dir: tempfile::TempDir,
}

impl TlsDb {
    async fn start() -> TlsDb {
        let pki = TestPki::new();
        let server = PgServer::start_with(&PgOptions {
            tls: Some(pki.server()),
            hba: vec![
                "hostssl all broker 127.0.0.1/32 scram-sha-256".into(),
                "host    all broker 127.0.0.1/32 reject".into(),
            ],
        });
        let admin = server.admin().await;
        for sql in [
            format!("CREATE ROLE broker LOGIN PASSWORD '{PW}'"),
            "CREATE DATABASE vnc OWNER broker".to_owned(),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .expect("creating the broker role");
        }
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-pgtls-")
            .tempdir()
            .unwrap();
        // The shared key file, made as the README says.
        let key = dir.path().join("vncbroker.key");
        let out = Command::new("sh")
            .arg("-c")
            .arg("umask 077; openssl rand -base64 32 > \"$1\"")
            .arg("sh")
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success());
        TlsDb {
            pki,
            server,
            db: "vnc",
            dir,
        }
    }

    /// `postgres://broker:PW@HOST:PORT/vnc?QUERY`.
    fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://broker:{PW}@{host}:{}/{}?{query}",
            self.server.port(),
            self.db
        )
    }

    fn ca(&self) -> String {
        self.pki.ca().display().to_string()
    }

    /// Writes a config naming `database` and the shared key file.
    fn config(&self, database: &str) -> PathBuf {
        let path = self.dir.path().join("vncbroker.toml");
        std::fs::write(
            &path,
            format!(
                "database = {}\n[secrets]\nkey_file = {}\n",
                toml_string(database),
                toml_string(&self.dir.path().join("vncbroker.key").display().to_string())
            ),
        )
        .unwrap();
        path
    }

    /// `vncbroker ARGS` with a config naming `database`.
    fn cli(&self, database: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let config = self.config(database);
        run(self.dir.path(), &config, args, stdin)
    }

    /// Counts the `broker` connections, and those that use TLS.
    async fn broker_connections(&self) -> (i64, i64) {
        let admin = self.server.admin().await;
        let row = admin
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
                 WHERE a.usename = 'broker'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn run(dir: &Path, config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    run_with(dir, config, args, stdin, &[])
}

fn run_with(
    dir: &Path,
    config: &Path,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &Path)],
) -> Output {
    use std::io::Write;
    let mut child = clean_env(&mut Command::new(BIN))
        .envs(env.iter().copied())
        .args(args)
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vncbroker");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            writeln!(input, "{s}").unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_password(what: &str, s: &str) {
    for piece in PW_PIECES {
        assert!(
            !s.contains(piece),
            "{what} shows the password ({piece}):\n{s}"
        );
    }
}

/// A `vncbroker` command that must work.
fn ok(what: &str, out: &Output) -> String {
    assert!(out.status.success(), "{what} failed: {}", text(out));
    assert_no_password(what, &text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `vncbroker` command that must fail, quickly, saying `why`.
fn refused(what: &str, out: &Output, why: &str) -> String {
    let t = text(out);
    assert!(!out.status.success(), "{what} worked:\n{t}");
    assert!(
        t.contains(why),
        "{what}: the error does not say {why:?}:\n{t}"
    );
    assert_no_password(what, &t);
    eprintln!("{what}: {}", t.trim());
    t
}

/// A running `vncbroker serve`.
struct Serve {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Serve {
    fn start(db: &TlsDb, database: &str) -> Serve {
        let config = db.config(database);
        let log = db.dir.path().join("serve.log");
        let mut cmd = Command::new(BIN);
        clean_env(&mut cmd)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("RUST_LOG", "debug")
            .current_dir(db.dir.path())
            .stderr(std::fs::File::create(&log).unwrap());
        let (child, addr) = spawn_serve(&mut cmd, &log, START_TIMEOUT)
            .unwrap_or_else(|e| panic!("serve did not start: {e}"));
        Serve {
            child,
            port: addr.port(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

async fn mint(port: u16, vm: i64) -> u16 {
    post_mint(port, vm, USER, USER_PW).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_over_tls_and_the_password_never_shows() {
    let db = TlsDb::start().await;
    let ca = db.ca();
    let query = format!("sslmode=verify-full&sslrootcert={ca}");
    // The password in the user part (with its raw / @ :), as ?password=, and
    // as a keyword: each reaches the server, and none is ever shown.
    let forms = [
        db.url("127.0.0.1", &query),
        format!(
            "postgres://broker@127.0.0.1:{}/vnc?password={PW_ENCODED}&{query}",
            db.server.port()
        ),
        format!(
            "host=127.0.0.1 port={} user=broker password='{PW}' dbname=vnc sslmode=verify-full \
             sslrootcert='{ca}'",
            db.server.port()
        ),
    ];
    ok(
        "user add",
        &db.cli(
            &forms[0],
            &["user", "add", USER, "--password-stdin"],
            Some(USER_PW),
        ),
    );
    // A sealed VNC password, under the shared key file.
    ok(
        "vm add",
        &db.cli(
            &forms[1],
            &vm_add_password_args("7", "5907", USER),
            Some("vnc-Pw-7"),
        ),
    );
    for form in &forms {
        let serve = Serve::start(&db, form);
        assert_eq!(mint(serve.port, 7).await, 201, "{}", serve.log());
        let (all, tls) = db.broker_connections().await;
        assert!(all > 0 && tls == all, "{tls} of {all} connections use TLS");
        let metrics = http_request(serve.port, "GET", "/metrics", &[], b"").await;
        assert_eq!(metrics.status, 200);
        assert_no_password("/metrics", &String::from_utf8_lossy(&metrics.body));
        drop(serve);
        let log = std::fs::read_to_string(db.dir.path().join("serve.log")).unwrap();
        assert_no_password("the log", &log);
        let shown = format!(
            "postgres://broker:***@127.0.0.1:{}/vnc?sslmode=verify-full&sslrootcert={ca}",
            db.server.port()
        );
        assert!(
            log.contains(&shown),
            "the log names the database as {shown}:\n{log}"
        );
    }

    // A name the certificate carries, reached at a given address, works too.
    let by_name = format!(
        "postgres://broker:{PW}@{TLS_HOST}:{}/vnc?hostaddr=127.0.0.1&{query}",
        db.server.port()
    );
    ok(
        "verify-full by name",
        &db.cli(&by_name, &["user", "list"], None),
    );
    // A wrong password is refused, and not shown either.
    let wrong = db.url("127.0.0.1", &query).replace(PW, "Wrong/Pass@word:0");
    let out = db.cli(&wrong, &["user", "list"], None);
    let t = refused("a wrong password", &out, "password authentication failed");
    assert!(!t.contains("Wrong/Pass"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_a_wrong_host_name_is_refused() {
    let db = TlsDb::start().await;
    let other = db.pki.other_ca().display().to_string();
    let started = Instant::now();
    refused(
        "a wrong CA",
        &db.cli(
            &db.url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
            &["user", "list"],
            None,
        ),
        "not signed by a CA in sslrootcert",
    );
    // verify-ca and require-with-a-CA check the chain as well.
    for mode in ["verify-ca", "require"] {
        refused(
            &format!("{mode} with a wrong CA"),
            &db.cli(
                &db.url("127.0.0.1", &format!("sslmode={mode}&sslrootcert={other}")),
                &["user", "list"],
                None,
            ),
            "not signed by a CA in sslrootcert",
        );
    }
    // The certificate names pg.vncbroker.test and 127.0.0.1, not localhost.
    let ca = db.ca();
    refused(
        "verify-full with a wrong host name",
        &db.cli(
            &db.url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            &["user", "list"],
            None,
        ),
        "does not name the host",
    );
    let took = started.elapsed();
    eprintln!("four refusals took {took:?}");
    // verify-ca checks only the chain: the same host name is accepted.
    ok(
        "verify-ca with another host name",
        &db.cli(
            &db.url("localhost", &format!("sslmode=verify-ca&sslrootcert={ca}")),
            &["user", "list"],
            None,
        ),
    );
    // A CA file that is not there is named.
    refused(
        "a missing CA file",
        &db.cli(
            &db.url(
                "127.0.0.1",
                "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            ),
            &["user", "list"],
            None,
        ),
        "/nonexistent/ca.pem",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslrootcert_system_takes_the_systems_trusted_cas() {
    let db = TlsDb::start().await;
    let url = db.url("127.0.0.1", "sslmode=verify-full&sslrootcert=system");
    let config = db.config(&url);
    // The test CA is not among the system's...
    refused(
        "sslrootcert=system",
        &run(db.dir.path(), &config, &["user", "list"], None),
        "not signed by a CA in sslrootcert",
    );
    // ...unless the system's trust store is made of it (SSL_CERT_FILE).
    let ca = db.pki.ca();
    let out = run_with(
        db.dir.path(),
        &config,
        &["user", "list"],
        None,
        &[("SSL_CERT_FILE", ca.as_path())],
    );
    ok("sslrootcert=system with the CA trusted", &out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_and_prefer_means_require() {
    let db = TlsDb::start().await;
    ok(
        "user add",
        &db.cli(
            &db.url("127.0.0.1", "sslmode=require"),
            &["user", "add", USER, "--password-stdin"],
            Some(USER_PW),
        ),
    );
    for mode in ["require", "prefer"] {
        let serve = Serve::start(&db, &db.url("127.0.0.1", &format!("sslmode={mode}")));
        assert_eq!(
            mint(serve.port, 1).await,
            404,
            "the API answers (no VM 1): {}",
            serve.log()
        );
        let (all, tls) = db.broker_connections().await;
        assert!(all > 0 && tls == all, "{mode}: {tls} of {all} use TLS");
        let log = serve.log();
        assert!(
            log.contains("sslmode=require without sslrootcert"),
            "{mode}: no warning that the server is not checked:\n{log}"
        );
        assert!(
            log.contains("?sslmode=require"),
            "{mode}: shown as require:\n{log}"
        );
    }
    // Without sslmode, a database on this machine is reached in plaintext:
    // as `broker`, whom the server lets in over TLS only, that is refused.
    refused(
        "no sslmode on loopback",
        &db.cli(
            &db.url("127.0.0.1", "connect_timeout=2"),
            &["user", "list"],
            None,
        ),
        "no encryption",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_plaintext_only_server_is_refused() {
    let server = testkit::pg::shared();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vncbroker.toml");
    for mode in ["require", "prefer"] {
        let url = format!(
            "postgres://postgres:{PW}@127.0.0.1:{}/postgres?sslmode={mode}",
            server.port()
        );
        std::fs::write(&config, format!("database = {}\n", toml_string(&url))).unwrap();
        refused(
            &format!("sslmode={mode} to a plaintext server"),
            &run(dir.path(), &config, &["user", "list"], None),
            "does not accept TLS",
        );
    }
}

#[test]
fn a_database_on_another_host_needs_its_ca_by_default() {
    // Refused before any connection is tried: no traffic leaves the machine.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vncbroker.toml");
    let url = format!("postgres://broker:{PW}@db.example/vnc");
    std::fs::write(&config, format!("database = {}\n", toml_string(&url))).unwrap();
    let out = run(dir.path(), &config, &["user", "list"], None);
    let t = refused("no sslmode for db.example", &out, "sslmode=verify-full");
    assert!(t.contains("sslrootcert"), "{t}");
    for mode in ["allow", "sometimes"] {
        let url = format!("postgres://broker:{PW}@db.example/vnc?sslmode={mode}");
        std::fs::write(&config, format!("database = {}\n", toml_string(&url))).unwrap();
        refused(
            &format!("sslmode={mode}"),
            &run(dir.path(), &config, &["user", "list"], None),
            "sslmode",
        );
    }
}
