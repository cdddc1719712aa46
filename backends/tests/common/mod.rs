//! Helpers shared by the backend integration tests: an AF_PACKET socket on
//! the far side of the device under test (the veth peer, the tap's host
//! side), to inject and capture raw frames.
#![allow(dead_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

pub const ETH_P_ALL: u16 = 0x0003;

/// Interface index of `name` (0 if there is none).
pub fn if_index(name: &str) -> u32 {
    let c = CString::new(name).unwrap();
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

pub fn poll_in(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// AF_PACKET socket bound to one interface, in the calling thread's network
/// namespace.
pub struct PacketSock {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSock {
    /// Frames of `ethertype` (ETH_P_ALL for every frame) on `name`.
    pub fn bind(name: &str, ethertype: u16) -> Self {
        let ifindex = if_index(name) as i32;
        assert!(ifindex > 0, "{name} missing");
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                ethertype.to_be() as i32,
            )
        };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Bursts of hundreds of frames must not overflow the default buffer.
        let size: libc::c_int = 16 << 20;
        // SAFETY: valid int option.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const _ as *const libc::c_void,
                4,
            )
        };
        // SAFETY: zeroed sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ethertype.to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSock { fd, ifindex }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: zeroed sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: frame and sll are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next incoming (not outgoing) frame, waiting up to `ms`.
    fn recv_one(&self, buf: &mut [u8], ms: i32) -> Option<usize> {
        if !poll_in(self.fd.as_raw_fd(), ms) {
            return None;
        }
        // SAFETY: zeroed sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: buf and sll are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                &mut sll as *mut _ as *mut libc::sockaddr,
                &mut sl,
            )
        };
        (n >= 14 && sll.sll_pkttype != libc::PACKET_OUTGOING).then_some(n as usize)
    }

    /// Incoming frames until `want` arrived, or none came for `idle`.
    pub fn recv(&self, want: usize, idle: Duration) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        let mut last = Instant::now();
        while got.len() < want && last.elapsed() < idle {
            if let Some(n) = self.recv_one(&mut buf, 20) {
                got.push(buf[..n].to_vec());
                last = Instant::now();
            }
        }
        got
    }

    /// The next incoming frame with `ethertype`, within 2 s.
    pub fn recv_type(&self, ethertype: u16) -> Vec<u8> {
        let end = Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0u8; 65536];
        loop {
            assert!(Instant::now() < end, "no frame of type {ethertype:#x}");
            if let Some(n) = self.recv_one(&mut buf, 100) {
                let f = &buf[..n];
                if u16::from_be_bytes([f[12], f[13]]) == ethertype {
                    return f.to_vec();
                }
            }
        }
    }
}
