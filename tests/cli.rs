//! Command-line errors: each must end the process with a non-zero exit code and exactly one
//! clear line on stderr (no panic, no backtrace), and leave no socket file behind.

mod common;

use common::*;
use std::ffi::OsString;
use std::path::Path;

fn args(sock: &Path, image: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "--socket-path".into(),
        sock.into(),
        "--blk-file".into(),
        image.into(),
    ];
    v.extend(extra.iter().map(OsString::from));
    v
}

#[test]
fn help_works() {
    let out = std::process::Command::new(VUBLK)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "--help failed: {:?}", out);
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--socket-path",
        "--blk-file",
        "--read-only",
        "--num-queues",
        "--fd",
    ] {
        assert!(text.contains(opt), "--help does not mention {opt}:\n{text}");
    }
}

#[test]
fn missing_image() {
    let dir = TestDir::new("cli-missing");
    let sock = dir.join("vublk.sock");
    let img = dir.join("no-such.img");
    let f = run_to_exit(&dir, "vublk", &args(&sock, &img, &[]));
    assert_clean_failure(&f, "missing image", &[img.to_str().unwrap()]);
    assert!(!exists(&sock), "socket file left behind");
}

#[test]
fn directory_as_image() {
    let dir = TestDir::new("cli-dir");
    let sock = dir.join("vublk.sock");
    let img = dir.join("a-directory");
    std::fs::create_dir(&img).unwrap();
    let f = run_to_exit(&dir, "vublk", &args(&sock, &img, &[]));
    assert_clean_failure(&f, "directory as image", &[img.to_str().unwrap()]);
    assert!(!exists(&sock), "socket file left behind");
}

#[test]
fn socket_directory_missing() {
    let dir = TestDir::new("cli-nosockdir");
    let img = create_image(&dir.join("disk.img"), MIB);
    let sock = dir.join("no-such-dir").join("vublk.sock");
    let f = run_to_exit(&dir, "vublk", &args(&sock, &img, &[]));
    assert_clean_failure(&f, "socket directory missing", &["no-such-dir"]);
}

#[test]
fn image_size_not_multiple_of_block_size() {
    let dir = TestDir::new("cli-size");
    let sock = dir.join("vublk.sock");

    let img = create_image(&dir.join("odd.img"), MIB + 100);
    let f = run_to_exit(&dir, "vublk", &args(&sock, &img, &[]));
    assert_clean_failure(
        &f,
        "image of 1 MiB + 100 bytes",
        &["size|block|multiple|512"],
    );
    assert!(!exists(&sock), "socket file left behind");

    let img = create_image(&dir.join("odd4k.img"), MIB + 512);
    let f = run_to_exit(
        &dir,
        "vublk-4k",
        &args(&sock, &img, &["--logical-block-size", "4096"]),
    );
    assert_clean_failure(
        &f,
        "image of 1 MiB + 512 bytes with --logical-block-size 4096",
        &["size|block|multiple|4096"],
    );
    assert!(!exists(&sock), "socket file left behind");
}

/// A second daemon on the socket of a live one fails cleanly and leaves the first one's socket
/// alone.
#[test]
fn second_daemon_on_same_socket() {
    let dir = TestDir::new("cli-second");
    let img = create_image(&dir.join("disk.img"), 4 * MIB);
    let img2 = create_image(&dir.join("disk2.img"), 4 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();

    let f = run_to_exit(
        &dir,
        "vublk-second",
        &args(&sock, &img2, &["--num-queues", "2"]),
    );
    assert_clean_failure(
        &f,
        "second daemon on the same socket",
        &[sock.to_str().unwrap()],
    );
    d.assert_alive("after a second daemon tried its socket");
    assert!(
        exists(&sock),
        "the second daemon removed the first one's socket file"
    );

    let mut c = Client::connect(&sock);
    let data = pattern(1, 4096);
    c.write_data(0, 0, &data);
    c.q(0).flush().unwrap_or_else(|e| panic!("flush: {e}"));
    assert_bytes_eq(
        &read_file_at(&img, 0, 4096),
        &data,
        "first daemon still serves its image",
    );
    assert_zeros(&read_file_at(&img2, 0, 4096), "second image untouched");
}

/// Invalid option values are rejected (non-zero exit, no panic, no READY=1).
#[test]
fn invalid_option_values() {
    let dir = TestDir::new("cli-values");
    let sock = dir.join("vublk.sock");
    let img = create_image(&dir.join("disk.img"), MIB);
    for (i, extra) in [
        &["--num-queues", "0"][..],
        &["--logical-block-size", "1024"][..],
        &["--queue-size", "0"][..],
        &["--engine", "no-such-engine"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let f = run_to_exit(&dir, &format!("vublk-{i}"), &args(&sock, &img, extra));
        let what = format!("{extra:?}");
        assert!(
            matches!(f.status.code(), Some(c) if c != 0),
            "{what}: expected a non-zero exit, got {}; stderr:\n{}",
            describe_status(f.status),
            f.stderr
        );
        assert!(!f.sent_ready, "{what}: sent READY=1");
        assert!(
            !f.stderr.contains("panicked"),
            "{what}: panicked:\n{}",
            f.stderr
        );
        assert!(!exists(&sock), "{what}: socket file left behind");
    }
}
