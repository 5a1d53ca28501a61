//! Loop devices and mounted filesystems for tests that need a real block device or a
//! particular filesystem (root only; CI runs as root). Both clean up on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
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
        Some(Loop { dev: dev.into() })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
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
