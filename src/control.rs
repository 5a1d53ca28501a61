//! The control socket (`--control-socket PATH`): a line-based JSON protocol for operators.
//!
//! A client sends one command per line and gets one JSON object per line back:
//! - `stats`: the counters ([`crate::stats::StatsSnapshot`]).
//! - `resize`: re-read the image size after the operator grew it
//!   ([`crate::resize::Resizer`]); answers `{"resized": "..."}` or an error.
//! - anything else: `{"error": "..."}`.
//!
//! The socket is owner-only (mode 0600): the daemon's user and root can talk to it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use log::{debug, warn};

use crate::resize::Resizer;
use crate::stats::{DeviceStats, StatsSnapshot};

/// Longest command line accepted.
const MAX_LINE: u64 = 4096;
/// Clients served at once; more are told to retry.
const MAX_CLIENTS: usize = 8;
/// A client idle this long is disconnected.
const IDLE: Duration = Duration::from_secs(30);

/// What the commands act on.
#[derive(Debug)]
pub struct Context {
    pub stats: Arc<DeviceStats>,
    /// `None` only in tests that serve stats alone.
    pub resizer: Option<Arc<Resizer>>,
}

/// A listening control socket; dropping it stops the server and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
}

impl ControlServer {
    /// Serves commands on `listener` (already bound at `path`) from a background thread.
    pub fn start(
        path: PathBuf,
        listener: UnixListener,
        ctx: Arc<Context>,
    ) -> io::Result<ControlServer> {
        let l = listener.try_clone()?;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(l, ctx))?;
        Ok(ControlServer { path, listener })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // SAFETY: shutdown on our own listening fd; it wakes the accept() in the server thread,
        // which then exits.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(l: UnixListener, ctx: Arc<Context>) {
    let clients = Arc::new(AtomicUsize::new(0));
    loop {
        let mut s = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return, // shut down
            Err(e) => {
                warn!("control socket: accept failed: {e}; control socket disabled");
                return;
            }
        };
        if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::AcqRel);
            let _ = s.write_all(&error_line("too many control clients; retry"));
            continue;
        }
        let ctx = Arc::clone(&ctx);
        let c = Arc::clone(&clients);
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(s, &ctx) {
                    debug!("control client: {e}");
                }
                c.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            clients.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn error_line(msg: &str) -> Vec<u8> {
    let mut v = serde_json::json!({ "error": msg }).to_string().into_bytes();
    v.push(b'\n');
    v
}

/// The reply (one line, newline-terminated) to one command.
pub fn answer(cmd: &str, ctx: &Context) -> Vec<u8> {
    match cmd.trim() {
        "stats" => match serde_json::to_vec(&ctx.stats.snapshot()) {
            Ok(mut v) => {
                v.push(b'\n');
                v
            }
            Err(e) => error_line(&format!("cannot encode stats: {e}")),
        },
        "resize" => match ctx
            .resizer
            .as_deref()
            .map(|r| r.resize_logged("control socket"))
        {
            Some(Ok(line)) => {
                let mut v = serde_json::json!({ "resized": line })
                    .to_string()
                    .into_bytes();
                v.push(b'\n');
                v
            }
            Some(Err(e)) => error_line(&e),
            None => error_line("resize is not available here"),
        },
        other => error_line(&format!(
            "unknown command {other:?} (commands: stats, resize)"
        )),
    }
}

fn serve_client(s: UnixStream, ctx: &Context) -> io::Result<()> {
    s.set_read_timeout(Some(IDLE))?;
    s.set_write_timeout(Some(IDLE))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut r).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 == MAX_LINE {
            w.write_all(&error_line("command too long"))?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        w.write_all(&answer(&line, ctx))?;
    }
}

/// A failed control-socket query (`vublk stats`).
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot connect to control socket {0}")]
    Connect(PathBuf, #[source] io::Error),
    #[error("control socket {0}")]
    Io(PathBuf, #[source] io::Error),
    #[error("control socket {0} closed without answering")]
    NoAnswer(PathBuf),
    #[error("daemon answered: {0}")]
    Daemon(String),
    #[error("unexpected answer from {0}")]
    Decode(PathBuf, #[source] serde_json::Error),
}

/// Sends one command and returns the one-line answer (without the newline).
pub fn query(path: &Path, cmd: &str) -> Result<String, CtlError> {
    let io_err = |e| CtlError::Io(path.to_path_buf(), e);
    let mut s = UnixStream::connect(path).map_err(|e| CtlError::Connect(path.to_path_buf(), e))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err)?;
    s.write_all(format!("{cmd}\n").as_bytes()).map_err(io_err)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(io_err)?;
    if line.is_empty() {
        return Err(CtlError::NoAnswer(path.to_path_buf()));
    }
    Ok(line.trim_end().to_string())
}

/// Sends `cmd` and returns the answer's `key` field, or the daemon's error.
pub fn command(path: &Path, cmd: &str, key: &str) -> Result<String, CtlError> {
    let line = query(path, cmd)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| CtlError::Decode(path.to_path_buf(), e))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(CtlError::Daemon(e.to_string()));
    }
    Ok(v.get(key)
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string())
}

/// `stats` over the control socket, decoded.
pub fn fetch_stats(path: &Path) -> Result<StatsSnapshot, CtlError> {
    let line = query(path, "stats")?;
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
        && let Some(e) = v.get("error").and_then(|e| e.as_str())
    {
        return Err(CtlError::Daemon(e.to_string()));
    }
    serde_json::from_str(&line).map_err(|e| CtlError::Decode(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let d = Context {
            stats: Arc::new(DeviceStats::new(2, Default::default())),
            resizer: None,
        };
        let a = String::from_utf8(answer("stats\n", &d)).unwrap();
        assert!(a.ends_with('\n') && a.matches('\n').count() == 1);
        let s: StatsSnapshot = serde_json::from_str(&a).unwrap();
        assert_eq!(s.num_queues, 2);
        let e = String::from_utf8(answer("resize", &d)).unwrap();
        assert!(e.starts_with("{\"error\":\"resize is not available"), "{e}");
        let e = String::from_utf8(answer("grow", &d)).unwrap();
        assert!(e.starts_with("{\"error\":\"unknown command"), "{e}");
    }

    #[test]
    fn server_round_trip() {
        let dir = std::env::temp_dir().join(format!("vublk-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.sock");
        let _ = std::fs::remove_file(&p);
        let l = UnixListener::bind(&p).unwrap();
        let ctx = Arc::new(Context {
            stats: Arc::new(DeviceStats::new(1, Default::default())),
            resizer: None,
        });
        let srv = ControlServer::start(p.clone(), l, ctx).unwrap();
        assert_eq!(fetch_stats(&p).unwrap().num_queues, 1);
        assert!(matches!(query(&p, "nope"), Ok(s) if s.contains("error")));
        drop(srv);
        assert!(!p.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
