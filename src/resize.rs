//! Online resize: the operator grows the image (`truncate -s`, `qemu-img resize`, `lvextend`),
//! then sends SIGHUP or the control-socket `resize` command. We re-read the size from the open
//! image, publish it to every queue and the config space, and tell the frontend with
//! CONFIG_CHANGE_MSG so the guest sees the new capacity without a reboot.
//!
//! Only growth is taken: a guest keeps using blocks it was told exist, so a shrink is refused and
//! the old size stays.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::{info, warn};

use crate::blk::DeviceSize;
use crate::relay::{FrontendLink, NotifyError};

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("cannot read the size of image {0}")]
    Size(PathBuf, #[source] io::Error),
    #[error(
        "image {path} shrank from {from} to {to} bytes; vublk only grows a device online \
         (restore the size, or restart vublk with the guest stopped)"
    )]
    Shrunk { path: PathBuf, from: u64, to: u64 },
    #[error(
        "image {path} is now {size} bytes, not a multiple of {granularity}; \
         resize it to a multiple and retry"
    )]
    Unaligned {
        path: PathBuf,
        size: u64,
        granularity: u64,
    },
}

/// Whether the connected frontend heard about a new size.
#[derive(Debug)]
pub enum Notified {
    /// It acknowledged CONFIG_CHANGE_MSG (or was sent it, without REPLY_ACK).
    Yes,
    /// No frontend is connected; the next one reads the new size at start-up.
    NoFrontend,
    /// The frontend could not be told; the guest sees the new size after a device reset.
    Failed(NotifyError),
}

/// The result of one resize request.
#[derive(Debug)]
pub enum Resized {
    Unchanged {
        size: u64,
    },
    Grown {
        from: u64,
        to: u64,
        notified: Notified,
    },
}

impl Resized {
    /// One line for the log and the control socket.
    pub fn describe(&self) -> String {
        match self {
            Resized::Unchanged { size } => format!("size unchanged ({size} bytes)"),
            Resized::Grown { from, to, notified } => {
                let n = match notified {
                    Notified::Yes => "frontend notified".to_string(),
                    Notified::NoFrontend => "no frontend connected".to_string(),
                    Notified::Failed(e) => {
                        format!("frontend not notified: {}", crate::error_chain(e))
                    }
                };
                format!(
                    "grew from {from} to {to} bytes ({} sectors); {n}",
                    to / crate::blk::SECTOR_SIZE
                )
            }
        }
    }
}

/// Everything a resize touches; one per daemon, shared by the signal and control threads.
#[derive(Debug)]
pub struct Resizer {
    path: PathBuf,
    file: Arc<File>,
    size: DeviceSize,
    /// The size must stay a multiple of this (logical block, O_DIRECT alignment).
    granularity: u64,
    /// The connected frontend, if any.
    link: Mutex<Option<Arc<FrontendLink>>>,
    /// One resize at a time.
    busy: Mutex<()>,
}

impl Resizer {
    pub fn new(path: PathBuf, file: Arc<File>, size: DeviceSize, granularity: u64) -> Self {
        Resizer {
            path,
            file,
            size,
            granularity: granularity.max(1),
            link: Mutex::new(None),
            busy: Mutex::new(()),
        }
    }

    /// The frontend now connected (`None` when it leaves).
    pub fn set_link(&self, link: Option<Arc<FrontendLink>>) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = link;
    }

    /// Re-reads the image size; on growth publishes it and notifies the frontend.
    pub fn resize(&self) -> Result<Resized, ResizeError> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let path = || self.path.clone();
        let now = current_size(&self.file).map_err(|e| ResizeError::Size(path(), e))?;
        let old = self.size.get();
        if now == old {
            return Ok(Resized::Unchanged { size: old });
        }
        if now < old {
            return Err(ResizeError::Shrunk {
                path: path(),
                from: old,
                to: now,
            });
        }
        if !now.is_multiple_of(self.granularity) {
            return Err(ResizeError::Unaligned {
                path: path(),
                size: now,
                granularity: self.granularity,
            });
        }
        self.size.set(now);
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let notified = match link {
            None => Notified::NoFrontend,
            Some(l) => match l.notify_config_change() {
                Ok(()) => Notified::Yes,
                Err(e) => Notified::Failed(e),
            },
        };
        Ok(Resized::Grown {
            from: old,
            to: now,
            notified,
        })
    }

    /// [`Self::resize`] with the outcome logged; returns the line logged.
    pub fn resize_logged(&self, why: &str) -> Result<String, String> {
        match self.resize() {
            Ok(r) => {
                let line = r.describe();
                match &r {
                    Resized::Grown {
                        notified: Notified::Failed(_),
                        ..
                    } => warn!("{why}: image {}: {line}", self.path.display()),
                    _ => info!("{why}: image {}: {line}", self.path.display()),
                }
                Ok(line)
            }
            Err(e) => {
                let line = crate::error_chain(&e);
                warn!("{why}: {line}");
                Err(line)
            }
        }
    }
}

/// The image's size now: the file length, or the block device's size.
fn current_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        crate::image::block_device_size(file)
    } else {
        Ok(meta.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_refuses_shrink_and_unaligned() {
        let dir = std::env::temp_dir().join(format!("vublk-resize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        let size = DeviceSize::new(1 << 20);
        let r = Resizer::new(
            p.clone(),
            Arc::new(f.try_clone().unwrap()),
            size.clone(),
            4096,
        );
        assert!(matches!(r.resize(), Ok(Resized::Unchanged { size: s }) if s == 1 << 20));
        f.set_len(2 << 20).unwrap();
        let out = r.resize().unwrap();
        assert!(matches!(
            out,
            Resized::Grown {
                from: 1048576,
                to: 2097152,
                notified: Notified::NoFrontend
            }
        ));
        assert_eq!(size.get(), 2 << 20);
        assert!(
            out.describe().contains("4096 sectors"),
            "{}",
            out.describe()
        );
        f.set_len((2 << 20) + 512).unwrap();
        assert!(matches!(r.resize(), Err(ResizeError::Unaligned { .. })));
        assert_eq!(size.get(), 2 << 20);
        f.set_len(1 << 20).unwrap();
        assert!(matches!(r.resize(), Err(ResizeError::Shrunk { .. })));
        assert_eq!(size.get(), 2 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
