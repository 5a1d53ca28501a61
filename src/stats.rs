//! I/O statistics: per-queue counters written by each queue's worker without a lock, and the
//! daemon-wide snapshot served on the control socket (`stats`) and summarised in the log.
//!
//! Each queue's counters have exactly one writer at a time, the [`QueueCounters`] owned by that
//! queue's worker, so an update is a relaxed load and store (no locked read-modify-write on the
//! I/O path). Readers load the same atomics at any time; a snapshot taken under load is
//! consistent per counter, not across counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Latency histogram buckets. Bucket 0 counts requests under 1 µs, bucket `i` those in
/// `[2^(i-1), 2^i)` µs, and the last one everything from 2^(N-2) µs (about 4 s) up.
pub const LATENCY_BUCKETS: usize = 24;

/// The kind of an engine request, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl crate::engine::Op {
    /// What to count for this op: its kind and its data length in bytes.
    pub fn stat_kind(&self) -> (ReqKind, u64) {
        use crate::engine::Op;
        match self {
            Op::Read { bufs, .. } => (ReqKind::Read, bufs.len()),
            Op::Write { bufs, .. } => (ReqKind::Write, bufs.len()),
            Op::Flush => (ReqKind::Flush, 0),
            Op::Discard { .. } => (ReqKind::Discard, 0),
            Op::WriteZeroes { .. } => (ReqKind::WriteZeroes, 0),
        }
    }
}

/// One queue's counters; lives as long as the daemon, across frontend connections.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Set while a [`QueueCounters`] writes these counters.
    claimed: AtomicBool,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    get_id: AtomicU64,
    invalid: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    /// The highest `in_flight` ever reached (a queue's worker never holds more requests than
    /// its ring has slots; this shows it).
    in_flight_peak: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    /// `--poll-us` kick tuner: probes finished, and how many of them left kicks on.
    kick_verdicts: AtomicU64,
    kick_verdicts_on: AtomicU64,
    /// The latest verdict: 0 none yet, 1 holding kicks, 2 kicks on.
    kick_policy: AtomicU64,
}

/// Adds to a counter that has a single writer: no locked instruction needed.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Histogram bucket for a latency (see [`LATENCY_BUCKETS`]).
pub fn latency_bucket(d: Duration) -> usize {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    ((u64::BITS - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
}

/// Exclusive upper bound of bucket `i` in µs (`None` for the open-ended last bucket).
pub fn bucket_upper_us(i: usize) -> Option<u64> {
    (i + 1 < LATENCY_BUCKETS).then(|| 1u64 << i)
}

impl QueueStats {
    /// Takes the writer role for these counters; `None` if a writer still holds it.
    pub fn claim(self: &Arc<Self>) -> Option<QueueCounters> {
        // Acquire pairs with the previous writer's release on drop, so its last stores are
        // visible before we continue from them.
        self.claimed
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        Some(QueueCounters {
            s: Arc::clone(self),
        })
    }

    pub fn snapshot(&self, queue: usize) -> QueueSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueSnapshot {
            queue: Some(queue),
            reads: l(&self.reads),
            writes: l(&self.writes),
            flushes: l(&self.flushes),
            discards: l(&self.discards),
            write_zeroes: l(&self.write_zeroes),
            get_id: l(&self.get_id),
            invalid: l(&self.invalid),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            errors: l(&self.errors),
            in_flight: l(&self.in_flight),
            in_flight_peak: l(&self.in_flight_peak),
            latency_us_log2: self.latency.iter().map(l).collect(),
            kick_verdicts: l(&self.kick_verdicts),
            kick_verdicts_on: l(&self.kick_verdicts_on),
            kicks_on: match l(&self.kick_policy) {
                1 => Some(false),
                2 => Some(true),
                _ => None,
            },
        }
    }
}

/// The writer side of one queue's [`QueueStats`], owned by that queue's worker.
#[derive(Debug)]
pub struct QueueCounters {
    s: Arc<QueueStats>,
}

impl QueueCounters {
    /// Counters nobody reads, for a worker with no daemon-wide stats (unit tests).
    pub fn detached() -> QueueCounters {
        QueueCounters {
            s: Arc::new(QueueStats {
                claimed: AtomicBool::new(true),
                ..QueueStats::default()
            }),
        }
    }

    /// A request went to the engine.
    pub fn submitted(&self) {
        let n = self.s.in_flight.load(Ordering::Relaxed).wrapping_add(1);
        self.s.in_flight.store(n, Ordering::Relaxed);
        if n > self.s.in_flight_peak.load(Ordering::Relaxed) {
            self.s.in_flight_peak.store(n, Ordering::Relaxed);
        }
    }

    /// An engine request finished: `bytes` is its data length (counted only on success).
    pub fn completed(&self, kind: ReqKind, bytes: u64, ok: bool, latency: Duration) {
        let s = &*self.s;
        let in_flight = s.in_flight.load(Ordering::Relaxed);
        s.in_flight
            .store(in_flight.saturating_sub(1), Ordering::Relaxed);
        let (count, data) = match kind {
            ReqKind::Read => (&s.reads, Some(&s.bytes_read)),
            ReqKind::Write => (&s.writes, Some(&s.bytes_written)),
            ReqKind::Flush => (&s.flushes, None),
            ReqKind::Discard => (&s.discards, None),
            ReqKind::WriteZeroes => (&s.write_zeroes, None),
        };
        bump(count, 1);
        match (ok, data) {
            (true, Some(d)) => bump(d, bytes),
            (true, None) => {}
            (false, _) => bump(&s.errors, 1),
        }
        bump(&s.latency[latency_bucket(latency)], 1);
    }

    /// The kick tuner finished a probe: `on` if it left the driver's kicks on.
    pub fn kick_verdict(&self, on: bool) {
        bump(&self.s.kick_verdicts, 1);
        if on {
            bump(&self.s.kick_verdicts_on, 1);
        }
        self.s
            .kick_policy
            .store(if on { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// A GET_ID request was answered.
    pub fn get_id(&self) {
        bump(&self.s.get_id, 1);
    }

    /// A request was refused without reaching the engine (malformed, out of range, unsupported).
    pub fn invalid(&self) {
        bump(&self.s.invalid, 1);
    }
}

impl Drop for QueueCounters {
    fn drop(&mut self) {
        // The worker is gone with whatever it still had in flight (frontend vanished).
        self.s.in_flight.store(0, Ordering::Relaxed);
        self.s.claimed.store(false, Ordering::Release);
    }
}

/// Facts about the served image, reported with the counters (the size follows online resizes).
#[derive(Clone, Debug, Default)]
pub struct DeviceInfo {
    pub image: String,
    pub engine: String,
    pub size: crate::blk::DeviceSize,
    pub read_only: bool,
}

/// Daemon-wide statistics: one [`QueueStats`] per queue plus connection state.
#[derive(Debug)]
pub struct DeviceStats {
    queues: Vec<Arc<QueueStats>>,
    info: DeviceInfo,
    started: Instant,
    frontends: AtomicU64,
    connected: AtomicBool,
}

impl Default for DeviceStats {
    fn default() -> Self {
        DeviceStats::new(0, DeviceInfo::default())
    }
}

impl DeviceStats {
    pub fn new(num_queues: usize, info: DeviceInfo) -> DeviceStats {
        DeviceStats {
            queues: (0..num_queues).map(|_| Arc::default()).collect(),
            info,
            started: Instant::now(),
            frontends: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        }
    }

    /// The writer for queue `i`'s counters. Falls back to detached counters (with a warning)
    /// if the queue does not exist or a previous worker for it is still alive.
    pub fn counters(&self, i: usize) -> QueueCounters {
        match self.queues.get(i).map(QueueStats::claim) {
            Some(Some(c)) => c,
            Some(None) => {
                log::warn!("queue {i}: previous worker still holds its counters; not counting");
                QueueCounters::detached()
            }
            None => QueueCounters::detached(),
        }
    }

    /// Records a frontend connecting (`true`) or leaving.
    pub fn set_connected(&self, connected: bool) {
        if connected {
            self.frontends.fetch_add(1, Ordering::Relaxed);
        }
        self.connected.store(connected, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let queues: Vec<QueueSnapshot> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.snapshot(i))
            .collect();
        let mut total = QueueSnapshot {
            latency_us_log2: vec![0; LATENCY_BUCKETS],
            ..QueueSnapshot::default()
        };
        for q in &queues {
            total.add(q);
        }
        StatsSnapshot {
            version: 1,
            uptime_s: self.started.elapsed().as_secs_f64(),
            image: self.info.image.clone(),
            engine: self.info.engine.clone(),
            size_bytes: self.info.size.get(),
            read_only: self.info.read_only,
            num_queues: self.queues.len(),
            frontends_served: self.frontends.load(Ordering::Relaxed),
            frontend_connected: self.connected.load(Ordering::Relaxed),
            latency_bucket_upper_us: (0..LATENCY_BUCKETS).map(bucket_upper_us).collect(),
            total,
            queues,
        }
    }
}

/// One queue's counters (or their sum over all queues, with `queue` unset), as served by the
/// control socket's `stats` command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub queue: Option<usize>,
    /// Completed requests by type (success or error).
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub get_id: u64,
    /// Requests refused before reaching the image (malformed, out of range, unsupported).
    pub invalid: u64,
    /// Data bytes of successful reads and writes.
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests the image failed (the guest got IOERR).
    pub errors: u64,
    /// Requests handed to the image and not completed yet.
    pub in_flight: u64,
    /// The highest `in_flight` since the daemon started (for the totals: the highest of any
    /// queue). Never above the ring size a frontend set.
    #[serde(default)]
    pub in_flight_peak: u64,
    /// Latency histogram of image requests, bucket `i` below `latency_bucket_upper_us[i]`.
    pub latency_us_log2: Vec<u64>,
    /// `--poll-us`: the kick tuner's probes so far, and how many left the driver's kicks on.
    #[serde(default)]
    pub kick_verdicts: u64,
    #[serde(default)]
    pub kick_verdicts_on: u64,
    /// The latest verdict (`true`: kicks on); unset before the first, and in the totals.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kicks_on: Option<bool>,
}

impl QueueSnapshot {
    fn add(&mut self, o: &QueueSnapshot) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.discards += o.discards;
        self.write_zeroes += o.write_zeroes;
        self.get_id += o.get_id;
        self.invalid += o.invalid;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.errors += o.errors;
        self.in_flight += o.in_flight;
        self.in_flight_peak = self.in_flight_peak.max(o.in_flight_peak);
        self.kick_verdicts += o.kick_verdicts;
        self.kick_verdicts_on += o.kick_verdicts_on;
        if self.latency_us_log2.len() < o.latency_us_log2.len() {
            self.latency_us_log2.resize(o.latency_us_log2.len(), 0);
        }
        for (a, b) in self.latency_us_log2.iter_mut().zip(&o.latency_us_log2) {
            *a += b;
        }
    }

    /// Every request answered, whatever its type or outcome.
    pub fn requests(&self) -> u64 {
        self.reads
            + self.writes
            + self.flushes
            + self.discards
            + self.write_zeroes
            + self.get_id
            + self.invalid
    }

    /// Upper bound (µs) of the bucket holding the `p`-quantile of latencies (`p` in 0..=1);
    /// `None` with no samples, `Some(None)` if it lies in the open-ended last bucket.
    pub fn latency_quantile_us(&self, p: f64) -> Option<Option<u64>> {
        let n: u64 = self.latency_us_log2.iter().sum();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.latency_us_log2.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_upper_us(i));
            }
        }
        Some(None)
    }

    /// The difference `self - earlier` (counters only; gauges are taken from `self`).
    pub fn since(&self, earlier: &QueueSnapshot) -> QueueSnapshot {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        QueueSnapshot {
            queue: self.queue,
            reads: d(self.reads, earlier.reads),
            writes: d(self.writes, earlier.writes),
            flushes: d(self.flushes, earlier.flushes),
            discards: d(self.discards, earlier.discards),
            write_zeroes: d(self.write_zeroes, earlier.write_zeroes),
            get_id: d(self.get_id, earlier.get_id),
            invalid: d(self.invalid, earlier.invalid),
            bytes_read: d(self.bytes_read, earlier.bytes_read),
            bytes_written: d(self.bytes_written, earlier.bytes_written),
            errors: d(self.errors, earlier.errors),
            in_flight: self.in_flight,
            in_flight_peak: self.in_flight_peak,
            latency_us_log2: self
                .latency_us_log2
                .iter()
                .enumerate()
                .map(|(i, c)| d(*c, earlier.latency_us_log2.get(i).copied().unwrap_or(0)))
                .collect(),
            kick_verdicts: d(self.kick_verdicts, earlier.kick_verdicts),
            kick_verdicts_on: d(self.kick_verdicts_on, earlier.kick_verdicts_on),
            kicks_on: self.kicks_on,
        }
    }
}

/// The control socket's answer to `stats`: one JSON object on one line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Format version of this object.
    pub version: u32,
    pub uptime_s: f64,
    pub image: String,
    pub engine: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub num_queues: usize,
    /// Frontends that have connected since start-up.
    pub frontends_served: u64,
    pub frontend_connected: bool,
    /// Exclusive upper bound (µs) of each latency bucket; `null` for the last, open one.
    pub latency_bucket_upper_us: Vec<Option<u64>>,
    pub total: QueueSnapshot,
    pub queues: Vec<QueueSnapshot>,
}

/// "< 64 µs"-style text for a quantile.
pub fn fmt_quantile(q: Option<Option<u64>>) -> String {
    match q {
        None => "-".into(),
        Some(Some(us)) if us >= 10_000 => format!("<{}ms", us / 1000),
        Some(Some(us)) => format!("<{us}µs"),
        Some(None) => format!(">={}s", (1u64 << (LATENCY_BUCKETS - 2)) / 1_000_000),
    }
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// The periodic log line: rates over `secs` from the difference of two totals.
pub fn summary_line(delta: &QueueSnapshot, now: &QueueSnapshot, secs: f64) -> String {
    let secs = secs.max(1e-3);
    let other = delta.discards + delta.write_zeroes + delta.get_id + delta.invalid;
    format!(
        "stats: {:.0} req/s (read {} write {} flush {} other {}), read {:.1} MiB/s, \
         write {:.1} MiB/s, {} errors, {} in flight, p50 {} p99 {}",
        delta.requests() as f64 / secs,
        delta.reads,
        delta.writes,
        delta.flushes,
        other,
        mib(delta.bytes_read as f64) / secs,
        mib(delta.bytes_written as f64) / secs,
        delta.errors,
        now.in_flight,
        fmt_quantile(delta.latency_quantile_us(0.5)),
        fmt_quantile(delta.latency_quantile_us(0.99)),
    )
}

/// `vublk stats` output: a header and one row per queue that has served anything, plus totals.
pub fn format_table(s: &StatsSnapshot) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let up = s.uptime_s as u64;
    let _ = writeln!(
        out,
        "{} ({} bytes{}), engine {}, {} queues, up {}h{:02}m{:02}s",
        s.image,
        s.size_bytes,
        if s.read_only { ", read-only" } else { "" },
        s.engine,
        s.num_queues,
        up / 3600,
        up / 60 % 60,
        up % 60
    );
    let _ = writeln!(
        out,
        "frontends served: {}, {}",
        s.frontends_served,
        if s.frontend_connected {
            "one connected"
        } else {
            "none connected"
        }
    );
    let _ = writeln!(
        out,
        "{:>5} {:>10} {:>10} {:>8} {:>7} {:>10} {:>10} {:>6} {:>8} {:>8} {:>8}",
        "queue",
        "reads",
        "writes",
        "flushes",
        "other",
        "read MiB",
        "write MiB",
        "errors",
        "inflight",
        "p50",
        "p99"
    );
    let row = |out: &mut String, name: &str, q: &QueueSnapshot| {
        let _ = writeln!(
            out,
            "{:>5} {:>10} {:>10} {:>8} {:>7} {:>10.1} {:>10.1} {:>6} {:>8} {:>8} {:>8}",
            name,
            q.reads,
            q.writes,
            q.flushes,
            q.discards + q.write_zeroes + q.get_id + q.invalid,
            mib(q.bytes_read as f64),
            mib(q.bytes_written as f64),
            q.errors,
            q.in_flight,
            fmt_quantile(q.latency_quantile_us(0.5)),
            fmt_quantile(q.latency_quantile_us(0.99)),
        );
    };
    let mut idle = 0;
    for q in &s.queues {
        if q.requests() == 0 && q.in_flight == 0 {
            idle += 1;
            continue;
        }
        row(&mut out, &q.queue.unwrap_or_default().to_string(), q);
    }
    row(&mut out, "total", &s.total);
    if idle > 0 {
        let _ = writeln!(out, "({idle} queues without requests not shown)");
    }
    for q in s.queues.iter().filter(|q| q.kick_verdicts > 0) {
        let _ = writeln!(
            out,
            "queue {} kick tuner: kicks left on in {} of {} probes, now {}",
            q.queue.unwrap_or_default(),
            q.kick_verdicts_on,
            q.kick_verdicts,
            match q.kicks_on {
                Some(true) => "on",
                _ => "held",
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(latency_bucket(Duration::from_nanos(999)), 0);
        assert_eq!(latency_bucket(Duration::from_micros(1)), 1);
        assert_eq!(latency_bucket(Duration::from_micros(2)), 2);
        assert_eq!(latency_bucket(Duration::from_micros(3)), 2);
        assert_eq!(latency_bucket(Duration::from_micros(4)), 3);
        assert_eq!(
            latency_bucket(Duration::from_secs(3600)),
            LATENCY_BUCKETS - 1
        );
        assert_eq!(bucket_upper_us(0), Some(1));
        assert_eq!(bucket_upper_us(3), Some(8));
        assert_eq!(bucket_upper_us(LATENCY_BUCKETS - 1), None);
        // Every bucket's latencies are below its bound and at or above the previous one.
        for i in 1..LATENCY_BUCKETS - 1 {
            let lo = Duration::from_micros(1 << (i - 1));
            let hi = Duration::from_micros((1 << i) - 1);
            assert_eq!(latency_bucket(lo), i);
            assert_eq!(latency_bucket(hi), i);
        }
    }

    #[test]
    fn counters_and_claims() {
        let d = DeviceStats::new(2, DeviceInfo::default());
        let c = d.counters(0);
        // A second writer for the same queue is refused (it gets detached counters).
        let again = d.counters(0);
        again.completed(ReqKind::Read, 4096, true, Duration::ZERO);
        c.submitted();
        c.submitted();
        c.completed(ReqKind::Read, 4096, true, Duration::from_micros(5));
        c.completed(ReqKind::Write, 512, false, Duration::from_micros(100));
        c.submitted();
        c.get_id();
        c.invalid();
        let s = d.snapshot();
        let q = &s.queues[0];
        assert_eq!((q.reads, q.writes, q.errors), (1, 1, 1));
        assert_eq!((q.bytes_read, q.bytes_written), (4096, 0));
        assert_eq!((q.get_id, q.invalid, q.in_flight), (1, 1, 1));
        assert_eq!(q.in_flight_peak, 2);
        assert_eq!(q.latency_us_log2.iter().sum::<u64>(), 2);
        assert_eq!(q.latency_us_log2[3], 1);
        assert_eq!(q.latency_us_log2[7], 1);
        assert_eq!(
            s.total,
            QueueSnapshot {
                queue: None,
                ..q.clone()
            }
        );
        assert_eq!(q.requests(), 4);
        // Dropping the writer clears in-flight and lets the next connection's worker claim.
        drop(c);
        let c2 = d.counters(0);
        c2.completed(ReqKind::Flush, 0, true, Duration::ZERO);
        let q = &d.snapshot().queues[0];
        assert_eq!((q.in_flight, q.flushes, q.reads), (0, 1, 1));
        // The peak outlives the connection that reached it.
        assert_eq!(q.in_flight_peak, 2);
        // A queue that does not exist counts nowhere, without panicking.
        d.counters(7).invalid();
    }

    #[test]
    fn quantiles_and_formatting() {
        let mut q = QueueSnapshot {
            latency_us_log2: vec![0; LATENCY_BUCKETS],
            ..QueueSnapshot::default()
        };
        assert_eq!(q.latency_quantile_us(0.5), None);
        q.latency_us_log2[4] = 98; // 8-15 µs
        q.latency_us_log2[10] = 2; // 512-1023 µs
        assert_eq!(q.latency_quantile_us(0.5), Some(Some(16)));
        assert_eq!(q.latency_quantile_us(0.98), Some(Some(16)));
        assert_eq!(q.latency_quantile_us(0.99), Some(Some(1024)));
        assert_eq!(fmt_quantile(q.latency_quantile_us(0.99)), "<1024µs");
        q.latency_us_log2[LATENCY_BUCKETS - 1] = 1000;
        assert_eq!(q.latency_quantile_us(0.99), Some(None));
        assert_eq!(fmt_quantile(Some(Some(16384))), "<16ms");
    }

    /// Stats of a 1 MiB "/img" on the sync engine with `queues` queues.
    fn img_stats(queues: usize) -> DeviceStats {
        DeviceStats::new(
            queues,
            DeviceInfo {
                image: "/img".into(),
                engine: "sync".into(),
                size: (1 << 20).into(),
                read_only: false,
            },
        )
    }

    #[test]
    fn json_round_trip_and_table() {
        let d = img_stats(3);
        let c = d.counters(1);
        c.submitted();
        c.completed(ReqKind::Read, 1 << 20, true, Duration::from_micros(30));
        d.set_connected(true);
        let s = d.snapshot();
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains('\n'));
        let back: StatsSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.frontends_served, 1);
        let t = format_table(&s);
        assert!(
            t.contains("/img (1048576 bytes), engine sync, 3 queues"),
            "{t}"
        );
        let rows: Vec<&str> = t.lines().filter(|l| l.contains("<32µs")).collect();
        assert_eq!(rows.len(), 2, "{t}"); // queue 1 and the total
        assert!(rows[0].trim_start().starts_with("1 "), "{t}");
        assert!(t.contains("(2 queues without requests not shown)"), "{t}");
        let line = summary_line(&s.total, &s.total, 1.0);
        assert!(
            line.starts_with("stats: 1 req/s (read 1 write 0 "),
            "{line}"
        );
        assert!(line.contains("read 1.0 MiB/s"), "{line}");
    }

    #[test]
    fn kick_verdicts_are_counted_and_shown() {
        let d = img_stats(2);
        let c = d.counters(0);
        let s = d.snapshot();
        assert_eq!((s.queues[0].kick_verdicts, s.queues[0].kicks_on), (0, None));
        assert!(
            !format_table(&s).contains("kick tuner"),
            "no line before a probe"
        );
        for on in [true, true, false] {
            c.kick_verdict(on);
        }
        let s = d.snapshot();
        let q = &s.queues[0];
        assert_eq!(
            (q.kick_verdicts, q.kick_verdicts_on, q.kicks_on),
            (3, 2, Some(false))
        );
        assert_eq!((s.total.kick_verdicts, s.total.kicks_on), (3, None));
        let t = format_table(&s);
        assert!(
            t.contains("queue 0 kick tuner: kicks left on in 2 of 3 probes, now held"),
            "{t}"
        );
        c.kick_verdict(true);
        let later = d.snapshot().queues[0].clone();
        let delta = later.since(q);
        assert_eq!((delta.kick_verdicts, delta.kicks_on), (1, Some(true)));
        // Older JSON without these fields still parses.
        let json = serde_json::to_string(&later).unwrap().replace(
            ",\"kick_verdicts\":4,\"kick_verdicts_on\":3,\"kicks_on\":true",
            "",
        );
        assert!(!json.contains("kick"), "{json}");
        let back: QueueSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!((back.kick_verdicts, back.kicks_on), (0, None));
    }
}
