//! Kill tests: clients SIGKILLed with requests in flight, and the daemon SIGKILLed right after
//! a flush was acknowledged.

mod common;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::*;

const CHILD_ENV: &str = "VUBLK_KILL_CHILD";
const SLOTS: usize = 64; // 32 in flight per queue
const SLOT_LEN: usize = 4096;

fn seed(iter: u64, slot: usize, generation: u64) -> u64 {
    (iter << 40) | ((slot as u64) << 24) | generation
}

/// Child mode: keeps one 4 KiB write in flight per slot (64 in all, over 2 queues) and logs
/// `sub SLOT SEED` before submitting and `ack SLOT SEED` after each successful completion, until
/// it is SIGKILLed. Not a test on its own.
#[test]
fn kill_child() {
    let Some(arg) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let arg = arg.to_string_lossy().to_string();
    let mut parts = arg.splitn(3, ',');
    let (sock, iter, log) = (
        parts.next().unwrap().to_string(),
        parts.next().unwrap().parse::<u64>().unwrap(),
        parts.next().unwrap().to_string(),
    );
    let mut log = OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .unwrap();
    let mut c = Client::connect_with(
        Path::new(&sock),
        ClientOpts {
            region_size: SLOTS * SLOT_LEN,
            ..ClientOpts::default()
        },
    )
    .unwrap();
    let mem = c.mem;
    let mut generation = vec![0u64; SLOTS];
    let submit = |c: &mut Client, log: &mut std::fs::File, slot: usize, g: u64| {
        let s = seed(iter, slot, g);
        c.buf(slot * SLOT_LEN, SLOT_LEN)
            .copy_from_slice(&pattern(s, SLOT_LEN));
        writeln!(log, "sub {slot} {s}").unwrap();
        let q = slot % 2;
        let off = (slot * SLOT_LEN) as u64;
        c.queues[q].write(
            off,
            mem.ptr(slot * SLOT_LEN, SLOT_LEN),
            SLOT_LEN,
            slot,
            ReqFlags::empty(),
        );
    };
    for slot in 0..SLOTS {
        submit(&mut c, &mut log, slot, 0);
    }
    kick(&mut c.queues[0]);
    kick(&mut c.queues[1]);
    let mut slots: Vec<MaybeUninit<Completion>> =
        (0..SLOTS).map(|_| MaybeUninit::uninit()).collect();
    loop {
        for q in 0..2 {
            let n =
                match c.queues[q].do_io(&mut slots, 0, Some(&mut Duration::from_millis(1)), None) {
                    Ok(n) => n,
                    Err(_) => continue,
                };
            let done: Vec<Completion> = slots[..n]
                .iter()
                // SAFETY: do_io initialised the first n entries.
                .map(|s| unsafe { s.assume_init_read() })
                .collect();
            for comp in done {
                let slot = comp.user_data;
                assert_eq!(comp.ret, 0, "write failed");
                writeln!(log, "ack {slot} {}", seed(iter, slot, generation[slot])).unwrap();
                generation[slot] += 1;
                submit(&mut c, &mut log, slot, generation[slot]);
            }
            kick(&mut c.queues[q]);
        }
    }
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 100 clients in a row, each SIGKILLed with 64 writes in flight. The daemon never exits, its
/// fd count and RSS stay flat, and every write acknowledged before a kill is on the device
/// (or the one write to that slot that was still in flight).
#[test]
fn client_sigkill_with_64_in_flight_100_times() {
    let dir = TestDir::new("kill-client");
    let img = create_image(&dir.join("disk.img"), 4 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();
    let exe = std::env::current_exe().unwrap();
    // Per slot: the seeds the device may hold now.
    let mut acceptable: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut fd_counts = Vec::new();
    let mut rss = Vec::new();
    for iter in 1..=100u64 {
        let log = dir.join(&format!("child-{iter}.log"));
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "kill_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(
                CHILD_ENV,
                format!("{},{iter},{}", sock.display(), log.display()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill once it has completed some writes, at a varying point.
        let want_acks = 64 + (iter as usize * 37) % 200;
        let t0 = Instant::now();
        loop {
            let acks = std::fs::read_to_string(&log)
                .map(|s| s.matches("ack ").count())
                .unwrap_or(0);
            if acks >= want_acks || t0.elapsed() > Duration::from_secs(20) {
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "iteration {iter}: client exited early"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut pending: HashMap<usize, u64> = HashMap::new();
        for line in text.lines() {
            let mut w = line.split(' ');
            let (kind, slot, s) = (w.next(), w.next(), w.next());
            let (Some(kind), Some(slot), Some(s)) = (
                kind,
                slot.and_then(|v| v.parse().ok()),
                s.and_then(|v| v.parse().ok()),
            ) else {
                continue; // a line cut by the kill
            };
            match kind {
                "sub" => {
                    pending.insert(slot, s);
                }
                "ack" => {
                    acceptable.insert(slot, vec![s]);
                    pending.remove(&slot);
                }
                _ => {}
            }
        }
        for (slot, s) in pending {
            acceptable.entry(slot).or_default().push(s);
        }
        // A fresh client checks every slot that ever had a write acknowledged.
        let mut c = Client::connect(&sock);
        let all = c.read_data(0, 0, SLOTS * SLOT_LEN);
        for (slot, seeds) in &acceptable {
            let got = &all[slot * SLOT_LEN..(slot + 1) * SLOT_LEN];
            let ok = seeds
                .iter()
                .any(|&s| got == pattern(s, SLOT_LEN).as_slice());
            assert!(
                ok,
                "iteration {iter}: slot {slot} holds none of the acknowledged/in-flight writes {seeds:?}"
            );
        }
        drop(c);
        d.assert_alive(&format!("after killed client {iter}"));
        // The daemon tears the old connection down (joins, fdatasync) and prepares the next
        // one asynchronously, which can take tens of ms on a loaded machine: record the lowest
        // count seen over 300 ms. A leak raises the floor; a slow teardown does not.
        let mut fds = fd_count(d.pid());
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(10));
            fds = fds.min(fd_count(d.pid()));
        }
        fd_counts.push(fds);
        rss.push(rss_kib(d.pid()));
    }
    let (f10, fmax) = (fd_counts[9], *fd_counts[10..].iter().max().unwrap());
    eprintln!(
        "daemon fds after client 10: {f10}, max after: {fmax}, after 100: {}",
        fd_counts[99]
    );
    assert!(
        fmax <= f10 + 4,
        "fd count grew from {f10} to {fmax} over 90 killed clients: {fd_counts:?}"
    );
    let (first, last) = (rss[9], rss[99]);
    eprintln!("daemon RSS after client 10: {first} KiB, after client 100: {last} KiB");
    assert!(
        last <= first + 4096,
        "RSS grew from {first} KiB to {last} KiB over 90 killed clients"
    );
}

/// The daemon SIGKILLed right after acknowledging a flush, 100 times per engine: the data is
/// in the image. (A SIGKILL keeps the page cache, so for the sync engine this shows the data
/// reached the kernel; only a power cut would test the fdatasync itself.)
#[test]
fn daemon_sigkill_after_flush_ack_100_times() {
    for engine in ["sync", "direct"] {
        let dir = TestDir::new(&format!("kill-daemon-{engine}"));
        let img = create_image(&dir.join("disk.img"), 4 * MIB);
        for i in 0..100u64 {
            let sock = dir.join(&format!("s{i}.sock"));
            let d = Daemon::start_at(&dir, &format!("d{i}"), &sock, &img, &["--engine", engine]);
            let mut c = Client::connect(&sock);
            let data = pattern(i * 7 + 1, 64 * 1024);
            let off = (i % 32) * 64 * 1024;
            c.write_data((i % 2) as usize, off, &data);
            c.q(0).flush().unwrap_or_else(|e| panic!("flush: {e}"));
            d.kill();
            assert_bytes_eq(
                &read_file_at(&img, off, data.len()),
                &data,
                &format!("{engine} iteration {i}: flushed data after SIGKILL"),
            );
            drop(c);
        }
    }
}
