//! `tap[,ifname=NAME]`: a Linux tap device with `IFF_VNET_HDR`.
//!
//! One tap file descriptor per queue pair (`IFF_MULTI_QUEUE` when there is
//! more than one). Every frame in both directions carries the 12-byte
//! `virtio_net_hdr_v1` (`TUNSETVNETHDRSZ 12`), so checksum and segmentation
//! offload metadata passes between guest and host stack untouched.
//!
//! Lifecycle: if the interface already exists (a persistent tap made with
//! `ip tuntap add mode tap name X [multi_queue] vnet_hdr`), vfrelay attaches to
//! it, leaves its admin state alone and never deletes it. Otherwise vfrelay
//! creates it *non-persistent* and brings it UP (a fresh tap is useless while
//! down); the kernel removes it when the last queue's fd closes, i.e. when the
//! last [`Tap`] of this device is dropped. vfrelay never sets TUNSETPERSIST, so
//! nothing it created can outlive the process.
//!
//! Direction names follow the [`Backend`] trait: `tx_frame` writes a guest
//! frame into the tap (the host stack receives it), `rx_burst` reads frames the
//! host stack sent out of the tap.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::{features, Backend, BackendStats, Error, Result, Segs, MAX_FRAME_LEN, VNET_HDR_LEN};

/// Offloads a tap with IFF_VNET_HDR passes through.
pub const OFFLOAD_FEATURES: u64 = features::CSUM
    | features::GUEST_CSUM
    | features::GUEST_TSO4
    | features::GUEST_TSO6
    | features::GUEST_ECN
    | features::HOST_TSO4
    | features::HOST_TSO6
    | features::HOST_ECN;

// <linux/if_tun.h>. ioctl numbers are _IOW('T', nr, int/unsigned int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
#[cfg(target_endian = "big")]
const TUNSETVNETLE: libc::c_ulong = 0x4004_54dc;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Fail with EBUSY instead of attaching when the device already exists.
const IFF_TUN_EXCL: libc::c_short = -0x8000; // 0x8000 as a c_short

pub const TUN_F_CSUM: libc::c_uint = 0x01;
pub const TUN_F_TSO4: libc::c_uint = 0x02;
pub const TUN_F_TSO6: libc::c_uint = 0x04;
pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// Most queues a multi-queue tap accepts (MAX_TAP_QUEUES in the kernel).
const MAX_QUEUES: usize = 256;

/// `struct ifreq` as far as TUNSETIFF / SIOC[GS]IFFLAGS use it: the name,
/// then a short flags field inside a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> Self {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        // Callers validated: ASCII-free of NUL, shorter than IFNAMSIZ.
        for (d, s) in r.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        r
    }
}

/// Map guest-acked virtio-net features to TUNSETOFFLOAD flags: what the tap
/// may hand us (and we the guest) without finishing checksums/segmentation.
/// TSO needs CSUM, ECN needs TSO; anything the tap backend does not offer
/// (e.g. GUEST_UFO) is ignored.
pub fn tun_offload_flags(virtio_features: u64) -> libc::c_uint {
    let f = virtio_features & OFFLOAD_FEATURES;
    if f & features::GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if f & features::GUEST_TSO4 != 0 {
        flags |= TUN_F_TSO4;
    }
    if f & features::GUEST_TSO6 != 0 {
        flags |= TUN_F_TSO6;
    }
    if f & features::GUEST_ECN != 0 && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
        flags |= TUN_F_TSO_ECN;
    }
    flags
}

fn check_ifname(ifname: &str) -> Result<()> {
    let bad = |reason: &str| Error::Other(format!("tap interface name '{ifname}': {reason}"));
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        return Err(bad("must be 1 to 15 bytes"));
    }
    // '%' would make the kernel pick a name from a template.
    if ifname
        .bytes()
        .any(|b| b == 0 || b == b'/' || b == b'%' || b.is_ascii_whitespace())
    {
        return Err(bad("contains a character not allowed in interface names"));
    }
    Ok(())
}

fn if_exists(ifname: &str) -> bool {
    crate::if_index(ifname).is_some()
}

/// `tun_flags` of an existing tun/tap device, from sysfs.
fn existing_tun_flags(ifname: &str) -> Option<u32> {
    let s = fs::read_to_string(format!("/sys/class/net/{ifname}/tun_flags")).ok()?;
    let s = s.trim();
    u32::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok()
}

/// One TUNSETIFF on a fresh /dev/net/tun fd; returns the fd, or the errno.
fn tunsetiff(ifname: &str, flags: libc::c_short) -> io::Result<OwnedFd> {
    // SAFETY: plain open(2) of a constant path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(ifname, flags);
    // SAFETY: TUNSETIFF reads/writes a struct ifreq; IfReq has its layout.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong, val: libc::c_int) -> io::Result<()> {
    // SAFETY: these tun ioctls read one int through the pointer.
    if unsafe { libc::ioctl(fd, req, &val) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set IFF_UP on an interface (SIOCGIFFLAGS / SIOCSIFFLAGS).
fn set_up(ifname: &str) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = IfReq::new(ifname, 0);
    // SAFETY: SIOC[GS]IFFLAGS use ifr_name and ifr_flags of struct ifreq.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One queue pair of a tap device.
pub struct Tap {
    fd: OwnedFd,
    ifname: String,
    queue: usize,
    /// vfrelay created the device (non-persistent: it goes away with the
    /// last fd). Only used for logging and documentation in Drop.
    created: bool,
    /// Receive buffer, allocated once.
    buf: Box<[u8]>,
    /// Length of a frame in `buf` the sink refused last time.
    pending: Option<usize>,
    stats: BackendStats,
}

/// Open `queue_pairs` queues of tap `ifname`, creating the device if it does
/// not exist (see the module docs for what is created and removed).
pub fn open(ifname: &str, queue_pairs: usize) -> Result<Vec<Box<dyn Backend>>> {
    check_ifname(ifname)?;
    if queue_pairs == 0 || queue_pairs > MAX_QUEUES {
        return Err(Error::Other(format!(
            "tap {ifname}: {queue_pairs} queue pairs (1 to {MAX_QUEUES} supported)"
        )));
    }
    let base = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    let mut created = false;
    let mut multi = queue_pairs > 1;
    let first = if if_exists(ifname) {
        // Attach. The kernel insists the multi-queue flag matches the
        // device, so follow the existing device when it is multi-queue.
        match existing_tun_flags(ifname) {
            Some(f) if f & IFF_TAP as u32 == 0 => {
                return Err(Error::Other(format!(
                    "{ifname} exists and is not a tap device (tun_flags {f:#x})"
                )))
            }
            Some(f) if f & IFF_MULTI_QUEUE as u32 != 0 => multi = true,
            Some(_) if queue_pairs > 1 => {
                return Err(Error::Other(format!(
                    "tap {ifname} exists without multi_queue; {queue_pairs} queue pairs need \
                     `ip tuntap add mode tap name {ifname} multi_queue vnet_hdr`"
                )))
            }
            _ => {}
        }
        let flags = base | if multi { IFF_MULTI_QUEUE } else { 0 };
        tunsetiff(ifname, flags)
            .map_err(|e| Error::io(format!("attach to existing tap {ifname}"), e))?
    } else {
        let flags = base | if multi { IFF_MULTI_QUEUE } else { 0 };
        match tunsetiff(ifname, flags | IFF_TUN_EXCL) {
            Ok(fd) => {
                created = true;
                fd
            }
            // Someone created it between our check and TUNSETIFF: attach.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && if_exists(ifname) => {
                tunsetiff(ifname, flags)
                    .map_err(|e| Error::io(format!("attach to existing tap {ifname}"), e))?
            }
            Err(e) => return Err(Error::io(format!("create tap {ifname}"), e)),
        }
    };
    let flags = base | if multi { IFF_MULTI_QUEUE } else { 0 };
    let mut fds = vec![first];
    for q in 1..queue_pairs {
        // On error the fds opened so far close here; a device we created
        // then disappears with them.
        fds.push(
            tunsetiff(ifname, flags)
                .map_err(|e| Error::io(format!("tap {ifname} queue {q}"), e))?,
        );
    }
    for fd in &fds {
        let fd = fd.as_raw_fd();
        ioctl_int(fd, TUNSETVNETHDRSZ, VNET_HDR_LEN as libc::c_int)
            .map_err(|e| Error::io(format!("TUNSETVNETHDRSZ on tap {ifname}"), e))?;
        // virtio 1.0 headers are little-endian; on a big-endian host tell tun.
        #[cfg(target_endian = "big")]
        ioctl_int(fd, TUNSETVNETLE, 1)
            .map_err(|e| Error::io(format!("TUNSETVNETLE on tap {ifname}"), e))?;
        // No offloads until the guest acks them (set_offloads).
        // SAFETY: TUNSETOFFLOAD takes the flags as the argument value.
        if unsafe { libc::ioctl(fd, TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(Error::last_os(format!("TUNSETOFFLOAD on tap {ifname}")));
        }
    }
    if created {
        set_up(ifname).map_err(|e| Error::io(format!("bring tap {ifname} up"), e))?;
        log::info!("created tap {ifname} ({queue_pairs} queues, removed when vfrelay exits)");
    } else {
        log::info!(
            "attached to existing tap {ifname} ({queue_pairs} queues, left in place on exit)"
        );
    }
    Ok(fds
        .into_iter()
        .enumerate()
        .map(|(queue, fd)| {
            Box::new(Tap {
                fd,
                ifname: ifname.to_string(),
                queue,
                created,
                buf: vec![0u8; MAX_FRAME_LEN].into_boxed_slice(),
                pending: None,
                stats: BackendStats::default(),
            }) as Box<dyn Backend>
        })
        .collect())
}

impl Tap {
    /// Hand the frame in `buf[..len]` to the sink; false if refused.
    fn offer(&mut self, len: usize, sink: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        if !sink(&self.buf[..len]) {
            self.pending = Some(len);
            return false;
        }
        self.pending = None;
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
        true
    }
}

impl Backend for Tap {
    fn describe(&self) -> String {
        format!("tap {} q{}", self.ifname, self.queue)
    }

    fn vnet_hdr(&self) -> bool {
        true
    }

    fn tx_frame(&mut self, segs: Segs<'_>) -> Result<bool> {
        let total = segs.iter().fold(0usize, |a, s| a.saturating_add(s.iov_len));
        if segs.len() > libc::UIO_MAXIOV as usize
            || !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&total)
        {
            self.stats.tx_dropped += 1;
            log::debug!(
                "{}: dropping guest frame ({} segments, {total} bytes)",
                self.describe(),
                segs.len()
            );
            return Ok(true);
        }
        loop {
            // SAFETY: the kernel copies from the segments during the call,
            // which `Segs` promises are readable. No Rust references into
            // guest memory are made.
            let n = unsafe {
                libc::writev(
                    self.fd.as_raw_fd(),
                    segs.as_ptr(),
                    segs.len() as libc::c_int,
                )
            };
            if n >= 0 {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += (total - VNET_HDR_LEN) as u64;
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(false),
                _ => {
                    // A malformed frame (bad vnet header, too short, ...) or
                    // a device that is down: drop, never stall the queue.
                    self.stats.tx_dropped += 1;
                    self.stats.tx_write_errors += 1;
                    log::debug!("{}: writev of {total} bytes: {e}", self.describe());
                    return Ok(true);
                }
            }
        }
    }

    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(&[u8]) -> bool) -> Result<usize> {
        let mut n = 0;
        if let Some(len) = self.pending {
            if n >= max || !self.offer(len, sink) {
                return Ok(0);
            }
            n += 1;
        }
        while n < max {
            // SAFETY: reading into our own buffer of buf.len() bytes.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => break,
                    // Frame did not fit / could not be copied: the kernel
                    // already consumed it.
                    Some(libc::EFAULT) | Some(libc::EINVAL) | Some(libc::EMSGSIZE) => {
                        self.stats.rx_dropped += 1;
                        log::debug!("{}: read: {e}", self.describe());
                        continue;
                    }
                    _ => return Err(Error::io(format!("read from {}", self.describe()), e)),
                }
            }
            let len = r as usize;
            if len < VNET_HDR_LEN {
                self.stats.rx_dropped += 1;
                continue;
            }
            // tun writes the 10-byte virtio_net_hdr and skips the rest of the
            // 12: clear num_buffers rather than pass stale bytes on.
            self.buf[10] = 0;
            self.buf[11] = 0;
            if !self.offer(len, sink) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn set_offloads(&mut self, virtio_features: u64) -> Result<()> {
        let flags = tun_offload_flags(virtio_features);
        // SAFETY: TUNSETOFFLOAD takes the flags as the argument value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(Error::last_os(format!(
                "TUNSETOFFLOAD {flags:#x} on {}",
                self.describe()
            )));
        }
        log::debug!("{}: offloads {flags:#x}", self.describe());
        Ok(())
    }

    fn stats(&self) -> BackendStats {
        self.stats
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Closing the fd (OwnedFd, right after this) detaches the queue.
        // A device vfrelay created is not persistent, so the kernel deletes
        // it when its last queue closes; a pre-existing (persistent) tap
        // stays as it was. Either way there is nothing to delete here.
        if self.created {
            log::debug!(
                "{}: closing (device goes away with its last queue)",
                self.describe()
            );
        } else {
            log::debug!("{}: detaching (device left in place)", self.describe());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::*;

    #[test]
    fn offload_mapping() {
        assert_eq!(tun_offload_flags(0), 0);
        assert_eq!(tun_offload_flags(GUEST_CSUM), TUN_F_CSUM);
        // TSO without CSUM is meaningless: nothing.
        assert_eq!(tun_offload_flags(GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN), 0);
        assert_eq!(
            tun_offload_flags(GUEST_CSUM | GUEST_TSO4),
            TUN_F_CSUM | TUN_F_TSO4
        );
        assert_eq!(
            tun_offload_flags(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        // ECN only together with some TSO.
        assert_eq!(tun_offload_flags(GUEST_CSUM | GUEST_ECN), TUN_F_CSUM);
        // HOST_* and unsupported bits do not change what the tap may send.
        assert_eq!(
            tun_offload_flags(
                GUEST_CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN | CSUM | GUEST_UFO | (1 << 63)
            ),
            TUN_F_CSUM
        );
    }

    #[test]
    fn ioctl_numbers() {
        // _IOW('T', nr, int): dir 1 << 30, size 4 << 16, type 'T' << 8.
        let iow = |nr: libc::c_ulong| (1 << 30) | (4 << 16) | ((b'T' as libc::c_ulong) << 8) | nr;
        assert_eq!(TUNSETIFF, iow(202));
        assert_eq!(TUNSETOFFLOAD, iow(208));
        assert_eq!(TUNSETVNETHDRSZ, iow(216));
        assert_eq!(IFF_TUN_EXCL as u16, 0x8000);
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn rejects_bad_names_and_counts() {
        for bad in ["", "0123456789abcdef", "a/b", "tap%d", "a b", "a\0b"] {
            assert!(open(bad, 1).is_err(), "{bad:?}");
        }
        assert!(open("vfxbnever", 0).is_err());
        assert!(open("vfxbnever", MAX_QUEUES + 1).is_err());
    }
}
