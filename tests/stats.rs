//! Statistics: the control socket's counters match exactly what a libblkio client sent,
//! `vublk stats` prints them, the periodic log line appears only with I/O, and an idle daemon
//! with every timer on uses no CPU.

mod common;
#[path = "common/proc.rs"]
mod proc;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blkio::ReqFlags;
use common::*;
use proc::{Proc, ProcSpec, cpu_ticks, os};
use vublk::stats::{QueueSnapshot, StatsSnapshot};

fn stats(ctl: &Path) -> StatsSnapshot {
    vublk::control::fetch_stats(ctl).unwrap_or_else(|e| panic!("{}", vublk::error_chain(&e)))
}

/// What one queue was sent.
#[derive(Default, Debug, Clone, Copy)]
struct Sent {
    reads: u64,
    writes: u64,
    flushes: u64,
    write_zeroes: u64,
    bytes_read: u64,
    bytes_written: u64,
}

#[track_caller]
fn assert_queue(q: &QueueSnapshot, s: Sent, what: &str) {
    let got = (
        q.reads,
        q.writes,
        q.flushes,
        q.write_zeroes,
        q.bytes_read,
        q.bytes_written,
    );
    let want = (
        s.reads,
        s.writes,
        s.flushes,
        s.write_zeroes,
        s.bytes_read,
        s.bytes_written,
    );
    assert_eq!(
        got, want,
        "{what}: (reads, writes, flushes, write_zeroes, bytes_read, bytes_written)"
    );
    assert_eq!(
        (q.discards, q.get_id, q.invalid, q.errors, q.in_flight),
        (0, 0, 0, 0, 0),
        "{what}: discards, get_id, invalid, errors, in_flight"
    );
    let samples: u64 = q.latency_us_log2.iter().sum();
    assert_eq!(
        samples,
        s.reads + s.writes + s.flushes + s.write_zeroes,
        "{what}: one latency sample per image request"
    );
}

/// `depth` requests at once on queue `q`, `rounds` times: reads of `len` bytes, then writes.
fn concurrent(q: &mut blkio::Blkioq, mem: Mem, qi: u64, rounds: u64, depth: usize, len: usize) {
    for r in 0..rounds {
        for write in [false, true] {
            for i in 0..depth {
                let buf = mem.ptr(i * len, len);
                let off = (qi * 64 + i as u64) * len as u64 + (r % 4) * MIB;
                if write {
                    q.write(off, buf, len, i, ReqFlags::empty());
                } else {
                    q.read(off, buf, len, i, ReqFlags::empty());
                }
            }
            for c in wait_completions(q, depth) {
                completion_to_result(&c).unwrap_or_else(|e| panic!("queue {qi}: {e}"));
            }
        }
    }
}

/// N reads, M writes, K flushes and some write-zeroes per queue, sequential then 16 at a time
/// on both queues concurrently: every counter equals what was sent, per queue; counts add up
/// over a reconnect.
#[test]
fn stats_are_exact() {
    let dir = TestDir::new("stats-exact");
    let img = create_image(&dir.join("disk.img"), 16 * MIB);
    let ctl = dir.join("ctl.sock");
    let d = Daemon::start(&dir, &img, &["--control-socket", ctl.to_str().unwrap()]);
    let sock = d.socket.clone().unwrap();
    let st = stats(&ctl);
    assert_eq!((st.frontends_served, st.frontend_connected), (0, false));
    assert_eq!(st.num_queues, 2);

    let mut c = Client::connect(&sock);
    let mut sent = [Sent::default(); 2];
    // Queue 0: 37 reads of 4 KiB, 11 writes of 8 KiB, 3 flushes, 2 write-zeroes.
    for i in 0..37 {
        c.q(0).read(i * 4096, 0, 4096).unwrap();
    }
    for i in 0..11 {
        c.q(0).write(i * 8192, 0, 8192, ReqFlags::empty()).unwrap();
    }
    for _ in 0..3 {
        c.q(0).flush().unwrap();
    }
    for i in 0..2 {
        c.q(0)
            .write_zeroes(4 * MIB + i * 65536, 65536, ReqFlags::empty())
            .unwrap();
    }
    sent[0] = Sent {
        reads: 37,
        writes: 11,
        flushes: 3,
        write_zeroes: 2,
        bytes_read: 37 * 4096,
        bytes_written: 11 * 8192,
    };
    // Queue 1: 5 reads of 512 B, 23 writes of 64 KiB, one 3-segment read and write (one request
    // each), 7 flushes.
    for i in 0..5 {
        c.q(1).read(MIB + i * 512, 0, 512).unwrap();
    }
    for i in 0..23 {
        c.q(1)
            .write(2 * MIB + i * 65536, 0, 65536, ReqFlags::empty())
            .unwrap();
    }
    let segs = [(0, 4096), (8192, 512), (65536, 3584)];
    c.q(1).readv(0, &segs).unwrap();
    c.q(1).writev(0, &segs, ReqFlags::empty()).unwrap();
    for _ in 0..7 {
        c.q(1).flush().unwrap();
    }
    sent[1] = Sent {
        reads: 6,
        writes: 24,
        flushes: 7,
        write_zeroes: 0,
        bytes_read: 5 * 512 + 8192,
        bytes_written: 23 * 65536 + 8192,
    };
    let st = stats(&ctl);
    assert_eq!((st.frontends_served, st.frontend_connected), (1, true));
    assert_queue(&st.queues[0], sent[0], "sequential, queue 0");
    assert_queue(&st.queues[1], sent[1], "sequential, queue 1");

    // Both queues at once, 16 requests in flight each.
    let mem = c.mem;
    let mut qs: Vec<blkio::Blkioq> = c.queues.drain(..).collect();
    let mut q1 = qs.pop().unwrap();
    let mut q0 = qs.pop().unwrap();
    let t = std::thread::spawn(move || {
        concurrent(&mut q1, mem, 1, 25, 16, 4096);
        q1
    });
    concurrent(&mut q0, mem, 0, 40, 16, 4096);
    let q1 = t.join().unwrap();
    c.queues = vec![q0, q1];
    for (i, rounds) in [(0, 40u64), (1, 25)] {
        sent[i].reads += rounds * 16;
        sent[i].writes += rounds * 16;
        sent[i].bytes_read += rounds * 16 * 4096;
        sent[i].bytes_written += rounds * 16 * 4096;
    }
    let st = stats(&ctl);
    assert_queue(&st.queues[0], sent[0], "concurrent, queue 0");
    assert_queue(&st.queues[1], sent[1], "concurrent, queue 1");

    // Counters outlive the connection and keep adding up.
    drop(c);
    let mut c = Client::connect(&sock);
    c.q(1).read(0, 0, 4096).unwrap();
    sent[1].reads += 1;
    sent[1].bytes_read += 4096;
    let st = stats(&ctl);
    assert_eq!(st.frontends_served, 2);
    assert_queue(&st.queues[0], sent[0], "after reconnect, queue 0");
    assert_queue(&st.queues[1], sent[1], "after reconnect, queue 1");
    let total = &st.total;
    assert_eq!(total.queue, None);
    assert_eq!(total.reads, sent[0].reads + sent[1].reads);
    assert_eq!(
        total.bytes_written,
        sent[0].bytes_written + sent[1].bytes_written
    );
    drop(c);
    assert!(d.terminate().success());
}

/// `vublk stats SOCKET` prints a table with one row per busy queue and the totals;
/// `--json` prints the control socket's object; a dead socket is a one-line error.
#[test]
fn vublk_stats_command() {
    let dir = TestDir::new("stats-cmd");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let ctl = dir.join("ctl.sock");
    let d = Daemon::start(
        &dir,
        &img,
        &[
            "--control-socket",
            ctl.to_str().unwrap(),
            "--num-queues",
            "4",
        ],
    );
    let mut c = Client::connect(d.socket.as_ref().unwrap());
    for i in 0..10 {
        c.q(1).read(i * 4096, 0, 4096).unwrap();
    }
    c.q(1).write(0, 0, 1024 * 1024, ReqFlags::empty()).unwrap();
    c.q(1).flush().unwrap();
    let out = Command::new(VUBLK).arg("stats").arg(&ctl).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("disk.img (8388608 bytes), engine "),
        "{text}"
    );
    assert!(
        lines[1].contains("frontends served: 1, one connected"),
        "{text}"
    );
    let cols: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "queue", "reads", "writes", "flushes", "other", "read", "MiB", "write", "MiB",
            "errors", "inflight", "p50", "p99"
        ]
    );
    let row = |name: &str| -> Vec<String> {
        let l = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row {name}:\n{text}"));
        l.split_whitespace().map(String::from).collect()
    };
    let q1 = row("1");
    assert_eq!(
        &q1[1..8],
        ["10", "1", "1", "0", "0.0", "1.0", "0"],
        "{text}"
    );
    assert_eq!(row("total")[1..4], ["10", "1", "1"], "{text}");
    assert!(
        text.contains("(3 queues without requests not shown)"),
        "{text}"
    );

    let out = Command::new(VUBLK)
        .args(["stats", "--json"])
        .arg(&ctl)
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&out.stdout);
    assert_eq!(json.lines().count(), 1, "{json}");
    let s: StatsSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(s.queues[1].reads, 10);
    assert_eq!(s.queues[1].bytes_written, 1024 * 1024);
    drop(c);
    assert!(d.terminate().success());

    let out = Command::new(VUBLK).arg("stats").arg(&ctl).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot connect to control socket"), "{err}");
}

/// `--stats-interval 1`: a summary line per second with I/O, none while idle.
#[test]
fn periodic_summary_only_with_io() {
    let dir = TestDir::new("stats-log");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let d = Daemon::start(&dir, &img, &["--stats-interval", "1"]);
    let mut c = Client::connect(d.socket.as_ref().unwrap());
    for i in 0..50 {
        c.q(0).read(i * 4096, 0, 4096).unwrap();
    }
    let lines = |d: &Daemon| {
        d.stderr()
            .lines()
            .filter(|l| l.contains("stats: "))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lines(&d).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = lines(&d);
    assert_eq!(first.len(), 1, "{}", d.stderr());
    assert!(
        first[0].contains("(read 50 write 0 flush 0 other 0)"),
        "{first:?}"
    );
    assert!(
        first[0].contains("0 errors, 0 in flight, p50 <"),
        "{first:?}"
    );
    // Idle for more than two intervals: nothing more.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(lines(&d).len(), 1, "{}", d.stderr());
    drop(c);
}

/// An idle daemon with a connected frontend, the watchdog and the stats log on costs no CPU:
/// every thread sleeps.
#[test]
fn idle_daemon_uses_no_cpu() {
    let dir = TestDir::new("idle-cpu");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let sock = dir.join("i.sock");
    let ctl = dir.join("i.ctl");
    let mut spec = ProcSpec::new(
        &dir,
        "i",
        os(&[
            &"--socket-path",
            &sock,
            &"--blk-file",
            &img,
            &"--control-socket",
            &ctl,
            &"--stats-interval",
            &"1",
        ]),
    );
    spec.env = vec![("WATCHDOG_USEC".into(), "1000000".into())];
    let mut p = Proc::spawn(spec);
    p.wait_for_line("READY=1", READY_TIMEOUT);
    let mut c = Client::connect(&sock);
    c.q(0).read(0, 0, 4096).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(p.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(p.pid()) - before;
    // 3 s at 100 ticks/s is 300 ticks; a few wake-ups per second cost well under one tick.
    assert!(used <= 2, "idle daemon used {used} clock ticks in 3 s");
    drop(c);
    p.terminate();
}

/// Image errors are counted (needs the test-only fault-injection engine:
/// `cargo test --features fault-injection --test stats`).
#[cfg(feature = "fault-injection")]
#[test]
fn errors_are_counted() {
    let dir = TestDir::new("stats-eio");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let sock = dir.join("e.sock");
    let ctl = dir.join("e.ctl");
    let mut spec = ProcSpec::new(
        &dir,
        "e",
        os(&[
            &"--socket-path",
            &sock,
            &"--blk-file",
            &img,
            &"--control-socket",
            &ctl,
            &"--num-queues",
            &"2",
        ]),
    );
    spec.env = vec![(
        "VUBLK_FAULT_EIO".into(),
        format!("{}-{}", MIB, 2 * MIB).into(),
    )];
    let mut p = Proc::spawn(spec);
    p.wait_for_line("READY=1", READY_TIMEOUT);
    let mut c = Client::connect(&sock);
    for i in 0..9 {
        assert!(c.q(1).read(MIB + i * 4096, 0, 4096).is_err());
    }
    c.q(1).read(0, 0, 4096).unwrap();
    let q = &stats(&ctl).queues[1];
    assert_eq!((q.reads, q.errors, q.bytes_read), (10, 9, 4096));
    drop(c);
    p.terminate();
}
