//! The vhost-user glue: a `&self` [`VhostUserBackend`] with one worker thread and one
//! [`QueueWorker`] per queue. All protocol specifics live here, so a later move below
//! vhost-user-backend (in-flight tracking, config-change notifications) stays in one file.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::blk::iov::GuestMem;
use crate::blk::request::ID_LEN;
use crate::blk::{BlkConfig, DeviceGeometry};
use crate::engine::Engine;
use crate::stats::DeviceStats;
use crate::worker::{DeviceCtx, KickCtx, QueueWorker, Vring};

/// Backend state for one frontend connection; a new one is built for every connection so
/// nothing leaks from one VM (or client) to the next.
#[derive(Clone)]
pub struct VhuBlk {
    inner: Arc<Inner>,
}

/// Per-daemon queue options.
#[derive(Clone, Debug, Default)]
pub struct QueueOpts {
    /// Busy-poll window after a kick (zero: off).
    pub poll: std::time::Duration,
    /// CPUs to pin queue workers to (empty: no pinning).
    pub cpus: Vec<usize>,
    /// Daemon-wide counters; each queue's worker takes its queue's writer.
    pub stats: Arc<DeviceStats>,
}

struct Inner {
    dev: DeviceCtx,
    opts: QueueOpts,
    queues: Vec<Mutex<QueueWorker>>,
    exit: Mutex<Vec<Option<(EventConsumer, EventNotifier)>>>,
    /// Exit-event consumer fds handed to vhost-user-backend, which registers them with
    /// `into_raw_fd()` and never closes them; see [`VhuBlk::close_exit_fds`].
    leaked: Mutex<Vec<RawFd>>,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    /// False while the memory table contains a region we must not touch (see `update_memory`).
    mem_ok: AtomicBool,
}

/// Failure to set up per-connection state.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot create the queue {0} engine context")]
    EngineQueue(usize, #[source] io::Error),
    #[error("cannot create an exit eventfd")]
    ExitEvent(#[source] io::Error),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another holder cannot leave this state half-updated in a way we rely on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VhuBlk {
    pub fn new(
        engine: &dyn Engine,
        geo: DeviceGeometry,
        serial: &[u8],
        mem: GuestMemoryAtomic<GuestMem>,
        opts: QueueOpts,
    ) -> Result<Self, BackendError> {
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial[..n]);
        let num_queues = usize::from(geo.num_queues);
        let mut queues = Vec::with_capacity(num_queues);
        let mut exit = Vec::with_capacity(num_queues);
        for i in 0..num_queues {
            let q = engine
                .new_queue()
                .map_err(|e| BackendError::EngineQueue(i, e))?;
            queues.push(Mutex::new(QueueWorker::new(i, q, opts.stats.counters(i))));
            let pair = new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                .map_err(BackendError::ExitEvent)?;
            exit.push(Some(pair));
        }
        Ok(VhuBlk {
            inner: Arc::new(Inner {
                dev: DeviceCtx {
                    config: BlkConfig::new(geo),
                    serial: id,
                    mem,
                },
                opts,
                queues,
                exit: Mutex::new(exit),
                leaked: Mutex::new(Vec::new()),
                acked_features: AtomicU64::new(0),
                event_idx: AtomicBool::new(false),
                mem_ok: AtomicBool::new(true),
            }),
        })
    }

    /// Closes the exit-event fds vhost-user-backend 0.24 leaks (one per queue thread per
    /// connection: a daemon serving many reconnects would run out of fds). Call only after the
    /// `VhostUserDaemon` that used them is dropped: its threads are joined and its epoll fds
    /// closed, so nothing refers to these fds any more. The dependency is pinned to that
    /// version (Cargo.toml) and `tests/kill.rs` checks the fd count stays flat.
    pub fn close_exit_fds(&self) {
        for fd in lock(&self.inner.leaked).drain(..) {
            // SAFETY: `fd` came from an EventConsumer we created and handed over; the library
            // turned it into a raw fd that nothing owns once its epoll handler is gone (see
            // above), so closing it cannot affect any other object.
            unsafe { libc::close(fd) };
        }
    }

    /// Requests in flight across all queues (waits for each queue's current kick to finish).
    pub fn in_flight(&self) -> usize {
        self.inner.queues.iter().map(|q| lock(q).in_flight()).sum()
    }

    /// epoll `data` for engine completions: above the values vhost-user-backend reserves
    /// (queue kicks and its exit event, 0..=num_queues).
    pub fn completion_event(&self) -> u64 {
        self.inner.queues.len() as u64 + 1
    }

    /// Queue `i`'s engine completion fd, to add to that queue thread's epoll.
    pub fn completion_fd(&self, i: usize) -> Option<std::os::fd::RawFd> {
        self.inner
            .queues
            .get(i)
            .and_then(|q| lock(q).completion_fd())
    }

    fn kick_ctx(&self) -> KickCtx {
        let acked = self.inner.acked_features.load(Ordering::Acquire);
        let flush = acked & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        let event_idx = self.inner.event_idx.load(Ordering::Acquire);
        KickCtx {
            event_idx,
            write_through: !flush || !self.inner.dev.config.writeback(),
            hold_kicks: event_idx && !self.inner.opts.poll.is_zero(),
        }
    }
}

impl VhostUserBackend for VhuBlk {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.inner.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.dev.config.geometry().queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.dev.config.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            // The relay (not vhost-user-backend) uses the channel: CONFIG_CHANGE_MSG on resize.
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn reset_device(&self) {
        debug!("device reset");
        self.inner.dev.config.reset();
        self.inner.acked_features.store(0, Ordering::Release);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.inner.dev.config.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.inner.dev.config.write(offset, buf).map_err(|e| {
            warn!("{e}");
            io::Error::new(io::ErrorKind::InvalidInput, e)
        })?;
        if self.inner.dev.config.writeback() {
            info!("guest turned the write cache on (writeback; FLUSH makes writes durable)");
        } else {
            info!("guest turned the write cache off (write-through: every write is O_DSYNC)");
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // The handler has already published the new table to the rings; refuse to process
        // requests until a table without bad regions arrives.
        let snapshot = mem.memory();
        match crate::blk::iov::check_regions(&snapshot) {
            Ok(()) => {
                self.inner.mem_ok.store(true, Ordering::Release);
                Ok(())
            }
            Err(msg) => {
                error!("frontend sent a bad memory table, queues paused: {msg}");
                self.inner.mem_ok.store(false, Ordering::Release);
                Err(io::Error::new(io::ErrorKind::InvalidInput, msg))
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per queue: worker i serves queue i only.
        (0..self.inner.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let pair = lock(&self.inner.exit)
            .get_mut(thread_index)
            .and_then(Option::take)?;
        lock(&self.inner.leaked).push(pair.0.as_raw_fd());
        Some(pair)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Taking the worker's lock waits for the kick being processed, so every request popped
        // before GET_VRING_BASE is completed before its index is reported.
        if let Some(q) = self.inner.queues.get(queue_index as usize) {
            let mut w = lock(q);
            let n = w.in_flight();
            w.drain(&self.inner.dev);
            debug!("queue {queue_index} stopped; completed {n} in-flight requests");
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // With one queue per thread, event 0 is that thread's queue kick and
        // `completion_event()` its engine's completion eventfd.
        let (Some(vring), Some(q)) = (vrings.first(), self.inner.queues.get(thread_id)) else {
            return Ok(());
        };
        if device_event != 0 && u64::from(device_event) != self.completion_event() {
            return Ok(());
        }
        if !self.inner.mem_ok.load(Ordering::Acquire) {
            return Ok(());
        }
        let k = self.kick_ctx();
        let mut w = lock(q);
        if u64::from(device_event) == self.completion_event() {
            w.clear_completion_event();
        }
        w.pin(&self.inner.opts.cpus);
        let poll = self.inner.opts.poll;
        let r = match w.process(vring, &self.inner.dev, k) {
            Ok(handed_back) if !poll.is_zero() => {
                w.poll(vring, &self.inner.dev, k, poll, handed_back)
            }
            r => r.map(drop),
        };
        if let Err(e) = r {
            w.release_kicks(vring, k);
            // Returning an error would end this queue's thread; log and wait for the next kick.
            warn!("queue {thread_id}: {e}");
        }
        Ok(())
    }
}
