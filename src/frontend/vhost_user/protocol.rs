//! vhost-user wire handling: reading one request with its fds, the table of
//! what each request may carry, and writing replies.
//!
//! Message bodies are the `vhost` crate's definitions. The 12-byte header
//! is spelled out here because the crate keeps its header type private to
//! its own (thread-per-device) request handler.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserMsgValidator, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const HDR_LEN: usize = 12;
/// The only protocol version there is.
const VERSION: u32 = 0x1;

/// request, flags, size: native-endian u32s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

impl Header {
    pub fn parse(b: &[u8; HDR_LEN]) -> Header {
        let word = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    pub fn need_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }

    fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }
}

/// One request as received.
pub struct Request {
    pub hdr: Header,
    pub req: FrontendReq,
    pub body: Vec<u8>,
    pub files: Vec<File>,
}

/// Why a connection must end.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("front end closed the connection")]
    Closed,
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// How many fds a request may carry: (min, max). Everything else carries
/// none; an fd where none belongs is a protocol error.
pub fn fds_allowed(req: FrontendReq, hdr_body: &[u8]) -> (usize, usize) {
    use FrontendReq::*;
    match req {
        SET_MEM_TABLE => (0, 8),
        SET_LOG_BASE | SET_LOG_FD | ADD_MEM_REG | SET_BACKEND_REQ_FD => (1, 1),
        // Sent with an fd by some front ends, which the spec says to ignore.
        REM_MEM_REG => (0, 1),
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
            // Bit 8 of the u64 payload: no fd (the ring is polled).
            let nofd = hdr_body.get(1).is_some_and(|b| b & 1 != 0);
            if nofd {
                (0, 0)
            } else {
                (1, 1)
            }
        }
        _ => (0, 0),
    }
}

/// Requests whose answer is defined by the protocol; the rest answer only
/// with REPLY_ACK when the front end asks for it.
pub fn has_reply(req: FrontendReq) -> bool {
    use FrontendReq::*;
    matches!(
        req,
        GET_FEATURES
            | GET_PROTOCOL_FEATURES
            | GET_VRING_BASE
            | GET_QUEUE_NUM
            | GET_CONFIG
            | GET_MAX_MEM_SLOTS
            | SET_LOG_BASE
    )
}

/// Read one whole request. The socket is blocking with a receive timeout,
/// so a front end that stops in the middle of a message ends only its own
/// connection.
pub fn recv(sock: &UnixStream) -> Result<Request, WireError> {
    let mut h = [0u8; HDR_LEN];
    let mut fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: h.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    }];
    // SAFETY: the iovec points at `h`, which outlives the call; the fds
    // written into `fds` are taken into Files right below.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| WireError::Io(io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: the kernel handed us these nfds descriptors; each is owned
    // once, here, so they are closed on every error path below.
    let files: Vec<File> = fds[..nfds]
        .iter()
        .map(|fd| unsafe { File::from_raw_fd(*fd) })
        .collect();
    if n == 0 {
        return Err(WireError::Closed);
    }
    if n < HDR_LEN {
        read_exact(sock, &mut h[n..])?;
    }
    let hdr = Header::parse(&h);
    if hdr.flags & VhostUserHeaderFlag::VERSION.bits() != VERSION
        || hdr.flags & VhostUserHeaderFlag::REPLY.bits() != 0
    {
        return Err(WireError::Bad(format!(
            "request {} with flags {:#x}: not a version 1 request",
            hdr.request, hdr.flags
        )));
    }
    if hdr.size as usize > MAX_MSG_SIZE {
        return Err(WireError::Bad(format!(
            "request {} claims a {}-byte payload (at most {MAX_MSG_SIZE})",
            hdr.request, hdr.size
        )));
    }
    let req = FrontendReq::try_from(hdr.request)
        .map_err(|_| WireError::Bad(format!("unknown request {}", hdr.request)))?;
    let mut body = vec![0u8; hdr.size as usize];
    read_exact(sock, &mut body)?;
    let (min, max) = fds_allowed(req, &body);
    if files.len() < min || files.len() > max {
        return Err(WireError::Bad(format!(
            "{req:?} carried {} fds ({min} to {max} allowed)",
            files.len()
        )));
    }
    Ok(Request {
        hdr,
        req,
        body,
        files,
    })
}

/// The whole of a message must arrive within this, however it trickles in:
/// the control thread serves every port.
pub const MSG_TIMEOUT: Duration = Duration::from_secs(1);

fn read_exact(sock: &UnixStream, buf: &mut [u8]) -> Result<(), WireError> {
    use std::io::Read;
    let deadline = Instant::now() + MSG_TIMEOUT;
    let stalled = || WireError::Bad("front end stopped in the middle of a message".into());
    let mut s = sock;
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(stalled());
        }
        sock.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(WireError::Bad("connection closed inside a message".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(stalled())
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A body of type `T`, or an error naming the request.
pub fn body<T: ByteValued + VhostUserMsgValidator>(r: &Request) -> Result<T, WireError> {
    let need = std::mem::size_of::<T>();
    let t = r
        .body
        .get(..need)
        .and_then(T::from_slice)
        .copied()
        .ok_or_else(|| {
            WireError::Bad(format!(
                "{:?}: payload of {} bytes, {need} expected",
                r.req,
                r.body.len()
            ))
        })?;
    if !t.is_valid() {
        return Err(WireError::Bad(format!("{:?}: invalid payload", r.req)));
    }
    Ok(t)
}

/// Send the reply to `hdr` with `payload`.
pub fn reply(sock: &UnixStream, hdr: &Header, payload: &[u8]) -> io::Result<()> {
    let h = Header {
        request: hdr.request,
        flags: VERSION | VhostUserHeaderFlag::REPLY.bits(),
        size: payload.len() as u32,
    };
    let mut msg = Vec::with_capacity(HDR_LEN + payload.len());
    msg.extend_from_slice(&h.bytes());
    msg.extend_from_slice(payload);
    let mut s = sock;
    s.write_all(&msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost::vhost_user::message::VhostUserU64;

    fn send(s: &UnixStream, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
        let mut m = Header {
            request,
            flags,
            size: payload.len() as u32,
        }
        .bytes()
        .to_vec();
        m.extend_from_slice(payload);
        s.send_with_fds(&[&m[..]], fds).unwrap();
    }

    #[test]
    fn requests_and_fds_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = File::open("/dev/null").unwrap();
        use std::os::fd::AsRawFd;
        send(&a, 12, 1, &0u64.to_ne_bytes(), &[f.as_raw_fd()]);
        let r = recv(&b).unwrap();
        assert_eq!(r.req, FrontendReq::SET_VRING_KICK);
        assert_eq!(r.files.len(), 1);
        send(&a, 2, 1 | 8, &7u64.to_ne_bytes(), &[]);
        let r = recv(&b).unwrap();
        assert!(r.hdr.need_reply());
        assert_eq!(body::<VhostUserU64>(&r).unwrap().value, 7);
        reply(&b, &r.hdr, &[1, 2]).unwrap();
        let mut h = [0u8; HDR_LEN];
        use std::io::Read;
        (&a).read_exact(&mut h).unwrap();
        assert_eq!(
            Header::parse(&h),
            Header {
                request: 2,
                flags: 5,
                size: 2
            }
        );
    }

    #[test]
    fn bad_messages_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        // An fd where none belongs.
        let f = File::open("/dev/null").unwrap();
        use std::os::fd::AsRawFd;
        send(&a, 1, 1, &[], &[f.as_raw_fd()]);
        assert!(matches!(recv(&b), Err(WireError::Bad(_))));
        // A kick without its fd (and without the no-fd bit).
        send(&a, 12, 1, &0u64.to_ne_bytes(), &[]);
        assert!(matches!(recv(&b), Err(WireError::Bad(_))));
        // Unknown request, wrong version, oversized payload.
        send(&a, 9999, 1, &[], &[]);
        assert!(matches!(recv(&b), Err(WireError::Bad(_))));
        send(&a, 1, 2, &[], &[]);
        assert!(matches!(recv(&b), Err(WireError::Bad(_))));
        a.write_all_hdr(1, 1, (MAX_MSG_SIZE + 1) as u32);
        assert!(matches!(recv(&b), Err(WireError::Bad(_))));
        // A header promising more than ever comes.
        a.write_all_hdr(2, 1, 8);
        assert!(matches!(recv(&b), Err(WireError::Bad(_))));
        // A short payload is caught when the body is read.
        send(&a, 2, 1, &[1, 2], &[]);
        let r = recv(&b).unwrap();
        assert!(body::<VhostUserU64>(&r).is_err());
        drop(a);
        assert!(matches!(recv(&b), Err(WireError::Closed)));
    }

    trait WriteHdr {
        fn write_all_hdr(&self, request: u32, flags: u32, size: u32);
    }
    impl WriteHdr for UnixStream {
        fn write_all_hdr(&self, request: u32, flags: u32, size: u32) {
            let mut s = self;
            s.write_all(
                &Header {
                    request,
                    flags,
                    size,
                }
                .bytes(),
            )
            .unwrap();
        }
    }
}
