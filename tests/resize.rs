//! Online resize (issue 4): the operator grows the image, then tells the daemon (control socket
//! `resize`, `vublk resize`, or SIGHUP). The connected frontend gets CONFIG_CHANGE_MSG on its
//! backend channel, its GET_CONFIG shows the new capacity, I/O past the old end works, and the
//! data before it is untouched. The frontend here is the `vhost` crate's, with the crate's own
//! backend-channel handler (`FrontendReqHandler`) answering the notification; a libblkio client
//! (which has no backend channel) sees the new size on its next connection.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use frontend::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};

const OLD: u64 = 8 * MIB;

/// Counts CONFIG_CHANGE_MSGs, as a VMM's backend-channel handler would act on them.
#[derive(Default)]
struct ConfigChanges(AtomicU32);

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// Serves the backend channel from a thread; each handled message is reported on the channel.
fn serve_backend_channel(g: &mut Guest) -> (Arc<ConfigChanges>, mpsc::Receiver<String>) {
    let counts = Arc::new(ConfigChanges::default());
    let mut h = FrontendReqHandler::new(Arc::clone(&counts)).expect("backend channel");
    h.set_reply_ack_flag(true);
    g.fe.set_backend_request_fd(&RawFdRef(h.get_tx_raw_fd()))
        .expect("SET_BACKEND_REQ_FD");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        loop {
            let r = h.handle_request();
            let done = r.is_err();
            if tx.send(format!("{r:?}")).is_err() || done {
                return;
            }
        }
    });
    (counts, rx)
}

struct RawFdRef(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

fn capacity(g: &mut Guest) -> u64 {
    let (_, payload) =
        g.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .expect("GET_CONFIG");
    u64::from_le_bytes(payload[0..8].try_into().unwrap())
}

fn ctl_resize(ctl: &Path) -> Result<String, String> {
    vublk::control::command(ctl, "resize", "resized").map_err(|e| vublk::error_chain(&e))
}

fn grow(image: &Path, size: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .unwrap()
        .set_len(size)
        .unwrap();
}

struct Env {
    dir: TestDir,
    image: PathBuf,
    socket: PathBuf,
    ctl: PathBuf,
    daemon: Daemon,
}

fn env(tag: &str, extra: &[&str]) -> Env {
    let dir = TestDir::new(tag);
    let image = create_image_random(&dir.join("disk.img"), OLD, 0x7e57);
    let ctl = dir.join("ctl.sock");
    let mut args = vec!["--control-socket", ctl.to_str().unwrap()];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(&dir, &image, &args);
    Env {
        socket: dir.join("vublk.sock"),
        image,
        ctl,
        daemon,
        dir,
    }
}

/// Reads `sectors` at `sector` through the ring and checks them against the image file.
fn read_back(g: &mut Guest, sector: u64, sectors: usize) {
    g.reuse_descs();
    let r = g.read_req(sector, sectors);
    g.submit(&[r.head]);
    let used = g.wait_used(1);
    g.check_read(&r, used[0]);
}

#[test]
fn grow_notifies_the_connected_frontend() {
    let e = env("resize-live", &[]);
    let before = read_file_at(&e.image, 0, OLD as usize);
    let mut g = Guest::handshake(
        &e.socket,
        &e.image,
        Opts {
            backend_channel: true,
            region_len: 4 << 20,
            ..Opts::default()
        },
    );
    let (changes, events) = serve_backend_channel(&mut g);
    g.send_mem_table().unwrap();
    g.start_ring().unwrap();
    assert_eq!(capacity(&mut g), OLD / 512);

    // Past the old end: refused before the resize.
    g.reuse_descs();
    let r = g.read_req(OLD / 512, 8);
    g.submit(&[r.head]);
    g.wait_used(1);
    assert_eq!(g.status(&r), S_IOERR, "read past the end before the resize");

    // Grow by 8 MiB with a pattern in the new part, then resize over the control socket.
    let new = 2 * OLD;
    grow(&e.image, new);
    write_file_at(&e.image, OLD + 4096, &pattern(11, 64 << 10));
    let answer = ctl_resize(&e.ctl).expect("resize");
    assert!(
        answer.contains(&format!("grew from {OLD} to {new} bytes")) && answer.contains("notified"),
        "{answer}"
    );
    let ev = events.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ev, "Ok(0)", "backend channel");
    assert_eq!(changes.0.load(Ordering::SeqCst), 1);
    assert_eq!(capacity(&mut g), new / 512);

    // The new blocks read back what the host wrote, writes land there, the old data is intact.
    read_back(&mut g, (OLD + 4096) / 512, 128);
    read_back(&mut g, new / 512 - 8, 8);
    g.reuse_descs();
    let data = pattern(12, 4096);
    let w = g.write_req(new / 512 - 16, &data);
    g.submit(&[w.head]);
    g.wait_used(1);
    assert_eq!(g.status(&w), S_OK);
    assert_bytes_eq(
        &read_file_at(&e.image, new - 8192, 4096),
        &data,
        "write into the new space",
    );
    assert_bytes_eq(
        &read_file_at(&e.image, 0, OLD as usize),
        &before,
        "data before the old end",
    );

    // SIGHUP does the same.
    let newer = new + 4 * MIB;
    grow(&e.image, newer);
    e.daemon.signal(libc::SIGHUP);
    let ev = events.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ev, "Ok(0)", "backend channel after SIGHUP");
    assert_eq!(changes.0.load(Ordering::SeqCst), 2);
    assert_eq!(capacity(&mut g), newer / 512);
    read_back(&mut g, newer / 512 - 1, 1);

    // Nothing changed: nothing sent.
    let answer = ctl_resize(&e.ctl).expect("resize");
    assert!(answer.contains("unchanged"), "{answer}");
    assert!(events.recv_timeout(Duration::from_millis(300)).is_err());
    let stats = vublk::control::fetch_stats(&e.ctl).unwrap();
    assert_eq!(stats.size_bytes, newer);
    g.probe("after the resizes");
    e.daemon.assert_alive("after the resizes");
    let log = e.daemon.stderr();
    assert!(log.contains("SIGHUP: image"), "{log}");
}

#[test]
fn shrink_and_unaligned_sizes_are_refused() {
    let e = env("resize-refused", &[]);
    let mut g = Guest::connect(&e.socket, &e.image, Opts::default());
    grow(&e.image, OLD - MIB);
    let err = ctl_resize(&e.ctl).unwrap_err();
    assert!(
        err.contains("shrank") && err.contains("only grows"),
        "{err}"
    );
    grow(&e.image, OLD + 100);
    let err = ctl_resize(&e.ctl).unwrap_err();
    assert!(err.contains("not a multiple of 512"), "{err}");
    assert_eq!(capacity(&mut g), OLD / 512);
    grow(&e.image, OLD);
    g.probe("after refused resizes");
    // This frontend has no backend channel: the size still changes and it can read it.
    grow(&e.image, OLD + MIB);
    let answer = ctl_resize(&e.ctl).expect("resize");
    assert!(answer.contains("frontend not notified"), "{answer}");
    assert_eq!(capacity(&mut g), (OLD + MIB) / 512);
}

#[test]
fn the_next_libblkio_client_sees_the_new_size() {
    let e = env("resize-blkio", &[]);
    let c = Client::connect(&e.socket);
    assert_eq!(c.capacity, OLD);
    drop(c);
    grow(&e.image, 3 * OLD);
    // `vublk resize` is the operator's command for the same thing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vublk"))
        .args(["resize", e.ctl.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("no frontend connected"), "{stdout}");
    let mut c = Client::connect(&e.socket);
    assert_eq!(c.capacity, 3 * OLD);
    let len = 64 << 10;
    c.buf(0, len).copy_from_slice(&pattern(3, len));
    c.q(0)
        .write(3 * OLD - len as u64, 0, len, blkio::ReqFlags::empty())
        .unwrap();
    assert_bytes_eq(
        &read_file_at(&e.image, 3 * OLD - len as u64, len),
        &pattern(3, len),
        "libblkio write at the new end",
    );
    let _ = &e.dir;
}
