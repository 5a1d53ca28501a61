//! A hand-made vhost-user frontend for the hostile-frontend tests (`tests/hostile.rs`), built on
//! the `vhost` crate's `Frontend` plus raw messages on a clone of its socket.
//!
//! * [`GuestMem`]: a memfd mapped in the test. The region handed to the daemon is a window of it,
//!   so bytes on both sides of the region are visible too. Every frontend write goes through it
//!   and into a shadow copy; [`GuestMem::assert_untouched`] compares the memfd with the shadow
//!   everywhere except the used ring and the ranges declared device-writable.
//! * [`Guest`]: a connected frontend with one region and a split ring on queue 0; it writes
//!   descriptors, avail entries and request headers, kicks, and polls the used ring.
//! * [`raw_msg`] / [`Reply`]: bytes on the socket, for what `Frontend` will not send.
//!
//! Included by `tests/hostile.rs` as `#[path = "common/frontend.rs"] mod frontend;`.
#![allow(dead_code)]

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering, fence};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Error as VuError, Frontend, VhostUserFrontend};
use vhost::{Error as VhostError, VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::common::{Rng, assert_bytes_eq, read_file_at};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
const EVENT_IDX: u64 = 1 << 29;

/// How long a request the daemon should answer may take.
pub const USED_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we watch for something that must not happen (a write, a completion).
pub const QUIET: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------------------------
// Guest memory
// ---------------------------------------------------------------------------------------------

/// A memfd mapped shared in the test; the daemon gets the window `[region_off, +region_len)` at
/// guest address `gpa`.
pub struct GuestMem {
    file: File,
    ptr: *mut u8,
    file_len: usize,
    shadow: Vec<u8>,
    /// File-offset ranges the device may write (device-writable buffers, the used ring).
    writable: Vec<(usize, usize)>,
    pub region_off: usize,
    pub region_len: usize,
    pub gpa: u64,
}

pub fn memfd(name: &str, len: usize) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: plain syscall with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len as u64).expect("ftruncate memfd");
    f
}

impl GuestMem {
    pub fn new(file_len: usize, region_off: usize, region_len: usize, gpa: u64) -> GuestMem {
        let file = memfd("vublk-hostile-guest", file_len);
        // SAFETY: mapping a file we own, shared, at a kernel-chosen address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                file_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap memfd");
        GuestMem {
            file,
            ptr: ptr.cast(),
            file_len,
            shadow: vec![0; file_len],
            writable: Vec::new(),
            region_off,
            region_len,
            gpa,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The frontend's virtual address for guest address `gpa` (also outside the region).
    pub fn va(&self, gpa: u64) -> u64 {
        (self.ptr as u64 + self.region_off as u64).wrapping_add(gpa.wrapping_sub(self.gpa))
    }

    pub fn end(&self) -> u64 {
        self.gpa + self.region_len as u64
    }

    /// The region as SET_MEM_TABLE / ADD_MEM_REG describe it.
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.region_len as u64,
            userspace_addr: self.va(self.gpa),
            mmap_offset: self.region_off as u64,
            mmap_handle: self.fd(),
        }
    }

    fn off(&self, gpa: u64, len: usize) -> usize {
        assert!(
            gpa >= self.gpa && gpa - self.gpa + len as u64 <= self.region_len as u64,
            "test bug: {gpa:#x}+{len} outside the region"
        );
        self.region_off + (gpa - self.gpa) as usize
    }

    pub fn write(&mut self, gpa: u64, data: &[u8]) {
        let off = self.off(gpa, data.len());
        self.shadow[off..off + data.len()].copy_from_slice(data);
        // SAFETY: in bounds of our mapping (checked by off()).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let off = self.off(gpa, len);
        self.read_file_bytes(off, len)
    }

    fn read_file_bytes(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        fence(Ordering::Acquire);
        // SAFETY: in bounds of our mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), len) };
        v
    }

    fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        let off = self.off(gpa, 2);
        // SAFETY: in bounds, 2-aligned (ring fields are), shared memory lives as long as self.
        unsafe { AtomicU16::from_ptr(self.ptr.add(off).cast()) }
    }

    pub fn load_u16(&self, gpa: u64) -> u16 {
        u16::from_le(self.atomic_u16(gpa).load(Ordering::Acquire))
    }

    /// A release store (the avail index), recorded in the shadow.
    pub fn store_u16(&mut self, gpa: u64, v: u16) {
        let off = self.off(gpa, 2);
        self.shadow[off..off + 2].copy_from_slice(&v.to_le_bytes());
        self.atomic_u16(gpa).store(v.to_le(), Ordering::Release);
    }

    /// Fills the whole memfd (inside and outside the region) with a seeded pattern.
    pub fn fill_canary(&mut self, seed: u64) {
        Rng::new(seed).fill(&mut self.shadow);
        // SAFETY: whole mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.shadow.as_ptr(), self.ptr, self.file_len) };
    }

    /// Declares `[gpa, +len)` device-writable (the part inside the region; nothing outside it
    /// may ever change).
    pub fn allow_write(&mut self, gpa: u64, len: u64) {
        let start = gpa.max(self.gpa);
        let end = gpa.saturating_add(len).min(self.end());
        if start < end {
            let off = self.off(start, (end - start) as usize);
            self.writable.push((off, off + (end - start) as usize));
        }
    }

    /// Panics if any byte outside the device-writable ranges differs from what the frontend
    /// wrote.
    #[track_caller]
    pub fn assert_untouched(&self, what: &str) {
        if let Err(e) = self.check_untouched() {
            panic!("{what}: {e}");
        }
    }

    /// Takes the memory as it is now as the expected contents (after a stray write has been
    /// reported), so later checks see only new damage.
    pub fn accept_current(&mut self) {
        self.shadow = self.read_file_bytes(0, self.file_len);
    }

    /// [`GuestMem::assert_untouched`] as a result.
    pub fn check_untouched(&self) -> Result<(), String> {
        let now = self.read_file_bytes(0, self.file_len);
        let allowed = |i: usize| self.writable.iter().any(|&(s, e)| i >= s && i < e);
        let bad: Vec<usize> = (0..self.file_len)
            .filter(|&i| now[i] != self.shadow[i] && !allowed(i))
            .collect();
        let Some(&first) = bad.first() else {
            return Ok(());
        };
        let where_ = |off: usize| {
            if off < self.region_off || off >= self.region_off + self.region_len {
                format!("file offset {off:#x}, OUTSIDE the region")
            } else {
                format!(
                    "guest address {:#x}",
                    self.gpa + (off - self.region_off) as u64
                )
            }
        };
        let end = (first + 16).min(self.file_len);
        Err(format!(
            "the daemon wrote {} byte(s) it may not write; first at {}: now {:02x?}, expected \
             {:02x?}; last at {}",
            bad.len(),
            where_(first),
            &now[first..end],
            &self.shadow[first..end],
            where_(*bad.last().unwrap())
        ))
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.file_len) };
    }
}

// ---------------------------------------------------------------------------------------------
// Raw messages
// ---------------------------------------------------------------------------------------------

/// Sends `code`/`flags`/`payload` (the header's size field is `size`, or the payload length),
/// with `fds` attached. Errors are returned (the daemon may have closed the socket).
pub fn raw_msg(
    s: &UnixStream,
    code: u32,
    flags: u32,
    size: Option<u32>,
    payload: &[u8],
    fds: &[RawFd],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(12 + payload.len());
    buf.extend_from_slice(&code.to_le_bytes());
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.extend_from_slice(&size.unwrap_or(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    send_with_fds(s, &buf, fds)
}

/// Sends bytes as they are (e.g. a truncated header).
pub fn send_with_fds(s: &UnixStream, buf: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; we fill in every field we use.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` bytes, enough for one cmsg with `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    // SAFETY: msg points at live buffers.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    assert_eq!(n as usize, buf.len(), "short sendmsg");
    Ok(())
}

/// What the daemon did with a message that asked for a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// A reply: request code, flags, payload.
    Msg(u32, u32, Vec<u8>),
    /// The daemon closed the connection.
    Closed,
}

impl Reply {
    /// The u64 of a REPLY_ACK / u64 reply.
    pub fn value(&self) -> Option<u64> {
        match self {
            Reply::Msg(_, _, p) if p.len() >= 8 => {
                Some(u64::from_le_bytes(p[..8].try_into().ok()?))
            }
            _ => None,
        }
    }

    /// A refusal: a REPLY_ACK with a non-zero value, or a closed connection.
    pub fn is_refusal(&self) -> bool {
        match self {
            Reply::Closed => true,
            Reply::Msg(_, flags, p) => flags & 0x4 != 0 && p.len() == 8 && self.value() != Some(0),
        }
    }
}

/// Reads one reply (or EOF); panics if nothing arrives within `USED_TIMEOUT` (a hang).
pub fn raw_reply(s: &UnixStream) -> Reply {
    s.set_read_timeout(Some(USED_TIMEOUT)).unwrap();
    let mut r = s;
    let mut hdr = [0u8; 12];
    let mut got = 0;
    while got < 12 {
        match r.read(&mut hdr[got..]) {
            Ok(0) => return Reply::Closed,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Reply::Closed,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("no reply from the daemon within {USED_TIMEOUT:?}: {e}"),
        }
    }
    let le = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    let mut payload = vec![0u8; le(&hdr[8..12]) as usize];
    r.read_exact(&mut payload).expect("reply payload");
    Reply::Msg(le(&hdr[0..4]), le(&hdr[4..8]), payload)
}

/// Header flags of a request that wants an ack: version 1 | NEED_REPLY.
pub const NEED_REPLY: u32 = 0x1 | 0x8;

/// The outcome of a `Frontend` call that sent a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// REPLY_ACK with a non-zero value.
    Nacked,
    Closed,
}

pub fn outcome(r: Result<(), VhostError>) -> Outcome {
    match r {
        Ok(()) => Outcome::Accepted,
        Err(VhostError::VhostUserProtocol(VuError::BackendInternalError)) => Outcome::Nacked,
        Err(VhostError::VhostUserProtocol(
            VuError::Disconnected
            | VuError::PartialMessage
            | VuError::SocketBroken(_)
            | VuError::SocketError(_),
        )) => Outcome::Closed,
        Err(e) => panic!("frontend call failed on our side, not the daemon's: {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The guest: a connection, memory and one ring
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Opts {
    pub queue_size: u16,
    pub event_idx: bool,
    /// Memory via ADD_MEM_REG (as libblkio does) instead of SET_MEM_TABLE.
    pub add_mem_reg: bool,
    pub gpa: u64,
    pub region_len: usize,
    /// Bytes of memfd on each side of the region (visible to the canary check only).
    pub margin: usize,
    /// Also ack BACKEND_REQ (the caller then sends SET_BACKEND_REQ_FD itself).
    pub backend_channel: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            queue_size: 64,
            event_idx: true,
            add_mem_reg: false,
            gpa: 0x10_0000,
            region_len: 1 << 20,
            margin: 64 << 10,
            backend_channel: false,
        }
    }
}

/// Ring layout inside the region (offsets from its start); the rest holds buffers.
const DESC_OFF: u64 = 0;
const AVAIL_OFF: u64 = 0x4000;
const USED_OFF: u64 = 0x5000;
const BUF_OFF: u64 = 0x8000;

pub struct Ring {
    pub index: u32,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    pub fn used_bytes(&self) -> u64 {
        4 + 8 * u64::from(self.size) + 2
    }
}

/// A request placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct Req {
    pub head: u16,
    pub sector: u64,
    pub data: u64,
    pub len: usize,
    pub status: u64,
}

pub struct Guest {
    pub fe: Frontend,
    /// The same socket, for raw messages.
    pub sock: UnixStream,
    pub mem: GuestMem,
    pub ring: Ring,
    pub image: PathBuf,
    add_mem_reg: bool,
    next_desc: u16,
    next_buf: u64,
}

impl Guest {
    /// Connects and negotiates features, memory and queue 0 (panics on any refusal).
    pub fn connect(socket: &Path, image: &Path, opts: Opts) -> Guest {
        let mut g = Guest::handshake(socket, image, opts);
        g.send_mem_table().expect("memory table refused");
        g.start_ring().expect("ring setup refused");
        g
    }

    /// Connects and negotiates features only; memory is filled with the canary and the ring
    /// structures are zeroed, but the daemon has been told about neither.
    pub fn handshake(socket: &Path, image: &Path, opts: Opts) -> Guest {
        let s = UnixStream::connect(socket).expect("connect to the daemon");
        s.set_read_timeout(Some(USED_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(USED_TIMEOUT)).unwrap();
        let sock = s.try_clone().unwrap();
        // max_queue_num is only the frontend's own limit: out-of-range indexes must reach the
        // daemon.
        let mut fe = Frontend::from_stream(s, 256);
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        assert!(offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
        let mut ack = offered;
        if !opts.event_idx {
            ack &= !EVENT_IDX;
        }
        fe.set_features(ack).expect("SET_FEATURES");
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let mut want = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if opts.backend_channel {
            want |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        assert!(pf.contains(want), "protocol features {pf:?} lack {want:?}");
        fe.set_protocol_features(want)
            .expect("SET_PROTOCOL_FEATURES");
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);

        let mut mem = GuestMem::new(
            opts.region_len + 2 * opts.margin,
            opts.margin,
            opts.region_len,
            opts.gpa,
        );
        mem.fill_canary(opts.gpa ^ u64::from(opts.queue_size));
        let size = opts.queue_size;
        let ring = Ring {
            index: 0,
            size,
            desc: opts.gpa + DESC_OFF,
            avail: opts.gpa + AVAIL_OFF,
            used: opts.gpa + USED_OFF,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
            used_seen: 0,
        };
        // A driver zeroes its rings; the descriptor table keeps the canary (unused entries).
        mem.write(ring.avail, &vec![0; 4 + 2 * usize::from(size) + 2]);
        mem.write(ring.used, &vec![0; ring.used_bytes() as usize]);
        mem.allow_write(ring.used, ring.used_bytes());
        Guest {
            fe,
            sock,
            mem,
            ring,
            image: image.to_path_buf(),
            add_mem_reg: opts.add_mem_reg,
            next_desc: 0,
            next_buf: opts.gpa + BUF_OFF,
        }
    }

    /// SET_MEM_TABLE (or ADD_MEM_REG) with our one region.
    pub fn send_mem_table(&mut self) -> Result<(), VhostError> {
        if self.add_mem_reg {
            self.fe.add_mem_region(&self.mem.region()).map(|_| ())
        } else {
            self.fe.set_mem_table(&[self.mem.region()]).map(|_| ())
        }
    }

    /// The ring's addresses as the frontend reports them.
    pub fn vring_config(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.ring.size,
            queue_size: self.ring.size,
            flags: 0,
            desc_table_addr: self.mem.va(self.ring.desc),
            used_ring_addr: self.mem.va(self.ring.used),
            avail_ring_addr: self.mem.va(self.ring.avail),
            log_addr: None,
        }
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE for queue 0.
    pub fn start_ring(&mut self) -> Result<(), VhostError> {
        let i = self.ring.index as usize;
        self.fe.set_vring_num(i, self.ring.size)?;
        self.fe.set_vring_addr(i, &self.vring_config())?;
        self.fe.set_vring_base(i, 0)?;
        self.fe.set_vring_call(i, &self.ring.call)?;
        self.fe.set_vring_kick(i, &self.ring.kick)?;
        self.fe.set_vring_enable(i, true)
    }

    // --- building requests ---------------------------------------------------------------

    /// Moves the ring (guest addresses; parts outside the region are left alone): zeroes what
    /// lies inside the region and lets the device write its used ring there.
    pub fn move_ring(&mut self, desc: u64, avail: u64, used: u64) {
        let size = usize::from(self.ring.size);
        for (a, len) in [
            (avail, 4 + 2 * size + 2),
            (used, self.ring.used_bytes() as usize),
        ] {
            let (s, e) = (a.max(self.mem.gpa), (a + len as u64).min(self.mem.end()));
            if s < e {
                self.mem.write(s, &vec![0; (e - s) as usize]);
            }
        }
        self.mem.allow_write(used, self.ring.used_bytes());
        (self.ring.desc, self.ring.avail, self.ring.used) = (desc, avail, used);
    }

    /// Lets the next requests reuse descriptors from index 0 (earlier ones must be complete).
    pub fn reuse_descs(&mut self) {
        self.next_desc = 0;
    }

    /// `n` consecutive descriptor indexes.
    pub fn alloc_descs(&mut self, n: u16) -> u16 {
        let i = self.next_desc;
        assert!(i + n <= self.ring.size, "test bug: out of descriptors");
        self.next_desc += n;
        i
    }

    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_desc(self.ring.desc, i, addr, len, flags, next);
    }

    /// Writes entry `i` of the descriptor table at `table` (the ring's or an indirect one).
    pub fn write_desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(table + 16 * u64::from(i), &d);
    }

    /// Guest memory for the frontend's own data (the device may not write it).
    pub fn buf(&mut self, len: usize) -> u64 {
        let a = self.next_buf;
        self.next_buf = (a + len as u64).next_multiple_of(16);
        assert!(
            self.next_buf <= self.mem.end(),
            "test bug: out of guest memory"
        );
        a
    }

    /// A device-writable buffer (keeps the canary until the device writes it).
    pub fn wbuf(&mut self, len: usize) -> u64 {
        let a = self.buf(len);
        self.mem.allow_write(a, len as u64);
        a
    }

    /// A request header in guest memory.
    pub fn hdr(&mut self, kind: u32, sector: u64) -> u64 {
        let a = self.buf(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(a, &h);
        a
    }

    /// Consecutive descriptors linked with NEXT: `(addr, len, device-writable)`; returns the head.
    pub fn chain(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let first = self.alloc_descs(parts.len() as u16);
        for (k, &(addr, len, w)) in parts.iter().enumerate() {
            let i = first + k as u16;
            let last = k + 1 == parts.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.set_desc(i, addr, len, flags, if last { 0 } else { i + 1 });
        }
        first
    }

    /// A valid read of `sectors` 512-byte sectors: header, data, status.
    pub fn read_req(&mut self, sector: u64, sectors: usize) -> Req {
        let len = sectors * 512;
        let hdr = self.hdr(T_IN, sector);
        let data = self.wbuf(len);
        let status = self.wbuf(1);
        let head = self.chain(&[
            (hdr, 16, false),
            (data, len as u32, true),
            (status, 1, true),
        ]);
        Req {
            head,
            sector,
            data,
            len,
            status,
        }
    }

    /// A valid write of `data` (a multiple of 512 bytes).
    pub fn write_req(&mut self, sector: u64, data: &[u8]) -> Req {
        let hdr = self.hdr(T_OUT, sector);
        let buf = self.buf(data.len());
        self.mem.write(buf, data);
        let status = self.wbuf(1);
        let head = self.chain(&[
            (hdr, 16, false),
            (buf, data.len() as u32, false),
            (status, 1, true),
        ]);
        Req {
            head,
            sector,
            data: buf,
            len: data.len(),
            status,
        }
    }

    // --- the ring ------------------------------------------------------------------------

    /// Puts `head` in the next avail slot and publishes the new avail index.
    pub fn post(&mut self, head: u16) {
        let slot = self.ring.avail_idx % self.ring.size;
        self.mem.write(
            self.ring.avail + 4 + 2 * u64::from(slot),
            &head.to_le_bytes(),
        );
        self.ring.avail_idx = self.ring.avail_idx.wrapping_add(1);
        self.mem.store_u16(self.ring.avail + 2, self.ring.avail_idx);
    }

    /// Writes the avail index as it is (a hostile jump).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.ring.avail_idx = idx;
        self.mem.store_u16(self.ring.avail + 2, idx);
    }

    pub fn kick(&self) {
        self.ring.kick.write(1).expect("kick");
    }

    pub fn submit(&mut self, heads: &[u16]) {
        for &h in heads {
            self.post(h);
        }
        self.kick();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.load_u16(self.ring.used + 2)
    }

    /// Waits until `n` more used entries appeared; returns them as (id, len).
    pub fn wait_used(&mut self, n: u16) -> Vec<(u32, u32)> {
        let want = self.ring.used_seen.wrapping_add(n);
        let deadline = Instant::now() + USED_TIMEOUT;
        while self.used_idx().wrapping_sub(self.ring.used_seen) < n {
            assert!(
                Instant::now() < deadline,
                "waited {USED_TIMEOUT:?} for {n} used entries; used idx {} (seen {}) — daemon \
                 hung or dropped the request",
                self.used_idx(),
                self.ring.used_seen
            );
            thread::sleep(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        while self.ring.used_seen != want {
            out.push(self.used_elem(self.ring.used_seen));
            self.ring.used_seen = self.ring.used_seen.wrapping_add(1);
        }
        out
    }

    /// Entry `i` (mod size) of the used ring.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let a = self.ring.used + 4 + 8 * u64::from(i % self.ring.size);
        let b = self.mem.read(a, 8);
        let le = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
        (le(&b[0..4]), le(&b[4..8]))
    }

    /// Asserts that nothing new reaches the used ring for a while.
    #[track_caller]
    pub fn assert_no_used(&self, what: &str) {
        thread::sleep(QUIET);
        assert_eq!(
            self.used_idx(),
            self.ring.used_seen,
            "{what}: the daemon completed something it should not have"
        );
    }

    pub fn status(&self, r: &Req) -> u8 {
        self.mem.read(r.status, 1)[0]
    }

    /// Asserts `r` completed as a successful read of the image's bytes.
    #[track_caller]
    pub fn check_read(&self, r: &Req, used: (u32, u32)) {
        assert_eq!(
            used,
            (u32::from(r.head), r.len as u32 + 1),
            "used entry of a valid read"
        );
        assert_eq!(self.status(r), S_OK, "status of a valid read");
        let want = read_file_at(&self.image, r.sector * 512, r.len);
        assert_bytes_eq(&self.mem.read(r.data, r.len), &want, "read data");
    }

    /// A valid read on the same ring, checked against the image, and the canary check.
    #[track_caller]
    pub fn probe(&mut self, what: &str) {
        let r = self.read_req(5, 2);
        self.submit(&[r.head]);
        let used = self.wait_used(1);
        self.check_read(&r, used[0]);
        self.mem.assert_untouched(what);
    }

    /// A valid write then read of a scratch sector on the same ring.
    #[track_caller]
    pub fn probe_write(&mut self, sector: u64, seed: u64) {
        let data = crate::common::pattern(seed, 1024);
        let w = self.write_req(sector, &data);
        self.submit(&[w.head]);
        assert_eq!(
            self.wait_used(1)[0],
            (u32::from(w.head), 1),
            "used entry of a valid write"
        );
        assert_eq!(self.status(&w), S_OK, "status of a valid write");
        assert_bytes_eq(
            &read_file_at(&self.image, sector * 512, 1024),
            &data,
            "image after write",
        );
        let r = self.read_req(sector, 2);
        self.submit(&[r.head]);
        let used = self.wait_used(1);
        self.check_read(&r, used[0]);
    }
}
