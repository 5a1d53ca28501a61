//! Fuzzes the whole request path a guest controls: an arbitrary split ring (descriptor table,
//! avail ring, indirect tables, headers, data) in guest memory with two regions, popped with
//! virtio-queue, parsed by `parse_request`, and executed by the sync engine on a scratch image.
//! Invariants: nothing panics, and every iovec handed to the engine lies in guest memory.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vublk::blk::request::Command;
use vublk::blk::{DeviceGeometry, parse_request};
use vublk::engine::sync::SyncEngine;
use vublk::engine::{Completion, Engine, Op};
use vublk::image::Image;

const LOW: u64 = 0;
const HIGH: u64 = 0x1_0000_0000;
const REGION: usize = 0x10000;

fn engine() -> &'static SyncEngine {
    static E: OnceLock<SyncEngine> = OnceLock::new();
    E.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vublk-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("img");
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("scratch image");
        let image = Image::open(&path, false, 512).expect("open scratch image");
        // The engine keeps the open file; unlink now so no run leaves its scratch dir behind.
        let _ = std::fs::remove_dir_all(&dir);
        SyncEngine::new(&image)
    })
}

fn in_guest(mem: &GuestMemoryMmap<()>, base: *const u8, len: usize) -> bool {
    mem.iter().any(|r| {
        let start = r.as_ptr() as usize;
        let end = start + r.len() as usize;
        (base as usize) >= start && (base as usize).saturating_add(len) <= end
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (ctl, body) = data.split_at(8);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(LOW), REGION),
        (GuestAddress(HIGH), REGION),
    ])
    .expect("guest memory");
    // Guest memory contents come from the input: low region first, then high.
    let n = body.len().min(REGION);
    mem.write_slice(&body[..n], GuestAddress(LOW)).expect("fill low");
    if body.len() > REGION {
        let m = (body.len() - REGION).min(REGION);
        mem.write_slice(&body[REGION..REGION + m], GuestAddress(HIGH)).expect("fill high");
    }
    let size = 1u16 << (ctl[0] % 9); // 1..=256
    let mut q = Queue::new(256).expect("queue");
    q.set_size(size);
    // Ring addresses: fixed, valid layout most of the time, input-chosen otherwise.
    let (desc, avail, used) = if ctl[1] & 0x80 == 0 {
        (0x0, 0x1000, 0x2000)
    } else {
        let a = |b: u8| u64::from(b) * 0x200;
        (a(ctl[2]), a(ctl[3]), a(ctl[4]))
    };
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_event_idx(ctl[1] & 1 != 0);
    q.set_ready(true);
    let geo = DeviceGeometry {
        size: (1 << 20).into(),
        logical_block_size: 512,
        physical_block_size: 4096,
        num_queues: 1,
        queue_size: 256,
        read_only: ctl[5] & 1 != 0,
        discard: ctl[5] & 2 != 0,
        write_zeroes: ctl[5] & 4 != 0,
    };
    let mem = Arc::new(mem);
    let mut eq = engine().new_queue().expect("engine queue");
    let mut done: Vec<Completion> = Vec::new();
    for _ in 0..64 {
        let Some(chain) = q.pop_descriptor_chain(mem.clone()) else {
            break;
        };
        let req = parse_request(chain, &mem, &geo);
        if let Some(at) = req.status {
            assert!(GuestMemory::check_range(&*mem, at, 1, vm_memory::Permissions::Write));
        }
        match req.command {
            Ok(Command::Io(op)) => {
                if let Op::Read { bufs, .. } | Op::Write { bufs, .. } = &op {
                    for v in bufs.iovecs() {
                        assert!(in_guest(&mem, v.iov_base as *const u8, v.iov_len));
                    }
                }
                eq.submit(u64::from(req.head), op);
            }
            Ok(Command::GetId(mut bufs)) => {
                bufs.copy_from(b"vublk-fuzz-serial-01");
            }
            Err(e) => {
                let _ = e.status();
            }
        }
        eq.reap(&mut done);
        let _ = q.add_used(&*mem, req.head, 1);
    }
    let _ = q.needs_notification(&*mem);
    let _ = q.enable_notification(&*mem);
});
