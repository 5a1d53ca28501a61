//! End to end: parsed requests executed by the sync engine on a temporary image.

use super::*;

use std::path::PathBuf;

use crate::engine::sync::SyncEngine;
use crate::engine::{Completion, Engine, EngineQueue};
use crate::image::Image;

// ---------------------------------------------------------------------------------------------
// End to end with the sync engine
// ---------------------------------------------------------------------------------------------

/// A temporary image, removed on drop.
struct TempImage {
    dir: PathBuf,
    path: PathBuf,
}

impl TempImage {
    fn new(name: &str, size: usize) -> TempImage {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vublk-request-tests-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, pattern(size, 7)).unwrap();
        TempImage { dir, path }
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Opens `img`, parses the chain with a geometry matching the image, runs the op.
struct Rig {
    h: H,
    image: Image,
    q: Box<dyn EngineQueue>,
}

impl Rig {
    fn new(img: &TempImage) -> Rig {
        let image = Image::open(&img.path, false, 512).unwrap();
        let mut geo = geometry(image.info.size);
        geo.discard = image.info.discard;
        geo.write_zeroes = image.info.write_zeroes;
        let q = SyncEngine::new(&image).new_queue().unwrap();
        Rig {
            h: H::with_geo(geo),
            image,
            q,
        }
    }

    /// Parses and executes; returns the completion result.
    fn run(&mut self, descs: &[D]) -> std::io::Result<u64> {
        let req = self.h.parse(descs);
        ok_with_status(&req, req.in_len);
        let Ok(Command::Io(op)) = req.command else {
            panic!("not an I/O request: {req:?}");
        };
        self.q.submit(77, op);
        let mut done: Vec<Completion> = Vec::new();
        self.q.reap(&mut done);
        assert_eq!(done.len(), 1);
        let c = done.pop().unwrap();
        assert_eq!(c.tag, 77);
        c.result
    }
}

#[test]
fn e2e_out_writes_guest_bytes() {
    let img = TempImage::new("out", DISK as usize);
    let mut rig = Rig::new(&img);
    assert_eq!(rig.image.info.size, DISK);
    let data = pattern(2048, 99);
    // 512 bytes in low memory, 1536 straddling the two high regions.
    rig.h.put(DATA, &data[..512]);
    rig.h.put(R2 - 1024, &data[512..]);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_OUT, 3);
    let n = rig
        .run(&[hdr, r(DATA, 512), r(R2 - 1024, 1536), w(STATUS, 1)])
        .unwrap();
    assert_eq!(n, 2048);
    let mut want = pattern(DISK as usize, 7);
    want[1536..1536 + 2048].copy_from_slice(&data);
    assert!(img.contents() == want, "file contents differ");
}

#[test]
fn e2e_in_reads_file_bytes() {
    let img = TempImage::new("in", DISK as usize);
    let mut rig = Rig::new(&img);
    rig.h.put(DATA, &[0xee; 4096]);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_IN, 5);
    let n = rig
        .run(&[hdr, w(DATA, 1024), w(HI, 512), w(STATUS, 1)])
        .unwrap();
    assert_eq!(n, 1536);
    let file = img.contents();
    assert_eq!(rig.h.get(DATA, 1024), &file[2560..3584]);
    assert_eq!(rig.h.get(HI, 512), &file[3584..4096]);
    // Nothing past the buffers was touched.
    assert_eq!(rig.h.get(DATA + 1024, 16), vec![0xee; 16]);
}

#[test]
fn e2e_write_zeroes() {
    let img = TempImage::new("wz", DISK as usize);
    let mut rig = Rig::new(&img);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let segs = rig.h.segs(SEG, &[(1, 2, 0), (100, 16, unmap)]);
    assert_eq!(rig.run(&[hdr, segs, w(STATUS, 1)]).unwrap(), 0);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let segs = rig.h.segs(SEG, &[(SECTORS - 8, 8, unmap)]);
    assert_eq!(rig.run(&[hdr, segs, w(STATUS, 1)]).unwrap(), 0);
    let mut want = pattern(DISK as usize, 7);
    for (off, len) in [(512, 1024), (51200, 8192), (DISK as usize - 4096, 4096)] {
        want[off..off + len].fill(0);
    }
    let got = img.contents();
    assert_eq!(got.len(), DISK as usize, "write-zeroes must keep the size");
    assert!(got == want, "file contents differ");
}

#[test]
fn e2e_discard_reads_back_zero() {
    let img = TempImage::new("discard", DISK as usize);
    let mut rig = Rig::new(&img);
    if !rig.image.info.discard {
        eprintln!("skipping: {} cannot punch holes", img.path.display());
        return;
    }
    let hdr = rig.h.hdr(VIRTIO_BLK_T_DISCARD, 0);
    let segs = rig.h.segs(SEG, &[(8, 8, 0), (64, 64, 0)]);
    assert_eq!(rig.run(&[hdr, segs, w(STATUS, 1)]).unwrap(), 0);
    let mut want = pattern(DISK as usize, 7);
    want[4096..8192].fill(0);
    want[32768..65536].fill(0);
    let got = img.contents();
    assert_eq!(got.len(), DISK as usize);
    assert!(got == want, "file contents differ");
    // And through the device: IN of a discarded range returns zeros.
    rig.h.put(DATA, &[0x55; 4096]);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_IN, 8);
    rig.run(&[hdr, w(DATA, 4096), w(STATUS, 1)]).unwrap();
    assert_eq!(rig.h.get(DATA, 4096), vec![0; 4096]);
}

#[test]
fn e2e_flush_and_write_then_read_back() {
    let img = TempImage::new("rw", DISK as usize);
    let mut rig = Rig::new(&img);
    let data = pattern(4096, 3);
    rig.h.put(HI, &data);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_OUT, SECTORS - 8);
    rig.run(&[hdr, r(HI, 4096), w(STATUS, 1)]).unwrap();
    let hdr = rig.h.hdr(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.run(&[hdr, w(STATUS, 1)]).unwrap(), 0);
    let hdr = rig.h.hdr(VIRTIO_BLK_T_IN, SECTORS - 8);
    rig.run(&[hdr, w(R2 - 2048, 4096), w(STATUS, 1)]).unwrap();
    assert_eq!(rig.h.get(R2 - 2048, 4096), data);
}
