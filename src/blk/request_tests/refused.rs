//! Bad requests that still have a status byte: refused with the right status and error.

use super::*;

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
