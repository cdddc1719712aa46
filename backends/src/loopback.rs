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
        // Swap destination and source MAC: two 6-byte moves through a copy
        // (a byte-wise swap loop cost more than the frame copy itself).
        let mut macs = [0u8; 12];
        macs.copy_from_slice(&buf[..12]);
        buf[..6].copy_from_slice(&macs[6..]);
        buf[6..12].copy_from_slice(&macs[..6]);
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
        frame[..6].copy_from_slice(&[1, 1, 1, 1, 1, 1]);
        frame[6..12].copy_from_slice(&[2, 2, 2, 2, 2, 2]);
        frame[59] = 0xab;
        assert!(Segs::of(&[&frame[..20], &frame[20..]], |s| lb.tx_frame(s)).unwrap());
        let mut got = Vec::new();
        let n = lb.rx_burst(8, &mut |f| {
            got = f.to_vec();
            true
        });
        assert_eq!(n.unwrap(), 1);
        assert_eq!(&got[..6], &[2; 6]);
        assert_eq!(&got[6..12], &[1; 6]);
        assert_eq!(got[59], 0xab);
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
