//! Engines against a model of the image.
//!
//! Random batches of reads, writes (some FUA), flushes, discards and write-zeroes are submitted
//! together and reaped, then checked: reads against the model, and the whole file against it
//! every few batches. Ranges within a batch never share a sector but often share a block, so
//! read-modify-write runs next to writes and zeroing of the other sectors of its blocks. Guest
//! buffers are split into segments at any byte, at any address, across two adjacent regions at
//! a high base (as libblkio places them).
//!
//! Each batch is split between two queues of one engine, each submitted and reaped by its own
//! thread, as the daemon's queue workers do.
//!
//! The direct engine runs each alignment its planner handles on io_uring and on the thread
//! pool: the filesystem's own, 4 KiB file offsets (sub-block requests widened, RMW under the
//! gate), and 4 KiB memory alignment (most buffers bounced). The sync engine runs on a disk
//! filesystem (positional I/O) and on tmpfs (the image mapping).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, Permissions};

use super::direct::{BOUNCE_BUDGET, DioAlign, DirectEngine, open_direct};
use super::sync::SyncEngine;
use super::{Engine, EngineQueue, Op};
use crate::blk::GuestIoVecs;
use crate::blk::iov::GuestMem;
use crate::image::Image;

const SECTOR: u64 = 512;
/// Guest memory: two adjacent regions at a high address.
const GUEST_BASE: u64 = 0x7f00_0000_0000;
const REGION: u64 = 24 << 20;

/// xorshift64*: deterministic, so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    /// Both read back as zeros afterwards.
    Discard,
    WriteZeroes {
        unmap: bool,
    },
}

/// One request of a batch: `len` bytes at `offset`, in guest segments `segs`.
#[derive(Debug)]
struct TestOp {
    kind: Kind,
    offset: u64,
    len: u64,
    segs: Vec<(GuestAddress, u32)>,
    /// What a write puts there.
    data: Vec<u8>,
    /// Which of the harness's queues submits it.
    queue: usize,
}

/// A disk filesystem, where O_DIRECT works (/tmp may be tmpfs elsewhere).
fn disk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target")
}

/// A scratch image, two queues of its engine, guest memory and the model of the image's contents.
struct Harness {
    path: PathBuf,
    model: Vec<u8>,
    mem: Arc<GuestMem>,
    /// Two queues, each driven by its own thread during a batch, as the daemon's workers are.
    queues: Vec<Box<dyn EngineQueue>>,
    _engine: Box<dyn Engine>,
    what: String,
}

impl Harness {
    /// A random image of `size` bytes in `dir`, served by the engine `open` returns (with a
    /// description for failure messages).
    fn new(
        tag: &str,
        dir: &Path,
        size: u64,
        seed: u64,
        open: impl FnOnce(&Image) -> (Box<dyn Engine>, String),
    ) -> Self {
        let path = dir.join(format!("vublk-model-{tag}-{}", std::process::id()));
        let model = Rng(seed ^ 0x5eed).bytes(size as usize);
        std::fs::write(&path, &model).expect("scratch image");
        let image = Image::open(&path, false, 512).expect("scratch image opens");
        let (engine, how) = open(&image);
        let queues = (0..2)
            .map(|_| engine.new_queue().expect("engine queue"))
            .collect();
        let mem = GuestMem::from_ranges(&[
            (GuestAddress(GUEST_BASE), REGION as usize),
            (GuestAddress(GUEST_BASE + REGION), REGION as usize),
        ])
        .expect("guest memory");
        Harness {
            path,
            model,
            mem: Arc::new(mem),
            queues,
            _engine: engine,
            what: format!("{tag}: seed {seed:#x}, {how}"),
        }
    }

    /// The direct engine; `align` = (file offset, memory) alignment, each overriding the
    /// probed one when given.
    fn direct(
        tag: &str,
        size: u64,
        seed: u64,
        align: (Option<u64>, Option<u64>),
        uring: bool,
    ) -> Self {
        Harness::new(tag, &disk_dir(), size, seed, |image| {
            let (file, native) = open_direct(&image.path, false)
                .expect("O_DIRECT works on the filesystem that holds target/");
            let align = DioAlign {
                offset: align.0.unwrap_or(native.offset),
                mem: align.1.unwrap_or(native.mem),
            };
            let e = DirectEngine::new(image, file, align, uring).expect("direct engine");
            (Box::new(e), format!("direct, {align:?}, io_uring {uring}"))
        })
    }

    /// Submits `ops` at once (each queue's share from its own thread), reaps them all, checks
    /// each result and every read's bytes, then applies the writes to the model. Ops must not
    /// share a sector.
    fn batch(&mut self, ops: &[TestOp]) {
        let mut per_queue: Vec<Vec<(u64, Op)>> = self.queues.iter().map(|_| Vec::new()).collect();
        for (tag, op) in ops.iter().enumerate() {
            let access = match op.kind {
                Kind::Read => Permissions::Write,
                _ => Permissions::Read,
            };
            let ranges = || vec![(op.offset, op.len)];
            let mut at = 0usize;
            for &(addr, len) in &op.segs {
                let len = len as usize;
                let fill = match op.kind {
                    Kind::Write { .. } => op.data[at..at + len].to_vec(),
                    // A read must overwrite every byte of its buffers.
                    _ => vec![0xa5; len],
                };
                self.mem
                    .write_slice(&fill, addr)
                    .expect("segment in guest memory");
                at += len;
            }
            let bufs = || GuestIoVecs::new(&self.mem, &op.segs, access).expect("iovecs");
            let engine_op = match op.kind {
                Kind::Flush => Op::Flush,
                Kind::Discard => Op::Discard { ranges: ranges() },
                Kind::WriteZeroes { unmap } => Op::WriteZeroes {
                    ranges: ranges(),
                    unmap,
                },
                Kind::Read => Op::Read {
                    offset: op.offset,
                    bufs: bufs(),
                },
                Kind::Write { fua } => Op::Write {
                    offset: op.offset,
                    bufs: bufs(),
                    fua,
                },
            };
            per_queue[op.queue % self.queues.len()].push((tag as u64, engine_op));
        }
        let done: Vec<_> = std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .queues
                .iter_mut()
                .zip(per_queue)
                .map(|(q, work)| scope.spawn(move || run_queue(q.as_mut(), work)))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().expect("queue thread"))
                .collect()
        });
        assert_eq!(
            done.len(),
            ops.len(),
            "{}: every op completes once",
            self.what
        );
        for c in &done {
            let op = &ops[c.tag as usize];
            match &c.result {
                Ok(n) if *n == op.len || !matches!(op.kind, Kind::Read | Kind::Write { .. }) => {}
                other => panic!("{}: {op:?} completed with {other:?}", self.what),
            }
        }
        for op in ops {
            let range = op.offset as usize..(op.offset + op.len) as usize;
            match op.kind {
                Kind::Read => {
                    let mut got = Vec::with_capacity(op.len as usize);
                    for &(addr, len) in &op.segs {
                        let mut seg = vec![0; len as usize];
                        self.mem.read_slice(&mut seg, addr).expect("segment");
                        got.extend_from_slice(&seg);
                    }
                    if got != self.model[range] {
                        panic!(
                            "{}: read {}+{} returned other bytes",
                            self.what, op.offset, op.len
                        );
                    }
                }
                Kind::Write { .. } => self.model[range].copy_from_slice(&op.data),
                Kind::Discard | Kind::WriteZeroes { .. } => self.model[range].fill(0),
                Kind::Flush => {}
            }
        }
    }

    /// The file, read through the page cache, equals the model.
    fn check_file(&self) {
        let got = std::fs::read(&self.path).expect("read scratch image");
        if let Some(i) = (0..got.len()).find(|&i| got[i] != self.model[i]) {
            panic!("{}: image differs from the model at byte {i}", self.what);
        }
    }
}

/// Submits `work` on `q`, commits once, and reaps until nothing is in flight.
fn run_queue(q: &mut dyn EngineQueue, work: Vec<(u64, Op)>) -> Vec<super::Completion> {
    for (tag, op) in work {
        q.submit(tag, op);
    }
    q.commit();
    let mut done = Vec::new();
    loop {
        q.reap(&mut done);
        if q.in_flight() == 0 {
            return done;
        }
        q.wait();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Splits `len` bytes into 1-4 segments cut at any byte (half the cuts on a sector boundary),
/// each placed after `*next` at a 4 KiB, 512-byte or odd address.
fn segments(rng: &mut Rng, len: u64, next: &mut u64) -> Vec<(GuestAddress, u32)> {
    let mut cuts: Vec<u64> = (0..rng.below(4))
        .map(|_| {
            let c = 1 + rng.below(len - 1);
            if rng.below(2) == 0 {
                c / SECTOR * SECTOR
            } else {
                c
            }
        })
        .filter(|&c| c > 0 && c < len)
        .collect();
    cuts.push(0);
    cuts.push(len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| {
            let addr = match rng.below(4) {
                0 | 1 => next.next_multiple_of(4096),
                2 => next.next_multiple_of(SECTOR),
                _ => *next + 1 + rng.below(SECTOR - 1),
            };
            *next = addr + (w[1] - w[0]);
            (GuestAddress(addr), (w[1] - w[0]) as u32)
        })
        .collect()
}

/// A batch of up to 24 ops on sector ranges that do not overlap; most fall in a hot 64 KiB so
/// that they share blocks.
fn random_batch(rng: &mut Rng, size: u64) -> Vec<TestOp> {
    let sectors = size / SECTOR;
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut ops = Vec::new();
    // Start some batches just below the boundary between the two regions.
    let mut next = if rng.below(4) == 0 {
        GUEST_BASE + REGION - rng.below(64 << 10)
    } else {
        GUEST_BASE + rng.below(4096)
    };
    let mut big = false;
    for _ in 0..1 + rng.below(24) {
        let kind = match rng.below(24) {
            0 => Kind::Flush,
            1 => Kind::Discard,
            2 => Kind::WriteZeroes { unmap: false },
            3 => Kind::WriteZeroes { unmap: true },
            4..=11 => Kind::Read,
            n => Kind::Write { fua: n < 15 },
        };
        if kind == Kind::Flush {
            ops.push(TestOp {
                kind,
                offset: 0,
                len: 0,
                segs: Vec::new(),
                data: Vec::new(),
                queue: rng.below(2) as usize,
            });
            continue;
        }
        let (start, n) = match rng.below(10) {
            0..=5 => (rng.below(128), 1 + rng.below(16)),
            6 if !big => {
                big = true;
                let n = 1024 + rng.below(1024);
                (rng.below(sectors - n), n)
            }
            _ => {
                let n = 1 + rng.below(256);
                (rng.below(sectors - n), n)
            }
        };
        let (lo, hi) = (start, (start + n).min(sectors));
        if taken.iter().any(|&(a, b)| lo < b && a < hi) {
            continue;
        }
        taken.push((lo, hi));
        let len = (hi - lo) * SECTOR;
        let segs = match kind {
            Kind::Read | Kind::Write { .. } => segments(rng, len, &mut next),
            _ => Vec::new(),
        };
        let data = match kind {
            Kind::Write { .. } => rng.bytes(len as usize),
            _ => Vec::new(),
        };
        ops.push(TestOp {
            kind,
            offset: lo * SECTOR,
            len,
            segs,
            data,
            queue: rng.below(2) as usize,
        });
    }
    assert!(next < GUEST_BASE + 2 * REGION, "batch fits in guest memory");
    ops
}

const MODEL_SIZE: u64 = 4 << 20;

fn model_run(mut h: Harness, seed: u64) {
    let mut rng = Rng(seed);
    for round in 1..=150 {
        let ops = random_batch(&mut rng, MODEL_SIZE);
        h.batch(&ops);
        if round % 25 == 0 {
            h.check_file();
        }
    }
}

/// The model on the direct engine with `align`, on io_uring and on the thread pool.
fn direct_model(name: &str, align: (Option<u64>, Option<u64>), seeds: [u64; 2]) {
    for (uring, seed) in [(true, seeds[0]), (false, seeds[1])] {
        let tag = format!("{name}-{}", if uring { "uring" } else { "pool" });
        model_run(Harness::direct(&tag, MODEL_SIZE, seed, align, uring), seed);
    }
}

#[test]
fn random_batches_match_the_model_at_the_filesystems_alignment() {
    direct_model(
        "native",
        (None, None),
        [0x9e37_79b9_7f4a_7c15, 0xc2b2_ae3d_27d4_eb4f],
    );
}

#[test]
fn random_batches_match_the_model_with_4k_file_offsets() {
    direct_model(
        "rmw",
        (Some(4096), None),
        [0x1656_67b1_9e37_79f9, 0x85eb_ca77_c2b2_ae63],
    );
}

#[test]
fn random_batches_match_the_model_with_4k_memory_alignment() {
    direct_model(
        "bounce",
        (None, Some(4096)),
        [0x27d4_eb2f_1656_67c5, 0x94d0_49bb_1331_11eb],
    );
}

/// The sync engine on a disk filesystem (positional I/O) and on tmpfs (the image mapping,
/// whose discards must drop pages from the mapping as well as from the file).
#[test]
fn random_batches_match_the_model_on_the_sync_engine() {
    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "/dev/shm (tmpfs) is needed for the mapped path"
    );
    for (tag, dir, seed, mapped) in [
        ("sync-disk", disk_dir(), 0x2545_f491_4f6c_dd1d, false),
        ("sync-tmpfs", shm.to_path_buf(), 0xbf58_476d_1ce4_e5b9, true),
    ] {
        let h = Harness::new(tag, &dir, MODEL_SIZE, seed, |image| {
            let e = SyncEngine::new(image);
            assert_eq!(e.is_mapped(), mapped, "{tag}: image mapping");
            (Box::new(e), format!("sync, mapped {mapped}"))
        });
        model_run(h, seed);
    }
}

/// A sub-block write too large to bounce at once goes a chunk at a time, with its partial first
/// and last blocks read first, next to in-flight writes to the neighbouring sectors.
#[test]
fn a_sub_block_request_past_the_bounce_budget_goes_in_chunks() {
    const SIZE: u64 = 40 << 20;
    for uring in [true, false] {
        let mut h = Harness::direct("chunked", SIZE, 7, (Some(4096), None), uring);
        let mut rng = Rng(0xdead_beef);
        let offset = 3 * 4096 + SECTOR;
        let len = BOUNCE_BUDGET as u64 / 2 + 3 * SECTOR;
        let mut next = GUEST_BASE + 1;
        let big = TestOp {
            kind: Kind::Write { fua: false },
            offset,
            len,
            segs: segments(&mut rng, len, &mut next),
            data: rng.bytes(len as usize),
            queue: 0,
        };
        // Sectors just before and just after it, in its first and last blocks: one from the
        // other queue, one from the same.
        let mut neighbour = |offset: u64, next: &mut u64, queue: usize| TestOp {
            kind: Kind::Write { fua: false },
            offset,
            len: SECTOR,
            segs: segments(&mut rng, SECTOR, next),
            data: vec![0x3c; SECTOR as usize],
            queue,
        };
        let before = neighbour(offset - SECTOR, &mut next, 1);
        let after = neighbour(offset + len, &mut next, 0);
        h.batch(&[before, big, after]);
        h.check_file();
        let mut next = GUEST_BASE + 3;
        let read = TestOp {
            kind: Kind::Read,
            offset,
            len,
            segs: segments(&mut rng, len, &mut next),
            data: Vec::new(),
            queue: 1,
        };
        h.batch(&[read]);
    }
}
