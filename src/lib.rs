//! vublk: a vhost-user-blk daemon.
//!
//! Map of the crate, from the wire inwards:
//! - [`daemon`]: listener (path or inherited fd), serve-again loop, signals, sd_notify.
//! - [`relay`]: our hop between the frontend and vhost-user-backend: keeps the backend
//!   channel, NACKs bad ring sizes. [`resize`]: online resize (SIGHUP / control `resize`).
//! - [`service`]: socket activation, watchdog, pidfile, socket permissions.
//! - [`control`] / [`stats`]: per-queue counters and the control socket that serves them.
//! - [`vhu_blk`]: the `VhostUserBackend` glue; per-connection state, one thread per queue.
//! - [`vring`]: the library's vring plus a record of ring sizes virtio-queue refused.
//! - [`worker`]: per-queue processing: pop chains, parse, submit, complete, notify.
//!   [`kick_tuner`]: while polling, whether holding the driver's kicks pays (measured).
//! - [`blk`]: pure virtio-blk: features, config space, request parsing into engine ops.
//! - [`engine`]: how ops reach the image (`sync`: positional vectored I/O, no lock, reads and
//!   writes through a mapping on tmpfs; `direct`: O_DIRECT on io_uring).
//! - [`image`]: opening the image, sizing it, probing discard / zero-range support.
//! - [`lock`]: QEMU-compatible OFD image locks (one writer, or shared readers).
//! - [`args`] / [`config`] / [`conffile`]: the command line, its validation, `--config` files.

// Guest input and start-up I/O must never panic the daemon.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod args;
pub mod blk;
pub mod conffile;
pub mod config;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod image;
pub mod kick_tuner;
pub mod lock;
pub mod relay;
pub mod resize;
pub mod service;
pub mod stats;
pub mod vhu_blk;
pub mod vring;
pub mod worker;

/// "outer: inner: root cause" on one line, for operator-facing messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
