//! Storage engines: how requests reach the image.
//!
//! The interface is submission/completion so that an asynchronous engine (io_uring, a thread
//! pool) fits without changing the worker: a queue [`EngineQueue::submit`]s ops tagged by the
//! worker and hands results back from [`EngineQueue::reap`]. A synchronous engine simply
//! completes each op inside `submit`.

pub mod aligned;
pub mod aqueue;
pub mod direct;
#[cfg(feature = "fault-injection")]
pub mod faulty;
pub mod mapped;
pub mod sync;

#[cfg(test)]
mod model_tests;

use std::io;
use std::os::fd::RawFd;

use crate::blk::GuestIoVecs;

/// One unit of work for an engine. Offsets and lengths are in bytes and already validated
/// against the image size.
#[derive(Debug)]
pub enum Op {
    /// Read into guest buffers.
    Read { offset: u64, bufs: GuestIoVecs },
    /// Write from guest buffers; `fua` makes it durable before it completes (write-through).
    Write {
        offset: u64,
        bufs: GuestIoVecs,
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Deallocate ranges. On a file they read back as zeros afterwards; a block device's
    /// discard may leave old data (virtio allows either).
    Discard { ranges: Vec<(u64, u64)> },
    /// Zero ranges; `unmap` allows deallocating instead of writing zeros.
    WriteZeroes {
        ranges: Vec<(u64, u64)>,
        unmap: bool,
    },
}

/// Result of one op: bytes transferred (0 for non-data ops) or the error.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: io::Result<u64>,
}

/// Static facts about the opened image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineInfo {
    pub size: u64,
    pub read_only: bool,
    /// Punch-hole works (DISCARD, and WRITE_ZEROES with UNMAP).
    pub discard: bool,
    /// Zero-range or punch-hole works (WRITE_ZEROES).
    pub write_zeroes: bool,
    /// Block size the host storage prefers (st_blksize), for the topology hint.
    pub physical_block_size: u32,
}

/// An opened image shared by all queues.
pub trait Engine: Send + Sync {
    /// Short name for logs ("sync", "direct").
    fn name(&self) -> &'static str;
    fn info(&self) -> &EngineInfo;
    /// The image size must stay a multiple of this (checked again on an online resize).
    fn size_granularity(&self) -> u64 {
        crate::blk::SECTOR_SIZE
    }
    /// Per-queue submission context; each worker owns one, so queues share no lock.
    fn new_queue(&self) -> io::Result<Box<dyn EngineQueue>>;
    /// Make all completed writes durable (shutdown, disconnect).
    fn sync_all(&self) -> io::Result<()>;
}

/// One queue's submission/completion context.
pub trait EngineQueue: Send {
    /// Queues `op`; its result is returned by a later [`reap`](Self::reap) with `tag`.
    fn submit(&mut self, tag: u64, op: Op);
    /// Hands everything queued by `submit` to the kernel (one syscall for all of it).
    fn commit(&mut self) {}
    /// Blocks until at least one in-flight op has completed (no-op for inline engines).
    fn wait(&mut self) {}
    /// Completions are ready to reap (checked without a syscall, for polling).
    fn has_completions(&mut self) -> bool {
        false
    }
    /// Moves finished ops into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);
    /// Like [`reap`](Self::reap), but an asynchronous engine takes at most `max` completions
    /// from the kernel and leaves the rest for the next reap, so the first can be handed back
    /// before the others are processed. Inline engines move everything.
    fn reap_max(&mut self, out: &mut Vec<Completion>, _max: usize) {
        self.reap(out);
    }
    /// Clears the completion fd's readiness once its event fired (asynchronous engines).
    /// Reaps leave it alone: a stale signal costs one spurious wake-up, a read per reap
    /// costs a syscall each time the worker looks for completions.
    fn clear_completion_event(&mut self) {}
    /// Ops submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// An fd that becomes readable when completions are ready (asynchronous engines).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Engine choice on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// O_DIRECT if the image supports it, else sync.
    Auto,
    /// Positional vectored I/O on the page cache, completed inline by the queue's worker.
    Sync,
    /// O_DIRECT with io_uring (thread-pool fallback): page-cache bypass, async submission.
    Direct,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Auto => "auto",
            EngineKind::Sync => "sync",
            EngineKind::Direct => "direct",
        })
    }
}
