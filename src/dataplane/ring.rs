//! Split virtqueue access for the hot path: descriptor chains in, used
//! entries out. Every guest-provided value (indices, addresses, lengths,
//! flags) is checked here, where it enters; a bad one yields a
//! [`ChainError`] and the caller stops that queue.
//!
//! Ring memory is translated once per (ring address, memory table) and then
//! read with acquire/release atomics; descriptors are copied out before use.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use super::mem::{MemView, Perm, Region};

use virtio_bindings::virtio_ring as vr;

// The ring's flag fields are 16 bits wide; the bindings spell them as u32.
pub const VRING_DESC_F_NEXT: u16 = vr::VRING_DESC_F_NEXT as u16;
pub const VRING_DESC_F_WRITE: u16 = vr::VRING_DESC_F_WRITE as u16;
pub const VRING_DESC_F_INDIRECT: u16 = vr::VRING_DESC_F_INDIRECT as u16;
pub const VRING_USED_F_NO_NOTIFY: u16 = vr::VRING_USED_F_NO_NOTIFY as u16;
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = vr::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Segments one chain may have after flattening indirect tables. Linux uses
/// at most MAX_SKB_FRAGS + 2; this leaves room for other drivers.
pub const MAX_SEGS: usize = 1024;
/// Largest indirect table accepted (entries).
pub const MAX_INDIRECT: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "avail index {avail} is {ahead} entries ahead of last seen {last} (queue size {size})"
    )]
    AvailIndex {
        avail: u16,
        last: u16,
        ahead: u16,
        size: u16,
    },
    #[error("descriptor index {index} out of range (table of {size})")]
    IndexOutOfRange { index: u16, size: u32 },
    #[error("descriptor chain longer than {limit} entries (loop?)")]
    TooLong { limit: u32 },
    #[error("buffer {addr:#x}+{len} is outside the guest memory this queue may use")]
    BadAddress { addr: u64, len: u32 },
    #[error("device-writable descriptor in a chain the device must only read")]
    WriteOnlyInReadChain,
    #[error("device-readable descriptor in a chain the device must only write")]
    ReadOnlyInWriteChain,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with NEXT flag set")]
    IndirectWithNext,
    #[error("indirect table length {len} is not a non-zero multiple of 16 up to {max} entries")]
    IndirectLength { len: u32, max: u32 },
    #[error("indirect descriptor used but not negotiated")]
    IndirectNotNegotiated,
    #[error("chain carries {len} bytes, more than the {max} allowed")]
    Oversized { len: u64, max: u64 },
    #[error("chain shorter ({len} bytes) than the {hdr}-byte virtio-net header")]
    Undersized { len: u64, hdr: usize },
    #[error("chain has more than {MAX_SEGS} segments")]
    TooManySegments,
    #[error("ring at desc {desc:#x} avail {avail:#x} used {used:#x} (size {size}) is not in guest memory")]
    BadRing {
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
    },
}

/// One flattened descriptor chain: host iovecs plus their guest addresses
/// (for dirty logging). Allocated once per queue and reused.
///
/// Only [`SplitRing::pop`] fills one, with segments it checked against the
/// queue's memory view: the fields are private so that what the rest of
/// the dataplane dereferences (through [`segs`](Chain::segs) and
/// [`iov`](Chain::iov)) is always what the walker checked. A chain is used
/// within the burst it was popped in, while the worker holds that view.
#[derive(Debug)]
pub struct Chain {
    head: u16,
    iov: Vec<libc::iovec>,
    gpa: Vec<u64>,
    len: u64,
}

// SAFETY: the iovecs point into guest memory owned by the queue's MemView;
// a Chain is only used by the thread that owns the queue.
unsafe impl Send for Chain {}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            head: 0,
            iov: Vec::with_capacity(MAX_SEGS),
            gpa: Vec::with_capacity(MAX_SEGS),
            len: 0,
        }
    }
}

impl Chain {
    fn clear(&mut self) {
        self.iov.clear();
        self.gpa.clear();
        self.len = 0;
    }

    /// The chain's head descriptor index (what goes back in the used ring).
    #[inline]
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Bytes the chain carries.
    #[inline]
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Host segments, each inside the guest memory `pop` checked.
    #[inline]
    pub fn iov(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Guest address of each segment in [`iov`](Self::iov).
    #[inline]
    pub fn gpa(&self) -> &[u64] {
        &self.gpa
    }

    /// The segments, for a backend to read.
    ///
    /// # Safety
    /// The memory view the chain was popped with must still be alive.
    #[inline]
    pub unsafe fn segs(&self) -> vfrelay_backends::Segs<'_> {
        // SAFETY: `pop` translated every segment inside that view, which the
        // caller promises is still mapped.
        unsafe { vfrelay_backends::Segs::new(&self.iov) }
    }

    /// Drop the first `n` bytes (a header the backend does not take).
    #[inline]
    pub fn skip_front(&mut self, n: usize) {
        // Inline for the usual chain, header and frame in one buffer: the
        // general loop out of line cost 4 % of a loopback worker.
        if let (Some(v), Some(gpa)) = (self.iov.first_mut(), self.gpa.first_mut()) {
            if v.iov_len > n {
                // SAFETY: n < iov_len, stays inside the segment.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                *gpa += n as u64;
                return;
            }
        }
        self.skip_segments(n);
    }

    #[inline(never)]
    fn skip_segments(&mut self, mut n: usize) {
        let mut drop = 0;
        for (v, gpa) in self.iov.iter_mut().zip(self.gpa.iter_mut()) {
            if n == 0 {
                break;
            }
            let k = n.min(v.iov_len);
            // SAFETY: k <= iov_len, stays inside the segment.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(k) } as *mut libc::c_void;
            v.iov_len -= k;
            *gpa += k as u64;
            n -= k;
            if v.iov_len == 0 {
                drop += 1;
            }
        }
        if drop > 0 {
            self.iov.drain(..drop);
            self.gpa.drain(..drop);
        }
    }
}

#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Read one descriptor, once. Volatile: the guest may rewrite it at any
/// moment, and a plain copy lets the compiler read guest memory again where
/// the code uses the local copy, so a value could change between its check
/// and its use.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline(always)]
unsafe fn read_desc(p: *const u8) -> Desc {
    let (lo, hi) = if (p as usize).is_multiple_of(8) {
        // SAFETY: the caller's 16 bytes, 8-aligned (the descriptor table
        // always is; an indirect table usually).
        unsafe {
            (
                std::ptr::read_volatile(p as *const u64),
                std::ptr::read_volatile(p.add(8) as *const u64),
            )
        }
    } else {
        // SAFETY: the caller's promise.
        unsafe { read_desc_unaligned(p) }
    };
    // Little-endian fields: addr, then len, flags and next in the 2nd word.
    let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
    Desc {
        addr: lo,
        len: hi as u32,
        flags: (hi >> 32) as u16,
        next: (hi >> 48) as u16,
    }
}

/// [`read_desc`]'s rare case, out of line so the common one stays small
/// enough to inline into the burst loops.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[cold]
#[inline(never)]
unsafe fn read_desc_unaligned(p: *const u8) -> (u64, u64) {
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        // SAFETY: i < 16, inside the caller's 16 bytes.
        *byte = unsafe { std::ptr::read_volatile(p.add(i)) };
    }
    (
        u64::from_ne_bytes(b[0..8].try_into().unwrap()),
        u64::from_ne_bytes(b[8..16].try_into().unwrap()),
    )
}

#[inline]
fn prefetch_read(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Prefetch with intent to write (PREFETCHW): the line arrives owned, so the
/// copy into it does not wait for the other core to give it up.
///
/// Inline assembly because `_mm_prefetch::<_MM_HINT_ET0>` only becomes
/// PREFETCHW when the crate is built with the `prfchw` target feature; the
/// default x86-64 target silently emits a plain PREFETCHT0 (a read: the
/// line arrives shared and the store still has to take it from the other
/// core). PREFETCHW (0F 0D /1) is a hint-NOP on x86-64 CPUs without it.
#[inline]
fn prefetch_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and changes no architectural state,
    // whatever the address.
    unsafe {
        std::arch::asm!(
            "prefetchw byte ptr [{0}]",
            in(reg) p,
            options(nostack, preserves_flags, readonly)
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// How far ahead [`SplitRing::prefetch`] looks: far enough that a line
/// (~100 ns from the other core) arrives while the chains in between are
/// handled, near enough that it is still cached when used. Measured
/// (loopback 64 B, A/B beside DPDK): buffers 2 ahead 15.1 Mpps, 3: 17.0,
/// 4 (descriptors 6): 17.3, 6 (8): 17.7, 8 (12): 17.6.
const DESC_AHEAD: u16 = 8;
const BUF_AHEAD: u16 = 6;

/// The virtio-net header's size (modern layout; the legacy one is 10): an
/// RX buffer whose first cache line holds no more than this holds only the
/// header there.
const HDR_LINE_TAIL: usize = 12;

/// Prefetch the lines of a buffer at host address `p` (`len` bytes) that a
/// small frame touches: the two lines from its first byte read, `skip`
/// bytes in (an RX buffer's length says nothing of the frame to come, and
/// most frames are small). A line costs a fill buffer and ~100 ns from the
/// other core; one fetched for nothing (a header line a plain-Ethernet
/// backend never reads) delays the ones that matter.
#[inline]
fn prefetch_buffer(p: usize, len: usize, write: bool, skip: usize) {
    let end = p + len.min(128);
    let start = p + skip;
    if start >= end {
        return;
    }
    let first = start & !63;
    // An RX line holding no more than the header is often left unwritten
    // (rx.rs, write_unless_equal; DPDK drivers put the header in the mbuf's
    // headroom, just before a line boundary): read it, do not take it from
    // the driver.
    if write && first + 64 - p > HDR_LINE_TAIL {
        prefetch_write(first as *const u8);
    } else {
        prefetch_read(first as *const u8);
    }
    let second = first + 64;
    if second < end {
        if write {
            prefetch_write(second as *const u8);
        } else {
            prefetch_read(second as *const u8);
        }
    }
}

/// Byte spans (first, last, inclusive) of the used entries `next .. next +
/// n` relative to the used ring: one span, and a second one from the ring's
/// start when they wrap. `0 < n <= size`, `size` a power of two.
fn used_spans(size: u16, next: u16, n: u16) -> ((usize, usize), Option<(usize, usize)>) {
    let entry = |slot: usize| 4 + 8 * slot;
    let mask = size as usize - 1;
    let first = next as usize & mask;
    let last = next.wrapping_add(n - 1) as usize & mask;
    if first <= last {
        ((entry(first), entry(last) + 7), None)
    } else {
        (
            (entry(first), entry(mask) + 7),
            Some((entry(0), entry(last) + 7)),
        )
    }
}

/// Where a ring lives: what the frontend told us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
}

/// A free-running 16-bit ring index, stored in 32 bits. As `u16` fields,
/// the indices were stored with 16-bit moves (`pop`, `put_used`) and read
/// back with 32-bit ones (LLVM widens a load whose upper half is unused).
/// A load wider than the store before it cannot take its value from the
/// store buffer: it waits until that store, and every older one, is in the
/// cache, and older stores include used entries and guest buffers on lines
/// the guest's core holds. The next `pop` waited on them every frame. A
/// 32-bit store covers every load of the index.
#[derive(Clone, Copy, Default)]
struct Idx(u32);

impl Idx {
    #[inline(always)]
    fn get(self) -> u16 {
        self.0 as u16
    }

    #[inline(always)]
    fn set(&mut self, v: u16) {
        self.0 = u32::from(v);
    }
}

/// A split ring translated into host pointers.
pub struct SplitRing {
    pub addrs: RingAddrs,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    pub event_idx: bool,
    pub indirect: bool,
    /// Next avail entry to consume (the vhost "ring base").
    last_avail: Idx,
    /// Next used entry to fill; published to the guest by `publish`.
    next_used: Idx,
    /// `next_used` as last published, or as the front end set it (sync):
    /// the used index the guest last saw, for EVENT_IDX interrupt
    /// suppression; `publish` has work only if `next_used` moved since.
    /// Kept here because reading the guest's used->idx back for this
    /// waited on the line the driver polls, 4 % of the worker. Where the
    /// two differ (a guest that wrote the index, a base set apart from
    /// it), the guest's index is put right by the next publish with an
    /// entry, not at once.
    published: Idx,
    /// Cached avail->idx, refreshed when we run out.
    avail_cache: Idx,
    /// The memory region the last buffer was in: most buffers of a queue
    /// come from one pool, so `pop` checks this before searching the
    /// table. A ring lives no longer than the MemView it was translated
    /// with, so this cannot outlive a memory-table change.
    hot: Region,
}

// SAFETY: the pointers refer to guest memory kept mapped by the MemView the
// ring was translated with; one thread owns the ring at a time.
unsafe impl Send for SplitRing {}

impl SplitRing {
    /// Translate a ring. Sizes per the virtio spec: 16-byte descriptors,
    /// avail = 4 + 2*size (+2 used_event), used = 4 + 8*size (+2 avail_event).
    ///
    /// # Safety
    /// The ring keeps host pointers into `mem`'s mappings and dereferences
    /// them in every later call: use it only while those mappings live
    /// (keep the `Arc<MemView>` it was made from, as `RingSlot` does).
    pub unsafe fn new(mem: &MemView, a: RingAddrs) -> Result<Self, ChainError> {
        let bad = ChainError::BadRing {
            desc: a.desc,
            avail: a.avail,
            used: a.used,
            size: a.size,
        };
        let n = a.size as u64;
        if a.size == 0
            || !a.size.is_power_of_two()
            || !a.desc.is_multiple_of(16)
            || !a.avail.is_multiple_of(2)
            || !a.used.is_multiple_of(4)
        {
            return Err(bad);
        }
        // The device reads the descriptors and the avail ring; it writes the
        // used ring and reads its index back.
        let desc = mem
            .translate(a.desc, 16 * n, Perm::Read)
            .ok_or(bad.clone())?;
        let avail = mem
            .translate(a.avail, 6 + 2 * n, Perm::Read)
            .ok_or(bad.clone())?;
        let used = mem
            .translate(a.used, 6 + 8 * n, Perm::ReadWrite)
            .ok_or(bad.clone())?;
        // The indices are read as atomics through these pointers: a region
        // mapped at an odd host offset must not make them misaligned.
        if !(desc as usize).is_multiple_of(16)
            || !(avail as usize).is_multiple_of(2)
            || !(used as usize).is_multiple_of(4)
        {
            return Err(bad);
        }
        Ok(SplitRing {
            addrs: a,
            desc,
            avail,
            used,
            event_idx: false,
            indirect: false,
            last_avail: Idx::default(),
            next_used: Idx::default(),
            published: Idx::default(),
            avail_cache: Idx::default(),
            hot: Region::NONE,
        })
    }

    #[inline]
    fn size(&self) -> u16 {
        self.addrs.size
    }

    /// Ring slot of a free-running index: `new` accepts only power-of-two
    /// sizes, so a mask does what `%` would without a division per packet.
    #[inline]
    fn slot(&self, idx: u16) -> usize {
        (idx & (self.size() - 1)) as usize
    }

    #[inline]
    fn u16_at(&self, p: *mut u8) -> &AtomicU16 {
        // SAFETY: p is 2-aligned (checked in new) and inside the ring mapping.
        unsafe { &*(p as *const AtomicU16) }
    }

    pub fn avail_idx(&self) -> u16 {
        // SAFETY: avail->idx, inside the avail ring translated in `new`.
        self.u16_at(unsafe { self.avail.add(2) })
            .load(Ordering::Acquire)
    }

    fn avail_flags(&self) -> u16 {
        self.u16_at(self.avail).load(Ordering::Relaxed)
    }

    fn used_event(&self) -> u16 {
        let off = 4 + 2 * self.size() as usize;
        // SAFETY: used_event, the avail ring's last 2 of its 6 + 2*size
        // bytes translated in `new`.
        self.u16_at(unsafe { self.avail.add(off) })
            .load(Ordering::Relaxed)
    }

    /// The used->idx currently in guest memory.
    pub fn used_idx(&self) -> u16 {
        // SAFETY: used->idx, inside the used ring translated in `new`.
        self.u16_at(unsafe { self.used.add(2) })
            .load(Ordering::Acquire)
    }

    fn set_used_flags(&self, v: u16) {
        self.u16_at(self.used).store(v, Ordering::Relaxed)
    }

    fn set_avail_event(&self, v: u16) {
        let off = 4 + 8 * self.size() as usize;
        // SAFETY: avail_event, the used ring's last 2 of its 6 + 8*size
        // bytes translated in `new`.
        self.u16_at(unsafe { self.used.add(off) })
            .store(v, Ordering::Relaxed)
    }

    /// Bytes of the used ring: flags, idx, entries, avail_event.
    pub fn used_len(&self) -> u64 {
        6 + 8 * self.size() as u64
    }

    /// Number of chains the guest has made available that we have not
    /// consumed. Checks the index is sane.
    pub fn pending(&mut self) -> Result<u16, ChainError> {
        let last = self.last_avail.get();
        let mut ahead = self.avail_cache.get().wrapping_sub(last);
        if ahead == 0 {
            let avail = self.avail_idx();
            self.avail_cache.set(avail);
            ahead = avail.wrapping_sub(last);
            if ahead > self.size() {
                return Err(ChainError::AvailIndex {
                    avail,
                    last,
                    ahead,
                    size: self.size(),
                });
            }
        }
        Ok(ahead)
    }

    /// Un-consume the last `n` popped chains (their used entries were not
    /// written): the backend or a frame could not take them after all.
    pub fn unpop(&mut self, n: u16) {
        self.last_avail.set(self.last_avail.get().wrapping_sub(n));
    }

    /// Take back the last `n` used entries written and not yet published.
    pub fn unput(&mut self, n: u16) {
        self.next_used.set(self.next_used.get().wrapping_sub(n));
    }

    /// Next avail entry to consume (the vhost "ring base").
    pub fn last_avail(&self) -> u16 {
        self.last_avail.get()
    }

    /// Next used entry to fill.
    pub fn next_used(&self) -> u16 {
        self.next_used.get()
    }

    /// Pop the next chain into `out`. Caller checked `pending() > 0`.
    /// `writable`: the device writes these buffers (RX) or reads them (TX).
    /// `max_len`: the most bytes a valid chain of this queue may carry.
    pub fn pop(
        &mut self,
        mem: &MemView,
        writable: bool,
        max_len: u64,
        out: &mut Chain,
    ) -> Result<(), ChainError> {
        let size = self.size();
        let last = self.last_avail.get();
        let slot = self.slot(last);
        // SAFETY: slot < size; the avail ring was translated for 4 + 2*size bytes.
        let head = self
            .u16_at(unsafe { self.avail.add(4 + 2 * slot) })
            .load(Ordering::Relaxed);
        self.last_avail.set(last.wrapping_add(1));
        out.clear();
        out.head = head;
        if head >= size {
            return Err(ChainError::IndexOutOfRange {
                index: head,
                size: size as u32,
            });
        }

        // Fast path: a single direct descriptor (what DPDK and Linux
        // drivers post for small frames and mergeable RX buffers) in the
        // region the previous buffer was in. The same checks as below;
        // anything else takes the general path, which reads the
        // descriptor again and decides on that copy alone.
        // SAFETY: head < size, inside the translated table.
        let d = unsafe { read_desc(self.desc.add(16 * head as usize)) };
        let need = Perm::for_buffers(writable);
        if d.flags & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT) == 0
            && d.len > 0
            && (d.flags & VRING_DESC_F_WRITE != 0) == writable
            && d.len as u64 <= max_len
        {
            let host = match self.hot.translate(d.addr, d.len as u64, need) {
                Some(h) => Some(h),
                None => mem.region(d.addr, need).and_then(|r| {
                    self.hot = r;
                    self.hot.translate(d.addr, d.len as u64, need)
                }),
            };
            if let Some(host) = host {
                out.iov.push(libc::iovec {
                    iov_base: host as *mut libc::c_void,
                    iov_len: d.len as usize,
                });
                out.gpa.push(d.addr);
                out.len = d.len as u64;
                return Ok(());
            }
        }

        let mut table = self.desc as *const u8;
        let mut table_len = size as u32;
        let mut idx = head;
        let mut in_indirect = false;
        let mut ttl = table_len;
        loop {
            if ttl == 0 {
                return Err(ChainError::TooLong { limit: table_len });
            }
            ttl -= 1;
            // SAFETY: idx < table_len, checked below before every advance.
            let d = unsafe { read_desc(table.add(16 * idx as usize)) };

            if d.flags & VRING_DESC_F_INDIRECT != 0 {
                if in_indirect {
                    return Err(ChainError::NestedIndirect);
                }
                if !self.indirect {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if d.flags & VRING_DESC_F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext);
                }
                if d.len == 0 || !d.len.is_multiple_of(16) || d.len / 16 > MAX_INDIRECT {
                    return Err(ChainError::IndirectLength {
                        len: d.len,
                        max: MAX_INDIRECT,
                    });
                }
                table = mem.translate(d.addr, d.len as u64, Perm::Read).ok_or(
                    ChainError::BadAddress {
                        addr: d.addr,
                        len: d.len,
                    },
                )?;
                table_len = d.len / 16;
                ttl = table_len;
                in_indirect = true;
                idx = 0;
                continue;
            }

            let is_write = d.flags & VRING_DESC_F_WRITE != 0;
            if writable && !is_write {
                return Err(ChainError::ReadOnlyInWriteChain);
            }
            if !writable && is_write {
                return Err(ChainError::WriteOnlyInReadChain);
            }
            out.len += d.len as u64;
            if out.len > max_len {
                return Err(ChainError::Oversized {
                    len: out.len,
                    max: max_len,
                });
            }
            // A buffer may straddle two adjacent memory regions: split it.
            let mut addr = d.addr;
            let mut left = d.len as u64;
            while left > 0 {
                let (host, n) =
                    mem.translate_prefix(addr, left, need)
                        .ok_or(ChainError::BadAddress {
                            addr: d.addr,
                            len: d.len,
                        })?;
                if out.iov.len() == MAX_SEGS {
                    return Err(ChainError::TooManySegments);
                }
                out.iov.push(libc::iovec {
                    iov_base: host as *mut libc::c_void,
                    iov_len: n as usize,
                });
                out.gpa.push(addr);
                addr += n;
                left -= n;
            }

            if d.flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            if d.next as u32 >= table_len {
                return Err(ChainError::IndexOutOfRange {
                    index: d.next,
                    size: table_len,
                });
            }
            idx = d.next;
        }
    }

    /// The descriptor the chain `ahead` entries past the next one starts
    /// at, if that entry is published (`ahead < pending`, caller checks)
    /// and in range. A hint only: nothing read here is trusted or kept.
    #[inline]
    fn peek_desc(&self, ahead: u16) -> Option<*const u8> {
        let slot = self.slot(self.last_avail.get().wrapping_add(ahead));
        // SAFETY: slot < size; the avail ring was translated for 4 + 2*size bytes.
        let head = self
            .u16_at(unsafe { self.avail.add(4 + 2 * slot) })
            .load(Ordering::Relaxed);
        // SAFETY: head < size, inside the translated table.
        (head < self.size()).then(|| unsafe { self.desc.add(16 * head as usize) } as *const u8)
    }

    /// Start loading what the chains after the next one will need, so the
    /// cache misses on guest-written descriptors and buffers overlap with
    /// work on the current chain instead of following it one by one: the
    /// descriptor [`DESC_AHEAD`] chains ahead and the first buffer
    /// [`BUF_AHEAD`] ahead (whose descriptor an earlier call fetched).
    /// `pending` as returned by `pending()` before the next `pop`; `skip`:
    /// leading bytes of a TX buffer the caller never reads (the header, for
    /// a backend without one). Prefetches cannot fault; `pop` still checks
    /// everything it uses.
    #[inline(always)]
    pub fn prefetch(&self, pending: u16, write: bool, skip: usize) {
        if pending > DESC_AHEAD {
            if let Some(d) = self.peek_desc(DESC_AHEAD) {
                prefetch_read(d);
            }
        }
        if pending > BUF_AHEAD {
            if let Some(d) = self.peek_desc(BUF_AHEAD) {
                // SAFETY: d points to 16 bytes inside the descriptor table.
                let d = unsafe { read_desc(d) };
                // Only buffers in the cached region: a table search for a
                // hint would cost more than most misses it could hide.
                if d.flags & VRING_DESC_F_INDIRECT == 0 {
                    if let Some(p) = self.hot.translate(d.addr, 1, Perm::for_buffers(write)) {
                        prefetch_buffer(p as usize, d.len as usize, write, skip);
                    }
                }
            }
        }
    }

    /// Take ownership of the used-ring lines the next `n` used entries and
    /// the used index will be written to (PREFETCHW), all at once. The guest
    /// reads those lines on its core, so the first store to each one misses;
    /// met one by one inside the burst, those stores hold up every later
    /// store, and the TX loop's hottest spot was a load waiting for them
    /// (`pop` reading back `last_avail`, until [`Idx`] let it be store-forwarded).
    /// Call only when `n` entries will be written soon: a line taken from
    /// the guest too early costs the guest a miss instead.
    #[inline]
    pub fn prefetch_used(&self, n: u16) {
        if n == 0 {
            return;
        }
        // used->idx (published at the end of the burst).
        prefetch_write(self.used);
        // Whole cache lines by address: a prefetch never faults, and every
        // line touched holds at least one byte of the used ring.
        let base = self.used as usize;
        let (head, tail) = used_spans(self.size(), self.next_used.get(), n);
        for (from, to) in std::iter::once(head).chain(tail) {
            let mut line = (base + from) & !63;
            while line <= base + to {
                prefetch_write(line as *const u8);
                line += 64;
            }
        }
    }

    /// Write a used entry (not yet visible: see `publish`).
    pub fn put_used(&mut self, head: u16, len: u32) {
        let next = self.next_used.get();
        let slot = self.slot(next);
        // SAFETY: slot < size; the used ring was translated for 6 + 8*size
        // bytes and is 4-aligned (checked in new). Volatile stores, each
        // done once, into memory the guest reads concurrently.
        unsafe {
            let e = self.used.add(4 + 8 * slot) as *mut u32;
            std::ptr::write_volatile(e, (head as u32).to_le());
            std::ptr::write_volatile(e.add(1), len.to_le());
        }
        self.next_used.set(next.wrapping_add(1));
    }

    /// Make all written used entries visible and say whether the guest wants
    /// an interrupt for them.
    #[cfg(test)]
    pub fn publish_used(&mut self) -> bool {
        self.publish() == Some(true)
    }

    /// [`publish_used`](Self::publish_used), telling also whether there
    /// was anything to publish: None if not, else whether to interrupt.
    pub fn publish(&mut self) -> Option<bool> {
        let new = self.next_used.get();
        let old = self.published.get();
        if old == new {
            return None;
        }
        self.published.set(new);
        // Entries and the buffers they describe before the index.
        // SAFETY: used->idx, inside the used ring translated in `new`.
        self.u16_at(unsafe { self.used.add(2) })
            .store(new, Ordering::Release);
        // The index store must be visible before we read used_event/flags,
        // or we may miss a guest that just re-enabled interrupts.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let ev = self.used_event();
            // vring_need_event: the guest asked for an interrupt once used
            // passes `ev`; did we pass it since we last published?
            Some(new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old))
        } else {
            Some(self.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Ask the guest to kick us when it adds buffers (event mode, idle).
    pub fn enable_kicks(&mut self) {
        if self.event_idx {
            self.set_avail_event(self.last_avail.get());
        } else {
            self.set_used_flags(0);
        }
        // The guest must see this before we re-check avail->idx.
        fence(Ordering::SeqCst);
        self.avail_cache = self.last_avail;
    }

    /// Tell the guest not to kick (busy work or polling).
    pub fn disable_kicks(&mut self) {
        if self.event_idx {
            // A stale avail_event behind the guest's index means no kicks
            // until it wraps all the way round.
            self.set_avail_event(self.last_avail.get().wrapping_sub(1));
        } else {
            self.set_used_flags(VRING_USED_F_NO_NOTIFY);
        }
    }

    /// Re-sync after the frontend set the ring base (or on first use):
    /// consumed entries from `last_avail`, used entries from `next_used`
    /// (both as the front end's ring state has them).
    pub fn sync(&mut self, last_avail: u16, next_used: u16) {
        self.last_avail.set(last_avail);
        self.avail_cache.set(last_avail);
        self.next_used.set(next_used);
        self.published.set(next_used);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dataplane::mem::test_mem::TestMem;

    pub const BASE: u64 = 0x10000;
    pub const DESC: u64 = BASE;
    pub const AVAIL: u64 = BASE + 0x1000;
    pub const USED: u64 = BASE + 0x2000;
    pub const DATA: u64 = BASE + 0x4000;
    pub const QSIZE: u16 = 16;

    /// A guest-side driver of one split ring in a TestMem.
    pub struct Driver {
        pub mem: TestMem,
        pub avail_idx: u16,
    }

    impl Driver {
        pub fn new() -> Self {
            Driver {
                mem: TestMem::new(BASE, 0x40000),
                avail_idx: 0,
            }
        }
        pub fn addrs() -> RingAddrs {
            RingAddrs {
                desc: DESC,
                avail: AVAIL,
                used: USED,
                size: QSIZE,
            }
        }
        pub fn set_desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write(table + 16 * i as u64, &b);
        }
        pub fn push_avail(&mut self, head: u16) {
            let slot = (self.avail_idx % QSIZE) as u64;
            self.mem.write(AVAIL + 4 + 2 * slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
            let idx = self.avail_idx;
            self.mem.write(AVAIL + 2, &idx.to_le_bytes());
        }
        pub fn used_idx(&self) -> u16 {
            u16::from_le_bytes(self.mem.read(USED + 2, 2).try_into().unwrap())
        }
        pub fn used_elem(&self, i: u16) -> (u32, u32) {
            let b = self.mem.read(USED + 4 + 8 * (i % QSIZE) as u64, 8);
            (
                u32::from_le_bytes(b[..4].try_into().unwrap()),
                u32::from_le_bytes(b[4..].try_into().unwrap()),
            )
        }
    }

    fn pop_one(d: &mut Driver, writable: bool) -> Result<Chain, ChainError> {
        let view = d.mem.view();
        // SAFETY: `view` (and the memory behind it) outlives the ring.
        let mut r = unsafe { SplitRing::new(&view, Driver::addrs()) }.unwrap();
        r.indirect = true;
        assert!(r.pending()? > 0);
        let mut c = Chain::default();
        r.pop(&view, writable, 65536, &mut c).map(|_| c)
    }

    #[test]
    fn simple_and_chained() {
        let mut d = Driver::new();
        d.set_desc(DESC, 0, DATA, 100, VRING_DESC_F_NEXT, 5);
        d.set_desc(DESC, 5, DATA + 200, 50, 0, 0);
        d.push_avail(0);
        let c = pop_one(&mut d, false).unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.len, 150);
        assert_eq!(c.iov.len(), 2);
        assert_eq!(c.gpa, vec![DATA, DATA + 200]);
    }

    #[test]
    fn indirect_table() {
        let mut d = Driver::new();
        let table = DATA + 0x1000;
        d.set_desc(table, 0, DATA, 10, VRING_DESC_F_NEXT, 1);
        d.set_desc(table, 1, DATA + 10, 20, 0, 0);
        d.set_desc(DESC, 3, table, 32, VRING_DESC_F_INDIRECT, 0);
        d.push_avail(3);
        let c = pop_one(&mut d, false).unwrap();
        assert_eq!((c.head, c.len, c.iov.len()), (3, 30, 2));
    }

    fn expect_err(setup: impl FnOnce(&mut Driver), writable: bool) -> ChainError {
        let mut d = Driver::new();
        setup(&mut d);
        pop_one(&mut d, writable).unwrap_err()
    }

    #[test]
    fn head_out_of_range() {
        let e = expect_err(|d| d.push_avail(QSIZE), false);
        assert!(
            matches!(e, ChainError::IndexOutOfRange { index: 16, .. }),
            "{e}"
        );
    }

    #[test]
    fn next_out_of_range() {
        let e = expect_err(
            |d| {
                d.set_desc(DESC, 0, DATA, 1, VRING_DESC_F_NEXT, 99);
                d.push_avail(0);
            },
            false,
        );
        assert!(
            matches!(e, ChainError::IndexOutOfRange { index: 99, .. }),
            "{e}"
        );
    }

    #[test]
    fn address_outside_memory() {
        for (addr, len) in [
            (0x1000u64, 10u32),
            (BASE + 0x3fff0, 0x20),
            (u64::MAX - 4, 10),
        ] {
            let e = expect_err(
                |d| {
                    d.set_desc(DESC, 0, addr, len, 0, 0);
                    d.push_avail(0);
                },
                false,
            );
            assert!(matches!(e, ChainError::BadAddress { .. }), "{e}");
        }
    }

    #[test]
    fn loop_is_caught() {
        let e = expect_err(
            |d| {
                d.set_desc(DESC, 0, DATA, 1, VRING_DESC_F_NEXT, 1);
                d.set_desc(DESC, 1, DATA, 1, VRING_DESC_F_NEXT, 0);
                d.push_avail(0);
            },
            false,
        );
        assert_eq!(
            e,
            ChainError::TooLong {
                limit: QSIZE as u32
            }
        );
    }

    #[test]
    fn loop_inside_indirect_is_caught() {
        let e = expect_err(
            |d| {
                let t = DATA + 0x1000;
                d.set_desc(t, 0, DATA, 1, VRING_DESC_F_NEXT, 1);
                d.set_desc(t, 1, DATA, 1, VRING_DESC_F_NEXT, 0);
                d.set_desc(DESC, 0, t, 32, VRING_DESC_F_INDIRECT, 0);
                d.push_avail(0);
            },
            false,
        );
        assert_eq!(e, ChainError::TooLong { limit: 2 });
    }

    #[test]
    fn direction_is_enforced() {
        let e = expect_err(
            |d| {
                d.set_desc(DESC, 0, DATA, 10, VRING_DESC_F_NEXT, 1);
                d.set_desc(DESC, 1, DATA, 10, VRING_DESC_F_WRITE, 0);
                d.push_avail(0);
            },
            false,
        );
        assert_eq!(e, ChainError::WriteOnlyInReadChain);
        let e = expect_err(
            |d| {
                d.set_desc(DESC, 0, DATA, 10, 0, 0);
                d.push_avail(0);
            },
            true,
        );
        assert_eq!(e, ChainError::ReadOnlyInWriteChain);
    }

    #[test]
    fn oversized_chain() {
        let e = expect_err(
            |d| {
                d.set_desc(DESC, 0, DATA, 60000, VRING_DESC_F_NEXT, 1);
                d.set_desc(DESC, 1, DATA, 60000, 0, 0);
                d.push_avail(0);
            },
            false,
        );
        assert!(
            matches!(e, ChainError::Oversized { len: 120000, .. }),
            "{e}"
        );
        // A single huge length is refused before any translation.
        let e = expect_err(
            |d| {
                d.set_desc(DESC, 0, DATA, u32::MAX, 0, 0);
                d.push_avail(0);
            },
            false,
        );
        assert!(matches!(e, ChainError::Oversized { .. }), "{e}");
    }

    #[test]
    fn bad_indirect() {
        let t = DATA + 0x1000;
        for (flags, len, nested) in [
            (VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 32, false),
            (VRING_DESC_F_INDIRECT, 0, false),
            (VRING_DESC_F_INDIRECT, 24, false),
            (VRING_DESC_F_INDIRECT, 16 * (MAX_INDIRECT + 1), false),
            (VRING_DESC_F_INDIRECT, 32, true),
        ] {
            let e = expect_err(
                |d| {
                    d.set_desc(DESC, 0, t, len, flags, 1);
                    d.set_desc(DESC, 1, DATA, 1, 0, 0);
                    if nested {
                        d.set_desc(t, 0, t, 32, VRING_DESC_F_INDIRECT, 0);
                    }
                    d.push_avail(0);
                },
                false,
            );
            match e {
                ChainError::IndirectWithNext
                | ChainError::IndirectLength { .. }
                | ChainError::NestedIndirect => {}
                other => panic!("flags {flags} len {len}: {other}"),
            }
        }
        // Indirect table outside memory.
        let e = expect_err(
            |d| {
                d.set_desc(DESC, 0, 0x10, 32, VRING_DESC_F_INDIRECT, 0);
                d.push_avail(0);
            },
            false,
        );
        assert!(matches!(e, ChainError::BadAddress { .. }));
    }

    #[test]
    fn indirect_needs_negotiation() {
        let mut d = Driver::new();
        d.set_desc(DESC, 0, DATA + 0x1000, 32, VRING_DESC_F_INDIRECT, 0);
        d.push_avail(0);
        let view = d.mem.view();
        // SAFETY: `view` (and the memory behind it) outlives the ring.
        let mut r = unsafe { SplitRing::new(&view, Driver::addrs()) }.unwrap();
        r.pending().unwrap();
        let mut c = Chain::default();
        assert_eq!(
            r.pop(&view, false, 65536, &mut c),
            Err(ChainError::IndirectNotNegotiated)
        );
    }

    #[test]
    fn avail_index_too_far_ahead() {
        let mut d = Driver::new();
        d.mem.write(AVAIL + 2, &(QSIZE + 1).to_le_bytes());
        let view = d.mem.view();
        // SAFETY: `view` (and the memory behind it) outlives the ring.
        let mut r = unsafe { SplitRing::new(&view, Driver::addrs()) }.unwrap();
        assert!(matches!(r.pending(), Err(ChainError::AvailIndex { .. })));
    }

    #[test]
    fn ring_outside_memory_or_misaligned() {
        let mut d = Driver::new();
        let view = d.mem.view();
        for a in [
            RingAddrs {
                desc: 0x10,
                ..Driver::addrs()
            },
            RingAddrs {
                desc: DESC + 8,
                ..Driver::addrs()
            },
            RingAddrs {
                used: BASE + 0x40000 - 8,
                ..Driver::addrs()
            },
            RingAddrs {
                size: 0,
                ..Driver::addrs()
            },
            RingAddrs {
                size: 3,
                ..Driver::addrs()
            },
        ] {
            // SAFETY: refused, or dropped at once.
            assert!(unsafe { SplitRing::new(&view, a) }.is_err(), "{a:?}");
        }
    }

    #[test]
    fn skip_front_across_segments_keeps_guest_addresses_in_step() {
        let a = [0u8; 8];
        let b = [0u8; 8];
        let mut c = Chain::default();
        for (buf, gpa) in [(&a, 0x1000u64), (&b, 0x5000)] {
            c.iov.push(libc::iovec {
                iov_base: buf.as_ptr() as *mut _,
                iov_len: 8,
            });
            c.gpa.push(gpa);
        }
        // Inside the first segment (the inline case), then across it.
        c.skip_front(3);
        assert_eq!((c.iov().len(), c.gpa().len()), (2, 2));
        assert_eq!(c.iov()[0].iov_len, 5);
        assert_eq!(c.gpa()[0], 0x1003);
        c.skip_front(9);
        assert_eq!((c.iov().len(), c.gpa().len()), (1, 1));
        assert_eq!(c.iov()[0].iov_len, 4);
        assert_eq!(c.iov()[0].iov_base as *const u8, unsafe {
            b.as_ptr().add(4)
        });
        assert_eq!(c.gpa()[0], 0x5004);
    }

    #[test]
    fn buffer_across_adjacent_regions_is_split() {
        let mut d = Driver::new();
        let mut extra = vec![0u8; 0x1000];
        d.set_desc(DESC, 0, BASE + 0x40000 - 0x10, 0x20, 0, 0);
        d.push_avail(0);
        let mut view = d.mem.view();
        // SAFETY: `extra` outlives the view.
        assert!(unsafe { view.add(BASE + 0x40000, 0x1000, extra.as_mut_ptr(), Perm::ReadWrite) });
        // SAFETY: `view` (and the memory behind it) outlives the ring.
        let mut r = unsafe { SplitRing::new(&view, Driver::addrs()) }.unwrap();
        r.pending().unwrap();
        let mut c = Chain::default();
        r.pop(&view, false, 65536, &mut c).unwrap();
        assert_eq!(c.iov.len(), 2);
        assert_eq!((c.iov[0].iov_len, c.iov[1].iov_len), (0x10, 0x10));
        assert_eq!(c.iov[1].iov_base as *mut u8, extra.as_mut_ptr());
    }

    #[test]
    fn used_ring_and_event_idx() {
        let mut d = Driver::new();
        let view = d.mem.view();
        // SAFETY: `view` (and the memory behind it) outlives the ring.
        let mut r = unsafe { SplitRing::new(&view, Driver::addrs()) }.unwrap();
        r.event_idx = true;
        r.put_used(7, 42);
        r.put_used(8, 0);
        // used_event = 0: the guest wants an interrupt once used passes 0.
        assert!(r.publish_used());
        assert_eq!(d.used_idx(), 2);
        assert_eq!(d.used_elem(0), (7, 42));
        assert_eq!(d.used_elem(1), (8, 0));
        // used_event = 5: no interrupt until used goes past 5.
        d.mem
            .write(AVAIL + 4 + 2 * QSIZE as u64, &5u16.to_le_bytes());
        r.put_used(1, 1);
        assert!(!r.publish_used());
        for _ in 0..3 {
            r.put_used(1, 1);
        }
        assert!(r.publish_used(), "used went 3 -> 6, past 5");
        // Without EVENT_IDX, NO_INTERRUPT suppresses.
        r.event_idx = false;
        d.mem
            .write(AVAIL, &VRING_AVAIL_F_NO_INTERRUPT.to_le_bytes());
        r.put_used(1, 1);
        assert!(!r.publish_used());
        // Nothing new: nothing to signal.
        assert!(!r.publish_used());
    }

    #[test]
    fn used_spans_wrap() {
        // 16 entries of 8 bytes after the 4-byte flags/idx header.
        assert_eq!(used_spans(16, 0, 1), ((4, 11), None));
        assert_eq!(used_spans(16, 0, 16), ((4, 131), None));
        assert_eq!(used_spans(16, 30, 2), ((116, 131), None));
        assert_eq!(used_spans(16, 14, 4), ((116, 131), Some((4, 19))));
        assert_eq!(used_spans(16, u16::MAX, 2), ((124, 131), Some((4, 11))));
        assert_eq!(used_spans(16, 5, 16), ((44, 131), Some((4, 43))));
    }

    #[test]
    fn kick_suppression() {
        let mut d = Driver::new();
        let view = d.mem.view();
        // SAFETY: `view` (and the memory behind it) outlives the ring.
        let mut r = unsafe { SplitRing::new(&view, Driver::addrs()) }.unwrap();
        r.event_idx = true;
        r.sync(9, 0);
        r.enable_kicks();
        let ev = d.mem.read(USED + 4 + 8 * QSIZE as u64, 2);
        assert_eq!(u16::from_le_bytes(ev.try_into().unwrap()), 9);
        r.event_idx = false;
        r.disable_kicks();
        assert_eq!(d.mem.read(USED, 2), &VRING_USED_F_NO_NOTIFY.to_le_bytes());
        r.enable_kicks();
        assert_eq!(d.mem.read(USED, 2), &[0, 0]);
    }
}
