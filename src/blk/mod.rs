//! Pure virtio-blk logic (virtio 1.2 §5.2): feature bits, config space, request parsing and
//! execution against an [`Engine`](crate::engine::Engine). Nothing here knows about sockets or
//! vhost-user; it works on a descriptor chain and guest memory only.

pub mod config;
pub mod iov;
pub mod request;

pub use config::{BlkConfig, DeviceGeometry, DeviceSize};
pub use iov::GuestIoVecs;
pub use request::{Request, RequestError, parse_request};

/// Size of a virtio-blk sector: the unit of `sector` fields, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Shift for [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Completion status written into the last byte of a request's chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8,
    IoErr = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8,
    Unsupp = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8,
}
