//! `--poll-us` with EVENT_IDX, from a frontend on the `vhost` crate (tests/common/frontend.rs):
//! while the daemon polls it leaves the driver's kicks off (avail_event stays behind, so a
//! driver that honours EVENT_IDX does not kick) and still serves what is posted; when the
//! window ends it turns kicks back on, so the next request is not stranded. Both engines: the
//! sync one hands each request back in the call that took it, while the direct one hands it
//! back from a later completion event, and only that opens the window.

mod common;
#[path = "common/frontend.rs"]
mod frontend;

use std::thread;
use std::time::{Duration, Instant};

use common::*;
use frontend::*;

/// Long enough to post into the window from a test thread, short enough to wait out.
const WINDOW_MS: u64 = 400;

/// The avail_event field at the end of the used ring (EVENT_IDX).
fn avail_event(g: &Guest) -> u16 {
    g.mem.load_u16(g.ring.used + 4 + 8 * u64::from(g.ring.size))
}

fn avail_idx(g: &Guest) -> u16 {
    g.mem.load_u16(g.ring.avail + 2)
}

/// Posts a read (kicking or not), waits for it and checks its data against the image.
#[track_caller]
fn read_served(g: &mut Guest, sector: u64, sectors: usize, kick: bool) {
    let r = g.read_req(sector, sectors);
    g.post(r.head);
    if kick {
        g.kick();
    }
    let used = g.wait_used(1);
    g.check_read(&r, used[0]);
}

/// Whether a driver honouring EVENT_IDX would kick for its next request.
fn kick_wanted(g: &Guest) -> bool {
    avail_event(g) == avail_idx(g)
}

/// Kicks are held within 50 ms of a hand-back. The direct engine hands a completion back (used
/// entry, then the call) before that pass of its worker holds kicks, so a test thread that wakes
/// on the call can look in between; a driver that kicks then costs one wake-up, nothing more.
/// CI once caught it there.
fn kicks_held_soon(g: &Guest) -> bool {
    let t0 = Instant::now();
    while kick_wanted(g) {
        if t0.elapsed() > Duration::from_millis(50) {
            return false;
        }
        thread::sleep(Duration::from_micros(100));
    }
    true
}

#[test]
fn polling_holds_kicks_and_hands_them_back_sync() {
    holds_kicks_and_hands_them_back("sync");
}

#[test]
fn polling_holds_kicks_and_hands_them_back_direct() {
    holds_kicks_and_hands_them_back("direct");
}

fn holds_kicks_and_hands_them_back(engine: &str) {
    let dir = TestDir::new(&format!("poll-kicks-{engine}"));
    let image = create_image_random(&dir.join("disk.img"), 8 * MIB, 0x9011);
    let window = (WINDOW_MS * 1000).to_string();
    let _d = Daemon::start(&dir, &image, &["--poll-us", &window, "--engine", engine]);
    let mut g = Guest::connect(&dir.join("vublk.sock"), &image, Opts::default());

    // Handing the request back opens a poll window: at once on the sync engine, on the
    // completion event on the direct one. A driver honouring EVENT_IDX kicks only when its new
    // avail index passes avail_event; inside the window the daemon must not ask for that.
    let t0 = Instant::now();
    read_served(&mut g, 5, 2, true);
    assert!(
        kicks_held_soon(&g),
        "while polling, avail_event must not ask for a kick on the next request"
    );

    // Posted without a kick, still served; kicks still off.
    read_served(&mut g, 40, 8, false);
    assert!(!kick_wanted(&g), "still polling: no kick wanted");
    assert!(
        t0.elapsed() < Duration::from_millis(WINDOW_MS / 2),
        "too slow to judge the window"
    );

    // After the window: kicks are back on for exactly the next request, and needed.
    thread::sleep(Duration::from_millis(2 * WINDOW_MS));
    assert!(
        kick_wanted(&g),
        "after the window, avail_event must ask for a kick on the next request"
    );
    let r = g.read_req(90, 1);
    g.post(r.head);
    g.assert_no_used("a request posted after the window, without a kick");
    g.kick();
    let used = g.wait_used(1);
    g.check_read(&r, used[0]);
    g.mem.assert_untouched("polling");
}

/// A libblkio client at queue depth 1 long enough for the kick tuner to probe (it alternates
/// kicks held and kicks on, then keeps one): every write must read back, on both engines, across
/// the policy switches. The probe's verdict is logged at debug level, which shows it ran.
#[test]
fn qd1_client_across_kick_probes_sync() {
    qd1_client_across_kick_probes("sync");
}

#[test]
fn qd1_client_across_kick_probes_direct() {
    qd1_client_across_kick_probes("direct");
}

fn qd1_client_across_kick_probes(engine: &str) {
    let dir = TestDir::new(&format!("kick-probe-{engine}"));
    let size = 8 * MIB;
    let image = create_image_random(&dir.join("disk.img"), size, 0x7e11);
    let mut model = std::fs::read(&image).unwrap();
    let ctl = dir.join("ctl.sock");
    let d = Daemon::start(
        &dir,
        &image,
        &[
            "--poll-us",
            "2000",
            "--engine",
            engine,
            "--log-level",
            "debug",
            "--control-socket",
            ctl.to_str().unwrap(),
        ],
    );
    let mut c = Client::connect(d.socket.as_ref().unwrap());
    let blocks = size / 4096;
    let t0 = Instant::now();
    let mut n = 0u64;
    // Until the first probe has finished (2048 samples, then 8 epochs of 128; cycles over
    // 1 ms, a slow disk write, do not count), and a while after it.
    let mut probed_at = None;
    while probed_at.is_none_or(|p| n < p + 1000) && t0.elapsed() < Duration::from_secs(90) {
        if probed_at.is_none()
            && n.is_multiple_of(256)
            && d.stderr().contains("driver cycle at QD1")
        {
            probed_at = Some(n);
        }
        let block = (n.wrapping_mul(0x9e37_79b9) >> 7) % blocks;
        let off = block * 4096;
        if n.is_multiple_of(2) {
            let data = pattern(0x5eed ^ n, 4096);
            c.write_data(0, off, &data);
            model[off as usize..off as usize + 4096].copy_from_slice(&data);
        } else {
            let got = c.read_data(0, off, 4096);
            assert!(
                got == model[off as usize..off as usize + 4096],
                "request {n}: block {block} read back wrong"
            );
        }
        n += 1;
    }
    assert!(
        probed_at.is_some(),
        "after {n} QD1 requests the kick tuner never finished a probe; stderr:\n{}",
        d.stderr()
    );
    for off in (0..size).step_by(MIB as usize) {
        let got = c.read_data(0, off, MIB as usize);
        assert!(
            got == model[off as usize..(off + MIB) as usize],
            "MiB at {off} differs from the model after the probes"
        );
    }
    // `vublk stats` reports the probes exactly as the log does. A verdict is counted and
    // logged before the request that ended its probe is answered, and the client is idle
    // from here on, so the two readings see the same probes.
    let st = vublk::control::fetch_stats(&ctl)
        .unwrap_or_else(|e| panic!("stats: {}", vublk::error_chain(&e)));
    let log = d.stderr();
    let verdicts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("driver cycle at QD1"))
        .collect();
    let on = verdicts
        .iter()
        .filter(|l| l.ends_with("leaving kicks on"))
        .count() as u64;
    let q0 = &st.queues[0];
    assert_eq!(
        (q0.kick_verdicts, q0.kick_verdicts_on),
        (verdicts.len() as u64, on),
        "stats against the log:\n{log}"
    );
    let last_on = verdicts.last().map(|l| l.ends_with("leaving kicks on"));
    assert_eq!(q0.kicks_on, last_on, "the latest verdict");
    assert!(
        vublk::stats::format_table(&st).contains(&format!(
            "queue 0 kick tuner: kicks left on in {on} of {} probes",
            verdicts.len()
        )),
        "{}",
        vublk::stats::format_table(&st)
    );
}
