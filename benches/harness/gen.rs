//! Wire-side traffic for the wire-to-guest direction: a thread that enters
//! the benchmark's network namespace and sends one fixed UDP frame over and
//! over through an AF_PACKET socket on the namespace's interface (the veth
//! peer, or the tap). There is no pktgen in this kernel, and a thread in the
//! harness needs nothing installed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// A UDP/IPv4 frame of `len` bytes (no FCS) to a locally administered MAC
/// no host owns, inside the benchmark's own 10.213.0.0/24.
fn frame(len: usize) -> Vec<u8> {
    let len = len.max(60);
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0xbe, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0xbe, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 213, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 213, 0, 1]);
    let mut sum = 0u32;
    for c in ip.chunks(2) {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&9u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn enter_netns(ns: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns on an fd we own; affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn sender(ns: &str, ifname: &str, len: usize, cpu: usize, stop: &AtomicBool, sent: &AtomicU64) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
    enter_netns(ns).unwrap_or_else(|e| panic!("generator: setns {ns}: {e}"));
    let c = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: plain syscalls on values we own.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(ifindex != 0, "generator: no {ifname} in {ns}");
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "generator: socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just created and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // Straight to the driver: the qdisc would only add cost and drops.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one as *const _ as *const libc::c_void,
            4,
        )
    };
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    let f = frame(len);
    const BATCH: usize = 64;
    let mut iov: [libc::iovec; BATCH] = [libc::iovec {
        iov_base: f.as_ptr() as *mut libc::c_void,
        iov_len: f.len(),
    }; BATCH];
    // SAFETY: an all-zero mmsghdr is valid; fields are filled below.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_name = &mut sll as *mut _ as *mut libc::c_void;
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs and what they point to live across the call.
        let n = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            sent.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            std::thread::yield_now();
        }
    }
}

impl Generator {
    /// Starts sending `len`-byte frames on `ifname` in namespace `ns`, from
    /// a thread pinned to `cpu`.
    pub fn start(ns: &str, ifname: &str, len: usize, cpu: usize) -> Generator {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (ns, ifname) = (ns.to_string(), ifname.to_string());
        let (s, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || sender(&ns, &ifname, len, cpu, &s, &n));
        Generator {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    /// Stops and returns how many frames were sent.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.sent.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
