//! Dirty-page log for live migration (vhost-user LOG_SHMFD + LOG_ALL).
//!
//! The front end shares a bitmap with one bit per 4 KiB guest-physical page;
//! bit `p % 8` of byte `p / 8` set means "page p changed, send it again".
//! Every byte the dataplane writes into guest memory while logging is on
//! must be marked here before the ring stops (GET_VRING_BASE), or the
//! destination gets stale memory.
//!
//! Writes are batched like DPDK does: a small per-queue cache of 64-bit
//! words collects bits during a burst and is flushed with one atomic OR per
//! word when the burst publishes its used index.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

pub const LOG_PAGE_SHIFT: u32 = 12;
/// Distinct 64-page words a cache holds before it must flush.
const CACHE_WORDS: usize = 32;

/// The shared log bitmap, mapped into this process.
pub struct DirtyLog {
    map: *mut u8,
    map_len: usize,
    /// Start of the log inside the mapping (the front end's mmap_offset
    /// need not be page aligned).
    base: *mut u8,
    len: usize,
    /// Whether a write past the log's end was reported (once per log).
    warned: AtomicBool,
}

// SAFETY: the mapping is shared memory written only with atomics; it is
// unmapped only on drop, when no queue holds a reference any more.
unsafe impl Send for DirtyLog {}
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Map `size` bytes of `fd` from `offset` (what SET_LOG_BASE carries).
    pub fn map(fd: BorrowedFd<'_>, offset: u64, size: u64) -> io::Result<Self> {
        if size == 0 || size > (1 << 40) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("log size {size} out of range"),
            ));
        }
        super::mem::fd_covers(fd, offset, size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let delta = offset % page;
        let map_len = (size + delta) as usize;
        // SAFETY: a fresh shared mapping of a caller-provided fd; checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                (offset - delta) as libc::off_t,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = map as *mut u8;
        Ok(DirtyLog {
            map,
            map_len,
            // SAFETY: delta < map_len.
            base: unsafe { map.add(delta as usize) },
            len: size as usize,
            warned: AtomicBool::new(false),
        })
    }

    /// Pages the log can describe.
    pub fn pages(&self) -> u64 {
        self.len as u64 * 8
    }

    /// OR `bits` into 64-bit word `word` (pages word*64 .. word*64+63).
    /// Returns how many of the pages were not marked yet, and how many lie
    /// beyond the log's end: a front end sizes the log to cover guest
    /// memory, so those are writes its migration will not copy again.
    #[inline]
    fn or_word(&self, word: u64, bits: u64) -> (u32, u32) {
        let byte = word.saturating_mul(8);
        if byte >= self.len as u64 {
            return (0, bits.count_ones());
        }
        let byte = byte as usize;
        // SAFETY (both arms): byte (+8) is within the log; the base may be
        // unaligned when mmap_offset is, so use a u64 only when aligned.
        let p = unsafe { self.base.add(byte) };
        if byte + 8 <= self.len && (p as usize).is_multiple_of(8) {
            let old =
                unsafe { &*(p as *const AtomicU64) }.fetch_or(bits.to_le(), Ordering::Relaxed);
            ((bits & !u64::from_le(old)).count_ones(), 0)
        } else {
            let (mut new, mut beyond) = (0, 0);
            for (i, b) in bits.to_le_bytes().iter().enumerate() {
                if *b == 0 {
                    continue;
                }
                if byte + i < self.len {
                    let old =
                        unsafe { &*(p.add(i) as *const AtomicU8) }.fetch_or(*b, Ordering::Relaxed);
                    new += (*b & !old).count_ones();
                } else {
                    beyond += b.count_ones();
                }
            }
            (new, beyond)
        }
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: test-only view of the mapping.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.map as *mut libc::c_void, self.map_len) };
    }
}

/// Per-queue batch of dirty bits. Lives in the queue's own state; no locks.
pub struct LogCache {
    words: [(u64, u64); CACHE_WORDS],
    n: usize,
    /// Pages newly marked by flushes since [`Self::take_marked`].
    marked: u64,
    /// Pages written past the log's end since [`Self::take_marked`].
    beyond: u64,
}

impl Default for LogCache {
    fn default() -> Self {
        LogCache {
            words: [(0, 0); CACHE_WORDS],
            n: 0,
            marked: 0,
            beyond: 0,
        }
    }
}

impl LogCache {
    /// Mark `[gpa, gpa+len)` dirty.
    #[inline]
    pub fn mark(&mut self, log: &DirtyLog, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa >> LOG_PAGE_SHIFT;
        let last = gpa.saturating_add(len - 1) >> LOG_PAGE_SHIFT;
        let mut page = first;
        while page <= last {
            let word = page >> 6;
            // All pages of this range that fall in the same word at once.
            let lo = page & 63;
            let hi = if last >> 6 == word { last & 63 } else { 63 };
            let bits = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            self.add(log, word, bits);
            page = (word + 1) << 6;
        }
    }

    #[inline]
    fn add(&mut self, log: &DirtyLog, word: u64, bits: u64) {
        for e in &mut self.words[..self.n] {
            if e.0 == word {
                e.1 |= bits;
                return;
            }
        }
        if self.n == CACHE_WORDS {
            self.flush(log);
        }
        self.words[self.n] = (word, bits);
        self.n += 1;
    }

    /// Write the collected bits to the shared log.
    pub fn flush(&mut self, log: &DirtyLog) {
        let mut beyond = 0;
        for &(w, b) in &self.words[..self.n] {
            let (new, past) = log.or_word(w, b);
            self.marked += u64::from(new);
            beyond += u64::from(past);
        }
        self.n = 0;
        if beyond > 0 {
            self.beyond += beyond;
            // Once per log: a front end that means it would flood the log.
            if !log.warned.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "wrote guest pages past the end of the dirty log ({} pages long): \
                     the front end's log does not cover its memory, and its \
                     migration will not copy those pages again",
                    log.pages()
                );
            }
        }
    }

    /// Pages the flushes marked that were not marked before, and pages
    /// written past the log's end, since the last call.
    pub fn take_marked(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.marked),
            std::mem::take(&mut self.beyond),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    pub fn memfd(size: u64) -> OwnedFd {
        // SAFETY: memfd_create with a static name; fd checked.
        let fd = unsafe { libc::memfd_create(c"vfr-log".as_ptr(), 0) };
        assert!(fd >= 0);
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        fd
    }

    fn set_pages(log: &DirtyLog) -> Vec<u64> {
        let mut v = Vec::new();
        for (i, b) in log.bytes().iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    v.push(i as u64 * 8 + bit);
                }
            }
        }
        v
    }

    #[test]
    fn page_math_at_edges() {
        let fd = memfd(4096);
        let log = DirtyLog::map(fd.as_fd(), 0, 64).unwrap();
        let mut c = LogCache::default();
        c.mark(&log, 0, 1);
        c.mark(&log, 4095, 1); // same page 0
        c.mark(&log, 4096 * 5 - 1, 2); // straddles pages 4 and 5
        c.mark(&log, 4096 * 63, 4096 * 2); // pages 63 and 64: across a word
        c.mark(&log, 4096 * 100, 0); // nothing
        assert!(set_pages(&log).is_empty(), "nothing before flush");
        c.flush(&log);
        assert_eq!(set_pages(&log), vec![0, 4, 5, 63, 64]);
    }

    #[test]
    fn large_ranges_and_cache_overflow() {
        let fd = memfd(4096);
        let log = DirtyLog::map(fd.as_fd(), 0, 4096).unwrap();
        let mut c = LogCache::default();
        // 200 pages in one call: whole words in the middle.
        c.mark(&log, 4096 * 10, 4096 * 200);
        // More distinct words than the cache holds: flushes on the way.
        for w in 0..(CACHE_WORDS as u64 + 10) {
            c.mark(&log, (w * 64 + 300) << LOG_PAGE_SHIFT, 1);
        }
        c.flush(&log);
        let pages = set_pages(&log);
        assert!((10..210).all(|p| pages.contains(&p)));
        assert!(!pages.contains(&9) && !pages.contains(&210));
        for w in 0..(CACHE_WORDS as u64 + 10) {
            assert!(pages.contains(&(w * 64 + 300)));
        }
    }

    #[test]
    fn beyond_the_log_is_counted_and_unaligned_offset_works() {
        let fd = memfd(8192);
        // A 13-byte log at an unaligned offset: the tail needs byte access.
        let log = DirtyLog::map(fd.as_fd(), 4099, 13).unwrap();
        assert_eq!(log.pages(), 104);
        let mut c = LogCache::default();
        c.mark(&log, 103 << LOG_PAGE_SHIFT, 1);
        c.mark(&log, 104 << LOG_PAGE_SHIFT, 1);
        c.mark(&log, u64::MAX - 10, 100);
        c.flush(&log);
        assert_eq!(set_pages(&log), vec![103]);
        // Not dropped silently: page 104 (the last byte's neighbour) and
        // the last page of the address space are counted.
        assert_eq!(c.take_marked(), (1, 2));
        // The bit landed at byte 4099 + 12 of the file.
        let raw = unsafe {
            let m = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            let v = *(m as *const u8).add(4099 + 12);
            libc::munmap(m, 8192);
            v
        };
        assert_eq!(raw, 1 << 7);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let fd = memfd(4096);
        assert!(DirtyLog::map(fd.as_fd(), 0, 0).is_err());
        assert!(DirtyLog::map(fd.as_fd(), 0, 1 << 41).is_err());
    }
}
