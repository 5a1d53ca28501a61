//! A hostile frontend against the real daemon (issue 5, item 2): malformed rings and malformed
//! vhost-user messages over the daemon's socket, from a frontend built on the `vhost` crate with
//! memfd guest memory (tests/common/frontend.rs).
//!
//! After every case: the daemon is alive; it wrote nothing in guest memory outside the used ring
//! and the device-writable buffers (the memfd is filled with a canary first, including bytes on
//! both sides of the region); a bad request is answered (IOERR/UNSUPP where a status byte can be
//! written, used len 0 where not); a valid request on the same ring still works where the ring
//! is still usable; and a new connection works once the bad one is closed.

mod common;
#[path = "common/frontend.rs"]
mod frontend;
#[path = "hostile/messages.rs"]
mod messages;

use std::path::PathBuf;
use std::time::Instant;

use common::*;
use frontend::*;
use vhost::VhostBackend;
use vhost::vhost_user::VhostUserFrontend;
use vmm_sys_util::eventfd::EventFd;

const IMAGE_SIZE: u64 = 8 * MIB;
/// How long a fresh connection may take to be served after a bad one closed.
const RECOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A daemon on a random-filled image.
struct Env {
    _dir: TestDir,
    image: PathBuf,
    socket: PathBuf,
    daemon: Daemon,
}

impl Env {
    fn new(tag: &str, extra: &[&str]) -> Env {
        let dir = TestDir::new(tag);
        let image = create_image_random(&dir.join("disk.img"), IMAGE_SIZE, 0x5eed);
        let daemon = Daemon::start(&dir, &image, extra);
        Env {
            socket: dir.join("vublk.sock"),
            image,
            _dir: dir,
            daemon,
        }
    }

    fn guest(&self) -> Guest {
        self.guest_with(Opts::default())
    }

    fn guest_with(&self, opts: Opts) -> Guest {
        Guest::connect(&self.socket, &self.image, opts)
    }

    /// Connected, memory table sent, no ring set up.
    fn bare(&self) -> Guest {
        let mut g = Guest::handshake(&self.socket, &self.image, Opts::default());
        g.send_mem_table().expect("memory table refused");
        g
    }

    /// Closes `g`; the daemon must be alive and serve a fresh connection correctly.
    #[track_caller]
    fn recovers(&self, g: Guest, what: &str) {
        if let Err(e) = self.try_recovers(g, what) {
            panic!("{e}\ndaemon log:\n{}", log_summary(&self.daemon.stderr()));
        }
    }

    /// [`Env::recovers`] as a result; a connection not served within `RECOVER_TIMEOUT` is an
    /// error (the thread is left blocked until the daemon is killed).
    fn try_recovers(&self, g: Guest, what: &str) -> Result<(), String> {
        drop(g);
        if let Some(s) = self.daemon.try_wait() {
            return Err(format!("{what}: the daemon died ({})", describe_status(s)));
        }
        let (socket, image, w) = (self.socket.clone(), self.image.clone(), what.to_string());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(move || {
                let mut g = Guest::connect(&socket, &image, Opts::default());
                g.probe(&format!("{w}: next connection"));
                g.probe_write(100, 7);
                g.mem.assert_untouched(&format!("{w}: next connection"));
            });
            let _ = tx.send(r.map_err(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            }));
        });
        let r = match rx.recv_timeout(RECOVER_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(format!("{what}: the next connection failed: {msg}")),
            Err(_) => Err(format!(
                "{what}: the next connection was not served within {RECOVER_TIMEOUT:?}"
            )),
        };
        if let Some(s) = self.daemon.try_wait() {
            return Err(format!("{what}: the daemon died ({})", describe_status(s)));
        }
        r
    }

    /// CPU time (user + system, all threads) the daemon used so far, in milliseconds.
    fn cpu_ms(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.daemon.pid())).unwrap();
        // Fields after "(comm) ": state is field 3, utime 14, stime 15.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        ticks * 1000 / hz
    }
}

/// Failures collected so that one test reports every variant that is wrong, not just the first.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, ok: bool, msg: impl Into<String>) {
        if !ok {
            self.0.push(msg.into());
        }
    }

    #[track_caller]
    fn assert_none(self, env: &Env) {
        assert!(
            self.0.is_empty(),
            "{} finding(s):\n  - {}\ndaemon log:\n{}",
            self.0.len(),
            self.0.join("\n  - "),
            log_summary(&env.daemon.stderr())
        );
    }
}

/// The daemon's log with runs of repeated messages folded.
fn log_summary(log: &str) -> String {
    let mut out: Vec<(String, usize)> = Vec::new();
    for l in log.lines() {
        // Drop the timestamp so repeats compare equal.
        let msg = l.split_once("] ").map_or(l, |(_, m)| m).to_string();
        match out.last_mut() {
            Some((m, n)) if *m == msg => *n += 1,
            _ => out.push((msg, 1)),
        }
    }
    out.iter()
        .map(|(m, n)| {
            if *n > 1 {
                format!("{m}   [x{n}]\n")
            } else {
                format!("{m}\n")
            }
        })
        .collect()
}

/// The used entries of one batch, by head.
fn by_head(used: &[(u32, u32)], head: u16) -> u32 {
    let e: Vec<_> = used.iter().filter(|u| u.0 == u32::from(head)).collect();
    assert_eq!(
        e.len(),
        1,
        "head {head}: expected one used entry, got {used:?}"
    );
    e[0].1
}

// ---------------------------------------------------------------------------------------------
// The frontend itself
// ---------------------------------------------------------------------------------------------

#[test]
fn valid_requests_through_the_test_frontend() {
    let env = Env::new("valid", &["--serial", "hostile-serial"]);
    for add_mem_reg in [false, true] {
        let mut g = env.guest_with(Opts {
            add_mem_reg,
            ..Opts::default()
        });
        assert_eq!(g.fe.get_queue_num().unwrap(), 2);
        g.probe("read");
        g.probe_write(64, 1);
        let id_hdr = g.hdr(T_GET_ID, 0);
        let (id, id_st) = (g.wbuf(20), g.wbuf(1));
        let get_id = g.chain(&[(id_hdr, 16, false), (id, 20, true), (id_st, 1, true)]);
        let fl_hdr = g.hdr(T_FLUSH, 0);
        let fl_st = g.wbuf(1);
        let flush = g.chain(&[(fl_hdr, 16, false), (fl_st, 1, true)]);
        let bad_hdr = g.hdr(0x55, 0);
        let bad_st = g.wbuf(1);
        let bad_type = g.chain(&[(bad_hdr, 16, false), (bad_st, 1, true)]);
        g.submit(&[get_id, flush, bad_type]);
        let used = g.wait_used(3);
        assert_eq!(by_head(&used, get_id), 21);
        let mut want = b"hostile-serial".to_vec();
        want.resize(20, 0);
        assert_eq!(g.mem.read(id, 20), want, "GET_ID");
        assert_eq!(g.mem.read(id_st, 1)[0], S_OK);
        assert_eq!(by_head(&used, flush), 1);
        assert_eq!(g.mem.read(fl_st, 1)[0], S_OK, "FLUSH");
        assert_eq!(by_head(&used, bad_type), 1);
        assert_eq!(g.mem.read(bad_st, 1)[0], S_UNSUPP, "unknown request type");
        g.mem.assert_untouched("valid requests");
        env.recovers(g, "valid requests");
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed rings
// ---------------------------------------------------------------------------------------------

#[test]
fn descriptors_outside_guest_memory_or_overflowing() {
    let env = Env::new("desc-oob", &[]);
    let mut g = env.guest();
    let end = g.mem.end();
    let start = g.mem.gpa;
    // (buffer address, length, kind): the data buffer of a request is bad.
    let bad_data = [
        (end + 0x1000, 512, T_IN),    // past the region
        (end - 256, 512, T_IN),       // straddles its end
        (start - 0x1000, 512, T_OUT), // below it (the memfd has bytes there)
        (start - 256, 512, T_OUT),    // straddles its start
        (u64::MAX - 100, 512, T_IN),  // wraps around 2^64
        (u64::MAX - 511, 512, T_OUT), // ends exactly at 2^64
        (u64::MAX - 1023, 512, T_IN), // ends below 2^64, not in memory
    ];
    let mut cases = Vec::new();
    for &(addr, len, kind) in &bad_data {
        let h = g.hdr(kind, 8);
        let st = g.wbuf(1);
        let w = kind == T_IN;
        if w {
            // Whatever part of it is guest memory is device-writable (if never written here).
            g.mem.allow_write(addr, u64::from(len));
        }
        let head = g.chain(&[(h, 16, false), (addr, len, w), (st, 1, true)]);
        cases.push((head, Some(st), format!("data {addr:#x}+{len}")));
    }
    // A header outside memory or wrapping: the status byte is fine, so IOERR.
    for addr in [end + 64, u64::MAX - 8] {
        let d = g.wbuf(512);
        let st = g.wbuf(1);
        let head = g.chain(&[(addr, 16, false), (d, 512, true), (st, 1, true)]);
        cases.push((head, Some(st), format!("header {addr:#x}")));
    }
    // No usable status byte: used len 0, nothing written.
    for addr in [end, end + 4096, u64::MAX, start - 1] {
        let h = g.hdr(T_IN, 8);
        let d = g.wbuf(512);
        let head = g.chain(&[(h, 16, false), (d, 512, true), (addr, 1, true)]);
        cases.push((head, None, format!("status at {addr:#x}")));
    }
    // A 4 GiB data buffer starting inside the region: the chain's total length passes u32::MAX
    // before the status descriptor, so the device may also stop there (used len 0).
    let h = g.hdr(T_IN, 8);
    let st = g.wbuf(1);
    let huge = g.chain(&[
        (h, 16, false),
        (start + 0x10000, u32::MAX, true),
        (st, 1, true),
    ]);
    let before = read_file_at(&env.image, 8 * 512, 512);
    let mut heads: Vec<u16> = cases.iter().map(|c| c.0).collect();
    heads.push(huge);
    g.submit(&heads);
    let used = g.wait_used(heads.len() as u16);
    for (head, st, what) in &cases {
        match st {
            Some(st) => {
                assert_eq!(by_head(&used, *head), 1, "{what}: used len");
                assert_eq!(g.mem.read(*st, 1)[0], S_IOERR, "{what}: status");
            }
            None => assert_eq!(by_head(&used, *head), 0, "{what}: used len"),
        }
    }
    match by_head(&used, huge) {
        0 => {}
        len => assert_eq!((len, g.mem.read(st, 1)[0]), (1, S_IOERR), "4 GiB buffer"),
    }
    g.mem.assert_untouched("descriptors outside memory");
    // The OUT requests wrote nothing to the image.
    assert_bytes_eq(
        &read_file_at(&env.image, 8 * 512, 512),
        &before,
        "image after refused writes",
    );
    g.probe("after descriptors outside memory");
    env.recovers(g, "descriptors outside memory");
}

/// Broken chains vublk can see are broken: each gets IOERR, or used len 0 when the chain never
/// reaches a device-writable byte.
#[test]
fn broken_chains_are_answered() {
    let env = Env::new("chains", &[]);
    let mut g = env.guest();
    let mut expect: Vec<(u16, Option<u64>, &str)> = Vec::new();

    // A loop on the status descriptor: header, data, status -> status -> status ...
    let h = g.hdr(T_IN, 0);
    let (d, st) = (g.wbuf(512), g.wbuf(1));
    let i = g.alloc_descs(3);
    g.set_desc(i, h, 16, F_NEXT, i + 1);
    g.set_desc(i + 1, d, 512, F_WRITE | F_NEXT, i + 2);
    g.set_desc(i + 2, st, 1, F_WRITE | F_NEXT, i + 2);
    expect.push((i, Some(st), "status descriptor loops on itself"));

    // A loop through the whole chain back to the header.
    let h = g.hdr(T_IN, 0);
    let (d, st) = (g.wbuf(512), g.wbuf(1));
    let i = g.alloc_descs(3);
    g.set_desc(i, h, 16, F_NEXT, i + 1);
    g.set_desc(i + 1, d, 512, F_WRITE | F_NEXT, i + 2);
    g.set_desc(i + 2, st, 1, F_WRITE | F_NEXT, i);
    expect.push((i, Some(st), "chain loops back to its head"));

    // Indirect tables the device must not follow, at the start of the chain: nothing usable.
    let nested = g.buf(32);
    let inner = g.buf(16);
    let h2 = g.hdr(T_IN, 0);
    let st2 = g.wbuf(1);
    g.write_desc(inner, 0, h2, 16, 0, 0);
    g.write_desc(nested, 0, inner, 16, F_INDIRECT, 0);
    g.write_desc(nested, 1, st2, 1, F_WRITE, 0);
    let i = g.alloc_descs(1);
    g.set_desc(i, nested, 32, F_INDIRECT, 0);
    expect.push((
        i,
        None,
        "indirect table whose first entry is another indirect table",
    ));
    for (len, what) in [
        (40, "indirect table of 40 bytes (not a multiple of 16)"),
        (0, "indirect table of 0 bytes"),
    ] {
        let t = g.buf(48);
        let h = g.hdr(T_IN, 0);
        let st = g.wbuf(1);
        g.write_desc(t, 0, h, 16, F_NEXT, 1);
        g.write_desc(t, 1, st, 1, F_WRITE, 0);
        let i = g.alloc_descs(1);
        g.set_desc(i, t, len, F_INDIRECT, 0);
        expect.push((i, None, what));
    }
    let i = g.alloc_descs(1);
    g.set_desc(i, g.mem.end() + 0x1000, 64, F_INDIRECT, 0);
    expect.push((i, None, "indirect table outside memory"));
    let i = g.alloc_descs(1);
    g.set_desc(i, u64::MAX - 15, 32, F_INDIRECT, 0);
    expect.push((i, None, "indirect table wrapping around 2^64"));

    let heads: Vec<u16> = expect.iter().map(|e| e.0).collect();
    g.submit(&heads);
    let used = g.wait_used(heads.len() as u16);
    for (head, st, what) in &expect {
        match st {
            Some(st) => {
                assert_eq!(by_head(&used, *head), 1, "{what}: used len");
                assert_eq!(g.mem.read(*st, 1)[0], S_IOERR, "{what}: status");
            }
            None => assert_eq!(by_head(&used, *head), 0, "{what}: used len"),
        }
    }
    g.mem.assert_untouched("broken chains");
    g.probe("after broken chains");
    env.recovers(g, "broken chains");
}

/// Chains cut short by a loop, a link past the queue size, a nested or a misaligned indirect
/// table, arranged so that the part before the break looks like a complete, valid read. The
/// device cannot know where such a chain ends, so the right answer is IOERR.
#[test]
fn truncated_chains_get_ioerr() {
    let env = Env::new("truncated", &[]);
    let mut g = env.guest();
    let size = g.ring.size;
    let mut cases: Vec<(u16, u64, &str)> = Vec::new();

    // header -> P -> (B -> C -> B ...): the iterator stops after `size` descriptors, on C; with
    // |P| = 513 - k for k loop turns the data adds up to whole sectors.
    let k = u64::from(size - 2) / 2;
    let h = g.hdr(T_IN, 0);
    let p = g.wbuf(513 - k as usize);
    let (b, c) = (g.wbuf(512), g.wbuf(1));
    let i = g.alloc_descs(4);
    g.set_desc(i, h, 16, F_NEXT, i + 1);
    g.set_desc(i + 1, p, 513 - k as u32, F_WRITE | F_NEXT, i + 2);
    g.set_desc(i + 2, b, 512, F_WRITE | F_NEXT, i + 3);
    g.set_desc(i + 3, c, 1, F_WRITE | F_NEXT, i + 2);
    cases.push((i, c, "a loop that adds up to whole sectors"));

    // header -> data -> status -NEXT-> index >= queue size.
    let r = g.read_req(0, 1);
    g.set_desc(r.head + 2, r.status, 1, F_WRITE | F_NEXT, size + 3);
    cases.push((
        r.head,
        r.status,
        "status links to a descriptor >= queue size",
    ));

    // header -> data -> status -NEXT-> misaligned indirect table.
    let r = g.read_req(0, 1);
    let x = g.alloc_descs(1);
    let t = g.buf(32);
    g.set_desc(r.head + 2, r.status, 1, F_WRITE | F_NEXT, x);
    g.set_desc(x, t, 24, F_INDIRECT, 0);
    cases.push((r.head, r.status, "status links to a 24-byte indirect table"));

    // indirect [header, data, status -NEXT-> nested indirect].
    let t = g.buf(64);
    let inner = g.buf(16);
    let h = g.hdr(T_IN, 0);
    let (d, st) = (g.wbuf(512), g.wbuf(1));
    g.write_desc(t, 0, h, 16, F_NEXT, 1);
    g.write_desc(t, 1, d, 512, F_WRITE | F_NEXT, 2);
    g.write_desc(t, 2, st, 1, F_WRITE | F_NEXT, 3);
    g.write_desc(t, 3, inner, 16, F_INDIRECT, 0);
    let i = g.alloc_descs(1);
    g.set_desc(i, t, 64, F_INDIRECT, 0);
    cases.push((i, st, "indirect chain links to a nested indirect table"));

    let heads: Vec<u16> = cases.iter().map(|c| c.0).collect();
    g.submit(&heads);
    let used = g.wait_used(heads.len() as u16);
    g.mem.assert_untouched("truncated chains");
    let mut f = Findings::default();
    for (head, st, what) in &cases {
        let (len, status) = (by_head(&used, *head), g.mem.read(*st, 1)[0]);
        f.check(
            len == 1 && status == S_IOERR,
            format!("{what}: used len {len}, status {status} (want len 1, IOERR)"),
        );
    }
    g.probe("after truncated chains");
    env.recovers(g, "truncated chains");
    f.assert_none(&env);
}

/// An indirect table with more entries than the queue has slots (virtio forbids the driver to
/// build it). Executing it correctly and refusing it with IOERR are both acceptable; anything
/// else is not.
#[test]
fn indirect_chain_longer_than_the_queue() {
    let env = Env::new("long-indirect", &[]);
    let mut g = env.guest();
    let n = 3 * g.ring.size;
    let t = g.buf(16 * usize::from(n));
    let h = g.hdr(T_IN, 16);
    let data: Vec<u64> = (0..n - 2).map(|_| g.wbuf(512)).collect();
    let st = g.wbuf(1);
    g.write_desc(t, 0, h, 16, F_NEXT, 1);
    for (k, &d) in data.iter().enumerate() {
        let k = k as u16 + 1;
        g.write_desc(t, k, d, 512, F_WRITE | F_NEXT, k + 1);
    }
    g.write_desc(t, n - 1, st, 1, F_WRITE, 0);
    let i = g.alloc_descs(1);
    g.set_desc(i, t, 16 * u32::from(n), F_INDIRECT, 0);
    g.submit(&[i]);
    let (_, len) = g.wait_used(1)[0];
    match g.mem.read(st, 1)[0] {
        S_OK => {
            assert_eq!(
                len as usize,
                data.len() * 512 + 1,
                "used len of the long read"
            );
            let want = read_file_at(&env.image, 16 * 512, data.len() * 512);
            for (k, &d) in data.iter().enumerate() {
                assert_bytes_eq(&g.mem.read(d, 512), &want[k * 512..][..512], "long read");
            }
        }
        s => assert_eq!((s, len), (S_IOERR, 1), "status and used len"),
    }
    g.mem.assert_untouched("long indirect chain");
    g.probe("after a long indirect chain");
    env.recovers(g, "long indirect chain");
}

#[test]
fn head_index_beyond_the_queue() {
    let env = Env::new("bad-head", &[]);
    let mut g = env.guest();
    let size = g.ring.size;
    for head in [size, size + 1, 0x7fff, u16::MAX] {
        g.post(head);
    }
    let r = g.read_req(5, 2);
    g.submit(&[r.head]);
    // The bad heads cannot be returned (a used id >= queue size is meaningless); whatever is
    // in the used ring must be the probe and, at most, zero-length entries.
    let mut used = Vec::new();
    while !used.iter().any(|u: &(u32, u32)| u.0 == u32::from(r.head)) {
        used.extend(g.wait_used(1));
    }
    for &(id, len) in &used {
        if id == u32::from(r.head) {
            g.check_read(&r, (id, len));
        } else {
            assert_eq!(len, 0, "used entry {id} for a bad head");
        }
    }
    g.mem.assert_untouched("heads beyond the queue");
    g.probe("after heads beyond the queue");
    env.recovers(g, "heads beyond the queue");
}

/// avail->idx moves more than the queue size past the device's position: the device must not
/// process anything, must not spin, and must work again once the index is sane.
fn avail_idx_jump(tag: &str, extra: &[&str], event_idx: bool) {
    let env = Env::new(tag, extra);
    let mut g = env.guest_with(Opts {
        event_idx,
        ..Opts::default()
    });
    let size = g.ring.size;
    let r = g.read_req(5, 2);
    g.post(r.head);
    g.set_avail_idx(size + 1);
    let (cpu0, log0, t0) = (
        env.cpu_ms(),
        env.daemon.stderr().lines().count(),
        Instant::now(),
    );
    g.kick();
    g.assert_no_used("avail idx jumped by more than the queue size");
    let cpu = env.cpu_ms() - cpu0;
    let lines = env.daemon.stderr().lines().count() - log0;
    let ms = t0.elapsed().as_millis() as u64;
    g.mem.assert_untouched("avail idx jump");
    let mut f = Findings::default();
    f.check(
        cpu < ms / 4,
        format!(
            "the daemon used {} ms of CPU in {ms} ms after one kick",
            cpu
        ),
    );
    f.check(lines < 20, format!("one kick produced {lines} log lines"));
    // A sane index again: the request in slot 0 is served.
    g.set_avail_idx(1);
    g.kick();
    let used = g.wait_used(1);
    g.check_read(&r, used[0]);
    g.mem.assert_untouched("after the avail idx came back");
    // Leave it broken and close: the next connection must be served.
    g.post(r.head);
    g.set_avail_idx(2 + 2 * size);
    g.kick();
    std::thread::sleep(QUIET);
    if let Err(e) = env.try_recovers(g, "avail idx jump") {
        f.0.push(e);
    }
    f.assert_none(&env);
}

#[test]
fn avail_idx_jump_without_event_idx() {
    avail_idx_jump("avail-jump", &[], false);
}

#[test]
fn avail_idx_jump_with_event_idx() {
    avail_idx_jump("avail-jump-ei", &[], true);
}

#[test]
fn avail_idx_jump_with_polling() {
    avail_idx_jump("avail-jump-poll", &["--poll-us", "50"], false);
}

// ---------------------------------------------------------------------------------------------
// Kicks on rings that may not run
// ---------------------------------------------------------------------------------------------

/// With PROTOCOL_FEATURES a ring starts disabled: a kick must not make the daemon touch it,
/// and enabling it serves what is pending.
#[test]
fn kick_on_a_disabled_ring() {
    let env = Env::new("disabled", &[]);
    let mut g = env.bare();
    let c = g.vring_config();
    g.fe.set_vring_num(0, g.ring.size).unwrap();
    g.fe.set_vring_addr(0, &c).unwrap();
    g.fe.set_vring_base(0, 0).unwrap();
    g.fe.set_vring_call(0, &g.ring.call).unwrap();
    g.fe.set_vring_kick(0, &g.ring.kick).unwrap();
    for round in 0..2 {
        let r = g.read_req(5, 2);
        g.submit(&[r.head]);
        g.assert_no_used("kick on a disabled ring");
        g.mem.assert_untouched("kick on a disabled ring");
        assert_ne!(
            g.status(&r),
            S_OK,
            "round {round}: status written on a disabled ring"
        );
        g.fe.set_vring_enable(0, true).unwrap();
        let used = g.wait_used(1);
        g.check_read(&r, used[0]);
        g.fe.set_vring_enable(0, false).unwrap();
    }
    g.fe.set_vring_enable(0, true).unwrap();
    g.probe("after disabled kicks");
    env.recovers(g, "kick on a disabled ring");
}

/// Queue 1 gets a kick and a call fd and is enabled, but never a size or addresses. Guest
/// memory starts at address 0 here, as a VM's does, so writes at the ring's default addresses
/// would land in it.
#[test]
fn kick_on_a_ring_that_was_never_set_up() {
    let env = Env::new("unconfigured", &[]);
    let mut g = env.guest_with(Opts {
        gpa: 0,
        ..Opts::default()
    });
    // Guest address 2, where the unset ring's avail index would be read, holds descriptor 0's
    // address bits: make them non-zero for the whole test (a VM's low memory is not zero).
    let d0 = g.alloc_descs(1);
    g.set_desc(d0, 0xdead_beef_dead_beef, 0, 0, 0);
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let mut f = Findings::default();
    let setup = [
        outcome(g.fe.set_vring_call(1, &call)),
        outcome(g.fe.set_vring_kick(1, &kick)),
        outcome(g.fe.set_vring_enable(1, true)),
    ];
    if setup.iter().all(|o| *o == Outcome::Accepted) {
        let (cpu0, t0) = (env.cpu_ms(), Instant::now());
        kick.write(1).unwrap();
        std::thread::sleep(QUIET);
        let (cpu, ms) = (env.cpu_ms() - cpu0, t0.elapsed().as_millis() as u64);
        f.check(
            cpu < ms / 4,
            format!("{cpu} ms of CPU in {ms} ms after one kick"),
        );
        if let Err(e) = g.mem.check_untouched() {
            f.0.push(format!("kick on queue 1: {e}"));
            g.mem.accept_current();
        }
        g.probe("queue 0 after a kick on queue 1");
    }
    if let Err(e) = env.try_recovers(g, "kick on a ring never set up") {
        f.0.push(e);
    }
    f.assert_none(&env);
}
