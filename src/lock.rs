//! Image locking compatible with QEMU's: open-file-description (OFD) byte-range locks on the
//! bytes QEMU uses, so vublk, QEMU and qemu-storage-daemon see each other.
//!
//! QEMU (block/file-posix.c) takes a shared lock on byte `100 + bit` for every permission it
//! holds and on byte `200 + bit` for every permission it refuses to share. Before that it
//! checks that nobody refuses what it wants (bytes `200 + bit`) and that nobody holds what it
//! refuses to share (bytes `100 + bit`). Bits: 0 consistent read, 1 write, 2 write unchanged,
//! 3 resize.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const READ: u32 = 0;
const WRITE: u32 = 1;
const RESIZE: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "in use by another process with {0} access (another vublk, QEMU or \
         qemu-storage-daemon); stop it, or pass --no-lock if you really share the image"
    )]
    Conflict(&'static str),
    #[error("cannot lock the image")]
    Io(#[source] io::Error),
}

fn flock(byte: i64, ty: libc::c_short) -> libc::flock {
    // SAFETY: flock is plain data; zero is a valid value for every field.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = ty;
    f.l_whence = libc::SEEK_SET as libc::c_short;
    f.l_start = byte;
    f.l_len = 1;
    f
}

/// Is a lock held by someone else on `byte`? (Our own OFD locks never conflict with a test
/// through the same open file description.)
fn taken(file: &File, byte: i64) -> io::Result<bool> {
    let mut f = flock(byte, libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_GETLK reads and writes one live flock struct.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut f) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f.l_type != libc::F_UNLCK as libc::c_short)
}

fn hold(file: &File, byte: i64) -> io::Result<()> {
    let f = flock(byte, libc::F_RDLCK as libc::c_short);
    // SAFETY: F_OFD_SETLK reads one live flock struct.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &f) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn name(bit: u32) -> &'static str {
    match bit {
        READ => "read",
        WRITE => "write",
        _ => "resize",
    }
}

/// Takes QEMU-style locks on `file` for a reader or a writer. They live as long as the open
/// file description (the daemon's image file), so nothing needs releasing.
pub fn lock_image(file: &File, writable: bool) -> Result<(), LockError> {
    // What we hold, and what we refuse to share. A reader still refuses writers: the data
    // must not change under it (QEMU's default, share-rw=off).
    let have: &[u32] = if writable { &[READ, WRITE] } else { &[READ] };
    let unshared: &[u32] = &[WRITE, RESIZE];
    for &b in have {
        if taken(file, SHARED_BASE + i64::from(b)).map_err(LockError::Io)? {
            return Err(LockError::Conflict(name(b)));
        }
    }
    for &b in unshared {
        if taken(file, PERM_BASE + i64::from(b)).map_err(LockError::Io)? {
            return Err(LockError::Conflict(name(b)));
        }
    }
    for &b in have {
        hold(file, PERM_BASE + i64::from(b)).map_err(LockError::Io)?;
    }
    for &b in unshared {
        hold(file, SHARED_BASE + i64::from(b)).map_err(LockError::Io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(p: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    }

    #[test]
    fn writers_exclude_each_other_readers_share() {
        let dir = std::env::temp_dir().join(format!("vublk-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        // Separate open file descriptions conflict like separate processes.
        let w1 = open(&p);
        lock_image(&w1, true).unwrap();
        let w2 = open(&p);
        assert!(matches!(lock_image(&w2, true), Err(LockError::Conflict(_))));
        let r = open(&p);
        assert!(matches!(
            lock_image(&r, false),
            Err(LockError::Conflict("write"))
        ));
        drop(w1);
        let r1 = open(&p);
        lock_image(&r1, false).unwrap();
        let r2 = open(&p);
        lock_image(&r2, false).unwrap();
        let w3 = open(&p);
        assert!(matches!(lock_image(&w3, true), Err(LockError::Conflict(_))));
        drop((r1, r2));
        lock_image(&w3, true).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
