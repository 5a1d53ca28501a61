//! The vring type handed to vhost-user-backend: its `VringRwLock`, plus a record of a ring
//! size the frontend asked for that virtio-queue refused.
//!
//! vhost-user-backend 0.24 acks SET_VRING_NUM with a size that is not a power of two, and
//! virtio-queue then keeps its previous (maximum) size, so the device's view of the ring would
//! be larger than the driver's and used entries would land past the driver's used ring. The
//! library gives no hook to refuse the message, but it does route the size through
//! `VringT::set_queue_size`: noting it here lets the worker refuse to serve such a ring.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;
use vm_memory::GuestAddressSpace;

#[derive(Clone)]
pub struct GuardedVring<M: GuestAddressSpace> {
    inner: VringRwLock<M>,
    bad_size: Arc<AtomicBool>,
}

impl<M: GuestAddressSpace> GuardedVring<M> {
    /// The frontend set a ring size virtio-queue could not take.
    pub fn bad_size(&self) -> bool {
        self.bad_size.load(Ordering::Acquire)
    }
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for GuardedVring<M> {
    type G = <VringRwLock<M> as VringStateGuard<'a, M>>::G;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for GuardedVring<M> {
    type G = <VringRwLock<M> as VringStateMutGuard<'a, M>>::G;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for GuardedVring<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(GuardedVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            bad_size: Arc::new(AtomicBool::new(false)),
        })
    }
    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.inner.get_ref()
    }
    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.inner.get_mut()
    }
    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }
    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }
    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }
    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }
    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }
    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }
    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc, avail, used)
    }
    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }
    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }
    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }
    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }
    fn set_queue_size(&self, num: u16) {
        // The library already refused 0 and sizes above the maximum.
        self.bad_size
            .store(!num.is_power_of_two(), Ordering::Release);
        self.inner.set_queue_size(num)
    }
    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }
    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }
    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }
    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }
    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }
    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}
