//! The `SystemCallFilter=` of systemd/vublk@.service allows every system call vublk makes.
//!
//! vublk runs as the unit runs it (socket-activated by `systemd-socket-activate`, control
//! socket, pidfile, watchdog, stats log, CPU pinning, polling) under `strace -f`, once per
//! engine path (sync, direct on io_uring, direct on the thread pool), while a libblkio client
//! sends every request type from two queues at once, reconnects, and the daemon is stopped
//! with SIGTERM. Every traced call must be in the filter as systemd expands it
//! (`systemd-analyze syscall-filter`).

mod common;
#[path = "common/proc.rs"]
mod proc;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;
use proc::{Proc, ProcSpec, activator, os, tool, wait_for_path};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/vublk@.service");

/// The syscalls of `@group`, nested groups expanded.
fn expand(group: &str, cache: &mut BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if let Some(s) = cache.get(group) {
        return s.clone();
    }
    let out = Command::new(tool("systemd-analyze", "systemd"))
        .args(["syscall-filter", "--no-pager", group])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.is_empty(),
        "systemd-analyze syscall-filter {group}"
    );
    let mut set = BTreeSet::new();
    for l in text.lines().skip(1) {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if l.starts_with('@') {
            set.extend(expand(l, cache));
        } else {
            set.insert(l.to_string());
        }
    }
    cache.insert(group.to_string(), set.clone());
    set
}

/// The unit's filter, combined as systemd does: the first line decides allow- or deny-list,
/// later `~` lines remove from an allow-list and plain lines add to it.
fn allowed_by_unit() -> BTreeSet<String> {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let mut cache = BTreeMap::new();
    let mut allowed: Option<BTreeSet<String>> = None;
    for line in unit.lines() {
        let Some(v) = line.trim().strip_prefix("SystemCallFilter=") else {
            continue;
        };
        let (deny, v) = match v.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, v),
        };
        let mut items = BTreeSet::new();
        for it in v.split_whitespace() {
            if it.starts_with('@') {
                items.extend(expand(it, &mut cache));
            } else {
                items.insert(it.to_string());
            }
        }
        match (&mut allowed, deny) {
            (None, false) => allowed = Some(items),
            (None, true) => panic!("the unit's filter should be an allow-list"),
            (Some(a), false) => a.extend(items),
            (Some(a), true) => a.retain(|s| !items.contains(s)),
        }
    }
    allowed.expect("no SystemCallFilter= in the unit")
}

/// System call names in an `strace -f` log ("PID name(" or "PID <... name resumed>").
fn traced(log: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for l in log.lines() {
        let rest = l
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        let rest = rest.strip_prefix("<... ").unwrap_or(rest);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let next = rest[name.len()..].chars().next();
        if !name.is_empty() && matches!(next, Some('(') | Some(' ')) {
            set.insert(name);
        }
    }
    set
}

/// Whether the strace writing `log` still runs (strace -D is not our child: look it up).
fn tracer_alive(log: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let needle = log.as_os_str().as_bytes();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| c.windows(needle.len()).any(|w| w == needle))
}

/// Drives every request type on two queues at once, then reconnects.
fn workload(sock: &std::path::Path, ctl: &std::path::Path) {
    let mut c = Client::connect(sock);
    let data = pattern(7, 256 * 1024);
    c.write_data(0, 0, &data);
    assert_bytes_eq(&c.read_data(1, 0, data.len()), &data, "read back");
    c.q(0)
        .writev(MIB, &[(0, 4096), (8192, 512)], ReqFlags::FUA)
        .unwrap();
    c.q(1).readv(MIB, &[(0, 512), (4096, 4096)]).unwrap();
    c.q(0).flush().unwrap();
    c.q(1)
        .write_zeroes(2 * MIB, 65536, ReqFlags::empty())
        .unwrap();
    c.q(1)
        .write_zeroes(3 * MIB, 65536, ReqFlags::NO_UNMAP)
        .unwrap();
    let _ = c.q(0).discard(4 * MIB, 65536); // offered only where punch-hole works
    // 16 in flight per queue, both queues at once.
    let mem = c.mem;
    let mut qs: Vec<blkio::Blkioq> = c.queues.drain(..).collect();
    let handles: Vec<_> = qs
        .drain(..)
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                for round in 0..20u64 {
                    for i in 0..16usize {
                        let off = (qi as u64 * 16 + i as u64) * 4096 + (round % 4) * MIB;
                        let buf = mem.ptr(i * 4096, 4096);
                        if round % 2 == 0 {
                            q.write(off, buf, 4096, i, ReqFlags::empty());
                        } else {
                            q.read(off, buf, 4096, i, ReqFlags::empty());
                        }
                    }
                    for c in wait_completions(&mut q, 16) {
                        completion_to_result(&c).unwrap();
                    }
                }
                q
            })
        })
        .collect();
    c.queues = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let st = vublk::control::fetch_stats(ctl).unwrap();
    assert!(st.total.reads > 0 && st.total.writes > 0);
    drop(c);
    let mut c = Client::connect(sock);
    c.q(0).read(0, 0, 4096).unwrap();
    drop(c);
}

#[test]
fn unit_syscall_filter_allows_every_call() {
    let strace = tool("strace", "strace");
    let allowed = allowed_by_unit();
    for must in [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "fdatasync",
    ] {
        assert!(allowed.contains(must), "the unit's filter lacks {must}");
    }
    let mut all_used = BTreeSet::new();
    for (name, engine, no_uring) in [
        ("sync", "sync", false),
        ("direct", "direct", false),
        ("direct-threads", "direct", true),
    ] {
        let dir = TestDir::new(&format!("scf-{name}"));
        let img = create_image(&dir.join("disk.img"), 16 * MIB);
        let sock = dir.join("s.sock");
        let ctl = dir.join("c.sock");
        let log = dir.join("strace.log");
        let args = os(&[
            &"--blk-file",
            &img,
            &"--engine",
            &engine,
            &"--num-queues",
            &"2",
            &"--control-socket",
            &ctl,
            &"--pidfile",
            &dir.join("p.pid"),
            &"--stats-interval",
            &"1",
            &"--cpu-affinity",
            &"0",
            &"--poll-us",
            &"20",
        ]);
        let setenv = |k: &str, v: &std::ffi::OsStr| {
            let mut s = OsString::from(format!("{k}="));
            s.push(v);
            ["-E".into(), s]
        };
        let mut wrapper: Vec<OsString> = vec![activator().into(), "-l".into(), sock.clone().into()];
        wrapper.extend(setenv("NOTIFY_SOCKET", dir.join("scf.notify").as_os_str()));
        wrapper.extend(setenv("WATCHDOG_USEC", "200000".as_ref()));
        if no_uring {
            wrapper.extend(setenv("VUBLK_DISABLE_IO_URING", "1".as_ref()));
        }
        // -D: strace runs as a detached grandchild, so vublk keeps the pid LISTEN_PID names.
        wrapper.extend(os(&[&strace, &"-D", &"-f", &"-qq", &"-o", &log]));
        let mut spec = ProcSpec::new(&dir, "scf", args);
        spec.wrapper = wrapper;
        let t0 = Instant::now();
        let mut p = Proc::spawn(spec);
        assert!(wait_for_path(&sock, Duration::from_secs(10)), "no socket");
        let (s2, c2) = (sock.clone(), ctl.clone());
        with_timeout(
            Duration::from_secs(120),
            "workload under strace",
            move || workload(&s2, &c2),
        );
        p.wait_for_line("READY=1", READY_TIMEOUT);
        std::thread::sleep(Duration::from_millis(1300)); // a stats line and watchdog pings
        eprintln!("{name}: {:?} until the workload finished", t0.elapsed());
        p.terminate();
        // strace writes each line as the call is made; exit_group is the daemon's last, and
        // the trace is complete at the latest when strace itself has gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        let last = format!("{} exit_group(", p.pid());
        let text = loop {
            let t = std::fs::read_to_string(&log).unwrap_or_default();
            if t.contains(&last) || !tracer_alive(&log) || Instant::now() > deadline {
                break std::fs::read_to_string(&log).unwrap_or_default();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!("{name}: {:?} until the trace was complete", t0.elapsed());
        let used = traced(&text);
        assert!(
            used.contains("fdatasync") && used.contains("accept4"),
            "{name}: {used:?}"
        );
        if engine == "direct" {
            assert_eq!(
                used.contains("io_uring_enter"),
                !no_uring,
                "{name}: {used:?}"
            );
        }
        let denied: Vec<&String> = used.difference(&allowed).collect();
        assert!(
            denied.is_empty(),
            "{name}: vublk made system calls the unit's SystemCallFilter= denies: {denied:?}"
        );
        all_used.extend(used);
    }
    eprintln!(
        "{} system calls, all allowed by the unit: {}",
        all_used.len(),
        all_used.into_iter().collect::<Vec<_>>().join(" ")
    );
}
