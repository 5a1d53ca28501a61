//! The libblkio client: connection, queues, the mapped buffer region, request helpers.

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::ffi::CStr;
use std::fmt;
use std::mem::MaybeUninit;
use std::path::Path;

use super::{IO_TIMEOUT, MIB};

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
