//! One AF_XDP socket with its own UMEM: the [`Backend`] for one queue pair.
//!
//! UMEM layout: `NUM_FRAMES` frames of `FRAME_SIZE` bytes. The first half
//! only ever cycles between the fill ring, the kernel and the RX ring; the
//! second half between our free list, the TX ring and the completion ring.
//! Each ring is as large as the frames that can be in it, so a push of a
//! frame we own can never find its ring full.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use log::{debug, warn};

use super::ring::{ConsRing, Mmap, ProdRing, RawRing};
use super::XdpProgram;
use crate::{Backend, BackendStats, Error, Result, Segs, XdpMode};

pub const FRAME_SIZE: usize = 4096;
const NUM_FRAMES: usize = 4096;
const RX_FRAMES: usize = NUM_FRAMES / 2;
const TX_FRAMES: usize = NUM_FRAMES - RX_FRAMES;
const RING_SIZE: u32 = 2048;
/// Twice the TX frames: the ring is then never more than half full, and the
/// kernel reports POLLOUT (its test) on every completion wakeup, so an
/// edge-triggered waiter always hears that TX has room again.
const TX_RING_SIZE: u32 = 2 * TX_FRAMES as u32;
const ETH_HLEN: usize = 14;
/// Copy mode transmits at most `max_tx_budget` frames per sendto() (it then
/// returns EAGAIN). The kernel's default is 32; since Linux 6.17 a socket
/// may raise it (XDP_MAX_TX_SKB_BUDGET, from linux/if_xdp.h; not in the libc
/// crate yet). We ask for TX_BUDGET, so a whole dataplane burst (64 frames)
/// goes out in one call instead of two. Older kernels refuse the option
/// and keep 32.
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;
const TX_BUDGET: u32 = 256;
/// Enough kicks to drain a full TX ring at the default budget, plus slack.
const MAX_KICKS: usize = TX_FRAMES / 32 + 4;

const _: () = assert!(RX_FRAMES <= RING_SIZE as usize && TX_FRAMES <= RING_SIZE as usize);
const _: () = assert!(TX_RING_SIZE.is_power_of_two());
// The kernel accepts a budget from 32 up to the TX ring's size.
const _: () = assert!(TX_BUDGET >= 32 && TX_BUDGET <= TX_RING_SIZE);
const _: () = assert!(FRAME_SIZE.is_power_of_two());

pub struct Xsk {
    // Field order is drop order. Rings are unmapped first, then the socket
    // is closed (the kernel takes it out of the XSKMAP and lets go of the
    // UMEM pages it pinned), then the UMEM is unmapped, and last our share
    // of the program: the final queue pair's drop detaches it.
    rx: ConsRing<libc::xdp_desc>,
    tx: ProdRing<libc::xdp_desc>,
    fill: ProdRing<u64>,
    comp: ConsRing<u64>,
    fd: OwnedFd,
    umem: Mmap,
    prog: Arc<XdpProgram>,
    /// TX frames we own, by UMEM offset. Capacity TX_FRAMES, never grows.
    tx_free: Vec<u64>,
    queue: u32,
    zerocopy: bool,
    warned_down: bool,
    stats: BackendStats,
}

// SAFETY: the raw pointers all point into mappings this value owns; it is
// used by one thread at a time (`&mut self`), as the trait requires.
unsafe impl Send for Xsk {}

fn os_err(ifname: &str, queue: u32, what: &str, e: io::Error) -> Error {
    Error::io(format!("af-xdp: {ifname} queue {queue}: {what}"), e)
}

fn setsockopt<T>(fd: RawFd, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: v points to a live T of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            opt,
            v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Maps one ring described by `off` with `size` slots of T.
fn map_ring<T: Copy>(
    fd: RawFd,
    off: &libc::xdp_ring_offset,
    size: u32,
    pgoff: libc::off_t,
) -> io::Result<(RawRing<T>, Mmap)> {
    let len = off.desc as usize + size as usize * std::mem::size_of::<T>();
    let map = Mmap::socket_ring(fd, len, pgoff)?;
    // SAFETY: the kernel laid out the ring at these offsets inside `len`
    // bytes; the mapping lives as long as the ring that owns it.
    let raw = unsafe {
        RawRing::new(
            map.as_ptr(),
            off.producer as usize,
            off.consumer as usize,
            off.flags as usize,
            off.desc as usize,
            size,
        )
    };
    Ok((raw, map))
}

/// Where a received descriptor's bytes are, if they lie inside one frame.
fn rx_frame_range(addr: u64, len: u32, umem_len: usize) -> Option<(usize, usize)> {
    let start = usize::try_from(addr).ok()?;
    let end = start.checked_add(len as usize)?;
    if end > umem_len || start % FRAME_SIZE + len as usize > FRAME_SIZE {
        return None;
    }
    Some((start, len as usize))
}

/// The frame a (possibly offset) UMEM address belongs to.
fn frame_base(addr: u64) -> u64 {
    addr & !(FRAME_SIZE as u64 - 1)
}

/// Total length of a frame given as segments; None if it cannot fit a frame.
fn tx_len(segs: &[libc::iovec]) -> Option<usize> {
    let total = segs
        .iter()
        .try_fold(0usize, |acc, s| acc.checked_add(s.iov_len))?;
    (ETH_HLEN..=FRAME_SIZE).contains(&total).then_some(total)
}

/// Copies the segments back to back to `dst`.
///
/// # Safety
/// `dst` must be valid for writes of the segments' total length, and each
/// segment readable for its length. The sources may change under us (guest
/// memory): only raw copies, never references.
unsafe fn copy_segs(dst: *mut u8, segs: &[libc::iovec]) {
    let mut off = 0;
    for s in segs {
        if s.iov_len == 0 {
            continue; // iov_base may be NULL; copy_nonoverlapping wants non-null
        }
        std::ptr::copy_nonoverlapping(s.iov_base as *const u8, dst.add(off), s.iov_len);
        off += s.iov_len;
    }
}

impl Xsk {
    /// Opens the socket for `queue` in `mode` (zero-copy, copy, or
    /// zero-copy falling back to copy).
    pub fn open(prog: &Arc<XdpProgram>, queue: u32, mode: XdpMode) -> Result<Xsk> {
        match mode {
            XdpMode::Copy => Self::create(prog, queue, false),
            XdpMode::ZeroCopy => Self::create(prog, queue, true),
            XdpMode::Auto => Self::create(prog, queue, true).or_else(|e| {
                debug!("{e}; falling back to copy mode");
                Self::create(prog, queue, false)
            }),
        }
    }

    fn create(prog: &Arc<XdpProgram>, queue: u32, zerocopy: bool) -> Result<Xsk> {
        let ifname = prog.ifname.as_str();
        let err = |what: &str, e: io::Error| os_err(ifname, queue, what, e);

        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err("creating AF_XDP socket", io::Error::last_os_error()));
        }
        // SAFETY: fresh fd from socket(2).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let umem =
            Mmap::anonymous(NUM_FRAMES * FRAME_SIZE).map_err(|e| err("allocating UMEM", e))?;

        let reg = libc::xdp_umem_reg {
            addr: umem.as_ptr() as u64,
            len: umem.len() as u64,
            chunk_size: FRAME_SIZE as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(raw, libc::XDP_UMEM_REG, &reg).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::ENOBUFS)
                || e.raw_os_error() == Some(libc::ENOMEM)
            {
                " (locked-memory limit? needs CAP_IPC_LOCK or a higher RLIMIT_MEMLOCK)"
            } else {
                ""
            };
            err(&format!("registering UMEM{hint}"), e)
        })?;
        for (opt, name, size) in [
            (libc::XDP_UMEM_FILL_RING, "fill ring", RING_SIZE),
            (libc::XDP_UMEM_COMPLETION_RING, "completion ring", RING_SIZE),
            (libc::XDP_RX_RING, "rx ring", RING_SIZE),
            (libc::XDP_TX_RING, "tx ring", TX_RING_SIZE),
        ] {
            setsockopt(raw, opt, &size).map_err(|e| err(&format!("sizing {name}"), e))?;
        }

        // Needs the TX ring to exist; a kernel without the option (< 6.17)
        // answers ENOPROTOOPT and sends 32 frames per kick, as before.
        if let Err(e) = setsockopt(raw, XDP_MAX_TX_SKB_BUDGET, &TX_BUDGET) {
            debug!("af-xdp: {ifname} queue {queue}: TX budget {TX_BUDGET} not set ({e}); kernel default");
        }

        // SAFETY: all-zero is a valid xdp_mmap_offsets.
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of_val(&off) as libc::socklen_t;
        // SAFETY: off/len are valid for the kernel to write.
        let r = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                &mut off as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if r < 0 {
            return Err(err("reading ring offsets", io::Error::last_os_error()));
        }
        if len as usize != std::mem::size_of_val(&off) {
            return Err(Error::Other(format!(
                "af-xdp: {ifname}: kernel too old (AF_XDP rings without need-wakeup flags)"
            )));
        }

        let map = |what: &str, o: &libc::xdp_ring_offset, pgoff: i64| {
            map_ring::<u64>(raw, o, RING_SIZE, pgoff as libc::off_t).map_err(|e| err(what, e))
        };
        let (fr, fr_map) = map(
            "mapping fill ring",
            &off.fr,
            libc::XDP_UMEM_PGOFF_FILL_RING as i64,
        )?;
        let (cr, cr_map) = map(
            "mapping completion ring",
            &off.cr,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING as i64,
        )?;
        let (rx, rx_map) =
            map_ring::<libc::xdp_desc>(raw, &off.rx, RING_SIZE, libc::XDP_PGOFF_RX_RING)
                .map_err(|e| err("mapping rx ring", e))?;
        let (tx, tx_map) =
            map_ring::<libc::xdp_desc>(raw, &off.tx, TX_RING_SIZE, libc::XDP_PGOFF_TX_RING)
                .map_err(|e| err("mapping tx ring", e))?;

        let mut xsk = Xsk {
            rx: ConsRing::new(rx, Some(rx_map)),
            tx: ProdRing::new(tx, Some(tx_map)),
            fill: ProdRing::new(fr, Some(fr_map)),
            comp: ConsRing::new(cr, Some(cr_map)),
            fd,
            umem,
            prog: Arc::clone(prog),
            tx_free: Vec::with_capacity(TX_FRAMES),
            queue,
            zerocopy,
            warned_down: false,
            stats: BackendStats::default(),
        };
        // Hand every RX frame to the kernel up front.
        for i in 0..RX_FRAMES {
            xsk.fill.push((i * FRAME_SIZE) as u64);
        }
        xsk.fill.submit();
        xsk.tx_free.extend(
            (RX_FRAMES..NUM_FRAMES)
                .rev()
                .map(|i| (i * FRAME_SIZE) as u64),
        );

        let flags = if zerocopy {
            libc::XDP_ZEROCOPY
        } else {
            libc::XDP_COPY
        };
        let sa = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: flags | libc::XDP_USE_NEED_WAKEUP,
            sxdp_ifindex: prog.ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: sa is a valid sockaddr_xdp of the size passed.
        let r = unsafe {
            libc::bind(
                raw,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&sa) as libc::socklen_t,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) if zerocopy => Error::Other(format!(
                    "af-xdp: {ifname} queue {queue}: the driver does not support zero-copy \
                     AF_XDP ({e}); use mode=copy or mode=auto"
                )),
                Some(libc::EBUSY) => Error::Other(format!(
                    "af-xdp: {ifname} queue {queue} is already bound by another AF_XDP socket"
                )),
                _ => err(
                    if zerocopy {
                        "binding AF_XDP socket (zero-copy)"
                    } else {
                        "binding AF_XDP socket (copy mode)"
                    },
                    e,
                ),
            });
        }
        Ok(xsk)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Recycles frames the kernel finished sending.
    fn reap_completions(&mut self) {
        let n = self.comp.available(u32::MAX);
        for i in 0..n {
            let addr = frame_base(self.comp.peek(i));
            // Only our TX frames can complete; the checks keep a bogus entry
            // from growing the list (an allocation) or aliasing an RX frame.
            if addr >= (RX_FRAMES * FRAME_SIZE) as u64
                && addr < (NUM_FRAMES * FRAME_SIZE) as u64
                && self.tx_free.len() < TX_FRAMES
            {
                self.tx_free.push(addr);
            }
        }
        self.comp.release(n);
    }

    /// Publishes queued TX descriptors and, if the kernel wants it, kicks
    /// until it has taken them all or stops making progress.
    fn kick_tx(&mut self) -> Result<()> {
        self.tx.submit();
        if !self.tx.needs_wakeup() {
            return Ok(());
        }
        let mut before = self.tx.outstanding();
        for _ in 0..MAX_KICKS {
            if before == 0 {
                break;
            }
            // SAFETY: a zero-length send with no buffer or address.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // More pending than one call sends, or the device/queue
                    // is momentarily busy: progress decides whether to go on.
                    Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR) => {}
                    // Link down: frames wait in the ring until it comes back.
                    Some(libc::ENETDOWN) => {
                        if !self.warned_down {
                            warn!("{}: interface is down, TX waits", self.describe());
                            self.warned_down = true;
                        }
                        break;
                    }
                    _ => {
                        return Err(Error::io(
                            format!("af-xdp: {}: TX kick", self.describe()),
                            e,
                        ))
                    }
                }
            } else {
                self.warned_down = false;
            }
            let after = self.tx.outstanding();
            if after >= before {
                break;
            }
            before = after;
        }
        Ok(())
    }

    fn wake_rx(&self) {
        // SAFETY: a zero-length, non-blocking receive: only a wakeup.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }

    fn kernel_stats(&self) -> Option<libc::xdp_statistics> {
        // SAFETY: all-zero is a valid xdp_statistics.
        let mut st: libc::xdp_statistics = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of_val(&st) as libc::socklen_t;
        // SAFETY: st/len are valid for the kernel to write.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_STATISTICS,
                &mut st as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        (r == 0).then_some(st)
    }
}

impl Backend for Xsk {
    fn describe(&self) -> String {
        format!(
            "af-xdp {} q{} ({}, {} XDP)",
            self.prog.ifname,
            self.queue,
            if self.zerocopy { "zero-copy" } else { "copy" },
            if self.prog.native {
                "native"
            } else {
                "generic"
            }
        )
    }

    fn tx_frame(&mut self, segs: Segs<'_>) -> Result<bool> {
        let Some(len) = tx_len(&segs) else {
            self.stats.tx_dropped += 1;
            return Ok(true);
        };
        if self.tx_free.is_empty() {
            self.reap_completions();
        }
        if self.tx_free.is_empty() || self.tx.free(1) == 0 {
            // Send what is queued, so room appears even if the caller only
            // retries later without a tx_flush in between.
            self.kick_tx()?;
            self.reap_completions();
            if self.tx.free(1) == 0 {
                return Ok(false);
            }
        }
        let Some(addr) = self.tx_free.pop() else {
            self.stats.completion_shortfall += 1;
            return Ok(false);
        };
        // SAFETY: addr is a TX frame we own (free list), FRAME_SIZE bytes
        // inside the UMEM, and len <= FRAME_SIZE; `Segs` promises the
        // segments are readable.
        unsafe { copy_segs(self.umem.as_ptr().add(addr as usize), &segs) };
        let queued = self.tx.push(libc::xdp_desc {
            addr,
            len: len as u32,
            options: 0,
        });
        debug_assert!(queued, "free TX slot checked above");
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += len as u64;
        Ok(true)
    }

    fn tx_flush(&mut self) -> Result<()> {
        self.kick_tx()?;
        self.reap_completions();
        Ok(())
    }

    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(&[u8]) -> bool) -> Result<usize> {
        // The dataplane calls this on every fd event, including the POLLOUT
        // that follows TX completions: recycle them, and retry TX a kick
        // left behind (device queue was busy), which nothing else would.
        if self.tx.outstanding() > 0 {
            self.kick_tx()?;
        }
        self.reap_completions();
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        let ready = self.rx.available(max);
        // Always true by construction (the fill ring holds all RX frames),
        // but never write into a full fill ring.
        let avail = ready.min(self.fill.free(ready));
        self.stats.fill_shortfall += u64::from(ready - avail);
        let base = self.umem.as_ptr();
        let mut n = 0;
        while n < avail {
            let d = self.rx.peek(n);
            match rx_frame_range(d.addr, d.len, self.umem.len()) {
                Some((off, len)) => {
                    // SAFETY: inside the UMEM (checked); the kernel does not
                    // write this frame until we put it back on the fill ring.
                    let frame = unsafe { std::slice::from_raw_parts(base.add(off), len) };
                    if !sink(frame) {
                        break; // keep this descriptor for the next call
                    }
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += len as u64;
                }
                None => self.stats.rx_dropped += 1,
            }
            let addr = frame_base(d.addr);
            if addr < (RX_FRAMES * FRAME_SIZE) as u64 {
                self.fill.push(addr);
            }
            n += 1;
        }
        self.rx.release(n);
        if n > 0 {
            self.fill.submit();
        }
        if self.fill.needs_wakeup() {
            self.wake_rx();
        }
        Ok(n as usize)
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn stats(&self) -> BackendStats {
        let mut s = self.stats;
        if let Some(k) = self.kernel_stats() {
            // Frames the kernel could not deliver (RX ring or fill ring
            // empty/full) and TX descriptors it rejected.
            s.rx_dropped += k.rx_dropped + k.rx_ring_full;
            s.tx_dropped += k.tx_invalid_descs;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: b.len(),
        }
    }

    #[test]
    fn rx_descriptors_are_bounds_checked() {
        let umem = NUM_FRAMES * FRAME_SIZE;
        // Copy mode puts data after 256 bytes of XDP headroom.
        assert_eq!(rx_frame_range(256, 60, umem), Some((256, 60)));
        assert_eq!(rx_frame_range(4096 + 256, 3840, umem), Some((4352, 3840)));
        assert_eq!(
            rx_frame_range(256, 3841, umem),
            None,
            "crosses into next frame"
        );
        assert_eq!(rx_frame_range(umem as u64, 1, umem), None);
        assert_eq!(rx_frame_range(u64::MAX - 4, 60, umem), None);
        assert_eq!(
            rx_frame_range((umem - FRAME_SIZE) as u64, FRAME_SIZE as u32, umem),
            Some((umem - FRAME_SIZE, FRAME_SIZE))
        );
    }

    #[test]
    fn frame_base_strips_headroom() {
        assert_eq!(frame_base(256), 0);
        assert_eq!(frame_base(3 * 4096 + 300), 3 * 4096);
        assert_eq!(frame_base(8192), 8192);
    }

    #[test]
    fn tx_length_limits() {
        let big = vec![0u8; FRAME_SIZE + 1];
        let ok = vec![0u8; FRAME_SIZE];
        assert_eq!(tx_len(&[iov(&ok[..10]), iov(&ok[10..])]), Some(FRAME_SIZE));
        assert_eq!(tx_len(&[iov(&big)]), None);
        assert_eq!(tx_len(&[iov(&ok[..13])]), None, "runt");
        assert_eq!(tx_len(&[]), None);
        let huge = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: usize::MAX,
        };
        assert_eq!(tx_len(&[iov(&ok[..20]), huge]), None, "overflow");
    }

    #[test]
    fn segments_are_copied_back_to_back() {
        let src: Vec<u8> = (0..100u8).collect();
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut dst = [0xffu8; 101];
        unsafe {
            copy_segs(
                dst.as_mut_ptr(),
                &[iov(&src[..7]), empty, iov(&src[7..50]), iov(&src[50..])],
            )
        };
        assert_eq!(&dst[..100], &src[..]);
        assert_eq!(dst[100], 0xff);
    }
}
