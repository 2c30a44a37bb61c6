//! Child processes: stopping them (also whole process groups) and looking
//! at them through /proc.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(&child.id().to_string(), "-TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Same for a child that leads its own process group: the whole group goes.
pub fn stop_group(child: &mut Child, grace: Duration) {
    let group = format!("-{}", child.id());
    if let Ok(Some(_)) = child.try_wait() {
        // The leader is gone; stragglers in its group still get killed.
        signal(&group, "-KILL");
        return;
    }
    signal(&group, "-TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    signal(&group, "-KILL");
    let _ = child.kill();
    let _ = child.wait();
}

/// Number of open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The environment for children: no `VNCBROKER_*` overrides from outside.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("VNCBROKER_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The last few KiB of a log, for a panic message.
pub fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(6000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Samples `count` every 100 ms until it reads the same five times in a
/// row (15 s at most), and returns the last reading: a baseline that lazily
/// opened resources no longer move.
pub async fn steady_count(mut count: impl FnMut() -> usize) -> usize {
    let mut last = count();
    let mut steady = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while steady < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count();
        if now == last {
            steady += 1;
        } else {
            steady = 0;
            last = now;
        }
    }
    last
}
