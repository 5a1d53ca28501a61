//! The sync engine: `preadv2`/`pwritev2` at an offset straight between guest memory and the
//! image (zero copy), `fdatasync` for flush, `fallocate` for discard and write-zeroes. The file
//! is shared by all queues without a lock: positional I/O needs none. On tmpfs, reads and
//! writes of allocated pages go through a mapping of the image instead (see [`super::mapped`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::mapped::Mapped;
use super::{Completion, Engine, EngineInfo, EngineQueue, Op};
use crate::image::{Image, Zeroing};

/// Bytes of zeros written per call when the filesystem cannot zero a range itself.
const ZERO_CHUNK: usize = 1 << 20;

pub struct SyncEngine {
    mapped: Option<Arc<Mapped>>,
    file: Arc<File>,
    info: EngineInfo,
    zeroing: Zeroing,
}

impl SyncEngine {
    pub fn new(image: &Image) -> Self {
        let mapped = crate::image::on_tmpfs(&image.file)
            .then(|| Mapped::open(&image.file))
            .flatten()
            .map(Arc::new);
        if let Some(m) = &mapped {
            m.prefault();
        }
        SyncEngine {
            mapped,
            file: Arc::clone(&image.file),
            info: image.info.clone(),
            zeroing: image.zeroing,
        }
    }

    /// Serves reads and writes through a mapping of the image (tmpfs) rather than syscalls.
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }
}

impl Engine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn new_queue(&self) -> io::Result<Box<dyn EngineQueue>> {
        Ok(Box::new(SyncQueue {
            mapped: self.mapped.clone(),
            file: Arc::clone(&self.file),
            zeroing: self.zeroing,
            done: Vec::new(),
        }))
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

struct SyncQueue {
    mapped: Option<Arc<Mapped>>,
    file: Arc<File>,
    zeroing: Zeroing,
    done: Vec<Completion>,
}

impl EngineQueue for SyncQueue {
    fn submit(&mut self, tag: u64, op: Op) {
        let result = match &self.mapped {
            Some(m) => execute_mapped(m, &self.file, self.zeroing, op),
            None => execute(&self.file, self.zeroing, op),
        };
        self.done.push(Completion { tag, result });
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

/// [`execute`], keeping the mapping's page map in step: reads and writes of allocated pages go
/// through the mapping, successful syscall writes mark their pages, and pages about to be
/// deallocated are dropped from it first. FUA writes keep `pwritev2` with RWF_DSYNC: rare, and
/// the flag's meaning stays the kernel's.
fn execute_mapped(m: &Mapped, file: &File, z: Zeroing, op: Op) -> io::Result<u64> {
    let written = match &op {
        Op::Read { offset, bufs } => {
            if let Some(r) = m.read(*offset, bufs.iovecs(), bufs.len()) {
                return r;
            }
            None
        }
        Op::Write { offset, bufs, fua } => {
            if !*fua && let Some(r) = m.write(*offset, bufs.iovecs(), bufs.len()) {
                return r;
            }
            Some((*offset, bufs.len()))
        }
        Op::Discard { ranges } | Op::WriteZeroes { ranges, .. } => {
            for &(off, len) in ranges {
                m.forget(off, len);
            }
            None
        }
        Op::Flush => None,
    };
    let r = execute(file, z, op);
    if let (Ok(_), Some((off, len))) = (&r, written) {
        m.mark(off, len);
    }
    r
}

pub(crate) fn execute(file: &File, z: Zeroing, op: Op) -> io::Result<u64> {
    match op {
        Op::Read { offset, bufs } => {
            rw_all(file, bufs.iovecs(), offset, false, 0)?;
            Ok(bufs.len())
        }
        Op::Write { offset, bufs, fua } => {
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            rw_all(file, bufs.iovecs(), offset, true, flags)?;
            Ok(bufs.len())
        }
        Op::Flush => file.sync_data().map(|_| 0),
        Op::Discard { ranges } => {
            for (off, len) in ranges {
                discard(file, z.device_block, off, len)?;
            }
            Ok(0)
        }
        Op::WriteZeroes { ranges, unmap } => {
            for (off, len) in ranges {
                write_zeroes(file, z.zero_range, off, len, unmap)?;
            }
            Ok(0)
        }
    }
}

/// BLKDISCARD = _IO(0x12, 119): discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
pub(crate) const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub(crate) const ZERO: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

pub(crate) fn fallocate(file: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (off, len) = (to_off(off)?, to_off(len)?);
    loop {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Deallocates a range. A file gets a hole (reads back zeros). A block device gets a plain
/// discard (BLKDISCARD: the range may keep its old data, which virtio allows), or, if its queue
/// takes no discards, the kernel's zeroout with unmap allowed (punch-hole on a device), which
/// needs its write-zeroes offload. A discard is a hint: where both are refused it is dropped
/// (as in QEMU), and since a device refuses a range that is not aligned to its logical block,
/// only the aligned interior of such a range is deallocated.
fn discard(file: &File, device_block: Option<u64>, off: u64, len: u64) -> io::Result<()> {
    let Some(block) = device_block else {
        return fallocate(file, PUNCH, off, len);
    };
    let lo = off.next_multiple_of(block);
    let hi = off.saturating_add(len) / block * block;
    if hi <= lo {
        return Ok(());
    }
    let range: [u64; 2] = [lo, hi - lo];
    // SAFETY: BLKDISCARD reads two u64s (start, length) through the pointer, which points to a
    // live local array.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    match fallocate(file, PUNCH, lo, hi - lo) {
        // Neither way is open (a queue with write-zeroes but no discards can refuse the
        // unmapping zeroout too). The guest only said it no longer needs the range.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| log::info!("the device refuses discards; they are ignored"));
            Ok(())
        }
        r => r,
    }
}

/// Zeroes a range: deallocate if allowed, else zero-range, else plain writes of zeros.
fn write_zeroes(file: &File, zero_range: bool, off: u64, len: u64, unmap: bool) -> io::Result<()> {
    if unmap && fallocate(file, PUNCH, off, len).is_ok() {
        return Ok(());
    }
    if zero_range && fallocate(file, ZERO, off, len).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        let iov = [libc::iovec {
            iov_base: zeros.as_ptr() as *mut libc::c_void,
            iov_len: n,
        }];
        rw_all(file, &iov, off + done, true, 0)?;
        done += n as u64;
    }
    Ok(())
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Transfers every byte of `iov` at `offset`, resuming after short transfers. `iov` must point
/// to memory valid for the whole call (guest memory pinned by a `GuestIoVecs`, or a local).
pub(crate) fn rw_all(
    file: &File,
    iov: &[libc::iovec],
    mut offset: u64,
    write: bool,
    flags: libc::c_int,
) -> io::Result<()> {
    // Work on a copy so a short transfer can advance into the middle of a segment.
    let mut iov: Vec<libc::iovec> = iov.iter().filter(|v| v.iov_len > 0).copied().collect();
    let mut start = 0;
    while start < iov.len() {
        let cnt = (iov.len() - start).min(libc::UIO_MAXIOV as usize);
        let off = to_off(offset)?;
        let ptr = iov[start..].as_ptr();
        // SAFETY: `ptr[..cnt]` are iovecs describing memory the caller keeps valid and that no
        // Rust reference aliases mutably (guest memory or a local buffer); the kernel bounds
        // the transfer by those lengths.
        let n = unsafe {
            if write {
                libc::pwritev2(file.as_raw_fd(), ptr, cnt as libc::c_int, off, flags)
            } else {
                libc::preadv2(file.as_raw_fd(), ptr, cnt as libc::c_int, off, flags)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // The image shrank under us (someone truncated it): fail instead of spinning.
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && start < iov.len() {
            let v = &mut iov[start];
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                // SAFETY: n < iov_len, so the advanced pointer stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}
