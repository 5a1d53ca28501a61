//! Engine-specific behaviour of the real daemon: engine selection, the thread-pool fallback
//! where io_uring is forbidden, and read-modify-write ordering on a 4 KiB-sector device (against
//! other writes and against write-zeroes).

mod common;

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use blkio::{Completion, ReqFlags};
use common::*;

fn daemon_args(sock: &Path, image: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut a = os_args(&["--socket-path"]);
    a.push(sock.into());
    a.push("--blk-file".into());
    a.push(image.into());
    a.extend(os_args(extra));
    a
}

/// Writes distinct data on both queues and reads it back through the other queue.
fn roundtrip(c: &mut Client, seed: u64) {
    for q in 0..2usize {
        let data = pattern(seed + q as u64, 256 * 1024);
        let off = q as u64 * 4 * MIB + 4096;
        c.write_data(q, off, &data);
        let back = c.read_data(1 - q, off, data.len());
        assert_bytes_eq(
            &back,
            &data,
            &format!("queue {q} write read back on queue {}", 1 - q),
        );
    }
    c.q(0).flush().unwrap_or_else(|e| panic!("flush: {e}"));
}

#[test]
fn auto_picks_direct_on_a_disk_filesystem() {
    let dir = TestDir::new("auto");
    let img = create_image(&dir.join("disk.img"), 16 * MIB);
    let d = Daemon::start(&dir, &img, &["--engine", "auto"]);
    let mut c = Client::connect(d.socket.as_ref().unwrap());
    roundtrip(&mut c, 11);
    // temp_dir() is ext4 here (tmpfs would make auto pick sync; both are logged).
    let log = d.stderr();
    assert!(
        log.contains("engine auto: using direct") || log.contains("engine auto: image is on tmpfs"),
        "auto must log its choice:\n{log}"
    );
}

/// `--preallocate` allocates a sparse image's holes before serving (so the direct engine's
/// writes overwrite instead of allocating) and leaves the data that was there alone.
#[test]
fn preallocate_fills_holes_and_keeps_data() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let dir = TestDir::new("prealloc");
    let img = create_image(&dir.join("disk.img"), 16 * MIB);
    let data = pattern(31, 64 * 1024);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&data, 5 * MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let allocated = || std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(allocated() < MIB, "the image must start sparse");
    let d = Daemon::start(&dir, &img, &["--engine", "direct", "--preallocate"]);
    assert!(
        allocated() >= 16 * MIB,
        "{} bytes allocated after --preallocate",
        allocated()
    );
    assert!(
        d.stderr()
            .contains("--preallocate: allocated 15 MiB of holes"),
        "{}",
        d.stderr()
    );
    let mut c = Client::connect(d.socket.as_ref().unwrap());
    assert_bytes_eq(
        &c.read_data(0, 5 * MIB, data.len()),
        &data,
        "data written before",
    );
    assert_bytes_eq(&c.read_data(1, 0, 4096), &[0u8; 4096], "a former hole");
    roundtrip(&mut c, 32);
}

/// The XFS extent size hint of `img`, from `xfs_io -c extsize` ("[1048576] /path").
fn xfs_extsize(img: &Path) -> u64 {
    let out = Command::new("xfs_io")
        .args(["-c", "extsize"])
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim_start_matches('[')
        .split(']')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("xfs_io extsize: {text}"))
}

/// A new, still unallocated image on XFS gets a 1 MiB extent size hint, as `qemu-img create`
/// sets, so random writes allocate 1 MiB extents; an image that holds data, or a read-only
/// one, is left as it is.
#[test]
fn new_image_on_xfs_gets_an_extent_size_hint() {
    let dir = TestDir::new("xfs");
    let backing = create_image(&dir.join("xfs.back"), 512 * MIB);
    let lo = Loop::new(&backing, 512).expect("losetup (needs root)");
    let mnt = Mount::format("xfs", &lo.dev, &dir.join("mnt"));
    let fresh = create_image(&mnt.path.join("fresh.img"), 16 * MIB);
    let used = create_image(&mnt.path.join("used.img"), 16 * MIB);
    let f = std::fs::OpenOptions::new().write(true).open(&used).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 4096], 0).unwrap();
    f.sync_all().unwrap();
    drop(f); // an open file would keep the mount busy
    let ro = create_image(&mnt.path.join("ro.img"), 16 * MIB);
    {
        let d = Daemon::start(&dir, &fresh, &["--engine", "direct"]);
        let mut c = Client::connect(d.socket.as_ref().unwrap());
        roundtrip(&mut c, 41);
        assert!(
            d.stderr().contains("extent size hint 1 MiB"),
            "{}",
            d.stderr()
        );
    }
    assert_eq!(xfs_extsize(&fresh), MIB);
    for (img, extra) in [(&used, &[][..]), (&ro, &["--read-only"][..])] {
        let mut args = vec!["--engine", "direct"];
        args.extend_from_slice(extra);
        let d = Daemon::start(&dir, img, &args);
        assert!(!d.stderr().contains("extent size hint"), "{}", d.stderr());
        drop(d);
        assert_eq!(xfs_extsize(img), 0, "{}", img.display());
    }
    drop(mnt);
    drop(lo);
}

/// A block device is never "on tmpfs", although its node in /dev is (devtmpfs): auto must pick
/// direct for it, not the page-cache engine.
#[test]
fn auto_picks_direct_on_a_block_device() {
    let dir = TestDir::new("auto-blk");
    let mut env = serve_loop(&dir, 16 * MIB, 512, &["--engine", "auto"]);
    roundtrip(&mut env.c, 12);
    let log = env.d.stderr();
    assert!(
        log.contains("engine auto: using direct") && log.contains("engine direct"),
        "auto must pick direct for a block device:\n{log}"
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn direct_engine_falls_back_to_threads_when_seccomp_denies_io_uring() {
    let dir = TestDir::new("seccomp");
    let img = create_image(&dir.join("disk.img"), 16 * MIB);
    let sock = dir.join("vublk.sock");
    let mut d = Daemon::spawn(Spawn {
        dir: &dir,
        name: "vublk",
        args: daemon_args(&sock, &img, &["--engine", "direct", "--num-queues", "2"]),
        pass_fd: None,
        socket: Some(sock.clone()),
        stop_reading_notify_after_ready: false,
        deny_io_uring: true,
    });
    d.wait_ready(READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut c = Client::connect(&sock);
    roundtrip(&mut c, 21);
    drop(c);
    let log = d.stderr();
    assert!(
        log.contains("io_uring unavailable") && log.contains("Operation not permitted"),
        "the fallback must be logged with its cause:\n{log}"
    );
    assert_eq!(
        log.matches("io_uring unavailable").count(),
        1,
        "one log line, not one per queue:\n{log}"
    );
    let st = d.terminate();
    assert!(
        st.success(),
        "exit after fallback run: {}",
        describe_status(st)
    );
}

/// A daemon started with `args` on a new loop device with `sector`-byte sectors over a
/// `size`-byte file in `dir`, and a client connected to it. Fields drop in order: the client,
/// the daemon, then the device.
struct OnLoop {
    c: Client,
    d: Daemon,
    lo: Loop,
}

fn serve_loop(dir: &TestDir, size: u64, sector: u32, args: &[&str]) -> OnLoop {
    let backing = create_image(&dir.join("backing.img"), size);
    let lo = Loop::new(&backing, sector).expect("losetup (needs root)");
    let d = Daemon::start(dir, &lo.dev, args);
    let c = Client::connect(d.socket.as_ref().unwrap());
    OnLoop { c, d, lo }
}

/// The topology the guest sees (physical block = libblkio's optimal-io-alignment) is the
/// device's own physical block (BLKPBSZGET), as sysfs reports it. A device node's st_blksize,
/// used before, is the page size before Linux 6.15 and the minimum I/O size since.
#[test]
fn topology_hint_is_the_devices_physical_block() {
    for sector in [512u32, 4096] {
        let dir = TestDir::new(&format!("topology-{sector}"));
        let env = serve_loop(&dir, 8 * MIB, sector, &["--engine", "direct"]);
        let name = env
            .lo
            .dev
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let sysfs = format!("/sys/block/{name}/queue/physical_block_size");
        let physical: i32 = std::fs::read_to_string(&sysfs)
            .unwrap_or_else(|e| panic!("{sysfs}: {e}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{sysfs}: {e}"));
        assert_eq!(
            env.c.get_i32("optimal-io-alignment"),
            physical,
            "loop device with {sector}-byte sectors"
        );
        assert_eq!(
            env.c.get_i32("request-alignment"),
            512,
            "guest sector stays 512"
        );
    }
}

/// 512-byte writes from two queues into the same 4 KiB blocks, all in flight at once: each
/// needs read-modify-write of its block on a 4096-byte-sector device, and none may undo
/// another (the engine's write gate orders them). Runs as root (CI does); elsewhere it says why
/// it cannot and fails, since skipping silently would hide a regression.
#[test]
fn concurrent_sub_block_writes_on_a_4k_device_lose_nothing() {
    let dir = TestDir::new("rmw");
    // Bound in this order so that they drop client first, device last.
    let OnLoop { lo: _lo, d, mut c } = serve_loop(&dir, 8 * MIB, 4096, &["--engine", "direct"]);
    assert!(
        d.stderr().contains("offset 4096 bytes"),
        "the engine must see the 4096-byte O_DIRECT alignment:\n{}",
        d.stderr()
    );
    const BLOCKS: u64 = 64; // 64 blocks x 8 sectors = 512 concurrent writes
    for round in 0..4u64 {
        // Fill sector s of every block with a byte pattern unique to (round, block, sector).
        let fill = |blk: u64, s: u64| ((round * 131 + blk * 8 + s) % 251 + 1) as u8;
        for blk in 0..BLOCKS {
            for s in 0..8 {
                let off = ((blk * 8 + s) * 512) as usize;
                c.buf(off, 512).fill(fill(blk, s));
            }
        }
        let mem = c.mem;
        let mut submitted = [0usize; 2];
        for blk in 0..BLOCKS {
            for s in 0..8u64 {
                // Even sectors on queue 0, odd on queue 1: neighbours race on the same block.
                let q = (s % 2) as usize;
                let off = (blk * 8 + s) * 512;
                let ptr = mem.ptr(off as usize, 512);
                c.queues[q].write(off, ptr, 512, off as usize, ReqFlags::empty());
                submitted[q] += 1;
            }
        }
        kick_and_complete(&mut c, submitted);
        assert_sectors(&mut c, BLOCKS, fill, &format!("round {round}"));
    }
    drop(c);
    d.assert_alive("after concurrent read-modify-write");
}

/// Kicks both queues and waits for `submitted[q]` completions on each; every one must succeed.
fn kick_and_complete(c: &mut Client, submitted: [usize; 2]) {
    for q in 0..2 {
        kick(&mut c.queues[q]);
    }
    for (q, n) in submitted.iter().enumerate() {
        let done: Vec<Completion> = wait_completions(&mut c.queues[q], *n);
        for comp in done {
            assert_eq!(
                comp.ret, 0,
                "request {} failed on queue {q}",
                comp.user_data
            );
        }
    }
}

/// Reads the first `blocks` 4 KiB blocks and checks that sector `s` of block `b` is all
/// `want(b, s)`.
fn assert_sectors(c: &mut Client, blocks: u64, want: impl Fn(u64, u64) -> u8, what: &str) {
    let back = c.read_data(0, 0, (blocks * 4096) as usize);
    for blk in 0..blocks {
        for s in 0..8 {
            let at = ((blk * 8 + s) * 512) as usize;
            let w = want(blk, s);
            assert!(
                back[at..at + 512].iter().all(|&b| b == w),
                "{what}: block {blk} sector {s} got {:#x}, want {w:#x}",
                back[at]
            );
        }
    }
}

/// Write-zeroes of part of a 4 KiB block, in flight with a 512-byte write to another sector of
/// the same block: the write's read-modify-write must not put the old sectors back over the
/// zeros. On one queue (write first, so its block is read before the zeroing runs) and across
/// both queues.
#[test]
fn sub_block_write_zeroes_next_to_a_read_modify_write_stays_zero() {
    let dir = TestDir::new("rmw-zeroes");
    let OnLoop { lo: _lo, d, mut c } = serve_loop(&dir, 8 * MIB, 4096, &["--engine", "direct"]);
    const BLOCKS: u64 = 64;
    let old = vec![0xee; (BLOCKS * 4096) as usize];
    c.write_data(0, 0, &old);
    c.buf(0, 512).fill(0x33);
    let ptr = c.mem.ptr(0, 512);
    let mut submitted = [0usize; 2];
    for blk in 0..BLOCKS {
        let (wq, zq) = if blk % 2 == 0 { (0, 0) } else { (0, 1) };
        // Sector 3 gets data; sectors 4-7 (the rest of the block) get zeros.
        let sector = |s: u64| (blk * 8 + s) * 512;
        c.queues[wq].write(sector(3), ptr, 512, blk as usize, ReqFlags::empty());
        c.queues[zq].write_zeroes(sector(4), 4 * 512, blk as usize, ReqFlags::empty());
        submitted[wq] += 1;
        submitted[zq] += 1;
    }
    kick_and_complete(&mut c, submitted);
    // Sectors 0-2 keep their old bytes, 3 has the write, 4-7 are zeros.
    let want = |_, s| match s {
        0..=2 => 0xee,
        3 => 0x33,
        _ => 0,
    };
    assert_sectors(
        &mut c,
        BLOCKS,
        want,
        "write-zeroes next to read-modify-write",
    );
    drop(c);
    d.assert_alive("after write-zeroes next to read-modify-write");
}

/// WRITE_ZEROES without UNMAP on a block device goes to the kernel's zeroout (fallocate
/// zero-range), not through the page cache as written zeros: the daemon writes (`wchar`) well
/// under 1 MiB for 64 MiB of zeros, and they read back as zeros on both engines.
#[test]
fn write_zeroes_on_a_block_device_are_not_written_as_data() {
    let dir = TestDir::new("blk-zeroes");
    let backing = create_image(&dir.join("backing.img"), 64 * MIB);
    let lo = Loop::new(&backing, 512).expect("losetup (needs root)");
    for engine in ["direct", "sync"] {
        let d = Daemon::start(&dir, &lo.dev, &["--engine", engine]);
        let mut c = Client::connect(d.socket.as_ref().unwrap());
        let data = pattern(5, 64 * 1024);
        for off in [0, 63 * MIB] {
            c.write_data(0, off, &data);
        }
        c.q(0).flush().unwrap_or_else(|e| panic!("flush: {e}"));
        let before = proc_io(d.pid(), "wchar");
        c.q(0)
            .write_zeroes(0, 64 * MIB, ReqFlags::NO_UNMAP)
            .unwrap_or_else(|e| panic!("{engine}: write_zeroes: {e}"));
        let written = proc_io(d.pid(), "wchar") - before;
        assert!(
            written < MIB,
            "{engine}: 64 MiB of WRITE_ZEROES made the daemon write {written} bytes"
        );
        for off in [0, 63 * MIB] {
            let back = c.read_data(0, off, data.len());
            assert!(back.iter().all(|&b| b == 0), "{engine}: zeros at {off}");
        }
    }
}

/// A block device whose queue takes discards gets DISCARD: on a loop device it reaches the
/// backing file as holes. On a 4096-byte-sector device a range that is not block-aligned still
/// succeeds, and its aligned interior is deallocated.
#[test]
fn discard_on_a_block_device_deallocates() {
    use std::os::unix::fs::MetadataExt;
    let dir = TestDir::new("blk-discard");
    for sector in [512u32, 4096] {
        let backing = create_image_random(&dir.join(&format!("backing-{sector}.img")), 64 * MIB, 9);
        let allocated = || std::fs::metadata(&backing).expect("backing").blocks() * 512;
        let lo = Loop::new(&backing, sector).expect("losetup (needs root)");
        let d = Daemon::start(&dir, &lo.dev, &[]);
        assert!(
            d.stderr().contains("discard on"),
            "{sector}: a loop device takes discards:\n{}",
            d.stderr()
        );
        let mut c = Client::connect(d.socket.as_ref().unwrap());
        let before = allocated();
        // 32 MiB from 8 MiB + 3 sectors: on the 4 KiB device, head and tail are partial blocks.
        let (off, len) = (8 * MIB + 3 * 512, 32 * MIB);
        c.q(0)
            .discard(off, len)
            .unwrap_or_else(|e| panic!("{sector}: discard: {e}"));
        c.q(0).flush().unwrap_or_else(|e| panic!("flush: {e}"));
        let freed = before - allocated();
        assert!(
            freed >= len - 2 * 4096 - 64 * 1024,
            "{sector}: discarding {len} bytes freed {freed} bytes of the backing file"
        );
        // The partial blocks around the range keep their data.
        let back = c.read_data(0, 8 * MIB, 3 * 512);
        let want =
            std::fs::read(&backing).expect("backing")[8 * MIB as usize..][..3 * 512].to_vec();
        assert_bytes_eq(&back, &want, "sectors before the discarded range");
    }
}

/// A device whose queue takes write-zeroes but no discards is offered DISCARD too, and on
/// Linux 6.x both the plain discard and the punch-hole fallback can refuse it (a loop device
/// with `discard_max_bytes` set to 0 does). A discard is a hint, so the guest must still get
/// OK, and the range must read back as its data or as zeros, never anything else.
#[test]
fn discard_is_a_hint_where_the_device_refuses_it() {
    let dir = TestDir::new("blk-nodiscard");
    let backing = create_image_random(&dir.join("backing.img"), 64 * MIB, 21);
    // The limit cannot be set back: the test gets a device of its own, removed afterwards.
    let lo = Loop::made(&backing, 512);
    let name = lo
        .dev
        .file_name()
        .expect("loop name")
        .to_string_lossy()
        .into_owned();
    let limit = format!("/sys/block/{name}/queue/discard_max_bytes");
    std::fs::write(&limit, "0").unwrap_or_else(|e| panic!("writing 0 to {limit}: {e}"));
    for engine in ["sync", "direct"] {
        let d = Daemon::start(&dir, &lo.dev, &["--engine", engine]);
        assert!(
            d.stderr().contains("discard on"),
            "{engine}: write-zeroes alone should offer DISCARD:\n{}",
            d.stderr()
        );
        let mut c = Client::connect(d.socket.as_ref().unwrap());
        let (off, len) = (4 * MIB, 8 * MIB);
        let old = c.read_data(0, off, len as usize);
        c.q(0)
            .flush()
            .unwrap_or_else(|e| panic!("{engine}: flush: {e}"));
        c.q(0)
            .discard(off, len)
            .unwrap_or_else(|e| panic!("{engine}: discard refused by the device: {e}"));
        let back = c.read_data(1, off, len as usize);
        for (i, (b, o)) in back.chunks(512).zip(old.chunks(512)).enumerate() {
            assert!(
                b == o || b.iter().all(|&x| x == 0),
                "{engine}: sector {i} of the discarded range is neither its data nor zeros"
            );
        }
        assert!(
            d.stderr().contains("the device refuses discards"),
            "{engine}: the device should have refused the discard:\n{}",
            d.stderr()
        );
        d.assert_alive("after a refused discard");
    }
}

/// A counter from /proc/PID/io.
fn proc_io(pid: i32, key: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/io:\n{io}"))
}

/// `--cpu-affinity`: each queue's worker thread runs only on its CPU from the list.
#[test]
fn cpu_affinity_pins_queue_workers() {
    let dir = TestDir::new("affinity");
    let img = create_image(&dir.join("disk.img"), 16 * MIB);
    let d = Daemon::start(&dir, &img, &["--cpu-affinity", "0"]);
    let mut c = Client::connect(d.socket.as_ref().unwrap());
    // Workers pin themselves on their first kick: do I/O on both queues.
    roundtrip(&mut c, 31);
    let mut workers = 0;
    for t in std::fs::read_dir(format!("/proc/{}/task", d.pid())).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if comm.trim() != "vring_worker" {
            continue;
        }
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        // Only workers that served I/O have pinned themselves; both queues did.
        if cpus == "0" {
            workers += 1;
        }
    }
    assert_eq!(workers, 2, "both queue workers must be pinned to CPU 0");
}
