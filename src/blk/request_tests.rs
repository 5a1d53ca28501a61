//! Unit tests for the request parser: chains are built in guest memory with virtio-queue's mock
//! driver side, popped like the worker pops them and handed to `parse_request`.

use super::*;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

// The tests, by topic. The files sit in `request_tests/` next to this one; this file is itself
// loaded through a `#[path]` attribute, so each submodule names its file explicitly.
#[path = "request_tests/chains.rs"]
mod chains;
#[path = "request_tests/e2e.rs"]
mod e2e;
#[path = "request_tests/randomized.rs"]
mod randomized;
#[path = "request_tests/refused.rs"]
mod refused;
#[path = "request_tests/valid.rs"]
mod valid;

// Guest memory layout: a low region at 0 (holds the virtqueue) and two adjacent high regions at
// 4 GiB, where libblkio puts its buffers. Everything else is unmapped.
const REGION_LEN: u64 = 0x10_0000;
const R0: u64 = 0;
const R1: u64 = 0x1_0000_0000;
const R2: u64 = R1 + REGION_LEN;
const REGIONS: [(u64, u64); 3] = [(R0, REGION_LEN), (R1, REGION_LEN), (R2, REGION_LEN)];
/// Between the low and the high regions: not guest memory.
const GAP: u64 = 0x8000_0000;

const QSIZE: u16 = 16;
const QUEUE_AT: u64 = R0;
const HDR: u64 = R0 + 0x1_0000;
const DATA: u64 = R0 + 0x2_0000;
const STATUS: u64 = R0 + 0x8_0000;
const SEG: u64 = R0 + 0x9_0000;
const HI: u64 = R1 + 0x1000;
/// Indirect descriptor tables live in the high region.
const ITABLE: u64 = R1 + 0xf_0000;

/// Device size of the default geometry: 1 MiB = 2048 sectors.
const DISK: u64 = 1 << 20;
const SECTORS: u64 = DISK / SECTOR_SIZE;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// One descriptor of a chain, before linking.
#[derive(Clone, Copy, Debug)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

/// Device-readable descriptor.
fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: false,
    }
}

/// Device-writable descriptor.
fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: true,
    }
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// `descs` as a table whose entry i links to i + 1.
fn linked(descs: &[D]) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let last = i + 1 == descs.len();
            let flags = if d.write { WRITE } else { 0 } | if last { 0 } else { NEXT };
            raw(d.addr, d.len, flags, if last { 0 } else { i as u16 + 1 })
        })
        .collect()
}

fn geometry(size: u64) -> DeviceGeometry {
    DeviceGeometry {
        size: size.into(),
        logical_block_size: 512,
        physical_block_size: 4096,
        num_queues: 1,
        queue_size: QSIZE,
        read_only: false,
        discard: true,
        write_zeroes: true,
    }
}

fn header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// Guest memory plus a device geometry; builds, pops and parses chains.
struct H {
    mem: Arc<GuestMem>,
    geo: DeviceGeometry,
}

impl H {
    fn new() -> H {
        H::with_geo(geometry(DISK))
    }

    fn with_geo(geo: DeviceGeometry) -> H {
        let ranges: Vec<_> = REGIONS
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = GuestMem::from_ranges(&ranges).expect("guest memory");
        H {
            mem: Arc::new(mem),
            geo,
        }
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("put");
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("get");
        v
    }

    /// Writes a request header at `HDR`; returns its descriptor.
    fn hdr(&self, req_type: u32, sector: u64) -> D {
        self.put(HDR, &header(req_type, sector));
        r(HDR, 16)
    }

    /// Writes discard / write-zeroes segments at `at`; returns one descriptor for all of them.
    fn segs(&self, at: u64, segs: &[(u64, u32, u32)]) -> D {
        for (i, &(sector, num, flags)) in segs.iter().enumerate() {
            self.put(at + 16 * i as u64, &segment(sector, num, flags));
        }
        r(at, 16 * segs.len() as u32)
    }

    fn host(&self, addr: u64) -> usize {
        GuestMemoryBackend::get_host_address(&*self.mem, GuestAddress(addr)).expect("host address")
            as usize
    }

    /// Host ranges backing the guest regions.
    fn host_regions(&self) -> Vec<(usize, usize)> {
        REGIONS
            .iter()
            .map(|&(a, l)| (self.host(a), l as usize))
            .collect()
    }

    /// A direct chain at descriptor index 0.
    fn parse(&self, descs: &[D]) -> Request {
        self.parse_table(&linked(descs), 0)
    }

    /// The same chain through an indirect table at `ITABLE` (one INDIRECT descriptor in the ring).
    fn parse_indirect(&self, descs: &[D]) -> Request {
        self.write_table(ITABLE, &linked(descs));
        let head = raw(ITABLE, 16 * descs.len() as u32, INDIRECT, 0);
        self.parse_table(&[head], 0)
    }

    fn write_table(&self, at: u64, table: &[RawDescriptor]) {
        for (i, d) in table.iter().enumerate() {
            self.mem
                .write_obj(*d, GuestAddress(at + 16 * i as u64))
                .expect("indirect table");
        }
    }

    /// Puts `table` in the descriptor table, offers `head` and parses the popped chain.
    fn parse_table(&self, table: &[RawDescriptor], head: u16) -> Request {
        assert!(table.len() <= usize::from(QSIZE));
        let mq = MockSplitQueue::create(&*self.mem, GuestAddress(QUEUE_AT), QSIZE);
        for i in 0..QSIZE {
            let d = table.get(usize::from(i)).copied().unwrap_or_default();
            mq.desc_table().store(i, d).unwrap();
        }
        mq.avail().ring().ref_at(0).unwrap().store(head);
        mq.avail().idx().store(1);
        let mut q: Queue = mq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(self.mem.clone()).expect("a chain");
        let req = parse_request(chain, &self.mem, &self.geo);
        assert_eq!(req.head, head);
        req
    }

    /// `bufs` as (host address, len) pairs, checked to lie in guest memory.
    fn iov(&self, bufs: &GuestIoVecs) -> Vec<(usize, usize)> {
        let regions = self.host_regions();
        let v: Vec<_> = bufs
            .iovecs()
            .iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect();
        for &(base, len) in &v {
            assert!(
                regions
                    .iter()
                    .any(|&(h, l)| base >= h && base + len <= h + l),
                "iovec {base:#x}+{len} outside guest memory"
            );
        }
        assert_eq!(v.iter().map(|&(_, l)| l as u64).sum::<u64>(), bufs.len());
        v
    }
}

/// The error of a refused request whose status byte is at `STATUS`; checks status and used len.
fn refused(req: &Request, want: Status) -> &RequestError {
    assert_eq!(req.status, Some(GuestAddress(STATUS)), "{req:?}");
    let e = match &req.command {
        Err(e) => e,
        Ok(c) => panic!("expected an error, got {c:?}"),
    };
    assert_eq!(e.status(), want, "{e:?}");
    assert_eq!(req.in_len, 0);
    assert_eq!(used_len(true, req.in_len, e.status()), 1);
    e
}

/// A request without a usable status byte: nothing is written, used len 0.
fn no_status(req: &Request) {
    assert_eq!(req.status, None, "{req:?}");
    assert!(
        matches!(req.command, Err(RequestError::NoStatus)),
        "{req:?}"
    );
    assert_eq!(req.in_len, 0);
    assert_eq!(used_len(false, req.in_len, Status::IoErr), 0);
    if let Err(e) = &req.command {
        assert_eq!(e.status(), Status::IoErr);
    }
}

fn read_op(req: &Request) -> (u64, &GuestIoVecs) {
    match &req.command {
        Ok(Command::Io(Op::Read { offset, bufs })) => (*offset, bufs),
        other => panic!("expected a read, got {other:?}"),
    }
}

fn write_op(req: &Request) -> (u64, &GuestIoVecs) {
    match &req.command {
        Ok(Command::Io(Op::Write { offset, bufs, fua })) => {
            assert!(!fua, "fua is the worker's decision");
            (*offset, bufs)
        }
        other => panic!("expected a write, got {other:?}"),
    }
}

fn discard_op(req: &Request) -> &[(u64, u64)] {
    match &req.command {
        Ok(Command::Io(Op::Discard { ranges })) => ranges,
        other => panic!("expected a discard, got {other:?}"),
    }
}

fn write_zeroes_op(req: &Request) -> (&[(u64, u64)], bool) {
    match &req.command {
        Ok(Command::Io(Op::WriteZeroes { ranges, unmap })) => (ranges, *unmap),
        other => panic!("expected write-zeroes, got {other:?}"),
    }
}

fn ok_with_status(req: &Request, in_len: u32) {
    assert_eq!(req.status, Some(GuestAddress(STATUS)), "{req:?}");
    assert_eq!(req.in_len, in_len);
    assert_eq!(used_len(true, req.in_len, Status::Ok), in_len + 1);
}
