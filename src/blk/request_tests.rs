//! Unit tests for the request parser: chains are built in guest memory with virtio-queue's mock
//! driver side, popped like the worker pops them and handed to `parse_request`.

use super::*;

use std::path::PathBuf;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use crate::engine::sync::SyncEngine;
use crate::engine::{Completion, Engine, EngineQueue};
use crate::image::Image;

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

// ---------------------------------------------------------------------------------------------
// Valid requests
// ---------------------------------------------------------------------------------------------

#[test]
fn used_len_rules() {
    assert_eq!(used_len(false, 512, Status::Ok), 0);
    assert_eq!(used_len(true, 512, Status::Ok), 513);
    assert_eq!(used_len(true, 512, Status::IoErr), 1);
    assert_eq!(used_len(true, 512, Status::Unsupp), 1);
    assert_eq!(used_len(true, u32::MAX, Status::Ok), u32::MAX);
}

#[test]
fn in_separate_descriptors() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, 2), w(DATA, 1024), w(STATUS, 1)]);
    ok_with_status(&req, 1024);
    let (offset, bufs) = read_op(&req);
    assert_eq!(offset, 1024);
    assert_eq!(bufs.len(), 1024);
    assert_eq!(h.iov(bufs), vec![(h.host(DATA), 1024)]);
}

#[test]
fn in_with_status_in_the_data_descriptor() {
    let h = H::new();
    for len in [512u32, 4096, 64 << 10] {
        let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, 0), w(DATA, len + 1)]);
        assert_eq!(req.status, Some(GuestAddress(DATA + u64::from(len))));
        assert_eq!(req.in_len, len);
        let (offset, bufs) = read_op(&req);
        assert_eq!(offset, 0);
        assert_eq!(h.iov(bufs), vec![(h.host(DATA), len as usize)]);
    }
}

#[test]
fn in_split_over_descriptors_and_regions() {
    let h = H::new();
    // Low region, high region, and one descriptor straddling the R1/R2 boundary.
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_IN, 10),
        w(DATA, 512),
        w(HI, 1024),
        w(R2 - 512, 1536),
        w(STATUS, 1),
    ]);
    ok_with_status(&req, 3072);
    let (offset, bufs) = read_op(&req);
    assert_eq!(offset, 10 * 512);
    assert_eq!(
        h.iov(bufs),
        vec![
            (h.host(DATA), 512),
            (h.host(HI), 1024),
            (h.host(R2 - 512), 512),
            (h.host(R2), 1024),
        ]
    );
}

#[test]
fn in_ignores_zero_length_writable_descriptors() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_IN, 0),
        w(DATA, 0),
        w(HI, 512),
        w(GAP, 0),
        w(STATUS, 1),
    ]);
    ok_with_status(&req, 512);
    assert_eq!(h.iov(read_op(&req).1), vec![(h.host(HI), 512)]);
}

#[test]
fn in_of_zero_bytes_at_the_end_of_the_disk() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, SECTORS), w(STATUS, 1)]);
    ok_with_status(&req, 0);
    let (offset, bufs) = read_op(&req);
    assert_eq!((offset, bufs.len()), (DISK, 0));
}

#[test]
fn in_last_sectors_of_the_disk() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_IN, SECTORS - 2),
        w(DATA, 1024),
        w(STATUS, 1),
    ]);
    ok_with_status(&req, 1024);
    assert_eq!(read_op(&req).0, DISK - 1024);
}

#[test]
fn out_separate_descriptors() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, 7), r(DATA, 1536), w(STATUS, 1)]);
    ok_with_status(&req, 0);
    let (offset, bufs) = write_op(&req);
    assert_eq!(offset, 7 * 512);
    assert_eq!(h.iov(bufs), vec![(h.host(DATA), 1536)]);
}

#[test]
fn out_header_and_data_in_one_descriptor() {
    let h = H::new();
    h.hdr(VIRTIO_BLK_T_OUT, 3);
    let req = h.parse(&[r(HDR, 16 + 1024), w(STATUS, 1)]);
    ok_with_status(&req, 0);
    let (offset, bufs) = write_op(&req);
    assert_eq!(offset, 3 * 512);
    assert_eq!(h.iov(bufs), vec![(h.host(HDR + 16), 1024)]);
}

#[test]
fn header_split_over_two_descriptors() {
    let h = H::new();
    h.hdr(VIRTIO_BLK_T_OUT, 5);
    // 8 + 8 header bytes, the second descriptor continuing with data.
    let req = h.parse(&[r(HDR, 8), r(HDR + 8, 8 + 512), w(STATUS, 1)]);
    ok_with_status(&req, 0);
    let (offset, bufs) = write_op(&req);
    assert_eq!(offset, 5 * 512);
    assert_eq!(h.iov(bufs), vec![(h.host(HDR + 16), 512)]);
}

#[test]
fn out_split_over_descriptors_and_regions() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_OUT, 100),
        r(DATA, 512),
        r(HI, 2048),
        r(R2 - 1024, 2048),
        w(STATUS, 1),
    ]);
    ok_with_status(&req, 0);
    let (offset, bufs) = write_op(&req);
    assert_eq!(offset, 100 * 512);
    assert_eq!(bufs.len(), 4608);
    assert_eq!(
        h.iov(bufs),
        vec![
            (h.host(DATA), 512),
            (h.host(HI), 2048),
            (h.host(R2 - 1024), 1024),
            (h.host(R2), 1024),
        ]
    );
}

#[test]
fn out_with_data_in_high_memory_and_status_in_high_memory() {
    let h = H::new();
    let status = R2 + REGION_LEN - 1;
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, 0), r(HI, 512), w(status, 1)]);
    assert_eq!(req.status, Some(GuestAddress(status)));
    write_op(&req);
}

#[test]
fn flush_without_data() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0), w(STATUS, 1)]);
    ok_with_status(&req, 0);
    assert!(matches!(req.command, Ok(Command::Io(Op::Flush))));
}

#[test]
fn flush_with_a_data_descriptor() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0), r(DATA, 512), w(STATUS, 1)]);
    ok_with_status(&req, 0);
    assert!(matches!(req.command, Ok(Command::Io(Op::Flush))));
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0), w(DATA, 512), w(STATUS, 1)]);
    ok_with_status(&req, 0);
    assert!(matches!(req.command, Ok(Command::Io(Op::Flush))));
}

#[test]
fn flush_on_a_read_only_device() {
    let mut geo = geometry(DISK);
    geo.read_only = true;
    let h = H::with_geo(geo);
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0), w(STATUS, 1)]);
    assert!(matches!(req.command, Ok(Command::Io(Op::Flush))));
}

#[test]
fn get_id_20_bytes() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_GET_ID, 0), w(DATA, 20), w(STATUS, 1)]);
    ok_with_status(&req, 20);
    match &req.command {
        Ok(Command::GetId(bufs)) => assert_eq!(h.iov(bufs), vec![(h.host(DATA), 20)]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn get_id_larger_and_split_buffers() {
    let h = H::new();
    // A larger buffer: only the first 20 bytes are filled.
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_GET_ID, 0), w(DATA, 512), w(STATUS, 1)]);
    ok_with_status(&req, 20);
    match &req.command {
        Ok(Command::GetId(bufs)) => assert_eq!(h.iov(bufs), vec![(h.host(DATA), 20)]),
        other => panic!("{other:?}"),
    }
    // 12 + 12 bytes: 12 + 8 used.
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_GET_ID, 0),
        w(DATA, 12),
        w(HI, 12),
        w(STATUS, 1),
    ]);
    ok_with_status(&req, 20);
    match &req.command {
        Ok(Command::GetId(bufs)) => {
            assert_eq!(h.iov(bufs), vec![(h.host(DATA), 12), (h.host(HI), 8)])
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn get_id_fills_the_buffer() {
    let h = H::new();
    h.put(DATA, &[0xaa; 24]);
    let mut req = h.parse(&[h.hdr(VIRTIO_BLK_T_GET_ID, 0), w(DATA, 24), w(STATUS, 1)]);
    let Ok(Command::GetId(bufs)) = &mut req.command else {
        panic!("{req:?}");
    };
    assert_eq!(bufs.copy_from(b"serial-0123456789abc"), 20);
    assert_eq!(&h.get(DATA, 20), b"serial-0123456789abc");
    assert_eq!(h.get(DATA + 20, 4), vec![0xaa; 4]);
}

#[test]
fn discard_one_segment() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_DISCARD, 0),
        h.segs(SEG, &[(8, 16, 0)]),
        w(STATUS, 1),
    ]);
    ok_with_status(&req, 0);
    assert_eq!(discard_op(&req), &[(4096, 8192)]);
}

#[test]
fn discard_several_segments_over_descriptors() {
    let h = H::new();
    h.segs(SEG, &[(0, 1, 0), (100, 8, 0), (SECTORS - 4, 4, 0)]);
    // Header and first segment in one descriptor is not possible (different addresses), but
    // the payload may be split anywhere, even inside a segment.
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_DISCARD, 0),
        r(SEG, 20),
        r(SEG + 20, 28),
        w(STATUS, 1),
    ]);
    ok_with_status(&req, 0);
    assert_eq!(
        discard_op(&req),
        &[(0, 512), (100 * 512, 4096), (DISK - 2048, 2048)]
    );
}

#[test]
fn discard_max_segments() {
    let h = H::new();
    let segs: Vec<_> = (0..u64::from(MAX_DISCARD_SEG))
        .map(|i| (i * 2, 1, 0))
        .collect();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_DISCARD, 0),
        h.segs(SEG, &segs),
        w(STATUS, 1),
    ]);
    assert_eq!(discard_op(&req).len(), MAX_DISCARD_SEG as usize);
}

#[test]
fn discard_max_sectors() {
    let h = H::with_geo(geometry(1 << 40));
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_DISCARD, 0),
        h.segs(SEG, &[(1, MAX_DISCARD_SECTORS, 0)]),
        w(STATUS, 1),
    ]);
    assert_eq!(
        discard_op(&req),
        &[(512, u64::from(MAX_DISCARD_SECTORS) * 512)]
    );
}

#[test]
fn write_zeroes_one_segment_unmap() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0),
        h.segs(SEG, &[(2, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]),
        w(STATUS, 1),
    ]);
    ok_with_status(&req, 0);
    assert_eq!(write_zeroes_op(&req), (&[(1024, 1536)][..], true));
}

#[test]
fn write_zeroes_one_segment_no_unmap() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0),
        h.segs(SEG, &[(2, 3, 0)]),
        w(STATUS, 1),
    ]);
    assert_eq!(write_zeroes_op(&req), (&[(1024, 1536)][..], false));
}

#[test]
fn write_zeroes_several_segments() {
    let h = H::new();
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let all = [(0, 1, unmap), (10, 2, unmap), (SECTORS - 1, 1, unmap)];
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0),
        h.segs(SEG, &all),
        w(STATUS, 1),
    ]);
    let want = [(0, 512), (5120, 1024), (DISK - 512, 512)];
    assert_eq!(write_zeroes_op(&req), (&want[..], true));
    // One segment without UNMAP: the whole request must not unmap.
    let mixed = [(0, 1, unmap), (10, 2, 0), (SECTORS - 1, 1, unmap)];
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0),
        h.segs(SEG, &mixed),
        w(STATUS, 1),
    ]);
    assert_eq!(write_zeroes_op(&req), (&want[..], false));
}

#[test]
fn write_zeroes_zero_sectors() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0),
        h.segs(SEG, &[(SECTORS, 0, 0)]),
        w(STATUS, 1),
    ]);
    assert_eq!(write_zeroes_op(&req), (&[(DISK, 0)][..], false));
}

#[test]
fn header_reserved_field_is_ignored() {
    let h = H::new();
    let mut hdr = header(VIRTIO_BLK_T_IN, 1);
    hdr[4..8].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
    h.put(HDR, &hdr);
    let req = h.parse(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    assert_eq!(read_op(&req).0, 512);
}

// ---------------------------------------------------------------------------------------------
// Indirect descriptors
// ---------------------------------------------------------------------------------------------

#[test]
fn indirect_in_parses_like_direct() {
    let h = H::new();
    let chain = [
        h.hdr(VIRTIO_BLK_T_IN, 4),
        w(DATA, 512),
        w(R2 - 256, 512),
        w(STATUS, 1),
    ];
    let direct = h.parse(&chain);
    let indirect = h.parse_indirect(&chain);
    for req in [&direct, &indirect] {
        ok_with_status(req, 1024);
        let (offset, bufs) = read_op(req);
        assert_eq!(offset, 2048);
        assert_eq!(
            h.iov(bufs),
            vec![
                (h.host(DATA), 512),
                (h.host(R2 - 256), 256),
                (h.host(R2), 256)
            ]
        );
    }
}

#[test]
fn indirect_out_and_discard_parse_like_direct() {
    let h = H::new();
    let out = [h.hdr(VIRTIO_BLK_T_OUT, 9), r(HI, 4096), w(STATUS, 1)];
    let req = h.parse_indirect(&out);
    ok_with_status(&req, 0);
    let (offset, bufs) = write_op(&req);
    assert_eq!(offset, 9 * 512);
    assert_eq!(h.iov(bufs), vec![(h.host(HI), 4096)]);

    let discard = [
        h.hdr(VIRTIO_BLK_T_DISCARD, 0),
        h.segs(SEG, &[(1, 2, 0), (5, 1, 0)]),
        w(STATUS, 1),
    ];
    let req = h.parse_indirect(&discard);
    assert_eq!(discard_op(&req), &[(512, 1024), (2560, 512)]);
}

#[test]
fn indirect_errors_match_direct() {
    let h = H::new();
    let bad = [h.hdr(VIRTIO_BLK_T_IN, 0), r(DATA, 512), w(STATUS, 1)];
    for req in [h.parse(&bad), h.parse_indirect(&bad)] {
        assert!(matches!(
            refused(&req, Status::IoErr),
            RequestError::WrongDirection
        ));
    }
}

#[test]
fn indirect_table_with_bad_length_or_nesting_has_no_status() {
    let h = H::new();
    h.write_table(
        ITABLE,
        &linked(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0), w(STATUS, 1)]),
    );
    // Table length not a multiple of 16: virtio-queue refuses to walk it.
    no_status(&h.parse_table(&[raw(ITABLE, 31, INDIRECT, 0)], 0));
    // Indirect table outside guest memory.
    no_status(&h.parse_table(&[raw(GAP, 32, INDIRECT, 0)], 0));
    // An INDIRECT descriptor inside an indirect table ends the chain.
    let nested = ITABLE + 0x100;
    h.write_table(
        nested,
        &[raw(HDR, 16, NEXT, 1), raw(ITABLE, 32, INDIRECT, 0)],
    );
    no_status(&h.parse_table(&[raw(nested, 32, INDIRECT, 0)], 0));
    // An empty indirect table.
    no_status(&h.parse_table(&[raw(ITABLE, 0, INDIRECT, 0)], 0));
}

#[test]
fn direct_descriptors_then_indirect_table() {
    // A direct header whose NEXT is an INDIRECT descriptor: virtio-queue walks into the table.
    let h = H::new();
    h.hdr(VIRTIO_BLK_T_IN, 1);
    h.write_table(ITABLE, &linked(&[w(DATA, 512), w(STATUS, 1)]));
    let req = h.parse_table(&[raw(HDR, 16, NEXT, 1), raw(ITABLE, 32, INDIRECT, 0)], 0);
    ok_with_status(&req, 512);
    assert_eq!(read_op(&req).0, 512);
}

// ---------------------------------------------------------------------------------------------
// Bad chains: no status
// ---------------------------------------------------------------------------------------------

#[test]
fn no_writable_descriptor() {
    let h = H::new();
    no_status(&h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, 0), r(DATA, 512)]));
    no_status(&h.parse(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0)]));
}

#[test]
fn read_only_status_descriptor() {
    let h = H::new();
    no_status(&h.parse(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0), r(STATUS, 1)]));
    no_status(&h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, 0), r(DATA, 512), r(STATUS, 1)]));
}

#[test]
fn zero_length_status_descriptor() {
    let h = H::new();
    no_status(&h.parse(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0), w(STATUS, 0)]));
}

#[test]
fn status_outside_guest_memory() {
    let h = H::new();
    for (addr, len) in [
        (GAP, 1),
        (R0 + REGION_LEN, 1),
        (R2 + REGION_LEN, 1),
        (R2 + REGION_LEN - 1, 2), // the status byte is the last one: just past the end
        (u64::MAX, 1),
        (u64::MAX, 2),            // addr + len - 1 overflows
        (u64::MAX - 3, u32::MAX), // ditto, with a huge length
    ] {
        let req = h.parse(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0), w(addr, len)]);
        no_status(&req);
    }
}

#[test]
fn empty_chain_from_a_head_beyond_the_queue() {
    let h = H::new();
    for head in [QSIZE, QSIZE + 1, u16::MAX] {
        no_status(&h.parse_table(&linked(&[h.hdr(VIRTIO_BLK_T_FLUSH, 0), w(STATUS, 1)]), head));
    }
}

#[test]
fn descriptor_loop_terminates() {
    let h = H::new();
    h.hdr(VIRTIO_BLK_T_FLUSH, 0);
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after QSIZE descriptors; the last one yielded
    // still links on, so the chain is known to be cut and gets IOERR.
    let req = h.parse_table(&[raw(HDR, 16, NEXT, 1), raw(STATUS, 1, WRITE | NEXT, 0)], 0);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::TruncatedChain
    ));
    // A descriptor pointing at itself.
    let req = h.parse_table(&[raw(STATUS, 1, WRITE | NEXT, 0)], 0);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::TruncatedChain
    ));
    // A readable self-loop: no status.
    no_status(&h.parse_table(&[raw(HDR, 16, NEXT, 0)], 0));
    // A loop inside an indirect table.
    h.write_table(ITABLE, &[raw(HDR, 16, NEXT, 1), raw(DATA, 512, NEXT, 0)]);
    no_status(&h.parse_table(&[raw(ITABLE, 32, INDIRECT, 0)], 0));
    // NEXT pointing past the table: cut short, not executed as a complete FLUSH.
    let req = h.parse_table(
        &[raw(HDR, 16, NEXT, 1), raw(STATUS, 1, WRITE | NEXT, 200)],
        0,
    );
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::TruncatedChain
    ));
}

#[test]
fn chain_longer_than_4gib_is_cut() {
    // virtio-queue stops when the chain exceeds u32::MAX bytes, so the status is never reached.
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_IN, 0),
        w(DATA, u32::MAX - 8),
        w(STATUS, 1),
    ]);
    no_status(&req);
}

// ---------------------------------------------------------------------------------------------
// Bad requests with a status
// ---------------------------------------------------------------------------------------------

#[test]
fn header_too_short() {
    let h = H::new();
    h.hdr(VIRTIO_BLK_T_FLUSH, 0);
    let req = h.parse(&[r(HDR, 15), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::HeaderTooShort(15)
    ));
    let req = h.parse(&[r(HDR, 8), r(HDR + 8, 4), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::HeaderTooShort(12)
    ));
    let req = h.parse(&[w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::HeaderTooShort(0)
    ));
    // A header that only appears device-writable does not count.
    let req = h.parse(&[w(HDR, 16), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::HeaderTooShort(0)
    ));
}

#[test]
fn header_outside_guest_memory() {
    let h = H::new();
    for addr in [GAP, R2 + REGION_LEN - 8, u64::MAX - 15] {
        let req = h.parse(&[r(addr, 16), w(STATUS, 1)]);
        assert!(matches!(
            refused(&req, Status::IoErr),
            RequestError::BadMemory(_)
        ));
    }
}

#[test]
fn range_past_capacity() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_IN, SECTORS - 1),
        w(DATA, 1024),
        w(STATUS, 1),
    ]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::OutOfRange {
            sector,
            len: 1024,
            capacity: DISK
        } if *sector == SECTORS - 1
    ));
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, SECTORS), r(DATA, 512), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::OutOfRange { .. }
    ));
    // Zero bytes, but the start is past the end.
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, SECTORS + 1), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::OutOfRange { len: 0, .. }
    ));
}

#[test]
fn sector_times_512_overflows() {
    let h = H::new();
    for sector in [(u64::MAX >> 9) + 1, u64::MAX, 1 << 63] {
        let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, sector), w(DATA, 512), w(STATUS, 1)]);
        assert!(matches!(
            refused(&req, Status::IoErr),
            RequestError::OutOfRange { .. }
        ));
        let req = h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, sector), r(DATA, 512), w(STATUS, 1)]);
        assert!(matches!(
            refused(&req, Status::IoErr),
            RequestError::OutOfRange { .. }
        ));
    }
}

#[test]
fn sector_plus_len_overflows() {
    let h = H::new();
    // sector * 512 = u64::MAX - 511: fits, but adding 1024 bytes does not.
    let sector = u64::MAX >> 9;
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, sector), w(DATA, 1024), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::OutOfRange { len: 1024, .. }
    ));
}

#[test]
fn data_not_a_multiple_of_512() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, 0), r(DATA, 513), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::Unaligned(513)
    ));
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, 0), w(DATA, 100), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::Unaligned(100)
    ));
    // 256 + 256 is fine: alignment is of the total, not of each descriptor.
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_IN, 0),
        w(DATA, 256),
        w(HI, 256),
        w(STATUS, 1),
    ]);
    assert_eq!(read_op(&req).1.len(), 512);
    // The header bytes of a combined descriptor are not data.
    h.hdr(VIRTIO_BLK_T_OUT, 0);
    let req = h.parse(&[r(HDR, 16 + 500), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::Unaligned(500)
    ));
}

#[test]
fn in_with_device_readable_data() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, 0), r(DATA, 512), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::WrongDirection
    ));
    // Extra readable bytes glued to the header count too.
    h.hdr(VIRTIO_BLK_T_IN, 0);
    let req = h.parse(&[r(HDR, 17), w(DATA, 512), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::WrongDirection
    ));
}

#[test]
fn out_with_device_writable_data() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, 0), w(DATA, 512), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::WrongDirection
    ));
    // Status descriptor with room for more than the status byte.
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_OUT, 0),
        r(DATA, 512),
        w(STATUS - 512, 513),
    ]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::WrongDirection
    ));
}

#[test]
fn readable_after_writable() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_IN, 0),
        w(DATA, 512),
        r(HI, 512),
        w(STATUS, 1),
    ]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::ReadableAfterWritable
    ));
    // Even a zero-length readable descriptor is out of order.
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_FLUSH, 0),
        w(DATA, 512),
        r(HI, 0),
        w(STATUS, 1),
    ]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::ReadableAfterWritable
    ));
}

#[test]
fn write_to_read_only_device() {
    let mut geo = geometry(DISK);
    geo.read_only = true;
    let h = H::with_geo(geo);
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, 0), r(DATA, 512), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::ReadOnly
    ));
    // Reads still work.
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, 0), w(DATA, 512), w(STATUS, 1)]);
    read_op(&req);
}

#[test]
fn discard_and_write_zeroes_not_offered() {
    for (discard, write_zeroes, read_only) in [
        (false, false, false),
        (false, true, false),
        (true, false, false),
        (true, true, true),
    ] {
        let mut geo = geometry(DISK);
        geo.discard = discard;
        geo.write_zeroes = write_zeroes;
        geo.read_only = read_only;
        let h = H::with_geo(geo);
        for (t, offered) in [
            (VIRTIO_BLK_T_DISCARD, discard),
            (VIRTIO_BLK_T_WRITE_ZEROES, write_zeroes),
        ] {
            let req = h.parse(&[h.hdr(t, 0), h.segs(SEG, &[(0, 1, 0)]), w(STATUS, 1)]);
            if offered && !read_only {
                assert!(req.command.is_ok(), "{req:?}");
            } else {
                assert!(matches!(
                    refused(&req, Status::Unsupp),
                    RequestError::Unsupported(x) if *x == t
                ));
            }
        }
    }
}

#[test]
fn discard_and_write_zeroes_past_capacity() {
    let h = H::new();
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        for seg in [
            (SECTORS - 8, 16, 0),
            (SECTORS + 1, 0, 0),
            (u64::MAX, 1, 0),
            (u64::MAX >> 9, 2, 0),
        ] {
            let req = h.parse(&[h.hdr(t, 0), h.segs(SEG, &[(0, 1, 0), seg]), w(STATUS, 1)]);
            assert!(
                matches!(
                    refused(&req, Status::IoErr),
                    RequestError::OutOfRange { .. }
                ),
                "{seg:?}"
            );
        }
    }
}

#[test]
fn discard_and_write_zeroes_reserved_flags() {
    let h = H::new();
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        for flags in [2, 0x8000_0000, u32::MAX, 3] {
            let req = h.parse(&[
                h.hdr(t, 0),
                h.segs(SEG, &[(0, 1, 0), (1, 1, flags)]),
                w(STATUS, 1),
            ]);
            assert!(matches!(
                refused(&req, Status::Unsupp),
                RequestError::BadFlags(f) if *f == flags
            ));
        }
    }
}

#[test]
fn discard_with_unmap_flag() {
    let h = H::new();
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_DISCARD, 0),
        h.segs(SEG, &[(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]),
        w(STATUS, 1),
    ]);
    assert!(matches!(
        refused(&req, Status::Unsupp),
        RequestError::BadFlags(1)
    ));
}

#[test]
fn segment_payload_sizes() {
    let h = H::new();
    let too_many = (MAX_DISCARD_SEG + 1) as usize;
    let big: Vec<_> = (0..too_many as u64).map(|i| (i, 1, 0)).collect();
    h.segs(SEG, &big);
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        for (payload, want) in [
            (vec![r(SEG, 24)], 24),
            (vec![r(SEG, 15)], 15),
            (vec![r(SEG, 16), r(SEG, 1)], 17),
            (vec![], 0),
            (vec![r(SEG, 0)], 0),
            (vec![r(SEG, 16 * too_many as u32)], 16 * too_many as u64),
            (vec![r(SEG, u32::MAX - 0x100)], u64::from(u32::MAX - 0x100)),
        ] {
            let mut chain = vec![h.hdr(t, 0)];
            chain.extend(payload);
            chain.push(w(STATUS, 1));
            let req = h.parse(&chain);
            assert!(
                matches!(
                    refused(&req, Status::IoErr),
                    RequestError::BadSegmentPayload(n) if *n == want
                ),
                "{req:?}"
            );
        }
    }
}

#[test]
fn segment_too_large() {
    let h = H::with_geo(geometry(1 << 40));
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        for num in [MAX_DISCARD_SECTORS + 1, u32::MAX] {
            let req = h.parse(&[h.hdr(t, 0), h.segs(SEG, &[(0, num, 0)]), w(STATUS, 1)]);
            assert!(matches!(
                refused(&req, Status::IoErr),
                RequestError::SegmentTooLarge(n) if *n == num
            ));
        }
    }
}

#[test]
fn discard_and_write_zeroes_with_writable_data() {
    let h = H::new();
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let req = h.parse(&[
            h.hdr(t, 0),
            h.segs(SEG, &[(0, 1, 0)]),
            w(DATA, 16),
            w(STATUS, 1),
        ]);
        assert!(matches!(
            refused(&req, Status::IoErr),
            RequestError::WrongDirection
        ));
    }
}

#[test]
fn segments_outside_guest_memory() {
    let h = H::new();
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        for addr in [GAP, R0 + REGION_LEN - 8, u64::MAX - 15] {
            let req = h.parse(&[h.hdr(t, 0), r(addr, 16), w(STATUS, 1)]);
            assert!(matches!(
                refused(&req, Status::IoErr),
                RequestError::BadMemory(_)
            ));
        }
    }
}

#[test]
fn get_id_too_short() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_GET_ID, 0), w(DATA, 19), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::GetIdTooShort(19)
    ));
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_GET_ID, 0), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::GetIdTooShort(0)
    ));
}

#[test]
fn get_id_outside_guest_memory() {
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_GET_ID, 0), w(GAP, 20), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::BadMemory(_)
    ));
}

#[test]
fn unknown_request_types() {
    let h = H::new();
    for t in [
        2,
        3,
        5,
        9,
        10,
        12,
        14,
        15,
        16,
        VIRTIO_BLK_T_OUT | 0x8000_0000, // legacy BARRIER bit
        0xffff_ffff,
    ] {
        let req = h.parse(&[h.hdr(t, 0), w(DATA, 512), w(STATUS, 1)]);
        assert!(matches!(
            refused(&req, Status::Unsupp),
            RequestError::Unsupported(x) if *x == t
        ));
    }
}

#[test]
fn data_outside_guest_memory() {
    let h = H::new();
    let cases = [
        (GAP, 512),
        (R0 + REGION_LEN - 256, 512), // runs off the end of the low region
        (R2 + REGION_LEN - 256, 512), // off the end of the high regions
        (u64::MAX - 511, 512),
        (u64::MAX - 255, 512), // addr + len overflows
    ];
    for (addr, len) in cases {
        let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, 0), w(addr, len), w(STATUS, 1)]);
        assert!(
            matches!(refused(&req, Status::IoErr), RequestError::BadMemory(_)),
            "IN {addr:#x}+{len}"
        );
        let req = h.parse(&[h.hdr(VIRTIO_BLK_T_OUT, 0), r(addr, len), w(STATUS, 1)]);
        assert!(
            matches!(refused(&req, Status::IoErr), RequestError::BadMemory(_)),
            "OUT {addr:#x}+{len}"
        );
    }
    // Good descriptors followed by one bad one.
    let req = h.parse(&[
        h.hdr(VIRTIO_BLK_T_OUT, 0),
        r(DATA, 512),
        r(GAP, 512),
        w(STATUS, 1),
    ]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::BadMemory(_)
    ));
}

#[test]
fn error_order_range_before_memory() {
    // Documented order: alignment, then range, then memory.
    let h = H::new();
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, SECTORS), w(GAP, 100), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::Unaligned(100)
    ));
    let req = h.parse(&[h.hdr(VIRTIO_BLK_T_IN, SECTORS), w(GAP, 512), w(STATUS, 1)]);
    assert!(matches!(
        refused(&req, Status::IoErr),
        RequestError::OutOfRange { .. }
    ));
}

/// Regression: the header is split off the first readable descriptor at `addr + 16`, which
/// overflowed (a panic in debug builds) for a descriptor in the last 16 bytes of the address
/// space.
#[test]
fn header_split_at_top_of_address_space() {
    let h = H::new();
    for addr in [u64::MAX - 15, u64::MAX - 8, u64::MAX] {
        let req = h.parse(&[r(addr, 32), w(STATUS, 1)]);
        assert!(matches!(
            refused(&req, Status::IoErr),
            RequestError::BadMemory(_)
        ));
    }
}

/// Regression: same for the GET_ID buffer, split after 20 bytes.
#[test]
fn get_id_split_at_top_of_address_space() {
    let h = H::new();
    for addr in [u64::MAX - 19, u64::MAX - 8, u64::MAX] {
        let req = h.parse(&[h.hdr(VIRTIO_BLK_T_GET_ID, 0), w(addr, 64), w(STATUS, 1)]);
        assert!(matches!(
            refused(&req, Status::IoErr),
            RequestError::BadMemory(_)
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// End to end with the sync engine
// ---------------------------------------------------------------------------------------------

/// A temporary image, removed on drop.
struct TempImage {
    dir: PathBuf,
    path: PathBuf,
}

impl TempImage {
    fn new(name: &str, size: usize) -> TempImage {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vublk-request-tests-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, pattern(size, 7)).unwrap();
        TempImage { dir, path }
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Opens `img`, parses the chain with a geometry matching the image, runs the op.
struct Rig {
    h: H,
    image: Image,
    q: Box<dyn EngineQueue>,
}

impl Rig {
    fn new(img: &TempImage) -> Rig {
        let image = Image::open(&img.path, false, 512).unwrap();
        let mut geo = geometry(image.info.size);
        geo.discard = image.info.discard;
        geo.write_zeroes = image.info.write_zeroes;
        let q = SyncEngine::new(&image).new_queue().unwrap();
        Rig {
            h: H::with_geo(geo),
            image,
            q,
        }
    }

    /// Parses and executes; returns the completion result.
    fn run(&mut self, descs: &[D]) -> std::io::Result<u64> {
        let req = self.h.parse(descs);
        ok_with_status(&req, req.in_len);
        let Ok(Command::Io(op)) = req.command else {
            panic!("not an I/O request: {req:?}");
        };
        self.q.submit(77, op);
        let mut done: Vec<Completion> = Vec::new();
        self.q.reap(&mut done);
        assert_eq!(done.len(), 1);
        let c = done.pop().unwrap();
        assert_eq!(c.tag, 77);
        c.result
    }
}

#[test]
fn e2e_out_writes_guest_bytes() {
    let img = TempImage::new("out", DISK as usize);
    let mut rig = Rig::new(&img);
    assert_eq!(rig.image.info.size, DISK);
    let data = pattern(2048, 99);
    // 512 bytes in low memory, 1536 straddling the two high regions.
    rig.h.put(DATA, &data[..512]);
    rig.h.put(R2 - 1024, &data[512..]);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_OUT, 3);
    let n = rig
        .run(&[hdr, r(DATA, 512), r(R2 - 1024, 1536), w(STATUS, 1)])
        .unwrap();
    assert_eq!(n, 2048);
    let mut want = pattern(DISK as usize, 7);
    want[1536..1536 + 2048].copy_from_slice(&data);
    assert!(img.contents() == want, "file contents differ");
}

#[test]
fn e2e_in_reads_file_bytes() {
    let img = TempImage::new("in", DISK as usize);
    let mut rig = Rig::new(&img);
    rig.h.put(DATA, &[0xee; 4096]);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_IN, 5);
    let n = rig
        .run(&[hdr, w(DATA, 1024), w(HI, 512), w(STATUS, 1)])
        .unwrap();
    assert_eq!(n, 1536);
    let file = img.contents();
    assert_eq!(rig.h.get(DATA, 1024), &file[2560..3584]);
    assert_eq!(rig.h.get(HI, 512), &file[3584..4096]);
    // Nothing past the buffers was touched.
    assert_eq!(rig.h.get(DATA + 1024, 16), vec![0xee; 16]);
}

#[test]
fn e2e_write_zeroes() {
    let img = TempImage::new("wz", DISK as usize);
    let mut rig = Rig::new(&img);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let segs = rig.h.segs(SEG, &[(1, 2, 0), (100, 16, unmap)]);
    assert_eq!(rig.run(&[hdr, segs, w(STATUS, 1)]).unwrap(), 0);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let segs = rig.h.segs(SEG, &[(SECTORS - 8, 8, unmap)]);
    assert_eq!(rig.run(&[hdr, segs, w(STATUS, 1)]).unwrap(), 0);
    let mut want = pattern(DISK as usize, 7);
    for (off, len) in [(512, 1024), (51200, 8192), (DISK as usize - 4096, 4096)] {
        want[off..off + len].fill(0);
    }
    let got = img.contents();
    assert_eq!(got.len(), DISK as usize, "write-zeroes must keep the size");
    assert!(got == want, "file contents differ");
}

#[test]
fn e2e_discard_reads_back_zero() {
    let img = TempImage::new("discard", DISK as usize);
    let mut rig = Rig::new(&img);
    if !rig.image.info.discard {
        eprintln!("skipping: {} cannot punch holes", img.path.display());
        return;
    }
    let hdr = rig.h.hdr(VIRTIO_BLK_T_DISCARD, 0);
    let segs = rig.h.segs(SEG, &[(8, 8, 0), (64, 64, 0)]);
    assert_eq!(rig.run(&[hdr, segs, w(STATUS, 1)]).unwrap(), 0);
    let mut want = pattern(DISK as usize, 7);
    want[4096..8192].fill(0);
    want[32768..65536].fill(0);
    let got = img.contents();
    assert_eq!(got.len(), DISK as usize);
    assert!(got == want, "file contents differ");
    // And through the device: IN of a discarded range returns zeros.
    rig.h.put(DATA, &[0x55; 4096]);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_IN, 8);
    rig.run(&[hdr, w(DATA, 4096), w(STATUS, 1)]).unwrap();
    assert_eq!(rig.h.get(DATA, 4096), vec![0; 4096]);
}

#[test]
fn e2e_flush_and_write_then_read_back() {
    let img = TempImage::new("rw", DISK as usize);
    let mut rig = Rig::new(&img);
    let data = pattern(4096, 3);
    rig.h.put(HI, &data);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_OUT, SECTORS - 8);
    rig.run(&[hdr, r(HI, 4096), w(STATUS, 1)]).unwrap();
    let hdr = rig.h.hdr(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.run(&[hdr, w(STATUS, 1)]).unwrap(), 0);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_IN, SECTORS - 8);
    rig.run(&[hdr, w(R2 - 2048, 4096), w(STATUS, 1)]).unwrap();
    assert_eq!(rig.h.get(R2 - 2048, 4096), data);
}

// ---------------------------------------------------------------------------------------------
// Randomized chains
// ---------------------------------------------------------------------------------------------

/// xorshift64*: tiny, deterministic.
struct Rng {
    state: u64,
    /// Also generate addresses in the last bytes of the address space.
    top: bool,
}

impl Rng {
    fn new(seed: u64, top: bool) -> Rng {
        Rng { state: seed, top }
    }

    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }

    fn addr(&mut self) -> u64 {
        let v = self.pick(&[
            HDR,
            HDR + 8,
            DATA,
            DATA + 16,
            STATUS,
            SEG,
            HI,
            ITABLE,
            R0 + REGION_LEN - 1,
            R0 + REGION_LEN - 16,
            R0 + REGION_LEN,
            R1 - 1,
            R1,
            R2 - 1,
            R2 - 512,
            R2,
            R2 + REGION_LEN - 1,
            R2 + REGION_LEN - 512,
            R2 + REGION_LEN,
            GAP,
            u64::MAX,
            u64::MAX - 15,
            u64::MAX - 511,
            u64::MAX - 600,
            0,
        ]);
        match self.below(8) {
            0 => self.next(),
            1 => R1 + self.below(2 * REGION_LEN),
            2 => self.below(REGION_LEN),
            3 if self.top => u64::MAX - self.below(32),
            _ => v,
        }
    }

    fn len(&mut self) -> u32 {
        let v = self.pick(&[
            0,
            1,
            2,
            8,
            15,
            16,
            17,
            19,
            20,
            21,
            32,
            48,
            511,
            512,
            513,
            528,
            1024,
            4096,
            1 << 20,
            u32::MAX,
            u32::MAX - 1,
            1 << 31,
        ]);
        match self.below(6) {
            0 => self.next() as u32,
            1 => self.below(8192) as u32,
            _ => v,
        }
    }

    fn req_type(&mut self) -> u32 {
        let v = self.pick(&[
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ]);
        if self.chance(10) {
            self.next() as u32
        } else {
            v
        }
    }

    fn sector(&mut self) -> u64 {
        let v = self.pick(&[
            0,
            1,
            SECTORS - 1,
            SECTORS,
            SECTORS + 1,
            u64::MAX,
            u64::MAX >> 9,
            (u64::MAX >> 9) + 1,
        ]);
        match self.below(4) {
            0 => self.next(),
            1 => self.below(SECTORS + 8),
            _ => v,
        }
    }
}

/// Checks everything a parsed request may claim against memory and the device.
fn check_invariants(h: &H, req: &Request) -> &'static str {
    if let Some(s) = req.status {
        assert!(
            GuestMemory::check_range(&*h.mem, s, 1, Permissions::Write),
            "status {s:?} outside guest memory"
        );
    } else {
        assert!(
            matches!(req.command, Err(RequestError::NoStatus)),
            "{req:?}"
        );
    }
    let size = h.geo.size.get();
    let check_ranges = |ranges: &[(u64, u64)]| {
        assert!(!ranges.is_empty() && ranges.len() <= MAX_DISCARD_SEG as usize);
        for &(off, len) in ranges {
            assert_eq!(off % SECTOR_SIZE, 0);
            assert_eq!(len % SECTOR_SIZE, 0);
            assert!(len <= u64::from(MAX_DISCARD_SECTORS) * SECTOR_SIZE);
            assert!(
                off.checked_add(len).is_some_and(|e| e <= size),
                "{off}+{len}"
            );
        }
    };
    match &req.command {
        Err(e) => {
            assert_eq!(req.in_len, 0);
            let _ = e.status();
            "err"
        }
        Ok(Command::Io(Op::Read { offset, bufs })) => {
            h.iov(bufs);
            assert_eq!(offset % SECTOR_SIZE, 0);
            assert_eq!(bufs.len() % SECTOR_SIZE, 0);
            assert!(offset + bufs.len() <= size);
            assert_eq!(u64::from(req.in_len), bufs.len());
            "read"
        }
        Ok(Command::Io(Op::Write { offset, bufs, fua })) => {
            assert!(!fua);
            h.iov(bufs);
            assert_eq!(offset % SECTOR_SIZE, 0);
            assert_eq!(bufs.len() % SECTOR_SIZE, 0);
            assert!(offset + bufs.len() <= size);
            assert_eq!(req.in_len, 0);
            "write"
        }
        Ok(Command::Io(Op::Flush)) => {
            assert_eq!(req.in_len, 0);
            "flush"
        }
        Ok(Command::GetId(bufs)) => {
            h.iov(bufs);
            assert_eq!(bufs.len(), ID_LEN as u64);
            assert_eq!(req.in_len, ID_LEN as u32);
            "get_id"
        }
        Ok(Command::Io(Op::Discard { ranges })) => {
            check_ranges(ranges);
            "discard"
        }
        Ok(Command::Io(Op::WriteZeroes { ranges, .. })) => {
            check_ranges(ranges);
            "write_zeroes"
        }
    }
}

/// A random descriptor; `pos` is its table index, `n` the table length.
fn random_desc(rng: &mut Rng, pos: usize, n: usize) -> RawDescriptor {
    let mut flags = 0;
    if rng.chance(70) {
        flags |= NEXT;
    }
    if rng.chance(40) {
        flags |= WRITE;
    }
    if rng.chance(8) {
        flags |= INDIRECT;
    }
    if rng.chance(3) {
        flags = rng.next() as u16;
    }
    let next = if rng.chance(80) {
        (pos + 1) as u16
    } else {
        rng.below(n as u64 + 4) as u16
    };
    let (addr, len) = if flags & INDIRECT != 0 && rng.chance(70) {
        (ITABLE, 16 * rng.below(10) as u32)
    } else {
        (rng.addr(), rng.len())
    };
    raw(addr, len, flags, next)
}

/// A plausible request with one or two fields broken.
fn mutated_chain(rng: &mut Rng, h: &H) -> Vec<D> {
    let t = rng.req_type();
    h.put(HDR, &header(t, rng.sector()));
    let mut chain = Vec::new();
    if rng.chance(80) {
        chain.push(r(HDR, 16));
    } else {
        chain.push(r(HDR, 8));
        chain.push(r(HDR + 8, rng.pick(&[8, 24, 520])));
    }
    let segs = 1 + rng.below(3) as usize;
    for i in 0..segs {
        let s = segment(
            rng.sector(),
            rng.pick(&[
                0,
                1,
                8,
                MAX_DISCARD_SECTORS,
                MAX_DISCARD_SECTORS + 1,
                u32::MAX,
            ]),
            rng.pick(&[0, 0, 1, 2]),
        );
        h.put(SEG + 16 * i as u64, &s);
    }
    let writes = matches!(t, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    for _ in 0..rng.below(4) {
        let len = match t {
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => 16 * segs as u32,
            VIRTIO_BLK_T_GET_ID => 20,
            _ => 512 * (1 + rng.below(4) as u32),
        };
        let addr = match t {
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => SEG,
            _ => rng.pick(&[DATA, HI, R2 - 512, R2 - 1024]),
        };
        chain.push(D {
            addr,
            len,
            write: writes,
        });
    }
    chain.push(w(STATUS, 1));
    // Break something.
    for _ in 0..rng.below(3) {
        let i = rng.below(chain.len() as u64) as usize;
        match rng.below(4) {
            0 => chain[i].addr = rng.addr(),
            1 => chain[i].len = rng.len(),
            2 => chain[i].write = !chain[i].write,
            _ => {
                let d = D {
                    addr: rng.addr(),
                    len: rng.len(),
                    write: rng.chance(50),
                };
                chain.insert(i, d);
            }
        }
    }
    chain.truncate(usize::from(QSIZE));
    chain
}

#[test]
fn randomized_chains_never_panic_and_stay_in_bounds() {
    randomized(false);
}

/// The same with many descriptors in the last 32 bytes of the address space.
#[test]
fn randomized_chains_at_top_of_address_space() {
    randomized(true);
}

fn randomized(top: bool) {
    let h = H::new();
    let mut seen = std::collections::BTreeMap::new();
    for seed in [1u64, 0x9e37_79b9_7f4a_7c15, 0xdead_beef_cafe_f00d, 42] {
        let mut rng = Rng::new(seed, top);
        for _ in 0..1500 {
            let req = if rng.chance(50) {
                let chain = mutated_chain(&mut rng, &h);
                if rng.chance(20) {
                    h.parse_indirect(&chain)
                } else {
                    h.parse(&chain)
                }
            } else {
                // Arbitrary tables, header bytes and indirect tables.
                h.put(HDR, &header(rng.req_type(), rng.sector()));
                let mut junk = [0u8; 64];
                junk.iter_mut().for_each(|b| *b = rng.next() as u8);
                h.put(SEG, &junk);
                let m = rng.below(10) as usize;
                let itable: Vec<_> = (0..m).map(|i| random_desc(&mut rng, i, m)).collect();
                h.write_table(ITABLE, &itable);
                let n = 1 + rng.below(u64::from(QSIZE)) as usize;
                let table: Vec<_> = (0..n).map(|i| random_desc(&mut rng, i, n)).collect();
                let head = if rng.chance(90) {
                    0
                } else {
                    rng.below(u64::from(QSIZE) + 2) as u16
                };
                h.parse_table(&table, head)
            };
            let kind = check_invariants(&h, &req);
            *seen.entry(kind).or_insert(0u32) += 1;
        }
    }
    // The generator must reach the interesting paths, not only errors.
    for kind in [
        "err",
        "read",
        "write",
        "flush",
        "get_id",
        "discard",
        "write_zeroes",
    ] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) > 0,
            "{kind} never produced: {seen:?}"
        );
    }
}

#[test]
fn seg_max_bounds_the_descriptors_of_a_request() {
    // seg_max for the test ring (16) is 14: header + 14 data segments + status.
    let h = H::new();
    let chain = |n: u64| {
        let mut c = vec![h.hdr(VIRTIO_BLK_T_IN, 0)];
        c.extend((0..n).map(|i| w(DATA + 512 * i, 512)));
        c.push(w(STATUS, 1));
        c
    };
    let req = h.parse_indirect(&chain(14));
    ok_with_status(&req, 14 * 512);
    assert_eq!(h.iov(read_op(&req).1).len(), 14);
    // One more, and a table far past the ring size: refused with IOERR in the last descriptor.
    for n in [15, 1000] {
        let req = h.parse_indirect(&chain(n));
        let e = refused(&req, Status::IoErr);
        assert!(
            matches!(e, RequestError::TooManySegments(c, 16) if *c == n as usize + 2),
            "{e:?}"
        );
    }
}
