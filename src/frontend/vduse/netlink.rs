//! Attaching and detaching a VDUSE device on the vDPA bus through the "vdpa"
//! generic-netlink family: VDPA_CMD_DEV_NEW / VDPA_CMD_DEV_DEL, what
//! `vdpa dev add name NAME mgmtdev vduse` and `vdpa dev del NAME` send.
//!
//! Hand-written rather than a netlink crate: two requests with string
//! attributes and an ACK, plus the family-id lookup, are ~150 lines, while
//! the crates (neli, netlink-packet-generic) bring a typed framework for
//! far more than that. Replies are parsed with every length checked.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

// include/uapi/linux/vdpa.h
const VDPA_FAMILY: &str = "vdpa";
const VDPA_CMD_DEV_NEW: u8 = 3;
const VDPA_CMD_DEV_DEL: u8 = 4;
const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
const VDPA_ATTR_DEV_NAME: u16 = 4;
/// The VDUSE management device has no bus, only this device name.
const VDUSE_MGMTDEV: &str = "vduse";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the vdpa netlink family is missing: load the vdpa kernel module (modprobe vdpa)")]
    NoFamily,
    #[error("vdpa {op} {name}: {source}")]
    Command {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("vdpa netlink: {0}")]
    Io(#[from] io::Error),
    #[error("vdpa netlink: malformed reply: {0}")]
    Malformed(String),
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A generic-netlink request: header, genl header, string/u16 attributes.
pub fn build_request(family: u16, cmd: u8, seq: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; NLMSG_HDRLEN + GENL_HDRLEN];
    m[4..6].copy_from_slice(&family.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m[NLMSG_HDRLEN] = cmd;
    m[NLMSG_HDRLEN + 1] = 1; // genl version
    for (ty, val) in attrs {
        let len = 4 + val.len();
        m.extend_from_slice(&(len as u16).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(val);
        m.resize(align4(m.len()), 0);
    }
    let total = m.len() as u32;
    m[0..4].copy_from_slice(&total.to_ne_bytes());
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// What one reply message says.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// NLMSG_ERROR: 0 is an ACK, otherwise a negative errno.
    Ack(i32),
    /// A genl message: its attributes (type, payload).
    Genl(Vec<(u16, Vec<u8>)>),
}

/// Parses the messages in one datagram, checking every length.
pub fn parse_replies(buf: &[u8]) -> Result<Vec<(u32, Reply)>, Error> {
    let bad = |s: &str| Error::Malformed(s.to_string());
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
        let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(bad("message length out of range"));
        }
        let body = &buf[off + NLMSG_HDRLEN..off + len];
        if ty == NLMSG_ERROR {
            if body.len() < 4 {
                return Err(bad("short error message"));
            }
            let err = i32::from_ne_bytes(body[0..4].try_into().unwrap());
            out.push((seq, Reply::Ack(err)));
        } else {
            if body.len() < GENL_HDRLEN {
                return Err(bad("short genl message"));
            }
            let mut attrs = Vec::new();
            let mut a = &body[GENL_HDRLEN..];
            while a.len() >= 4 {
                let alen = u16::from_ne_bytes([a[0], a[1]]) as usize;
                let aty = u16::from_ne_bytes([a[2], a[3]]) & 0x3fff;
                if alen < 4 || alen > a.len() {
                    return Err(bad("attribute length out of range"));
                }
                attrs.push((aty, a[4..alen].to_vec()));
                a = &a[align4(alen).min(a.len())..];
            }
            out.push((seq, Reply::Genl(attrs)));
        }
        off += align4(len);
    }
    Ok(out)
}

struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    fn open() -> Result<Socket, Error> {
        // SAFETY: plain socket/bind syscalls on a local sockaddr.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 60,
            tv_usec: 0,
        };
        // A hung kernel path (e.g. a driver waiting on us) must not block
        // teardown forever.
        // SAFETY: tv is a valid timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Socket { fd, seq: 1 })
    }

    /// Sends one request and collects replies until its ACK/error.
    fn transact(
        &mut self,
        family: u16,
        cmd: u8,
        attrs: &[(u16, &[u8])],
    ) -> Result<Vec<Reply>, io::Error> {
        self.seq += 1;
        let seq = self.seq;
        let msg = build_request(family, cmd, seq, attrs);
        // SAFETY: sockaddr_nl zeroed = the kernel; msg is a valid buffer.
        let n = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let replies =
                parse_replies(&buf[..n as usize]).map_err(|e| io::Error::other(e.to_string()))?;
            for (s, r) in replies {
                if s != seq {
                    continue;
                }
                match r {
                    Reply::Ack(0) => return Ok(got),
                    Reply::Ack(e) => return Err(io::Error::from_raw_os_error(-e)),
                    r => got.push(r),
                }
            }
        }
    }

    fn family_id(&mut self, name: &str) -> Result<u16, Error> {
        let replies = match self.transact(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            &[(CTRL_ATTR_FAMILY_NAME, &cstr(name))],
        ) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(Error::NoFamily),
            Err(e) => return Err(e.into()),
        };
        for r in replies {
            if let Reply::Genl(attrs) = r {
                for (ty, val) in attrs {
                    if ty == CTRL_ATTR_FAMILY_ID && val.len() >= 2 {
                        return Ok(u16::from_ne_bytes([val[0], val[1]]));
                    }
                }
            }
        }
        Err(Error::Malformed(
            "no family id in CTRL_CMD_GETFAMILY reply".into(),
        ))
    }
}

fn vdpa_cmd(op: &'static str, cmd: u8, name: &str, with_mgmt: bool) -> Result<(), Error> {
    let mut s = Socket::open()?;
    let family = s.family_id(VDPA_FAMILY)?;
    let dev = cstr(name);
    let mgmt = cstr(VDUSE_MGMTDEV);
    let mut attrs: Vec<(u16, &[u8])> = vec![(VDPA_ATTR_DEV_NAME, &dev)];
    if with_mgmt {
        attrs.insert(0, (VDPA_ATTR_MGMTDEV_DEV_NAME, &mgmt));
    }
    s.transact(family, cmd, &attrs)
        .map(|_| ())
        .map_err(|source| Error::Command {
            op,
            name: name.into(),
            source,
        })
}

/// `vdpa dev add name NAME mgmtdev vduse`. Blocks while the bus driver
/// probes the device, which needs our answers to its requests.
pub fn dev_add(name: &str) -> Result<(), Error> {
    vdpa_cmd("dev add", VDPA_CMD_DEV_NEW, name, true)
}

/// `vdpa dev del NAME`.
pub fn dev_del(name: &str) -> Result<(), Error> {
    vdpa_cmd("dev del", VDPA_CMD_DEV_DEL, name, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = build_request(0x1c, VDPA_CMD_DEV_NEW, 9, &[(4, b"vd0\0"), (2, b"vduse\0")]);
        // 16 + 4 + (4+4) + (4+6 -> 12)
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x1c);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 9);
        assert_eq!(m[16], VDPA_CMD_DEV_NEW);
        assert_eq!(&m[20..28], &[8, 0, 4, 0, b'v', b'd', b'0', 0]);
        assert_eq!(&m[28..38], &[10, 0, 2, 0, b'v', b'd', b'u', b's', b'e', 0]);
        assert_eq!(&m[38..40], &[0, 0], "padded to 4");
    }

    fn msg(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; 16];
        m[0..4].copy_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&ty.to_ne_bytes());
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn parses_ack_error_and_attrs() {
        let mut d = msg(NLMSG_ERROR, 3, &(-19i32).to_ne_bytes());
        d.extend(msg(NLMSG_ERROR, 4, &0i32.to_ne_bytes()));
        let r = parse_replies(&d).unwrap();
        assert_eq!(r, vec![(3, Reply::Ack(-19)), (4, Reply::Ack(0))]);
        let body = [1, 2, 0, 0, 6, 0, 1, 0, 0x1c, 0, 0, 0];
        let r = parse_replies(&msg(0x10, 5, &body)).unwrap();
        assert_eq!(r, vec![(5, Reply::Genl(vec![(1, vec![0x1c, 0])]))]);
    }

    #[test]
    fn rejects_malformed_replies() {
        // Length beyond the datagram, below the header, short bodies,
        // attribute overruns.
        let mut m = msg(NLMSG_ERROR, 1, &0i32.to_ne_bytes());
        m[0] = 200;
        assert!(parse_replies(&m).is_err());
        let mut m = msg(NLMSG_ERROR, 1, &0i32.to_ne_bytes());
        m[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse_replies(&m).is_err());
        assert!(parse_replies(&msg(NLMSG_ERROR, 1, &[0, 0])).is_err());
        assert!(parse_replies(&msg(0x10, 1, &[1, 2])).is_err());
        assert!(parse_replies(&msg(0x10, 1, &[1, 2, 0, 0, 40, 0, 1, 0])).is_err());
        assert!(parse_replies(&msg(0x10, 1, &[1, 2, 0, 0, 2, 0, 1, 0])).is_err());
        // Trailing bytes shorter than a header are ignored.
        assert_eq!(parse_replies(&[0, 0, 0]).unwrap(), vec![]);
    }
}
