//! The far end of an emulated NIC's "wire": a raw AF_PACKET socket on a
//! netdev inside a test network namespace, standing in for a switch port
//! with one IPv4 host behind it on one VLAN.
//!
//! The host kernel has no 8021q and no bridge, so the peer speaks VLAN
//! itself: received tags come from PACKET_AUXDATA (the kernel moves a tag
//! into skb metadata before AF_PACKET sees the frame) and sent frames carry
//! the 802.1Q header inline. It answers ARP and ICMP echo for its address,
//! counts UDP datagrams by the 32-bit sequence number `udpburst` puts first
//! in each payload, and can send such datagrams back.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
// linux/if_packet.h
const PACKET_AUXDATA: libc::c_int = 8;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TpacketAuxdata {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}

/// What the peer saw, keyed by (source MAC, VLAN ID or None).
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub frames: HashMap<([u8; 6], Option<u16>), u64>,
    pub arp_answered: u64,
    pub echo_answered: u64,
    /// UDP port -> distinct sequence numbers received (on our VLAN, to us).
    pub udp: HashMap<u16, HashSet<u32>>,
}

impl Seen {
    pub fn from(&self, mac: [u8; 6], vlan: Option<u16>) -> u64 {
        self.frames.get(&(mac, vlan)).copied().unwrap_or(0)
    }
    pub fn udp_unique(&self, port: u16) -> usize {
        self.udp.get(&port).map_or(0, |s| s.len())
    }
}

pub struct WirePeer {
    sock: Arc<OwnedFd>,
    ifindex: i32,
    ip: [u8; 4],
    mac: [u8; 6],
    vlan: u16,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for ((mac, vlan), n) in &self.frames {
            writeln!(f, "  {} vlan {:?}: {n} frames", mac_str(mac), vlan)?;
        }
        writeln!(
            f,
            "  arp answered {}, echo answered {}",
            self.arp_answered, self.echo_answered
        )?;
        for (port, s) in &self.udp {
            writeln!(f, "  udp port {port}: {} unique", s.len())?;
        }
        Ok(())
    }
}

/// Opens the socket from a thread that entered `netns`, so the socket
/// lives there while the rest of the test stays in the root namespace.
fn open_in_netns(netns: &str, ifname: &str) -> std::io::Result<(OwnedFd, i32)> {
    let netns = netns.to_string();
    let ifname = ifname.to_string();
    std::thread::spawn(move || -> std::io::Result<(OwnedFd, i32)> {
        let ns = std::fs::File::open(format!("/var/run/netns/{netns}"))?;
        // SAFETY: plain syscalls on fds we own; this thread ends right after.
        unsafe {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let name = std::ffi::CString::new(ifname).unwrap();
            let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            if ifindex == 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                (ETH_P_ALL.to_be()) as i32,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = ifindex;
            if libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_AUXDATA,
                &one as *const _ as *const libc::c_void,
                4,
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Ok((fd, ifindex))
        }
    })
    .join()
    .expect("netns thread panicked")
}

fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn send_frame(fd: i32, ifindex: i32, frame: &[u8]) {
    // SAFETY: sockaddr_ll is plain data; frame outlives the call.
    unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        libc::sendto(
            fd,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
    }
}

/// Ethernet header with an inline 802.1Q tag.
fn tagged_header(dst: &[u8], src: &[u8; 6], vlan: u16, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(1518);
    f.extend_from_slice(&dst[..6]);
    f.extend_from_slice(src);
    f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    f.extend_from_slice(&(vlan & 0x0fff).to_be_bytes());
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn ipv4_header(src: &[u8; 4], dst: &[u8], proto: u8, payload_len: usize, id: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(src);
    h[16..20].copy_from_slice(&dst[..4]);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

struct Ctx {
    fd: i32,
    ifindex: i32,
    ip: [u8; 4],
    mac: [u8; 6],
    vlan: u16,
}

impl Ctx {
    /// Handles one received frame (tag already removed by the kernel).
    fn handle(&self, frame: &[u8], vlan: Option<u16>, seen: &mut Seen) {
        if frame.len() < 14 {
            return;
        }
        let mut src = [0u8; 6];
        src.copy_from_slice(&frame[6..12]);
        if src == self.mac {
            return; // our own transmissions, looped back by AF_PACKET
        }
        *seen.frames.entry((src, vlan)).or_default() += 1;
        if vlan != Some(self.vlan) {
            return;
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let l3 = &frame[14..];
        match ethertype {
            ETH_P_ARP if l3.len() >= 28 && l3[7] == 1 && l3[24..28] == self.ip => {
                // ARP request for us: answer who-has with is-at.
                let mut f = tagged_header(&src, &self.mac, self.vlan, ETH_P_ARP);
                f.extend_from_slice(&l3[..6]);
                f.extend_from_slice(&[0, 2]);
                f.extend_from_slice(&self.mac);
                f.extend_from_slice(&self.ip);
                f.extend_from_slice(&l3[8..18]); // sender MAC + IP
                send_frame(self.fd, self.ifindex, &f);
                seen.arp_answered += 1;
            }
            ETH_P_IP if l3.len() >= 20 && l3[16..20] == self.ip => {
                let ihl = ((l3[0] & 0x0f) as usize) * 4;
                let total = u16::from_be_bytes([l3[2], l3[3]]) as usize;
                if ihl < 20 || total > l3.len() || total < ihl {
                    return;
                }
                let l4 = &l3[ihl..total];
                match l3[9] {
                    1 if l4.len() >= 8 && l4[0] == 8 => {
                        // ICMP echo request -> reply with the same body.
                        let mut icmp = l4.to_vec();
                        icmp[0] = 0;
                        icmp[2] = 0;
                        icmp[3] = 0;
                        let c = csum(&icmp);
                        icmp[2..4].copy_from_slice(&c.to_be_bytes());
                        let mut f = tagged_header(&src, &self.mac, self.vlan, ETH_P_IP);
                        f.extend_from_slice(&ipv4_header(&self.ip, &l3[12..16], 1, icmp.len(), 0));
                        f.extend_from_slice(&icmp);
                        send_frame(self.fd, self.ifindex, &f);
                        seen.echo_answered += 1;
                    }
                    17 if l4.len() >= 12 => {
                        let port = u16::from_be_bytes([l4[2], l4[3]]);
                        let seq = u32::from_le_bytes([l4[8], l4[9], l4[10], l4[11]]);
                        seen.udp.entry(port).or_default().insert(seq);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

impl WirePeer {
    /// Starts the peer on `ifname` in `netns`, owning `ip`/`mac` on `vlan`.
    pub fn start(netns: &str, ifname: &str, ip: [u8; 4], mac: [u8; 6], vlan: u16) -> WirePeer {
        let (fd, ifindex) = open_in_netns(netns, ifname)
            .unwrap_or_else(|e| panic!("raw socket on {ifname} in {netns}: {e}"));
        let sock = Arc::new(fd);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Ctx {
            fd: sock.as_raw_fd(),
            ifindex,
            ip,
            mac,
            vlan,
        };
        let (s2, seen2, stop2) = (sock.clone(), seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let _keep = s2;
            let mut buf = vec![0u8; 65536];
            let mut cbuf = [0u64; 16];
            while !stop2.load(Ordering::Relaxed) {
                // SAFETY: recvmsg into buffers we own, sized in msghdr.
                let (n, aux) = unsafe {
                    let mut iov = libc::iovec {
                        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                        iov_len: buf.len(),
                    };
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = &mut iov;
                    msg.msg_iovlen = 1;
                    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
                    msg.msg_controllen = std::mem::size_of_val(&cbuf);
                    let n = libc::recvmsg(ctx.fd, &mut msg, 0);
                    let mut aux = None;
                    if n > 0 {
                        let mut c = libc::CMSG_FIRSTHDR(&msg);
                        while !c.is_null() {
                            if (*c).cmsg_level == libc::SOL_PACKET
                                && (*c).cmsg_type == PACKET_AUXDATA
                            {
                                aux = Some(std::ptr::read_unaligned(
                                    libc::CMSG_DATA(c) as *const TpacketAuxdata
                                ));
                            }
                            c = libc::CMSG_NXTHDR(&msg, c);
                        }
                    }
                    (n, aux)
                };
                if n <= 0 {
                    continue;
                }
                let vlan = aux
                    .filter(|a| a.tp_status & TP_STATUS_VLAN_VALID != 0)
                    .map(|a| a.tp_vlan_tci & 0x0fff);
                let mut s = seen2.lock().unwrap();
                ctx.handle(&buf[..n as usize], vlan, &mut s);
            }
        });
        WirePeer {
            sock,
            ifindex,
            ip,
            mac,
            vlan,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Sends `count` tagged UDP datagrams of `size` payload bytes (first 4:
    /// little-endian sequence number, as `udpburst` expects) to
    /// `dst_ip`:`port` at `dst_mac`, paced so an emulated NIC keeps up.
    pub fn send_udp(&self, dst_mac: [u8; 6], dst_ip: [u8; 4], port: u16, count: u32, size: usize) {
        assert!(size >= 4);
        for seq in 0..count {
            let mut udp = Vec::with_capacity(8 + size);
            udp.extend_from_slice(&40000u16.to_be_bytes());
            udp.extend_from_slice(&port.to_be_bytes());
            udp.extend_from_slice(&((8 + size) as u16).to_be_bytes());
            udp.extend_from_slice(&[0, 0]); // no checksum (valid for IPv4)
            udp.extend_from_slice(&seq.to_le_bytes());
            udp.resize(8 + size, 0xa5);
            let mut f = tagged_header(&dst_mac, &self.mac, self.vlan, ETH_P_IP);
            f.extend_from_slice(&ipv4_header(&self.ip, &dst_ip, 17, udp.len(), seq as u16));
            f.extend_from_slice(&udp);
            send_frame(self.sock.as_raw_fd(), self.ifindex, &f);
            if seq % 8 == 7 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for WirePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
