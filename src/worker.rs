//! Per-queue processing: drain the avail ring, parse, submit to the engine, complete into the
//! used ring, notify the guest once per batch. One `QueueWorker` per queue, owned by that
//! queue's thread, so queues never contend on a lock.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost_user_backend::{VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use crate::blk::iov::GuestMem;
use crate::blk::request::{Command, ID_LEN, Request, used_len};
use crate::blk::{BlkConfig, Status, parse_request};
use crate::engine::{Completion, EngineQueue, Op};
use crate::kick_tuner::KickTuner;
use crate::stats::{QueueCounters, ReqKind};

/// Requests processed back to back before a worker lets others on its CPU run.
const YIELD_EVERY: usize = 64;

fn notify_every() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("VUBLK_NOTIFY_EVERY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4)
            .max(1)
    })
}

/// When `--poll-us` spins: for `window` after the last time requests were handed back to the
/// driver, which is when it answers with new ones. Submissions alone do not reopen it: an
/// asynchronous engine's completions either come while it is still open (a fast device) or
/// wake the worker through the engine's eventfd, and spinning for a slow disk's whole latency
/// after every submission only burns the CPU (1.6x the CPU per I/O on this machine's disk).
#[derive(Debug, Clone, Copy)]
struct PollWindow {
    window: Duration,
    until: Instant,
}

impl PollWindow {
    /// Opened by a call that handed requests back; a kick that only submitted does not open it.
    fn start(window: Duration, handed_back: bool, now: Instant) -> Self {
        let until = if handed_back { now + window } else { now };
        PollWindow { window, until }
    }

    fn processed(&mut self, handed_back: bool, now: Instant) {
        if handed_back {
            self.until = now + self.window;
        }
    }

    fn open(&self, now: Instant) -> bool {
        now < self.until
    }
}

/// With EVENT_IDX, "disabling" notifications leaves avail_event where the last enable put it,
/// so the driver still kicks once for its next request. While polling, move avail_event
/// behind what was already published: the driver kicks only when its index crosses that
/// value, and it will not before the window ends, when `enable_notification` re-arms it
/// and re-checks the ring. Written once per hold (`kicks_held`): after 65536 more requests
/// in one unbroken poll streak the index wraps past it and the driver kicks once, which is
/// harmless.
fn hold_kicks(q: &virtio_queue::Queue, mem: &GuestMem) {
    // avail_event follows the used ring's entries (virtio 1.x, 2.7.8); `ring_usable` checked
    // that the whole used ring, this field included, lies in guest memory.
    let at = q
        .used_ring()
        .checked_add(4 + 8 * u64::from(q.size()))
        .map(GuestAddress);
    let behind = q.next_avail().wrapping_sub(1).to_le();
    if let Some(at) = at
        && let Err(e) = mem.store(behind, at, Ordering::Relaxed)
    {
        debug!("holding kicks: {e}");
    }
}

/// The vring type used by the glue.
pub type Vring = crate::vring::GuardedVring<GuestMemoryAtomic<GuestMem>>;

/// Errors that stop processing of one kick (never guest-triggerable panics).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("virtqueue access failed")]
    Queue(#[source] virtio_queue::Error),
    #[error("cannot signal the guest")]
    Signal(#[source] std::io::Error),
}

/// Read-mostly device state every worker needs.
pub struct DeviceCtx {
    pub config: BlkConfig,
    pub serial: [u8; ID_LEN],
    pub mem: GuestMemoryAtomic<GuestMem>,
}

/// What we remember about a request while the engine works on it.
#[derive(Clone, Copy)]
struct Pending {
    head: u16,
    status: Option<GuestAddress>,
    in_len: u32,
    /// Engine requests: what to count on completion, and when the request was taken.
    io: Option<(ReqKind, u64, Instant)>,
}

pub struct QueueWorker {
    index: usize,
    /// The ring this worker serves, remembered so in-flight requests can be completed when the
    /// frontend stops the ring (GET_VRING_BASE).
    vring: Option<Vring>,
    pinned: bool,
    engine: Box<dyn EngineQueue>,
    /// In-flight requests indexed by engine tag; `free` recycles slots so tags stay unique even
    /// if a guest submits the same head twice.
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    done: Vec<Completion>,
    errors: u64,
    stats: QueueCounters,
    /// The last memory table checked with `check_regions` (kept alive so its address cannot
    /// be reused by a different, unchecked table).
    checked_table: Option<Arc<GuestMem>>,
    /// Ring addresses/size checked against the current table (`None`: not yet).
    ring_ok: Option<bool>,
    /// The driver broke the ring during this kick (e.g. avail->idx ran more than the ring size
    /// ahead), or its memory table is unusable: stop looping and polling on it until the next
    /// kick.
    broken: bool,
    /// avail_event was moved behind the index (`hold_kicks`) and not re-armed since: writing
    /// it again would only bounce the cache line the driver reads on every publish.
    kicks_held: bool,
    /// Whether holding kicks pays off with this driver (measured while polling).
    tuner: KickTuner,
}

/// Per-kick flags decided by the glue.
#[derive(Clone, Copy, Debug)]
pub struct KickCtx {
    pub event_idx: bool,
    /// Writes must be durable before completion (wce=0, or FLUSH not negotiated).
    pub write_through: bool,
    /// A poll loop follows (EVENT_IDX only): leave the driver's kicks off, the loop watches
    /// the ring itself and turns them back on when it stops.
    pub hold_kicks: bool,
}

impl QueueWorker {
    pub fn new(index: usize, engine: Box<dyn EngineQueue>, stats: QueueCounters) -> Self {
        QueueWorker {
            index,
            vring: None,
            pinned: false,
            engine,
            slots: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            errors: 0,
            stats,
            checked_table: None,
            ring_ok: None,
            broken: false,
            kicks_held: false,
            tuner: KickTuner::default(),
        }
    }

    /// Requests submitted to the engine and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Never touch a memory table whose regions run past their files (SIGBUS): the library
    /// publishes a new table before our `update_memory` hook sees it, so each worker checks a
    /// table itself the first time it uses it.
    fn table_ok(&mut self, mem: &Arc<GuestMem>) -> bool {
        if self
            .checked_table
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, mem))
        {
            return true;
        }
        match crate::blk::iov::check_regions(mem) {
            Ok(()) => {
                self.checked_table = Some(Arc::clone(mem));
                self.ring_ok = None;
                true
            }
            Err(msg) => {
                warn!(
                    "queue {}: not using the new memory table: {msg}",
                    self.index
                );
                // Nothing can be served from it: stop polling until the next kick.
                self.broken = true;
                false
            }
        }
    }

    /// The ring must have been given addresses, a valid size, and lie inside guest memory;
    /// otherwise even the notification fields we write could land anywhere in the guest.
    fn ring_usable(&mut self, q: &virtio_queue::Queue, mem: &GuestMem, bad_size: bool) -> bool {
        if let Some(ok) = self.ring_ok {
            return ok;
        }
        let unset = q.desc_table() == 0 && q.avail_ring() == 0 && q.used_ring() == 0;
        let ok = !unset && !bad_size && q.is_valid(mem);
        if !ok {
            warn!(
                "queue {}: ring not usable (size not a power of two, addresses unset, or ring \
                 outside guest memory); not serving it",
                self.index
            );
        }
        self.ring_ok = Some(ok);
        ok
    }

    /// Busy-polls the avail ring and engine completions while the `PollWindow` is open, i.e.
    /// soon after requests were handed back (`handed_back`: by the call before this one), when
    /// the driver is about to answer with new ones.
    pub fn poll(
        &mut self,
        vring: &Vring,
        dev: &DeviceCtx,
        k: KickCtx,
        window: Duration,
        handed_back: bool,
    ) -> Result<(), WorkerError> {
        let mut w = PollWindow::start(window, handed_back, Instant::now());
        // When the last request was picked up with nothing else in flight: the start of the
        // driver's QD1 cycle, which the kick tuner measures.
        let mut last_pick: Option<Instant> = None;
        loop {
            if self.broken || self.ring_ok == Some(false) {
                self.release_kicks(vring, k);
                return Ok(());
            }
            if !w.open(Instant::now()) {
                // Kicks back on, with the re-check that closes the race against the driver.
                let k = KickCtx {
                    hold_kicks: false,
                    ..k
                };
                return self.process(vring, dev, k).map(drop);
            }
            let pending = {
                let mem = dev.mem.memory();
                let state = vring.get_ref();
                let q = state.get_queue();
                q.ready()
                    && q.avail_idx(&*mem, Ordering::Acquire)
                        .is_ok_and(|i| i.0 != q.next_avail())
            };
            if pending || self.engine.has_completions() {
                if pending {
                    self.cycle_sample(&mut last_pick);
                }
                let handed_back = self.process(vring, dev, k)?;
                w.processed(handed_back, Instant::now());
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// A new request is visible: if nothing was in flight, the time since the previous such
    /// pick-up is one QD1 cycle of the driver. Deeper queues reset the measurement.
    fn cycle_sample(&mut self, last_pick: &mut Option<Instant>) {
        if self.in_flight() > 0 {
            *last_pick = None;
            return;
        }
        let now = Instant::now();
        if let Some(t) = last_pick.replace(now)
            && let Some(v) = self.tuner.sample(now - t)
        {
            self.stats.kick_verdict(!v.hold);
            debug!(
                "queue {}: driver cycle at QD1 {:.1} µs with kicks on, {:.1} µs holding them: {}",
                self.index,
                v.keep_ns as f64 / 1e3,
                v.hold_ns as f64 / 1e3,
                if v.hold {
                    "holding kicks"
                } else {
                    "leaving kicks on"
                }
            );
        }
    }

    /// Turns the driver's kicks back on after `hold_kicks` when no re-check follows (errors,
    /// a broken ring); the next kick re-judges the ring.
    pub fn release_kicks(&mut self, vring: &Vring, k: KickCtx) {
        self.kicks_held = false;
        if k.hold_kicks
            && let Err(e) = vring.get_mut().enable_notification()
        {
            debug!("queue {}: re-enabling kicks: {e}", self.index);
        }
    }

    /// Pins the calling thread (this queue's worker) to `cpus[index % len]`, once.
    pub fn pin(&mut self, cpus: &[usize]) {
        if self.pinned || cpus.is_empty() {
            return;
        }
        self.pinned = true;
        let cpu = cpus[self.index % cpus.len()];
        // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET initialise it; `cpu` is below
        // CPU_SETSIZE (checked by the config parser).
        let r = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if r != 0 {
            warn!(
                "queue {}: cannot pin to CPU {cpu}: {}",
                self.index,
                std::io::Error::last_os_error()
            );
        } else {
            debug!("queue {} pinned to CPU {cpu}", self.index);
        }
    }

    /// The completion fd fired: clear it before looking for completions.
    pub fn clear_completion_event(&mut self) {
        self.engine.clear_completion_event();
    }

    /// The engine's completion eventfd, if it has one (asynchronous engines).
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.engine.completion_fd()
    }

    /// Handles a kick or a completion event: collect finished requests, take new ones until the
    /// ring is empty with notifications re-enabled, notify the guest once. Returns whether any
    /// request was handed back to the driver.
    pub fn process(
        &mut self,
        vring: &Vring,
        dev: &DeviceCtx,
        k: KickCtx,
    ) -> Result<bool, WorkerError> {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        let mut mem: Arc<GuestMem> = dev.mem.memory().into_inner();
        if !self.table_ok(&mem) {
            return Ok(false);
        }
        let mut state = vring.get_mut();
        let mut used = false;
        // A broken avail index is re-judged on each kick: the driver may repair it.
        self.broken = false;
        if !state.get_queue().ready()
            || !self.ring_usable(state.get_queue(), &mem, vring.bad_size())
        {
            // Not serving this ring; finished I/O still completes if the ring is sound.
            if self.ring_ok == Some(true) {
                self.complete(&mem, &mut state, &mut used, false)?;
                self.notify(&mut state, used)?;
                return Ok(used);
            }
            return Ok(false);
        }
        self.complete(&mem, &mut state, &mut used, k.event_idx)?;
        let hold = k.hold_kicks && self.tuner.hold();
        // A guest cannot make us hold more requests than its ring has slots, even by reusing
        // heads: past this we stop popping until completions free slots.
        let cap = usize::from(state.get_queue().size());
        let mut batch = 0usize;
        let mut handed = false;
        'ring: loop {
            if k.event_idx {
                state.disable_notification().map_err(WorkerError::Queue)?;
                if hold && !self.kicks_held {
                    hold_kicks(state.get_queue(), &mem);
                    self.kicks_held = true;
                }
            }
            while self.in_flight() < cap {
                let chain = match state.get_queue_mut().iter(mem.clone()) {
                    Ok(mut avail) => avail.next(),
                    Err(e) => {
                        // e.g. avail->idx more than a ring ahead: nothing sane to pop, and
                        // retrying would spin forever.
                        warn!(
                            "queue {}: driver broke the ring ({e}); not serving it",
                            self.index
                        );
                        self.broken = true;
                        break 'ring;
                    }
                };
                let Some(chain) = chain else {
                    break;
                };
                // The frontend may have added a memory region (libblkio does, while rings run)
                // after our snapshot and before posting this request: we read its avail index
                // only now, so a newer table means the request may need it. Pop it again.
                let cur = dev.mem.memory();
                if !std::ptr::eq(&*cur, &*mem) {
                    state.get_queue_mut().go_to_previous_position();
                    mem = cur.into_inner();
                    if !self.table_ok(&mem) {
                        break 'ring;
                    }
                    continue;
                }
                let req = parse_request(chain, &mem, dev.config.geometry());
                self.dispatch(req, &mem, &mut state, dev, k, &mut used)?;
                batch += 1;
                if batch.is_multiple_of(YIELD_EVERY) {
                    // Under sustained load this loop never sleeps; let other queues' workers
                    // sharing this CPU run, or their requests wait a whole scheduler slice.
                    std::thread::yield_now();
                }
                if batch.is_multiple_of(notify_every()) {
                    // Hand finished requests back mid-batch so the driver can refill the ring
                    // while we work: this keeps both sides busy instead of taking turns.
                    self.engine.commit();
                    self.complete(&mem, &mut state, &mut used, k.event_idx)?;
                    self.notify(&mut state, used)?;
                    handed |= used;
                    used = false;
                }
            }
            self.engine.commit();
            self.complete(&mem, &mut state, &mut used, k.event_idx)?;
            if self.in_flight() >= cap {
                // Full: the completion event brings us back; leave notifications off.
                break;
            }
            // EVENT_IDX: re-enable, then re-check so a request added in between is not missed.
            if !k.event_idx || hold {
                break;
            }
            self.kicks_held = false;
            if !state.enable_notification().map_err(WorkerError::Queue)? {
                break;
            }
        }
        self.notify(&mut state, used)?;
        Ok(handed || used)
    }

    fn notify(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        used: bool,
    ) -> Result<(), WorkerError> {
        if used && state.needs_notification().map_err(WorkerError::Queue)? {
            state.signal_used_queue().map_err(WorkerError::Signal)?;
        }
        Ok(())
    }

    /// Completes every in-flight request (ring stop): the frontend then gets a consistent
    /// avail index with nothing outstanding.
    pub fn drain(&mut self, dev: &DeviceCtx) {
        // The frontend stops the ring before reconfiguring it: judge the new setup afresh.
        self.broken = false;
        self.ring_ok = None;
        self.kicks_held = false;
        let Some(vring) = self.vring.clone() else {
            return;
        };
        let mem: Arc<GuestMem> = dev.mem.memory().into_inner();
        let mut used = false;
        while self.in_flight() > 0 {
            self.engine.wait();
            let mut state = vring.get_mut();
            if let Err(e) = self.complete(&mem, &mut state, &mut used, false) {
                warn!("queue {}: completing on stop: {e}", self.index);
                break;
            }
        }
        let mut state = vring.get_mut();
        if let Err(e) = self.notify(&mut state, used) {
            debug!("queue {}: notify on stop: {e}", self.index);
        }
    }

    fn dispatch(
        &mut self,
        req: Request,
        mem: &GuestMem,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        dev: &DeviceCtx,
        k: KickCtx,
        used: &mut bool,
    ) -> Result<(), WorkerError> {
        let Request {
            head,
            status,
            in_len,
            command,
        } = req;
        let mut pending = Pending {
            head,
            status,
            in_len,
            io: None,
        };
        match command {
            Err(e) => {
                debug!("queue {}: request {head} refused: {e}", self.index);
                self.stats.invalid();
                self.finish(mem, state, pending, e.status())?;
                *used = true;
            }
            Ok(Command::GetId(mut bufs)) => {
                bufs.copy_from(&dev.serial);
                self.stats.get_id();
                self.finish(mem, state, pending, Status::Ok)?;
                *used = true;
            }
            Ok(Command::Io(mut op)) => {
                if let Op::Write { fua, .. } = &mut op {
                    *fua = k.write_through;
                }
                let (kind, bytes) = op.stat_kind();
                pending.io = Some((kind, bytes, Instant::now()));
                self.stats.submitted();
                let tag = match self.free.pop() {
                    Some(t) => {
                        self.slots[t] = Some(pending);
                        t
                    }
                    None => {
                        self.slots.push(Some(pending));
                        self.slots.len() - 1
                    }
                };
                self.engine.submit(tag as u64, op);
            }
        }
        Ok(())
    }

    /// Moves engine completions into the used ring. With `notify_first` (EVENT_IDX) and
    /// nothing handed back yet, an asynchronous engine's first completion is returned and
    /// notified before the rest are reaped: the driver's wake-up then overlaps that work
    /// (a whole batch of disk completions often arrives at once). EVENT_IDX keeps it to one
    /// notification unless the driver re-arms meanwhile.
    fn complete(
        &mut self,
        mem: &GuestMem,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        used: &mut bool,
        notify_first: bool,
    ) -> Result<(), WorkerError> {
        if notify_first && !*used && self.engine.completion_fd().is_some() {
            self.engine.reap_max(&mut self.done, 1);
            if self.done.is_empty() {
                // Nothing finished (the usual case mid-batch): no second look at the ring.
                return Ok(());
            }
            self.finish_done(mem, state, used)?;
            self.notify(state, *used)?;
        }
        self.engine.reap(&mut self.done);
        self.finish_done(mem, state, used)
    }

    fn finish_done(
        &mut self,
        mem: &GuestMem,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        used: &mut bool,
    ) -> Result<(), WorkerError> {
        let mut done = std::mem::take(&mut self.done);
        let now = (!done.is_empty()).then(Instant::now);
        for c in done.drain(..) {
            let Some(pending) = self.slots.get_mut(c.tag as usize).and_then(Option::take) else {
                warn!(
                    "queue {}: engine completed unknown tag {}",
                    self.index, c.tag
                );
                continue;
            };
            self.free.push(c.tag as usize);
            if let (Some((kind, bytes, start)), Some(now)) = (pending.io, now) {
                let latency = now.saturating_duration_since(start);
                self.stats.completed(kind, bytes, c.result.is_ok(), latency);
            }
            let status = match c.result {
                Ok(_) => Status::Ok,
                Err(e) => {
                    self.errors += 1;
                    // Log the first errors and then every 1000th, so a failing disk cannot
                    // flood the journal.
                    if self.errors <= 10 || self.errors.is_multiple_of(1000) {
                        warn!("queue {}: I/O error #{}: {e}", self.index, self.errors);
                    }
                    Status::IoErr
                }
            };
            self.finish(mem, state, pending, status)?;
            *used = true;
        }
        self.done = done;
        Ok(())
    }

    fn finish(
        &self,
        mem: &GuestMem,
        state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
        p: Pending,
        status: Status,
    ) -> Result<(), WorkerError> {
        let len = match p.status {
            Some(addr) => {
                // parse_request checked the byte is in guest memory; if a memory update
                // removed it since, the guest gets the chain back with length 0.
                match mem.write_obj(status as u8, addr) {
                    Ok(()) => used_len(true, p.in_len, status),
                    Err(_) => 0,
                }
            }
            None => 0,
        };
        // Only a head index the guest made up (>= queue size) fails here; there is no slot to
        // return it in, so drop it and keep serving the rest of the batch.
        if let Err(e) = state.add_used(p.head, len) {
            debug!("queue {}: cannot return head {}: {e}", self.index, p.head);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_micros(50);

    #[test]
    fn poll_window_opens_on_hand_back_only() {
        let t0 = Instant::now();
        assert!(
            !PollWindow::start(W, false, t0).open(t0),
            "submit-only kick"
        );
        let w = PollWindow::start(W, true, t0);
        assert!(w.open(t0 + W / 2));
        assert!(!w.open(t0 + W));
    }

    #[test]
    fn poll_window_is_reopened_by_hand_backs_not_by_submissions() {
        let t0 = Instant::now();
        let mut w = PollWindow::start(W, true, t0);
        // The driver answered; its requests went to the disk: the window keeps its end.
        w.processed(false, t0 + W / 2);
        assert!(!w.open(t0 + W), "a submission must not extend the window");
        // A completion handed back: a new window from then.
        w.processed(true, t0 + W / 2);
        assert!(w.open(t0 + W));
        assert!(!w.open(t0 + W / 2 + W));
    }
}
