//! Indirect descriptor tables, and chains too broken to carry a status byte.

use super::*;

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
