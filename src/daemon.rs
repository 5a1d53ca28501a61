//! The daemon: listener, serve-again loop, signals, readiness notification.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{Error as DaemonLibError, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::blk::{DeviceGeometry, DeviceSize};
use crate::config::{Config, Listen};
use crate::control::{self, ControlServer};
use crate::engine::direct::{DirectEngine, DirectError, open_direct};
use crate::engine::sync::SyncEngine;
use crate::engine::{Engine, EngineKind};
use crate::image::{Image, ImageError};
use crate::relay::FrontendLink;
use crate::resize::Resizer;
use crate::service::{Pidfile, PidfileError, Stopper};
use crate::stats::{DeviceInfo, DeviceStats};
use crate::vhu_blk::{BackendError, QueueOpts, VhuBlk};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("socket {0} is in use by a running process (another vublk?); refusing to take it over")]
    SocketInUse(PathBuf),
    #[error("socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {fd}: {why}")]
    BadFd {
        what: &'static str,
        fd: RawFd,
        why: String,
    },
    #[error("cannot set the owner group/mode of socket {path}")]
    SocketAccess {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Pidfile(#[from] PidfileError),
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] io::Error),
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Direct(#[from] DirectError),
    #[error("image {0}")]
    Lock(PathBuf, #[source] crate::lock::LockError),
    #[error("vhost-user daemon: {0}")]
    VhostUser(String),
    #[error("final fdatasync of the image failed")]
    FinalSync(#[source] io::Error),
}

/// State shared with the signal thread.
struct Control {
    stop: AtomicBool,
    /// Wakes the background threads (watchdog, stats log).
    background: Arc<Stopper>,
    listen_fd: RawFd,
    conn: Mutex<Option<ShutdownHandle>>,
    resizer: Arc<Resizer>,
}

impl Control {
    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.background.stop();
        // shutdown() on a listening socket wakes a blocked accept() with EINVAL.
        // SAFETY: plain syscall on an fd that lives as long as `run`, which outlives this use.
        unsafe { libc::shutdown(self.listen_fd, libc::SHUT_RDWR) };
        if let Some(h) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.shutdown();
        }
    }
}

/// Sends a systemd notification if `NOTIFY_SOCKET` is set (no-op otherwise).
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.as_encoded_bytes();
    let addr = if let Some(name) = path.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
    } else {
        std::os::unix::net::SocketAddr::from_pathname(Path::new(std::ffi::OsStr::from_bytes(path)))
    };
    // Never block: a stalled service manager must not stall the daemon.
    let sent = addr.and_then(|a| {
        let s = UnixDatagram::unbound()?;
        s.set_nonblocking(true)?;
        s.send_to_addr(state.as_bytes(), &a)
    });
    if let Err(e) = sent {
        warn!("sd_notify {state:?} failed: {e}");
    }
}

use std::os::unix::ffi::OsStrExt;

/// Removes a socket file we created when dropped (every exit path after binding).
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Binds `path` (see [`bind_path`]) and gives it `mode` and group `gid`.
pub(crate) fn bind_path_with_access(
    path: &Path,
    mode: u32,
    gid: Option<libc::gid_t>,
) -> Result<UnixListener, DaemonError> {
    let l = crate::service::with_private_umask(|| bind_path(path))?;
    if let Err(source) = crate::service::set_socket_access(path, mode, gid) {
        let _ = std::fs::remove_file(path);
        return Err(DaemonError::SocketAccess {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(l)
}

/// Binds `path`, replacing a stale socket file but never a live one or a non-socket.
fn bind_path(path: &Path) -> Result<UnixListener, DaemonError> {
    let bind_err = |source| DaemonError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(l) => return Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => return Err(bind_err(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
    if !meta.file_type().is_socket() {
        return Err(DaemonError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(DaemonError::SocketInUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!("replacing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(bind_err)?;
            UnixListener::bind(path).map_err(bind_err)
        }
        Err(e) => Err(bind_err(e)),
    }
}

/// Takes over an inherited listening socket after checking it is one.
fn adopt_fd(fd: RawFd, what: &'static str) -> Result<UnixListener, DaemonError> {
    let bad = |why: String| DaemonError::BadFd { what, fd, why };
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`, a live local.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(bad(format!(
            "not a socket ({})",
            io::Error::last_os_error()
        )));
    }
    if val == 0 {
        return Err(bad("socket is not listening".into()));
    }
    let mut domain: libc::c_int = 0;
    // SAFETY: as above.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 || domain != libc::AF_UNIX {
        return Err(bad("not a UNIX socket".into()));
    }
    // SAFETY: the fd was handed to us to own (--fd convention); checked to be a listening
    // AF_UNIX socket above, and nothing else in this process uses it.
    let l = unsafe { UnixListener::from_raw_fd(fd) };
    // SAFETY: plain fcntl on an fd we now own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(l)
}

/// Blocks the termination signals in every thread (threads inherit the mask) and returns the
/// set for the signal thread to `sigwait` on.
fn block_signals() -> Result<libc::sigset_t, DaemonError> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; pthread_sigmask only reads it.
    let r = unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(DaemonError::Signals(io::Error::from_raw_os_error(r)));
    }
    Ok(set)
}

fn spawn_signal_thread(set: libc::sigset_t, ctl: Arc<Control>) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is an initialised sigset_t and `sig` a live local.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                match sig {
                    libc::SIGHUP => {
                        let _ = ctl.resizer.resize_logged("SIGHUP");
                    }
                    _ => {
                        info!("signal {sig}: shutting down");
                        ctl.request_stop();
                        return;
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(DaemonError::Signals)
}

fn open_engine(cfg: &Config, image: &Image) -> Result<Arc<dyn Engine>, DaemonError> {
    let engine = open_engine_kind(cfg, image)?;
    #[cfg(feature = "fault-injection")]
    let engine: Box<dyn Engine> = crate::engine::faulty::Faulty::wrap(engine);
    Ok(Arc::from(engine))
}

fn open_engine_kind(cfg: &Config, image: &Image) -> Result<Box<dyn Engine>, DaemonError> {
    let direct = || -> Result<DirectEngine, DaemonError> {
        let (file, align) = open_direct(&image.path, image.info.read_only)?;
        let e = DirectEngine::new(image, file, align, true)?;
        info!(
            "direct engine: O_DIRECT alignment: memory {} bytes, offset {} bytes",
            align.mem, align.offset
        );
        Ok(e)
    };
    Ok(match cfg.engine {
        EngineKind::Sync => Box::new(SyncEngine::new(image)),
        EngineKind::Direct => Box::new(direct()?),
        // tmpfs: O_DIRECT there only adds copies, so `auto` stays buffered.
        EngineKind::Auto if crate::image::on_tmpfs(&image.file) => {
            info!("engine auto: image is on tmpfs, using the sync (page cache) engine");
            Box::new(SyncEngine::new(image))
        }
        EngineKind::Auto => match direct() {
            Ok(e) => {
                info!("engine auto: using direct");
                Box::new(e)
            }
            Err(e) => {
                info!(
                    "engine auto: {}; using the sync engine",
                    crate::error_chain(&e)
                );
                Box::new(SyncEngine::new(image))
            }
        },
    })
}

/// Disconnect "errors" that are just a frontend going away.
fn is_normal_disconnect(e: &DaemonLibError) -> bool {
    matches!(
        e,
        DaemonLibError::HandleRequest(
            VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_)
        )
    )
}

/// Serves frontends one after another until SIGTERM/SIGINT.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let sigset = block_signals()?;
    let image = Image::open(&cfg.image, cfg.read_only, cfg.logical_block_size)?;
    if cfg.no_lock {
        warn!(
            "--no-lock: not locking {}; nothing stops a second writer",
            image.path.display()
        );
    } else {
        crate::lock::lock_image(&image.file, !cfg.read_only)
            .map_err(|e| DaemonError::Lock(image.path.clone(), e))?;
    }
    // After the lock (the image is ours) and before the engine, whose view of allocated pages
    // (the tmpfs mapping) is taken at start.
    if cfg.preallocate {
        let n = image.preallocate()?;
        info!(
            "--preallocate: allocated {} MiB of holes in {}",
            n >> 20,
            image.path.display()
        );
    }
    // A pidfile another daemon holds fails us before we touch any socket.
    let mut pidfile = cfg.pidfile.as_deref().map(Pidfile::claim).transpose()?;
    // Claim the socket before the engine logs anything: a second daemon on a live socket
    // should fail with its one-line error only.
    let (listener, socket_file) = match &cfg.listen {
        Listen::Path(p) => (
            bind_path_with_access(p, cfg.socket_mode, cfg.socket_gid)?,
            SocketFile(Some(p.clone())),
        ),
        Listen::Fd(fd) => (adopt_fd(*fd, "--fd")?, SocketFile(None)),
        Listen::Activated(fd) => (adopt_fd(*fd, "socket activation fd")?, SocketFile(None)),
    };
    let engine = open_engine(&cfg, &image)?;
    let info = engine.info().clone();
    let size = DeviceSize::new(info.size);
    let geo = DeviceGeometry {
        size: size.clone(),
        logical_block_size: cfg.logical_block_size,
        physical_block_size: info.physical_block_size.max(cfg.logical_block_size),
        num_queues: cfg.num_queues,
        queue_size: cfg.queue_size,
        read_only: info.read_only,
        discard: info.discard,
        write_zeroes: info.write_zeroes,
    };
    let stats = Arc::new(DeviceStats::new(
        usize::from(cfg.num_queues),
        DeviceInfo {
            image: std::fs::canonicalize(&image.path)
                .unwrap_or_else(|_| image.path.clone())
                .display()
                .to_string(),
            engine: engine.name().to_string(),
            size: size.clone(),
            read_only: info.read_only,
        },
    ));
    let resizer = Arc::new(Resizer::new(
        image.path.clone(),
        Arc::clone(&image.file),
        size,
        u64::from(cfg.logical_block_size).max(engine.size_granularity()),
    ));
    let control = match &cfg.control_socket {
        Some(p) => {
            let l = bind_path_with_access(p, 0o600, None)?;
            let ctx = Arc::new(control::Context {
                stats: Arc::clone(&stats),
                resizer: Some(Arc::clone(&resizer)),
            });
            let srv = ControlServer::start(p.clone(), l, ctx);
            Some(srv.map_err(|e| DaemonError::Thread("control socket", e))?)
        }
        None => None,
    };
    let ctl = Arc::new(Control {
        stop: AtomicBool::new(false),
        background: Arc::new(Stopper::default()),
        listen_fd: listener.as_raw_fd(),
        conn: Mutex::new(None),
        resizer,
    });
    spawn_signal_thread(sigset, Arc::clone(&ctl))?;
    if let Some(interval) = crate::service::watchdog_interval() {
        crate::service::spawn_watchdog(interval, Arc::clone(&stats), Arc::clone(&ctl.background))
            .map_err(|e| DaemonError::Thread("watchdog", e))?;
    }
    if let Some(interval) = cfg.stats_interval {
        let bg = Arc::clone(&ctl.background);
        crate::service::spawn_stats_logger(interval, Arc::clone(&stats), bg)
            .map_err(|e| DaemonError::Thread("stats log", e))?;
    }
    // We accept frontends ourselves (the relay sits behind the accept): block in accept(),
    // whatever mode an inherited fd came in.
    listener
        .set_nonblocking(false)
        .map_err(|e| DaemonError::VhostUser(format!("listener: {e}")))?;

    info!(
        "serving {} ({} bytes{}, engine {}, {} queues, discard {}, serial {:?}) on {}",
        image.path.display(),
        info.size,
        if info.read_only { ", read-only" } else { "" },
        engine.name(),
        cfg.num_queues,
        if info.discard { "on" } else { "off" },
        String::from_utf8_lossy(&cfg.serial),
        match &cfg.listen {
            Listen::Path(p) => format!("{} (mode {:04o})", p.display(), cfg.socket_mode),
            Listen::Fd(fd) => format!("fd {fd}"),
            Listen::Activated(fd) => format!("socket-activated fd {fd}"),
        }
    );
    if let Some(p) = pidfile.as_mut() {
        p.write_pid()?;
    }
    sd_notify("READY=1\nSTATUS=waiting for a frontend");

    let opts = QueueOpts {
        poll: std::time::Duration::from_micros(u64::from(cfg.poll_us)),
        cpus: cfg.cpus.clone(),
        stats: Arc::clone(&stats),
    };
    let result = serve_loop(&ctl, &listener, &*engine, &geo, &cfg.serial, &opts);
    sd_notify("STOPPING=1");
    ctl.background.stop();
    let synced = engine.sync_all().map_err(DaemonError::FinalSync);
    drop(control);
    drop(socket_file);
    drop(pidfile);
    result.and(synced)
}

fn accept_frontend(l: &UnixListener) -> io::Result<UnixStream> {
    loop {
        match l.accept() {
            Ok((s, _)) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Hands vhost-user-backend its end of a private connection and relays `frontend` to it.
fn start_relay(
    daemon: &mut VhostUserDaemon<VhuBlk>,
    frontend: UnixStream,
    link: &Arc<FrontendLink>,
    queue_size: u16,
) -> io::Result<std::thread::JoinHandle<()>> {
    let (mut private, ours) = crate::relay::private_connection()?;
    daemon
        .start(&mut private)
        .map_err(|e| io::Error::other(e.to_string()))?;
    // Nobody else may ever be accepted there.
    drop(private);
    crate::relay::spawn(frontend, ours, Arc::clone(link), queue_size)
}

fn serve_loop(
    ctl: &Control,
    listener: &UnixListener,
    engine: &dyn Engine,
    geo: &DeviceGeometry,
    serial: &[u8],
    opts: &QueueOpts,
) -> Result<(), DaemonError> {
    let mut conn_no = 0u64;
    while !ctl.stop.load(Ordering::SeqCst) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = VhuBlk::new(engine, geo.clone(), serial, mem.clone(), opts.clone())?;
        let mut daemon = VhostUserDaemon::new("vublk".into(), backend.clone(), mem)
            .map_err(|e| DaemonError::VhostUser(e.to_string()))?;
        for (i, h) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.completion_fd(i) {
                h.register_listener(fd, EventSet::IN, backend.completion_event())
                    .map_err(|e| DaemonError::VhostUser(format!("epoll add: {e}")))?;
            }
        }
        let frontend = match accept_frontend(listener) {
            Ok(s) => s,
            Err(_) if ctl.stop.load(Ordering::SeqCst) => break,
            Err(e) => return Err(DaemonError::VhostUser(format!("accept failed: {e}"))),
        };
        let link = Arc::new(FrontendLink::default());
        // Ours to shut down, so a relay stuck in a half-sent message still ends with the rest.
        let frontend_end = frontend.try_clone();
        let relay = match start_relay(&mut daemon, frontend, &link, geo.queue_size) {
            Ok(r) => r,
            Err(e) => {
                // Not the frontend's fault, and maybe passing (fds, threads): drop this one.
                error!("cannot serve a frontend: {e}");
                continue;
            }
        };
        ctl.resizer.set_link(Some(link));
        conn_no += 1;
        opts.stats.set_connected(true);
        info!("frontend #{conn_no} connected");
        sd_notify(&format!(
            "STATUS=serving frontend #{conn_no}, {} queues",
            geo.num_queues
        ));
        *ctl.conn.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        if ctl.stop.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        let res = daemon.wait();
        ctl.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        ctl.resizer.set_link(None);
        if let Ok(f) = &frontend_end {
            let _ = f.shutdown(std::net::Shutdown::Both);
        }
        let _ = relay.join();
        match res {
            Ok(()) => info!("frontend #{conn_no} disconnected"),
            Err(e) if is_normal_disconnect(&e) => info!("frontend #{conn_no} disconnected"),
            Err(e) => warn!("frontend #{conn_no} dropped: {e}"),
        }
        // Dropping the daemon stops and joins the queue threads; each finishes the kick it is
        // processing, so every request it took from the ring is completed first.
        drop(daemon);
        backend.close_exit_fds();
        opts.stats.set_connected(false);
        if let Err(e) = engine.sync_all() {
            error!("fdatasync after disconnect failed: {e}");
        }
        sd_notify("STATUS=waiting for a frontend");
    }
    Ok(())
}
