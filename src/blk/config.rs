//! virtio-blk feature bits and configuration space.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::SECTOR_SIZE;

/// Largest single data segment we advertise (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Cap on `seg_max`. libblkio computes `size_max * seg_max` as an i32, so the product must
/// stay below 2 GiB; 1022 segments (a 1024 ring minus header and status) is plenty.
pub const SEG_MAX_CAP: u32 = 1022;
/// Discard / write-zeroes segments accepted in one request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Largest discard / write-zeroes range per segment, in sectors (4 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;
/// Bytes of config space we implement: up to and including `write_zeroes_may_unmap` + padding.
pub const CONFIG_LEN: usize = 60;
/// Offset of the `wce` byte, the only field a driver may write.
pub const WCE_OFFSET: usize = 32;

/// `seg_max` for a largest ring of `queue_size`: the data segments one request may have.
pub fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size)
        .saturating_sub(2)
        .clamp(1, SEG_MAX_CAP)
}

/// The device size in bytes. Clones share one value, so an online resize reaches every queue
/// and the config space at once; it only ever grows while a frontend is connected.
#[derive(Clone, Debug, Default)]
pub struct DeviceSize(Arc<AtomicU64>);

impl DeviceSize {
    pub fn new(bytes: u64) -> Self {
        DeviceSize(Arc::new(AtomicU64::new(bytes)))
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Publishes a new size. The image must already have it: a request that sees the new size
    /// goes straight to the file.
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::Release);
    }
}

impl From<u64> for DeviceSize {
    fn from(bytes: u64) -> Self {
        DeviceSize::new(bytes)
    }
}

impl PartialEq for DeviceSize {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for DeviceSize {}

/// What the device looks like. Everything but the size is fixed for the life of a daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceGeometry {
    /// Image size in bytes (a multiple of `logical_block_size`); grows on an online resize.
    pub size: DeviceSize,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// Config space plus the one mutable field (`wce`, writeback cache enable).
#[derive(Debug)]
pub struct BlkConfig {
    geo: DeviceGeometry,
    wce: AtomicU8,
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl BlkConfig {
    pub fn new(geo: DeviceGeometry) -> Self {
        BlkConfig {
            geo,
            // Writeback by default: FLUSH makes it durable, which is what Linux expects.
            wce: AtomicU8::new(1),
        }
    }

    pub fn geometry(&self) -> &DeviceGeometry {
        &self.geo
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.geo.size.get() / SECTOR_SIZE
    }

    /// Virtio feature bits offered (without the vhost-user PROTOCOL_FEATURES bit).
    pub fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ);
        if self.geo.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            if self.geo.discard {
                f |= bit(VIRTIO_BLK_F_DISCARD);
            }
            if self.geo.write_zeroes {
                f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
            }
        }
        f
    }

    /// Writeback cache enabled (driver view).
    pub fn writeback(&self) -> bool {
        self.wce.load(Ordering::Relaxed) != 0
    }

    /// Back to power-on state (a new frontend starts with writeback on).
    pub fn reset(&self) {
        self.wce.store(1, Ordering::Relaxed);
    }

    /// Segments per request: the ring holds the header and status too.
    pub fn seg_max(&self) -> u32 {
        seg_max(self.geo.queue_size)
    }

    /// The config space as the driver reads it (little-endian, virtio 1.2 layout).
    pub fn bytes(&self) -> [u8; CONFIG_LEN] {
        let g = &self.geo;
        let mut c = [0u8; CONFIG_LEN];
        let put = |c: &mut [u8; CONFIG_LEN], off: usize, v: &[u8]| {
            c[off..off + v.len()].copy_from_slice(v);
        };
        let lbs_sectors = g.logical_block_size / SECTOR_SIZE as u32;
        let phys_exp = (g.physical_block_size / g.logical_block_size).trailing_zeros() as u8;
        put(&mut c, 0, &self.capacity().to_le_bytes());
        put(&mut c, 8, &SIZE_MAX.to_le_bytes());
        put(&mut c, 12, &self.seg_max().to_le_bytes());
        // 16..20 geometry: left 0, GEOMETRY is not offered.
        put(&mut c, 20, &g.logical_block_size.to_le_bytes());
        c[24] = phys_exp;
        c[25] = 0; // alignment_offset
        put(&mut c, 26, &(1u16 << phys_exp).to_le_bytes()); // min_io_size, in logical blocks
        put(&mut c, 28, &0u32.to_le_bytes()); // opt_io_size: no preference
        c[WCE_OFFSET] = self.wce.load(Ordering::Relaxed);
        put(&mut c, 34, &g.num_queues.to_le_bytes());
        if g.discard && !g.read_only {
            put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(&mut c, 40, &MAX_DISCARD_SEG.to_le_bytes());
            put(&mut c, 44, &lbs_sectors.to_le_bytes());
        }
        if g.write_zeroes && !g.read_only {
            put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(&mut c, 52, &MAX_DISCARD_SEG.to_le_bytes());
            c[56] = u8::from(g.discard);
        }
        c
    }

    /// GET_CONFIG: `size` bytes from `offset`, zero past our layout (newer drivers may ask for
    /// fields we do not implement; zero means "absent" for all of them).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.bytes();
        (offset..offset.saturating_add(size))
            .map(|i| bytes.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    /// SET_CONFIG: only `wce` is writable (and only 0 or 1).
    pub fn write(&self, offset: u32, data: &[u8]) -> Result<(), ConfigWriteError> {
        match (offset as usize, data) {
            (WCE_OFFSET, [v]) if *v <= 1 => {
                self.wce.store(*v, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(ConfigWriteError {
                offset,
                len: data.len(),
            }),
        }
    }
}

/// A driver tried to write a read-only part of config space.
#[derive(Debug, thiserror::Error)]
#[error(
    "config write of {len} bytes at offset {offset} rejected: only wce (offset 32, 1 byte) is writable"
)]
pub struct ConfigWriteError {
    pub offset: u32,
    pub len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> DeviceGeometry {
        DeviceGeometry {
            size: (1 << 30).into(),
            logical_block_size: 512,
            physical_block_size: 4096,
            num_queues: 4,
            queue_size: 256,
            read_only: false,
            discard: true,
            write_zeroes: true,
        }
    }

    #[test]
    fn layout_matches_spec_offsets() {
        let c = BlkConfig::new(geo()).bytes();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3, "4096/512 = 2^3");
        assert_eq!(c[32], 1, "writeback by default");
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 32);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 1);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn read_pads_and_bounds() {
        let cfg = BlkConfig::new(geo());
        assert_eq!(cfg.read(0, 60).len(), 60);
        let tail = cfg.read(56, 20);
        assert_eq!(tail.len(), 20);
        assert!(tail[4..].iter().all(|&b| b == 0));
        assert_eq!(cfg.read(u32::MAX, 4).len(), 0);
    }

    #[test]
    fn only_wce_is_writable() {
        let cfg = BlkConfig::new(geo());
        cfg.write(32, &[0]).unwrap();
        assert!(!cfg.writeback());
        assert_eq!(cfg.bytes()[32], 0);
        assert!(cfg.write(0, &[0; 8]).is_err());
        assert!(cfg.write(32, &[2]).is_err());
        assert!(cfg.write(32, &[1, 0]).is_err());
        cfg.reset();
        assert!(cfg.writeback());
    }

    #[test]
    fn read_only_hides_discard() {
        let mut g = geo();
        g.read_only = true;
        let cfg = BlkConfig::new(g);
        let f = cfg.features();
        assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(
            u32::from_le_bytes(cfg.bytes()[36..40].try_into().unwrap()),
            0
        );
    }
}
