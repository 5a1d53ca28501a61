//! Loop devices and mounted filesystems for tests that need a real block device or a
//! particular filesystem (root only; CI runs as root). Both clean up on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
    /// A device made for this test (`Loop::made`): removed on drop.
    made: Option<u32>,
}

/// `/dev/loop-control` requests (linux/loop.h).
const LOOP_CTL_ADD: libc::c_ulong = 0x4C80;
const LOOP_CTL_REMOVE: libc::c_ulong = 0x4C81;

fn loop_control(request: libc::c_ulong, index: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // SAFETY: LOOP_CTL_ADD/REMOVE take the device index by value; no memory is passed.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), request as _, libc::c_ulong::from(index)) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Loop {
    /// `None` (with losetup's message on stderr) where loop devices cannot be set up.
    pub fn new(backing: &Path, sector_size: u32) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["--sector-size", &sector_size.to_string(), "-f", "--show"])
            .arg(backing)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(Loop {
            dev: dev.into(),
            made: None,
        })
    }

    /// A loop device of its own at a high index (`losetup -f` hands out the lowest free one,
    /// so other tests do not get it), removed on drop, for a test that changes the device's
    /// queue limits: some cannot be set back (Linux zeroes `discard_granularity` with
    /// `discard_max_bytes`, and then refuses any non-zero value), and a removed device comes
    /// back with fresh ones.
    pub fn made(backing: &Path, sector_size: u32) -> Loop {
        let index = 900 + std::process::id() % 100;
        let _ = loop_control(LOOP_CTL_REMOVE, index);
        loop_control(LOOP_CTL_ADD, index)
            .unwrap_or_else(|e| panic!("LOOP_CTL_ADD {index} (needs root): {e}"));
        let dev = PathBuf::from(format!("/dev/loop{index}"));
        let lo = Loop {
            dev,
            made: Some(index),
        };
        let st = Command::new("losetup")
            .args(["--sector-size", &sector_size.to_string()])
            .arg(&lo.dev)
            .arg(backing)
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "losetup {}",
            lo.dev.display()
        );
        lo
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        if let Some(index) = self.made {
            // Detaching is asynchronous; the device is busy until it completes.
            for _ in 0..50 {
                if loop_control(LOOP_CTL_REMOVE, index).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// A filesystem mounted on `path` for one test; lazily unmounted on drop, so a daemon that is
/// still exiting cannot keep it alive. Drop it before the `Loop` under it.
pub struct Mount {
    pub path: PathBuf,
}

impl Mount {
    /// A tmpfs of `mib` MiB.
    pub fn tmpfs(path: &Path, mib: u64) -> Mount {
        std::fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs (needs root; CI runs as root)");
        Mount {
            path: path.to_path_buf(),
        }
    }

    /// Makes a `kind` filesystem (`mkfs.<kind>`, e.g. ext4, xfs) on `dev` and mounts it.
    pub fn format(kind: &str, dev: &Path, path: &Path) -> Mount {
        let force = if kind == "xfs" { "-f" } else { "-F" };
        let st = Command::new(format!("mkfs.{kind}"))
            .args(["-q", force])
            .arg(dev)
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "mkfs.{kind} (scripts/install-deps.sh installs what the tests need)"
        );
        std::fs::create_dir_all(path).unwrap();
        let st = Command::new("mount").arg(dev).arg(path).status();
        assert!(st.is_ok_and(|s| s.success()), "mount {kind}");
        Mount {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
