//! The frontend relay: vublk's own hop between the frontend's socket and vhost-user-backend.
//!
//! vhost-user-backend 0.24 speaks the protocol for us but keeps two things out of reach:
//! - the backend channel (SET_BACKEND_REQ_FD): it wraps the socket in a `vhost` `Backend` that
//!   cannot send CONFIG_CHANGE_MSG, which an online resize needs;
//! - SET_VRING_NUM: it acks any ring size, so a frontend never hears that 0, a size that is not
//!   a power of two, or one above our maximum is refused.
//!
//! So the daemon accepts the frontend itself and gives vhost-user-backend the far end of a
//! private connection. The relay forwards every message whole (header, payload, fds) and in
//! order, in both directions; on the way it records the negotiated protocol features, keeps a
//! duplicate of the backend-channel socket, and turns the ack of a refused SET_VRING_NUM into a
//! NACK. Only control messages pass here: rings, kicks and calls never touch the relay.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use vhost::vhost_user::Listener;
use vhost::vhost_user::message::{
    BackendReq, FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user header: request, flags, payload size (all u32, little-endian).
const HDR_LEN: usize = 12;
/// Largest payload we relay; the `vhost` crate refuses larger ones too (MAX_MSG_SIZE).
const MAX_PAYLOAD: usize = 0x1000;
/// Most fds one message may carry (the `vhost` crate's MAX_ATTACHED_FD_ENTRIES).
const MAX_FDS: usize = 32;
/// Header flag bits: protocol version 1, and the reply / need-reply markers.
const VERSION: u32 = 0x1;
/// How long a frontend may take to answer CONFIG_CHANGE_MSG.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the relay learned about one connection, shared with whoever needs to reach the frontend.
#[derive(Debug, Default)]
pub struct FrontendLink {
    /// Our duplicate of the backend-channel socket, once the frontend sent one.
    channel: Mutex<Option<UnixStream>>,
    /// Protocol features the frontend acked (SET_PROTOCOL_FEATURES).
    protocol_features: AtomicU64,
}

/// Why a config-change notification did not reach the frontend.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("the frontend did not set up a backend channel (protocol feature BACKEND_REQ)")]
    NoChannel,
    #[error("backend channel")]
    Io(#[source] io::Error),
    #[error("the frontend answered CONFIG_CHANGE_MSG with an unexpected message")]
    BadReply,
    #[error("the frontend refused CONFIG_CHANGE_MSG (status {0})")]
    Refused(u64),
}

impl FrontendLink {
    fn acked(&self, f: VhostUserProtocolFeatures) -> bool {
        self.protocol_features.load(Ordering::Acquire) & f.bits() != 0
    }

    /// Sends CONFIG_CHANGE_MSG on the backend channel; with REPLY_ACK, waits for the answer.
    /// The frontend then re-reads the config space (GET_CONFIG) and tells the guest.
    pub fn notify_config_change(&self) -> Result<(), NotifyError> {
        let guard = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        let sock = guard.as_ref().ok_or(NotifyError::NoChannel)?;
        let need_reply = self.acked(VhostUserProtocolFeatures::REPLY_ACK);
        let mut flags = VERSION;
        if need_reply {
            flags |= VhostUserHeaderFlag::NEED_REPLY.bits();
        }
        let code = u32::from(BackendReq::CONFIG_CHANGE_MSG);
        let hdr = header(code, flags, 0);
        sock.set_write_timeout(Some(CHANNEL_TIMEOUT))
            .and_then(|()| sock.set_read_timeout(Some(CHANNEL_TIMEOUT)))
            .and_then(|()| (&*sock).write_all(&hdr))
            .map_err(NotifyError::Io)?;
        if !need_reply {
            return Ok(());
        }
        let mut reply = [0u8; HDR_LEN + 8];
        (&*sock).read_exact(&mut reply).map_err(NotifyError::Io)?;
        let (r_code, r_flags, r_size) = parse_header(&reply);
        if r_code != code || r_flags & VhostUserHeaderFlag::REPLY.bits() == 0 || r_size != 8 {
            return Err(NotifyError::BadReply);
        }
        let mut v = [0u8; 8];
        v.copy_from_slice(&reply[HDR_LEN..]);
        match u64::from_le_bytes(v) {
            0 => Ok(()),
            e => Err(NotifyError::Refused(e)),
        }
    }
}

fn header(code: u32, flags: u32, size: u32) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0..4].copy_from_slice(&code.to_le_bytes());
    h[4..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&size.to_le_bytes());
    h
}

fn parse_header(b: &[u8]) -> (u32, u32, u32) {
    let word = |i: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[i..i + 4]);
        u32::from_le_bytes(w)
    };
    (word(0), word(4), word(8))
}

/// One vhost-user message with the fds that came with it.
struct Message {
    hdr: [u8; HDR_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn code(&self) -> u32 {
        parse_header(&self.hdr).0
    }

    fn flags(&self) -> u32 {
        parse_header(&self.hdr).1
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        let b = self.payload.get(off..off + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64_at(&self, off: usize) -> Option<u64> {
        Some(u64::from(self.u32_at(off)?) | (u64::from(self.u32_at(off + 4)?) << 32))
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads into `buf` completely, collecting any fds that arrive; `Ok(false)` on a clean EOF
/// before the first byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec covers `rest`, a live slice of `buf` we may write; the kernel writes
        // at most `rest.len()` bytes there and at most `raw.len()` fds into `raw`.
        let r = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        let (n, nfds) = match r {
            Ok(v) => v,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        };
        for &fd in &raw[..nfds] {
            // SAFETY: the kernel just installed this fd for us; nothing else owns it.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if fds.len() > MAX_FDS {
            return Err(invalid(format!("message with {} fds", fds.len())));
        }
        if n == 0 {
            if got == 0 && fds.is_empty() {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// The next whole message, or `None` when the peer closed between messages.
fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut fds = Vec::new();
    if !recv_exact(sock, &mut hdr, &mut fds)? {
        return Ok(None);
    }
    let size = parse_header(&hdr).2 as usize;
    if size > MAX_PAYLOAD {
        return Err(invalid(format!(
            "request {} with a {size}-byte payload",
            parse_header(&hdr).0
        )));
    }
    let mut payload = vec![0u8; size];
    if size > 0 {
        recv_exact(sock, &mut payload, &mut fds)?;
    }
    Ok(Some(Message { hdr, payload, fds }))
}

fn write_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let all: Vec<u8> = m.hdr.iter().chain(&m.payload).copied().collect();
    let sent = loop {
        match sock.send_with_fds(&[&all[..]], &raw) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    // The fds went with the first byte; a short send only leaves plain bytes.
    (&*sock).write_all(&all[sent..])
}

/// A listener only we can reach, and our connection to it, for vhost-user-backend (which only
/// accepts from a [`Listener`]). The listener is autobound to a fresh abstract address with a
/// backlog of one, and we connect without blocking straight away: if that succeeds the queue
/// held nothing else (a stranger who got in first would have filled it and failed ours), so the
/// one connection vhost-user-backend accepts is ours. Drop the listener right after that accept.
pub fn private_connection() -> io::Result<(Listener, UnixStream)> {
    let mut last = io::Error::from(io::ErrorKind::WouldBlock);
    for _ in 0..8 {
        match try_private_connection() {
            Ok(v) => return Ok(v),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

fn unix_socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn try_private_connection() -> io::Result<(Listener, UnixStream)> {
    let lfd = unix_socket(0)?;
    // SAFETY: sockaddr_un is plain data; an all-zero one with the family set is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let family_len = std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t;
    // SAFETY: binding our own socket; an address of just the family asks for autobind.
    check(unsafe { libc::bind(lfd.as_raw_fd(), (&raw const addr).cast(), family_len) })?;
    // SAFETY: listen(2) on our own bound socket.
    check(unsafe { libc::listen(lfd.as_raw_fd(), 0) })?;
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`, a live local.
    check(unsafe { libc::getsockname(lfd.as_raw_fd(), (&raw mut addr).cast(), &mut len) })?;
    let cfd = unix_socket(libc::SOCK_NONBLOCK)?;
    // SAFETY: `addr`/`len` are what getsockname returned for the listener.
    check(unsafe { libc::connect(cfd.as_raw_fd(), (&raw const addr).cast(), len) })?;
    let stream = UnixStream::from(cfd);
    stream.set_nonblocking(false)?;
    Ok((Listener::from(UnixListener::from(lfd)), stream))
}

/// Relays one connection until either side closes; returns the thread running it.
pub fn spawn(
    frontend: UnixStream,
    backend: UnixStream,
    link: Arc<FrontendLink>,
    max_queue_size: u16,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            let mut r = Relay {
                frontend,
                backend,
                link,
                max_queue_size: u32::from(max_queue_size),
                nacks: 0,
            };
            if let Err(e) = r.run() {
                debug!("relay: {e}");
            }
            let _ = r.frontend.shutdown(std::net::Shutdown::Both);
            let _ = r.backend.shutdown(std::net::Shutdown::Both);
        })
}

struct Relay {
    frontend: UnixStream,
    backend: UnixStream,
    link: Arc<FrontendLink>,
    max_queue_size: u32,
    /// SET_VRING_NUM acks still to be turned into NACKs, oldest first (replies come in order).
    nacks: u32,
}

impl Relay {
    fn run(&mut self) -> io::Result<()> {
        loop {
            let mut pfd = [
                libc::pollfd {
                    fd: self.frontend.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.backend.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `pfd` is a live array of two pollfds.
            if unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if pfd[0].revents != 0 {
                let Some(m) = read_message(&self.frontend)? else {
                    return Ok(());
                };
                self.request(&m);
                write_message(&self.backend, &m)?;
            }
            if pfd[1].revents != 0 {
                let Some(mut m) = read_message(&self.backend)? else {
                    return Ok(());
                };
                self.reply(&mut m);
                write_message(&self.frontend, &m)?;
            }
        }
    }

    /// Notes what we need from a frontend request (which is forwarded unchanged).
    fn request(&mut self, m: &Message) {
        let code = m.code();
        if code == u32::from(FrontendReq::SET_PROTOCOL_FEATURES) {
            if let Some(f) = m.u64_at(0) {
                self.link.protocol_features.store(f, Ordering::Release);
            }
        } else if code == u32::from(FrontendReq::SET_BACKEND_REQ_FD) {
            if let [fd] = &m.fds[..] {
                match fd.try_clone() {
                    Ok(dup) => {
                        *self.link.channel.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(UnixStream::from(dup));
                    }
                    Err(e) => warn!("cannot keep the backend channel: {e}"),
                }
            }
        } else if code == u32::from(FrontendReq::SET_VRING_NUM) {
            let (Some(index), Some(num)) = (m.u32_at(0), m.u32_at(4)) else {
                return;
            };
            if num == 0 || !num.is_power_of_two() || num > self.max_queue_size {
                warn!(
                    "SET_VRING_NUM {num} for queue {index}: not a power of two in 1..={}; \
                     that ring will not be served",
                    self.max_queue_size
                );
                if m.flags() & VhostUserHeaderFlag::NEED_REPLY.bits() != 0 {
                    self.nacks += 1;
                }
            }
        }
    }

    /// Rewrites a reply where we must (the ack of a refused SET_VRING_NUM becomes a NACK).
    fn reply(&mut self, m: &mut Message) {
        if self.nacks > 0 && m.code() == u32::from(FrontendReq::SET_VRING_NUM) {
            self.nacks -= 1;
            if m.payload.len() == 8 {
                m.payload.copy_from_slice(&1u64.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = header(code, flags, payload.len() as u32).to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn private_connection_is_accepted_once() {
        let (l, mut c) = private_connection().unwrap();
        let mut s = l.accept().unwrap().unwrap();
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
    }

    #[test]
    fn relays_fds_and_nacks_a_bad_ring_size() {
        let (fe, fe_peer) = UnixStream::pair().unwrap();
        let (be, be_peer) = UnixStream::pair().unwrap();
        let link = Arc::new(FrontendLink::default());
        let t = spawn(fe_peer, be_peer, Arc::clone(&link), 256).unwrap();
        let need = VERSION | VhostUserHeaderFlag::NEED_REPLY.bits();
        // SET_PROTOCOL_FEATURES is recorded and forwarded byte for byte.
        let feats = VhostUserProtocolFeatures::REPLY_ACK.bits();
        let m = msg(
            u32::from(FrontendReq::SET_PROTOCOL_FEATURES),
            need,
            &feats.to_le_bytes(),
        );
        (&fe).write_all(&m).unwrap();
        let got = read_message(&be).unwrap().unwrap();
        assert_eq!([&got.hdr[..], &got.payload[..]].concat(), m);
        // SET_BACKEND_REQ_FD: the fd arrives at the backend and the link keeps a duplicate.
        let (chan_ours, chan_theirs) = UnixStream::pair().unwrap();
        let m = msg(u32::from(FrontendReq::SET_BACKEND_REQ_FD), VERSION, &[]);
        fe.send_with_fds(&[&m[..]], &[chan_theirs.as_raw_fd()])
            .unwrap();
        let got = read_message(&be).unwrap().unwrap();
        assert_eq!(got.fds.len(), 1);
        // SET_VRING_NUM 100 with NEED_REPLY: the backend's ack comes back as a NACK.
        let mut st = 0u32.to_le_bytes().to_vec();
        st.extend_from_slice(&100u32.to_le_bytes());
        let m = msg(u32::from(FrontendReq::SET_VRING_NUM), need, &st);
        (&fe).write_all(&m).unwrap();
        read_message(&be).unwrap().unwrap();
        let reply_flags = VERSION | VhostUserHeaderFlag::REPLY.bits();
        let ack = msg(
            u32::from(FrontendReq::SET_VRING_NUM),
            reply_flags,
            &0u64.to_le_bytes(),
        );
        (&be).write_all(&ack).unwrap();
        let got = read_message(&fe).unwrap().unwrap();
        assert_eq!(got.u64_at(0), Some(1));
        // A good size keeps its ack.
        st[4..].copy_from_slice(&128u32.to_le_bytes());
        (&fe)
            .write_all(&msg(u32::from(FrontendReq::SET_VRING_NUM), need, &st))
            .unwrap();
        read_message(&be).unwrap().unwrap();
        (&be).write_all(&ack).unwrap();
        assert_eq!(read_message(&fe).unwrap().unwrap().u64_at(0), Some(0));
        // CONFIG_CHANGE_MSG goes out on the kept channel, and waits for the ack.
        let answer = std::thread::spawn(move || {
            let mut h = [0u8; HDR_LEN];
            (&chan_ours).read_exact(&mut h).unwrap();
            let (code, flags, size) = parse_header(&h);
            let reply = msg(code, reply_flags, &0u64.to_le_bytes());
            (&chan_ours).write_all(&reply).unwrap();
            (code, flags, size)
        });
        link.notify_config_change().unwrap();
        let (code, flags, size) = answer.join().unwrap();
        assert_eq!(code, u32::from(BackendReq::CONFIG_CHANGE_MSG));
        assert_eq!(flags, need);
        assert_eq!(size, 0);
        // The frontend going away ends the relay and closes the backend side.
        drop(fe);
        t.join().unwrap();
        assert!(read_message(&be).unwrap().is_none());
    }

    #[test]
    fn oversized_and_truncated_messages_end_the_relay() {
        for bad in [
            header(1, VERSION, (MAX_PAYLOAD + 1) as u32).to_vec(),
            msg(5, VERSION, &[0u8; 16])[..20].to_vec(),
        ] {
            let (fe, fe_peer) = UnixStream::pair().unwrap();
            let (be, be_peer) = UnixStream::pair().unwrap();
            let t = spawn(fe_peer, be_peer, Arc::default(), 256).unwrap();
            (&fe).write_all(&bad).unwrap();
            fe.shutdown(std::net::Shutdown::Write).unwrap();
            t.join().unwrap();
            assert!(read_message(&be).unwrap().is_none());
        }
    }

    #[test]
    fn notify_without_a_channel() {
        let link = FrontendLink::default();
        assert!(matches!(
            link.notify_config_change(),
            Err(NotifyError::NoChannel)
        ));
    }
}
