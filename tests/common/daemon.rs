//! The `vublk` process harness: spawning, sd_notify readiness, signals, exit checks.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{DAEMON_MAX_LIFETIME, EXIT_TIMEOUT, READY_TIMEOUT, TestDir, VUBLK};

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// Extra daemon arguments from `VUBLK_TEST_ARGS` (whitespace-separated), appended to every
/// daemon the tests expect to serve (e.g. `VUBLK_TEST_ARGS="--engine sync"`); not applied to
/// the command-line error tests.
pub fn env_test_args() -> Vec<OsString> {
    std::env::var("VUBLK_TEST_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(OsString::from)
        .collect()
}

/// A spawned `vublk` process.
pub struct Daemon {
    child: Arc<Mutex<Child>>,
    pid: i32,
    name: String,
    /// The `--socket-path` it serves, if known.
    pub socket: Option<PathBuf>,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    notify: Arc<Notify>,
    watchdog: Arc<(Mutex<bool>, Condvar)>,
}

/// sd_notify messages received from the daemon, collected by a reader thread.
struct Notify {
    state: Mutex<NotifyState>,
    cvar: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct NotifyState {
    msgs: Vec<String>,
    ready: bool,
}

/// Reads NOTIFY_SOCKET datagrams (as systemd would) until told to stop; with
/// `stop_after_ready` it stops reading, but keeps the socket open, once READY=1 arrived.
fn notify_reader(sock: UnixDatagram, n: Arc<Notify>, stop_after_ready: bool) {
    let mut buf = [0u8; 4096];
    while !n.stop.load(Ordering::Relaxed) {
        if stop_after_ready && n.state.lock().unwrap().ready {
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        match sock.recv(&mut buf) {
            Ok(len) => {
                let msg = String::from_utf8_lossy(&buf[..len]).into_owned();
                let mut st = n.state.lock().unwrap();
                if msg.lines().any(|l| l.trim() == "READY=1") {
                    st.ready = true;
                }
                st.msgs.push(msg);
                n.cvar.notify_all();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("recv on notify socket: {e}"),
        }
    }
}

/// Binds `DIR/NAME.notify`, a datagram socket playing systemd's NOTIFY_SOCKET, whose reads
/// time out after `timeout` so readers can poll.
pub fn bind_notify(dir: &TestDir, name: &str, timeout: Duration) -> (PathBuf, UnixDatagram) {
    let path = dir.join(&format!("{name}.notify"));
    let _ = fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path)
        .unwrap_or_else(|e| panic!("bind notify socket {}: {e}", path.display()));
    sock.set_read_timeout(Some(timeout)).unwrap();
    (path, sock)
}

/// How to spawn a daemon; see [`Daemon::spawn`].
pub struct Spawn<'a> {
    pub dir: &'a TestDir,
    /// Names the notify socket and log files inside `dir` (several daemons may share a dir).
    pub name: &'a str,
    pub args: Vec<OsString>,
    /// A listening socket fd to hand to the child (CLOEXEC cleared in the child only).
    pub pass_fd: Option<RawFd>,
    /// Recorded as [`Daemon::socket`].
    pub socket: Option<PathBuf>,
    /// Stop reading NOTIFY_SOCKET after READY=1 (a stalled service manager).
    pub stop_reading_notify_after_ready: bool,
    /// Run the daemon under a seccomp filter that fails io_uring_setup with EPERM (as a
    /// container runtime's default profile may).
    pub deny_io_uring: bool,
}

/// Installs a seccomp filter failing `io_uring_setup` with EPERM. Runs between fork and exec,
/// so it only makes async-signal-safe calls (prctl).
#[cfg(target_arch = "x86_64")]
fn seccomp_deny_io_uring() -> std::io::Result<()> {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        // seccomp_data.nr is the first u32
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        jeq(libc::SYS_io_uring_setup as u32, 0, 1),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a valid, live filter program.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn os_args<S: AsRef<OsStr>>(args: &[S]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

impl Daemon {
    /// Starts `vublk --socket-path DIR/vublk.sock --blk-file IMAGE [--num-queues 2] EXTRA...` and
    /// waits for READY=1. `--num-queues 2` is added unless `extra` sets it.
    pub fn start(dir: &TestDir, image: &Path, extra: &[&str]) -> Daemon {
        Self::start_at(dir, "vublk", &dir.join("vublk.sock"), image, extra)
    }

    /// Like [`Daemon::start`] with a chosen name and socket path.
    pub fn start_at(
        dir: &TestDir,
        name: &str,
        socket: &Path,
        image: &Path,
        extra: &[&str],
    ) -> Daemon {
        let mut args: Vec<OsString> = vec![
            "--socket-path".into(),
            socket.into(),
            "--blk-file".into(),
            image.into(),
        ];
        if !extra.contains(&"--num-queues") {
            args.extend(["--num-queues".into(), "2".into()]);
        }
        args.extend(extra.iter().map(OsString::from));
        // VUBLK_TEST_ARGS, minus options the test sets itself
        let mut env = env_test_args().into_iter().peekable();
        while let Some(a) = env.next() {
            let is_opt = a.to_str().is_some_and(|s| s.starts_with("--"));
            if is_opt && extra.iter().any(|e| OsStr::new(e) == a) {
                if env
                    .peek()
                    .is_some_and(|v| !v.to_string_lossy().starts_with("--"))
                {
                    env.next();
                }
                continue;
            }
            args.push(a);
        }
        let mut d = Daemon::spawn(Spawn {
            dir,
            name,
            args,
            pass_fd: None,
            socket: Some(socket.to_path_buf()),
            stop_reading_notify_after_ready: false,
            deny_io_uring: false,
        });
        if let Err(e) = d.wait_ready(READY_TIMEOUT) {
            panic!("{e}");
        }
        d
    }

    /// Spawns the daemon without waiting for anything (`VUBLK_TEST_ARGS` is not applied).
    pub fn spawn(s: Spawn<'_>) -> Daemon {
        let (notify_path, notify) = bind_notify(s.dir, s.name, Duration::from_millis(50));
        let notify_shared = Arc::new(Notify {
            state: Mutex::new(NotifyState::default()),
            cvar: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        {
            let n = Arc::clone(&notify_shared);
            let stop_after_ready = s.stop_reading_notify_after_ready;
            thread::spawn(move || notify_reader(notify, n, stop_after_ready));
        }
        let stdout_path = s.dir.join(&format!("{}.stdout", s.name));
        let stderr_path = s.dir.join(&format!("{}.stderr", s.name));

        let mut cmd = Command::new(VUBLK);
        cmd.args(&s.args)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).unwrap())
            .stderr(File::create(&stderr_path).unwrap());
        #[cfg(target_arch = "x86_64")]
        if s.deny_io_uring {
            // SAFETY: the hook only calls prctl, which is async-signal-safe.
            unsafe { cmd.pre_exec(seccomp_deny_io_uring) };
        }
        if let Some(fd) = s.pass_fd {
            // SAFETY: only fcntl (async-signal-safe) runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {VUBLK}: {e}"));
        let pid = child.id() as i32;
        let child = Arc::new(Mutex::new(child));
        let watchdog = Arc::new((Mutex::new(false), Condvar::new()));
        {
            let child = Arc::clone(&child);
            let watchdog = Arc::clone(&watchdog);
            thread::spawn(move || {
                let (lock, cvar) = &*watchdog;
                let stopped = lock.lock().unwrap();
                let (stopped, _) = cvar
                    .wait_timeout_while(stopped, DAEMON_MAX_LIFETIME, |stopped| !*stopped)
                    .unwrap();
                if !*stopped {
                    let mut c = child.lock().unwrap();
                    if let Ok(None) = c.try_wait() {
                        eprintln!(
                            "watchdog: vublk pid {pid} still alive after {DAEMON_MAX_LIFETIME:?}, killing it"
                        );
                        let _ = c.kill();
                    }
                }
            });
        }
        Daemon {
            child,
            pid,
            name: s.name.to_string(),
            socket: s.socket,
            stdout_path,
            stderr_path,
            notify: notify_shared,
            watchdog,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Reaps the child if it has exited.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.child.lock().unwrap().try_wait().unwrap()
    }

    pub fn is_alive(&self) -> bool {
        self.try_wait().is_none()
    }

    fn ready_flag(&self) -> bool {
        self.notify.state.lock().unwrap().ready
    }

    /// Waits for READY=1; fails early (with stderr) if the daemon exits first.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let st = self.notify.state.lock().unwrap();
                if st.ready {
                    return Ok(());
                }
                let _ = self
                    .notify
                    .cvar
                    .wait_timeout(st, Duration::from_millis(20))
                    .unwrap();
            }
            if self.ready_flag() {
                return Ok(());
            }
            if let Some(status) = self.try_wait() {
                // It may have sent READY just before dying; give the reader a moment.
                thread::sleep(Duration::from_millis(100));
                if self.ready_flag() {
                    return Ok(());
                }
                return Err(format!(
                    "vublk ({}) exited with {status} before sending READY=1; stderr:\n{}",
                    self.name,
                    self.stderr()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "vublk ({}) sent no READY=1 within {timeout:?}; stderr so far:\n{}",
                    self.name,
                    self.stderr()
                ));
            }
        }
    }

    /// Whether READY=1 has been received.
    pub fn got_ready(&mut self) -> bool {
        self.ready_flag()
    }

    /// All sd_notify datagrams received so far.
    pub fn notify_messages(&self) -> Vec<String> {
        self.notify.state.lock().unwrap().msgs.clone()
    }

    /// Sends `sig` if the child has not been reaped (so never to a recycled pid).
    pub fn signal(&self, sig: i32) {
        let mut c = self.child.lock().unwrap();
        if let Ok(None) = c.try_wait() {
            // SAFETY: plain kill(2) on our own, not yet reaped, child.
            let r = unsafe { libc::kill(self.pid, sig) };
            assert_eq!(
                r,
                0,
                "kill({}, {sig}): {}",
                self.pid,
                std::io::Error::last_os_error()
            );
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        super::poll_until(timeout, || self.try_wait())
    }

    /// SIGTERM, then waits for exit (panics with stderr on timeout).
    pub fn terminate(&self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(EXIT_TIMEOUT) {
            Some(s) => s,
            None => {
                self.kill();
                panic!(
                    "vublk ({}) did not exit within {EXIT_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&self) {
        let mut c = self.child.lock().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Panics (with stderr) unless the daemon is still running.
    #[track_caller]
    pub fn assert_alive(&self, context: &str) {
        if let Some(s) = self.try_wait() {
            panic!(
                "vublk ({}) died ({}) {context}; stderr:\n{}",
                self.name,
                describe_status(s),
                self.stderr()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        {
            let (lock, cvar) = &*self.watchdog;
            *lock.lock().unwrap() = true;
            cvar.notify_all();
        }
        self.notify.stop.store(true, Ordering::Relaxed);
        let was_alive = self.is_alive();
        self.kill();
        if thread::panicking() {
            eprintln!(
                "--- vublk ({}) pid {} {} at test failure; stderr: ---\n{}--- end of stderr ---",
                self.name,
                self.pid,
                if was_alive {
                    "still running"
                } else {
                    "had exited"
                },
                self.stderr()
            );
        }
    }
}

pub fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!(
            "killed by signal {sig}{}",
            if s.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        ),
        _ => format!("{s}"),
    }
}

/// The outcome of a daemon run expected to fail on startup.
pub struct Failed {
    pub status: ExitStatus,
    pub stderr: String,
    pub stdout: String,
    pub sent_ready: bool,
}

/// Runs the daemon with `args` and waits for it to exit on its own (panics if it does not exit
/// within [`EXIT_TIMEOUT`], e.g. because it started serving).
pub fn run_to_exit(dir: &TestDir, name: &str, args: &[OsString]) -> Failed {
    let mut d = Daemon::spawn(Spawn {
        dir,
        name,
        args: args.to_vec(),
        pass_fd: None,
        socket: None,
        stop_reading_notify_after_ready: false,
        deny_io_uring: false,
    });
    let status = match d.wait_exit(EXIT_TIMEOUT) {
        Some(s) => s,
        None => {
            let ready = d.got_ready();
            d.kill();
            panic!(
                "vublk {args:?} did not exit within {EXIT_TIMEOUT:?} (sent READY=1: {ready}); stderr:\n{}",
                d.stderr()
            );
        }
    };
    Failed {
        status,
        stderr: d.stderr(),
        stdout: d.stdout(),
        sent_ready: d.got_ready(),
    }
}

/// Asserts a clean startup failure: non-zero exit (not a signal), no READY=1, and exactly one
/// non-empty line on stderr without panic/backtrace noise, containing each of `must_mention`
/// (case-insensitive, any one of the alternatives separated by `|`).
#[track_caller]
pub fn assert_clean_failure(f: &Failed, what: &str, must_mention: &[&str]) {
    let code = f.status.code();
    assert!(
        matches!(code, Some(c) if c != 0),
        "{what}: expected a non-zero exit code, got {}; stderr:\n{}",
        describe_status(f.status),
        f.stderr
    );
    assert!(
        !f.sent_ready,
        "{what}: daemon sent READY=1 although it failed"
    );
    let lines: Vec<&str> = f.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected exactly one line on stderr, got {}:\n{}",
        lines.len(),
        f.stderr
    );
    let lower = f.stderr.to_lowercase();
    for bad in ["panicked", "backtrace", "stack backtrace", "thread 'main'"] {
        assert!(
            !lower.contains(bad),
            "{what}: stderr looks like a panic ({bad:?}):\n{}",
            f.stderr
        );
    }
    for m in must_mention {
        assert!(
            m.split('|').any(|alt| lower.contains(&alt.to_lowercase())),
            "{what}: stderr line should mention {m:?}:\n{}",
            f.stderr
        );
    }
}
