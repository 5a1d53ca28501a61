//! The sync engine's mapped reads and writes on tmpfs (src/engine/mapped.rs), through the real
//! daemon and libblkio: data stays right in both directions, a sparse image stays sparse (a
//! fault on a hole would allocate it), discarded pages stay deallocated, and truncating the
//! image under a running daemon fails reads and writes with an error instead of killing it
//! with SIGBUS.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// An image file on /dev/shm (tmpfs), removed on drop. `None` where there is no /dev/shm.
struct ShmImage(PathBuf);

impl ShmImage {
    fn new(tag: &str) -> Option<ShmImage> {
        let dir = Path::new("/dev/shm");
        if !dir.is_dir() {
            eprintln!("skipping: no /dev/shm");
            return None;
        }
        Some(ShmImage(dir.join(format!(
            "vublk-it-map-{}-{tag}.img",
            std::process::id()
        ))))
    }

    fn allocated(&self) -> u64 {
        std::fs::metadata(&self.0).unwrap().blocks() * 512
    }
}

impl Drop for ShmImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A 16 MiB image of random data on tmpfs, with its test dir; `None` without /dev/shm.
fn random_image(tag: &str, seed: u64) -> Option<(ShmImage, TestDir, PathBuf)> {
    let shm = ShmImage::new(tag)?;
    let dir = TestDir::new(&format!("map-{tag}"));
    let img = create_image_random(&shm.0, 16 * MIB, seed);
    Some((shm, dir, img))
}

fn start(dir: &TestDir, img: &Path) -> (Daemon, Client) {
    let d = Daemon::start(dir, img, &["--engine", "sync"]);
    let c = Client::connect(d.socket.as_ref().unwrap());
    let log = d.stderr();
    assert!(
        log.contains("reading and writing through a mapping of the image"),
        "the sync engine must map an image on tmpfs:\n{log}"
    );
    (d, c)
}

/// Someone on the host shrinks the image under the daemon to `len` bytes.
fn truncate_under(img: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// The request that touched the gone part of the mapping failed; the daemon lived and said why.
#[track_caller]
fn assert_fault_survived(d: &Daemon, r: IoResult, what: &str) {
    assert!(r.is_err(), "{what} past the new end must fail");
    assert!(d.is_alive(), "the daemon must survive the fault");
    assert!(
        d.stderr().contains("image changed under its mapping"),
        "the fault must be logged:\n{}",
        d.stderr()
    );
}

#[test]
fn reads_match_the_file_and_a_sparse_image_stays_sparse() {
    let Some(shm) = ShmImage::new("sparse") else {
        return;
    };
    let dir = TestDir::new("map-sparse");
    let img = create_image(&shm.0, 32 * MIB);
    let (_d, mut c) = start(&dir, &img);

    // Written data reads back (pages written after start-up join the page map).
    let data = pattern(7, (MIB + 4096) as usize);
    c.write_data(0, 8 * MIB + 512, &data);
    for _ in 0..2 {
        let back = c.read_data(0, 8 * MIB + 512, data.len());
        assert_bytes_eq(&back, &data, "written range");
    }
    let before = shm.allocated();

    // Reading the whole device (mostly holes) must not allocate it.
    let file = std::fs::read(&img).unwrap();
    for off in (0..32 * MIB).step_by(MIB as usize) {
        let got = c.read_data(0, off, MIB as usize);
        let want = &file[off as usize..(off + MIB) as usize];
        assert_bytes_eq(&got, want, &format!("device at {off}"));
    }
    let after = shm.allocated();
    assert!(
        after <= before,
        "reading holes allocated the image: {before} -> {after} bytes"
    );
    assert!(
        after < 2 * MIB + 64 * 1024,
        "only the written pages are allocated: {after}"
    );
}

#[test]
fn discarded_pages_read_as_zeros_and_stay_deallocated() {
    let Some((shm, dir, img)) = random_image("discard", 3) else {
        return;
    };
    let (_d, mut c) = start(&dir, &img);
    let full = shm.allocated();

    // Read through the mapping first, so the pages are known to it.
    let want = std::fs::read(&img).unwrap();
    let got = c.read_data(0, 4 * MIB, 4 * MIB as usize);
    assert_bytes_eq(
        &got,
        &want[4 * MIB as usize..8 * MIB as usize],
        "before discard",
    );

    c.q(0)
        .discard(4 * MIB, 4 * MIB)
        .unwrap_or_else(|e| panic!("discard: {e}"));
    let freed = shm.allocated();
    assert!(
        freed + 4 * MIB <= full,
        "discard freed nothing: {full} -> {freed}"
    );
    let got = c.read_data(0, 4 * MIB, 4 * MIB as usize);
    assert!(
        got.iter().all(|&b| b == 0),
        "discarded range must read as zeros"
    );
    assert_eq!(
        shm.allocated(),
        freed,
        "reading discarded pages allocated them again"
    );
    // The rest is untouched.
    let got = c.read_data(0, 8 * MIB, MIB as usize);
    assert_bytes_eq(
        &got,
        &want[8 * MIB as usize..9 * MIB as usize],
        "after discard",
    );
}

#[test]
fn truncating_the_image_under_the_daemon_fails_reads_instead_of_crashing() {
    let Some((_shm, dir, img)) = random_image("trunc", 5) else {
        return;
    };
    let want = std::fs::read(&img).unwrap();
    let (d, mut c) = start(&dir, &img);
    let got = c.read_data(0, 12 * MIB, 4096);
    assert_bytes_eq(
        &got,
        &want[12 * MIB as usize..][..4096],
        "before truncation",
    );

    // The mapping past 8 MiB is gone.
    truncate_under(&img, 8 * MIB);
    let r = c.q(0).read(12 * MIB, 0, 4096);
    assert_fault_survived(&d, r, "a read");
    // What is left still reads correctly (now through preadv2).
    let got = c.read_data(0, MIB, 64 * 1024);
    assert_bytes_eq(&got, &want[MIB as usize..][..64 * 1024], "after truncation");
    assert!(
        c.q(0).read(12 * MIB, 0, 4096).is_err(),
        "still past the end"
    );
    assert!(d.is_alive());
}

#[test]
fn writes_through_the_mapping_reach_the_file() {
    let Some((shm, dir, img)) = random_image("write", 9) else {
        return;
    };
    let mut want = std::fs::read(&img).unwrap();
    let (_d, mut c) = start(&dir, &img);
    let full = shm.allocated();

    // Whole pages, a lone sector, a write straddling a page boundary, and the last page:
    // every byte must land in the file, and nothing else may change.
    let writes: [(u64, usize); 4] = [
        (3 * MIB, 64 * 1024),
        (5 * MIB + 512, 512),
        (7 * MIB + 4096 - 1024, 3072),
        (16 * MIB - 4096, 4096),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(40 + i as u64, len);
        c.write_data(0, off, &data);
        want[off as usize..off as usize + len].copy_from_slice(&data);
    }
    let file = std::fs::read(&img).unwrap();
    assert_bytes_eq(&file, &want, "image file after writes");
    for off in (0..16 * MIB).step_by(MIB as usize) {
        let dev = c.read_data(0, off, MIB as usize);
        let w = &want[off as usize..(off + MIB) as usize];
        assert_bytes_eq(&dev, w, &format!("device at {off} after writes"));
    }
    assert_eq!(
        shm.allocated(),
        full,
        "overwrites must not change allocation"
    );
}

#[test]
fn truncating_the_image_under_the_daemon_fails_writes_instead_of_crashing() {
    let Some((_shm, dir, img)) = random_image("trunc-w", 11) else {
        return;
    };
    let want = std::fs::read(&img).unwrap();
    let (d, mut c) = start(&dir, &img);
    truncate_under(&img, 8 * MIB);

    // pwritev2 would quietly extend the file here; through the mapping the page is gone.
    c.buf(0, 4096).fill(0xab);
    let r = c.q(0).write(12 * MIB, 0, 4096, blkio::ReqFlags::empty());
    assert_fault_survived(&d, r, "a write");
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        8 * MIB,
        "the failed write must not reach the file"
    );
    // The rest is still served (now by preadv2/pwritev2).
    let data = pattern(77, 8192);
    c.write_data(0, MIB, &data);
    let file = std::fs::read(&img).unwrap();
    assert_bytes_eq(
        &file[MIB as usize..][..8192],
        &data,
        "write after truncation",
    );
    assert_bytes_eq(
        &file[2 * MIB as usize..][..4096],
        &want[2 * MIB as usize..][..4096],
        "untouched data",
    );
    assert!(d.is_alive());
}

/// The daemon's RssShmem (the image pages it has mapped in), in bytes.
fn rss_shmem(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("RssShmem in /proc/PID/status");
    kib * 1024
}

#[test]
fn allocated_pages_are_prefaulted_and_holes_stay_holes() {
    use std::os::unix::fs::FileExt;
    let Some(shm) = ShmImage::new("prefault") else {
        return;
    };
    let dir = TestDir::new("map-prefault");
    let img = create_image(&shm.0, 32 * MIB);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for (off, seed) in [(MIB, 1), (20 * MIB + 4096, 2)] {
        f.write_at(&pattern(seed, (2 * MIB) as usize), off).unwrap();
    }
    drop(f);
    let before = shm.allocated();
    assert!((4 * MIB..5 * MIB).contains(&before), "{before}");

    // No I/O at all: only the prefault thread can put the image's pages in the daemon's RSS.
    let d = Daemon::start(&dir, &img, &["--engine", "sync", "--log-level", "debug"]);
    let finished = poll_until(Duration::from_secs(20), || {
        d.stderr().contains("prefaulted ").then_some(())
    });
    assert!(finished.is_some(), "no prefault:\n{}", d.stderr());
    // Faulting a hole in would have allocated it.
    assert_eq!(shm.allocated(), before, "prefaulting allocated holes");
    let rss = rss_shmem(d.pid());
    assert!(
        (4 * MIB..5 * MIB).contains(&rss),
        "RssShmem {rss}: want the 4 MiB of data mapped in, and no holes"
    );
    assert!(d.stderr().contains("prefaulted 4 MiB"), "{}", d.stderr());
}
