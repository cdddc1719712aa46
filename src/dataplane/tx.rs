//! Guest TX: descriptor chains from the guest become frames for the backend.

use log::debug;
use vfrelay_backends::{Backend, MAX_FRAME_LEN, VNET_HDR_LEN};

use super::mem::MemView;
use super::ring::{Chain, ChainError, SplitRing};
use super::BURST;
use crate::stats::QueueStats;

/// Largest chain a guest may send: header plus a 64 KiB GSO frame.
pub const MAX_TX_CHAIN: u64 = MAX_FRAME_LEN as u64;

/// Drop the first `n` bytes of an iovec list in place.
fn skip_front(iov: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0;
    for v in iov.iter_mut() {
        if n == 0 {
            break;
        }
        let k = n.min(v.iov_len);
        // SAFETY: k <= iov_len, stays inside the segment.
        v.iov_base = unsafe { (v.iov_base as *mut u8).add(k) } as *mut libc::c_void;
        v.iov_len -= k;
        n -= k;
        if v.iov_len == 0 {
            drop += 1;
        }
    }
    if drop > 0 {
        iov.drain(..drop);
    }
}

/// The destination MAC of the frame `off` bytes into a chain, if its first
/// segment holds it (a copy: guest memory is never borrowed).
#[inline]
fn dest(chain: &Chain, off: usize) -> Option<[u8; 6]> {
    let v = chain.iov.first()?;
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
    let vnet = backend.vnet_hdr();
    // The header is skipped unread for a plain-Ethernet backend (below).
    let unread = if !vnet || hdr_len != VNET_HDR_LEN {
        hdr_len
    } else {
        0
    };
    let mut n = 0;
    let mut blocked = false;
    let mut pending = ring.pending()?;
    ring.prefetch_used(pending.min(BURST as u16));
    while n < BURST {
        if pending == 0 {
            pending = ring.pending()?;
            if pending == 0 {
                break;
            }
        }
        ring.prefetch(pending, false, unread);
        ring.pop(mem, false, MAX_TX_CHAIN, chain)?;
        pending -= 1;
        if chain.len < hdr_len as u64 {
            return Err(ChainError::Undersized {
                len: chain.len,
                hdr: hdr_len,
            });
        }
        let len = chain.len;
        // Plain-Ethernet backends take the frame without the header (no
        // offloads were offered, so it carries nothing we need). A legacy
        // 10-byte header is stripped too, though a vnet backend then gets
        // no header at all: no driver seen declines both VERSION_1 and
        // MRG_RXBUF, so this case is untested and known to be wrong.
        if unread > 0 {
            skip_front(&mut chain.iov, unread);
        }
        match backend.tx_frame(&chain.iov) {
            Ok(true) => {
                ring.put_used(chain.head, 0);
                stats.count_tx(
                    (len - hdr_len as u64) as usize,
                    dest(chain, hdr_len - unread).as_ref().map(|d| &d[..]),
                );
                n += 1;
            }
            Ok(false) => {
                ring.unpop(1);
                stats.tx_backend_full += 1;
                blocked = true;
                break;
            }
            Err(e) => {
                debug!("{}: tx: {e}", backend.describe());
                ring.put_used(chain.head, 0);
                stats.tx_errors += 1;
                n += 1;
            }
        }
    }
    if n > 0 {
        if let Err(e) = backend.tx_flush() {
            debug!("{}: tx flush: {e}", backend.describe());
            stats.tx_errors += 1;
        }
    }
    Ok((n, blocked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_front_across_segments() {
        let a = [0u8; 8];
        let b = [0u8; 8];
        let mut v = vec![
            libc::iovec {
                iov_base: a.as_ptr() as *mut _,
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: 8,
            },
        ];
        skip_front(&mut v, 12);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 4);
        assert_eq!(v[0].iov_base as *const u8, unsafe { b.as_ptr().add(4) });
    }
}
