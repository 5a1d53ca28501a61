//! Valid requests of every type: how they parse, what they cover, the used length.

use super::*;

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
