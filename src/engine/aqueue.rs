//! Asynchronous queue: one io_uring per virtqueue (or, where io_uring is unavailable, a small
//! bounded thread pool), completions signalled through an eventfd that the queue's worker
//! thread watches in its epoll loop.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, types};
use log::{info, warn};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::aligned::AlignedBuf;
use super::direct::{Bounce, GateTicket, Planner, held_iov_bytes};
use super::sync::{self, rw_all};
use super::{Completion, EngineQueue, Op};
use crate::blk::GuestIoVecs;
use crate::image::Zeroing;

/// Threads per queue when io_uring is unavailable.
const POOL_THREADS: usize = 4;
/// io_uring submission queue entries (completion queue is twice that).
const RING_ENTRIES: u32 = 256;

#[derive(Clone, Copy, Debug)]
pub enum IoKind {
    Read,
    Write { fua: bool },
    Fsync,
}

/// A transfer ready for the kernel, plus what to do when it completes.
pub struct Prepared {
    pub kind: IoKind,
    pub offset: u64,
    /// What the kernel transfers: guest memory and/or bounce buffers.
    pub iov: Vec<libc::iovec>,
    /// Bytes the transfer should move.
    pub expect: u64,
    /// Bytes reported to the guest on success.
    pub guest_len: u64,
    /// Bounce buffers to copy back into guest memory after a read.
    pub bounces: Vec<Bounce>,
    /// Keeps guest memory mapped until completion.
    pub bufs: Option<GuestIoVecs>,
    /// RMW ordering; released when this is dropped.
    pub ticket: Option<GateTicket>,
    /// Bytes charged to the queue's budget while in flight (set when issued).
    pub charged: usize,
}

impl Prepared {
    /// Memory this op holds until it completes: bounce buffers and iovec tables.
    fn holds(&self) -> usize {
        let guest_iovs = self.bufs.as_ref().map_or(0, |b| b.iovecs().len());
        self.bounces.iter().map(|b| b.buf.len()).sum::<usize>()
            + held_iov_bytes(guest_iovs, self.iov.len())
    }
}

// SAFETY: the raw iovec pointers refer to guest memory pinned by `bufs` or to bounce buffers
// owned by `bounces`; both move with the struct and nothing is tied to a thread.
unsafe impl Send for Prepared {}

/// What RMW planning needs from the queue while it waits for a gate.
pub trait Submitter {
    fn in_flight_ops(&self) -> usize;
    /// Bytes held by in-flight ops: bounce buffers and iovec tables (see `BOUNCE_BUDGET`).
    fn bounce_in_flight(&self) -> usize;
    /// Blocks until at least one in-flight op completed and processes it.
    fn wait_one(&mut self) -> io::Result<()>;
}

struct Job {
    slot: usize,
    file: Arc<File>,
    kind: IoKind,
    offset: u64,
    iov: Vec<libc::iovec>,
}
// SAFETY: see `Prepared`; the pointed-to memory is kept alive by the in-flight `Prepared` until
// the job's result is harvested.
unsafe impl Send for Job {}

type Results = Arc<Mutex<Vec<(usize, io::Result<u64>)>>>;

enum Exec {
    Uring {
        ring: Box<IoUring>,
        unsubmitted: usize,
    },
    Pool {
        tx: Option<Sender<Job>>,
        results: Results,
        threads: Vec<JoinHandle<()>>,
    },
}

struct State {
    file: Arc<File>,
    efd: Arc<EventFd>,
    exec: Exec,
    slots: Vec<Option<(u64, Prepared)>>,
    free: Vec<usize>,
    done: Vec<Completion>,
    spare: Vec<AlignedBuf>,
    bounce_bytes: usize,
}

pub struct AsyncQueue {
    st: State,
    planner: Option<Planner>,
    /// Buffered fd for discard / write-zeroes fallbacks (any alignment works there).
    sync_file: Arc<File>,
    zeroing: Zeroing,
}

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

impl AsyncQueue {
    pub fn new(
        file: Arc<File>,
        sync_file: Arc<File>,
        zeroing: Zeroing,
        planner: Option<Planner>,
        try_uring: bool,
    ) -> io::Result<Self> {
        let efd = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let exec = match try_uring.then(|| setup_uring(&efd)) {
            Some(Ok(ring)) => Exec::Uring {
                ring: Box::new(ring),
                unsubmitted: 0,
            },
            other => {
                if let Some(Err(e)) = other
                    && !FALLBACK_LOGGED.swap(true, Ordering::Relaxed)
                {
                    warn!(
                        "io_uring unavailable ({e}); using a {POOL_THREADS}-thread pool per queue"
                    );
                }
                start_pool(&efd)?
            }
        };
        Ok(AsyncQueue {
            st: State {
                file,
                efd,
                exec,
                slots: Vec::new(),
                free: Vec::new(),
                done: Vec::new(),
                spare: Vec::new(),
                bounce_bytes: 0,
            },
            planner,
            sync_file,
            zeroing,
        })
    }

    /// True if this queue runs on io_uring (false: thread pool).
    pub fn uses_io_uring(&self) -> bool {
        matches!(self.st.exec, Exec::Uring { .. })
    }
}

fn setup_uring(efd: &EventFd) -> io::Result<IoUring> {
    if std::env::var_os("VUBLK_DISABLE_IO_URING").is_some() {
        return Err(io::Error::other("disabled by VUBLK_DISABLE_IO_URING"));
    }
    let ring = IoUring::builder()
        .setup_cqsize(RING_ENTRIES * 2)
        .build(RING_ENTRIES)?;
    ring.submitter().register_eventfd(efd.as_raw_fd())?;
    Ok(ring)
}

fn start_pool(efd: &Arc<EventFd>) -> io::Result<Exec> {
    let (tx, rx) = channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let results: Results = Arc::default();
    let mut threads = Vec::with_capacity(POOL_THREADS);
    for i in 0..POOL_THREADS {
        let (rx, results, efd) = (Arc::clone(&rx), Arc::clone(&results), Arc::clone(efd));
        threads.push(
            std::thread::Builder::new()
                .name(format!("vublk-io{i}"))
                .spawn(move || pool_thread(&rx, &results, &efd))?,
        );
    }
    Ok(Exec::Pool {
        tx: Some(tx),
        results,
        threads,
    })
}

fn pool_thread(
    rx: &Mutex<Receiver<Job>>,
    results: &Mutex<Vec<(usize, io::Result<u64>)>>,
    efd: &EventFd,
) {
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return, // queue dropped
        };
        let total: u64 = job.iov.iter().map(|v| v.iov_len as u64).sum();
        let r = match job.kind {
            IoKind::Read => rw_all(&job.file, &job.iov, job.offset, false, 0).map(|_| total),
            IoKind::Write { fua } => {
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                rw_all(&job.file, &job.iov, job.offset, true, flags).map(|_| total)
            }
            IoKind::Fsync => job.file.sync_data().map(|_| 0),
        };
        results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((job.slot, r));
        let _ = efd.write(1);
    }
}

impl Drop for AsyncQueue {
    fn drop(&mut self) {
        // Let every in-flight op finish before its memory goes away.
        while self.st.in_flight_ops() > 0 {
            if self.st.wait_one().is_err() {
                break;
            }
        }
        if let Exec::Pool { tx, threads, .. } = &mut self.st.exec {
            drop(tx.take());
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

impl State {
    fn alloc_slot(&mut self, tag: u64, mut p: Prepared) -> usize {
        p.charged = p.holds();
        self.bounce_bytes += p.charged;
        match self.free.pop() {
            Some(s) => {
                self.slots[s] = Some((tag, p));
                s
            }
            None => {
                self.slots.push(Some((tag, p)));
                self.slots.len() - 1
            }
        }
    }

    fn issue(&mut self, tag: u64, p: Prepared) {
        // Beyond IOV_MAX the kernel refuses a single readv/writev; do it inline in chunks.
        if p.iov.len() > libc::UIO_MAXIOV as usize {
            let r = run_sync(&self.file, &p);
            self.finish(tag, p, r);
            return;
        }
        let (kind, offset, iov_ptr, iov_len) = (p.kind, p.offset, p.iov.as_ptr(), p.iov.len());
        let iov_copy = matches!(self.exec, Exec::Pool { .. }).then(|| p.iov.clone());
        let slot = self.alloc_slot(tag, p);
        match &mut self.exec {
            Exec::Uring { ring, unsubmitted } => {
                let fd = types::Fd(self.file.as_raw_fd());
                let sqe = match kind {
                    IoKind::Read => opcode::Readv::new(fd, iov_ptr, iov_len as u32)
                        .offset(offset)
                        .build(),
                    IoKind::Write { fua } => opcode::Writev::new(fd, iov_ptr, iov_len as u32)
                        .offset(offset)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build(),
                    IoKind::Fsync => opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                }
                .user_data(slot as u64);
                loop {
                    // SAFETY: the iovec array and the buffers it points to live in the slot's
                    // `Prepared` until this entry's completion is harvested.
                    if unsafe { ring.submission().push(&sqe) }.is_ok() {
                        *unsubmitted += 1;
                        break;
                    }
                    // Ring full: hand the kernel what we have and retry.
                    if let Err(e) = ring.submit() {
                        let p = self.slots[slot].take().map(|(_, p)| p);
                        self.free.push(slot);
                        if let Some(p) = p {
                            self.finish(tag, p, Err(e));
                        }
                        return;
                    }
                    *unsubmitted = 0;
                }
            }
            Exec::Pool { tx, .. } => {
                let job = Job {
                    slot,
                    file: Arc::clone(&self.file),
                    kind,
                    offset,
                    iov: iov_copy.unwrap_or_default(),
                };
                if tx.as_ref().map(|t| t.send(job)).is_none_or(|r| r.is_err())
                    && let Some((_, p)) = self.slots[slot].take()
                {
                    self.free.push(slot);
                    self.finish(tag, p, Err(io::Error::other("I/O pool stopped")));
                }
            }
        }
    }

    fn commit(&mut self) {
        if let Exec::Uring { ring, unsubmitted } = &mut self.exec
            && *unsubmitted > 0
        {
            match ring.submit() {
                Ok(_) => *unsubmitted = 0,
                Err(e) => warn!("io_uring submit failed: {e}"),
            }
        }
    }

    /// Collects up to `max` finished ops from the kernel (all of them from the pool).
    fn harvest(&mut self, max: usize) {
        let mut got: Vec<(usize, io::Result<u64>)> = Vec::new();
        match &mut self.exec {
            Exec::Uring { ring, .. } => {
                for cqe in ring.completion().take(max) {
                    let r = cqe.result();
                    let res = if r < 0 {
                        Err(io::Error::from_raw_os_error(-r))
                    } else {
                        Ok(r as u64)
                    };
                    got.push((cqe.user_data() as usize, res));
                }
            }
            Exec::Pool { results, .. } => {
                got.append(&mut results.lock().unwrap_or_else(|p| p.into_inner()));
            }
        }
        for (slot, res) in got {
            let Some((tag, p)) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let res = match res {
                // A short transfer (rare: signals, partial device writes): finish inline.
                Ok(n) if n < p.expect => finish_short(&self.file, &p, n),
                other => other.map(|_| ()),
            };
            self.finish(tag, p, res.map(|_| 0));
        }
    }

    fn finish(&mut self, tag: u64, p: Prepared, res: io::Result<u64>) {
        let Prepared {
            kind,
            bounces,
            bufs,
            guest_len,
            ticket,
            charged,
            ..
        } = p;
        drop(ticket);
        // Ops finished without being issued (inline, refused) were never charged.
        self.bounce_bytes = self.bounce_bytes.saturating_sub(charged);
        let ok = res.is_ok();
        for b in bounces {
            if ok
                && matches!(kind, IoKind::Read)
                && let Some(g) = &bufs
            {
                g.write_at(b.guest_off, &b.buf.as_slice()[b.buf_off..b.buf_off + b.len]);
            }
            self.spare.push(b.buf);
        }
        self.done.push(Completion {
            tag,
            result: res.map(|_| guest_len),
        });
    }
}

/// Completes a transfer synchronously from byte `n` on.
fn finish_short(file: &File, p: &Prepared, mut n: u64) -> io::Result<()> {
    let mut rest = Vec::with_capacity(p.iov.len());
    for v in &p.iov {
        let l = v.iov_len as u64;
        if n >= l {
            n -= l;
            continue;
        }
        // SAFETY: n < iov_len: the advanced pointer stays inside the same buffer.
        let base = unsafe { v.iov_base.cast::<u8>().add(n as usize) };
        rest.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: v.iov_len - n as usize,
        });
        n = 0;
    }
    let done: u64 = p.expect - rest.iter().map(|v| v.iov_len as u64).sum::<u64>();
    let at = p.offset + done;
    match p.kind {
        IoKind::Read => rw_all(file, &rest, at, false, 0),
        IoKind::Write { fua } => {
            rw_all(file, &rest, at, true, if fua { libc::RWF_DSYNC } else { 0 })
        }
        IoKind::Fsync => Ok(()),
    }
}

fn run_sync(file: &File, p: &Prepared) -> io::Result<u64> {
    finish_short(file, p, 0).map(|_| p.expect)
}

impl Submitter for State {
    fn in_flight_ops(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn bounce_in_flight(&self) -> usize {
        self.bounce_bytes
    }

    fn wait_one(&mut self) -> io::Result<()> {
        let before = self.done.len();
        while self.done.len() == before && self.in_flight_ops() > 0 {
            match &mut self.exec {
                Exec::Uring { ring, unsubmitted } => {
                    ring.submit_and_wait(1)?;
                    *unsubmitted = 0;
                }
                Exec::Pool { .. } => {
                    let mut pfd = libc::pollfd {
                        fd: self.efd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one live pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                    let _ = self.efd.read();
                }
            }
            self.harvest(usize::MAX);
        }
        Ok(())
    }
}

impl EngineQueue for AsyncQueue {
    fn submit(&mut self, tag: u64, op: Op) {
        let len = match &op {
            Op::Read { bufs, .. } | Op::Write { bufs, .. } => bufs.len(),
            _ => 0,
        };
        let prepared = match op {
            Op::Read { offset, bufs } => self.prepare(false, offset, bufs, false),
            Op::Write { offset, bufs, fua } => self.prepare(true, offset, bufs, fua),
            Op::Flush => Ok(Some(Prepared {
                kind: IoKind::Fsync,
                offset: 0,
                iov: Vec::new(),
                expect: 0,
                guest_len: 0,
                bounces: Vec::new(),
                bufs: None,
                ticket: None,
                charged: 0,
            })),
            other => {
                // Discard / write-zeroes are rare and metadata-only: run them inline on the
                // buffered fd, which accepts any sector alignment. A range that ends inside a
                // block first waits for read-modify-writes of that block: one that read the
                // block before the zeroing would write the old sectors back after it.
                let fenced = match (&mut self.planner, &other) {
                    (Some(pl), Op::Discard { ranges } | Op::WriteZeroes { ranges, .. }) => {
                        pl.fence_partial_blocks(ranges, &mut self.st)
                    }
                    _ => Ok(Vec::new()),
                };
                let r =
                    fenced.and_then(|_tickets| sync::execute(&self.sync_file, self.zeroing, other));
                self.st.done.push(Completion { tag, result: r });
                return;
            }
        };
        match prepared {
            Ok(Some(p)) => self.st.issue(tag, p),
            // Carried out inline by the planner.
            Ok(None) => self.st.done.push(Completion {
                tag,
                result: Ok(len),
            }),
            Err(e) => self.st.done.push(Completion {
                tag,
                result: Err(e),
            }),
        }
        if let Some(pl) = &mut self.planner {
            for b in self.st.spare.drain(..) {
                pl.recycle(b);
            }
        }
    }

    fn commit(&mut self) {
        self.st.commit();
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.reap_max(out, usize::MAX);
    }

    fn reap_max(&mut self, out: &mut Vec<Completion>, max: usize) {
        self.st.harvest(max);
        out.append(&mut self.st.done);
        if let Some(pl) = &mut self.planner {
            for b in self.st.spare.drain(..) {
                pl.recycle(b);
            }
        } else {
            self.st.spare.clear();
        }
    }

    fn in_flight(&self) -> usize {
        self.st.in_flight_ops() + self.st.done.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.st.efd.as_raw_fd())
    }

    fn clear_completion_event(&mut self) {
        // EAGAIN (already cleared) is fine: the reap that follows looks at the ring anyway.
        let _ = self.st.efd.read();
    }

    fn has_completions(&mut self) -> bool {
        !self.st.done.is_empty()
            || match &mut self.st.exec {
                Exec::Uring { ring, .. } => !ring.completion().is_empty(),
                Exec::Pool { results, .. } => {
                    !results.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
                }
            }
    }

    fn wait(&mut self) {
        if let Err(e) = self.st.wait_one() {
            warn!("waiting for in-flight I/O: {e}");
        }
    }
}

impl AsyncQueue {
    fn prepare(
        &mut self,
        write: bool,
        offset: u64,
        bufs: GuestIoVecs,
        fua: bool,
    ) -> io::Result<Option<Prepared>> {
        match &mut self.planner {
            Some(pl) => pl.plan(write, offset, bufs, fua, &mut self.st),
            None => {
                let len = bufs.len();
                Ok(Some(Prepared {
                    kind: if write {
                        IoKind::Write { fua }
                    } else {
                        IoKind::Read
                    },
                    offset,
                    iov: bufs.iovecs().to_vec(),
                    expect: len,
                    guest_len: len,
                    bounces: Vec::new(),
                    bufs: Some(bufs),
                    ticket: None,
                    charged: 0,
                }))
            }
        }
    }
}

/// Logs which executor queue 0 got (once per engine).
pub fn log_executor(q: &AsyncQueue) {
    info!(
        "async I/O via {}",
        if q.uses_io_uring() {
            "io_uring"
        } else {
            "thread pool"
        }
    );
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn queued_in_kernel(q: &mut AsyncQueue) -> usize {
        match &mut q.st.exec {
            Exec::Uring { ring, .. } => ring.completion().len(),
            Exec::Pool { .. } => 0,
        }
    }

    fn readable(q: &AsyncQueue) -> bool {
        let mut pfd = libc::pollfd {
            fd: q.st.efd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd; zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    /// `reap_max` leaves the rest in the completion ring, and reaping leaves the eventfd's
    /// readiness for `clear_completion_event` (the worker's epoll event).
    #[test]
    fn reap_max_takes_the_first_and_leaves_the_rest_queued() {
        let path = std::env::temp_dir().join(format!("vublk-aqueue-{}", std::process::id()));
        let file = Arc::new(File::create(&path).expect("scratch file"));
        let _ = std::fs::remove_file(&path);
        let mut q = AsyncQueue::new(Arc::clone(&file), file, Zeroing::default(), None, true)
            .expect("queue");
        assert!(
            q.uses_io_uring(),
            "io_uring is available on the machines this runs on"
        );
        for tag in 0..3 {
            q.submit(tag, Op::Flush);
        }
        q.commit();
        let start = Instant::now();
        while queued_in_kernel(&mut q) < 3 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "flushes did not complete"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut out = Vec::new();
        q.reap_max(&mut out, 1);
        assert_eq!(out.len(), 1);
        assert_eq!(q.in_flight(), 2);
        assert_eq!(queued_in_kernel(&mut q), 2);
        q.reap(&mut out);
        let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, [0, 1, 2]);
        assert!(out.iter().all(|c| c.result.is_ok()));
        assert_eq!(q.in_flight(), 0);
        // Still readable after the reaps; cleared by the event handler's call.
        assert!(readable(&q), "reaping must not clear the eventfd");
        q.clear_completion_event();
        assert!(!readable(&q), "clear_completion_event must clear it");
    }
}
