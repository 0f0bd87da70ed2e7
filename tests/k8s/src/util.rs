//! Small helpers: bounded waits, loopback blocks, child processes with a deadline, log tails.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A random number that differs between test processes and between calls.
pub fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

/// The first of `count` consecutive loopback addresses in a random block (127.x.y.z with
/// x >= 16, away from `dynakv dev`'s 127.0.0.2.. and from 127.0.0.1, where the control plane
/// listens), free of listeners on `probe_port`.
pub fn random_loopback_block(count: u8, probe_port: u16) -> Ipv4Addr {
    assert!((1..=200).contains(&count));
    for _ in 0..100 {
        let r = random_u64();
        let a = 16 + (r % 239) as u8;
        let b = (r >> 8) as u8;
        let c = 1 + ((r >> 16) % u64::from(254 - count)) as u8;
        let first = Ipv4Addr::new(127, a, b, c);
        let free = (0..count).all(|i| {
            let ip = Ipv4Addr::from(u32::from(first) + u32::from(i));
            TcpListener::bind((ip, probe_port)).is_ok()
        });
        if free {
            return first;
        }
    }
    panic!("no free loopback block of {count} addresses");
}

/// Polls `f` every `every` until it returns `Some` or `timeout` passes; then panics with `what`
/// and the last thing `f` said through `last`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut(&mut String) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Some(v) = f(&mut last) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
        }
        std::thread::sleep(every);
    }
}

/// What a command did.
#[derive(Debug, Clone)]
pub struct Out {
    /// Exit code (-1: killed by a signal or by the deadline).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Makes a child die with the test process even when that is SIGKILLed (a test timeout).
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs `cmd` to completion with standard input closed, at most `timeout` (then kills it).
pub fn run(cmd: &mut Command, timeout: Duration) -> Out {
    let what = format!("{cmd:?}");
    let mut child = die_with_parent(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let code = match wait_child(&mut child, timeout) {
        Some(status) => status.code().unwrap_or(-1),
        None => -1,
    };
    let stdout = t_out.join().unwrap_or_default();
    let mut stderr = t_err.join().unwrap_or_default();
    if code == -1 {
        stderr.push_str(&format!("\n(killed: no exit within {timeout:?})"));
    }
    Out {
        code,
        stdout,
        stderr,
    }
}

/// Waits for `child` to exit, at most `timeout`; kills it and returns `None` past that.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// SIGTERM, then SIGKILL if the child has not exited within `grace`.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let _ = wait_child(child, grace);
}

/// The last `lines` lines of a file (for failure reports).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Prints each step of a test with the seconds since the test started (in the test's output,
/// which nextest shows for failures and with `--success-output`): where the time goes.
pub struct Steps(Instant);

impl Steps {
    pub fn start() -> Steps {
        Steps(Instant::now())
    }

    pub fn done(&self, what: &str) {
        eprintln!("[{:6.1} s] {what}", self.0.elapsed().as_secs_f64());
    }
}
