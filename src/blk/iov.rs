//! Guest buffers as host iovecs, kept valid by holding the guest memory snapshot they point into.

use std::sync::Arc;

use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, Permissions};

/// Guest memory as the vhost-user glue maps it (no dirty-page bitmap: we do not migrate).
pub type GuestMem = GuestMemoryMmap<()>;

/// Checks that every mapped region is backed by its file: mmap accepts a mapping past the end
/// of a memfd, and touching it would SIGBUS the whole daemon.
pub fn check_regions(mem: &GuestMem) -> Result<(), String> {
    for r in vm_memory::GuestMemoryBackend::iter(mem) {
        let Some(fo) = r.file_offset() else { continue };
        let meta = fo
            .file()
            .metadata()
            .map_err(|e| format!("cannot stat region fd {}: {e}", fo.file().as_raw_fd()))?;
        let end = fo.start().checked_add(r.len());
        if end.is_none_or(|end| end > meta.len()) {
            return Err(format!(
                "memory region at {:#x} maps {} bytes at offset {} of a {}-byte file",
                r.start_addr().0,
                r.len(),
                fo.start(),
                meta.len()
            ));
        }
    }
    Ok(())
}

/// Failure to turn a guest (address, length) into host memory.
#[derive(Debug, thiserror::Error)]
#[error("guest buffer {addr:#x}+{len} is not in guest memory")]
pub struct OutOfGuestMemory {
    pub addr: u64,
    pub len: u64,
}

/// Host iovecs for guest buffers of one request.
///
/// The pointers stay valid while `mem` lives: a memory table update swaps in a new
/// `GuestMemoryMmap` but the regions referenced here are only unmapped once the last `Arc` goes,
/// so an in-flight request can never touch unmapped memory.
pub struct GuestIoVecs {
    iov: Vec<libc::iovec>,
    len: u64,
    _mem: Arc<GuestMem>,
}

// SAFETY: the iovecs point into shared guest mappings that `_mem` keeps alive; nothing in this
// type is tied to the creating thread, so moving it to an I/O thread is sound.
unsafe impl Send for GuestIoVecs {}

impl std::fmt::Debug for GuestIoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestIoVecs")
            .field("segments", &self.iov.len())
            .field("len", &self.len)
            .finish()
    }
}

impl GuestIoVecs {
    /// Resolves guest segments to host memory. Every byte must lie inside a guest region;
    /// segments that cross region boundaries become several iovecs.
    pub fn new(
        mem: &Arc<GuestMem>,
        segments: &[(GuestAddress, u32)],
        access: Permissions,
    ) -> Result<Self, OutOfGuestMemory> {
        let mut iov = Vec::with_capacity(segments.len());
        let mut len = 0u64;
        for &(addr, seg_len) in segments {
            let err = || OutOfGuestMemory {
                addr: addr.0,
                len: u64::from(seg_len),
            };
            if seg_len == 0 {
                continue;
            }
            let slices = mem
                .get_slices(addr, seg_len as usize, access)
                .map_err(|_| err())?;
            let mut got = 0usize;
            for slice in slices {
                let slice = slice.map_err(|_| err())?;
                got += slice.len();
                iov.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
            if got != seg_len as usize {
                return Err(err());
            }
            len += u64::from(seg_len);
        }
        Ok(GuestIoVecs {
            iov,
            len,
            _mem: Arc::clone(mem),
        })
    }

    /// Total bytes described.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The iovecs, for `preadv`/`pwritev`/io_uring. Valid while `self` lives.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Copies `src` into the start of the guest buffers; returns bytes copied.
    pub fn copy_from(&mut self, src: &[u8]) -> usize {
        let mut done = 0;
        for v in &self.iov {
            if done == src.len() {
                break;
            }
            let n = v.iov_len.min(src.len() - done);
            // SAFETY: `v` points to `iov_len` bytes of mapped guest memory kept alive by `_mem`
            // (checked in `new`); `src[done..done + n]` is in bounds; the two cannot overlap
            // because `src` is host memory owned by the caller.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr().add(done), v.iov_base.cast(), n);
            }
            done += n;
        }
        done
    }
}

impl GuestIoVecs {
    /// Calls `f(iovec_index_slice_ptr, len)` for the guest bytes `[off, off + len)` of this
    /// buffer list, segment by segment.
    fn for_range(&self, mut off: u64, mut len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        let mut done = 0usize;
        for v in &self.iov {
            if len == 0 {
                break;
            }
            let vlen = v.iov_len as u64;
            if off >= vlen {
                off -= vlen;
                continue;
            }
            let n = ((vlen - off) as usize).min(len);
            // SAFETY: off < iov_len, so the pointer stays inside this mapped guest segment.
            let p = unsafe { v.iov_base.cast::<u8>().add(off as usize) };
            f(p, n, done);
            done += n;
            len -= n;
            off = 0;
        }
    }

    /// Copies `dst.len()` guest bytes starting at byte `off` of this list into `dst`.
    pub fn read_at(&self, off: u64, dst: &mut [u8]) {
        let len = dst.len();
        self.for_range(off, len, |p, n, done| {
            // SAFETY: `p..p+n` is mapped guest memory kept alive by `_mem`; `dst[done..done+n]`
            // is in bounds because `for_range` hands out at most `len` bytes in total.
            unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr().add(done), n) }
        });
    }

    /// Copies `src` into the guest bytes starting at byte `off` of this list.
    pub fn write_at(&self, off: u64, src: &[u8]) {
        self.for_range(off, src.len(), |p, n, done| {
            // SAFETY: as in `read_at`, with the direction reversed.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), p, n) }
        });
    }
}
