//! A private PostgreSQL server for tests, and a fresh database per test.
//!
//! [`PgServer::start`] runs `initdb` on a new temp directory and `pg_ctl
//! start` on a free port of 127.0.0.1 (trust authentication, `fsync=off`,
//! its Unix socket in that directory). PostgreSQL refuses to run as root, so
//! as root the server runs as the `vncbroker-test` system user (created if
//! missing; `nobody` if that fails). Dropping the server stops it (`pg_ctl
//! stop -m immediate`) and removes the directory, also when a test panics. A
//! watchdog process does the same when the test process ends, which covers
//! [`shared`], the server one test binary starts once and never drops.
//!
//! With `DATABASE_URL` set, [`TestDb::create`] uses that server instead: it
//! creates its databases there if it may, or else uses the URL as it is.
//!
//! [`PgServer::start_with`] adds TLS (`ssl=on`, a certificate from a
//! [`TestPki`] made with openssl) and lines of its own at the top of
//! `pg_hba.conf`; [`PgServer::standby_of`] makes a streaming standby with
//! `pg_basebackup`, which [`PgServer::promote`] turns into a primary once
//! [`PgServer::kill_9`] has killed the old one.
//!
//! The broker's own store tests use this module too (as a dev-dependency).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use crate::net::closed_port;
use crate::net::free_port;

/// The system user the server runs as when the tests run as root.
const TEST_USER: &str = "vncbroker-test";

/// A running PostgreSQL server in its own temp directory.
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// uid and gid to run as, when running as root.
    owner: Option<(u32, u32)>,
    /// Whether `server.crt` and `server.key` in `dir` are served (ssl=on).
    tls: bool,
}

/// How [`PgServer::start_with`] sets a server up.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// A server certificate (chain) and its key, PEM: the server runs with
    /// `ssl=on` and still accepts plaintext where `pg_hba.conf` lets it.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Lines put first in `pg_hba.conf` (the rest trusts every local
    /// connection).
    pub hba: Vec<String>,
}

impl PgServer {
    /// Creates and starts a new server; panics with the reason if it cannot.
    pub fn start() -> PgServer {
        PgServer::start_with(&PgOptions::default())
    }

    /// A new server set up as `options` say.
    pub fn start_with(options: &PgOptions) -> PgServer {
        let mut server = PgServer::empty();
        if let Some((cert, key)) = &options.tls {
            server.install_tls(cert, key);
        }
        let data = server.data_dir();
        let out = server.pg(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "--no-sync".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", show(&out));
        if !options.hba.is_empty() {
            let hba = data.join("pg_hba.conf");
            let rest = std::fs::read_to_string(&hba).expect("reading pg_hba.conf");
            std::fs::write(&hba, format!("{}\n{rest}", options.hba.join("\n")))
                .expect("writing pg_hba.conf");
        }
        server.start_on_a_free_port();
        server
    }

    /// A streaming standby of `primary`, made with `pg_basebackup -R` and
    /// started on a port of its own (with TLS if the primary has it).
    pub fn standby_of(primary: &PgServer) -> PgServer {
        let mut server = PgServer::empty();
        if primary.tls {
            server.install_tls(
                &primary.dir.join("server.crt"),
                &primary.dir.join("server.key"),
            );
        }
        let data = server.data_dir();
        let port = primary.port.to_string();
        let out = server.pg(
            "pg_basebackup",
            &[
                "-h".as_ref(),
                "127.0.0.1".as_ref(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-R".as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        assert!(out.status.success(), "pg_basebackup failed: {}", show(&out));
        server.start_on_a_free_port();
        server
    }

    /// A server directory with nothing in it yet, cleaned up on drop.
    fn empty() -> PgServer {
        let bin = server_bin_dir();
        let owner = unprivileged_owner();
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-pg-")
            .tempdir()
            .expect("creating a temp dir for PostgreSQL")
            .keep();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .expect("handing the PostgreSQL dir to its user");
        }
        // From here on, Drop cleans up.
        let server = PgServer {
            dir,
            bin,
            port: 0,
            owner,
            tls: false,
        };
        server.spawn_watchdog();
        server
    }

    /// Copies the certificate and key where the server reads them, owned by
    /// its user; the key 0600, as PostgreSQL insists.
    fn install_tls(&mut self, cert: &std::path::Path, key: &std::path::Path) {
        use std::os::unix::fs::PermissionsExt;
        for (from, name, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
            let to = self.dir.join(name);
            std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                .expect("setting the mode of a TLS file");
            if let Some((uid, gid)) = self.owner {
                std::os::unix::fs::chown(&to, Some(uid), Some(gid))
                    .expect("handing a TLS file to the server's user");
            }
        }
        self.tls = true;
    }

    fn start_on_a_free_port(&mut self) {
        let mut last = String::new();
        for _ in 0..3 {
            self.port = free_port();
            match self.try_start() {
                Ok(()) => return,
                Err(e) => last = e,
            }
        }
        panic!("PostgreSQL did not start: {last}\nlog:\n{}", self.log());
    }

    /// The postmaster's pid.
    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    }

    /// Sends `signal` (e.g. `KILL`, `STOP`) to each of the postmaster's
    /// children (every backend leads a session of its own, so a process
    /// group would not reach them), then to the postmaster; false if it
    /// could not.
    fn signal_all(&self, signal: &str) -> bool {
        let Some(pid) = self.postmaster_pid() else {
            return false;
        };
        let send = |signal: &str, pid: u32| {
            Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // The postmaster is stopped first, so it forks no more children
        // while they are listed, and is signalled last: once it is dead its
        // children belong to init and can no longer be found by parent.
        if signal != "CONT" && !send("STOP", pid) {
            return false;
        }
        for child in children_of(pid) {
            send(signal, child);
        }
        send(signal, pid)
    }

    /// Stops every process of the server with SIGSTOP: a hung server, whose
    /// kernel still accepts connections that nothing ever answers.
    pub fn freeze(&self) {
        assert!(self.signal_all("STOP"), "SIGSTOP to PostgreSQL failed");
    }

    /// Kills the postmaster and every backend with SIGKILL, as a crash of
    /// its machine would, and waits until it no longer accepts connections.
    pub fn kill_9(&self) {
        let pid = self.postmaster_pid().expect("the server's postmaster.pid");
        assert!(
            self.signal_all("KILL"),
            "kill -9 of PostgreSQL ({pid}) failed"
        );
        // Dead once a zombie: its reaper is not this process.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let state = stat
                        .rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .next()?
                        .to_owned();
                    Some(state != "Z" && state != "X")
                })
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive() || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL {pid} still runs after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `pg_ctl promote`: a standby becomes a primary; waits until it is.
    pub fn promote(&self) {
        let out = self.pg_ctl(&["-w", "-t", "30", "promote"]);
        assert!(
            out.status.success(),
            "pg_ctl promote failed: {}",
            show(&out)
        );
    }

    /// A connection as the superuser over plaintext, driven in the background.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.admin_url(), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connecting to PostgreSQL: {e}\nlog:\n{}", self.log()));
        tokio::spawn(connection);
        client
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The maintenance database's URL, for creating others.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `pg_ctl stop -m <mode>` (`smart`, `fast` or `immediate`), waiting for it.
    pub fn stop(&self, mode: &str) {
        let out = self.pg_ctl(&["-m", mode, "-w", "-t", "30", "stop"]);
        assert!(out.status.success(), "pg_ctl stop failed: {}", show(&out));
    }

    /// Starts a stopped server again, on the same port.
    pub fn restart(&self) {
        if let Err(e) = self.try_start() {
            panic!("PostgreSQL did not restart: {e}\nlog:\n{}", self.log());
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn try_start(&self) -> Result<(), String> {
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            self.port,
            self.dir.display()
        );
        if self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={0}/server.crt -c ssl_key_file={0}/server.key",
                self.dir.display()
            ));
        }
        let log = self.dir.join("server.log");
        let out = self.pg_ctl(&[
            "-l",
            &log.to_string_lossy(),
            "-o",
            &options,
            "-w",
            "-t",
            "30",
            "start",
        ]);
        if out.status.success() {
            Ok(())
        } else {
            Err(show(&out))
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data_dir();
        let mut all: Vec<&std::ffi::OsStr> = vec!["-D".as_ref(), data.as_os_str()];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        self.pg("pg_ctl", &all)
    }

    /// Runs one of the server's programs as the server's user.
    fn pg(&self, program: &str, args: &[&std::ffi::OsStr]) -> Output {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args)
            .current_dir(&self.dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// A process, in its own process group so Ctrl-C spares it, that stops
    /// the server and removes its directory once this process is gone.
    fn spawn_watchdog(&self) {
        let script = r#"while [ -e "/proc/$1" ]; do sleep 0.5; done
"$2" -D "$3/data" -m immediate stop >/dev/null 2>&1
rm -rf "$3""#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("vncbroker-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(self.bin.join("pg_ctl"))
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        // Not waited for: it outlives this process on purpose.
        drop(cmd.spawn().expect("starting the PostgreSQL watchdog"));
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.data_dir().join("postmaster.pid").exists() {
            // A frozen server would never see the stop request.
            self.signal_all("CONT");
            let _ = self.pg_ctl(&["-m", "immediate", "-w", "-t", "10", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server this test binary shares between its tests, started on first
/// use. Statics are never dropped: the watchdog stops it at exit.
pub fn shared() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}

/// A database of its own for one test.
pub struct TestDb {
    pub url: String,
    pub name: String,
}

impl TestDb {
    /// A new database on `$DATABASE_URL`'s server if that is set (or that
    /// database itself, if creating one is not allowed), else on [`shared`].
    pub async fn create(prefix: &str) -> TestDb {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => match create_database(&url, prefix).await {
                Ok(db) => db,
                Err(e) => {
                    eprintln!(
                        "cannot create a test database in $DATABASE_URL ({e}); using it as is"
                    );
                    let name = url.rsplit('/').next().unwrap_or("").to_owned();
                    TestDb { url, name }
                }
            },
            _ => TestDb::on(shared(), prefix).await,
        }
    }

    /// A new database on `server`.
    pub async fn on(server: &PgServer, prefix: &str) -> TestDb {
        create_database(&server.admin_url(), prefix)
            .await
            .unwrap_or_else(|e| panic!("creating a test database: {e}\nlog:\n{}", server.log()))
    }
}

async fn create_database(admin_url: &str, prefix: &str) -> Result<TestDb, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let clean: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect::<String>()
        .to_ascii_lowercase();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!(
        "t_{clean}_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connecting to {admin_url}: {e}"))?;
    let driver = tokio::spawn(connection);
    let created = client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .map_err(|e| format!("CREATE DATABASE {name}: {e:?}"));
    drop(client);
    let _ = driver.await;
    created?;
    Ok(TestDb {
        url: with_database(admin_url, &name),
        name,
    })
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let query = tail.split_once('?').map(|(_, q)| q);
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// A CA, a server certificate it signed, and a CA that signed nothing,
/// made with openssl in a temp dir (removed on drop). The server
/// certificate names `pg.vncbroker.test` and 127.0.0.1, not `localhost`.
pub struct TestPki {
    dir: tempfile::TempDir,
}

/// The name in [`TestPki`]'s server certificate.
pub const TLS_HOST: &str = "pg.vncbroker.test";

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-pki-")
            .tempdir()
            .expect("a temp dir for certificates");
        let pki = TestPki { dir };
        for ca in ["ca", "other-ca"] {
            openssl_ec_req(
                pki.dir.path(),
                &[
                    "-x509",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=vncbroker test {ca}"),
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
        }
        openssl_ec_req(
            pki.dir.path(),
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                &format!("/CN={TLS_HOST}"),
            ],
        );
        std::fs::write(
            pki.dir.path().join("server.ext"),
            format!(
                "subjectAltName=DNS:{TLS_HOST},IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .expect("writing the certificate extensions");
        openssl(
            pki.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.pem",
            ],
        );
        pki
    }

    /// The CA that signed the server certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that signed nothing the server has.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// What [`PgOptions::tls`] takes.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("server.pem"),
            self.dir.path().join("server.key"),
        )
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

/// `openssl req` with a new unencrypted P-256 key, run in `dir`; the rest
/// of the request (`-x509`, subject, file names) comes in `args`.
pub fn openssl_ec_req(dir: &Path, args: &[&str]) {
    let mut all = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    all.extend_from_slice(args);
    openssl(dir, &all);
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running openssl (Debian: apt-get install openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        show(&out)
    );
}

/// The pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid ...; comm may hold spaces.
                    let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                    ppid.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn show(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where `pg_ctl` and `initdb` are: on PATH, else Debian's
/// /usr/lib/postgresql/<newest version>/bin. A `pg_ctl` on PATH that is a
/// symbolic link leads to its real directory, where the server's other
/// programs (`pg_basebackup`, ...) are too.
fn server_bin_dir() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    if let Some(dir) = on_path
        .into_iter()
        .find(|d| d.join("pg_ctl").is_file() && d.join("initdb").is_file())
    {
        let real = std::fs::canonicalize(dir.join("pg_ctl"))
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
            .filter(|d| d.join("initdb").is_file());
        return real.unwrap_or(dir);
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((version, bin))
        })
        .collect();
    debian.sort();
    match debian.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "the PostgreSQL tests need initdb and pg_ctl (Debian: apt-get install postgresql), \
             or DATABASE_URL naming a server to use"
        ),
    }
}

/// As root: the uid and gid of the user the server runs as. Otherwise none.
fn unprivileged_owner() -> Option<(u32, u32)> {
    static OWNER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *OWNER.get_or_init(|| {
        let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok()?;
        if uid != 0 {
            return None;
        }
        if ids(TEST_USER).is_none() {
            let _ = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(TEST_USER)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        Some(ids(TEST_USER).or_else(|| ids("nobody")).expect(
            "PostgreSQL cannot run as root, and neither user vncbroker-test nor nobody exists",
        ))
    })
}

fn ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id")
            .args([flag, user])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}
