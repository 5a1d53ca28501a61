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
