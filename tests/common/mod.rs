//! Integration-test harness: runs the real `vublk` binary on a temporary image and drives it
//! with libblkio (driver "virtio-blk-vhost-user").
//!
//! * [`TestDir`]: a unique temporary directory, removed on drop (keep it with `VUBLK_KEEP_TMP=1`).
//! * [`Daemon`]: a spawned `vublk` (extra args for all served daemons: `VUBLK_TEST_ARGS`); readiness is the sd_notify `READY=1` datagram (no sleeps);
//!   stdout/stderr go to files in the test dir; a watchdog kills it after
//!   [`DAEMON_MAX_LIFETIME`] so that a hung daemon turns into failing client calls, not a hung
//!   test; drop kills it.
//! * [`Client`]: a started libblkio instance with N queues and one mapped memory region; every
//!   request is waited for with a timeout ([`IO_TIMEOUT`]).
//!
//! Every test file includes this module; not every file uses every helper.
#![allow(dead_code)]

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::ffi::{CStr, OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::RawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const VUBLK: &str = env!("CARGO_BIN_EXE_vublk");

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// How long the daemon may take to send READY=1.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a single request (or batch) may take to complete.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon may take to exit after a signal (or a bad command line).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// A daemon still alive after this long is SIGKILLed by a watchdog, so that a client blocked on
/// a hung daemon gets EOF and the test fails instead of hanging.
pub const DAEMON_MAX_LIFETIME: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Temporary directories and images
// ---------------------------------------------------------------------------------------------

/// A unique temporary directory, removed on drop unless `VUBLK_KEEP_TMP` is set.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(24)
            .collect();
        let path =
            std::env::temp_dir().join(format!("vublk-it-{}-{}-{}", std::process::id(), n, tag));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating test dir {}: {e}", path.display()));
        // sockaddr_un.sun_path holds 108 bytes including the NUL.
        let longest = path.join("vublk-second.notify");
        assert!(
            longest.as_os_str().len() < 100,
            "test dir path {} too long for unix socket paths (set TMPDIR to something shorter)",
            path.display()
        );
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("VUBLK_KEEP_TMP").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Creates a sparse, zero-filled image of `size` bytes.
pub fn create_image(path: &Path, size: u64) -> PathBuf {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap();
    path.to_path_buf()
}

/// Creates an image of `size` bytes filled with [`pattern`]`(seed, size)`.
pub fn create_image_random(path: &Path, size: u64, seed: u64) -> PathBuf {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = Rng::new(seed);
    let mut remaining = size;
    let mut chunk = vec![0u8; MIB as usize];
    while remaining > 0 {
        let n = remaining.min(MIB) as usize;
        rng.fill(&mut chunk[..n]);
        f.write_all(&chunk[..n]).unwrap();
        remaining -= n as u64;
    }
    f.sync_all().unwrap();
    path.to_path_buf()
}

/// Reads `len` bytes at `offset` straight from the image file.
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} bytes at {offset} of {}: {e}", len, path.display()));
    buf
}

/// Writes `data` at `offset` straight into the image file.
pub fn write_file_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

pub fn file_size(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

// ---------------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------------

/// xorshift64* — tiny, seeded, good enough for test patterns.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero; spread small seeds.
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// `len` pseudo-random bytes determined by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// Compares two buffers; on mismatch panics naming the first differing byte (not dumping MiBs).
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i + 16).min(actual.len());
        let n_bad = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {n_bad} of {} bytes differ, first at byte {i}: got {:02x?}, expected {:02x?}",
            actual.len(),
            &actual[i..end],
            &expected[i..end]
        );
    }
}

#[track_caller]
pub fn assert_zeros(actual: &[u8], what: &str) {
    if let Some(i) = actual.iter().position(|b| *b != 0) {
        let end = (i + 16).min(actual.len());
        panic!(
            "{what}: expected {} zero bytes, first non-zero at byte {i}: {:02x?}",
            actual.len(),
            &actual[i..end]
        );
    }
}

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
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
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

// ---------------------------------------------------------------------------------------------
// The libblkio client
// ---------------------------------------------------------------------------------------------

pub struct ClientOpts {
    pub num_queues: i32,
    pub queue_size: Option<i32>,
    pub read_only: bool,
    /// Size of the one memory region mapped for I/O buffers.
    pub region_size: usize,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            num_queues: 2,
            queue_size: None,
            read_only: false,
            region_size: 8 * MIB as usize,
        }
    }
}

/// A failed step of [`Client::connect`].
#[derive(Debug)]
pub struct ClientError {
    pub step: &'static str,
    pub err: blkio::Error,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "libblkio {} failed: {} (errno {})",
            self.step,
            self.err.message(),
            self.err.errno().raw_os_error()
        )
    }
}

/// The client-side view of a request's failure: `ret` is the negative errno of the completion.
#[derive(Debug, Clone)]
pub struct IoError {
    pub ret: i32,
    /// libblkio's own message (set when libblkio failed the request itself).
    pub msg: Option<String>,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ret {} ({})",
            self.ret,
            std::io::Error::from_raw_os_error(-self.ret)
        )?;
        if let Some(m) = &self.msg {
            write!(f, ", libblkio: {m}")?;
        }
        Ok(())
    }
}

pub type IoResult = Result<(), IoError>;

fn completion_result(c: &Completion) -> IoResult {
    if c.ret == 0 {
        return Ok(());
    }
    let msg = if c.error_msg.is_null() {
        None
    } else {
        // SAFETY: libblkio sets error_msg to a static NUL-terminated string.
        Some(
            unsafe { CStr::from_ptr(c.error_msg) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    Err(IoError { ret: c.ret, msg })
}

/// The client's mapped I/O buffer region (plain address + length, so queues can move to threads).
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    pub addr: usize,
    pub len: usize,
}

impl Mem {
    pub fn ptr(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "buffer {off}+{len} outside the {}-byte region",
            self.len
        );
        (self.addr + off) as *mut u8
    }

    /// # Safety
    /// No request may be using the bytes while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        // SAFETY: within the mapped region (checked by ptr()); exclusivity is the caller's.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(off, len), len) }
    }

    pub fn iovec(&self, off: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr(off, len).cast(),
            iov_len: len,
        }
    }
}

/// Waits for `n` completions on `q`, in completion order. Panics if libblkio's do_io fails or
/// times out (the daemon hung or went away).
pub fn wait_completions(q: &mut Blkioq, n: usize) -> Vec<Completion> {
    let mut out = Vec::with_capacity(n);
    let mut slots: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut timeout = IO_TIMEOUT;
    while out.len() < n {
        let want = n - out.len();
        match q.do_io(&mut slots[..want], want, Some(&mut timeout), None) {
            Ok(got) => {
                for s in &slots[..got] {
                    // SAFETY: do_io initialised the first `got` slots.
                    out.push(unsafe { s.assume_init_read() });
                }
            }
            Err(e) if e.errno() == blkio::Errno::INTR => continue,
            Err(e) => panic!(
                "do_io waiting for {want} of {n} completions failed after {:?}: {} (errno {}) \
                 — is the daemon hung or gone?",
                IO_TIMEOUT - timeout,
                e.message(),
                e.errno().raw_os_error()
            ),
        }
    }
    out
}

/// Notifies the device of queued requests without waiting for anything.
pub fn kick(q: &mut Blkioq) {
    let mut none: [MaybeUninit<Completion>; 0] = [];
    if let Err(e) = q.do_io(&mut none, 0, None, None) {
        panic!("do_io (submit only) failed: {}", e.message());
    }
}

/// Submits one request with `submit` and waits for its completion.
pub fn submit_wait(q: &mut Blkioq, submit: impl FnOnce(&mut Blkioq, usize)) -> IoResult {
    submit(q, 0x5eed);
    let c = wait_completions(q, 1);
    assert_eq!(
        c[0].user_data, 0x5eed,
        "completion for a request never made"
    );
    completion_result(&c[0])
}

pub fn completion_to_result(c: &Completion) -> IoResult {
    completion_result(c)
}

/// Request-size limits the device advertised (0 = none).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_segment_len: usize,
    pub max_segments: usize,
    pub max_transfer: usize,
}

/// Splits a contiguous buffer into requests that respect `limits`; each request is a list of
/// (buffer offset, length) segments.
pub fn split_for_limits(limits: Limits, buf_off: usize, len: usize) -> Vec<Vec<(usize, usize)>> {
    let seg_len = if limits.max_segment_len == 0 {
        len.max(1)
    } else {
        // keep segments sector-multiples
        (limits.max_segment_len / 512 * 512).max(512)
    };
    let max_transfer = if limits.max_transfer == 0 {
        usize::MAX
    } else {
        (limits.max_transfer / 512 * 512).max(512)
    };
    let max_segs = if limits.max_segments == 0 {
        usize::MAX
    } else {
        limits.max_segments
    };
    let mut reqs = Vec::new();
    let mut cur: Vec<(usize, usize)> = Vec::new();
    let mut cur_bytes = 0usize;
    let mut pos = 0usize;
    while pos < len {
        let n = seg_len.min(len - pos).min(max_transfer - cur_bytes);
        cur.push((buf_off + pos, n));
        cur_bytes += n;
        pos += n;
        if cur.len() == max_segs || cur_bytes == max_transfer {
            reqs.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
    }
    if !cur.is_empty() || reqs.is_empty() {
        reqs.push(cur);
    }
    reqs
}

/// Single-request I/O helpers usable on a queue moved to another thread.
pub struct QueueIo<'a> {
    pub q: &'a mut Blkioq,
    pub mem: Mem,
    pub limits: Limits,
}

impl QueueIo<'_> {
    /// One read request into region bytes `buf_off..buf_off+len`.
    pub fn read(&mut self, offset: u64, buf_off: usize, len: usize) -> IoResult {
        let p = self.mem.ptr(buf_off, len);
        submit_wait(self.q, |q, ud| {
            q.read(offset, p, len, ud, ReqFlags::empty())
        })
    }

    /// One write request from region bytes `buf_off..buf_off+len`.
    pub fn write(&mut self, offset: u64, buf_off: usize, len: usize, flags: ReqFlags) -> IoResult {
        let p = self.mem.ptr(buf_off, len);
        submit_wait(self.q, |q, ud| q.write(offset, p, len, ud, flags))
    }

    pub fn readv(&mut self, offset: u64, segs: &[(usize, usize)]) -> IoResult {
        let iov: Vec<libc::iovec> = segs.iter().map(|&(o, l)| self.mem.iovec(o, l)).collect();
        submit_wait(self.q, |q, ud| {
            q.readv(
                offset,
                iov.as_ptr(),
                iov.len() as u32,
                ud,
                ReqFlags::empty(),
            )
        })
    }

    pub fn writev(&mut self, offset: u64, segs: &[(usize, usize)], flags: ReqFlags) -> IoResult {
        let iov: Vec<libc::iovec> = segs.iter().map(|&(o, l)| self.mem.iovec(o, l)).collect();
        submit_wait(self.q, |q, ud| {
            q.writev(offset, iov.as_ptr(), iov.len() as u32, ud, flags)
        })
    }

    pub fn flush(&mut self) -> IoResult {
        submit_wait(self.q, |q, ud| q.flush(ud, ReqFlags::empty()))
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, flags: ReqFlags) -> IoResult {
        submit_wait(self.q, |q, ud| q.write_zeroes(offset, len, ud, flags))
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> IoResult {
        submit_wait(self.q, |q, ud| {
            q.discard(offset, len, ud, ReqFlags::empty())
        })
    }

    /// Reads `len` bytes at `offset` into region bytes at `buf_off`, split to respect the
    /// device's limits; panics on failure.
    pub fn read_split(&mut self, offset: u64, buf_off: usize, len: usize) {
        let mut dev_off = offset;
        for segs in split_for_limits(self.limits, buf_off, len) {
            let n: usize = segs.iter().map(|s| s.1).sum();
            let r = if segs.len() == 1 {
                self.read(dev_off, segs[0].0, segs[0].1)
            } else {
                self.readv(dev_off, &segs)
            };
            r.unwrap_or_else(|e| panic!("read of {n} bytes at device offset {dev_off}: {e}"));
            dev_off += n as u64;
        }
    }

    /// Writes region bytes at `buf_off` to `offset`, split to respect the device's limits;
    /// panics on failure.
    pub fn write_split(&mut self, offset: u64, buf_off: usize, len: usize) {
        let mut dev_off = offset;
        for segs in split_for_limits(self.limits, buf_off, len) {
            let n: usize = segs.iter().map(|s| s.1).sum();
            let r = if segs.len() == 1 {
                self.write(dev_off, segs[0].0, segs[0].1, ReqFlags::empty())
            } else {
                self.writev(dev_off, &segs, ReqFlags::empty())
            };
            r.unwrap_or_else(|e| panic!("write of {n} bytes at device offset {dev_off}: {e}"));
            dev_off += n as u64;
        }
    }
}

/// A started libblkio client with one mapped memory region.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub blkio: Blkio,
    pub region: MemoryRegion,
    pub mem: Mem,
    pub capacity: u64,
    pub limits: Limits,
}

impl Client {
    /// Connects with 2 queues and an 8 MiB region; panics with libblkio's message on failure.
    pub fn connect(socket: &Path) -> Client {
        Self::connect_with(socket, ClientOpts::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn connect_with(socket: &Path, opts: ClientOpts) -> Result<Client, ClientError> {
        let step = |step: &'static str| move |err: blkio::Error| ClientError { step, err };
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(step("new"))?;
        b.set_str("path", socket.to_str().expect("utf-8 socket path"))
            .map_err(step("set path"))?;
        if opts.read_only {
            b.set_bool("read-only", true)
                .map_err(step("set read-only"))?;
        }
        // libblkio 0.5.1 computes max-transfer = size_max * seg_max in i32; a device whose
        // product exceeds i32::MAX makes it panic here in debug builds (and report a negative
        // max-transfer in release builds). Name that instead of a bare overflow panic.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.connect())) {
            Ok(r) => r.map_err(step("connect"))?,
            Err(p) => {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                panic!(
                    "libblkio panicked in connect ({what}). In blkio 0.5.1 this is \
                     max_transfer = size_max * seg_max overflowing i32: the device must \
                     advertise size_max * seg_max <= {} for libblkio clients",
                    i32::MAX
                );
            }
        }
        b.set_i32("num-queues", opts.num_queues)
            .map_err(step("set num-queues"))?;
        if let Some(qs) = opts.queue_size {
            b.set_i32("queue-size", qs)
                .map_err(step("set queue-size"))?;
        }
        let capacity = b.get_u64("capacity").map_err(step("get capacity"))?;
        let get = |b: &Blkio, name: &str| b.get_i32(name).map(|v| v.max(0) as usize);
        let limits = Limits {
            max_segment_len: get(&b, "max-segment-len").map_err(step("get max-segment-len"))?,
            max_segments: get(&b, "max-segments").map_err(step("get max-segments"))?,
            max_transfer: get(&b, "max-transfer").map_err(step("get max-transfer"))?,
        };
        let started = b.start().map_err(step("start"))?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(step("get mem-region-alignment"))? as usize;
        let len = opts.region_size.div_ceil(align) * align;
        let region = b.alloc_mem_region(len).map_err(step("alloc_mem_region"))?;
        b.map_mem_region(&region).map_err(step("map_mem_region"))?;
        Ok(Client {
            queues: started.queues,
            blkio: b,
            region,
            mem: Mem {
                addr: region.addr,
                len: region.len,
            },
            capacity,
            limits,
        })
    }

    /// I/O helpers on queue `i`.
    pub fn q(&mut self, i: usize) -> QueueIo<'_> {
        QueueIo {
            q: &mut self.queues[i],
            mem: self.mem,
            limits: self.limits,
        }
    }

    /// Region bytes (no request may be in flight on them).
    pub fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        // SAFETY: requests are synchronous in this API; `&mut self` excludes other users.
        unsafe { self.mem.slice_mut(off, len) }
    }

    /// Writes `data` at device `offset` through queue `q` (split per limits); panics on failure.
    pub fn write_data(&mut self, q: usize, offset: u64, data: &[u8]) {
        self.buf(0, data.len()).copy_from_slice(data);
        self.q(q).write_split(offset, 0, data.len());
    }

    /// Reads `len` bytes at device `offset` through queue `q`; panics on failure. The buffer is
    /// poisoned first so a read that transfers nothing cannot pass.
    pub fn read_data(&mut self, q: usize, offset: u64, len: usize) -> Vec<u8> {
        self.buf(0, len).fill(0xA5);
        self.q(q).read_split(offset, 0, len);
        self.buf(0, len).to_vec()
    }

    pub fn get_bool(&self, name: &str) -> bool {
        self.blkio
            .get_bool(name)
            .unwrap_or_else(|e| panic!("get_bool({name}): {}", e.message()))
    }

    pub fn get_i32(&self, name: &str) -> i32 {
        self.blkio
            .get_i32(name)
            .unwrap_or_else(|e| panic!("get_i32({name}): {}", e.message()))
    }

    pub fn get_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("get_u64({name}): {}", e.message()))
    }
}

/// Runs `f` on another thread and panics if it takes longer than `timeout` (the thread is left
/// behind; kill the daemon to unblock it).
pub fn with_timeout<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("{what}: did not finish within {timeout:?}"),
    }
}

/// True if the path exists (without following symlinks).
pub fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Bytes of a path, for assertions.
pub fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}
