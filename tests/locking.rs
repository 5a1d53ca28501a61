//! Image locking: one writer at a time across vublk and QEMU's tools; readers share.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn second(dir: &TestDir, name: &str, img: &std::path::Path, extra: &[&str]) -> Failed {
    let mut args = os_args(&["--socket-path"]);
    args.push(dir.join(&format!("{name}.sock")).into());
    args.push("--blk-file".into());
    args.push(img.into());
    args.extend(os_args(extra));
    run_to_exit(dir, name, &args)
}

#[test]
fn second_writer_is_refused_readers_share_no_lock_overrides() {
    let dir = TestDir::new("lock");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let a = Daemon::start(&dir, &img, &[]);
    let f = second(&dir, "b", &img, &[]);
    assert_clean_failure(&f, "second writer", &["in use by another process"]);
    let f = second(&dir, "c", &img, &["--read-only"]);
    assert_clean_failure(&f, "reader while a writer runs", &["write access"]);
    // --no-lock: the operator takes responsibility.
    let sock = dir.join("d.sock");
    let d = Daemon::start_at(&dir, "d", &sock, &img, &["--no-lock"]);
    assert!(
        d.stderr().contains("--no-lock"),
        "the override must be logged"
    );
    drop(d);
    drop(a);
    // With the writer gone, two readers share the image.
    let r1 = Daemon::start_at(&dir, "r1", &dir.join("r1.sock"), &img, &["--read-only"]);
    let r2 = Daemon::start_at(&dir, "r2", &dir.join("r2.sock"), &img, &["--read-only"]);
    r1.assert_alive("reader 1");
    r2.assert_alive("reader 2");
}

fn qsd(img: &std::path::Path, sock: &std::path::Path) -> Command {
    let mut c = Command::new("qemu-storage-daemon");
    c.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// vublk and qemu-storage-daemon see each other's locks, in both orders.
#[test]
fn locks_interoperate_with_qemu_storage_daemon() {
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("qemu-storage-daemon is needed (scripts/install-deps.sh installs it)");
    }
    let dir = TestDir::new("lock-qsd");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);

    // vublk first: QSD must refuse to open the image for writing.
    let v = Daemon::start(&dir, &img, &[]);
    let out = qsd(&img, &dir.join("q1.sock"))
        .output()
        .expect("run qemu-storage-daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "QSD must not start while vublk writes: {err}"
    );
    assert!(
        err.contains("lock"),
        "QSD should name the lock conflict: {err}"
    );
    drop(v);

    // QSD first: vublk must refuse.
    let qsock = dir.join("q2.sock");
    let mut q = qsd(&img, &qsock)
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let t0 = Instant::now();
    while !exists(&qsock) {
        assert!(
            q.try_wait().unwrap().is_none(),
            "qemu-storage-daemon exited early"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "qemu-storage-daemon did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let f = second(&dir, "v2", &img, &[]);
    let _ = q.kill();
    let _ = q.wait();
    assert_clean_failure(&f, "vublk while QSD writes", &["in use by another process"]);
}
