//! Guest TX: descriptor chains from the guest become frames for the backend.

use log::debug;
use vfrelay_backends::{Backend, MAX_FRAME_LEN, VNET_HDR_LEN};

use super::mem::MemView;
use super::ring::{Chain, ChainError, SplitRing};
use super::BURST;
use crate::stats::QueueStats;

/// Largest chain a guest may send: header plus a 64 KiB GSO frame.
pub const MAX_TX_CHAIN: u64 = MAX_FRAME_LEN as u64;

/// The destination MAC of the frame `off` bytes into a chain, if its first
/// segment holds it (a copy: guest memory is never borrowed).
#[inline]
fn dest(chain: &Chain, off: usize) -> Option<[u8; 6]> {
    let v = chain.iov().first()?;
    if v.iov_len < off + 6 {
        return None;
    }
    let mut d = [0u8; 6];
    // SAFETY: off + 6 <= iov_len, inside a segment pop checked against
    // guest memory.
    unsafe { std::ptr::copy_nonoverlapping((v.iov_base as *const u8).add(off), d.as_mut_ptr(), 6) };
    Some(d)
}

/// Relay up to BURST chains. Returns (frames taken, backend was full).
pub fn burst(
    ring: &mut SplitRing,
    mem: &MemView,
    chain: &mut Chain,
    backend: &mut dyn Backend,
    hdr_len: usize,
    stats: &mut QueueStats,
) -> Result<(usize, bool), ChainError> {
    let mut n = 0;
    let res = take(ring, mem, chain, backend, hdr_len, stats, &mut n);
    // Also when a bad chain stopped the burst: the frames taken before it
    // are the guest's, and the stopped queue will not flush them later.
    if n > 0 {
        if let Err(e) = backend.tx_flush() {
            debug!("{}: tx flush: {e}", backend.describe());
            stats.tx_errors += 1;
        }
    }
    res.map(|blocked| (n, blocked))
}

/// [`burst`]'s loop: counts frames taken in `n`, returns whether the
/// backend was full.
fn take(
    ring: &mut SplitRing,
    mem: &MemView,
    chain: &mut Chain,
    backend: &mut dyn Backend,
    hdr_len: usize,
    stats: &mut QueueStats,
    n: &mut usize,
) -> Result<bool, ChainError> {
    let vnet = backend.vnet_hdr();
    // The header is skipped unread for a plain-Ethernet backend (below).
    let unread = if !vnet || hdr_len != VNET_HDR_LEN {
        hdr_len
    } else {
        0
    };
    let mut blocked = false;
    let mut pending = ring.pending()?;
    ring.prefetch_used(pending.min(BURST as u16));
    while *n < BURST {
        if pending == 0 {
            pending = ring.pending()?;
            if pending == 0 {
                break;
            }
        }
        ring.prefetch(pending, false, unread);
        ring.pop(mem, false, MAX_TX_CHAIN, chain)?;
        pending -= 1;
        if chain.bytes() < hdr_len as u64 {
            return Err(ChainError::Undersized {
                len: chain.bytes(),
                hdr: hdr_len,
            });
        }
        let len = chain.bytes();
        // Plain-Ethernet backends take the frame without the header (no
        // offloads were offered, so it carries nothing we need). A legacy
        // 10-byte header is stripped too, though a vnet backend then gets
        // no header at all: no driver seen declines both VERSION_1 and
        // MRG_RXBUF, so this case is untested and known to be wrong.
        if unread > 0 {
            chain.skip_front(unread);
        }
        // SAFETY: popped just now with `mem`, which the caller holds.
        match backend.tx_frame(unsafe { chain.segs() }) {
            Ok(true) => {
                ring.put_used(chain.head(), 0);
                stats.count_tx(
                    (len - hdr_len as u64) as usize,
                    dest(chain, hdr_len - unread).as_ref().map(|d| &d[..]),
                );
                *n += 1;
            }
            Ok(false) => {
                ring.unpop(1);
                stats.tx_backend_full += 1;
                blocked = true;
                break;
            }
            Err(e) => {
                debug!("{}: tx: {e}", backend.describe());
                ring.put_used(chain.head(), 0);
                stats.tx_errors += 1;
                *n += 1;
            }
        }
    }
    Ok(blocked)
}
