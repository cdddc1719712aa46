//! Guest RX: frames from the backend are written into guest buffers, with
//! mergeable RX buffers when negotiated.

use vfrelay_backends::{Backend, VNET_HDR_LEN};

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
}

/// Patch num_buffers (bytes 10..12 of the header) at the start of `iov`.
fn set_num_buffers(iov: &[libc::iovec], n: u16) {
    let mut c = Cursor::new(iov);
    let mut skip = [0u8; 10];
    // Walk past the first 10 bytes without changing them: advance the
    // cursor by hand (write would overwrite).
    let mut left = skip.len();
    while left > 0 && c.seg < iov.len() {
        let k = (iov[c.seg].iov_len - c.off).min(left);
        c.off += k;
        left -= k;
        if c.off == iov[c.seg].iov_len {
            c.seg += 1;
            c.off = 0;
        }
    }
    skip[..2].copy_from_slice(&n.to_le_bytes());
    c.write(&skip[..2]);
}

/// Mark the first `written` bytes of a chain dirty.
fn log_written(chain: &Chain, mut written: usize, log: &DirtyLog, cache: &mut LogCache) {
    for (v, gpa) in chain.iov.iter().zip(&chain.gpa) {
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
            if frame.len() < VNET_HDR_LEN {
                stats.rx_dropped += 1;
                return true;
            }
            frame.split_at(VNET_HDR_LEN)
        } else {
            (&zero_hdr[..], frame)
        };
        let logging = log.as_mut().map(|(l, c)| (*l, &mut **c));
        match deliver(
            ring,
            mem,
            chain,
            &hdr[..hdr_len.min(VNET_HDR_LEN)],
            payload,
            hdr_len,
            mrg,
            logging,
        ) {
            Ok(Delivery::Done) => {
                stats.rx_frames += 1;
                stats.rx_bytes += payload.len() as u64;
                true
            }
            Ok(Delivery::TooBig) => {
                stats.rx_dropped += 1;
                true
            }
            Ok(Delivery::NoRoom) => false,
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

enum Delivery {
    Done,
    /// Not enough guest buffers right now: keep the frame.
    NoRoom,
    /// The frame can never fit (no mergeable buffers, chain too small).
    TooBig,
}

#[allow(clippy::too_many_arguments)]
fn deliver(
    ring: &mut SplitRing,
    mem: &MemView,
    chain: &mut Chain,
    hdr: &[u8],
    payload: &[u8],
    hdr_len: usize,
    mrg: bool,
    mut log: Option<(&DirtyLog, &mut LogCache)>,
) -> Result<Delivery, ChainError> {
    // The header we write: the backend's (or zero), num_buffers patched
    // below once known; a 10-byte legacy header has no num_buffers.
    let mut h = [0u8; VNET_HDR_LEN];
    h[..hdr.len()].copy_from_slice(hdr);
    if hdr_len == VNET_HDR_LEN {
        h[10..12].copy_from_slice(&1u16.to_le_bytes());
    }
    if !mrg {
        let total = hdr_len + payload.len();
        if ring.pending()? == 0 {
            return Ok(Delivery::NoRoom);
        }
        ring.pop(mem, true, MAX_RX_CHAIN, chain)?;
        if (chain.len as usize) < total {
            // Give the buffer back for a smaller frame.
            ring.unpop(1);
            return Ok(Delivery::TooBig);
        }
        let mut c = Cursor::new(&chain.iov);
        c.write(&h[..hdr_len]);
        c.write(payload);
        if let Some((l, cache)) = log {
            log_written(chain, total, l, cache);
        }
        ring.put_used(chain.head, total as u32);
        return Ok(Delivery::Done);
    }

    // Mergeable: spread the frame over as many chains as it needs. The
    // first chain's iovecs are kept to patch num_buffers at the end; the
    // header spans at most VNET_HDR_LEN segments.
    let mut first: [libc::iovec; VNET_HDR_LEN] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; VNET_HDR_LEN];
    let mut first_n = 0;
    let mut used = 0u16;
    let mut header_left: &[u8] = &h[..hdr_len];
    let mut data = payload;
    while used == 0 || !header_left.is_empty() || !data.is_empty() {
        if ring.pending()? == 0 || used == u16::MAX {
            // Roll back: the chains popped for this frame stay available
            // and their unpublished used entries are overwritten later.
            ring.unpop(used);
            ring.next_used = ring.next_used.wrapping_sub(used);
            return Ok(Delivery::NoRoom);
        }
        ring.pop(mem, true, MAX_RX_CHAIN, chain)?;
        let mut c = Cursor::new(&chain.iov);
        let k = c.write(header_left);
        header_left = &header_left[k..];
        let k = c.write(data);
        data = &data[k..];
        // Logged even if this frame is rolled back below: the bytes were
        // written all the same.
        if let Some((l, cache)) = log.as_mut() {
            log_written(chain, c.written, l, cache);
        }
        if used == 0 {
            first_n = chain.iov.len().min(VNET_HDR_LEN);
            first[..first_n].copy_from_slice(&chain.iov[..first_n]);
        }
        if c.written == 0 {
            // A zero-length buffer makes no progress: refuse it rather than
            // spin through the ring.
            return Err(ChainError::Undersized {
                len: 0,
                hdr: hdr_len,
            });
        }
        ring.put_used(chain.head, c.written as u32);
        used += 1;
    }
    if used > 1 && hdr_len == VNET_HDR_LEN {
        set_num_buffers(&first[..first_n], used);
    }
    Ok(Delivery::Done)
}
