//! Opening the disk image: permissions, size, and what the filesystem underneath can do.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, info, warn};

use crate::engine::EngineInfo;
use crate::engine::sync::{PUNCH, ZERO, fallocate};

/// Why an image cannot be served; messages are meant for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0}: no such file")]
    NotFound(PathBuf),
    #[error("image {0}: permission denied (need {1} access; check owner/mode or use --read-only)")]
    Permission(PathBuf, &'static str),
    #[error("image {0} is a directory, not a disk image")]
    IsDirectory(PathBuf),
    #[error("image {0} is neither a regular file nor a block device")]
    NotAFile(PathBuf),
    #[error("image {path}: cannot open")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path}: cannot read its size")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "image {path} is {size} bytes, not a multiple of the {block}-byte logical block size; \
         resize it to a multiple (e.g. qemu-img resize)"
    )]
    Unaligned {
        path: PathBuf,
        size: u64,
        block: u32,
    },
    #[error("image {0} is empty")]
    Empty(PathBuf),
    #[error("image {path}: cannot preallocate up to {missing} bytes of holes (--preallocate)")]
    Preallocate {
        path: PathBuf,
        missing: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "image {0} is on a read-only filesystem (use --read-only; under systemd's \
         ProtectSystem=strict, list its directory in ReadWritePaths=)"
    )]
    ReadOnlyFs(PathBuf),
}

/// An opened image and what we learned about it.
pub struct Image {
    pub path: PathBuf,
    pub file: Arc<File>,
    pub info: EngineInfo,
    pub zeroing: Zeroing,
}

/// How discard and write-zeroes reach the image, learnt once at open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Zeroing {
    /// FALLOC_FL_ZERO_RANGE works (tmpfs, for one, lacks it).
    pub zero_range: bool,
    /// The image is a block device with this logical block size: discards go to BLKDISCARD,
    /// which refuses ranges not aligned to it.
    pub device_block: Option<u64>,
}

/// Asks the kernel not to update the image's access time on reads: it means nothing for a disk
/// image and costs a timestamp check on every read (~2% of a tmpfs 4k read here). Allowed only
/// to the file's owner (or CAP_FOWNER); otherwise reads keep updating atime, which is harmless.
pub fn skip_atime(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no pointers are passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NOATIME);
        }
    }
}

/// The image is a regular file on tmpfs. A block device is never: fstatfs on its node reports
/// the filesystem the node lives in, and /dev is devtmpfs, which says TMPFS_MAGIC.
pub fn on_tmpfs(file: &File) -> bool {
    file.metadata().is_ok_and(|m| m.is_file()) && fs_magic(file) == Some(libc::TMPFS_MAGIC)
}

/// The magic number of the filesystem `file` is on (fstatfs), if the kernel says.
fn fs_magic(file: &File) -> Option<libc::__fsword_t> {
    // SAFETY: statfs is plain data filled by the kernel for a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a live statfs buffer.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    (r == 0).then_some(st.f_type)
}

// BLKGETSIZE64 = _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl Image {
    pub fn open(
        path: &Path,
        read_only: bool,
        logical_block_size: u32,
    ) -> Result<Image, ImageError> {
        let p = || path.to_path_buf();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::NotFound(p()),
            io::ErrorKind::PermissionDenied => ImageError::Permission(p(), "search"),
            _ => ImageError::Open {
                path: p(),
                source: e,
            },
        })?;
        if meta.is_dir() {
            return Err(ImageError::IsDirectory(p()));
        }
        let is_blk = meta.file_type().is_block_device();
        if !meta.is_file() && !is_blk {
            return Err(ImageError::NotAFile(p()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => {
                    ImageError::Permission(p(), if read_only { "read" } else { "read-write" })
                }
                io::ErrorKind::ReadOnlyFilesystem => ImageError::ReadOnlyFs(p()),
                _ => ImageError::Open {
                    path: p(),
                    source: e,
                },
            })?;
        skip_atime(&file);
        if !read_only && meta.is_file() && meta.blocks() == 0 {
            hint_extent_size(&file, path);
        }
        let size = if is_blk {
            block_device_size(&file)
        } else {
            Ok(meta.len())
        }
        .map_err(|source| ImageError::Size { path: p(), source })?;
        if size == 0 {
            return Err(ImageError::Empty(p()));
        }
        if size % u64::from(logical_block_size) != 0 {
            return Err(ImageError::Unaligned {
                path: p(),
                size,
                block: logical_block_size,
            });
        }
        let (discard, zero_range) = if read_only {
            (false, false)
        } else if is_blk {
            // Nothing lies past a device's end to probe on. Its fallocate zero-range is the
            // kernel's zeroout (the device's WRITE ZEROES, else zero bios) and drops the range
            // from the page cache; where it fails, WRITE_ZEROES falls back to writing zeros.
            // Discard is offered when the device's queue takes discards or write-zeroes.
            let limit = |attr| device_queue_limit(meta.rdev(), attr).unwrap_or(0);
            let discard = limit("discard_max_bytes") > 0 || limit("write_zeroes_max_bytes") > 0;
            (discard, true)
        } else {
            probe_fallocate(&file, size, logical_block_size)
        };
        let device_block = is_blk.then(|| device_logical_block(&file));
        // A device node's st_blksize is the page size before Linux 6.15 and the device's
        // minimum I/O size since (a RAID chunk, say): neither is its physical block.
        let device_physical = if is_blk {
            device_block_ioctl(&file, libc::BLKPBSZGET)
        } else {
            None
        };
        let physical_block_size = device_physical
            .or_else(|| u32::try_from(meta.blksize()).ok())
            .unwrap_or(4096)
            .clamp(logical_block_size, 1 << 16)
            .next_power_of_two();
        Ok(Image {
            path: p(),
            file: Arc::new(file),
            info: EngineInfo {
                size,
                read_only,
                discard,
                write_zeroes: !read_only,
                physical_block_size,
            },
            zeroing: Zeroing {
                zero_range,
                device_block,
            },
        })
    }

    /// `--preallocate`: allocates the file's holes (fallocate mode 0 never changes data), so
    /// guest writes overwrite allocated blocks. On ext4 under the direct engine that took 4k
    /// randwrite QD32 on a fresh 1 GiB image from 32k-38k to 45k-53k IOPS. Returns the bytes
    /// newly allocated. A block device has no holes; a filesystem without fallocate is logged
    /// and served as it is.
    pub fn preallocate(&self) -> Result<u64, ImageError> {
        let meta = self.file.metadata().map_err(|source| ImageError::Open {
            path: self.path.clone(),
            source,
        })?;
        if !meta.is_file() {
            info!(
                "--preallocate: {} is not a file, nothing to do",
                self.path.display()
            );
            return Ok(0);
        }
        let before = meta.blocks() * 512;
        let size = self.info.size;
        if let Err(source) = fallocate(&self.file, 0, 0, size) {
            if source.raw_os_error() == Some(libc::EOPNOTSUPP) {
                warn!(
                    "--preallocate: the filesystem under {} cannot preallocate; serving it as it is",
                    self.path.display()
                );
                return Ok(0);
            }
            return Err(ImageError::Preallocate {
                path: self.path.clone(),
                missing: size.saturating_sub(before),
                source,
            });
        }
        let after = self.file.metadata().map_or(before, |m| m.blocks() * 512);
        Ok(after.saturating_sub(before))
    }
}

/// `struct fsxattr` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

// FS_IOC_FSGETXATTR = _IOR('X', 31, struct fsxattr), FS_IOC_FSSETXATTR = _IOW('X', 32, ...)
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
const FS_XFLAG_EXTSIZE: u32 = 0x800;
/// What `qemu-img create` sets by default on XFS (its `extent_size_hint`).
const EXTENT_SIZE_HINT: u32 = 1 << 20;

/// On XFS, gives a writable image with nothing allocated yet an extent size hint of 1 MiB
/// unless it has one, as `qemu-img create` does: random guest writes into a sparse image then
/// allocate 1 MiB extents instead of one 4 KiB extent each. With the direct engine on an XFS
/// loop device, 4k randwrite QD32 on a fresh 1 GiB image went from 10k-22k to 31k-43k IOPS.
/// XFS takes the hint only while the file has no extents, so this runs before the fallocate
/// probe (which can leave a block past the end); whatever fails leaves the image as it was.
fn hint_extent_size(file: &File, path: &Path) {
    if fs_magic(file) != Some(libc::XFS_SUPER_MAGIC) {
        return;
    }
    let mut fa = FsXattr::default();
    // SAFETY: FS_IOC_FSGETXATTR fills one struct fsxattr, which `fa` is (repr(C)).
    if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut fa) } != 0
        || fa.xflags & FS_XFLAG_EXTSIZE != 0
        || fa.extsize != 0
    {
        return;
    }
    fa.xflags |= FS_XFLAG_EXTSIZE;
    fa.extsize = EXTENT_SIZE_HINT;
    // SAFETY: FS_IOC_FSSETXATTR reads one struct fsxattr from `fa`.
    if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSSETXATTR as _, &fa) } == 0 {
        info!(
            "image {} is new on XFS: extent size hint 1 MiB, as qemu-img create sets",
            path.display()
        );
    } else {
        debug!(
            "image {}: XFS extent size hint not set: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }
}

/// A limit from the sysfs queue directory of the block device `rdev` (a partition's is its
/// disk's): `None` if it cannot be read.
fn device_queue_limit(rdev: u64, attr: &str) -> Option<u64> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    [dev.join("queue"), dev.join("../queue")]
        .iter()
        .find_map(|q| std::fs::read_to_string(q.join(attr)).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The logical block size of a block device (512 if the kernel will not say).
fn device_logical_block(file: &File) -> u64 {
    device_block_ioctl(file, libc::BLKSSZGET).map_or(512, u64::from)
}

/// A block size a block device reports through an ioctl that writes one int
/// (BLKSSZGET, BLKPBSZGET); `None` if it fails or is not positive.
pub(crate) fn device_block_ioctl(file: &File, request: libc::Ioctl) -> Option<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: both requests write one int through the pointer, which points to a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut size as *mut libc::c_int) };
    if r == 0 {
        u32::try_from(size).ok().filter(|&s| s > 0)
    } else {
        None
    }
}

pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Tries punch-hole and zero-range just past the end of the image, where they cannot touch
/// data (KEEP_SIZE leaves the size alone); a trailing punch frees what zero-range allocated.
fn probe_fallocate(file: &File, size: u64, block: u32) -> (bool, bool) {
    let len = u64::from(block);
    let punch = fallocate(file, PUNCH, size, len).is_ok();
    let zero = fallocate(file, ZERO, size, len).is_ok();
    if zero && punch {
        let _ = fallocate(file, PUNCH, size, len);
    }
    (punch, zero)
}
