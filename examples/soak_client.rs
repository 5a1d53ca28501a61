//! Soak client for `scripts/soak.sh`: a multi-queue write/verify workload over libblkio that
//! survives its own disconnects and the daemon's restarts, and checks that every acknowledged
//! write is still there.
//!
//! It keeps, per 4 KiB block, the seed of the last acknowledged write and, while a write is in
//! flight, the seed being written. When the connection breaks (daemon killed or restarted by the
//! script), blocks with a write in flight may hold either seed; everything else must hold its
//! last acknowledged seed. Sessions also end on purpose at random (a client disconnect), and
//! each new session starts by reading back a sample of blocks.
//!
//! Prints `soak: N passed, M failed` (checks of acknowledged data) and exits non-zero on any
//! mismatch.

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use clap::Parser;

const BS: usize = 4096;

#[derive(Debug, Parser)]
struct Args {
    /// vhost-user socket.
    #[arg(long)]
    path: String,
    /// Device blocks (4 KiB) to use.
    #[arg(long, default_value_t = 8192)]
    blocks: usize,
    /// Queues.
    #[arg(long, default_value_t = 2)]
    queues: usize,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 16)]
    iodepth: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut r = Rng(seed | 1);
    for c in buf.chunks_mut(8) {
        let v = r.next().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

#[derive(Clone, Default)]
struct Block {
    /// Seed of the last acknowledged write (0: never written, reads as zeros).
    acked: u64,
    /// Seeds written since then without an acknowledgement (connection broke meanwhile).
    unacked: Vec<u64>,
}

struct Stats {
    passed: u64,
    failed: u64,
    sessions: u64,
    writes: u64,
}

fn check(stats: &mut Stats, blk: &Block, idx: usize, data: &[u8]) {
    let mut want = vec![0u8; BS];
    let mut ok = |seed: u64| {
        if seed == 0 {
            data.iter().all(|&b| b == 0)
        } else {
            fill(&mut want, seed);
            want == data
        }
    };
    if ok(blk.acked) || blk.unacked.iter().any(|&s| ok(s)) {
        stats.passed += 1;
    } else {
        stats.failed += 1;
        eprintln!(
            "soak: block {idx} lost its acknowledged write (seed {})",
            blk.acked
        );
    }
}

/// One session: connect, verify a sample, then write/verify until the deadline, a random
/// disconnect, or a broken connection. Returns false if it could not connect.
fn session(a: &Args, state: &mut [Block], rng: &mut Rng, stats: &mut Stats, end: Instant) -> bool {
    let Ok(mut b) = Blkio::new("virtio-blk-vhost-user") else {
        return false;
    };
    if b.set_str("path", &a.path).is_err() || b.connect().is_err() {
        return false;
    }
    if b.set_i32("num-queues", a.queues as i32).is_err() {
        return false;
    }
    let Ok(started) = b.start() else { return false };
    let mut qs = started.queues;
    let slots = a.queues * a.iodepth;
    let Ok(region) = b.alloc_mem_region(slots * BS) else {
        return false;
    };
    if b.map_mem_region(&region).is_err() {
        return false;
    }
    stats.sessions += 1;
    // SAFETY: the region is ours, mapped for its whole length, and only touched by this thread
    // while no request uses the slot being accessed.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    let timeout = |q: &mut blkio::Blkioq, out: &mut [MaybeUninit<Completion>], min: usize| {
        let mut t = Duration::from_secs(5);
        q.do_io(out, min, Some(&mut t), None)
    };
    let mut out: Vec<MaybeUninit<Completion>> = (0..slots).map(|_| MaybeUninit::uninit()).collect();
    // Read back a sample first: what earlier sessions acknowledged must be there.
    for _ in 0..64 {
        let idx = (rng.next() as usize) % state.len();
        let slot = 0;
        qs[0].read(
            (idx * BS) as u64,
            mem[slot * BS..].as_mut_ptr(),
            BS,
            usize::MAX,
            ReqFlags::empty(),
        );
        match timeout(&mut qs[0], &mut out[..1], 1) {
            // SAFETY: do_io initialised the first entry.
            Ok(1) if unsafe { out[0].assume_init_read() }.ret == 0 => {
                check(stats, &state[idx], idx, &mem[..BS]);
            }
            _ => return true, // connection broken: the next session retries
        }
    }
    // Write/verify loop: each slot writes a block, then reads it back on the other queue.
    let disconnect_at = Instant::now() + Duration::from_millis(200 + rng.next() % 3000);
    let mut busy = vec![None::<(usize, u64, bool)>; slots]; // (block, seed, is_read)
    let submit_write = |qs: &mut Vec<blkio::Blkioq>,
                        mem: &mut [u8],
                        state: &mut [Block],
                        busy: &mut Vec<Option<(usize, u64, bool)>>,
                        slot: usize,
                        rng: &mut Rng| {
        let mut idx = (rng.next() as usize) % state.len();
        while busy.iter().flatten().any(|b| b.0 == idx) {
            idx = (idx + 1) % state.len();
        }
        let seed = rng.next() | 1;
        fill(&mut mem[slot * BS..(slot + 1) * BS], seed);
        state[idx].unacked.push(seed);
        busy[slot] = Some((idx, seed, false));
        let q = slot % qs.len();
        qs[q].write(
            (idx * BS) as u64,
            mem[slot * BS..].as_ptr(),
            BS,
            slot,
            ReqFlags::empty(),
        );
    };
    for slot in 0..slots {
        submit_write(&mut qs, mem, state, &mut busy, slot, rng);
    }
    let mut last_progress = Instant::now();
    loop {
        let mut any = false;
        for qi in 0..qs.len() {
            let n = match timeout(&mut qs[qi], &mut out, 0) {
                Ok(n) => n,
                Err(_) => return true,
            };
            for c in &out[..n] {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_read() };
                any = true;
                let slot = c.user_data;
                let Some((idx, seed, is_read)) = busy[slot] else {
                    continue;
                };
                if c.ret != 0 {
                    // A failed request means the connection is going away; the write stays
                    // "in flight" (either seed acceptable).
                    return true;
                }
                if is_read {
                    check(stats, &state[idx], idx, &mem[slot * BS..(slot + 1) * BS]);
                    busy[slot] = None;
                    if Instant::now() >= end || Instant::now() >= disconnect_at {
                        continue;
                    }
                    submit_write(&mut qs, mem, state, &mut busy, slot, rng);
                } else {
                    stats.writes += 1;
                    state[idx] = Block {
                        acked: seed,
                        unacked: Vec::new(),
                    };
                    busy[slot] = Some((idx, seed, true));
                    let q = (slot + 1) % qs.len();
                    qs[q].read(
                        (idx * BS) as u64,
                        mem[slot * BS..].as_mut_ptr(),
                        BS,
                        slot,
                        ReqFlags::empty(),
                    );
                }
            }
        }
        if busy.iter().all(Option::is_none) {
            return true; // deadline or planned disconnect, everything drained
        }
        if any {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(2) {
            // Silence: the daemon went away (libblkio does not see a peer's death on its own).
            return true;
        }
        if !any {
            // Let the kernel deliver completions; a dead daemon shows as errors or silence.
            let mut t = Duration::from_secs(5);
            match qs[0].do_io(&mut out[..0], 0, Some(&mut t), None) {
                Ok(_) => {}
                Err(_) => return true,
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    let mut state = vec![Block::default(); a.blocks];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut stats = Stats {
        passed: 0,
        failed: 0,
        sessions: 0,
        writes: 0,
    };
    let end = Instant::now() + Duration::from_secs_f64(a.seconds);
    let mut failed_connects = 0u32;
    while Instant::now() < end {
        if session(&a, &mut state, &mut rng, &mut stats, end) {
            failed_connects = 0;
        } else {
            failed_connects += 1;
            if failed_connects > 600 {
                eprintln!("soak: could not connect for 60 s");
                stats.failed += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!(
        "soak: {} sessions, {} acknowledged writes, {} checks",
        stats.sessions,
        stats.writes,
        stats.passed + stats.failed
    );
    println!("soak: {} passed, {} failed", stats.passed, stats.failed);
    if stats.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
