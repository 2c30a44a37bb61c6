//! QEMU as a real VNC server.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::START_TIMEOUT;
use crate::net::{free_port, port_open};
use crate::process::stop_child;

/// QEMU (TCG, no disk) with its VNC server on 127.0.0.1, password set over QMP.
pub struct Qemu {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    pub log_path: PathBuf,
}

impl Qemu {
    pub fn start(password: &str) -> Qemu {
        Qemu::start_with(password, &[])
    }

    /// With QEMU's trace of the key events its VNC server takes and its
    /// PS/2 keyboard gets, in [`Qemu::log`]: what reached the VM.
    pub fn start_tracing_keys(password: &str) -> Qemu {
        Qemu::start_with(
            password,
            &[
                "-trace",
                "vnc_key_event_ext",
                "-trace",
                "vnc_key_event_map",
                "-trace",
                "ps2_keyboard_event",
            ],
        )
    }

    /// QEMU's standard error: its messages and traces.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn start_with(password: &str, extra: &[&str]) -> Qemu {
        let mut last_err = String::new();
        for _ in 0..4 {
            match Qemu::try_start(password, extra) {
                Ok(q) => return q,
                Err(e) => last_err = e,
            }
        }
        panic!("QEMU did not start: {last_err}");
    }

    fn try_start(password: &str, extra: &[&str]) -> Result<Qemu, String> {
        let dir = tempfile::Builder::new()
            .prefix("vncbroker-qemu-")
            .tempdir()
            .unwrap();
        let qmp = dir.path().join("qmp.sock");
        let log_path = dir.path().join("qemu.log");
        // QEMU listens on 5900 + N; use a port the OS just handed out.
        let port = loop {
            let p = free_port();
            if p > 5900 {
                break p;
            }
        };
        let display = port - 5900;
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "accel=tcg",
                "-display",
                "none",
                "-nodefaults",
                "-vga",
                "std",
                "-m",
                "64",
                "-vnc",
                &format!("127.0.0.1:{display},password=on"),
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&log_path).unwrap()))
            .spawn()
            .map_err(|e| format!("spawning qemu-system-x86_64: {e}"))?;
        let fail = |child: &mut Child, why: String| {
            stop_child(child, Duration::from_secs(3));
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            Err(format!("{why}; qemu stderr: {log}"))
        };
        // QMP: wait for the socket, then set the VNC password.
        let deadline = Instant::now() + START_TIMEOUT;
        let stream = loop {
            if let Ok(Some(st)) = child.try_wait() {
                return fail(&mut child, format!("qemu exited with {st}"));
            }
            if let Ok(s) = std::os::unix::net::UnixStream::connect(&qmp) {
                break s;
            }
            if Instant::now() > deadline {
                return fail(&mut child, "no QMP socket".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut read_reply = |what: &str| -> Result<Value, String> {
            loop {
                let mut line = String::new();
                reader
                    .read_line(&mut line)
                    .map_err(|e| format!("QMP read ({what}): {e}"))?;
                if line.is_empty() {
                    return Err(format!("QMP closed ({what})"));
                }
                let v: Value =
                    serde_json::from_str(&line).map_err(|e| format!("QMP JSON {line:?}: {e}"))?;
                // Skip asynchronous events.
                if v.get("event").is_some() {
                    continue;
                }
                return Ok(v);
            }
        };
        let greeting = read_reply("greeting")?;
        if greeting.get("QMP").is_none() {
            return fail(&mut child, format!("QMP greeting {greeting}"));
        }
        for cmd in [
            serde_json::json!({"execute": "qmp_capabilities"}),
            serde_json::json!({"execute": "change-vnc-password",
                               "arguments": {"password": password}}),
        ] {
            writeln!(writer, "{cmd}").map_err(|e| format!("QMP write: {e}"))?;
            let reply = read_reply("command")?;
            if reply.get("return").is_none() {
                return fail(&mut child, format!("QMP {cmd} answered {reply}"));
            }
        }
        drop(writer);
        while !port_open(port) {
            if let Ok(Some(st)) = child.try_wait() {
                return fail(&mut child, format!("qemu exited with {st}"));
            }
            if Instant::now() > deadline {
                return fail(&mut child, format!("VNC port {port} never accepted"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Qemu {
            child,
            port,
            _dir: dir,
            log_path,
        })
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
    }
}
