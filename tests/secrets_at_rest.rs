//! Secrets on the broker's own disk: the SQLite files (argon2 hashes,
//! sealed VNC passwords, session records) are readable by the service only,
//! whatever the umask, and a lost key file is a startup error rather than a
//! new key that opens nothing.
//!
//! Every `vncbroker` here runs under `sh -c 'umask ...; exec ...'`, so the
//! umask is the child's own and the test process keeps its own.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use testkit::{
    START_TIMEOUT, USER, USER_PW, clean_env, post_mint, spawn_serve, stop_child, vm_add_args,
    vm_add_password_args,
};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_vncbroker");

/// `vncbroker ARGS` in `dir` with `umask`, fed `stdin`.
fn vncbroker(dir: &Path, umask: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = command(dir, umask, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vncbroker");
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            writeln!(input, "{s}").expect("writing stdin");
        }
    }
    // A `serve` that starts when it should not is stopped after a while
    // (and reported as still running by its exit status).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop_child(&mut child, Duration::from_secs(2));
    child.wait_with_output().expect("waiting for vncbroker")
}

fn command(dir: &Path, umask: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    clean_env(&mut cmd);
    cmd.arg("-c")
        .arg("umask \"$1\"; shift; exec \"$@\"")
        .arg("sh")
        .arg(umask)
        .arg(BIN)
        .args(args)
        .args(["--database", &db_url(dir)])
        .current_dir(dir);
    cmd
}

fn db_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("vncbroker.db").display())
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "vncbroker failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// A running `vncbroker serve` on `dir`'s database.
struct Serve {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Serve {
    fn start(dir: &Path, umask: &str) -> Serve {
        let log = dir.join("serve.log");
        let mut cmd = command(dir, umask, &["serve", "--listen", "127.0.0.1:0"]);
        cmd.stderr(std::fs::File::create(&log).expect("log file"));
        let (child, addr) = spawn_serve(&mut cmd, &log, START_TIMEOUT)
            .unwrap_or_else(|e| panic!("serve did not start: {e}"));
        Serve {
            child,
            port: addr.port(),
            log,
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "--- serve log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn add_user(dir: &Path, umask: &str) -> Output {
    vncbroker(
        dir,
        umask,
        &["user", "add", USER, "--password-stdin"],
        Some(USER_PW),
    )
}

fn add_vm_with_password(dir: &Path, umask: &str) -> Output {
    vncbroker(
        dir,
        umask,
        &vm_add_password_args("7", "5907", USER),
        Some("vnc-Pw-7"),
    )
}

#[tokio::test]
async fn the_sqlite_files_are_owner_only_whatever_the_umask() {
    for umask in ["000", "022"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ok(&add_user(d, umask));
        ok(&add_vm_with_password(d, umask));
        let serve = Serve::start(d, umask);
        // A write, so the WAL holds a token row and a session-free mint.
        let r = post_mint(serve.port, 7, USER, USER_PW).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        for name in [
            "vncbroker.db",
            "vncbroker.db-wal",
            "vncbroker.db-shm",
            "vncbroker.key",
        ] {
            let path = d.join(name);
            assert_eq!(
                mode(&path),
                0o600,
                "umask {umask}: {name} is {:o}",
                mode(&path)
            );
        }
        eprintln!("umask {umask}: database, WAL, SHM and key file are 0600");
    }
}

#[tokio::test]
async fn a_database_made_readable_earlier_is_closed_to_others_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&add_user(d, "022"));
    let db = d.join("vncbroker.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _serve = Serve::start(d, "022");
    assert_eq!(mode(&db), 0o600);
    for name in ["vncbroker.db-wal", "vncbroker.db-shm"] {
        assert_eq!(mode(&d.join(name)), 0o600, "{name}");
    }
}

#[test]
fn a_lost_key_file_is_an_error_when_the_database_holds_sealed_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&add_user(d, "077"));
    ok(&add_vm_with_password(d, "077"));
    let key = d.join("vncbroker.key");
    let original = std::fs::read(&key).expect("the key file was generated");
    std::fs::remove_file(&key).unwrap();

    // serve refuses to start, names the file and the fix, and makes no key.
    let out = vncbroker(d, "077", &["serve", "--listen", "127.0.0.1:0"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started without its key");
    assert!(
        stderr.contains(&key.display().to_string()),
        "the error names the key file: {stderr}"
    );
    assert!(
        stderr
            .to_lowercase()
            .contains("restore the file from your backup"),
        "the error says the fix: {stderr}"
    );
    assert!(!key.exists(), "a new key was generated");
    eprintln!("lost key: {}", stderr.trim());

    // So do the admin commands that seal or open passwords.
    let out = vncbroker(d, "077", &["token", "mint", "7"], None);
    assert!(!out.status.success(), "token mint worked without the key");
    let out = add_vm_with_password(d, "077");
    assert!(!out.status.success(), "vm add sealed under a new key");
    assert!(!key.exists(), "a new key was generated");

    // Restored from the backup, everything works again.
    std::fs::write(&key, &original).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let minted = ok(&vncbroker(d, "077", &["token", "mint", "7"], None));
    assert!(minted.contains("\"token\""), "{minted}");

    // A different key is refused too: it opens none of the passwords.
    std::fs::write(&key, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").unwrap();
    let out = vncbroker(d, "077", &["serve", "--listen", "127.0.0.1:0"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started with a wrong key");
    assert!(
        stderr.contains(&key.display().to_string()),
        "the error names the key file: {stderr}"
    );

    // The way out the error names when the key is lost for good: clear the
    // passwords, then set them again under the key there is now.
    std::fs::remove_file(&key).unwrap();
    ok(&vncbroker(
        d,
        "077",
        &["vm", "set", "7", "--no-password"],
        None,
    ));
    let set_again = vncbroker(
        d,
        "077",
        &["vm", "set", "7", "--password-stdin"],
        Some("vnc-Pw-7b"),
    );
    ok(&set_again);
    assert!(key.exists(), "a new key for a database with nothing sealed");
    let minted = ok(&vncbroker(d, "077", &["token", "mint", "7"], None));
    assert!(minted.contains("\"token\""), "{minted}");
}

#[test]
fn a_database_without_sealed_passwords_gets_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&add_user(d, "022"));
    ok(&vncbroker(d, "022", &vm_add_args("8", "5908", USER), None));
    let key = d.join("vncbroker.key");
    assert!(!key.exists());
    // Nothing sealed yet: the first password sealed creates the key.
    ok(&add_vm_with_password(d, "022"));
    assert!(key.exists());
    assert_eq!(mode(&key), 0o600);
}
