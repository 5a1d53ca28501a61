//! EIO from the storage: a request touching a failing range gets IOERR, the daemon keeps
//! serving everything else, and the errors are logged without flooding. Device-mapper's
//! `error` target is not available on these machines (no dm in the kernel), so the fault comes
//! from the test-only `fault-injection` engine wrapper: run with
//! `cargo test --features fault-injection --test faults_eio`.
#![cfg(feature = "fault-injection")]

mod common;

use blkio::ReqFlags;
use common::*;

#[test]
fn eio_range_fails_requests_not_the_daemon() {
    // SAFETY: this test binary has this single test, so no other thread reads the environment
    // concurrently; the daemon child inherits the variable.
    unsafe { std::env::set_var("VUBLK_FAULT_EIO", format!("{}-{}", MIB, 2 * MIB)) };
    for engine in ["sync", "direct"] {
        let dir = TestDir::new(&format!("eio-{engine}"));
        let img = create_image_random(&dir.join("disk.img"), 8 * MIB, 5);
        let d = Daemon::start(&dir, &img, &["--engine", engine]);
        let mut c = Client::connect(d.socket.as_ref().unwrap());
        for i in 0..3000u64 {
            let q = (i % 2) as usize;
            let e = c.q(q).read(MIB + (i % 256) * 4096, 0, 4096);
            assert_eq!(
                e.map_err(|e| e.ret),
                Err(-libc::EIO),
                "{engine}: read in the bad range"
            );
        }
        let e = c.q(0).write(MIB + 512, 0, 4096, ReqFlags::empty());
        assert_eq!(
            e.map_err(|e| e.ret),
            Err(-libc::EIO),
            "{engine}: write in the bad range"
        );
        // Outside the range everything still works.
        let data = pattern(9, 64 * 1024);
        c.write_data(1, 4 * MIB, &data);
        assert_bytes_eq(
            &c.read_data(0, 4 * MIB, data.len()),
            &data,
            "outside the bad range",
        );
        d.assert_alive("after 3001 I/O errors");
        let log = d.stderr();
        let lines = log.lines().filter(|l| l.contains("I/O error")).count();
        assert!(lines >= 2, "{engine}: errors must be logged:\n{log}");
        assert!(
            lines <= 25,
            "{engine}: 3001 errors flooded the log with {lines} lines"
        );
    }
}
