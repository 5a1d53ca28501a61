//! Aligned host buffers for O_DIRECT bounces, and the alignment arithmetic.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Rounds `v` down to a multiple of `a` (a power of two).
pub fn align_down(v: u64, a: u64) -> u64 {
    v & !(a - 1)
}

/// Rounds `v` up to a multiple of `a` (a power of two); `None` on overflow.
pub fn align_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? & !(a - 1))
}

/// Buffers at least this large are mapped straight from the kernel and unmapped when dropped.
/// glibc would carve them out of an arena with `memalign`, whose over-sized requests leave
/// freed buffers just too small to reuse: bounce traffic then grows the heap far beyond the
/// bytes actually live (hundreds of MiB for a 64 MiB bounce budget).
const MMAP_MIN: usize = 128 << 10;

fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

/// A zero-initialised buffer whose start is aligned to `align` bytes.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    /// Mapped with mmap (unmapped on drop) rather than taken from the allocator.
    mapped: bool,
}

// SAFETY: the buffer is uniquely owned plain memory; no thread affinity.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `None` if `len` is 0 or the allocation fails (callers turn that into IOERR).
    pub fn new(len: usize, align: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(len, align).ok()?;
        if layout.size() == 0 {
            return None;
        }
        if len >= MMAP_MIN && align <= page_size() {
            // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return None;
            }
            let ptr = NonNull::new(p.cast::<u8>())?;
            return Some(AlignedBuf {
                ptr,
                layout,
                mapped: true,
            });
        }
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(AlignedBuf {
            ptr,
            layout,
            mapped: false,
        })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn align(&self) -> usize {
        self.layout.align()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    /// An iovec for `len` bytes from `off` (clamped to the buffer).
    pub fn iovec(&mut self, off: usize, len: usize) -> libc::iovec {
        let off = off.min(self.len());
        let len = len.min(self.len() - off);
        libc::iovec {
            // SAFETY: off <= len of the allocation, so the pointer stays in bounds.
            iov_base: unsafe { self.ptr.as_ptr().add(off) }.cast(),
            iov_len: len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in `new` with exactly this length and not unmapped before.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.layout.size()) };
        } else {
            // SAFETY: allocated in `new` with exactly this layout and not freed before.
            unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

/// A small per-queue free list, so steady-state bounces do not hit the allocator.
pub struct BufPool {
    align: usize,
    free: Vec<AlignedBuf>,
    /// Bytes kept in `free`; above this, returned buffers are dropped.
    cap_bytes: usize,
    kept: usize,
}

impl BufPool {
    pub fn new(align: usize, cap_bytes: usize) -> Self {
        BufPool {
            align,
            free: Vec::new(),
            cap_bytes,
            kept: 0,
        }
    }

    /// A buffer of at least `len` bytes (contents unspecified).
    pub fn get(&mut self, len: usize) -> Option<AlignedBuf> {
        if let Some(i) = self
            .free
            .iter()
            .position(|b| b.len() >= len && b.len() <= len * 2)
        {
            let b = self.free.swap_remove(i);
            self.kept -= b.len();
            return Some(b);
        }
        // Round to a power of two so buffers are reusable across slightly different sizes.
        AlignedBuf::new(len.next_power_of_two().max(self.align), self.align)
    }

    pub fn put(&mut self, b: AlignedBuf) {
        if b.align() == self.align && self.kept + b.len() <= self.cap_bytes {
            self.kept += b.len();
            self.free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_math() {
        assert_eq!(align_down(4097, 4096), 4096);
        assert_eq!(align_up(4097, 4096), Some(8192));
        assert_eq!(align_up(4096, 4096), Some(4096));
        assert_eq!(align_up(u64::MAX, 4096), None);
    }

    #[test]
    fn buffers_are_aligned_and_pooled() {
        let mut p = BufPool::new(4096, 1 << 20);
        let mut b = p.get(5000).unwrap();
        assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
        assert!(b.len() >= 5000);
        b.as_mut_slice()[4999] = 7;
        let ptr = b.as_slice().as_ptr();
        p.put(b);
        let b2 = p.get(6000).unwrap();
        assert_eq!(b2.as_slice().as_ptr(), ptr, "reused from the pool");
        assert!(AlignedBuf::new(0, 4096).is_none());
        let mut b3 = AlignedBuf::new(8192, 512).unwrap();
        let v = b3.iovec(8000, 4096);
        assert_eq!(v.iov_len, 192);
        // Large buffers are mapped: aligned, zeroed, writable.
        let mut big = AlignedBuf::new(4 << 20, 4096).unwrap();
        assert!(big.mapped);
        assert_eq!(big.as_slice().as_ptr() as usize % 4096, 0);
        assert!(big.as_slice().iter().all(|&b| b == 0));
        big.as_mut_slice()[(4 << 20) - 1] = 1;
    }
}
