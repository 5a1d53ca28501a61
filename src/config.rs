//! Validated configuration: everything checkable without touching the image.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::args::Args;
use crate::engine::EngineKind;

/// Where the vhost-user socket comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// Bind this path ourselves.
    Path(PathBuf),
    /// An inherited listening socket (`--fd`).
    Fd(i32),
    /// The first socket passed by systemd socket activation (`LISTEN_FDS`).
    Activated(i32),
}

/// Owner-only: nobody but the daemon's user (and root) may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: Listen,
    pub image: PathBuf,
    pub read_only: bool,
    /// Allocate the image file's holes before serving.
    pub preallocate: bool,
    /// Skip image locking.
    pub no_lock: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Exactly what GET_ID returns, NUL-padded by the device to 20 bytes.
    pub serial: Vec<u8>,
    pub logical_block_size: u32,
    pub engine: EngineKind,
    pub log_level: log::LevelFilter,
    /// Busy-poll window after a kick (0: off).
    pub poll_us: u32,
    /// CPUs for queue workers (empty: no pinning).
    pub cpus: Vec<usize>,
    /// Mode and group given to a socket we bind (`Listen::Path`).
    pub socket_mode: u32,
    pub socket_gid: Option<u32>,
    pub pidfile: Option<PathBuf>,
    pub control_socket: Option<PathBuf>,
    /// Period of the log summary (`None`: off).
    pub stats_interval: Option<Duration>,
}

/// A flag combination or value we refuse; printed as one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("one of --socket-path or --fd is required (or start vublk through socket activation)")]
    NoSocket,
    #[error("--blk-file is required")]
    NoImage,
    #[error("--preallocate writes to the image; it cannot go with --read-only")]
    PreallocateReadOnly,
    #[error("--num-queues must be 1-64, got {0}")]
    NumQueues(u16),
    #[error("--queue-size must be a power of two in 64-32768, got {0}")]
    QueueSize(u16),
    #[error("--logical-block-size must be 512 or 4096, got {0}")]
    BlockSize(u32),
    #[error("--serial is {0} bytes; GET_ID holds at most 20")]
    SerialTooLong(usize),
    #[error("--fd {0} is not a valid descriptor number (need 3 or more)")]
    BadFd(i32),
    #[error("socket directory {0} does not exist")]
    SocketDir(PathBuf),
    #[error("unknown --log-level {0:?} (use error, warn, info, debug or trace)")]
    LogLevel(String),
    #[error("--cpu-affinity {0:?}: expected a CPU list like \"1\" or \"0-3,6\"")]
    CpuList(String),
    #[error("--poll-us {0} is more than 1000000 (one second)")]
    PollUs(u32),
    #[error("--socket-mode {0:?}: expected octal permissions like 0600 or 0660")]
    SocketMode(String),
    #[error("--socket-group {0:?}: no such group")]
    SocketGroup(String),
    #[error(
        "--socket-mode/--socket-group apply to --socket-path only; an inherited socket keeps \
         the permissions its creator gave it (SocketMode=/SocketGroup= in a .socket unit)"
    )]
    SocketAccessWithoutPath,
    #[error("{what} directory {dir} does not exist")]
    NoDir { what: &'static str, dir: PathBuf },
}

/// The directory a file at `p` goes in must exist.
fn parent_exists(p: &Path, what: &'static str) -> Result<(), ConfigError> {
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(ConfigError::NoDir { what, dir })
    }
}

/// "0660", "660" or "0o660" → 0o660; only permission bits.
pub fn parse_mode(s: &str) -> Option<u32> {
    let t = s.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    if t.is_empty() || t.len() > 4 {
        return None;
    }
    u32::from_str_radix(t, 8).ok().filter(|m| *m <= 0o777)
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        Config::new(a, 0)
    }
}

impl Config {
    /// Validates `a`; `activated_fds` is how many sockets systemd passed (see
    /// [`crate::service::take_listen_fds`]), used when neither --socket-path nor --fd is given.
    pub fn new(a: Args, activated_fds: u32) -> Result<Self, ConfigError> {
        let listen = match (a.socket_path, a.fd) {
            (Some(p), None) => {
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                if !dir.is_dir() {
                    return Err(ConfigError::SocketDir(dir));
                }
                Listen::Path(p)
            }
            (None, Some(fd)) if fd >= 3 => Listen::Fd(fd),
            (None, Some(fd)) => return Err(ConfigError::BadFd(fd)),
            (None, None) if activated_fds > 0 => {
                Listen::Activated(crate::service::LISTEN_FDS_START)
            }
            _ => return Err(ConfigError::NoSocket),
        };
        if !matches!(listen, Listen::Path(_))
            && (a.socket_mode.is_some() || a.socket_group.is_some())
        {
            return Err(ConfigError::SocketAccessWithoutPath);
        }
        let socket_gid = match &a.socket_group {
            Some(g) => Some(
                crate::service::lookup_group(g)
                    .ok_or_else(|| ConfigError::SocketGroup(g.clone()))?,
            ),
            None => None,
        };
        let socket_mode = match &a.socket_mode {
            Some(m) => parse_mode(m).ok_or_else(|| ConfigError::SocketMode(m.clone()))?,
            None if socket_gid.is_some() => 0o660,
            None => DEFAULT_SOCKET_MODE,
        };
        if let Some(p) = &a.pidfile {
            parent_exists(p, "pidfile")?;
        }
        if let Some(p) = &a.control_socket {
            parent_exists(p, "control socket")?;
        }
        let image = a.blk_file.ok_or(ConfigError::NoImage)?;
        if a.preallocate && a.read_only {
            return Err(ConfigError::PreallocateReadOnly);
        }
        if !(1..=64).contains(&a.num_queues) {
            return Err(ConfigError::NumQueues(a.num_queues));
        }
        if !a.queue_size.is_power_of_two() || a.queue_size < 64 {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        if a.logical_block_size != 512 && a.logical_block_size != 4096 {
            return Err(ConfigError::BlockSize(a.logical_block_size));
        }
        let serial = match a.serial {
            Some(s) if s.len() > 20 => return Err(ConfigError::SerialTooLong(s.len())),
            Some(s) => s.into_bytes(),
            None => default_serial(&image),
        };
        let log_level = a
            .log_level
            .parse()
            .map_err(|_| ConfigError::LogLevel(a.log_level.clone()))?;
        if a.poll_us > 1_000_000 {
            return Err(ConfigError::PollUs(a.poll_us));
        }
        let cpus = match &a.cpu_affinity {
            Some(l) => parse_cpu_list(l).ok_or_else(|| ConfigError::CpuList(l.clone()))?,
            None => Vec::new(),
        };
        Ok(Config {
            socket_mode,
            socket_gid,
            pidfile: a.pidfile,
            control_socket: a.control_socket,
            stats_interval: (a.stats_interval > 0).then(|| Duration::from_secs(a.stats_interval)),
            poll_us: a.poll_us,
            cpus,
            listen,
            image,
            read_only: a.read_only,
            preallocate: a.preallocate,
            no_lock: a.no_lock,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial,
            logical_block_size: a.logical_block_size,
            engine: a.engine,
            log_level,
        })
    }
}

/// "0-3,6" → [0, 1, 2, 3, 6]; `None` if malformed, empty, or beyond CPU_SETSIZE.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let v: usize = part.trim().parse().ok()?;
                (v, v)
            }
        };
        if lo > hi || hi >= libc::CPU_SETSIZE as usize {
            return None;
        }
        out.extend(lo..=hi);
    }
    (!out.is_empty()).then_some(out)
}

/// A stable id for an image: FNV-1a of its canonical path, so restarts and reconnects see the
/// same serial and `/dev/disk/by-id` links survive.
pub fn default_serial(image: &Path) -> Vec<u8> {
    let canon = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canon.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("vublk-{h:014x}").into_bytes()[..20].to_vec()
}

/// The vhost-user spec's `--print-capabilities` document for a block backend.
pub fn capabilities_json() -> &'static str {
    "{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\",\n    \"blk-file\"\n  ]\n}"
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["vublk"];
        v.extend_from_slice(extra);
        Config::try_from(Args::try_parse_from(v).expect("clap accepts"))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--socket-path", "/tmp/x.sock", "--blk-file", "/img"]).unwrap();
        assert_eq!(c.listen, Listen::Path("/tmp/x.sock".into()));
        assert_eq!(c.num_queues, 16);
        assert_eq!(c.queue_size, 1024);
        assert_eq!(c.logical_block_size, 512);
        assert_eq!(c.engine, EngineKind::Auto);
        assert_eq!(c.serial.len(), 20);
        assert!(c.serial.starts_with(b"vublk-"));
        assert_eq!(c.log_level, log::LevelFilter::Info);
        assert!(!c.preallocate);
    }

    #[test]
    fn preallocate_needs_a_writable_image() {
        let base = [
            "--socket-path",
            "/tmp/x.sock",
            "--blk-file",
            "/img",
            "--preallocate",
        ];
        assert!(parse(&base).unwrap().preallocate);
        let mut ro = base.to_vec();
        ro.push("--read-only");
        assert_eq!(parse(&ro), Err(ConfigError::PreallocateReadOnly));
    }

    #[test]
    fn spec_style_equals_flags() {
        let c = parse(&["--fd=3", "--blk-file=/img", "--read-only"]).unwrap();
        assert_eq!(c.listen, Listen::Fd(3));
        assert!(c.read_only);
    }

    #[test]
    fn rejects_bad_values() {
        let base = ["--socket-path", "/tmp/x.sock", "--blk-file", "/img"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert_eq!(with(&["--num-queues", "0"]), Err(ConfigError::NumQueues(0)));
        assert_eq!(
            with(&["--num-queues", "65"]),
            Err(ConfigError::NumQueues(65))
        );
        assert_eq!(
            with(&["--queue-size", "100"]),
            Err(ConfigError::QueueSize(100))
        );
        assert_eq!(
            with(&["--queue-size", "32"]),
            Err(ConfigError::QueueSize(32))
        );
        assert_eq!(
            with(&["--logical-block-size", "1024"]),
            Err(ConfigError::BlockSize(1024))
        );
        assert_eq!(
            with(&["--serial", "123456789012345678901"]),
            Err(ConfigError::SerialTooLong(21))
        );
        assert!(matches!(
            with(&["--log-level", "loud"]),
            Err(ConfigError::LogLevel(_))
        ));
        assert_eq!(parse(&["--blk-file", "/img"]), Err(ConfigError::NoSocket));
        assert_eq!(parse(&["--fd", "3"]), Err(ConfigError::NoImage));
        assert_eq!(
            parse(&["--fd", "1", "--blk-file", "/i"]),
            Err(ConfigError::BadFd(1))
        );
        assert_eq!(
            parse(&["--socket-path", "/nonexistent-dir/s", "--blk-file", "/i"]),
            Err(ConfigError::SocketDir("/nonexistent-dir".into()))
        );
    }

    #[test]
    fn serial_is_stable_and_explicit_wins() {
        assert_eq!(
            default_serial(Path::new("/a/b")),
            default_serial(Path::new("/a/b"))
        );
        assert_ne!(
            default_serial(Path::new("/a/b")),
            default_serial(Path::new("/a/c"))
        );
        let c = parse(&["--fd", "3", "--blk-file", "/i", "--serial", "disk0"]).unwrap();
        assert_eq!(c.serial, b"disk0");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("1"), Some(vec![1]));
        assert_eq!(parse_cpu_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list("5000"), None);
        let c = parse(&["--fd", "3", "--blk-file", "/i", "--cpu-affinity", "1,0"]).unwrap();
        assert_eq!(c.cpus, vec![1, 0]);
        assert!(matches!(
            parse(&["--fd", "3", "--blk-file", "/i", "--cpu-affinity", "a"]),
            Err(ConfigError::CpuList(_))
        ));
        assert_eq!(
            parse(&["--fd", "3", "--blk-file", "/i", "--poll-us", "2000000"]),
            Err(ConfigError::PollUs(2_000_000))
        );
    }

    #[test]
    fn service_flags() {
        let base = ["--socket-path", "/tmp/x.sock", "--blk-file", "/img"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        let c = with(&[]).unwrap();
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.socket_gid, None);
        assert_eq!(c.stats_interval, Some(Duration::from_secs(60)));
        assert_eq!(
            with(&["--stats-interval", "0"]).unwrap().stats_interval,
            None
        );
        let c = with(&["--socket-group", "root"]).unwrap();
        assert_eq!((c.socket_mode, c.socket_gid), (0o660, Some(0)));
        let c = with(&["--socket-mode", "0666", "--socket-group", "0"]).unwrap();
        assert_eq!(c.socket_mode, 0o666);
        assert_eq!(
            with(&["--socket-mode", "999"]),
            Err(ConfigError::SocketMode("999".into()))
        );
        assert_eq!(
            with(&["--socket-mode", "4755"]),
            Err(ConfigError::SocketMode("4755".into()))
        );
        assert_eq!(
            with(&["--socket-group", "no-such-group-vublk"]),
            Err(ConfigError::SocketGroup("no-such-group-vublk".into()))
        );
        assert_eq!(
            parse(&["--fd", "3", "--blk-file", "/i", "--socket-mode", "0600"]),
            Err(ConfigError::SocketAccessWithoutPath)
        );
        assert!(matches!(
            with(&["--pidfile", "/nonexistent-dir/p"]),
            Err(ConfigError::NoDir {
                what: "pidfile",
                ..
            })
        ));
        assert!(matches!(
            with(&["--control-socket", "/nonexistent-dir/c"]),
            Err(ConfigError::NoDir { .. })
        ));
        // The last value of a repeated flag wins (command line after config file).
        let c = with(&["--num-queues", "2", "--num-queues", "3"]).unwrap();
        assert_eq!(c.num_queues, 3);
        assert_eq!(parse_mode("0o640"), Some(0o640));
        assert_eq!(parse_mode(""), None);
    }

    #[test]
    fn socket_activation() {
        let a = Args::try_parse_from(["vublk", "--blk-file", "/i"]).unwrap();
        assert_eq!(Config::new(a, 1).unwrap().listen, Listen::Activated(3));
        let a = Args::try_parse_from(["vublk", "--blk-file", "/i"]).unwrap();
        assert_eq!(Config::new(a, 0), Err(ConfigError::NoSocket));
        // An explicit socket wins over an activation fd.
        let a = Args::try_parse_from(["vublk", "--fd", "4", "--blk-file", "/i"]).unwrap();
        assert_eq!(Config::new(a, 1).unwrap().listen, Listen::Fd(4));
    }

    #[test]
    fn backend_descriptor_matches_the_binary() {
        // The vhost-user spec's backend descriptor (installed in /usr/share/qemu/vhost-user/)
        // and --print-capabilities must agree, and name the binary the systemd unit runs.
        let desc: serde_json::Value =
            serde_json::from_str(include_str!("../share/qemu/vhost-user/50-vublk.json")).unwrap();
        assert_eq!(desc["type"], "block");
        assert!(desc["description"].as_str().is_some_and(|d| !d.is_empty()));
        let binary = desc["binary"].as_str().unwrap();
        assert!(
            include_str!("../systemd/vublk@.service").contains(&format!("ExecStart={binary} ")),
            "the unit runs another binary than {binary}"
        );
        let caps: serde_json::Value = serde_json::from_str(capabilities_json()).unwrap();
        assert_eq!(caps["type"], "block");
        assert_eq!(
            caps["features"],
            serde_json::json!(["read-only", "blk-file"])
        );
    }

    #[test]
    fn both_socket_kinds_conflict() {
        let r = Args::try_parse_from([
            "vublk",
            "--fd",
            "3",
            "--socket-path",
            "/s",
            "--blk-file",
            "/i",
        ]);
        assert!(r.is_err());
    }
}
