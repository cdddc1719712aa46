//! AF_XDP rings and the memory behind them.
//!
//! Each ring is a power-of-two array plus free-running u32 producer and
//! consumer indices shared with the kernel. One side owns each index; the
//! other only reads it. Ordering (as in the kernel's xsk_queue.h):
//! - producer: load consumer (Acquire) -> write slots -> store producer (Release)
//! - consumer: load producer (Acquire) -> read slots  -> store consumer (Release)
//!
//! We keep private copies of our own index and a cached copy of the peer's,
//! so the shared cache lines are touched once per batch, not per entry.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// An owned memory mapping, unmapped on drop.
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mmap {
    /// Private anonymous memory (the UMEM).
    pub fn anonymous(len: usize) -> io::Result<Mmap> {
        Self::map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    }

    /// A ring of an AF_XDP socket, at the page offset naming that ring.
    pub fn socket_ring(fd: libc::c_int, len: usize, pgoff: libc::off_t) -> io::Result<Mmap> {
        Self::map(len, libc::MAP_SHARED | libc::MAP_POPULATE, fd, pgoff)
    }

    fn map(len: usize, flags: libc::c_int, fd: libc::c_int, off: libc::off_t) -> io::Result<Mmap> {
        // SAFETY: a fresh mapping chosen by the kernel; touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap {
            ptr: NonNull::new(p as *mut u8)
                .ok_or_else(|| io::Error::other("mmap returned NULL"))?,
            len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing borrows it past our lifetime.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut _, self.len) };
    }
}

/// Raw view of one ring: where its indices, flags and slots live.
pub struct RawRing<T> {
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    slots: NonNull<T>,
    size: u32,
}

impl<T: Copy> RawRing<T> {
    /// # Safety
    /// `base + *_off` must be valid, suitably aligned shared memory for the
    /// lifetime of the ring, with room for `size` slots of T at `slots_off`,
    /// and `size` must be a power of two.
    pub unsafe fn new(
        base: *mut u8,
        producer_off: usize,
        consumer_off: usize,
        flags_off: usize,
        slots_off: usize,
        size: u32,
    ) -> Self {
        debug_assert!(size.is_power_of_two());
        let at = |off: usize| NonNull::new_unchecked(base.add(off));
        RawRing {
            producer: at(producer_off).cast(),
            consumer: at(consumer_off).cast(),
            flags: at(flags_off).cast(),
            slots: at(slots_off).cast(),
            size,
        }
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: per `new`, valid for the ring's lifetime; atomics make the
        // concurrent kernel access sound.
        unsafe { self.producer.as_ref() }
    }
    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for producer().
        unsafe { self.consumer.as_ref() }
    }
    fn flags(&self) -> &AtomicU32 {
        // SAFETY: as for producer().
        unsafe { self.flags.as_ref() }
    }
    fn slot(&self, idx: u32) -> *mut T {
        // SAFETY: masking keeps the index inside the `size` slots.
        unsafe { self.slots.as_ptr().add((idx & (self.size - 1)) as usize) }
    }
}

/// Ring we produce into (fill, TX).
pub struct ProdRing<T> {
    raw: RawRing<T>,
    /// Our producer index, published by `submit`.
    prod: u32,
    /// Last consumer index read from the kernel.
    cached_cons: u32,
    /// Keeps the ring mapped (None for rings over test memory).
    _map: Option<Mmap>,
}

impl<T: Copy> ProdRing<T> {
    pub fn new(raw: RawRing<T>, map: Option<Mmap>) -> Self {
        let prod = raw.producer().load(Ordering::Relaxed);
        let cached_cons = raw.consumer().load(Ordering::Acquire);
        ProdRing {
            raw,
            prod,
            cached_cons,
            _map: map,
        }
    }

    /// Free slots; reads the kernel's consumer only when the cached view
    /// shows fewer than `want`.
    pub fn free(&mut self, want: u32) -> u32 {
        let free = self.raw.size - self.prod.wrapping_sub(self.cached_cons);
        if free >= want {
            return free;
        }
        self.cached_cons = self.raw.consumer().load(Ordering::Acquire);
        self.raw.size - self.prod.wrapping_sub(self.cached_cons)
    }

    /// Writes one entry (not yet visible to the kernel). False if full.
    pub fn push(&mut self, v: T) -> bool {
        if self.free(1) == 0 {
            return false;
        }
        // SAFETY: the slot is in the ring and the kernel is done with it
        // (consumer already past it, read with Acquire).
        unsafe { self.raw.slot(self.prod).write(v) };
        self.prod = self.prod.wrapping_add(1);
        true
    }

    /// Publishes everything pushed so far.
    pub fn submit(&self) {
        self.raw.producer().store(self.prod, Ordering::Release);
    }

    /// Entries published or pushed that the kernel has not consumed yet.
    pub fn outstanding(&mut self) -> u32 {
        self.cached_cons = self.raw.consumer().load(Ordering::Acquire);
        self.prod.wrapping_sub(self.cached_cons)
    }

    /// True when the kernel asks for a syscall to notice new entries.
    pub fn needs_wakeup(&self) -> bool {
        // The producer store must be visible before we look at the flag, or
        // the kernel could go idle between the two and miss our entries.
        fence(Ordering::SeqCst);
        self.raw.flags().load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }
}

/// Ring we consume from (RX, completion).
pub struct ConsRing<T> {
    raw: RawRing<T>,
    /// Our consumer index, published by `release`.
    cons: u32,
    /// Last producer index read from the kernel.
    cached_prod: u32,
    _map: Option<Mmap>,
}

impl<T: Copy> ConsRing<T> {
    pub fn new(raw: RawRing<T>, map: Option<Mmap>) -> Self {
        let cons = raw.consumer().load(Ordering::Relaxed);
        let cached_prod = raw.producer().load(Ordering::Acquire);
        ConsRing {
            raw,
            cons,
            cached_prod,
            _map: map,
        }
    }

    /// Entries ready to read, at most `max`; reads the kernel's producer
    /// only when the cached view has fewer than `max`.
    pub fn available(&mut self, max: u32) -> u32 {
        let mut avail = self.cached_prod.wrapping_sub(self.cons);
        if avail < max {
            self.cached_prod = self.raw.producer().load(Ordering::Acquire);
            avail = self.cached_prod.wrapping_sub(self.cons);
        }
        // A sane kernel never exceeds the ring size; clamp rather than trust.
        avail.min(self.raw.size).min(max)
    }

    /// Entry `i` past our consumer index; `i` < a preceding `available()`.
    pub fn peek(&self, i: u32) -> T {
        // SAFETY: the slot is in the ring and was published (producer read
        // with Acquire); the kernel does not touch it until we release it.
        unsafe { self.raw.slot(self.cons.wrapping_add(i)).read() }
    }

    /// Hands `n` entries back to the kernel.
    pub fn release(&mut self, n: u32) {
        if n == 0 {
            return;
        }
        self.cons = self.cons.wrapping_add(n);
        self.raw.consumer().store(self.cons, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ring memory laid out like the kernel's: producer, consumer, flags,
    /// then slots (u64-aligned).
    struct FakeRing {
        mem: Vec<u64>,
    }

    impl FakeRing {
        fn new(size: u32, start: u32) -> Self {
            let mut mem = vec![0u64; 2 + size as usize];
            let p = mem.as_mut_ptr() as *mut u32;
            unsafe {
                *p = start; // producer
                *p.add(1) = start; // consumer
            }
            FakeRing { mem }
        }
        fn raw<T: Copy>(&mut self, size: u32) -> RawRing<T> {
            unsafe { RawRing::new(self.mem.as_mut_ptr() as *mut u8, 0, 4, 8, 16, size) }
        }
        fn word(&self, i: usize) -> u32 {
            unsafe { *(self.mem.as_ptr() as *const u32).add(i) }
        }
        fn set_word(&mut self, i: usize, v: u32) {
            unsafe { *(self.mem.as_mut_ptr() as *mut u32).add(i) = v }
        }
        fn slot(&self, idx: u32, size: u32) -> u64 {
            self.mem[2 + (idx & (size - 1)) as usize]
        }
        fn set_slot(&mut self, idx: u32, size: u32, v: u64) {
            self.mem[2 + (idx & (size - 1)) as usize] = v;
        }
    }

    #[test]
    fn producer_fills_submits_and_wraps_u32() {
        let start = u32::MAX - 2; // indices wrap during the test
        let mut m = FakeRing::new(4, start);
        let mut r = ProdRing::<u64>::new(m.raw(4), None);
        assert_eq!(r.free(1), 4);
        for v in 0..4 {
            assert!(r.push(100 + v));
        }
        assert!(!r.push(999), "full ring takes nothing");
        assert_eq!(m.word(0), start, "nothing visible before submit");
        r.submit();
        assert_eq!(m.word(0), start.wrapping_add(4));
        assert_eq!(r.outstanding(), 4);
        for i in 0..4 {
            assert_eq!(m.slot(start.wrapping_add(i), 4), 100 + i as u64);
        }
        // The kernel consumes two: two slots free up, after the wrap.
        m.set_word(1, start.wrapping_add(2));
        assert_eq!(r.free(2), 2);
        assert!(r.push(7) && r.push(8) && !r.push(9));
        r.submit();
        assert_eq!(m.word(0), start.wrapping_add(6));
        assert_eq!(m.slot(start.wrapping_add(4), 4), 7);
        assert_eq!(m.slot(start.wrapping_add(5), 4), 8);
        assert_eq!(r.outstanding(), 4);
    }

    #[test]
    fn consumer_reads_only_published_entries_and_wraps_u32() {
        let start = u32::MAX - 1;
        let mut m = FakeRing::new(8, start);
        let mut r = ConsRing::<u64>::new(m.raw(8), None);
        assert_eq!(r.available(8), 0);
        for i in 0..5 {
            m.set_slot(start.wrapping_add(i), 8, 10 + i as u64);
        }
        m.set_word(0, start.wrapping_add(5));
        assert_eq!(r.available(3), 3);
        assert_eq!(r.available(64), 5);
        assert_eq!(
            (0..5).map(|i| r.peek(i)).collect::<Vec<_>>(),
            [10, 11, 12, 13, 14]
        );
        r.release(2);
        assert_eq!(m.word(1), start.wrapping_add(2));
        assert_eq!(r.available(64), 3);
        assert_eq!(r.peek(0), 12);
        r.release(3);
        assert_eq!(r.available(64), 0);
        assert_eq!(m.word(1), start.wrapping_add(5));
    }

    #[test]
    fn consumer_clamps_a_bogus_producer() {
        let mut m = FakeRing::new(4, 0);
        let mut r = ConsRing::<u64>::new(m.raw(4), None);
        m.set_word(0, 1000);
        assert_eq!(r.available(u32::MAX), 4);
    }

    #[test]
    fn need_wakeup_flag() {
        let mut m = FakeRing::new(4, 0);
        let r = ProdRing::<u64>::new(m.raw(4), None);
        assert!(!r.needs_wakeup());
        m.set_word(2, libc::XDP_RING_NEED_WAKEUP);
        assert!(r.needs_wakeup());
    }

    #[test]
    fn descriptors_round_trip() {
        let mut m = FakeRing::new(4, 0);
        // 16-byte descriptors take two u64 words each: size 2 fits in 4 words.
        let mut p = ProdRing::<libc::xdp_desc>::new(m.raw(2), None);
        let mut c = ConsRing::<libc::xdp_desc>::new(m.raw(2), None);
        let d = libc::xdp_desc {
            addr: 0x1000,
            len: 60,
            options: 0,
        };
        assert!(p.push(d));
        assert_eq!(c.available(8), 0, "unsubmitted entry is invisible");
        p.submit();
        assert_eq!(c.available(8), 1);
        let got = c.peek(0);
        assert_eq!((got.addr, got.len, got.options), (0x1000, 60, 0));
        c.release(1);
        assert_eq!(p.outstanding(), 0);
    }
}
