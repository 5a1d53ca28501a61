//! Temporary directories, image files, deterministic data and byte-level assertions.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::MIB;

// ---------------------------------------------------------------------------------------------
// Temporary directories and images
// ---------------------------------------------------------------------------------------------

/// A unique temporary directory, removed on drop unless `VUBLK_KEEP_TMP` is set.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(24)
            .collect();
        let path =
            std::env::temp_dir().join(format!("vublk-it-{}-{}-{}", std::process::id(), n, tag));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating test dir {}: {e}", path.display()));
        // sockaddr_un.sun_path holds 108 bytes including the NUL.
        let longest = path.join("vublk-second.notify");
        assert!(
            longest.as_os_str().len() < 100,
            "test dir path {} too long for unix socket paths (set TMPDIR to something shorter)",
            path.display()
        );
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("VUBLK_KEEP_TMP").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Creates a sparse, zero-filled image of `size` bytes.
pub fn create_image(path: &Path, size: u64) -> PathBuf {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap();
    path.to_path_buf()
}

/// Creates an image of `size` bytes filled with [`pattern`]`(seed, size)`.
pub fn create_image_random(path: &Path, size: u64, seed: u64) -> PathBuf {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = Rng::new(seed);
    let mut remaining = size;
    let mut chunk = vec![0u8; MIB as usize];
    while remaining > 0 {
        let n = remaining.min(MIB) as usize;
        rng.fill(&mut chunk[..n]);
        f.write_all(&chunk[..n]).unwrap();
        remaining -= n as u64;
    }
    f.sync_all().unwrap();
    path.to_path_buf()
}

/// Reads `len` bytes at `offset` straight from the image file.
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} bytes at {offset} of {}: {e}", len, path.display()));
    buf
}

/// Writes `data` at `offset` straight into the image file.
pub fn write_file_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

pub fn file_size(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

// ---------------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------------

/// xorshift64* — tiny, seeded, good enough for test patterns.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero; spread small seeds.
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// `len` pseudo-random bytes determined by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// Compares two buffers; on mismatch panics naming the first differing byte (not dumping MiBs).
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (i + 16).min(actual.len());
        let n_bad = actual.iter().zip(expected).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {n_bad} of {} bytes differ, first at byte {i}: got {:02x?}, expected {:02x?}",
            actual.len(),
            &actual[i..end],
            &expected[i..end]
        );
    }
}

#[track_caller]
pub fn assert_zeros(actual: &[u8], what: &str) {
    if let Some(i) = actual.iter().position(|b| *b != 0) {
        let end = (i + 16).min(actual.len());
        panic!(
            "{what}: expected {} zero bytes, first non-zero at byte {i}: {:02x?}",
            actual.len(),
            &actual[i..end]
        );
    }
}

/// True if the path exists (without following symlinks).
pub fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Bytes of a path, for assertions.
pub fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}
