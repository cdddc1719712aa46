//! Guest RX: frames from the backend are written into guest buffers, with
//! mergeable RX buffers when negotiated.

use vfrelay_backends::{copy_frame, Backend, Segs, VNET_HDR_LEN};

use super::dirty_log::{DirtyLog, LogCache};
use super::mem::MemView;
use super::ring::{Chain, ChainError, SplitRing};
use super::BURST;
use crate::stats::QueueStats;

/// Sanity cap on one RX chain: far above any frame, far below an overflow.
const MAX_RX_CHAIN: u64 = 1 << 24;

/// Writes a byte stream across an iovec list.
struct Cursor<'a> {
    iov: &'a [libc::iovec],
    seg: usize,
    off: usize,
    written: usize,
}

impl<'a> Cursor<'a> {
    fn new(iov: &'a [libc::iovec]) -> Self {
        Cursor {
            iov,
            seg: 0,
            off: 0,
            written: 0,
        }
    }

    /// Copy as much of `data` as fits; returns bytes copied.
    fn write(&mut self, mut data: &[u8]) -> usize {
        let start = data.len();
        while !data.is_empty() && self.seg < self.iov.len() {
            let v = &self.iov[self.seg];
            let room = v.iov_len - self.off;
            let k = room.min(data.len());
            // SAFETY: the segment was bounds-checked against guest memory
            // when the chain was popped; off + k <= iov_len.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    (v.iov_base as *mut u8).add(self.off),
                    k,
                )
            };
            self.off += k;
            data = &data[k..];
            if self.off == v.iov_len {
                self.seg += 1;
                self.off = 0;
            }
        }
        let n = start - data.len();
        self.written += n;
        n
    }

    /// Copy as much of what is left of `src` as fits; returns bytes copied.
    fn write_src(&mut self, src: &mut Src<'_>) -> usize {
        let mut n = 0;
        while src.left > 0 && self.seg < self.iov.len() {
            let v = &self.iov[self.seg];
            let s = &src.iov[src.seg];
            let k = (v.iov_len - self.off).min(s.iov_len - src.off);
            // SAFETY: both segments were checked where they were made (the
            // destination by pop, the source by whoever made the Segs);
            // each offset plus k stays inside its segment.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (s.iov_base as *const u8).add(src.off),
                    (v.iov_base as *mut u8).add(self.off),
                    k,
                )
            };
            self.off += k;
            if self.off == v.iov_len {
                self.seg += 1;
                self.off = 0;
            }
            src.advance(k);
            n += k;
        }
        self.written += n;
        n
    }
}

/// The bytes of a frame still to be written, across its source segments
/// (a backend's buffer, or another guest's TX chain on a switch).
pub struct Src<'a> {
    iov: &'a [libc::iovec],
    seg: usize,
    off: usize,
    left: usize,
}

impl<'a> Src<'a> {
    pub fn new(segs: Segs<'a>) -> Self {
        let iov: &'a [libc::iovec] = segs.into_iovecs();
        let mut s = Src {
            iov,
            seg: 0,
            off: 0,
            left: iov.iter().map(|v| v.iov_len).sum(),
        };
        s.advance(0);
        s
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.left
    }

    /// Step over `k` bytes (at most what is left of the current segment)
    /// and over any empty segments after them.
    fn advance(&mut self, k: usize) {
        self.off += k;
        self.left -= k;
        while self.left > 0 && self.off == self.iov[self.seg].iov_len {
            self.seg += 1;
            self.off = 0;
        }
    }

    /// The rest as one contiguous run, if it is one.
    fn contiguous(&self) -> Option<*const u8> {
        let v = self.iov.get(self.seg)?;
        // SAFETY: off <= iov_len, inside the segment.
        (v.iov_len - self.off == self.left)
            .then(|| unsafe { (v.iov_base as *const u8).add(self.off) })
    }
}

/// Write `src` at `dst` unless those bytes are already there. A buffer the
/// driver reposts usually still holds the header of its last frame, which
/// for most frames is the same: left alone, its cache line stays shared
/// with the driver's core instead of moving here and back (the driver then
/// reads the header without a miss). DPDK's vhost does the same.
///
/// # Safety
/// `dst..dst + src.len()` must be valid for reads and writes.
#[inline]
unsafe fn write_unless_equal(dst: *mut u8, src: &[u8]) {
    if let Ok(new) = <&[u8; VNET_HDR_LEN]>::try_from(src) {
        // The common case, compared in two loads rather than a memcmp call.
        // SAFETY: the caller's promise; guest memory is copied, never
        // borrowed.
        let old: [u8; VNET_HDR_LEN] = unsafe { std::ptr::read_unaligned(dst as *const _) };
        if old != *new {
            // SAFETY: as above.
            unsafe { std::ptr::write_unaligned(dst as *mut [u8; VNET_HDR_LEN], *new) };
        }
    } else {
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    }
}

/// Host and guest address of byte `off` of a chain.
fn byte_at(chain: &Chain, mut off: usize) -> Option<(*mut u8, u64)> {
    for (v, gpa) in chain.iov().iter().zip(chain.gpa()) {
        if off < v.iov_len {
            // SAFETY: off < iov_len, inside a segment checked against guest
            // memory when the chain was popped.
            let host = unsafe { (v.iov_base as *mut u8).add(off) };
            return Some((host, gpa + off as u64));
        }
        off -= v.iov_len;
    }
    None
}

/// Mark the first `written` bytes of a chain dirty.
fn log_written(chain: &Chain, mut written: usize, log: &DirtyLog, cache: &mut LogCache) {
    for (v, gpa) in chain.iov().iter().zip(chain.gpa()) {
        if written == 0 {
            break;
        }
        let k = written.min(v.iov_len);
        cache.mark(log, *gpa, k as u64);
        written -= k;
    }
}

/// Deliver up to BURST frames. A chain error aborts the burst.
/// `log`: while migration logging is on, every byte written is marked.
#[allow(clippy::too_many_arguments)]
pub fn burst(
    ring: &mut SplitRing,
    mem: &MemView,
    chain: &mut Chain,
    backend: &mut dyn Backend,
    hdr_len: usize,
    mrg: bool,
    mut log: Option<(&DirtyLog, &mut LogCache)>,
    stats: &mut QueueStats,
) -> Result<usize, ChainError> {
    let vnet = backend.vnet_hdr();
    let mut err: Option<ChainError> = None;
    let zero_hdr = [0u8; VNET_HDR_LEN];
    let mut sink = |frame: &[u8]| -> bool {
        let (hdr, payload) = if vnet {
            match frame.split_first_chunk::<VNET_HDR_LEN>() {
                Some(split) => split,
                None => {
                    stats.rx_dropped += 1;
                    stats.rx_dropped_short += 1;
                    return true;
                }
            }
        } else {
            (&zero_hdr, frame)
        };
        let logging = log.as_mut().map(|(l, c)| (*l, &mut **c));
        let one = [libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        }];
        // SAFETY: `payload` is borrowed for the whole call.
        let src = Src::new(unsafe { Segs::new(&one) });
        match deliver(ring, mem, chain, hdr, src, hdr_len, mrg, logging) {
            Ok(Delivery::Done) => {
                stats.count_rx(payload.len(), payload.get(..6));
                true
            }
            Ok(Delivery::TooBig) => {
                stats.rx_dropped += 1;
                stats.rx_dropped_oversized += 1;
                true
            }
            Ok(Delivery::NoRoom) => {
                stats.rx_no_buffer += 1;
                false
            }
            Err(e) => {
                err = Some(e);
                false
            }
        }
    };
    let n = match backend.rx_burst(BURST, &mut sink) {
        Ok(n) => n,
        Err(e) => {
            log::debug!("{}: rx: {e}", backend.describe());
            stats.rx_errors += 1;
            0
        }
    };
    match err {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

pub enum Delivery {
    Done,
    /// Not enough guest buffers right now: keep the frame.
    NoRoom,
    /// The frame can never fit (no mergeable buffers, chain too small).
    TooBig,
}

/// Write one frame (the first `hdr_len` bytes of `hdr`, then `data`) into
/// the guest's RX buffers.
#[allow(clippy::too_many_arguments)]
pub fn deliver(
    ring: &mut SplitRing,
    mem: &MemView,
    chain: &mut Chain,
    hdr: &[u8; VNET_HDR_LEN],
    mut data: Src<'_>,
    hdr_len: usize,
    mrg: bool,
    mut log: Option<(&DirtyLog, &mut LogCache)>,
) -> Result<Delivery, ChainError> {
    // The header we write: the backend's (or zero), num_buffers patched
    // below once known; a 10-byte legacy header has no num_buffers.
    // A whole array, so one move: a copy of a variable length is a call
    // into memcpy (a tenth of a 64 B frame's time on a switch).
    let mut h = *hdr;
    if hdr_len == VNET_HDR_LEN {
        // Bytes 8..12 patched as one 4-byte word: a 2-byte store of
        // num_buffers alone, read back by the 4-byte load comparing the
        // header with the guest's, could not be store-forwarded and waited
        // for every older store (guest buffers, used entries) to reach the
        // cache; a fifth of deliver's samples sat there.
        let w = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) & 0xffff | 1 << 16;
        h[8..12].copy_from_slice(&w.to_le_bytes());
    }
    if !mrg {
        let total = hdr_len + data.len();
        let pending = ring.pending()?;
        if pending == 0 {
            return Ok(Delivery::NoRoom);
        }
        ring.prefetch(pending, true, 0);
        ring.pop(mem, true, MAX_RX_CHAIN, chain)?;
        if (chain.bytes() as usize) < total {
            // Give the buffer back for a smaller frame.
            ring.unpop(1);
            return Ok(Delivery::TooBig);
        }
        let mut c = Cursor::new(chain.iov());
        c.write(&h[..hdr_len]);
        c.write_src(&mut data);
        if let Some((l, cache)) = log {
            log_written(chain, total, l, cache);
        }
        ring.put_used(chain.head(), total as u32);
        return Ok(Delivery::Done);
    }

    // Mergeable: spread the frame over as many chains as it needs.
    // num_buffers (header bytes 10 and 11, which may sit in different
    // segments) is patched at the end if more than one chain was used: its
    // address is noted while the first chain is at hand. Two pointers, not a
    // copy of the first chain's iovecs: that array had to be cleared for
    // every frame.
    let mut num_buffers_at: [Option<(*mut u8, u64)>; 2] = [None; 2];
    let mut used = 0u16;
    let mut header_left: &[u8] = &h[..hdr_len];
    // A chain error part way through a frame stops the queue; the chains
    // this frame already filled must not be published with it (a truncated
    // frame, num_buffers still 1).
    let abandon = |ring: &mut SplitRing, used: u16, e: ChainError| {
        ring.unput(used);
        Err(e)
    };
    while used == 0 || !header_left.is_empty() || data.len() > 0 {
        let pending = match ring.pending() {
            Ok(p) => p,
            Err(e) => return abandon(ring, used, e),
        };
        if pending == 0 || used == u16::MAX {
            // Roll back: the chains popped for this frame stay available
            // and their unpublished used entries are overwritten later.
            ring.unpop(used);
            ring.unput(used);
            return Ok(Delivery::NoRoom);
        }
        ring.prefetch(pending, true, 0);
        if let Err(e) = ring.pop(mem, true, MAX_RX_CHAIN, chain) {
            return abandon(ring, used, e);
        }
        let written = match (chain.iov(), data.contiguous()) {
            // The whole rest fits the chain's one buffer and comes from one
            // (small frames in mergeable buffers): the header (unless
            // already there) and the payload, no cursor.
            ([v], Some(from)) if v.iov_len >= header_left.len() + data.len() => {
                let p = v.iov_base as *mut u8;
                let n = data.len();
                // SAFETY: both writes end within the segment, which was
                // bounds-checked against guest memory by pop; `from` has
                // `n` readable bytes (Src).
                unsafe {
                    write_unless_equal(p, header_left);
                    copy_frame(from, p.add(header_left.len()), n);
                }
                data.advance(n);
                let n = header_left.len() + n;
                header_left = &[];
                n
            }
            (iov, _) => {
                let mut c = Cursor::new(iov);
                let k = c.write(header_left);
                header_left = &header_left[k..];
                c.write_src(&mut data);
                c.written
            }
        };
        // Logged even if this frame is rolled back below: the bytes were
        // written all the same.
        if let Some((l, cache)) = log.as_mut() {
            log_written(chain, written, l, cache);
        }
        if used == 0 && hdr_len == VNET_HDR_LEN {
            num_buffers_at = [byte_at(chain, 10), byte_at(chain, 11)];
        }
        if written == 0 {
            // A zero-length buffer makes no progress: refuse it rather than
            // spin through the ring.
            let e = ChainError::Undersized {
                len: 0,
                hdr: hdr_len,
            };
            return abandon(ring, used, e);
        }
        ring.put_used(chain.head(), written as u32);
        used += 1;
    }
    if used > 1 {
        for (at, b) in num_buffers_at.into_iter().zip(used.to_le_bytes()) {
            if let Some((p, _)) = at {
                // SAFETY: inside the first chain's buffers (byte_at), which
                // the guest cannot take back before the used index moves.
                unsafe { p.write(b) };
            }
        }
        // Marked again after the patch: the cache may have flushed the
        // first buffer's marks mid-burst, and a log sync in between would
        // have sent the page with num_buffers still 1.
        if let Some((l, cache)) = log.as_mut() {
            for (_, gpa) in num_buffers_at.into_iter().flatten() {
                cache.mark(l, gpa, 1);
            }
        }
    }
    Ok(Delivery::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header a buffer already holds is not written again: shown on a
    /// read-only page, where a write would fault.
    #[test]
    fn an_unchanged_header_is_left_alone() {
        // SAFETY: a fresh private anonymous page, unmapped below.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        let p = page as *mut u8;
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[10] = 1;
        // SAFETY: inside the page, which is read-write here.
        unsafe { write_unless_equal(p.add(100), &hdr) };
        // SAFETY: our page.
        assert_eq!(unsafe { libc::mprotect(page, 4096, libc::PROT_READ) }, 0);
        // SAFETY: inside the page; the same bytes are there, so no write.
        unsafe { write_unless_equal(p.add(100), &hdr) };
        // SAFETY: reading our page.
        let got = unsafe { std::slice::from_raw_parts(p.add(100), VNET_HDR_LEN) };
        assert_eq!(got, hdr);
        // SAFETY: our page; a changed header is written.
        assert_eq!(
            unsafe { libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_WRITE) },
            0
        );
        hdr[0] = 1;
        // SAFETY: inside the page.
        unsafe { write_unless_equal(p.add(100), &hdr) };
        // SAFETY: reading our page.
        assert_eq!(unsafe { *p.add(100) }, 1);
        // SAFETY: unmapping what was mapped above; `got` is not used again.
        unsafe { libc::munmap(page, 4096) };
    }
}
