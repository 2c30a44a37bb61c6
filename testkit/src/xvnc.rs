//! TigerVNC's Xvnc as a real VNC server.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::START_TIMEOUT;
use crate::net::{free_port, port_open};
use crate::process::stop_child;

/// TigerVNC's Xvnc on 127.0.0.1 with an 800x600 screen.
pub struct Xvnc {
    child: Child,
    pub port: u16,
    pub display: u32,
    _dir: tempfile::TempDir,
    pub log_path: PathBuf,
}

static NEXT_DISPLAY: AtomicU32 = AtomicU32::new(0);

impl Xvnc {
    /// With VNC authentication and this password.
    pub fn start(password: &str) -> Xvnc {
        Xvnc::start_with(Some(password))
    }

    /// Without authentication (`-SecurityTypes None`).
    pub fn start_no_auth() -> Xvnc {
        Xvnc::start_with(None)
    }

    fn start_with(password: Option<&str>) -> Xvnc {
        let mut last_err = String::new();
        for _ in 0..8 {
            match Xvnc::try_start(password) {
                Ok(x) => return x,
                Err(e) => last_err = e,
            }
        }
        panic!("Xvnc did not start: {last_err}");
    }

    fn next_display() -> u32 {
        // Spread test binaries apart by pid; skip displays in use.
        let base = 100 + (std::process::id() % 100) * 20;
        loop {
            let d = base + NEXT_DISPLAY.fetch_add(1, Ordering::Relaxed) % 2000;
            let lock = format!("/tmp/.X{d}-lock");
            let sock = format!("/tmp/.X11-unix/X{d}");
            if !Path::new(&lock).exists() && !Path::new(&sock).exists() {
                return d;
            }
        }
    }

    fn try_start(password: Option<&str>) -> Result<Xvnc, String> {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-xvnc-")
            .tempdir()
            .unwrap();
        let log_path = dir.path().join("xvnc.log");
        let mut security = vec!["-SecurityTypes".to_string()];
        if let Some(pw) = password {
            let pw_file = dir.path().join("passwd");
            let out = Command::new("vncpasswd")
                .arg("-f")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    writeln!(c.stdin.take().unwrap(), "{pw}")?;
                    c.wait_with_output()
                })
                .map_err(|e| format!("vncpasswd -f: {e}"))?;
            if !out.status.success() || out.stdout.is_empty() {
                return Err(format!(
                    "vncpasswd -f failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            std::fs::write(&pw_file, &out.stdout).unwrap();
            security.push("VncAuth".into());
            security.push("-PasswordFile".into());
            security.push(pw_file.display().to_string());
        } else {
            security.push("None".into());
        }
        let display = Xvnc::next_display();
        let port = free_port();
        let mut child = Command::new("Xvnc")
            .arg(format!(":{display}"))
            .args(["-rfbport", &port.to_string()])
            .args(&security)
            .args([
                "-nolisten",
                "tcp",
                "-interface",
                "127.0.0.1",
                "-geometry",
                "800x600",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&log_path).unwrap()))
            .spawn()
            .map_err(|e| format!("spawning Xvnc: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        while !port_open(port) {
            let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("Xvnc :{display} exited with {st}: {}", log()));
            }
            if Instant::now() > deadline {
                stop_child(&mut child, Duration::from_secs(3));
                return Err(format!(
                    "Xvnc :{display} never accepted on {port}: {}",
                    log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Xvnc {
            child,
            port,
            display,
            _dir: dir,
            log_path,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// How many connections Xvnc has accepted so far (from its log).
    pub fn accepted(&self) -> usize {
        self.log().matches("Connections: accepted:").count()
    }

    /// The desktop's CLIPBOARD selection (xclip), empty if none.
    pub fn clipboard(&self) -> String {
        Command::new("xclip")
            .args(["-display", &format!(":{}", self.display)])
            .args(["-o", "-selection", "clipboard"])
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Puts `text` on the desktop's CLIPBOARD selection, as an application
    /// copying it would (xclip keeps it until another owner takes it).
    pub fn set_clipboard(&self, text: &str) {
        let mut child = Command::new("xclip")
            .args(["-display", &format!(":{}", self.display)])
            .args(["-i", "-selection", "clipboard"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting xclip");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(text.as_bytes());
        }
        let _ = child.wait();
    }
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
        let _ = std::fs::remove_file(format!("/tmp/.X{}-lock", self.display));
        let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{}", self.display));
    }
}

/// An xterm on the Xvnc desktop whose shell writes every line it reads to
/// a file: what reaches the desktop's keyboard ends up there.
pub struct Typewriter {
    child: Child,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Typewriter {
    pub fn start(xvnc: &Xvnc) -> Typewriter {
        Typewriter::with_tty(xvnc, "")
    }

    /// With the terminal raw: every byte a key makes (Ctrl-C, Esc, the
    /// escape sequences of function keys) reaches the file at once.
    pub fn start_raw(xvnc: &Xvnc) -> Typewriter {
        Typewriter::with_tty(xvnc, "stty raw -echo; ")
    }

    fn with_tty(xvnc: &Xvnc, stty: &str) -> Typewriter {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("typed.txt");
        let child = Command::new("xterm")
            .args(["-display", &format!(":{}", xvnc.display)])
            .args(["-geometry", "120x44+0+0", "-e", "sh", "-c"])
            .arg(format!("{stty}exec cat > '{}'", out.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting xterm");
        Typewriter {
            child,
            out,
            _dir: dir,
        }
    }

    /// Waits until the xterm's window is on the desktop.
    pub async fn wait_for_window(&self, xvnc: &Xvnc) {
        let display = format!(":{}", xvnc.display);
        crate::poll_until("the xterm window", crate::STEP, || {
            let out = Command::new("xwininfo")
                .args(["-display", &display, "-root", "-tree"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("XTerm")
                .then_some(())
        })
        .await;
        // Its shell has started once the output file exists.
        crate::poll_until("the xterm's shell", crate::STEP, || {
            self.out.exists().then_some(())
        })
        .await;
    }

    pub fn typed(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// What the terminal read, as bytes.
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.out).unwrap_or_default()
    }
}

impl Drop for Typewriter {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
    }
}
