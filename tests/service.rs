//! vublk as a service: systemd socket activation (real `systemd-socket-activate` hand-over),
//! readiness only once the socket accepts, watchdog pings, socket permissions, pidfiles and
//! `--config` files.

mod common;
#[path = "common/proc.rs"]
mod proc;

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use proc::{Proc, ProcSpec, SOCKET_ACTIVATE, activator, os, wait_for_path};

fn read_pid(p: &std::path::Path) -> i32 {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("pidfile {}: {e}", p.display()));
    s.trim()
        .parse()
        .unwrap_or_else(|_| panic!("pidfile {} holds {s:?}", p.display()))
}

/// systemd-socket-activate binds the socket, waits for the first connection, then execs vublk
/// with LISTEN_FDS=1/LISTEN_PID: vublk must serve fd 3 without --socket-path or --fd, answer
/// the connection that triggered it, and keep serving later ones.
#[test]
fn socket_activation_hand_over() {
    let dir = TestDir::new("activate");
    let img = create_image(&dir.join("disk.img"), 16 * MIB);
    let sock = dir.join("act.sock");
    let pidfile = dir.join("act.pid");
    let ctl = dir.join("act.ctl");
    let mut args = os(&[
        &"--blk-file",
        &img,
        &"--num-queues",
        &"2",
        &"--pidfile",
        &pidfile,
        &"--control-socket",
        &ctl,
    ]);
    args.extend(env_test_args());
    let notify_env = dir.join("act.notify");
    let mut spec = ProcSpec::new(&dir, "act", args);
    let mut setenv = OsString::from("NOTIFY_SOCKET=");
    setenv.push(&notify_env);
    // systemd-socket-activate passes only the variables named with -E to its child.
    spec.wrapper = vec![
        activator().into(),
        "-l".into(),
        sock.clone().into(),
        "-E".into(),
        setenv,
    ];
    let mut p = Proc::spawn(spec);
    assert!(
        wait_for_path(&sock, Duration::from_secs(10)),
        "{SOCKET_ACTIVATE} did not create {}",
        sock.display()
    );
    // Nothing runs vublk before a client connects.
    assert!(!pidfile.exists());

    let data = pattern(3, 256 * 1024);
    let s2 = sock.clone();
    let d2 = data.clone();
    with_timeout(
        IO_TIMEOUT,
        "first client through the activated socket",
        move || {
            let mut c = Client::connect(&s2);
            c.write_data(0, MIB, &d2);
            assert_bytes_eq(&c.read_data(1, MIB, d2.len()), &d2, "activated socket");
        },
    );
    let ready = p.wait_for_line("READY=1", READY_TIMEOUT);
    assert!(ready.contains("STATUS="), "{ready:?}");
    // The exec'd vublk is the activator's pid (no fork in non-accept mode).
    assert_eq!(read_pid(&pidfile), p.pid());
    let log = p.stderr();
    assert!(log.contains("socket-activated fd 3"), "{log}");

    // The activated socket keeps serving new frontends.
    let mut c = Client::connect(&sock);
    assert_bytes_eq(&c.read_data(0, MIB, data.len()), &data, "second client");
    drop(c);
    let st = vublk::control::fetch_stats(&ctl).unwrap();
    assert_eq!(st.frontends_served, 2);
    assert_eq!(st.total.bytes_written, data.len() as u64);

    p.terminate();
    assert!(p.msgs.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")));
    assert!(!pidfile.exists(), "pidfile left behind");
    assert!(!ctl.exists(), "control socket left behind");
}

/// READY=1 is sent only once the vhost-user socket (and the control socket) accept
/// connections and the pidfile names the daemon: a client that connects the moment READY=1
/// arrives must get through.
#[test]
fn ready_only_after_socket_accepts() {
    for engine in ["sync", "direct"] {
        let dir = TestDir::new(&format!("ready-{engine}"));
        let img = create_image(&dir.join("disk.img"), 8 * MIB);
        let sock = dir.join("r.sock");
        let pidfile = dir.join("r.pid");
        let ctl = dir.join("r.ctl");
        let args = os(&[
            &"--socket-path",
            &sock,
            &"--blk-file",
            &img,
            &"--engine",
            &engine,
            &"--num-queues",
            &"2",
            &"--pidfile",
            &pidfile,
            &"--control-socket",
            &ctl,
        ]);
        let mut p = Proc::spawn(ProcSpec::new(&dir, "r", args));
        let before: Vec<String> = loop {
            let m = p
                .recv(READY_TIMEOUT)
                .unwrap_or_else(|| panic!("no READY=1; stderr:\n{}", p.stderr()));
            if m.lines().any(|l| l == "READY=1") {
                // Act at once, before reading anything else.
                UnixStream::connect(&sock).unwrap_or_else(|e| {
                    panic!(
                        "{engine}: READY=1 arrived but {} refuses: {e}",
                        sock.display()
                    )
                });
                UnixStream::connect(&ctl).unwrap_or_else(|e| {
                    panic!("{engine}: READY=1 arrived but control socket refuses: {e}")
                });
                assert_eq!(read_pid(&pidfile), p.pid(), "{engine}: pidfile at READY=1");
                break p.msgs[..p.msgs.len() - 1].to_vec();
            }
        };
        assert!(
            before.is_empty(),
            "{engine}: messages before READY=1: {before:?}"
        );
        // That probe connection was a frontend that left; a real one is served normally.
        let mut c = Client::connect(&sock);
        c.write_data(0, 0, &pattern(1, 4096));
        drop(c);
        p.terminate();
    }
}

/// With WATCHDOG_USEC set, WATCHDOG=1 arrives every half interval while the daemon is idle and
/// healthy; none after STOPPING=1; none when WATCHDOG_PID names another process.
#[test]
fn watchdog_pings() {
    let dir = TestDir::new("watchdog");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let sock = dir.join("w.sock");
    let args = os(&[&"--socket-path", &sock, &"--blk-file", &img]);
    let mut spec = ProcSpec::new(&dir, "w", args.clone());
    spec.env = vec![("WATCHDOG_USEC".into(), "200000".into())];
    let mut p = Proc::spawn(spec);
    p.wait_for_line("READY=1", READY_TIMEOUT);
    let c = Client::connect(&sock); // an idle frontend
    let msgs = p.collect_for(Duration::from_millis(1200));
    let pings = msgs.iter().filter(|m| m.as_str() == "WATCHDOG=1").count();
    // Every 100 ms; a loaded 2-core machine may delay a few.
    assert!(
        pings >= 5,
        "{pings} pings in 1.2 s at WATCHDOG_USEC=200000: {msgs:?}"
    );
    drop(c);
    p.terminate();
    let after_stop = p
        .msgs
        .iter()
        .rev()
        .take_while(|m| !m.contains("STOPPING=1"));
    assert_eq!(after_stop.filter(|m| m.contains("WATCHDOG")).count(), 0);

    // WATCHDOG_PID names someone else (inherited from a parent): no pings.
    let sock2 = dir.join("w2.sock");
    let args = os(&[&"--socket-path", &sock2, &"--blk-file", &img, &"--no-lock"]);
    let mut spec = ProcSpec::new(&dir, "w2", args);
    spec.env = vec![
        ("WATCHDOG_USEC".into(), "100000".into()),
        ("WATCHDOG_PID".into(), "1".into()),
    ];
    let mut p = Proc::spawn(spec);
    p.wait_for_line("READY=1", READY_TIMEOUT);
    let msgs = p.collect_for(Duration::from_millis(500));
    assert!(!msgs.iter().any(|m| m.contains("WATCHDOG")), "{msgs:?}");
    p.terminate();
}

fn setuid_nobody() -> std::io::Result<()> {
    // SAFETY: setgroups/setgid/setuid are async-signal-safe syscalls on plain arguments.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(65534) != 0
            || libc::setuid(65534) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `vublk stats` run as nobody against `ctl`: (success, stderr), or `None` if nobody cannot
/// run the binary at all (a build directory without world access).
fn stats_as_nobody(ctl: &std::path::Path) -> Option<(bool, String)> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(VUBLK);
    cmd.arg("stats").arg(ctl);
    // SAFETY: the hook only makes async-signal-safe syscalls.
    unsafe { cmd.pre_exec(setuid_nobody) };
    let out = cmd.output().ok()?;
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The socket is owner-only unless --socket-mode/--socket-group say otherwise; the control
/// socket is always owner-only. Checked with the file modes and with a connection attempt by
/// another user.
#[test]
fn socket_mode_and_group() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to chown and to switch users");
        return;
    }
    let dir = TestDir::new("sockmode");
    // nobody must be able to reach the test dir to be refused by the socket's own mode.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let sock = dir.join("m.sock");
    let ctl = dir.join("m.ctl");
    let d = Daemon::start(&dir, &img, &[]);
    let m = std::fs::metadata(d.socket.as_ref().unwrap()).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600, "default mode");
    drop(d);

    let d = Daemon::start_at(
        &dir,
        "m",
        &sock,
        &img,
        &[
            "--socket-group",
            "daemon",
            "--control-socket",
            ctl.to_str().unwrap(),
        ],
    );
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o660, "--socket-group defaults to 0660");
    assert_eq!(m.gid(), 1, "group daemon (gid 1)");
    assert_eq!(std::fs::metadata(&ctl).unwrap().mode() & 0o777, 0o600);
    match stats_as_nobody(&ctl) {
        Some((ok, err)) => assert!(
            !ok && err.contains("ermission denied"),
            "nobody reached the control socket: {err}"
        ),
        None => eprintln!("nobody cannot run {VUBLK}; not checking a connection as nobody"),
    }
    let _c = Client::connect(&sock); // the owner still can
    drop(_c);
    drop(d);

    let d = Daemon::start_at(&dir, "m2", &sock, &img, &["--socket-mode", "0666"]);
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o666);
    drop(d);

    let f = run_to_exit(
        &dir,
        "bad-mode",
        &os(&[
            &"--socket-path",
            &sock,
            &"--blk-file",
            &img,
            &"--socket-mode",
            &"rw",
        ]),
    );
    assert_clean_failure(&f, "--socket-mode rw", &["--socket-mode"]);
    let f = run_to_exit(
        &dir,
        "bad-group",
        &os(&[
            &"--socket-path",
            &sock,
            &"--blk-file",
            &img,
            &"--socket-group",
            &"no-such-grp",
        ]),
    );
    assert_clean_failure(&f, "unknown group", &["no such group"]);
}

/// A pidfile held by a running daemon is refused before the second daemon touches its socket;
/// a stale one is taken over; the file disappears on exit.
#[test]
fn pidfile_held_stale_and_removed() {
    let dir = TestDir::new("pidfile");
    let img = create_image(&dir.join("disk.img"), 8 * MIB);
    let pidfile = dir.join("p.pid");
    let pf = pidfile.to_str().unwrap();
    let a = Daemon::start(&dir, &img, &["--pidfile", pf]);
    assert_eq!(read_pid(&pidfile), a.pid());

    let sock_b = dir.join("b.sock");
    let img_b = create_image(&dir.join("b.img"), 8 * MIB);
    let f = run_to_exit(
        &dir,
        "b",
        &os(&[
            &"--socket-path",
            &sock_b,
            &"--blk-file",
            &img_b,
            &"--pidfile",
            &pf,
        ]),
    );
    let pid_a = a.pid().to_string();
    assert_clean_failure(
        &f,
        "held pidfile",
        &["held by running process", pid_a.as_str()],
    );
    assert!(!exists(&sock_b), "refused daemon created its socket");
    assert_eq!(
        read_pid(&pidfile),
        a.pid(),
        "refused daemon touched the pidfile"
    );

    let status = a.terminate();
    assert!(status.success());
    assert!(!exists(&pidfile), "pidfile left behind after SIGTERM");

    // A pidfile left by a crash (SIGKILL: nobody removes it) is taken over.
    let c = Daemon::start_at(&dir, "c", &sock_b, &img, &["--pidfile", pf]);
    c.kill();
    assert_eq!(read_pid(&pidfile), c.pid());
    let d = Daemon::start_at(&dir, "d", &sock_b, &img, &["--pidfile", pf]);
    assert_eq!(read_pid(&pidfile), d.pid());
    assert!(d.terminate().success());
    assert!(!exists(&pidfile));
}

/// `--config FILE` holds the same settings as the flags; the command line overrides it; a bad
/// line is one error naming the file and line.
#[test]
fn config_file() {
    let dir = TestDir::new("conffile");
    let img = create_image(&dir.join("disk 0.img"), 8 * MIB);
    let sock = dir.join("c.sock");
    let conf = dir.join("disk0.conf");
    std::fs::write(
        &conf,
        format!(
            "# test\nblk-file = {}\nsocket-path = \"{}\"\nnum-queues = 1\nread-only = true\n\
             serial = from-file\n",
            img.display(),
            sock.display()
        ),
    )
    .unwrap();
    let mut p = Proc::spawn(ProcSpec::new(
        &dir,
        "conf",
        os(&[&"--config", &conf, &"--num-queues", &"3"]),
    ));
    p.wait_for_line("READY=1", READY_TIMEOUT);
    let log = p.stderr();
    assert!(
        log.contains("3 queues"),
        "command line overrides the file: {log}"
    );
    assert!(
        log.contains("read-only") && log.contains("from-file"),
        "{log}"
    );
    let c = Client::connect_with(
        &sock,
        ClientOpts {
            read_only: true,
            num_queues: 3,
            ..ClientOpts::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.capacity, 8 * MIB);
    drop(c);
    p.terminate();

    std::fs::write(&conf, "blk-file = /x\nqueues = 4\n").unwrap();
    let f = run_to_exit(&dir, "badconf", &os(&[&"--config", &conf]));
    assert_clean_failure(
        &f,
        "unknown key",
        &["disk0.conf line 2", "unknown setting \"queues\""],
    );
    std::fs::write(&conf, "blk-file = /x\nnum-queues = many\n").unwrap();
    let f = run_to_exit(&dir, "badval", &os(&[&"--config", &conf]));
    assert_clean_failure(&f, "bad value", &["disk0.conf", "many"]);
    let f = run_to_exit(
        &dir,
        "noconf",
        &os(&[&"--config", &dir.join("missing.conf")]),
    );
    assert_clean_failure(&f, "missing file", &["missing.conf"]);
}
