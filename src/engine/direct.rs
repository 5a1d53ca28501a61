//! The O_DIRECT engine: page-cache bypass with io_uring submission (thread-pool fallback).
//!
//! Guest segments that satisfy the O_DIRECT alignment go to the kernel as they are (zero copy);
//! runs of unaligned segments are bounced through aligned buffers; a request whose offset or
//! length is not aligned (a 512-byte-sector guest on a 4 KiB-aligned file) is widened to whole
//! blocks, and writes do read-modify-write under a [`WriteGate`] so that a concurrent write to
//! another sector of the same block is never lost.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::aligned::{AlignedBuf, BufPool, align_down, align_up};
use super::aqueue::{AsyncQueue, IoKind, Prepared, Submitter};
use super::{Engine, EngineInfo, EngineQueue};
use crate::blk::GuestIoVecs;
use crate::image::{Image, Zeroing};

/// Bounce bytes a queue keeps cached for reuse.
pub const POOL_BYTES: usize = 8 << 20;
/// Bytes of bounce buffers and guest iovec tables a queue may hold for in-flight ops: bounds
/// the memory a guest can make us allocate, whatever it puts in its ring.
pub const BOUNCE_BUDGET: usize = 64 << 20;
/// A request whose bounce would not fit in the budget goes through a buffer this large, one
/// chunk after the other.
pub const CHUNK: usize = 4 << 20;

/// Budget charged for bouncing `payload` bytes: pool buffers may be up to twice the size asked.
fn bounce_charge(payload: usize) -> usize {
    payload.saturating_mul(2)
}

/// Budget charged for the iovec tables of an op: the guest's (kept until completion) and the
/// kernel's (plus its copy for the thread pool).
pub fn held_iov_bytes(guest_iovs: usize, kernel_iovs: usize) -> usize {
    (guest_iovs + 2 * kernel_iovs).saturating_mul(std::mem::size_of::<libc::iovec>())
}

/// O_DIRECT constraints of the open file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// Buffer address alignment.
    pub mem: u64,
    /// File offset and length alignment.
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("cannot open {path} with O_DIRECT")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "image size {size} is not a multiple of the O_DIRECT alignment {align}; use --engine sync"
    )]
    Size { size: u64, align: u64 },
}

/// Opens `path` with O_DIRECT and learns its alignment.
pub fn open_direct(path: &Path, read_only: bool) -> Result<(File, DioAlign), DirectError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| DirectError::Open {
            path: path.display().to_string(),
            source,
        })?;
    crate::image::skip_atime(&file);
    let align = probe_alignment(&file).map_err(|source| DirectError::Open {
        path: path.display().to_string(),
        source,
    })?;
    Ok((file, align))
}

/// statx(STATX_DIOALIGN) where the kernel knows it; else the logical block size of a block
/// device; else the smallest block size an O_DIRECT read accepts.
fn probe_alignment(file: &File) -> io::Result<DioAlign> {
    // SAFETY: statx is plain data; the kernel fills it; the path is a valid empty C string.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated empty path with AT_EMPTY_PATH, and a live statx buffer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        return Ok(DioAlign {
            mem: u64::from(stx.stx_dio_mem_align).max(1),
            offset: u64::from(stx.stx_dio_offset_align),
        });
    }
    if file.metadata()?.file_type().is_block_device()
        && let Some(ssz) = crate::image::device_block_ioctl(file, libc::BLKSSZGET)
    {
        let a = u64::from(ssz);
        return Ok(DioAlign { mem: a, offset: a });
    }
    for a in [512u64, 1024, 2048, 4096, 8192, 16384, 32768, 65536] {
        let mut buf = AlignedBuf::new(a as usize, 65536).ok_or(io::ErrorKind::OutOfMemory)?;
        // SAFETY: reads at most `a` bytes into a live buffer of `a` bytes.
        let r = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_slice().as_mut_ptr().cast(),
                a as usize,
                0,
            )
        };
        if r >= 0 {
            return Ok(DioAlign { mem: a, offset: a });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

/// Serialises read-modify-write against every other write to the same blocks, across queues.
/// Plain aligned writes share; an RMW is exclusive on its widened range.
/// A held range: `[lo, hi)`, exclusive, ticket id.
type Held = (u64, u64, bool, u64);

#[derive(Default)]
pub struct WriteGate {
    /// Next ticket id and the held ranges.
    held: Mutex<(u64, Vec<Held>)>,
    cv: Condvar,
}

/// Held while a write is in flight; dropping it releases the range.
pub struct GateTicket {
    gate: Arc<WriteGate>,
    id: u64,
}

impl Drop for GateTicket {
    fn drop(&mut self) {
        let mut g = self.gate.held.lock().unwrap_or_else(|p| p.into_inner());
        g.1.retain(|e| e.3 != self.id);
        drop(g);
        self.gate.cv.notify_all();
    }
}

impl WriteGate {
    /// Takes `[lo, hi)`, or returns `None` if a conflicting write holds part of it.
    pub fn try_acquire(self: &Arc<Self>, lo: u64, hi: u64, exclusive: bool) -> Option<GateTicket> {
        let mut g = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let conflict =
            g.1.iter()
                .any(|&(l, h, x, _)| l < hi && lo < h && (x || exclusive));
        if conflict {
            return None;
        }
        g.0 += 1;
        let id = g.0;
        g.1.push((lo, hi, exclusive, id));
        Some(GateTicket {
            gate: Arc::clone(self),
            id,
        })
    }

    /// Sleeps until some ticket is released (or a short timeout).
    pub fn wait(&self) {
        let g = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.cv.wait_timeout(g, Duration::from_millis(5));
    }
}

/// Shared state of the direct engine.
pub struct DirectShared {
    pub file: Arc<File>,
    /// The buffered fd, for discard / write-zeroes at sector granularity.
    pub sync_file: Arc<File>,
    pub align: DioAlign,
    /// Only needed when the file's block is larger than a sector (RMW is possible).
    pub gate: Option<Arc<WriteGate>>,
    pub zeroing: Zeroing,
}

pub struct DirectEngine {
    shared: Arc<DirectShared>,
    info: EngineInfo,
    io_uring: bool,
}

impl DirectEngine {
    pub fn new(
        image: &Image,
        file: File,
        align: DioAlign,
        io_uring: bool,
    ) -> Result<Self, DirectError> {
        let size = image.info.size;
        if !size.is_multiple_of(align.offset) {
            return Err(DirectError::Size {
                size,
                align: align.offset,
            });
        }
        let gate = (align.offset > crate::blk::SECTOR_SIZE).then(|| Arc::new(WriteGate::default()));
        Ok(DirectEngine {
            shared: Arc::new(DirectShared {
                file: Arc::new(file),
                sync_file: Arc::clone(&image.file),
                align,
                gate,
                zeroing: image.zeroing,
            }),
            info: image.info.clone(),
            io_uring,
        })
    }

    pub fn align(&self) -> DioAlign {
        self.shared.align
    }
}

impl Engine for DirectEngine {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn size_granularity(&self) -> u64 {
        self.shared.align.offset
    }

    fn new_queue(&self) -> io::Result<Box<dyn EngineQueue>> {
        let planner = Planner {
            shared: Arc::clone(&self.shared),
            pool: BufPool::new(self.shared.align.mem.max(512) as usize, POOL_BYTES),
        };
        Ok(Box::new(AsyncQueue::new(
            Arc::clone(&self.shared.file),
            Arc::clone(&self.shared.sync_file),
            self.shared.zeroing,
            Some(planner),
            self.io_uring,
        )?))
    }

    fn sync_all(&self) -> io::Result<()> {
        self.shared.file.sync_data()
    }
}

/// Turns guest reads/writes into O_DIRECT-legal transfers.
pub struct Planner {
    shared: Arc<DirectShared>,
    pool: BufPool,
}

/// A bounce: `len` bytes at `buf_off` of `buf` mirror guest bytes from `guest_off`.
pub struct Bounce {
    pub buf: AlignedBuf,
    pub buf_off: usize,
    pub guest_off: u64,
    pub len: usize,
}

impl Planner {
    pub fn recycle(&mut self, b: AlignedBuf) {
        self.pool.put(b);
    }

    /// Builds the transfer for a guest read or write; may block for RMW ordering, in which
    /// case `sub` is used to drain this queue's own in-flight writes first. `None`: the request
    /// was too large to bounce at once and has been carried out inline, in chunks.
    pub fn plan(
        &mut self,
        write: bool,
        offset: u64,
        bufs: GuestIoVecs,
        fua: bool,
        sub: &mut dyn Submitter,
    ) -> io::Result<Option<Prepared>> {
        let a = self.shared.align.offset;
        let m = self.shared.align.mem;
        let len = bufs.len();
        let end = offset + len;
        let direct_ok = offset.is_multiple_of(a)
            && len.is_multiple_of(a)
            && bufs.iovecs().iter().all(|v| {
                (v.iov_base as u64).is_multiple_of(m) && (v.iov_len as u64).is_multiple_of(a)
            });
        // Memory is bounded per queue whatever the guest sends: an op holds its guest iovec
        // table and, if bounced, buffers of at most twice its payload (pool buffers may be up to
        // twice the size asked for). Past the budget, wait for earlier ops to complete; a
        // request that alone would exceed it is bounced a chunk at a time, inline.
        let mut need = held_iov_bytes(bufs.iovecs().len(), bufs.iovecs().len());
        if !direct_ok {
            need += bounce_charge(len as usize + 2 * a as usize);
            if need > BOUNCE_BUDGET {
                return self.chunked(write, offset, &bufs, fua, sub).map(|()| None);
            }
        }
        while sub.bounce_in_flight() + need > BOUNCE_BUDGET && sub.in_flight_ops() > 0 {
            sub.wait_one()?;
        }
        let kind = if write {
            IoKind::Write { fua }
        } else {
            IoKind::Read
        };
        if offset.is_multiple_of(a) && len.is_multiple_of(a) {
            let ticket = match (&self.shared.gate, write) {
                (Some(g), true) => Some(acquire(g, offset, end, false, sub)?),
                _ => None,
            };
            let mut p = self.plan_aligned(kind, offset, bufs, m, a)?;
            p.ticket = ticket;
            return Ok(Some(p));
        }
        // Sub-block request: widen to whole blocks through one bounce buffer.
        let lo = align_down(offset, a);
        // The parser bounded `end` by the device size, a multiple of `a`, so `hi` stays inside.
        let hi = align_up(end, a).ok_or(io::ErrorKind::InvalidInput)?;
        let span = (hi - lo) as usize;
        let mut buf = self.pool.get(span).ok_or(io::ErrorKind::OutOfMemory)?;
        let head = (offset - lo) as usize;
        let mut ticket = None;
        if write {
            let g = self
                .shared
                .gate
                .as_ref()
                .ok_or(io::ErrorKind::InvalidInput)?;
            ticket = Some(acquire(g, lo, hi, true, sub)?);
            log::trace!("read-modify-write {offset}+{len} as {lo}..{hi}");
            // Read the partial head and tail blocks, then lay the guest data over them.
            let fd = &self.shared.file;
            let blocks = [
                (lo, !offset.is_multiple_of(a)),
                (hi - a, !end.is_multiple_of(a)),
            ];
            for (at, needed) in blocks {
                if needed {
                    let iov = [buf.iovec((at - lo) as usize, a as usize)];
                    super::sync::rw_all(fd, &iov, at, false, 0)?;
                }
            }
            bufs.read_at(0, &mut buf.as_mut_slice()[head..head + len as usize]);
        }
        let iov = vec![buf.iovec(0, span)];
        Ok(Some(Prepared {
            kind,
            offset: lo,
            iov,
            expect: span as u64,
            guest_len: len,
            bounces: vec![Bounce {
                buf,
                buf_off: head,
                guest_off: 0,
                len: len as usize,
            }],
            bufs: Some(bufs),
            ticket,
            charged: 0,
        }))
    }

    /// Carries out a request too large to bounce at once: `CHUNK` bytes at a time through one
    /// buffer, on this thread. Partial first and last blocks of a write are read first, under
    /// an exclusive gate, exactly as for a widened request.
    fn chunked(
        &mut self,
        write: bool,
        offset: u64,
        bufs: &GuestIoVecs,
        fua: bool,
        sub: &mut dyn Submitter,
    ) -> io::Result<()> {
        let a = self.shared.align.offset;
        let end = offset + bufs.len();
        let lo = align_down(offset, a);
        let hi = align_up(end, a).ok_or(io::ErrorKind::InvalidInput)?;
        let _ticket = match (&self.shared.gate, write) {
            (Some(g), true) => Some(acquire(g, lo, hi, lo != offset || hi != end, sub)?),
            _ => None,
        };
        let chunk = CHUNK.max(a as usize);
        let charge = bounce_charge(chunk);
        while sub.bounce_in_flight() + charge > BOUNCE_BUDGET && sub.in_flight_ops() > 0 {
            sub.wait_one()?;
        }
        let mut buf = self.pool.get(chunk).ok_or(io::ErrorKind::OutOfMemory)?;
        let fd = &self.shared.file;
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let mut at = lo;
        let result = (|| {
            while at < hi {
                let n = (hi - at).min(chunk as u64);
                // The guest bytes in this chunk: [g_lo, g_hi), at `g_lo - at` in the buffer.
                let (g_lo, g_hi) = (at.max(offset), (at + n).min(end));
                let (b_lo, b_hi) = ((g_lo - at) as usize, (g_hi - at) as usize);
                let iov = [buf.iovec(0, n as usize)];
                if write {
                    if b_lo > 0 {
                        super::sync::rw_all(fd, &[buf.iovec(0, a as usize)], at, false, 0)?;
                    }
                    if b_hi < n as usize {
                        let tail = [buf.iovec(n as usize - a as usize, a as usize)];
                        super::sync::rw_all(fd, &tail, at + n - a, false, 0)?;
                    }
                    bufs.read_at(g_lo - offset, &mut buf.as_mut_slice()[b_lo..b_hi]);
                    super::sync::rw_all(fd, &iov, at, true, flags)?;
                } else {
                    super::sync::rw_all(fd, &iov, at, false, 0)?;
                    bufs.write_at(g_lo - offset, &buf.as_slice()[b_lo..b_hi]);
                }
                at += n;
            }
            Ok(())
        })();
        self.pool.put(buf);
        result
    }

    /// Takes the gate exclusively on every block that `ranges` (bytes) cover only in part, for
    /// as long as the returned tickets live. Whole blocks need no fence: a write there overlaps
    /// the range itself, and the guest gets no ordering for overlapping requests in flight.
    pub fn fence_partial_blocks(
        &mut self,
        ranges: &[(u64, u64)],
        sub: &mut dyn Submitter,
    ) -> io::Result<Vec<GateTicket>> {
        let Some(g) = &self.shared.gate else {
            return Ok(Vec::new());
        };
        let a = self.shared.align.offset;
        let mut blocks: Vec<u64> = ranges
            .iter()
            .filter(|&&(_, len)| len > 0)
            .flat_map(|&(off, len)| {
                let end = off.saturating_add(len);
                let head = (!off.is_multiple_of(a)).then(|| align_down(off, a));
                let tail = (!end.is_multiple_of(a)).then(|| align_down(end, a));
                head.into_iter().chain(tail)
            })
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        // Distinct blocks never conflict with each other, so taking them one by one cannot
        // wait on our own tickets.
        blocks
            .into_iter()
            .map(|b| acquire(g, b, b + a, true, sub))
            .collect()
    }

    fn plan_aligned(
        &mut self,
        kind: IoKind,
        offset: u64,
        bufs: GuestIoVecs,
        m: u64,
        a: u64,
    ) -> io::Result<Prepared> {
        let write = matches!(kind, IoKind::Write { .. });
        let mut iov = Vec::with_capacity(bufs.iovecs().len());
        let mut bounces = Vec::new();
        // A run of consecutive unaligned segments, bounced together once its length is a
        // multiple of the block size.
        let mut run: Option<(u64, usize)> = None;
        let mut guest_off = 0u64;
        for v in bufs.iovecs() {
            let good =
                (v.iov_base as u64).is_multiple_of(m) && (v.iov_len as u64).is_multiple_of(a);
            match (&mut run, good) {
                (None, true) => iov.push(*v),
                (None, false) => run = Some((guest_off, v.iov_len)),
                (Some((_, rl)), _) => *rl += v.iov_len,
            }
            guest_off += v.iov_len as u64;
            if let Some((start, rl)) = run
                && (rl as u64).is_multiple_of(a)
            {
                let mut buf = self.pool.get(rl).ok_or(io::ErrorKind::OutOfMemory)?;
                if write {
                    bufs.read_at(start, &mut buf.as_mut_slice()[..rl]);
                }
                iov.push(buf.iovec(0, rl));
                bounces.push(Bounce {
                    buf,
                    buf_off: 0,
                    guest_off: start,
                    len: rl,
                });
                run = None;
            }
        }
        let len = bufs.len();
        Ok(Prepared {
            kind,
            offset,
            iov,
            expect: len,
            guest_len: len,
            bounces,
            bufs: Some(bufs),
            ticket: None,
            charged: 0,
        })
    }
}

/// Takes a gate range, draining this queue's own in-flight ops while waiting so two queues
/// can never wait on each other's unreaped completions.
fn acquire(
    g: &Arc<WriteGate>,
    lo: u64,
    hi: u64,
    exclusive: bool,
    sub: &mut dyn Submitter,
) -> io::Result<GateTicket> {
    loop {
        if let Some(t) = g.try_acquire(lo, hi, exclusive) {
            return Ok(t);
        }
        if sub.in_flight_ops() > 0 {
            sub.wait_one()?;
        } else {
            g.wait();
        }
    }
}
