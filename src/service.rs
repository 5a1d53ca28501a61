//! Running as a service: systemd socket activation, the watchdog, pidfiles and socket
//! ownership. Readiness and status (`sd_notify`) live in [`crate::daemon`].

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use log::{info, warn};

use crate::stats::DeviceStats;

/// First fd passed by socket activation (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: i32 = 3;

/// `LISTEN_PID`/`LISTEN_FDS` as systemd (or `systemd-socket-activate`) set them: the number of
/// fds passed from [`LISTEN_FDS_START`] on, if they are meant for process `pid`.
pub fn parse_listen_env(listen_pid: Option<&str>, listen_fds: Option<&str>, pid: u32) -> u32 {
    let for_us = listen_pid
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| p == pid);
    if !for_us {
        return 0;
    }
    listen_fds
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0)
}

/// Reads the socket-activation variables and removes them from the environment so nothing we
/// start later mistakes the fds for its own. Returns how many fds were passed to us.
///
/// Call before any thread exists: it changes the process environment.
pub fn take_listen_fds() -> u32 {
    let get = |k| std::env::var(k).ok();
    let n = parse_listen_env(
        get("LISTEN_PID").as_deref(),
        get("LISTEN_FDS").as_deref(),
        std::process::id(),
    );
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the caller (main, first thing) runs before any other thread is spawned, so
        // nothing reads the environment concurrently.
        unsafe { std::env::remove_var(k) };
    }
    n
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for us per `WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    let pid_ok = match std::env::var("WATCHDOG_PID") {
        Ok(p) => p.trim().parse::<u32>().ok() == Some(std::process::id()),
        Err(_) => true,
    };
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (pid_ok && usec > 0).then(|| Duration::from_micros(usec))
}

/// A stop flag background threads can sleep on.
#[derive(Debug, Default)]
pub struct Stopper {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stopper {
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Sleeps up to `d`; true if stopped meanwhile (or before).
    pub fn sleep(&self, d: Duration) -> bool {
        let g = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

/// Tracks whether each queue completes something while it has requests outstanding.
#[derive(Debug, Default)]
struct Progress {
    last: Vec<(u64, u64)>,
    stalled: bool,
}

impl Progress {
    /// Healthy unless some queue had requests in flight at the previous check and has
    /// completed none since.
    fn check(&mut self, stats: &DeviceStats) -> bool {
        let now: Vec<(u64, u64)> = stats
            .snapshot()
            .queues
            .iter()
            .map(|q| (q.requests(), q.in_flight))
            .collect();
        let stuck =
            self.last
                .iter()
                .zip(&now)
                .position(|(&(done0, inflight0), &(done1, inflight1))| {
                    inflight0 > 0 && inflight1 > 0 && done1 == done0
                });
        if let Some(q) = stuck {
            if !self.stalled {
                warn!(
                    "queue {q}: {} requests in flight and none completed since the last \
                     watchdog check; withholding the watchdog ping",
                    now[q].1
                );
            }
        } else if self.stalled {
            info!("queues progressing again; resuming watchdog pings");
        }
        self.stalled = stuck.is_some();
        self.last = now;
        !self.stalled
    }
}

/// Sends `WATCHDOG=1` every `interval / 2` while the daemon is healthy: not stopping, and no
/// queue stuck with requests in flight. Sleeps between pings, so an idle daemon stays idle.
pub fn spawn_watchdog(
    interval: Duration,
    stats: Arc<DeviceStats>,
    stop: Arc<Stopper>,
) -> io::Result<()> {
    let period = interval / 2;
    info!("systemd watchdog: pinging every {period:?}");
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut progress = Progress::default();
            while !stop.sleep(period) {
                if progress.check(&stats) {
                    crate::daemon::sd_notify("WATCHDOG=1");
                }
            }
        })
        .map(|_| ())
}

/// Logs a one-line summary every `interval`, only when something happened since the last one.
pub fn spawn_stats_logger(
    interval: Duration,
    stats: Arc<DeviceStats>,
    stop: Arc<Stopper>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("stats-log".into())
        .spawn(move || {
            let mut prev = stats.snapshot();
            while !stop.sleep(interval) {
                let cur = stats.snapshot();
                let delta = cur.total.since(&prev.total);
                if delta.requests() > 0 {
                    let secs = cur.uptime_s - prev.uptime_s;
                    info!("{}", crate::stats::summary_line(&delta, &cur.total, secs));
                }
                prev = cur;
            }
        })
        .map(|_| ())
}

/// A pidfile failure.
#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {0} is held by running process {1}")]
    Held(PathBuf, String),
    #[error("pidfile {0}")]
    Io(PathBuf, #[source] io::Error),
}

/// A pidfile we hold a lock on for as long as we live; removed on drop. The lock (not the
/// pid written in it) decides whether another process holds the file, so a stale pidfile left
/// by a crash is taken over and a recycled pid is never mistaken for a live daemon.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    file: File,
}

impl Pidfile {
    /// Opens and locks `path`; fails if another live process holds it.
    pub fn claim(path: &Path) -> Result<Pidfile, PidfileError> {
        let err = |e| PidfileError::Io(path.to_path_buf(), e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(err)?;
        // SAFETY: flock on an fd we own; it does not touch memory.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                let pid = s.trim();
                let pid = if pid.is_empty() { "(starting)" } else { pid };
                return Err(PidfileError::Held(path.to_path_buf(), pid.to_string()));
            }
            return Err(err(e));
        }
        Ok(Pidfile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes our pid (call once the daemon is ready).
    pub fn write_pid(&mut self) -> Result<(), PidfileError> {
        let err = |e| PidfileError::Io(self.path.clone(), e);
        self.file.set_len(0).map_err(err)?;
        let line = format!("{}\n", std::process::id());
        std::os::unix::fs::FileExt::write_all_at(&self.file, line.as_bytes(), 0).map_err(err)?;
        self.file.flush().map_err(err)
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Unlink while still holding the lock: a successor that opens the path afterwards
        // creates a new file.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `--socket-group`: a group name or a numeric gid.
pub fn lookup_group(name: &str) -> Option<libc::gid_t> {
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Some(gid);
    }
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: group is plain data filled by getgrnam_r.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live local or `buf` with its true length.
        let r = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut out,
            )
        };
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        return (r == 0 && !out.is_null()).then_some(grp.gr_gid);
    }
}

/// Gives the socket file at `path` its group and mode (group first, so it is never reachable
/// by the wrong group).
pub fn set_socket_access(path: &Path, mode: u32, gid: Option<libc::gid_t>) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if let Some(gid) = gid {
        // SAFETY: `c` is a valid NUL-terminated path; -1 keeps the owner.
        if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: as above.
    if unsafe { libc::chmod(c.as_ptr(), mode as libc::mode_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` (which creates a socket file) with a umask that leaves the file owner-only, so it
/// is never reachable by others before [`set_socket_access`] runs.
pub fn with_private_umask<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's file mode mask. We bind our sockets at start-up
    // before the daemon's other threads exist, so no concurrent file creation sees it.
    let old = unsafe { libc::umask(0o177) };
    let r = f();
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_env() {
        assert_eq!(parse_listen_env(Some("42"), Some("1"), 42), 1);
        assert_eq!(parse_listen_env(Some("42"), Some("2"), 42), 2);
        // Meant for another process (e.g. inherited from a parent that was activated).
        assert_eq!(parse_listen_env(Some("41"), Some("1"), 42), 0);
        assert_eq!(parse_listen_env(None, Some("1"), 42), 0);
        assert_eq!(parse_listen_env(Some("42"), None, 42), 0);
        assert_eq!(parse_listen_env(Some("x"), Some("1"), 42), 0);
        assert_eq!(parse_listen_env(Some("42"), Some("y"), 42), 0);
    }

    #[test]
    fn pidfile_lock_and_cleanup() {
        let dir = std::env::temp_dir().join(format!("vublk-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.pid");
        std::fs::write(&p, "999999\n").unwrap(); // stale, unlocked: taken over
        let mut a = Pidfile::claim(&p).unwrap();
        a.write_pid().unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{}\n", std::process::id())
        );
        // flock locks belong to the open file description: a second open conflicts.
        match Pidfile::claim(&p) {
            Err(PidfileError::Held(_, pid)) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(a);
        assert!(!p.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn groups() {
        assert_eq!(lookup_group("0"), Some(0));
        assert_eq!(lookup_group("root"), Some(0));
        assert_eq!(lookup_group("no-such-group-vublk"), None);
    }

    #[test]
    fn stopper_wakes_sleepers() {
        let s = Arc::new(Stopper::default());
        assert!(!s.sleep(Duration::from_millis(1)));
        let s2 = Arc::clone(&s);
        let t = std::thread::spawn(move || s2.sleep(Duration::from_secs(60)));
        s.stop();
        assert!(t.join().unwrap());
    }
}
