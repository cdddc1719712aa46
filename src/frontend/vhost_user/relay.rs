//! Control-socket relay between the front end (QEMU, DPDK virtio-user, ...)
//! and rust-vmm's vhost-user daemon.
//!
//! Why: QEMU (`-netdev vhost-user,queues=N` + `mq=on`) disables the extra
//! queue pairs with VHOST_USER_SET_VRING_ENABLE at device realize time,
//! before any VHOST_USER_SET_FEATURES: it treats VHOST_USER_F_PROTOCOL_FEATURES
//! as negotiated as soon as the back end offers it. vhost 0.18's request
//! handler only accepts SET_VRING_ENABLE once that bit was acked by
//! SET_FEATURES, fails with InactiveFeature, and vhost-user-backend then drops
//! the connection. The relay answers such early requests itself: vrings start
//! disabled in vhost-user-backend, and a front end that acks
//! PROTOCOL_FEATURES enables its rings explicitly later, so absorbing an early
//! disable changes nothing. An early enable is kept and replayed right after
//! SET_FEATURES, where the daemon handles it for real.
//!
//! The relay also shows the frontend what rust-vmm keeps to itself but
//! migration needs ([`Hooks`]): the dirty-log fd of SET_LOG_BASE, the
//! used-ring log address of SET_VRING_ADDR, and SEND_RARP, which the vhost
//! crate does not implement and which is answered here.
//!
//! Everything else is forwarded unchanged, with its SCM_RIGHTS fds, in both
//! directions. The daemon runs unmodified on the other end of a private
//! socket pair made through a short-lived abstract-namespace listener (it
//! can only start from a `Listener` or a path).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, trace, warn};
use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vhost::vhost_user::Listener;

/// request, flags, size: three native-endian u32.
pub const HDR_LEN: usize = 12;
/// Largest payload accepted: what the daemon itself accepts.
pub const MAX_PAYLOAD: usize = MAX_MSG_SIZE;
/// Most fds one message may carry: what the daemon itself receives.
pub const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;

pub const REQ_SET_FEATURES: u32 = 2;
pub const REQ_SET_LOG_BASE: u32 = 6;
pub const REQ_SET_VRING_ADDR: u32 = 9;
pub const REQ_SEND_RARP: u32 = 19;
pub const REQ_RESET_OWNER: u32 = 4;
pub const REQ_SET_MEM_TABLE: u32 = 5;
pub const REQ_GET_VRING_BASE: u32 = 11;
pub const REQ_SET_VRING_KICK: u32 = 12;
pub const REQ_RESET_DEVICE: u32 = 34;
pub const REQ_ADD_MEM_REG: u32 = 37;
pub const REQ_REM_MEM_REG: u32 = 38;
/// SET_VRING_ADDR flags: log used-ring writes at log_guest_addr.
pub const VHOST_VRING_F_LOG: u32 = 1;
pub const REQ_SET_PROTOCOL_FEATURES: u32 = 16;
pub const REQ_SET_VRING_ENABLE: u32 = 18;

pub const FLAG_VERSION: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;

const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadMessage {
    #[error("payload size {0} exceeds {MAX_PAYLOAD}")]
    TooBig(u32),
}

pub fn parse_header(b: &[u8; HDR_LEN]) -> Result<Header, BadMessage> {
    let word = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
    let h = Header {
        request: word(0),
        flags: word(4),
        size: word(8),
    };
    if h.size as usize > MAX_PAYLOAD {
        return Err(BadMessage::TooBig(h.size));
    }
    Ok(h)
}

/// The REPLY_ACK answer (success) to `req`.
pub fn ack_reply(req: &Header) -> [u8; HDR_LEN + 8] {
    let mut r = [0u8; HDR_LEN + 8];
    r[0..4].copy_from_slice(&req.request.to_ne_bytes());
    r[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_ne_bytes());
    r[8..12].copy_from_slice(&8u32.to_ne_bytes());
    // r[12..20]: u64 0 = success.
    r
}

/// A reply with no payload to `req`.
pub fn empty_reply(req: &Header) -> Vec<u8> {
    let mut r = vec![0u8; HDR_LEN];
    r[0..4].copy_from_slice(&req.request.to_ne_bytes());
    r[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_ne_bytes());
    r
}

fn payload_u64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_ne_bytes(payload.get(0..8)?.try_into().ok()?))
}

/// What the frontend learns from control messages the daemon handles
/// without telling the backend.
pub trait Hooks: Send + Sync {
    /// SET_LOG_BASE: the dirty log is `size` bytes of `fd` from `offset`.
    /// Called before the relay replies, so the log is mapped by then; false
    /// ends the connection (acking a log we cannot write would let the
    /// migration corrupt the guest).
    fn set_log_base(&self, fd: &OwnedFd, size: u64, offset: u64) -> bool;
    /// SET_VRING_ADDR: where used-ring writes of `index` must be logged
    /// (None without VHOST_VRING_F_LOG).
    fn set_vring_log(&self, index: u32, log_addr: Option<u64>);
    /// SEND_RARP: announce `mac` out of the backend.
    fn send_rarp(&self, mac: [u8; 6]);
}

/// A parsed control message the hooks care about.
#[derive(Debug, PartialEq, Eq)]
pub enum Observed {
    LogBase { size: u64, offset: u64 },
    VringLog { index: u32, log_addr: Option<u64> },
    Rarp([u8; 6]),
}

/// Recognise the messages [`Hooks`] reports; None for the rest or for a
/// payload too short to be what it claims (the daemon rejects those).
pub fn observe(hdr: &Header, payload: &[u8]) -> Option<Observed> {
    let u64_at = |o: usize| Some(u64::from_ne_bytes(payload.get(o..o + 8)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_ne_bytes(payload.get(o..o + 4)?.try_into().ok()?));
    match hdr.request {
        REQ_SET_LOG_BASE => Some(Observed::LogBase {
            size: u64_at(0)?,
            offset: u64_at(8)?,
        }),
        // index, flags, desc, used, avail, log (struct vhost_vring_addr).
        REQ_SET_VRING_ADDR => {
            let (index, flags, log) = (u32_at(0)?, u32_at(4)?, u64_at(32)?);
            Some(Observed::VringLog {
                index,
                log_addr: (flags & VHOST_VRING_F_LOG != 0).then_some(log),
            })
        }
        REQ_SEND_RARP => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(payload.get(0..6)?);
            Some(Observed::Rarp(mac))
        }
        _ => None,
    }
}

/// What to do with one front-end message.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send it to the daemon, then these messages (replayed early enables).
    Forward { then: Vec<Vec<u8>> },
    /// Keep it from the daemon; answer the front end with `reply` if any.
    Absorb { reply: Option<Vec<u8>> },
}

/// Per-connection state of the front end -> daemon direction.
#[derive(Debug, Default)]
pub struct FrontState {
    features_set: bool,
    reply_ack: bool,
    /// Early "enable" requests as (vring index, message without NEED_REPLY).
    pending_enables: Vec<(u32, Vec<u8>)>,
    /// Per vring: the ring addresses (desc, used, avail) last forwarded, and
    /// whether the ring was started (SET_VRING_KICK) since, with the memory
    /// table unchanged. See REQ_SET_VRING_ADDR in `decide`.
    rings: Vec<RingSeen>,
}

#[derive(Debug, Default, Clone, Copy)]
struct RingSeen {
    addrs: Option<[u8; 24]>,
    running: bool,
}

impl FrontState {
    /// `msg` is one whole message (header + payload).
    pub fn decide(&mut self, hdr: &Header, msg: &[u8]) -> Decision {
        let payload = &msg[HDR_LEN.min(msg.len())..];
        match hdr.request {
            REQ_SET_PROTOCOL_FEATURES => {
                if let Some(v) = payload_u64(payload) {
                    self.reply_ack = v & PROTOCOL_F_REPLY_ACK != 0;
                }
                Decision::Forward { then: Vec::new() }
            }
            REQ_SET_FEATURES => {
                self.features_set = true;
                let pending = mem::take(&mut self.pending_enables);
                let acked = payload_u64(payload).unwrap_or(0);
                // Without PROTOCOL_FEATURES the daemon enables every ring
                // itself and would reject SET_VRING_ENABLE: nothing to replay.
                let then = if acked & F_PROTOCOL_FEATURES != 0 {
                    pending.into_iter().map(|(_, m)| m).collect()
                } else {
                    Vec::new()
                };
                Decision::Forward { then }
            }
            // The log is ours (the hook mapped it). rust-vmm's handler would
            // fail this for a backend without vm-memory bitmaps and drop the
            // connection. The reply carries no payload (what QEMU reads,
            // and what DPDK sends).
            REQ_SET_LOG_BASE => Decision::Absorb {
                reply: Some(empty_reply(hdr)),
            },
            // vhost 0.18 has no SEND_RARP handler (it would end the
            // connection): the hook sends the RARP and we answer.
            REQ_SEND_RARP => {
                let reply = (self.reply_ack && hdr.flags & FLAG_NEED_REPLY != 0)
                    .then(|| ack_reply(hdr).to_vec());
                Decision::Absorb { reply }
            }
            // QEMU re-sends SET_VRING_ADDR to a running ring to switch
            // used-ring logging on or off around a migration. rust-vmm's
            // handler then re-reads used->idx from guest memory and stores
            // it as next_used under a separate lock: a burst published in
            // between is undone, used entries the guest already took are
            // written again and the guest marks the ring broken. The only
            // news in such a message is the log flag and address, which
            // the hooks already took (observe), so it is answered here.
            REQ_SET_VRING_ADDR if payload.len() >= 40 => {
                let index = u32::from_ne_bytes(payload[0..4].try_into().unwrap()) as usize;
                let addrs: [u8; 24] = payload[8..32].try_into().unwrap();
                if index < 1024 && self.rings.len() <= index {
                    self.rings.resize(index + 1, RingSeen::default());
                }
                match self.rings.get_mut(index) {
                    Some(r) if r.running && r.addrs == Some(addrs) => {
                        debug!("relay: SET_VRING_ADDR for running vring {index} only changes logging: answered here");
                        let reply = (self.reply_ack && hdr.flags & FLAG_NEED_REPLY != 0)
                            .then(|| ack_reply(hdr).to_vec());
                        Decision::Absorb { reply }
                    }
                    Some(r) => {
                        *r = RingSeen {
                            addrs: Some(addrs),
                            running: false,
                        };
                        Decision::Forward { then: Vec::new() }
                    }
                    None => Decision::Forward { then: Vec::new() },
                }
            }
            REQ_SET_VRING_KICK => {
                // Payload: u64 index (bits 0-7) and the no-fd flag.
                if let Some(r) =
                    payload_u64(payload).and_then(|v| self.rings.get_mut((v & 0xff) as usize))
                {
                    r.running = r.addrs.is_some();
                }
                Decision::Forward { then: Vec::new() }
            }
            REQ_GET_VRING_BASE => {
                if let Some(r) = payload_u64(payload)
                    .and_then(|v| self.rings.get_mut((v & 0xffff_ffff) as usize))
                {
                    r.running = false;
                }
                Decision::Forward { then: Vec::new() }
            }
            // Ring addresses are translated through the memory table: after
            // a change the same addresses may mean other guest memory.
            REQ_SET_MEM_TABLE | REQ_ADD_MEM_REG | REQ_REM_MEM_REG | REQ_RESET_OWNER
            | REQ_RESET_DEVICE => {
                self.rings.clear();
                Decision::Forward { then: Vec::new() }
            }
            REQ_SET_VRING_ENABLE if !self.features_set && payload.len() >= 8 => {
                let index = u32::from_ne_bytes(payload[0..4].try_into().unwrap());
                let num = u32::from_ne_bytes(payload[4..8].try_into().unwrap());
                // A later request for the same ring supersedes an earlier one.
                self.pending_enables.retain(|(i, _)| *i != index);
                if num == 1 {
                    // We answer now, so the replay must not be answered again.
                    let mut m = msg.to_vec();
                    m[4..8].copy_from_slice(&(hdr.flags & !FLAG_NEED_REPLY).to_ne_bytes());
                    self.pending_enables.push((index, m));
                }
                debug!(
                    "relay: SET_VRING_ENABLE(vring {index}, {num}) before SET_FEATURES answered here{}",
                    if num == 1 {
                        ", replayed after SET_FEATURES"
                    } else {
                        " (rings start disabled)"
                    }
                );
                let reply = (self.reply_ack && hdr.flags & FLAG_NEED_REPLY != 0)
                    .then(|| ack_reply(hdr).to_vec());
                Decision::Absorb { reply }
            }
            _ => Decision::Forward { then: Vec::new() },
        }
    }
}

/// One message and the fds that came with it.
pub struct Msg {
    pub hdr: Header,
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// recvmsg into `buf`, appending any fds to `fds`. Returns bytes read.
fn recv_some(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    const CMSG_LEN: usize = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
    // u64 array: cmsghdr needs 8-byte alignment.
    let mut cbuf = [0u64; CMSG_LEN.div_ceil(8)];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is valid; pointers below outlive the call.
        let mut mh: libc::msghdr = unsafe { mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = CMSG_LEN as _;
        // SAFETY: mh describes valid buffers.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // Take ownership of every fd first so none leaks on the error below.
        // SAFETY: CMSG_* walk the control buffer the kernel filled in.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        if mh.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(bad(format!("more than {MAX_FDS} fds in one message")));
        }
        return Ok(n as usize);
    }
}

/// Fill `buf` completely. Ok(false) on EOF before the first byte.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = recv_some(sock, &mut buf[got..], fds)?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a message",
            ));
        }
        got += n;
    }
    Ok(true)
}

/// Read one whole message; Ok(None) when the peer closed between messages.
pub fn recv_msg(sock: &UnixStream) -> io::Result<Option<Msg>> {
    let mut fds = Vec::new();
    let mut h = [0u8; HDR_LEN];
    if !recv_exact(sock, &mut h, &mut fds)? {
        return Ok(None);
    }
    let hdr = parse_header(&h).map_err(|e| {
        let req = u32::from_ne_bytes(h[0..4].try_into().unwrap());
        bad(format!("request {req}: {e}"))
    })?;
    let mut bytes = vec![0u8; HDR_LEN + hdr.size as usize];
    bytes[..HDR_LEN].copy_from_slice(&h);
    if !recv_exact(sock, &mut bytes[HDR_LEN..], &mut fds)? && hdr.size > 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a message",
        ));
    }
    if fds.len() > MAX_FDS {
        return Err(bad(format!("{} fds in one message", fds.len())));
    }
    Ok(Some(Msg { hdr, bytes, fds }))
}

/// Write one whole message, fds on its first byte (where the receiver's
/// header read picks them up).
pub fn send_msg(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let clen = if raw.is_empty() {
        0
    } else {
        // SAFETY: pure size computation.
        unsafe { libc::CMSG_SPACE((raw.len() * 4) as u32) as usize }
    };
    let mut cbuf = vec![0u64; clen.div_ceil(8)];
    let mut sent = 0;
    while sent < bytes.len() {
        let mut iov = libc::iovec {
            iov_base: bytes[sent..].as_ptr() as *mut _,
            iov_len: bytes.len() - sent,
        };
        // SAFETY: zeroed msghdr is valid; pointers below outlive the call.
        let mut mh: libc::msghdr = unsafe { mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if sent == 0 && clen > 0 {
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = clen as _;
            // SAFETY: the buffer holds CMSG_SPACE(len) bytes, 8-aligned.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((raw.len() * 4) as u32) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr(),
                    libc::CMSG_DATA(c) as *mut RawFd,
                    raw.len(),
                );
            }
        }
        // SAFETY: mh describes valid buffers.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// A running relay: two threads, one per direction.
pub struct Relay {
    front: Arc<UnixStream>,
    back: Arc<UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

fn close_both(a: &UnixStream, b: &UnixStream) {
    let _ = a.shutdown(std::net::Shutdown::Both);
    let _ = b.shutdown(std::net::Shutdown::Both);
}

impl Relay {
    /// Relay between `front` (the front end's connection) and `back` (our
    /// end of the daemon's connection).
    pub fn start(front: UnixStream, back: UnixStream, hooks: Arc<dyn Hooks>) -> io::Result<Relay> {
        let front = Arc::new(front);
        let back = Arc::new(back);
        // Both threads write to the front end (replies, our own acks).
        let front_tx = Arc::new(Mutex::new(()));

        let (f, b, lock) = (front.clone(), back.clone(), front_tx.clone());
        let to_back = std::thread::Builder::new()
            .name("vu-relay-req".into())
            .spawn(move || {
                if let Err(e) = front_to_back(&f, &b, &lock, &*hooks) {
                    warn!("vhost-user relay: front end -> back end: {e}; closing the connection");
                }
                close_both(&f, &b);
            })?;
        let (f, b, lock) = (front.clone(), back.clone(), front_tx);
        let to_front = std::thread::Builder::new()
            .name("vu-relay-reply".into())
            .spawn(move || {
                if let Err(e) = back_to_front(&b, &f, &lock) {
                    warn!("vhost-user relay: back end -> front end: {e}; closing the connection");
                }
                close_both(&f, &b);
            });
        let to_front = match to_front {
            Ok(t) => t,
            Err(e) => {
                close_both(&front, &back);
                let _ = to_back.join();
                return Err(e);
            }
        };
        Ok(Relay {
            front,
            back,
            threads: vec![to_back, to_front],
        })
    }

    /// Close both connections and wait for the relay threads.
    pub fn finish(mut self) {
        close_both(&self.front, &self.back);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        close_both(&self.front, &self.back);
    }
}

fn front_to_back(
    front: &UnixStream,
    back: &UnixStream,
    front_tx: &Mutex<()>,
    hooks: &dyn Hooks,
) -> io::Result<()> {
    let mut state = FrontState::default();
    while let Some(m) = recv_msg(front)? {
        trace!("relay: front end -> {:?} fds={}", m.hdr, m.fds.len());
        match observe(&m.hdr, &m.bytes[HDR_LEN.min(m.bytes.len())..]) {
            Some(Observed::LogBase { size, offset }) => {
                let ok = match m.fds.first() {
                    Some(fd) => hooks.set_log_base(fd, size, offset),
                    None => false,
                };
                if !ok {
                    return Err(bad("SET_LOG_BASE: no usable dirty log".into()));
                }
            }
            Some(Observed::VringLog { index, log_addr }) => hooks.set_vring_log(index, log_addr),
            Some(Observed::Rarp(mac)) => hooks.send_rarp(mac),
            None => {}
        }
        match state.decide(&m.hdr, &m.bytes) {
            Decision::Forward { then } => {
                send_msg(back, &m.bytes, &m.fds)?;
                for replay in then {
                    send_msg(back, &replay, &[])?;
                }
            }
            Decision::Absorb { reply } => {
                // Requests that would need an answer are answered in order
                // by front ends (QEMU waits for each), so no daemon reply
                // can be in flight ahead of this one.
                if let Some(r) = reply {
                    let _g = front_tx.lock().unwrap();
                    send_msg(front, &r, &[])?;
                }
            }
        }
    }
    debug!("vhost-user relay: front end closed the connection");
    Ok(())
}

fn back_to_front(back: &UnixStream, front: &UnixStream, front_tx: &Mutex<()>) -> io::Result<()> {
    while let Some(m) = recv_msg(back)? {
        trace!("relay: back end -> {:?} fds={}", m.hdr, m.fds.len());
        let _g = front_tx.lock().unwrap();
        send_msg(front, &m.bytes, &m.fds)?;
    }
    debug!("vhost-user relay: back end closed the connection");
    Ok(())
}

/// A listener on a fresh abstract address, and a stream already connected
/// to it (queued in its backlog for the daemon's accept).
pub fn private_endpoint() -> io::Result<(Listener, UnixStream)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut rnd = [0u8; 8];
    // SAFETY: writes at most 8 bytes into rnd.
    let got = unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
    if got != rnd.len() as isize {
        return Err(io::Error::last_os_error());
    }
    // Unguessable: abstract addresses have no file permissions, anyone in
    // the network namespace could connect to a predictable one.
    let name = format!(
        "vfrelay/{}/{}/{:016x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        u64::from_ne_bytes(rnd)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let l = UnixListener::bind_addr(&addr)?;
    let s = UnixStream::connect_addr(&addr)?;
    Ok((Listener::from(l), s))
}

/// After the daemon accepted once: fail if another connection is still
/// queued, i.e. the daemon may have accepted someone else's instead of ours.
pub fn ensure_ours_accepted(l: &Listener) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n != 0 {
        return Err(io::Error::other(
            "unexpected extra connection on the private vhost-user socket",
        ));
    }
    debug!("vhost-user relay running");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, payload: &[u8]) -> (Header, Vec<u8>) {
        let mut b = Vec::new();
        b.extend_from_slice(&request.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        b.extend_from_slice(payload);
        let h = parse_header(b[..HDR_LEN].try_into().unwrap()).unwrap();
        (h, b)
    }

    fn vring_state(index: u32, num: u32) -> Vec<u8> {
        [index.to_ne_bytes(), num.to_ne_bytes()].concat()
    }

    fn protocol_reply_ack(st: &mut FrontState) {
        let (h, b) = msg(
            REQ_SET_PROTOCOL_FEATURES,
            FLAG_VERSION,
            &PROTOCOL_F_REPLY_ACK.to_ne_bytes(),
        );
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![] });
    }

    #[test]
    fn observes_migration_messages() {
        let h = |request, size| Header {
            request,
            flags: 1,
            size,
        };
        let mut lb = Vec::new();
        lb.extend_from_slice(&4096u64.to_ne_bytes());
        lb.extend_from_slice(&8u64.to_ne_bytes());
        assert_eq!(
            observe(&h(REQ_SET_LOG_BASE, 16), &lb),
            Some(Observed::LogBase {
                size: 4096,
                offset: 8
            })
        );
        assert_eq!(observe(&h(REQ_SET_LOG_BASE, 8), &lb[..8]), None, "short");
        let addr = |flags: u32| {
            let mut a = Vec::new();
            a.extend_from_slice(&3u32.to_ne_bytes());
            a.extend_from_slice(&flags.to_ne_bytes());
            for v in [0x1000u64, 0x2000, 0x3000, 0x2000] {
                a.extend_from_slice(&v.to_ne_bytes());
            }
            a
        };
        assert_eq!(
            observe(&h(REQ_SET_VRING_ADDR, 40), &addr(VHOST_VRING_F_LOG)),
            Some(Observed::VringLog {
                index: 3,
                log_addr: Some(0x2000)
            })
        );
        assert_eq!(
            observe(&h(REQ_SET_VRING_ADDR, 40), &addr(0)),
            Some(Observed::VringLog {
                index: 3,
                log_addr: None
            })
        );
        assert_eq!(observe(&h(REQ_SET_VRING_ADDR, 20), &addr(1)[..20]), None);
        let rarp = [0x52u8, 0x54, 0, 1, 2, 3, 0, 0];
        assert_eq!(
            observe(&h(REQ_SEND_RARP, 8), &rarp),
            Some(Observed::Rarp([0x52, 0x54, 0, 1, 2, 3]))
        );
        assert_eq!(observe(&h(REQ_SEND_RARP, 4), &rarp[..4]), None);
        assert_eq!(observe(&h(REQ_SET_FEATURES, 8), &rarp), None);
    }

    fn vring_addr(index: u32, flags: u32, desc: u64) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&index.to_ne_bytes());
        a.extend_from_slice(&flags.to_ne_bytes());
        for v in [desc, desc + 0x1000, desc + 0x2000, 0x5000] {
            a.extend_from_slice(&v.to_ne_bytes());
        }
        a
    }

    #[test]
    fn repeated_vring_addr_on_a_running_ring_is_answered_here() {
        let mut st = FrontState::default();
        protocol_reply_ack(&mut st);
        let fwd = Decision::Forward { then: vec![] };
        let (h, m) = msg(REQ_SET_VRING_ADDR, FLAG_VERSION, &vring_addr(1, 0, 0x10000));
        assert_eq!(
            st.decide(&h, &m),
            fwd,
            "first time: the daemon sets the ring up"
        );
        // Not started yet: a repeat is still forwarded.
        assert_eq!(st.decide(&h, &m), fwd);
        let (hk, mk) = msg(REQ_SET_VRING_KICK, FLAG_VERSION, &1u64.to_ne_bytes());
        assert_eq!(st.decide(&hk, &mk), fwd);
        // Running, same addresses, log flag on (migration starts): absorbed,
        // acked when asked.
        let (h2, m2) = msg(
            REQ_SET_VRING_ADDR,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &vring_addr(1, VHOST_VRING_F_LOG, 0x10000),
        );
        assert_eq!(
            st.decide(&h2, &m2),
            Decision::Absorb {
                reply: Some(ack_reply(&h2).to_vec())
            }
        );
        // Other vrings are unaffected; other addresses are forwarded.
        let (h3, m3) = msg(REQ_SET_VRING_ADDR, FLAG_VERSION, &vring_addr(1, 0, 0x20000));
        assert_eq!(st.decide(&h3, &m3), fwd);
        let (h4, m4) = msg(REQ_SET_VRING_ADDR, FLAG_VERSION, &vring_addr(0, 0, 0x10000));
        assert_eq!(st.decide(&h4, &m4), fwd);
    }

    #[test]
    fn vring_addr_is_forwarded_after_stop_or_memory_change() {
        let mut st = FrontState::default();
        let fwd = Decision::Forward { then: vec![] };
        let start = |st: &mut FrontState| {
            let (h, m) = msg(REQ_SET_VRING_ADDR, FLAG_VERSION, &vring_addr(0, 0, 0x10000));
            assert_eq!(st.decide(&h, &m), Decision::Forward { then: vec![] });
            let (h, m) = msg(REQ_SET_VRING_KICK, FLAG_VERSION, &0u64.to_ne_bytes());
            st.decide(&h, &m);
        };
        let (h, m) = msg(REQ_SET_VRING_ADDR, FLAG_VERSION, &vring_addr(0, 1, 0x10000));
        start(&mut st);
        let (hb, mb) = msg(REQ_GET_VRING_BASE, FLAG_VERSION, &vring_state(0, 0));
        st.decide(&hb, &mb);
        assert_eq!(st.decide(&h, &m), fwd, "stopped ring: a real re-setup");
        start(&mut st);
        let (hm, mm) = msg(REQ_SET_MEM_TABLE, FLAG_VERSION, &[0; 8]);
        st.decide(&hm, &mm);
        assert_eq!(st.decide(&h, &m), fwd, "memory table changed");
        start(&mut st);
        assert!(matches!(st.decide(&h, &m), Decision::Absorb { .. }));
        // A short message is left to the daemon to reject.
        let (hs, ms) = msg(REQ_SET_VRING_ADDR, FLAG_VERSION, &[0; 12]);
        assert_eq!(st.decide(&hs, &ms), fwd);
    }

    #[test]
    fn set_log_base_is_answered_here() {
        let mut st = FrontState::default();
        let (hdr, m) = msg(REQ_SET_LOG_BASE, FLAG_VERSION, &[0; 16]);
        let Decision::Absorb { reply: Some(r) } = st.decide(&hdr, &m) else {
            panic!("SET_LOG_BASE must be answered by the relay");
        };
        assert_eq!(r.len(), HDR_LEN);
        let h = parse_header(r[..HDR_LEN].try_into().unwrap()).unwrap();
        assert_eq!(
            (h.request, h.flags, h.size),
            (REQ_SET_LOG_BASE, FLAG_VERSION | FLAG_REPLY, 0)
        );
    }

    #[test]
    fn send_rarp_is_absorbed_and_acked_when_asked() {
        let mut st = FrontState::default();
        protocol_reply_ack(&mut st);
        let (hdr, m) = msg(
            REQ_SEND_RARP,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &[1, 2, 3, 4, 5, 6, 0, 0],
        );
        assert_eq!(
            st.decide(&hdr, &m),
            Decision::Absorb {
                reply: Some(ack_reply(&hdr).to_vec())
            }
        );
        let (hdr, m) = msg(REQ_SEND_RARP, FLAG_VERSION, &[1, 2, 3, 4, 5, 6, 0, 0]);
        assert_eq!(st.decide(&hdr, &m), Decision::Absorb { reply: None });
    }

    #[test]
    fn header_parses_and_bounds_size() {
        let (h, _) = msg(REQ_SET_VRING_ENABLE, 0x9, &vring_state(2, 0));
        assert_eq!(
            h,
            Header {
                request: 18,
                flags: 9,
                size: 8
            }
        );
        let mut b = [0u8; HDR_LEN];
        b[8..12].copy_from_slice(&(MAX_PAYLOAD as u32).to_ne_bytes());
        assert!(parse_header(&b).is_ok());
        b[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_ne_bytes());
        assert_eq!(
            parse_header(&b),
            Err(BadMessage::TooBig(MAX_PAYLOAD as u32 + 1))
        );
        b[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_header(&b).is_err());
    }

    #[test]
    fn ack_reply_encoding() {
        let (h, _) = msg(
            REQ_SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &[0; 8],
        );
        let r = ack_reply(&h);
        assert_eq!(&r[0..4], &18u32.to_ne_bytes());
        assert_eq!(&r[4..8], &5u32.to_ne_bytes());
        assert_eq!(&r[8..12], &8u32.to_ne_bytes());
        assert_eq!(&r[12..20], &0u64.to_ne_bytes());
    }

    #[test]
    fn early_disable_absorbed_with_ack() {
        let mut st = FrontState::default();
        protocol_reply_ack(&mut st);
        let (h, b) = msg(
            REQ_SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &vring_state(2, 0),
        );
        assert_eq!(
            st.decide(&h, &b),
            Decision::Absorb {
                reply: Some(ack_reply(&h).to_vec())
            }
        );
        // Nothing to replay for a disable.
        let (h, b) = msg(
            REQ_SET_FEATURES,
            FLAG_VERSION,
            &F_PROTOCOL_FEATURES.to_ne_bytes(),
        );
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![] });
    }

    #[test]
    fn no_ack_without_need_reply_or_reply_ack() {
        let mut st = FrontState::default();
        let (h, b) = msg(
            REQ_SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &vring_state(2, 0),
        );
        // REPLY_ACK not negotiated: NEED_REPLY means nothing.
        assert_eq!(st.decide(&h, &b), Decision::Absorb { reply: None });
        protocol_reply_ack(&mut st);
        let (h, b) = msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &vring_state(3, 0));
        assert_eq!(st.decide(&h, &b), Decision::Absorb { reply: None });
    }

    #[test]
    fn early_enable_replayed_after_set_features_without_need_reply() {
        let mut st = FrontState::default();
        protocol_reply_ack(&mut st);
        let (h, b) = msg(
            REQ_SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &vring_state(0, 1),
        );
        assert!(matches!(
            st.decide(&h, &b),
            Decision::Absorb { reply: Some(_) }
        ));
        let (h, b) = msg(
            REQ_SET_FEATURES,
            FLAG_VERSION,
            &F_PROTOCOL_FEATURES.to_ne_bytes(),
        );
        let (_, replay) = msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &vring_state(0, 1));
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![replay] });
        // Once features are set, everything goes to the daemon.
        let (h, b) = msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &vring_state(2, 0));
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![] });
        let (h, b) = msg(
            REQ_SET_FEATURES,
            FLAG_VERSION,
            &F_PROTOCOL_FEATURES.to_ne_bytes(),
        );
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![] });
    }

    #[test]
    fn later_request_supersedes_early_enable() {
        let mut st = FrontState::default();
        for (idx, num) in [(0, 1), (1, 1), (0, 0)] {
            let (h, b) = msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &vring_state(idx, num));
            assert!(matches!(st.decide(&h, &b), Decision::Absorb { .. }));
        }
        let (h, b) = msg(
            REQ_SET_FEATURES,
            FLAG_VERSION,
            &F_PROTOCOL_FEATURES.to_ne_bytes(),
        );
        let (_, replay) = msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &vring_state(1, 1));
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![replay] });
    }

    #[test]
    fn no_replay_when_protocol_features_not_acked() {
        let mut st = FrontState::default();
        let (h, b) = msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &vring_state(0, 1));
        assert!(matches!(st.decide(&h, &b), Decision::Absorb { .. }));
        let (h, b) = msg(REQ_SET_FEATURES, FLAG_VERSION, &0u64.to_ne_bytes());
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![] });
    }

    #[test]
    fn short_or_other_messages_forwarded() {
        let mut st = FrontState::default();
        // Malformed early SET_VRING_ENABLE: the daemon rejects it properly.
        let (h, b) = msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &[1, 2, 3]);
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![] });
        let (h, b) = msg(1, FLAG_VERSION, &[]);
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![] });
        // Short SET_FEATURES still counts as seen; nothing to replay.
        let (h, b) = msg(REQ_SET_FEATURES, FLAG_VERSION, &[]);
        assert_eq!(st.decide(&h, &b), Decision::Forward { then: vec![] });
    }

    #[test]
    fn messages_and_fds_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_, bytes) = msg(5, FLAG_VERSION, &[7u8; 40]);
        let f1: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let f2: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        send_msg(&a, &bytes, &[f1, f2]).unwrap();
        send_msg(&a, &bytes[..HDR_LEN], &[]).unwrap();
        let m = recv_msg(&b).unwrap().unwrap();
        assert_eq!(m.bytes, bytes);
        assert_eq!(m.fds.len(), 2);
        drop(a);
        // The second message is a bare header claiming 40 bytes: truncated.
        assert_eq!(
            recv_msg(&b).err().map(|e| e.kind()),
            Some(io::ErrorKind::UnexpectedEof)
        );
        assert!(recv_msg(&b).unwrap().is_none());
    }

    #[test]
    fn oversize_message_rejected() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut h = [0u8; HDR_LEN];
        h[8..12].copy_from_slice(&0x10_0000u32.to_ne_bytes());
        send_msg(&a, &h, &[]).unwrap();
        let e = recv_msg(&b).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn private_endpoint_connects() {
        let (l, s) = private_endpoint().unwrap();
        let peer = l.accept().unwrap().unwrap();
        ensure_ours_accepted(&l).unwrap();
        send_msg(&s, &msg(1, FLAG_VERSION, &[]).1, &[]).unwrap();
        let m = recv_msg(&peer).unwrap().unwrap();
        assert_eq!(m.hdr.request, 1);
    }
}
