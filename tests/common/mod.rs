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
//!
//! The helpers live in submodules, all re-exported here (tests just `use common::*;`):
//! `files.rs` (directories, images, data), `mounts.rs` (loop devices, mounted filesystems),
//! `daemon.rs` (the process harness) and `client.rs`
//! (libblkio). `allow(dead_code)` below covers the submodules too.
#![allow(dead_code)]

mod client;
mod daemon;
mod files;
mod mounts;

// Every test file compiles this module on its own and uses only some of it.
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use daemon::*;
#[allow(unused_imports)]
pub use files::*;
#[allow(unused_imports)]
pub use mounts::*;

use std::thread;
use std::time::Duration;

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

/// Runs `f` on another thread and panics if it takes longer than `timeout` (the thread is left
/// behind; kill the daemon to unblock it).
/// Calls `f` every 10 ms until it returns `Some`, for at most `timeout`.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

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
