//! Request parsing: one descriptor chain → one validated [`Command`] or a [`RequestError`] that
//! knows its virtio status. The guest controls every byte of the chain, so every length, offset
//! and address is checked here before anything reaches an engine.

use std::ops::Deref;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::config::{DeviceGeometry, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use super::iov::{GuestIoVecs, GuestMem, OutOfGuestMemory};
use super::{SECTOR_SHIFT, SECTOR_SIZE, Status};
use crate::engine::Op;

/// Bytes of `struct virtio_blk_outhdr`: type u32, reserved u32, sector u64.
pub const HEADER_LEN: usize = 16;
/// Bytes of one discard / write-zeroes segment.
pub const DISCARD_SEG_LEN: usize = 16;
/// Bytes a GET_ID reply fills.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What a valid request asks for.
#[derive(Debug)]
pub enum Command {
    /// Work for the engine.
    Io(Op),
    /// Device id: filled in by the worker from the serial.
    GetId(GuestIoVecs),
}

/// A parsed request: where its status goes and what to do.
#[derive(Debug)]
pub struct Request {
    /// Head descriptor index, to return the chain in the used ring.
    pub head: u16,
    /// Guest address of the status byte; `None` when the chain has no writable byte for it.
    pub status: Option<GuestAddress>,
    /// Bytes the device writes on success, before the status byte (IN data, GET_ID).
    pub in_len: u32,
    pub command: Result<Command, RequestError>,
}

/// `len` for the used ring: data written (only on success) plus the status byte.
pub fn used_len(has_status: bool, in_len: u32, status: Status) -> u32 {
    match (has_status, status) {
        (false, _) => 0,
        (true, Status::Ok) => in_len.saturating_add(1),
        (true, _) => 1,
    }
}

/// Why a request is refused; each maps to a virtio status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("chain has no device-writable byte for the status")]
    NoStatus,
    #[error("request header is {0} bytes, need {HEADER_LEN}")]
    HeaderTooShort(u64),
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor chain is cut short (loop, bad link or bad indirect table)")]
    TruncatedChain,
    #[error("request type {0} not supported")]
    Unsupported(u32),
    #[error("{len} bytes at sector {sector} is outside the {capacity}-byte device")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("data buffer has the wrong direction for this request type")]
    WrongDirection,
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("bad guest buffer")]
    BadMemory(#[source] OutOfGuestMemory),
    #[error("discard/write-zeroes payload of {0} bytes is not 1..={MAX_DISCARD_SEG} segments")]
    BadSegmentPayload(u64),
    #[error("discard/write-zeroes flags {0:#x} not supported")]
    BadFlags(u32),
    #[error("discard/write-zeroes segment of {0} sectors exceeds the advertised limit")]
    SegmentTooLarge(u32),
    #[error("GET_ID buffer is {0} bytes, need {ID_LEN}")]
    GetIdTooShort(u64),
    #[error("chain has {0} descriptors; seg_max allows {1} (data segments + header + status)")]
    TooManySegments(usize, usize),
}

impl RequestError {
    /// The status the guest sees.
    pub fn status(&self) -> Status {
        match self {
            RequestError::Unsupported(_) | RequestError::BadFlags(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

type Segments = Vec<(GuestAddress, u32)>;

/// Splits `segs` after `n` bytes (a descriptor may hold the header and data together).
fn split_segments(segs: &[(GuestAddress, u32)], mut n: u64) -> (Segments, Segments) {
    let mut front = Vec::new();
    let mut back = Vec::new();
    for &(addr, len) in segs {
        let len64 = u64::from(len);
        if n >= len64 {
            front.push((addr, len));
            n -= len64;
        } else if n > 0 {
            // n < len <= u32::MAX, and addr + len was a valid descriptor, so no overflow.
            front.push((addr, n as u32));
            back.push((addr.unchecked_add(n), len - n as u32));
            n = 0;
        } else {
            back.push((addr, len));
        }
    }
    (front, back)
}

fn total_len(segs: &[(GuestAddress, u32)]) -> u64 {
    segs.iter().map(|&(_, l)| u64::from(l)).sum()
}

/// Copies the bytes of `segs` out of guest memory (only for small, bounded payloads).
fn read_bytes(mem: &GuestMem, segs: &[(GuestAddress, u32)]) -> Result<Vec<u8>, RequestError> {
    let mut out = Vec::with_capacity(total_len(segs) as usize);
    for &(addr, len) in segs {
        let start = out.len();
        out.resize(start + len as usize, 0);
        mem.read_slice(&mut out[start..], addr).map_err(|_| {
            RequestError::BadMemory(OutOfGuestMemory {
                addr: addr.0,
                len: u64::from(len),
            })
        })?;
    }
    Ok(out)
}

fn check_range(geo: &DeviceGeometry, sector: u64, len: u64) -> Result<u64, RequestError> {
    let size = geo.size.get();
    let out = || RequestError::OutOfRange {
        sector,
        len,
        capacity: size,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out)?;
    let end = offset.checked_add(len).ok_or_else(out)?;
    if end > size {
        return Err(out());
    }
    Ok(offset)
}

/// Parses one chain. Never fails as a whole: a bad request still yields a `Request` whose
/// `command` carries the error, so the chain is always returned to the guest.
pub fn parse_request<M>(
    chain: DescriptorChain<M>,
    mem: &Arc<GuestMem>,
    geo: &DeviceGeometry,
) -> Request
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut misordered = false;
    let mut wraps = None;
    // Whether the last non-empty writable descriptor (the status holder) wraps around 2^64.
    let mut status_wraps = false;
    // virtio-queue's iterator follows NEXT and INDIRECT links with a loop bound of the queue
    // size and stops at the first descriptor it cannot read.
    let mut last_has_next = false;
    // Past what seg_max allows we only look for the status descriptor: an indirect table can
    // hold 65535 descriptors, and we keep a request's segments while it is in flight.
    let limit = super::config::seg_max(geo.queue_size) as usize + 2;
    let mut count = 0usize;
    let mut last_writable = None;
    for desc in chain {
        last_has_next = desc.has_next();
        let (addr, len) = (desc.addr(), desc.len());
        // A buffer ending past 2^64 would overflow address arithmetic inside vm-memory.
        let wrapping = addr.0.checked_add(u64::from(len)).is_none();
        if desc.is_write_only() && len > 0 {
            status_wraps = wrapping;
            last_writable = Some((addr, len));
        }
        count += 1;
        if count > limit {
            continue;
        }
        if wrapping {
            wraps.get_or_insert(OutOfGuestMemory {
                addr: addr.0,
                len: u64::from(len),
            });
            continue;
        }
        if desc.is_write_only() {
            writable.push((addr, len));
        } else {
            misordered |= !writable.is_empty();
            readable.push((addr, len));
        }
    }
    if count > limit {
        writable.clear();
        readable.clear();
        writable.extend(last_writable);
    }
    // Empty descriptors carry no bytes; dropping them keeps "last byte" meaningful.
    writable.retain(|&(_, l)| l > 0);

    // The status is the last byte of the device-writable part.
    let status = match writable.last_mut() {
        Some((addr, len)) if !status_wraps => {
            let at = addr.checked_add(u64::from(*len) - 1);
            *len -= 1;
            at.filter(|a| mem.check_range(*a, 1, Permissions::Write))
        }
        _ => None,
    };
    let mut req = Request {
        head,
        status,
        in_len: 0,
        command: Err(RequestError::NoStatus),
    };
    if status.is_none() {
        return req;
    }
    writable.retain(|&(_, l)| l > 0);
    req.command = match wraps {
        _ if count > limit => Err(RequestError::TooManySegments(count, limit)),
        Some(e) => Err(RequestError::BadMemory(e)),
        // The walk stopped at a descriptor that still links on (a loop, a bad index, a bad
        // indirect table): the chain is not what the driver meant, do not execute it.
        None if last_has_next => Err(RequestError::TruncatedChain),
        None => parse_command(&mut req.in_len, readable, writable, misordered, mem, geo),
    };
    req
}

fn parse_command(
    in_len: &mut u32,
    readable: Segments,
    writable: Segments,
    misordered: bool,
    mem: &Arc<GuestMem>,
    geo: &DeviceGeometry,
) -> Result<Command, RequestError> {
    if misordered {
        return Err(RequestError::ReadableAfterWritable);
    }
    let readable_len = total_len(&readable);
    if readable_len < HEADER_LEN as u64 {
        return Err(RequestError::HeaderTooShort(readable_len));
    }
    let (hdr_segs, out_data) = split_segments(&readable, HEADER_LEN as u64);
    let hdr = read_bytes(mem, &hdr_segs)?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let out_len = total_len(&out_data);
    let in_data_len = total_len(&writable);

    match req_type {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            let offset = data_range(geo, sector, in_data_len)?;
            let bufs = GuestIoVecs::new(mem, &writable, Permissions::Write)
                .map_err(RequestError::BadMemory)?;
            // The chain is at most 4 GiB (virtio-queue stops iterating past that).
            *in_len = u32::try_from(in_data_len).unwrap_or(u32::MAX);
            Ok(Command::Io(Op::Read { offset, bufs }))
        }
        VIRTIO_BLK_T_OUT => {
            if geo.read_only {
                return Err(RequestError::ReadOnly);
            }
            if in_data_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            let offset = data_range(geo, sector, out_len)?;
            let bufs = GuestIoVecs::new(mem, &out_data, Permissions::Read)
                .map_err(RequestError::BadMemory)?;
            Ok(Command::Io(Op::Write {
                offset,
                bufs,
                fua: false,
            }))
        }
        VIRTIO_BLK_T_FLUSH => Ok(Command::Io(Op::Flush)),
        VIRTIO_BLK_T_GET_ID => {
            if in_data_len < ID_LEN as u64 {
                return Err(RequestError::GetIdTooShort(in_data_len));
            }
            let (id_segs, _) = split_segments(&writable, ID_LEN as u64);
            let bufs = GuestIoVecs::new(mem, &id_segs, Permissions::Write)
                .map_err(RequestError::BadMemory)?;
            *in_len = ID_LEN as u32;
            Ok(Command::GetId(bufs))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let offered = if discard {
                geo.discard
            } else {
                geo.write_zeroes
            };
            if !offered || geo.read_only {
                return Err(RequestError::Unsupported(req_type));
            }
            if in_data_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            let (ranges, unmap) = parse_segments(mem, &out_data, geo, discard)?;
            Ok(Command::Io(if discard {
                Op::Discard { ranges }
            } else {
                Op::WriteZeroes { ranges, unmap }
            }))
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn data_range(geo: &DeviceGeometry, sector: u64, len: u64) -> Result<u64, RequestError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(len));
    }
    check_range(geo, sector, len)
}

/// Discard / write-zeroes payload → byte ranges; `unmap` only if every segment allows it.
fn parse_segments(
    mem: &GuestMem,
    payload: &[(GuestAddress, u32)],
    geo: &DeviceGeometry,
    discard: bool,
) -> Result<(Vec<(u64, u64)>, bool), RequestError> {
    let len = total_len(payload);
    let max = u64::from(MAX_DISCARD_SEG) * DISCARD_SEG_LEN as u64;
    if len == 0 || len > max || !len.is_multiple_of(DISCARD_SEG_LEN as u64) {
        return Err(RequestError::BadSegmentPayload(len));
    }
    let bytes = read_bytes(mem, payload)?;
    let mut ranges = Vec::with_capacity(bytes.len() / DISCARD_SEG_LEN);
    let mut unmap = true;
    for seg in bytes.chunks_exact(DISCARD_SEG_LEN) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        // Discard takes no flags; write-zeroes only UNMAP.
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Err(RequestError::BadFlags(flags));
        }
        if num > MAX_DISCARD_SECTORS {
            return Err(RequestError::SegmentTooLarge(num));
        }
        unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        let bytes_len = u64::from(num) << SECTOR_SHIFT;
        let offset = check_range(geo, sector, bytes_len)?;
        ranges.push((offset, bytes_len));
    }
    Ok((ranges, unmap))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
