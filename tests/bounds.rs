//! Resource bounds against a hostile guest: whatever a driver puts in its ring, vublk's memory
//! and its number of requests in flight stay bounded by the queue size and its configuration.
//!
//! Driven over the daemon's real socket by the hand-made frontend of tests/common/frontend.rs
//! (memfd guest memory). The daemon maps the guest memfd, so guest pages it touches count in
//! its RSS as shared memory; bounce buffers and request state are anonymous memory, so the
//! bounds below are on `RssAnon` (sampled while the requests run) and, as a true peak, on
//! `VmHWM` minus the guest memory size.
//!
//! - [`bounce_memory_is_bounded`]: the direct engine bounces unaligned guest buffers through
//!   host buffers. A full ring of large unaligned reads and writes, then single requests twice
//!   the bounce budget, all complete with correct data while bounce memory stays within
//!   `BOUNCE_BUDGET` (plus the per-queue pool of `POOL_BYTES`).
//! - [`in_flight_is_capped_at_the_ring_size`]: a driver that keeps moving avail->idx a whole
//!   ring past the device's position (legal) while it re-posts heads still in flight never gets
//!   more than queue-size requests in flight (the stats' `in_flight_peak`), and memory is flat.
//!
//! Both were checked to fail when the bound is removed: with `BOUNCE_BUDGET` raised to 1 GiB
//! the daemon's anonymous memory grew by 132 MiB against a 96 MiB bound; without the worker's
//! cap the in-flight peak exceeds the ring size.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use frontend::*;
use vhost::vhost_user::VhostUserFrontend;
use vublk::engine::direct::{BOUNCE_BUDGET, POOL_BYTES};

/// Anonymous memory the daemon may use for things other than bounce buffers while the test
/// runs (request state, allocator slack, io_uring bookkeeping).
const SLACK: u64 = 24 * MIB;

/// A daemon with one queue on a random-filled image in the default temporary directory (ext4
/// here, where O_DIRECT works; tmpfs would make `--engine direct` fail).
struct Env {
    _dir: TestDir,
    image: PathBuf,
    socket: PathBuf,
    ctl: PathBuf,
    daemon: Daemon,
}

impl Env {
    /// `pool`: deny io_uring (seccomp), so the engine runs on its 4-thread pool per queue.
    fn new(tag: &str, image_size: u64, pool: bool) -> Env {
        let dir = TestDir::new(tag);
        let image = create_image_rotated(&dir.join("disk.img"), image_size, 0xb0_b0);
        let ctl = dir.join("ctl.sock");
        let socket = dir.join("vublk.sock");
        let args = os_args(&[
            "--socket-path",
            socket.to_str().unwrap(),
            "--blk-file",
            image.to_str().unwrap(),
            "--engine",
            "direct",
            "--num-queues",
            "1",
            "--control-socket",
            ctl.to_str().unwrap(),
        ]);
        let mut daemon = Daemon::spawn(Spawn {
            dir: &dir,
            name: "vublk",
            args,
            pass_fd: None,
            socket: Some(socket.clone()),
            stop_reading_notify_after_ready: false,
            deny_io_uring: pool,
        });
        if let Err(e) = daemon.wait_ready(READY_TIMEOUT) {
            panic!("{e}");
        }
        let log = daemon.stderr();
        assert!(
            log.contains("direct engine: O_DIRECT alignment"),
            "not on the direct engine:\n{log}"
        );
        Env {
            socket,
            image,
            ctl,
            _dir: dir,
            daemon,
        }
    }

    fn guest(&self, queue_size: u16, region_len: usize) -> Guest {
        Guest::connect(
            &self.socket,
            &self.image,
            Opts {
                queue_size,
                region_len,
                margin: 4096,
                ..Opts::default()
            },
        )
    }

    fn stats(&self) -> vublk::stats::QueueSnapshot {
        let s = vublk::control::fetch_stats(&self.ctl)
            .unwrap_or_else(|e| panic!("{}", vublk::error_chain(&e)));
        s.queues[0].clone()
    }

    /// The O_DIRECT memory alignment the daemon logged at start-up.
    fn mem_align(&self) -> u64 {
        let log = self.daemon.stderr();
        let line = log
            .lines()
            .find(|l| l.contains("O_DIRECT alignment: memory"))
            .expect("alignment line");
        let after = line.split("memory ").nth(1).unwrap();
        after.split_whitespace().next().unwrap().parse().unwrap()
    }
}

/// One field of /proc/PID/status, in bytes.
fn status_field(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples the daemon's anonymous RSS every millisecond until dropped; `peak()` is the highest.
struct AnonSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl AnonSampler {
    fn start(pid: i32) -> AnonSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(status_field(pid, "RssAnon")));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&peak));
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_field(pid, "RssAnon"), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(1));
            }
        });
        AnonSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for AnonSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// A request built as one ring descriptor pointing at an indirect table [header, data, status],
/// so that a full ring of requests needs only one descriptor each.
fn indirect_rw(g: &mut Guest, read: bool, sector: u64, data: u64, len: u32) -> Req {
    let table = g.buf(48);
    let hdr = g.hdr(if read { T_IN } else { T_OUT }, sector);
    let status = g.wbuf(1);
    let dflags = if read { F_WRITE } else { 0 };
    g.write_desc(table, 0, hdr, 16, F_NEXT, 1);
    g.write_desc(table, 1, data, len, dflags | F_NEXT, 2);
    g.write_desc(table, 2, status, 1, F_WRITE, 0);
    let head = g.alloc_descs(1);
    g.set_desc(head, table, 48, F_INDIRECT, 0);
    Req {
        head,
        sector,
        data,
        len: len as usize,
        status,
    }
}

/// Waits for `n` used entries and checks each request's used length and status.
#[track_caller]
fn complete_all(g: &mut Guest, reqs: &[(Req, bool)], what: &str) {
    let used = g.wait_used(reqs.len() as u16);
    for (r, read) in reqs {
        let e: Vec<_> = used.iter().filter(|u| u.0 == u32::from(r.head)).collect();
        assert_eq!(e.len(), 1, "{what}: head {}: used entries {e:?}", r.head);
        let want = if *read { r.len as u32 + 1 } else { 1 };
        assert_eq!(
            (e[0].1, g.status(r)),
            (want, S_OK),
            "{what}: head {} ({} of {} bytes at sector {}): used len and status",
            r.head,
            if *read { "read" } else { "write" },
            r.len,
            r.sector
        );
    }
}

/// Guest address `>= a` with `addr % 4096 == off`.
fn at_offset(a: u64, off: u64) -> u64 {
    a.next_multiple_of(4096) + off
}

/// [`assert_bytes_eq`], with a fast path for the (usual) equal case in a debug build.
#[track_caller]
fn same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if actual != expected {
        assert_bytes_eq(actual, expected, what);
    }
}

#[track_caller]
fn check_image(image: &Path, offset: u64, want: &[u8], what: &str) {
    same_bytes(&read_file_at(image, offset, want.len()), want, what);
}

/// An image of `size` bytes whose every MiB differs (a random MiB, rotated differently each
/// time): fast to write even in a debug build.
fn create_image_rotated(path: &Path, size: u64, seed: u64) -> PathBuf {
    use std::io::Write;
    let chunk = pattern(seed, MIB as usize);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..size / MIB {
        let r = (i as usize * 4099) % chunk.len();
        f.write_all(&chunk[r..]).unwrap();
        f.write_all(&chunk[..r]).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
    path.to_path_buf()
}

#[test]
fn bounce_memory_is_bounded() {
    const QSIZE: u16 = 256;
    /// Each request moves 4 MiB, so a full ring would hold 1 GiB of bounce buffers if nothing
    /// bounded them.
    const LEN: u64 = 4 * MIB;
    /// Distinct buffers (and image ranges) per direction; requests that share one move the same
    /// bytes, so the outcome is well defined although they run concurrently.
    const N_BUF: u64 = 16;
    /// Twice the bounce budget, in one descriptor.
    const BIG: u64 = 2 * BOUNCE_BUDGET as u64;
    let t0 = Instant::now();
    let span = N_BUF * LEN;
    let env = Env::new("bounce", (2 * span).max(2 * BIG), false);
    let align = env.mem_align();
    assert!(
        align > 1,
        "O_DIRECT needs no memory alignment here; nothing would be bounced"
    );
    // Read buffers, then write sources, all one byte past an O_DIRECT-aligned address so that
    // every request is bounced; the BIG requests later use the same memory from `base`.
    let region = (2 * span).max(BIG) + 8 * MIB;
    let mut g = env.guest(QSIZE, region as usize);
    g.probe("before the bounce test");
    g.reuse_descs();
    // Write-through (wce = 0): writes complete only once durable, so they stay in flight long
    // enough for a full ring to pile up bounce buffers if nothing bounded them.
    g.fe.set_config(
        vublk::blk::config::WCE_OFFSET as u32,
        vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
        &[0],
    )
    .expect("SET_CONFIG wce=0");
    let raw = g.buf((region - 2 * MIB) as usize);
    let base = at_offset(raw, 1);
    g.mem.allow_write(base, BIG.max(span));
    let src_base = base + span;
    let mut srcs = Vec::new();
    for k in 0..N_BUF {
        let data = pattern(0x5c + k, LEN as usize);
        g.mem.write(src_base + k * LEN, &data);
        srcs.push(data);
    }
    let pid = env.daemon.pid();
    let (base_anon, base_rss) = (status_field(pid, "RssAnon"), status_field(pid, "VmRSS"));
    let sampler = AnonSampler::start(pid);
    eprintln!(
        "setup {:?}; O_DIRECT memory alignment {align}; daemon RssAnon {:.1} MiB, VmRSS {:.1} MiB",
        t0.elapsed(),
        mib(base_anon),
        mib(base_rss)
    );

    // A full ring, reads and writes interleaved: read k fills buffer k from image range k,
    // write k copies source k to image range N_BUF + k.
    let t = Instant::now();
    let mut reqs = Vec::new();
    for i in 0..u64::from(QSIZE) {
        let k = (i / 2) % N_BUF;
        let r = if i % 2 == 0 {
            (
                indirect_rw(&mut g, true, k * LEN / 512, base + k * LEN, LEN as u32),
                true,
            )
        } else {
            let sector = (N_BUF + k) * LEN / 512;
            (
                indirect_rw(&mut g, false, sector, src_base + k * LEN, LEN as u32),
                false,
            )
        };
        reqs.push(r);
    }
    let heads: Vec<u16> = reqs.iter().map(|r| r.0.head).collect();
    g.submit(&heads);
    complete_all(&mut g, &reqs, "full ring of unaligned 4 MiB requests");
    let ring_peak = sampler.peak();
    eprintln!(
        "full ring done in {:?}: RssAnon peak {:.1} MiB",
        t.elapsed(),
        mib(ring_peak)
    );
    for k in 0..N_BUF {
        let want = read_file_at(&env.image, k * LEN, LEN as usize);
        same_bytes(
            &g.mem.read(base + k * LEN, LEN as usize),
            &want,
            "unaligned read",
        );
        check_image(
            &env.image,
            (N_BUF + k) * LEN,
            &srcs[k as usize],
            "unaligned write",
        );
    }

    // One read and one write of twice the budget each, in a single descriptor.
    let t = Instant::now();
    g.reuse_descs();
    let r = indirect_rw(&mut g, true, 0, base, BIG as u32);
    g.submit(&[r.head]);
    complete_all(
        &mut g,
        &[(r, true)],
        "unaligned read of twice the bounce budget",
    );
    let want = read_file_at(&env.image, 0, BIG as usize);
    same_bytes(&g.mem.read(base, BIG as usize), &want, "big unaligned read");
    let w = indirect_rw(&mut g, false, BIG / 512, base, BIG as u32);
    g.submit(&[w.head]);
    complete_all(
        &mut g,
        &[(w, false)],
        "unaligned write of twice the bounce budget",
    );
    check_image(&env.image, BIG, &want, "big unaligned write");
    eprintln!("big requests done in {:?}", t.elapsed());
    g.probe_write(7, 3);

    let anon_peak = sampler.peak();
    drop(sampler);
    let hwm = status_field(pid, "VmHWM");
    let bound = BOUNCE_BUDGET as u64 + POOL_BYTES as u64 + SLACK;
    eprintln!(
        "RssAnon: baseline {:.1} MiB, peak {:.1} MiB (+{:.1}); VmHWM {:.1} MiB with {:.1} MiB of \
         guest memory; bound +{:.1} MiB",
        mib(base_anon),
        mib(anon_peak),
        mib(anon_peak - base_anon),
        mib(hwm),
        mib(region),
        mib(bound)
    );
    assert!(
        anon_peak - base_anon <= bound,
        "anonymous memory grew by {:.1} MiB with bounced I/O; the bound is {:.1} MiB \
         (BOUNCE_BUDGET + POOL_BYTES + {:.0} MiB)",
        mib(anon_peak - base_anon),
        mib(bound),
        mib(SLACK)
    );
    // A true peak, not a sample: everything the daemon had mapped at once, less the guest
    // memory it may have touched.
    assert!(
        hwm <= base_rss + region + bound,
        "VmHWM {:.1} MiB exceeds baseline {:.1} + guest {:.1} + bound {:.1} MiB",
        mib(hwm),
        mib(base_rss),
        mib(region),
        mib(bound)
    );
    env.daemon.assert_alive("after bounced I/O");
    g.mem.assert_untouched("bounced I/O");
    let st = env.stats();
    assert_eq!((st.errors, st.in_flight), (0, 0), "stats after bounced I/O");
    eprintln!("total {:?}", t0.elapsed());
}

#[test]
fn in_flight_is_capped_at_the_ring_size() {
    const QSIZE: u16 = 256;
    const LEN: u32 = 1 << 20;
    // On the thread pool only 4 requests execute at a time and the rest wait in flight: the
    // ring fills whatever the disk's own queue depth.
    let env = Env::new("inflight", 64 * MIB, true);
    let mut g = env.guest(QSIZE, 8 << 20);
    g.probe("before the in-flight test");
    g.reuse_descs();
    // Every request reads 1 MiB (aligned: zero copy) into the same guest buffer: the driver
    // does not care what lands there, it only wants the device busy.
    let raw = g.buf(LEN as usize + 8192);
    let data = at_offset(raw, 0);
    g.mem.allow_write(data, u64::from(LEN));
    let reqs: Vec<Req> = (0..u64::from(QSIZE))
        .map(|i| indirect_rw(&mut g, true, (i % 60) * 2048, data, LEN))
        .collect();
    // Avail slot s always holds head s, so any avail index names a valid request.
    for (s, r) in reqs.iter().enumerate() {
        g.mem
            .write(g.ring.avail + 4 + 2 * s as u64, &r.head.to_le_bytes());
    }
    let avail_event = g.ring.used + 4 + 8 * u64::from(QSIZE);
    let pid = env.daemon.pid();
    let base_anon = status_field(pid, "RssAnon");
    let sampler = AnonSampler::start(pid);
    // The driver moves avail->idx a whole ring past the device's last published position
    // (avail_event, never ahead of where the device really is, so this is legal) as soon as
    // that moves, while most of what it posted before is still in flight.
    let mut avail = 0u16;
    let (t0, mut pushes) = (Instant::now(), 0u32);
    while t0.elapsed() < Duration::from_secs(3) && avail < 30_000 {
        let target = g.mem.load_u16(avail_event).wrapping_add(QSIZE);
        if target != avail {
            avail = target;
            g.set_avail_idx(avail);
            g.kick();
            pushes += 1;
        }
        thread::sleep(Duration::from_micros(200));
    }
    // Stop pushing; everything posted must complete.
    let deadline = Instant::now() + USED_TIMEOUT;
    while g.used_idx() != avail {
        assert!(
            Instant::now() < deadline,
            "used idx {} never reached avail idx {avail}",
            g.used_idx()
        );
        thread::sleep(Duration::from_millis(1));
    }
    let anon_peak = sampler.peak();
    drop(sampler);
    let st = env.stats();
    eprintln!(
        "{pushes} pushes; stats: {} reads, peak in flight {}, in flight now {}; RssAnon {:.1} \
         -> peak {:.1} MiB",
        st.reads,
        st.in_flight_peak,
        st.in_flight,
        mib(base_anon),
        mib(anon_peak)
    );
    assert!(
        pushes >= 3,
        "the device never took the ring: {pushes} pushes"
    );
    assert_eq!(
        st.in_flight_peak,
        u64::from(QSIZE),
        "in-flight peak: the device must fill the ring and never hold more"
    );
    assert_eq!(
        (st.in_flight, st.errors),
        (0, 0),
        "in flight and errors at the end"
    );
    // Every request posted (the probe was avail index 0), each answered once.
    assert_eq!(st.reads, u64::from(avail), "reads completed");
    for r in &reqs {
        assert_eq!(g.status(r), S_OK, "status of head {}", r.head);
    }
    assert!(
        anon_peak - base_anon <= SLACK,
        "anonymous memory grew by {:.1} MiB with zero-copy requests in flight",
        mib(anon_peak - base_anon)
    );
    env.daemon.assert_alive("after the in-flight test");
}
