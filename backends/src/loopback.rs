//! `loopback`: every frame the guest sends comes straight back with source
//! and destination MAC swapped. For benchmarks and tests: it has no fd, the
//! dataplane runs RX right after TX on the same thread.

use crate::{copy_frame, Backend, BackendStats, Result, Segs};

/// Frames held at most; past this `tx_frame` reports full and the guest's TX
/// ring backs up instead of frames being dropped.
const SLOTS: usize = 512;
/// Without a vnet header no offloads are negotiated, so frames are bounded by
/// the MTU; 9216 covers jumbo frames.
const SLOT_LEN: usize = 9216 + 14 + 4;

pub struct Loopback {
    queue: usize,
    /// SLOTS buffers of SLOT_LEN bytes, one allocation. Zeroed by the
    /// allocator, so pages become resident only when a slot is first used.
    pool: Vec<u8>,
    /// Frames waiting to go back, oldest first: (slot, length) in a ring.
    fifo: Vec<(u16, u32)>,
    head: usize,
    len: usize,
    /// Free slots, most recently freed on top: the few slots in flight are
    /// reused while still in cache (a FIFO walk over all 512 slots, 4.7 MB,
    /// missed the cache on every copy in and out).
    free: Vec<u16>,
    stats: BackendStats,
}

impl Loopback {
    pub fn new(queue: usize) -> Self {
        Loopback {
            queue,
            pool: vec![0u8; SLOTS * SLOT_LEN],
            fifo: vec![(0, 0); SLOTS],
            head: 0,
            len: 0,
            free: (0..SLOTS as u16).rev().collect(),
            stats: BackendStats::default(),
        }
    }

    fn slot(&mut self, slot: u16) -> &mut [u8] {
        let at = slot as usize * SLOT_LEN;
        &mut self.pool[at..at + SLOT_LEN]
    }
}

/// Write the first 12 bytes at `src` to `dst` with the two MAC addresses
/// swapped. In registers: 8- and 4-byte loads and stores, nothing that
/// goes through memory in pieces of other sizes (a stack copy of the 12
/// bytes read back 6 at a time stalls the same way).
///
/// # Safety
/// 12 readable bytes at `src`, 12 writable at `dst` (they may be the same).
#[inline(always)]
unsafe fn swap_macs(src: *const u8, dst: *mut u8) {
    // SAFETY: within the 12 bytes the caller promises; all reads first.
    unsafe {
        let lo = u64::from_le(std::ptr::read_unaligned(src as *const u64));
        let hi = u64::from(u32::from_le(std::ptr::read_unaligned(
            src.add(8) as *const u32
        )));
        // Bytes 6..12 (source MAC) then 0..2; then 2..6.
        let new_lo = (lo >> 48) | (hi << 16) | (lo << 48);
        let new_hi = (lo >> 16) as u32;
        std::ptr::write_unaligned(dst as *mut u64, new_lo.to_le());
        std::ptr::write_unaligned(dst.add(8) as *mut u32, new_hi.to_le());
    }
}

impl Backend for Loopback {
    fn describe(&self) -> String {
        format!("loopback q{}", self.queue)
    }

    fn tx_frame(&mut self, segs: Segs<'_>) -> Result<bool> {
        let Some(&slot) = self.free.last() else {
            return Ok(false);
        };
        let total: usize = match *segs {
            [one] => one.iov_len,
            _ => segs.iter().map(|s| s.iov_len).sum(),
        };
        if !(12..=SLOT_LEN).contains(&total) {
            self.stats.tx_dropped += 1;
            return Ok(true);
        }
        self.free.pop();
        let buf = self.slot(slot);
        let mut off = 0;
        for s in segs.iter() {
            // SAFETY: `Segs` promises each segment is readable; copy raw,
            // never borrow. total <= SLOT_LEN, so every copy stays inside
            // the slot.
            unsafe {
                copy_frame(
                    s.iov_base as *const u8,
                    buf.as_mut_ptr().add(off),
                    s.iov_len,
                )
            };
            off += s.iov_len;
        }
        // Swap destination and source MAC, reading them from the guest's
        // segment rather than from `buf`: the copy just stored `buf`'s first
        // bytes 16 at a time, and a load of bytes 6..10 straddles the
        // middle of such a store, which cannot be forwarded; it waited for
        // every older store to reach the cache (half of tx_frame's
        // samples). A short first segment (never seen) reads `buf`.
        let dst = buf.as_mut_ptr();
        let from = match segs.first() {
            Some(s) if s.iov_len >= 12 => s.iov_base as *const u8,
            _ => dst as *const u8,
        };
        // SAFETY: 12 readable bytes at `from` (the segment, or `buf`, which
        // holds total >= 12) and writable ones at `dst`, both derived
        // after the last use of `buf` as a reference; `swap_macs` reads
        // before it writes.
        unsafe { swap_macs(from, dst) };
        let tail = (self.head + self.len) % SLOTS;
        self.fifo[tail] = (slot, total as u32);
        self.len += 1;
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += total as u64;
        Ok(true)
    }

    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(&[u8]) -> bool) -> Result<usize> {
        let mut n = 0;
        while n < max && self.len > 0 {
            let (slot, flen) = self.fifo[self.head];
            let at = slot as usize * SLOT_LEN;
            if !sink(&self.pool[at..at + flen as usize]) {
                break;
            }
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += flen as u64;
            self.free.push(slot);
            self.head = (self.head + 1) % SLOTS;
            self.len -= 1;
            n += 1;
        }
        Ok(n)
    }

    fn stats(&self) -> BackendStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_with_macs_swapped() {
        let mut lb = Loopback::new(0);
        let mut frame = [0u8; 60];
        let (dst, src) = ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]);
        frame[..6].copy_from_slice(&dst);
        frame[6..12].copy_from_slice(&src);
        frame[12] = 0x08;
        frame[59] = 0xab;
        // First segment long enough to read the addresses from, and not.
        for split in [20, 5] {
            let f = &frame;
            assert!(Segs::of(&[&f[..split], &f[split..]], |s| lb.tx_frame(s)).unwrap());
            let mut got = Vec::new();
            let n = lb.rx_burst(8, &mut |f| {
                got = f.to_vec();
                true
            });
            assert_eq!(n.unwrap(), 1);
            assert_eq!(&got[..6], &src, "split {split}");
            assert_eq!(&got[6..12], &dst, "split {split}");
            assert_eq!(&got[12..], &frame[12..], "split {split}");
        }
    }

    #[test]
    fn full_pool_pushes_back_and_refused_frames_stay() {
        let mut lb = Loopback::new(0);
        let frame = [0u8; 64];
        for _ in 0..SLOTS {
            assert!(Segs::of(&[&frame], |s| lb.tx_frame(s)).unwrap());
        }
        assert!(!Segs::of(&[&frame], |s| lb.tx_frame(s)).unwrap());
        assert_eq!(lb.rx_burst(8, &mut |_| false).unwrap(), 0);
        assert_eq!(lb.rx_burst(SLOTS * 2, &mut |_| true).unwrap(), SLOTS);
    }
}
