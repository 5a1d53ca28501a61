//! Connection and process lifecycle: reconnects, killed clients, SIGTERM, `--fd`, stale sockets.

mod common;

use blkio::ReqFlags;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Successive clients on the same socket each see their predecessor's data.
#[test]
fn reconnect_sees_previous_data() {
    let dir = TestDir::new("reconnect");
    let img = create_image(&dir.join("disk.img"), 16 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();

    let mut prev: Option<(u64, Vec<u8>)> = None;
    for round in 0..5u64 {
        let mut c = Client::connect(&sock);
        if let Some((off, data)) = &prev {
            for q in 0..2 {
                assert_bytes_eq(
                    &c.read_data(q, *off, data.len()),
                    data,
                    &format!(
                        "client {round} reading client {}'s data via queue {q}",
                        round - 1
                    ),
                );
            }
        }
        let off = round * 2 * MIB + 512 * round;
        let data = pattern(round + 100, 256 * 1024);
        c.write_data((round % 2) as usize, off, &data);
        prev = Some((off, data));
        drop(c);
        d.assert_alive(&format!("after client {round} disconnected"));
    }
    let (off, data) = prev.unwrap();
    assert_bytes_eq(
        &read_file_at(&img, off, data.len()),
        &data,
        "last client's data in the file",
    );
}

/// Many short sessions, each issuing its very first request right after mapping its buffer
/// (libblkio adds the buffer region with ADD_MEM_REG while the rings already run): that request
/// must see the new memory table on whichever queue it lands.
#[test]
fn rapid_reconnects_first_request_sees_new_memory() {
    const SESSIONS: u64 = 1000;
    let dir = TestDir::new("rapid");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();
    let sock2 = sock.clone();
    // The window is a worker preempted mid-kick; contend for the (two) CPUs to widen it.
    let stop = Arc::new(AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let failures = with_timeout(Duration::from_secs(120), "short sessions", move || {
        let mut failures = Vec::new();
        for i in 0..SESSIONS {
            let mut c = Client::connect(&sock2);
            let q = (i % 2) as usize;
            let off = (i % 64) * 4096;
            c.buf(0, 4096).copy_from_slice(&pattern(i, 4096));
            if let Err(e) = c.q(q).write(off, 0, 4096, ReqFlags::empty()) {
                failures.push(format!(
                    "session {i}: first request on queue {q} (write): {e}"
                ));
                continue;
            }
            // the first request on the other queue
            c.buf(8192, 4096).fill(0xA5);
            if let Err(e) = c.q(1 - q).read(off, 8192, 4096) {
                failures.push(format!(
                    "session {i}: first request on queue {} (read): {e}",
                    1 - q
                ));
                continue;
            }
            assert_bytes_eq(
                c.buf(8192, 4096),
                &pattern(i, 4096),
                &format!("session {i} read-back"),
            );
        }
        failures
    });
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} of {SESSIONS} sessions had a failing first request on a queue:\n{}",
        failures.len(),
        failures.join("\n")
    );
    d.assert_alive("after the sessions");
}

/// A client that connects while another is being served gets served once the first leaves.
#[test]
fn waiting_client_served_after_first_leaves() {
    let dir = TestDir::new("waiting");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();

    let mut first = Client::connect(&sock);
    let data = pattern(5, 64 * 1024);
    first.write_data(0, MIB, &data);

    let (tx, rx) = mpsc::channel();
    let sock2 = sock.clone();
    let waiter = std::thread::spawn(move || {
        let mut second = Client::connect(&sock2);
        let got = second.read_data(1, MIB, 64 * 1024);
        tx.send(()).unwrap();
        got
    });
    // Give the second client a moment to queue up behind the first (not needed for correctness).
    let early = rx.recv_timeout(Duration::from_millis(300)).is_ok();
    eprintln!("second client served while the first was still connected: {early}");
    drop(first);
    if !early {
        rx.recv_timeout(IO_TIMEOUT + Duration::from_secs(5))
            .expect("second client not served within the timeout after the first disconnected");
    }
    let got = waiter.join().expect("second client failed");
    assert_bytes_eq(&got, &data, "second client reading the first one's data");
    d.assert_alive("after two clients");
}

const CHILD_ENV: &str = "VUBLK_TEST_CHILD_SOCKET";
const CHILD_MARK: &str = "VUBLK-CHILD-INFLIGHT";
const CHILD_DATA_OFF: u64 = 512 * 1024;

/// Not a test on its own: when [`CHILD_ENV`] is set this runs as a separate libblkio client
/// process (re-executed by `killed_client_then_new_client`) that writes known data, leaves
/// requests in flight on both queues and waits to be SIGKILLed.
#[test]
fn killed_client_child() {
    let Some(sock) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut c = Client::connect(Path::new(&sock));
    let data = pattern(42, 256 * 1024);
    c.write_data(0, CHILD_DATA_OFF, &data);
    c.q(1)
        .flush()
        .unwrap_or_else(|e| panic!("child flush: {e}"));
    // Keep both queues busy until killed; report after the first round.
    let mem = c.mem;
    for round in 0u64.. {
        for (qi, q) in c.queues.iter_mut().enumerate() {
            for i in 0..32usize {
                let dev = 2 * MIB + (qi as u64 * 32 + i as u64) * 64 * 1024;
                let buf = mem.ptr(qi * 2 * MIB as usize + i * 65536, 65536);
                if i % 3 == 2 {
                    q.read(dev, buf, 65536, i, ReqFlags::empty());
                } else {
                    q.write(dev, buf, 65536, i, ReqFlags::empty());
                }
            }
            kick(q);
        }
        for q in c.queues.iter_mut() {
            for comp in wait_completions(q, 32) {
                completion_to_result(&comp).unwrap_or_else(|e| panic!("child I/O: {e}"));
            }
        }
        if round == 0 {
            println!("{CHILD_MARK}");
            std::io::stdout().flush().unwrap();
        }
    }
    panic!("child client was not killed");
}

/// A client process SIGKILLed with requests in flight must not take the daemon down; the next
/// client is served and sees the killed client's completed writes.
#[test]
fn killed_client_then_new_client() {
    let dir = TestDir::new("killed");
    let img = create_image(&dir.join("disk.img"), 16 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();
    let exe = std::env::current_exe().unwrap();

    for round in 0..2 {
        let mut child = Command::new(&exe)
            .args([
                "killed_client_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("re-executing the test binary as a client");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(CHILD_MARK) {
                    let _ = tx.send(());
                }
            }
        });
        let marked = rx.recv_timeout(Duration::from_secs(30));
        let _ = child.kill();
        let status = child.wait().unwrap();
        assert!(
            marked.is_ok(),
            "round {round}: client child never reported requests in flight (exit {status})"
        );
        d.assert_alive(&format!(
            "round {round}: after its client was SIGKILLed mid-I/O"
        ));

        let sock2 = sock.clone();
        let got = with_timeout(
            Duration::from_secs(60),
            "client after a killed client",
            move || {
                let mut c = Client::connect(&sock2);
                let got = c.read_data(1, CHILD_DATA_OFF, 256 * 1024);
                let fresh = pattern(7, 64 * 1024);
                c.write_data(0, 12 * MIB, &fresh);
                assert_bytes_eq(&c.read_data(1, 12 * MIB, fresh.len()), &fresh, "fresh data");
                got
            },
        );
        assert_bytes_eq(
            &got,
            &pattern(42, 256 * 1024),
            &format!("round {round}: killed client's flushed data"),
        );
        d.assert_alive(&format!("round {round}: after the next client"));
    }
}

#[track_caller]
fn assert_exit_zero(status: std::process::ExitStatus, d: &Daemon, what: &str) {
    assert_eq!(
        status.code(),
        Some(0),
        "{what}: expected exit code 0, got {}; stderr:\n{}",
        describe_status(status),
        d.stderr()
    );
}

#[test]
fn sigterm_idle() {
    let dir = TestDir::new("term-idle");
    let img = create_image(&dir.join("disk.img"), 4 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();
    assert!(exists(&sock), "socket file missing after READY=1");
    let status = d.terminate();
    assert_exit_zero(status, &d, "SIGTERM while idle");
    assert!(
        !exists(&sock),
        "socket file {} left behind after SIGTERM",
        sock.display()
    );
}

#[test]
fn sigterm_idle_after_a_client_left() {
    let dir = TestDir::new("term-after");
    let img = create_image(&dir.join("disk.img"), 4 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();
    let mut c = Client::connect(&sock);
    c.write_data(0, 0, &pattern(1, 4096));
    drop(c);
    let status = d.terminate();
    assert_exit_zero(status, &d, "SIGTERM after a client disconnected");
    assert!(!exists(&sock), "socket file left behind after SIGTERM");
}

/// A frontend that sent half a message and went quiet must not hold up SIGTERM.
#[test]
fn sigterm_with_a_half_sent_message() {
    let dir = TestDir::new("term-half");
    let img = create_image(&dir.join("disk.img"), 4 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();
    let mut s = UnixStream::connect(&sock).unwrap();
    // GET_FEATURES header, then the first 4 bytes of a SET_FEATURES header.
    s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    s.write_all(&[2, 0, 0, 0]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let status = d.terminate();
    assert_exit_zero(status, &d, "SIGTERM with a half-sent message");
    assert!(!exists(&sock), "socket file left behind after SIGTERM");
}

#[test]
fn sigterm_with_client_connected() {
    let dir = TestDir::new("term-conn");
    let img = create_image(&dir.join("disk.img"), 4 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();
    let mut c = Client::connect(&sock);
    let data = pattern(3, 64 * 1024);
    c.write_data(1, 0, &data);
    c.q(0).flush().unwrap_or_else(|e| panic!("flush: {e}"));
    let status = d.terminate();
    assert_exit_zero(status, &d, "SIGTERM with a client connected");
    assert!(!exists(&sock), "socket file left behind after SIGTERM");
    drop(c);
    assert_bytes_eq(
        &read_file_at(&img, 0, data.len()),
        &data,
        "flushed data survives SIGTERM",
    );
}

/// Keeps queue `q` busy with 16 x 64 KiB writes per round until `stop` is set or a request
/// fails/times out (as it will once the daemon is gone); counts completed rounds.
fn io_loop(q: &mut blkio::Blkioq, mem: Mem, stop: &AtomicBool, rounds: &AtomicUsize) {
    use std::mem::MaybeUninit;
    let mut slots: Vec<MaybeUninit<blkio::Completion>> =
        (0..16).map(|_| MaybeUninit::uninit()).collect();
    while !stop.load(Ordering::Relaxed) {
        for i in 0..16usize {
            let dev = (i as u64) * 64 * 1024;
            q.write(dev, mem.ptr(i * 65536, 65536), 65536, i, ReqFlags::empty());
        }
        let mut done = 0;
        while done < 16 {
            let mut t = Duration::from_secs(2);
            match q.do_io(&mut slots[..16 - done], 1, Some(&mut t), None) {
                Ok(n) => {
                    for s in &slots[..n] {
                        // SAFETY: do_io initialised the first n slots.
                        if unsafe { s.assume_init_read() }.ret != 0 {
                            return;
                        }
                    }
                    done += n;
                }
                Err(_) => return,
            }
        }
        rounds.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn sigterm_with_io_in_flight() {
    let dir = TestDir::new("term-io");
    let img = create_image(&dir.join("disk.img"), 16 * MIB);
    let d = Daemon::start(&dir, &img, &[]);
    let sock = d.socket.clone().unwrap();
    let mut c = Client::connect(&sock);
    let mem = c.mem;
    let stop = AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    let status = std::thread::scope(|s| {
        let (q0, rest) = c.queues.split_first_mut().unwrap();
        let q1 = &mut rest[0];
        let (stop, rounds) = (&stop, &rounds);
        s.spawn(move || io_loop(q0, mem, stop, rounds));
        s.spawn(move || {
            io_loop(
                q1,
                Mem {
                    addr: mem.addr + 2 * MIB as usize,
                    len: 2 * MIB as usize,
                },
                stop,
                rounds,
            )
        });
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        while rounds.load(Ordering::Relaxed) < 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "I/O loops made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = d.terminate();
        stop.store(true, Ordering::Relaxed);
        status
    });
    assert_exit_zero(status, &d, "SIGTERM with requests in flight");
    assert!(!exists(&sock), "socket file left behind after SIGTERM");
}

/// `--fd N`: serve an already-listening socket inherited from the parent.
#[test]
fn fd_mode() {
    let dir = TestDir::new("fd");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let sock = dir.join("passed.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut args = os_args(&[
        "--fd".as_ref(),
        fd.to_string().as_ref(),
        "--blk-file".as_ref(),
        img.as_os_str(),
        "--num-queues".as_ref(),
        "2".as_ref(),
    ]);
    args.extend(env_test_args());
    let mut d = Daemon::spawn(Spawn {
        dir: &dir,
        name: "vublk",
        args,
        pass_fd: Some(fd),
        socket: None,
        stop_reading_notify_after_ready: false,
        deny_io_uring: false,
    });
    d.wait_ready(READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // The daemon owns the socket now; our copy is no longer needed.
    drop(listener);

    let data = pattern(11, 128 * 1024);
    let mut c = Client::connect(&sock);
    c.write_data(0, MIB, &data);
    drop(c);
    let mut c = Client::connect(&sock);
    assert_bytes_eq(
        &c.read_data(1, MIB, data.len()),
        &data,
        "second client over the passed fd",
    );
    drop(c);
    let status = d.terminate();
    assert_exit_zero(status, &d, "SIGTERM in --fd mode");
    eprintln!(
        "--fd mode: socket file {} after exit",
        if exists(&sock) {
            "still present"
        } else {
            "removed"
        }
    );
}

/// A service manager that stops reading NOTIFY_SOCKET (stalled systemd, full datagram queue)
/// must not freeze the daemon: sd_notify has to be fire-and-forget (non-blocking send).
#[test]
fn stalled_notify_socket_does_not_block_daemon() {
    let dir = TestDir::new("notify-stall");
    let img = create_image(&dir.join("disk.img"), 4 * MIB);
    let sock = dir.join("vublk.sock");
    let mut args = os_args(&[
        "--socket-path".as_ref(),
        sock.as_os_str(),
        "--blk-file".as_ref(),
        img.as_os_str(),
        "--num-queues".as_ref(),
        "2".as_ref(),
    ]);
    args.extend(env_test_args());
    let mut d = Daemon::spawn(Spawn {
        dir: &dir,
        name: "vublk",
        args,
        pass_fd: None,
        socket: Some(sock.clone()),
        stop_reading_notify_after_ready: true,
        deny_io_uring: false,
    });
    d.wait_ready(READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    // The unix datagram queue holds net.unix.max_dgram_qlen (default 10) messages; go well past.
    let sock2 = sock.clone();
    with_timeout(
        Duration::from_secs(30),
        "40 connect/disconnect cycles",
        move || {
            for i in 0..40u64 {
                let mut c = Client::connect(&sock2);
                let data = pattern(i, 4096);
                c.write_data((i % 2) as usize, i * 4096, &data);
                assert_bytes_eq(
                    &c.read_data(((i + 1) % 2) as usize, i * 4096, 4096),
                    &data,
                    "cycle",
                );
            }
        },
    );
    d.assert_alive("after 40 clients with an unread NOTIFY_SOCKET");
    let status = d.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {}",
        describe_status(status)
    );
}

/// A leftover socket file nobody listens on is replaced.
#[test]
fn stale_socket_file_replaced() {
    let dir = TestDir::new("stale");
    let img = create_image(&dir.join("disk.img"), 4 * MIB);
    let sock: PathBuf = dir.join("vublk.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(exists(&sock));
    assert!(
        UnixStream::connect(&sock).is_err(),
        "stale socket should refuse connections"
    );

    let d = Daemon::start(&dir, &img, &[]);
    let mut c = Client::connect(&sock);
    let data = pattern(9, 4096);
    c.write_data(0, 0, &data);
    assert_bytes_eq(
        &c.read_data(1, 0, 4096),
        &data,
        "I/O on the replaced socket",
    );
    drop(c);
    assert_eq!(d.terminate().code(), Some(0));
}
