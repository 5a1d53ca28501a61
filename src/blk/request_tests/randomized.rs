//! Randomized chains: mutated requests and arbitrary tables never panic and stay in bounds.

use super::*;

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
