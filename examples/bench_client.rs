//! Benchmark client for vhost-user-blk backends, built on libblkio (`blkio` crate, driver
//! "virtio-blk-vhost-user"). The same client drives vublk, qemu-storage-daemon and
//! cloud-hypervisor's vhost_user_block in `scripts/bench.sh`.
//!
//! One thread drives every queue: on a pinned single CPU, a thread per queue would only add
//! context switches. Each queue keeps `--iodepth` requests in flight; a completed request is
//! resubmitted at once (to a new random offset, or to the queue's next sequential block). When a
//! round over all queues reaps nothing, the thread sleeps in poll(2) on the queues' completion
//! eventfds (or, with `--poll`, spins on libblkio poll queues, which also tells the backend not to
//! signal completions).
//!
//! After `--ramp` seconds of warm-up it measures for `--runtime` seconds, then stops resubmitting,
//! drains what is in flight and prints one JSON line: IOPS, MiB/s, latency percentiles from a
//! log-linear histogram (≤ 1.6 % bucket error), the client's own CPU use, and — with
//! `--backend-pid` — the backend's CPU use ((utime+stime) from /proc/PID/stat, sampled exactly at
//! the window's edges), its peak RSS (VmHWM) and its private RSS at the end (RssAnon).
//!
//! ```sh
//! cargo run --release --example bench_client -- --path /tmp/vublk.sock --rw randread \
//!     --bs 4096 --iodepth 32 --num-queues 1 --runtime 10 --ramp 2
//! ```

use std::fmt::Write as _;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    Randread,
    Randwrite,
    Read,
    Write,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
        }
    }
    fn is_write(self) -> bool {
        matches!(self, Rw::Randwrite | Rw::Write)
    }
    fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }
}

#[derive(Debug, Parser)]
#[command(about = "libblkio benchmark client for vhost-user-blk backends (one JSON line out)")]
struct Args {
    /// vhost-user socket of the backend.
    #[arg(long)]
    path: String,
    /// Workload.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Block size in bytes (offsets are multiples of it).
    #[arg(long, default_value_t = 4096)]
    bs: usize,
    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// Queues to use (all driven by this one thread).
    #[arg(long, default_value_t = 1)]
    num_queues: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, default_value_t = 2.0)]
    ramp: f64,
    /// Busy-poll libblkio poll queues instead of sleeping on completion eventfds (burns the
    /// client CPU; the backend is asked not to signal completions).
    #[arg(long)]
    poll: bool,
    /// Backend process to account: CPU over the measured window and peak RSS.
    #[arg(long)]
    backend_pid: Option<u32>,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Keep retrying the connection this many seconds (the socket may not listen yet).
    #[arg(long, default_value_t = 5.0)]
    connect_timeout: f64,
}

// ---------------------------------------------------------------------------------------------
// Log-linear latency histogram (HdrHistogram-like): values below 2^SUB_BITS ns are exact; above,
// each power of two is split into 2^SUB_BITS linear buckets.
// ---------------------------------------------------------------------------------------------

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const NBUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    max: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; NBUCKETS],
            total: 0,
            sum: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS
        let shift = e - SUB_BITS;
        let sub = (v >> shift) & (SUB - 1);
        ((shift as u64 + 1) * SUB + sub) as usize
    }

    /// Lower bound and width of bucket `i`.
    fn bucket(i: usize) -> (u64, u64) {
        let i = i as u64;
        if i < SUB {
            return (i, 1);
        }
        let shift = i / SUB - 1;
        let sub = i % SUB;
        ((SUB + sub) << shift, 1 << shift)
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.sum += v as u128;
        self.max = self.max.max(v);
    }

    /// Value at quantile `q` (0..1]: the middle of the bucket holding the ceil(q*total)-th value.
    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, w) = Self::bucket(i);
                return (lo + (w - 1) / 2).min(self.max);
            }
        }
        self.max
    }

    fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Offsets
// ---------------------------------------------------------------------------------------------

/// splitmix64: tiny, fast, good enough for spreading offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (Lemire's multiply-shift, bias negligible for n << 2^64).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

struct QueueState {
    q: Blkioq,
    completion_fd: Option<RawFd>,
    /// Submit time (ns since start) of the request in each slot.
    submitted_at: Vec<u64>,
    /// First byte of this queue's slot buffers in the mapped region.
    buf_base: usize,
    rng: Rng,
    /// Sequential workloads: this queue's share of the device and its cursor.
    seq_start: u64,
    seq_len: u64,
    seq_pos: u64,
    comps: Vec<MaybeUninit<Completion>>,
    in_flight: usize,
}

struct Cfg {
    rw: Rw,
    bs: usize,
    blocks: u64,
}

impl QueueState {
    fn submit(&mut self, cfg: &Cfg, slot: usize, now: u64) {
        let off = if cfg.rw.is_random() {
            self.rng.below(cfg.blocks) * cfg.bs as u64
        } else {
            let o = self.seq_start + self.seq_pos;
            self.seq_pos += cfg.bs as u64;
            if self.seq_pos + cfg.bs as u64 > self.seq_len {
                self.seq_pos = 0;
            }
            o
        };
        let buf = (self.buf_base + slot * cfg.bs) as *mut u8;
        if cfg.rw.is_write() {
            self.q.write(off, buf, cfg.bs, slot, ReqFlags::empty());
        } else {
            self.q.read(off, buf, cfg.bs, slot, ReqFlags::empty());
        }
        self.submitted_at[slot] = now;
        self.in_flight += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// CPU and memory accounting
// ---------------------------------------------------------------------------------------------

/// (utime + stime) of a whole process, in seconds.
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) as f64 / hz)
}

/// False once the process is gone or a zombie.
fn proc_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            st.rfind(')')
                .and_then(|i| st[i + 1..].split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// This process's CPU time (user + system), in seconds.
fn self_cpu_secs() -> f64 {
    let mut ru = MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a full rusage into the pointer on success.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: initialised by the successful getrusage above.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ---------------------------------------------------------------------------------------------

fn fail(what: &str, e: blkio::Error) -> String {
    format!(
        "{what}: {} (errno {})",
        e.message(),
        e.errno().raw_os_error()
    )
}

fn wait_completion_fds(fds: &mut [libc::pollfd], timeout_ms: i32) -> Result<(), String> {
    // SAFETY: fds is a valid, exclusively borrowed array of pollfd of the given length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(());
        }
        return Err(format!("poll: {err}"));
    }
    for p in fds.iter_mut() {
        if p.revents != 0 {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a local u64 from a non-blocking eventfd; a failed
            // read (EAGAIN) is harmless.
            unsafe { libc::read(p.fd, (&raw mut v).cast(), 8) };
            p.revents = 0;
        }
    }
    Ok(())
}

fn run(a: &Args) -> Result<String, String> {
    if a.bs == 0 || !a.bs.is_multiple_of(512) {
        return Err("--bs must be a positive multiple of 512".into());
    }
    if a.iodepth == 0 || a.num_queues == 0 {
        return Err("--iodepth and --num-queues must be at least 1".into());
    }

    let connect_deadline = Instant::now() + Duration::from_secs_f64(a.connect_timeout);
    let mut b = loop {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| fail("blkio_new", e))?;
        b.set_str("path", &a.path)
            .map_err(|e| fail("set path", e))?;
        match b.connect() {
            Ok(()) => break b,
            Err(_) if Instant::now() < connect_deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(fail("connect", e)),
        }
    };
    let nq = a.num_queues as i32;
    if a.poll {
        b.set_i32("num-queues", 0)
            .map_err(|e| fail("set num-queues", e))?;
        b.set_i32("num-poll-queues", nq)
            .map_err(|e| fail("set num-poll-queues", e))?;
    } else {
        b.set_i32("num-queues", nq)
            .map_err(|e| fail("set num-queues", e))?;
    }
    let qsize = b
        .get_i32("queue-size")
        .map_err(|e| fail("get queue-size", e))?;
    if (qsize as usize) < a.iodepth {
        let want = a.iodepth.next_power_of_two() as i32;
        b.set_i32("queue-size", want)
            .map_err(|e| fail("set queue-size", e))?;
    }
    let capacity = b.get_u64("capacity").map_err(|e| fail("get capacity", e))?;
    let blocks = capacity / a.bs as u64;
    if blocks < a.num_queues as u64 * 2 {
        return Err(format!(
            "device too small ({capacity} bytes) for --bs {}",
            a.bs
        ));
    }
    let outcome = b.start().map_err(|e| fail("start", e))?;
    let queues = if a.poll {
        outcome.poll_queues
    } else {
        outcome.queues
    };

    let align = b
        .get_u64("mem-region-alignment")
        .map_err(|e| fail("get mem-region-alignment", e))? as usize;
    let per_queue = a.iodepth * a.bs;
    let len = (per_queue * a.num_queues).div_ceil(align) * align;
    let region = b
        .alloc_mem_region(len)
        .map_err(|e| fail("alloc_mem_region", e))?;
    b.map_mem_region(&region)
        .map_err(|e| fail("map_mem_region", e))?;
    {
        // Fill buffers with non-zero data so writes carry real payload.
        // SAFETY: the region is `len` bytes of our own mapping and no request is in flight.
        let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, len) };
        let mut r = Rng(a.seed ^ 0xdead_beef);
        for chunk in mem.chunks_mut(8) {
            let v = r.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    let cfg = Cfg {
        rw: a.rw,
        bs: a.bs,
        blocks,
    };
    let seq_len = (blocks / a.num_queues as u64) * a.bs as u64;
    let mut qs: Vec<QueueState> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            let completion_fd = q.get_completion_fd();
            if completion_fd.is_some() {
                // Keep used-buffer notifications on for good; we sleep on the eventfd ourselves.
                q.set_completion_fd_enabled(true);
            }
            QueueState {
                q,
                completion_fd,
                submitted_at: vec![0; a.iodepth],
                buf_base: region.addr + i * per_queue,
                rng: Rng(a.seed.wrapping_add(i as u64 * 0x1234_5678_9abc)),
                seq_start: i as u64 * seq_len,
                seq_len,
                seq_pos: 0,
                comps: (0..a.iodepth).map(|_| MaybeUninit::uninit()).collect(),
                in_flight: 0,
            }
        })
        .collect();
    let mut pfds: Vec<libc::pollfd> = qs
        .iter()
        .filter_map(|q| q.completion_fd)
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();

    let start = Instant::now();
    let ns = |t: Instant| t.duration_since(start).as_nanos() as u64;
    let ramp_end = (a.ramp * 1e9) as u64;
    let measure_end = ramp_end + (a.runtime * 1e9) as u64;

    for q in qs.iter_mut() {
        for slot in 0..a.iodepth {
            q.submit(&cfg, slot, 0);
        }
    }

    let mut hist = Histogram::new();
    let mut measuring = false;
    let mut stopping = false;
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    let mut t_begin = 0u64;
    let mut t_end = 0u64;
    let (mut cpu0_self, mut cpu0_backend) = (0.0, None);
    let (mut cpu1_self, mut cpu1_backend) = (0.0, None);
    let mut last_progress = Instant::now();

    loop {
        let mut reaped = 0;
        for q in qs.iter_mut() {
            let n = {
                let QueueState { q: bq, comps, .. } = q;
                bq.do_io(comps, 0, None, None)
                    .map_err(|e| fail("do_io", e))?
            };
            if n == 0 {
                continue;
            }
            reaped += n;
            let now = ns(Instant::now());
            for i in 0..n {
                // SAFETY: do_io initialised the first `n` completion slots.
                let c = unsafe { q.comps[i].assume_init_read() };
                let slot = c.user_data;
                q.in_flight -= 1;
                if c.ret != 0 {
                    errors += 1;
                    if first_error.is_none() {
                        first_error = Some(format!(
                            "request failed: {}",
                            std::io::Error::from_raw_os_error(-c.ret)
                        ));
                    }
                }
                if measuring {
                    hist.record(now.saturating_sub(q.submitted_at[slot]));
                }
                if !stopping {
                    q.submit(&cfg, slot, now);
                }
            }
        }

        let now_i = Instant::now();
        let now = ns(now_i);
        if reaped > 0 {
            last_progress = now_i;
        }
        if !measuring && !stopping && now >= ramp_end {
            measuring = true;
            hist = Histogram::new();
            t_begin = now;
            cpu0_self = self_cpu_secs();
            cpu0_backend = a.backend_pid.and_then(proc_cpu_secs);
        } else if measuring && now >= measure_end {
            measuring = false;
            stopping = true;
            t_end = now;
            cpu1_self = self_cpu_secs();
            cpu1_backend = a.backend_pid.and_then(proc_cpu_secs);
        }
        if stopping && qs.iter().all(|q| q.in_flight == 0) {
            break;
        }
        let idle = now_i.duration_since(last_progress);
        if idle > Duration::from_millis(500)
            && let Some(pid) = a.backend_pid
            && !proc_alive(pid)
        {
            return Err(format!("backend (pid {pid}) exited"));
        }
        if idle > Duration::from_secs(30) {
            return Err(format!(
                "no completion for 30 s with {} requests in flight: backend stalled",
                qs.iter().map(|q| q.in_flight).sum::<usize>()
            ));
        }
        if reaped == 0 && !a.poll {
            wait_completion_fds(&mut pfds, 100)?;
        }
    }

    let secs = (t_end - t_begin) as f64 / 1e9;
    let ios = hist.total;
    let iops = ios as f64 / secs;
    let mib_s = iops * a.bs as f64 / (1024.0 * 1024.0);
    let us = |v: u64| v as f64 / 1000.0;
    let mut out = String::new();
    write!(
        out,
        "{{\"path\":\"{}\",\"rw\":\"{}\",\"bs\":{},\"iodepth\":{},\"num_queues\":{},\"poll\":{},\
         \"runtime_s\":{:.3},\"ios\":{},\"iops\":{:.0},\"mib_s\":{:.2},\"lat_mean_us\":{:.2},\
         \"lat_p50_us\":{:.2},\"lat_p99_us\":{:.2},\"lat_p999_us\":{:.2},\"lat_max_us\":{:.2},\
         \"errors\":{},\"client_cpu\":{:.3}",
        a.path.replace('\\', "\\\\").replace('"', "\\\""),
        a.rw.name(),
        a.bs,
        a.iodepth,
        a.num_queues,
        a.poll,
        secs,
        ios,
        iops,
        mib_s,
        hist.mean() / 1000.0,
        us(hist.quantile(0.50)),
        us(hist.quantile(0.99)),
        us(hist.quantile(0.999)),
        us(hist.max),
        errors,
        (cpu1_self - cpu0_self) / secs,
    )
    .unwrap();
    if let Some(pid) = a.backend_pid {
        let cpu = match (cpu0_backend, cpu1_backend) {
            (Some(c0), Some(c1)) => format!("{:.3}", (c1 - c0) / secs),
            _ => "null".into(),
        };
        let hwm = proc_status_kib(pid, "VmHWM").map_or("null".into(), |v| v.to_string());
        // Private memory now; VmHWM also counts file pages the backend maps (an image on tmpfs).
        let anon = proc_status_kib(pid, "RssAnon").map_or("null".into(), |v| v.to_string());
        write!(
            out,
            ",\"backend_pid\":{pid},\"backend_cpu\":{cpu},\"backend_hwm_kib\":{hwm},\
             \"backend_anon_kib\":{anon}"
        )
        .unwrap();
    }
    out.push('}');

    drop(qs);
    b.unmap_mem_region(&region);
    if let Some(e) = first_error {
        eprintln!("bench_client: {errors} failed requests; first: {e}");
        println!("{out}");
        return Err("requests failed".into());
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench_client: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_roundtrip() {
        for v in (0..100_000u64).chain([1 << 40, u64::MAX / 3, u64::MAX]) {
            let i = Histogram::index(v);
            assert!(i < NBUCKETS, "{v} -> {i}");
            let (lo, w) = Histogram::bucket(i);
            assert!(lo <= v && v - lo < w, "{v} -> bucket {i} = [{lo}, +{w})");
            assert!(w == 1 || w * SUB <= lo, "relative width too big at {v}");
        }
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.02, "{p50}");
        assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.02, "{p99}");
        assert_eq!(h.quantile(1.0), 10_000_000);
    }
}
