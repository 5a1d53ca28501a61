//! Real storage faults: ENOSPC from an image on a full filesystem. The guest gets IOERR for
//! the write that did not fit, earlier data stays intact, and the daemon keeps serving.

mod common;

use std::path::Path;

use blkio::ReqFlags;
use common::*;

/// A small filesystem mounted for one test (tmpfs, or ext4 on a loop device). Fields drop in
/// order: the mount, then the device.
struct SmallFs {
    mount: Mount,
    _lo: Option<Loop>,
}

impl SmallFs {
    fn tmpfs(dir: &Path, mib: u64) -> SmallFs {
        SmallFs {
            mount: Mount::tmpfs(dir, mib),
            _lo: None,
        }
    }

    fn ext4(dir: &Path, backing: &Path, mib: u64) -> SmallFs {
        create_image(backing, mib * MIB);
        let lo = Loop::new(backing, 512).expect("losetup (needs root)");
        SmallFs {
            mount: Mount::format("ext4", &lo.dev, dir),
            _lo: Some(lo),
        }
    }
}

/// Fills a sparse 64 MiB image on a 16 MiB filesystem until a write fails.
fn enospc_case(engine: &str, fs: &SmallFs, dir: &TestDir) {
    let img = create_image(&fs.mount.path.join("disk.img"), 64 * MIB);
    let d = Daemon::start(dir, &img, &["--engine", engine]);
    let mut c = Client::connect(d.socket.as_ref().unwrap());
    let first = pattern(7, MIB as usize);
    c.write_data(0, 0, &first);
    c.q(0).flush().unwrap_or_else(|e| panic!("flush: {e}"));
    let chunk = MIB as usize;
    c.buf(0, chunk).copy_from_slice(&pattern(8, chunk));
    let mut failed_at = None;
    for i in 1..64u64 {
        if let Err(e) = c
            .q((i % 2) as usize)
            .write(i * MIB, 0, chunk, ReqFlags::empty())
        {
            assert_eq!(
                e.ret,
                -libc::EIO,
                "a write that does not fit gets IOERR (-EIO)"
            );
            failed_at = Some(i);
            break;
        }
    }
    let at = failed_at.expect("a 16 MiB filesystem cannot hold 64 MiB of writes");
    assert!(at >= 4, "{engine}: ENOSPC came too early, at MiB {at}");
    d.assert_alive("after ENOSPC");
    // Earlier data intact, reads still served on both queues.
    assert_bytes_eq(
        &c.read_data(1, 0, first.len()),
        &first,
        "data written before ENOSPC",
    );
    // Freeing space (discard) lets writes succeed again.
    c.q(0)
        .discard(MIB, (at - 1) * MIB)
        .unwrap_or_else(|e| panic!("discard: {e}"));
    c.q(0)
        .write(at * MIB, 0, chunk, ReqFlags::empty())
        .unwrap_or_else(|e| panic!("write after discard: {e}"));
    assert!(
        d.stderr().contains("I/O error"),
        "the failure is logged:\n{}",
        d.stderr()
    );
}

#[test]
fn enospc_on_tmpfs_sync_engine() {
    let dir = TestDir::new("enospc-tmpfs");
    let fs = SmallFs::tmpfs(&dir.join("fs"), 16);
    enospc_case("sync", &fs, &dir);
}

#[test]
fn enospc_on_ext4_direct_engine() {
    let dir = TestDir::new("enospc-ext4");
    let fs = SmallFs::ext4(&dir.join("fs"), &dir.join("fs.img"), 16);
    enospc_case("direct", &fs, &dir);
}
