//! A `vublk` started the way a service manager starts it: any program in front (e.g.
//! `systemd-socket-activate`), a chosen environment (`WATCHDOG_USEC`, …), and the notify
//! socket read by the test thread itself, so a test can act the moment a message arrives.
//! Include with `#[path = "common/proc.rs"] mod proc;` next to `mod common;`.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::{EXIT_TIMEOUT, TestDir, VUBLK};

pub struct Proc {
    child: Child,
    notify: UnixDatagram,
    pub notify_path: PathBuf,
    pub stderr_path: PathBuf,
    /// Every notify datagram received so far, in order.
    pub msgs: Vec<String>,
}

/// How to start a [`Proc`].
pub struct ProcSpec<'a> {
    pub dir: &'a TestDir,
    pub name: &'a str,
    /// Run this in front of vublk (`["systemd-socket-activate", "-l", …]`); empty: vublk itself.
    pub wrapper: Vec<OsString>,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    /// Runs between fork and exec (async-signal-safe calls only).
    pub pre_exec: Option<fn() -> std::io::Result<()>>,
}

impl<'a> ProcSpec<'a> {
    pub fn new(dir: &'a TestDir, name: &'a str, args: Vec<OsString>) -> Self {
        ProcSpec {
            dir,
            name,
            wrapper: Vec::new(),
            args,
            env: Vec::new(),
            pre_exec: None,
        }
    }
}

impl Proc {
    pub fn spawn(s: ProcSpec<'_>) -> Proc {
        let (notify_path, notify) =
            crate::common::bind_notify(s.dir, s.name, Duration::from_millis(20));
        let stderr_path = s.dir.join(&format!("{}.stderr", s.name));
        let (program, pre): (OsString, Vec<OsString>) = match s.wrapper.split_first() {
            Some((p, rest)) => {
                let mut pre = rest.to_vec();
                pre.push(VUBLK.into());
                (p.clone(), pre)
            }
            None => (VUBLK.into(), Vec::new()),
        };
        let mut cmd = Command::new(&program);
        cmd.args(pre)
            .args(&s.args)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("RUST_LOG")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(s.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).unwrap());
        if let Some(f) = s.pre_exec {
            // SAFETY: the hooks tests pass only make async-signal-safe calls.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, f);
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.to_string_lossy()));
        Proc {
            child,
            notify,
            notify_path,
            stderr_path,
            msgs: Vec::new(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The next notify datagram within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.msgs.push(m.clone());
                    return Some(m);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        // Drain what it sent before exiting, then give up.
                        if let Ok(n) = self.notify.recv(&mut buf) {
                            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                            self.msgs.push(m.clone());
                            return Some(m);
                        }
                        panic!(
                            "vublk exited ({st}) while a notify message was awaited; stderr:\n{}",
                            self.stderr()
                        );
                    }
                }
                Err(e) => panic!("recv on notify socket: {e}"),
            }
        }
        None
    }

    /// Waits for a datagram with a line equal to `line`; panics (with stderr) on timeout.
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(m) if m.lines().any(|l| l == line) => return m,
                Some(_) => {}
                None => panic!(
                    "no {line:?} within {timeout:?}; got {:?}; stderr:\n{}",
                    self.msgs,
                    self.stderr()
                ),
            }
        }
    }

    /// Every datagram arriving within `d`.
    pub fn collect_for(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            if let Some(m) = self.recv(left) {
                out.push(m);
            }
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::common::poll_until(timeout, || self.try_wait())
    }

    /// Reads the datagrams already queued (e.g. sent just before exiting).
    pub fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            self.msgs
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    /// SIGTERM; panics unless it exits with status 0 in time. Collects the last datagrams.
    pub fn terminate(&mut self) {
        if self.try_wait().is_none() {
            // SAFETY: kill(2) on our own child, not yet reaped, so its pid is not recycled.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        }
        let st = self.wait_exit(EXIT_TIMEOUT);
        self.drain();
        match st {
            Some(s) if s.success() => {}
            Some(s) => panic!(
                "vublk exited with {s} after SIGTERM; stderr:\n{}",
                self.stderr()
            ),
            None => panic!(
                "vublk did not exit after SIGTERM; stderr:\n{}",
                self.stderr()
            ),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let alive = matches!(self.child.try_wait(), Ok(None));
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- vublk pid {} ({}) stderr: ---\n{}--- notify: {:?}",
                self.child.id(),
                if alive { "was running" } else { "had exited" },
                self.stderr(),
                self.msgs
            );
        }
    }
}

/// Waits up to `timeout` for a path to appear.
pub fn wait_for_path(p: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

pub fn os(v: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    v.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// CPU time (user + system, clock ticks) a process has used so far.
pub fn cpu_ticks(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the ")" closing the command name: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

pub const SOCKET_ACTIVATE: &str = "systemd-socket-activate";

/// A tool the suite needs from a Debian package (scripts/install-deps.sh installs them).
pub fn tool(name: &str, package: &str) -> String {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = format!("{dir}/{name}");
        if Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{name} not found: install the {package} package (scripts/install-deps.sh)");
}

pub fn activator() -> String {
    tool(SOCKET_ACTIVATE, "systemd")
}
