//! Command line, following the vhost-user spec's backend program conventions
//! (`--socket-path`, `--fd`, `--print-capabilities`, `--blk-file`, `--read-only`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::engine::EngineKind;

#[derive(Debug, Parser)]
#[command(
    name = "vublk",
    version,
    about = "vhost-user-blk daemon: serves a disk image to QEMU, cloud-hypervisor or libblkio",
    after_help = "The socket comes from --socket-path, --fd, or systemd socket activation \
                  (LISTEN_FDS) when neither is given. RUST_LOG overrides --log-level.",
    args_override_self = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Cmd>,

    /// Read settings from FILE ("key = value" lines; keys are these flags without "--").
    /// Flags on the command line override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Listen on this UNIX socket path (a stale socket file is replaced; one held by a live
    /// process is refused).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Serve an already-bound, listening UNIX socket inherited as file descriptor N.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,

    /// Permissions of the --socket-path socket, in octal. Connecting needs write permission
    /// [default: 0600, or 0660 with --socket-group].
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,

    /// Group (name or gid) of the --socket-path socket, e.g. the group QEMU runs in.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Write the daemon's pid to PATH once it listens; removed on exit. A pidfile held by a
    /// running process is refused.
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,

    /// Serve statistics on this UNIX socket (line-based JSON; `vublk stats PATH` reads it).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Log a one-line I/O summary every SECS seconds when there was I/O (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub stats_interval: u64,

    /// Disk image to serve: a raw image file or a block device.
    #[arg(long, value_name = "IMAGE")]
    pub blk_file: Option<PathBuf>,

    /// Open the image read-only and offer VIRTIO_BLK_F_RO; writes fail with IOERR.
    #[arg(long)]
    pub read_only: bool,

    /// Allocate the image file's holes at start-up (fallocate), so guest writes overwrite
    /// allocated blocks instead of allocating them one by one; the space is reserved. Regular
    /// files only; a guest's DISCARD punches holes again.
    #[arg(long)]
    pub preallocate: bool,

    /// Do not take QEMU-compatible image locks (by default a second writer — vublk, QEMU or
    /// qemu-storage-daemon — is refused, and readers exclude writers).
    #[arg(long)]
    pub no_lock: bool,

    /// Queues offered (1-64). QEMU's vhost-user-blk-pci asks for one per vCPU by default, so
    /// this must be at least the VM's vCPU count; idle queues cost a sleeping thread each.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub num_queues: u16,

    /// Largest ring size a frontend may set (power of two, 64-32768).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub queue_size: u16,

    /// Serial returned by GET_ID (at most 20 bytes) [default: derived from the image path].
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,

    /// Logical block size the guest sees (512 or 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 512)]
    pub logical_block_size: u32,

    /// I/O engine: auto picks direct where O_DIRECT works on the image (not on tmpfs), else
    /// sync.
    #[arg(long, value_enum, default_value_t = EngineKind::Auto)]
    pub engine: EngineKind,

    /// After a kick, keep polling the ring (and engine completions) for N µs before sleeping;
    /// each batch found restarts the window. Trades a busy core for lower latency. 0 = off.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub poll_us: u32,

    /// Pin queue worker threads to these CPUs, e.g. "1" or "2-5,8"; queue i runs on the
    /// i-th CPU of the list (wrapping) [default: not pinned].
    #[arg(long, value_name = "LIST")]
    pub cpu_affinity: Option<String>,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

/// Subcommands (instead of serving a disk).
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Print a running daemon's I/O statistics from its --control-socket.
    Stats {
        /// The daemon's --control-socket path.
        #[arg(value_name = "CONTROL_SOCKET")]
        socket: PathBuf,
        /// Print the raw JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Tell a running daemon its image grew (after `truncate -s`, `qemu-img resize`,
    /// `lvextend`): it takes the new size and notifies the connected frontend. Same as SIGHUP.
    Resize {
        /// The daemon's --control-socket path.
        #[arg(value_name = "CONTROL_SOCKET")]
        socket: PathBuf,
    },
}
