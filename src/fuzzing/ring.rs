//! Fuzz target `ring`: the split ring walker ([`SplitRing`]) over a guest
//! memory of several regions with holes, driven by an arbitrary sequence
//! of guest writes (descriptors, avail entries, avail index, anything) and
//! device operations (pop readable or writable, put_used, publish, unpop,
//! roll back, kicks on/off, prefetch, restart as after a crash), in step
//! with rust-vmm's `virtio_queue::Queue` as the reference.
//!
//! Two copies of the same guest memory: vfrelay works on `a` (through a
//! [`MemView`] of its regions), the reference on `b`. Guest writes go to
//! both; vfrelay's device writes (used entries, kick suppression) are
//! mirrored into `b` as they happen, and the reference writes its own used
//! entries at publish time, after which the two used rings must be equal
//! byte for byte (and at the end, the whole memory).
//!
//! Where both must agree: whether a ring can be set up, how many chains
//! are pending when vfrelay reads the index afresh, each popped chain
//! (head, buffers split at region boundaries, each iovec pointing exactly
//! where the reference memory has that address, total length), the used
//! index and entries after publishing, and whether the guest wants an
//! interrupt. Where vfrelay is deliberately stricter, only the implication
//! holds: a chain vfrelay pops, the reference pops the same; a chain
//! vfrelay refuses while the reference walks it to the end must break one
//! of vfrelay's own rules, checked against the chain the reference walked:
//! - device-writable descriptors only in RX chains, readable only in TX
//!   (the reference yields both kinds and leaves it to the device);
//! - at most `max_len` bytes and [`MAX_SEGS`] segments per chain;
//! - every buffer inside guest memory the device may use that way (RX
//!   buffers writable, TX buffers readable: regions carry permissions, as
//!   VDUSE's read-only or write-only IOTLB entries do; the reference has
//!   none and does not look at buffer addresses while walking); an indirect
//!   table inside one readable region (the reference reads it descriptor by
//!   descriptor);
//! - indirect descriptors only when negotiated, never with NEXT (the
//!   reference ignores NEXT there), at most [`MAX_INDIRECT`] entries;
//! - each ring part inside one region, desc and avail readable, used
//!   readable and writable (the reference accepts parts that span adjacent
//!   regions, whatever their permissions).
//!
//! Other deliberate differences:
//! - vfrelay reads the avail index once per batch (`pending`) and trusts
//!   it until that many entries are consumed; the reference re-reads it
//!   for every chain. Once the guest moves its index backwards or more than
//!   a ring ahead, the two may disagree on whether a chain is there; from
//!   then on chains are compared only when both pop one.
//! - Without EVENT_IDX, vfrelay honours VRING_AVAIL_F_NO_INTERRUPT (the
//!   reference always asks to interrupt): checked against the flag.
//! - With EVENT_IDX, turning kicks off writes avail_event one behind
//!   last_avail (the reference writes nothing): checked as such.
//!
//! Invariants crash survival needs, checked while the guest behaves (offers
//! only heads it owns, through the avail ring, and leaves the used ring
//! alone): a published used index never goes backwards (it moves by at
//! most a ring, and exactly to what was put), and no head is handed back
//! that the guest did not offer, or twice for one offer, across restarts
//! from the used index as QEMU does after a back end crashed.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::In;
use crate::dataplane::mem::{MemView, Perm};
use crate::dataplane::ring::{
    Chain, ChainError, RingAddrs, SplitRing, MAX_INDIRECT, MAX_SEGS, VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

const PAGE: u64 = 4096;
/// The largest split ring (virtio spec): the reference device's maximum.
const MAX_QUEUE_SIZE: u16 = 32768;
/// Operations per input: enough for several wraps of a small ring.
const MAX_OPS: usize = 1024;

/// Guest memory: sorted, non-overlapping (gpa, len, what the device may
/// do there) regions, some adjacent, some with holes between them; nothing
/// below the first page.
struct Layout {
    regions: Vec<(u64, u64, Perm)>,
}

impl Layout {
    fn parse(u: &mut In) -> Layout {
        let n = 1 + u.u8() as usize % 4;
        let mut gpa = PAGE * (1 + u.u8() as u64 % 4);
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            let len = PAGE * (1 + u.u8() as u64 % 16);
            let b = u.u8();
            // Mostly both, as vhost-user memory; VDUSE maps TX buffers
            // read-only and, under an IOMMU, RX buffers write-only.
            let perm = match (b >> 4) & 3 {
                2 => Perm::Read,
                3 => Perm::Write,
                _ => Perm::ReadWrite,
            };
            regions.push((gpa, len, perm));
            // 0: the next region is adjacent (buffers may straddle both).
            gpa += len + PAGE * (b as u64 % 4);
        }
        Layout { regions }
    }

    /// The region holding `gpa`, if it allows `need` (None: any region).
    fn region_of(&self, gpa: u64, need: Option<Perm>) -> Option<(u64, u64)> {
        self.regions
            .iter()
            .find(|&&(g, l, p)| gpa >= g && gpa - g < l && need.is_none_or(|n| p.allows(n)))
            .map(|&(g, l, _)| (g, l))
    }

    /// `[gpa, gpa+len)` inside one region that allows `need`.
    fn in_one(&self, gpa: u64, len: u64, need: Perm) -> bool {
        len == 0
            || self
                .region_of(gpa, Some(need))
                .is_some_and(|(g, l)| len <= l - (gpa - g))
    }

    /// `[gpa, gpa+len)` as pieces that each lie in one region allowing
    /// `need` (None if it is not all such memory), as a buffer is split
    /// into segments.
    fn pieces(&self, gpa: u64, len: u64, need: Perm) -> Option<Vec<(u64, u64)>> {
        self.pieces_of(gpa, len, Some(need))
    }

    /// [`pieces`](Self::pieces) of any memory: what the guest can write.
    fn span(&self, gpa: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        self.pieces_of(gpa, len, None)
    }

    fn pieces_of(&self, mut gpa: u64, len: u64, need: Option<Perm>) -> Option<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let (g, l) = self.region_of(gpa, need)?;
            let n = left.min(l - (gpa - g));
            out.push((gpa, n));
            gpa = gpa.checked_add(n)?;
            left -= n;
        }
        Some(out)
    }

    /// A guest address worth trying: in a region, near its end, in the
    /// hole after it, or anything; aligned to `align` unless bit 7 says not.
    fn addr(&self, u: &mut In, align: u64) -> u64 {
        let sel = u.u8();
        let (g, l, _) = self.regions[(sel as usize >> 2) % self.regions.len()];
        let a = match sel & 3 {
            0 => g.wrapping_add(u.u16() as u64),
            1 => (g + l).wrapping_sub(u.u16() as u64 % (l + 1)),
            2 => (g + l).wrapping_add(u.u8() as u64),
            _ => u.u64(),
        };
        if sel & 0x80 == 0 {
            a & !(align - 1)
        } else {
            a
        }
    }
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// One popped chain as the harness tracks it.
#[derive(Clone, Copy)]
struct Popped {
    id: u64,
    head: u16,
    /// Its used entry was written (not yet published).
    put: bool,
}

struct Fuzz {
    lay: Layout,
    a: GuestMemoryMmap,
    b: GuestMemoryMmap,
    view: MemView,
    addrs: RingAddrs,
    event_idx: bool,
    indirect: bool,
    ring: SplitRing,
    q: Queue,
    chain: Chain,
    /// The guest's avail index (what it last wrote there).
    guest_avail: u16,
    /// Popped chains whose used entry was not yet written, in pop order.
    outstanding: Vec<Popped>,
    /// Chains popped since the last publish (or error), for unpop.
    recent: Vec<Popped>,
    /// Used entries written but not published: (pop id, head, len).
    unpublished: Vec<(u64, u16, u32)>,
    next_id: u64,
    /// Per head: offered by the guest and not yet handed back.
    owned: Vec<u32>,
    /// The guest behaved so far: `owned` means what it says.
    owners_ok: bool,
    /// Since the last restart, chains were used in the order they were
    /// popped and none was popped after a refused one: what the dataplane
    /// does (it uses in order and stops a queue at its first bad chain), and
    /// what resuming at the used index after a crash relies on.
    in_order: bool,
    /// The guest's avail index never went backwards or more than a ring
    /// ahead: vfrelay's cached index is still a lower bound of the fresh one.
    idx_sane: bool,
    /// The guest (or an overlapping ring part) wrote the used index.
    used_scribbled: bool,
    /// The guest wrote into the used ring since the last publish (or more
    /// entries were written than it has slots).
    used_touched: bool,
    /// VFRELAY_FUZZ_TRACE=1: print each operation (to read a crash).
    trace: bool,
}

impl Fuzz {
    fn size(&self) -> u16 {
        self.addrs.size
    }

    fn used_len(&self) -> u64 {
        6 + 8 * self.size() as u64
    }

    fn read_u16(m: &GuestMemoryMmap, gpa: u64) -> u16 {
        m.read_obj::<u16>(GuestAddress(gpa)).unwrap_or_default()
    }

    fn desc_at(m: &GuestMemoryMmap, gpa: u64) -> Option<Descriptor> {
        m.read_obj::<Descriptor>(GuestAddress(gpa)).ok()
    }

    /// Copy `[gpa, gpa+len)` from vfrelay's memory into the reference's:
    /// what vfrelay wrote there as the device.
    fn mirror(&self, gpa: u64, len: u64) {
        let Some(pieces) = self.lay.span(gpa, len) else {
            return;
        };
        for (g, n) in pieces {
            let mut buf = vec![0u8; n as usize];
            self.a.read_slice(&mut buf, GuestAddress(g)).unwrap();
            self.b.write_slice(&buf, GuestAddress(g)).unwrap();
        }
    }

    /// A guest write, to both memories; the parts outside memory are lost.
    /// `push`: the guest offering a chain (the avail entry, then the index).
    fn guest_write(&mut self, gpa: u64, data: &[u8], push: bool) {
        let len = data.len() as u64;
        if self.trace {
            eprintln!("  guest write {gpa:#x}: {data:02x?}");
        }
        let Some(pieces) = self.lay.span(gpa, len) else {
            return;
        };
        let mut off = 0usize;
        for (g, n) in pieces {
            let part = &data[off..off + n as usize];
            self.a.write_slice(part, GuestAddress(g)).unwrap();
            self.b.write_slice(part, GuestAddress(g)).unwrap();
            off += n as usize;
        }
        let used = self.addrs.used;
        if overlaps(gpa, len, used, self.used_len()) {
            // Used entries the guest rewrote no longer say what was handed back.
            self.owners_ok = false;
            self.used_touched = true;
        }
        if overlaps(gpa, len, used + 2, 2) {
            self.used_scribbled = true;
        }
        if !push && overlaps(gpa, len, self.addrs.avail + 2, 2 + 2 * self.size() as u64) {
            // The index or entries moved other than by offering a chain.
            self.owners_ok = false;
        }
        if overlaps(gpa, len, self.addrs.avail + 2, 2) {
            let new = Self::read_u16(&self.a, self.addrs.avail + 2);
            let size = self.size();
            if new.wrapping_sub(self.guest_avail) > size
                || new.wrapping_sub(self.ring.last_avail()) > size
            {
                self.idx_sane = false;
            }
            self.guest_avail = new;
        }
    }

    /// The first indirect descriptor of the chain at `head`, read from the
    /// reference memory: the reference walks it without yielding it.
    fn indirect_of(&self, head: u16) -> Option<Descriptor> {
        let mut idx = head;
        for _ in 0..self.size() {
            if idx >= self.size() {
                return None;
            }
            let d = Self::desc_at(&self.b, self.addrs.desc + 16 * idx as u64)?;
            if d.refers_to_indirect_table() {
                return Some(d);
            }
            if !d.has_next() {
                return None;
            }
            idx = d.next();
        }
        None
    }

    fn pop(&mut self, writable: bool, max_len: u64, prefetch: Option<usize>) -> bool {
        let size = self.size();
        assert_eq!(
            self.ring.last_avail(),
            self.q.next_avail(),
            "positions differ"
        );
        let fresh = self
            .q
            .avail_idx(&self.b, Ordering::Acquire)
            .expect("avail ring checked at setup")
            .0;
        let dist = fresh.wrapping_sub(self.q.next_avail());
        let pending = match self.ring.pending() {
            Err(ChainError::AvailIndex { avail, .. }) => {
                // Read just now from the same memory.
                assert_eq!(avail, fresh);
                assert!(dist > size, "vfrelay refused avail index {avail}");
                return false;
            }
            Err(e) => panic!("pending: {e}"),
            Ok(0) => {
                // A count of 0 means vfrelay read the index afresh.
                assert_eq!(dist, 0, "vfrelay sees nothing, the reference {dist} chains");
                return false;
            }
            Ok(n) => n,
        };
        // vfrelay trusts the index it read until it has consumed that many
        // entries, also after an unpop: a guest that offered more than a
        // ring's worth in flight may make that more than a ring (the slots
        // read are in the ring all the same). A driver never can.
        assert!(!self.owners_ok || pending <= size, "pending {pending}");
        if self.idx_sane {
            assert!(
                dist >= pending && dist <= size,
                "vfrelay sees {pending} chains, the reference {dist}"
            );
        }
        if let Some(skip) = prefetch {
            self.ring.prefetch(pending, writable, skip);
            self.ring.prefetch_used(pending);
        }
        let got = self
            .ring
            .pop(&self.view, writable, max_len, &mut self.chain);
        let reference = if dist > 0 && dist <= size {
            self.q.pop_descriptor_chain(&self.b)
        } else {
            // The guest moved its index: the reference cannot pop here;
            // keep it at the same position.
            self.q.set_next_avail(self.q.next_avail().wrapping_add(1));
            None
        };
        assert_eq!(self.ring.last_avail(), self.q.next_avail());
        let Some(rc) = reference else {
            return self.popped(got.is_ok());
        };
        let head = rc.head_index();
        let mut descs = Vec::new();
        let mut complete = false;
        for d in rc {
            complete = !d.has_next();
            descs.push(d);
        }
        let indirect = self.indirect_of(head);
        match &got {
            Ok(()) => self.check_accepted(head, complete, &descs, indirect, writable, max_len),
            Err(e) if complete => {
                let why = self.refusal_justified(e, &descs, indirect, writable, max_len);
                assert!(
                    why,
                    "vfrelay refused chain {head} that the reference walked \
                     completely ({} descriptors, indirect {indirect:?}): {e}",
                    descs.len()
                );
            }
            Err(_) => {}
        }
        self.popped(got.is_ok())
    }

    /// Book-keeping after a pop: a chain now in flight, or an error (the
    /// dataplane stops the queue: nothing popped before it is unpopped).
    fn popped(&mut self, ok: bool) -> bool {
        if ok {
            let p = Popped {
                id: self.next_id,
                head: self.chain.head(),
                put: false,
            };
            self.next_id += 1;
            self.outstanding.push(p);
            self.recent.push(p);
        } else {
            self.recent.clear();
            // The dataplane pops nothing after a refused chain.
            self.in_order = false;
        }
        ok
    }

    fn check_accepted(
        &self,
        head: u16,
        complete: bool,
        descs: &[Descriptor],
        indirect: Option<Descriptor>,
        writable: bool,
        max_len: u64,
    ) {
        let c = &self.chain;
        let need = Perm::for_buffers(writable);
        assert!(
            complete,
            "vfrelay popped chain {head} the reference finds broken"
        );
        assert_eq!(c.head(), head);
        let mut segs = Vec::new();
        let mut total = 0u64;
        for d in descs {
            assert_eq!(d.is_write_only(), writable, "direction of {d:?}");
            total += d.len() as u64;
            segs.extend(
                self.lay
                    .pieces(d.addr().0, d.len() as u64, need)
                    .expect("vfrelay accepted a buffer outside memory"),
            );
        }
        assert_eq!(c.bytes(), total);
        assert!(total <= max_len);
        assert!(segs.len() <= MAX_SEGS);
        assert_eq!(c.iov().len(), segs.len(), "segments of chain {head}");
        assert_eq!(c.gpa().len(), segs.len());
        for (i, &(g, n)) in segs.iter().enumerate() {
            assert_eq!(c.gpa()[i], g);
            assert_eq!(c.iov()[i].iov_len as u64, n);
            let host = self.a.get_host_address(GuestAddress(g)).unwrap();
            assert_eq!(
                c.iov()[i].iov_base as *mut u8,
                host,
                "segment {i} at {g:#x}"
            );
        }
        if let Some(d) = indirect {
            assert!(self.indirect, "indirect descriptor without the feature");
            assert!(!d.has_next());
            let len = d.len();
            assert!(len > 0 && len.is_multiple_of(16) && len / 16 <= MAX_INDIRECT);
            assert!(self.lay.in_one(d.addr().0, len as u64, Perm::Read));
        }
    }

    /// vfrelay refused a chain the reference walked to its end: one of
    /// vfrelay's own rules must really be broken by it.
    fn refusal_justified(
        &self,
        e: &ChainError,
        descs: &[Descriptor],
        indirect: Option<Descriptor>,
        writable: bool,
        max_len: u64,
    ) -> bool {
        let total: u64 = descs.iter().map(|d| d.len() as u64).sum();
        let need = Perm::for_buffers(writable);
        match *e {
            ChainError::WriteOnlyInReadChain => {
                !writable && descs.iter().any(|d| d.is_write_only())
            }
            ChainError::ReadOnlyInWriteChain => {
                writable && descs.iter().any(|d| !d.is_write_only())
            }
            ChainError::Oversized { max, .. } => max == max_len && total > max_len,
            ChainError::TooManySegments => {
                let mut n = 0;
                for d in descs {
                    match self.lay.pieces(d.addr().0, d.len() as u64, need) {
                        Some(p) => n += p.len(),
                        None => break,
                    }
                }
                n > MAX_SEGS
            }
            ChainError::BadAddress { addr, len } => {
                descs.iter().any(|d| {
                    d.addr().0 == addr
                        && d.len() == len
                        && self.lay.pieces(addr, len as u64, need).is_none()
                }) || indirect.is_some_and(|d| {
                    d.addr().0 == addr
                        && d.len() == len
                        && !self.lay.in_one(addr, len as u64, Perm::Read)
                })
            }
            ChainError::IndirectWithNext => indirect.is_some_and(|d| d.has_next()),
            ChainError::IndirectLength { len, .. } => indirect.is_some_and(|d| {
                d.len() == len && (len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_INDIRECT)
            }),
            ChainError::IndirectNotNegotiated => !self.indirect && indirect.is_some(),
            // Index out of range, a loop, a nested indirect table: the
            // reference would have stopped too.
            _ => false,
        }
    }

    fn put_used(&mut self, pick: usize, len: u32) {
        if self.outstanding.is_empty() {
            return;
        }
        let pick = pick % self.outstanding.len();
        if pick != 0 {
            // Used out of order: the dataplane never does.
            self.in_order = false;
        }
        let p = self.outstanding.remove(pick);
        let slot = self.ring.next_used() & (self.size() - 1);
        self.ring.put_used(p.head, len);
        self.mirror(self.addrs.used + 4 + 8 * slot as u64, 8);
        self.unpublished.push((p.id, p.head, len));
        if self.unpublished.len() > self.size() as usize {
            // More entries than slots (a guest offered more than a ring's
            // worth): later ones overwrite earlier ones, and after a
            // retraction the two devices' slots hold different leftovers.
            self.used_touched = true;
        }
        if let Some(r) = self.recent.iter_mut().find(|r| r.id == p.id) {
            r.put = true;
        }
    }

    /// Un-consume the last `n` popped chains, as RX does when a frame finds
    /// no room: those whose used entries were written are retracted too
    /// (they must be the last entries written).
    fn unpop(&mut self, n: usize) {
        if n == 0 || n > self.recent.len() {
            return;
        }
        let tail = self.recent[self.recent.len() - n..].to_vec();
        let puts: Vec<u64> = tail.iter().filter(|p| p.put).map(|p| p.id).collect();
        if puts.len() > self.unpublished.len() {
            return;
        }
        let last = &self.unpublished[self.unpublished.len() - puts.len()..];
        if last.iter().map(|e| e.0).ne(puts.iter().copied()) {
            return;
        }
        self.unpublished
            .truncate(self.unpublished.len() - puts.len());
        self.ring.unput(puts.len() as u16);
        self.ring.unpop(n as u16);
        for _ in 0..n {
            self.q.go_to_previous_position();
        }
        if self.guest_avail.wrapping_sub(self.ring.last_avail()) > self.size() {
            self.idx_sane = false;
        }
        self.recent.truncate(self.recent.len() - n);
        self.outstanding
            .retain(|o| tail.iter().all(|t| t.id != o.id));
    }

    /// Retract the last `k` unpublished used entries without unpopping
    /// their chains, as RX does on a chain error mid-frame: those chains
    /// are lost (the queue stops).
    fn abandon(&mut self, k: usize) {
        if k == 0 || k > self.unpublished.len() {
            return;
        }
        self.unpublished.truncate(self.unpublished.len() - k);
        self.ring.unput(k as u16);
        self.recent.clear();
        // Those chains stay taken with no used entry: later ones would be
        // used out of order.
        self.in_order = false;
    }

    fn publish(&mut self) {
        let used = self.addrs.used;
        let before = Self::read_u16(&self.a, used + 2);
        let res = self.ring.publish();
        let entries = std::mem::take(&mut self.unpublished);
        for &(_, head, len) in &entries {
            self.q
                .add_used(&self.b, head, len)
                .expect("reference add_used");
        }
        self.recent.clear();
        let after = Self::read_u16(&self.a, used + 2);
        if !self.used_scribbled {
            assert_eq!(after, self.ring.next_used());
            assert_eq!(self.q.next_used(), self.ring.next_used());
            let moved = after.wrapping_sub(before);
            assert_eq!(
                moved as usize,
                entries.len(),
                "used index {before} -> {after}"
            );
            match res {
                None => assert!(entries.is_empty()),
                Some(notify) => {
                    let want = if self.event_idx {
                        self.q.needs_notification(&self.b).unwrap()
                    } else {
                        let flags = Self::read_u16(&self.a, self.addrs.avail);
                        flags & VRING_AVAIL_F_NO_INTERRUPT == 0
                    };
                    assert_eq!(notify, want, "interrupt after {before} -> {after}");
                }
            }
            if self.owners_ok {
                // At most a ring's worth in flight (a guest offering more
                // than that gets its used entries overwritten): a larger
                // step is the index going backwards.
                assert!(
                    moved <= self.size(),
                    "used index went backwards: {before} -> {after}"
                );
                let mask = self.size() - 1;
                for i in 0..moved {
                    let slot = (before.wrapping_add(i) & mask) as u64;
                    let head = Self::read_u16(&self.a, used + 4 + 8 * slot);
                    let owned = self.owned.get_mut(head as usize);
                    match owned {
                        Some(n) if *n > 0 => *n -= 1,
                        _ => panic!("head {head} handed back but not offered (or twice)"),
                    }
                }
            }
        }
        if self.used_scribbled {
            // vfrelay writes the index only with an entry, as the
            // reference does, but then its own value over the guest's.
            self.mirror(used + 2, 2);
        }
        if std::mem::take(&mut self.used_touched) {
            // The guest wrote over entries vfrelay had written and the
            // reference writes only now: vfrelay's are what the guest sees.
            self.mirror(used, self.used_len());
        }
        self.compare(used, self.used_len());
    }

    /// Both memories hold the same bytes at `[gpa, gpa+len)`.
    fn compare(&self, gpa: u64, len: u64) {
        for (g, n) in self.lay.span(gpa, len).unwrap_or_default() {
            let mut x = vec![0u8; n as usize];
            let mut y = vec![0u8; n as usize];
            self.a.read_slice(&mut x, GuestAddress(g)).unwrap();
            self.b.read_slice(&mut y, GuestAddress(g)).unwrap();
            assert!(x == y, "memories differ in {g:#x}+{n:#x}");
        }
    }

    /// Kicks on or off, against the reference's notification switch.
    fn kicks(&mut self, on: bool) {
        let size = self.size() as u64;
        let (flags, event) = (self.addrs.used, self.addrs.used + 4 + 8 * size);
        if on {
            self.ring.enable_kicks();
            let more = self.q.enable_notification(&self.b).unwrap();
            self.compare(flags, 2);
            self.compare(event, 2);
            // vfrelay looks again now (its cache was reset): the same answer.
            match self.ring.pending() {
                Ok(n) => assert_eq!(n > 0, more, "pending {n} after enabling kicks"),
                Err(_) => assert!(more),
            }
        } else {
            self.ring.disable_kicks();
            if self.event_idx {
                // Deliberate: a stale avail_event, where the reference
                // leaves it as it was.
                let ev = Self::read_u16(&self.a, event);
                assert_eq!(ev, self.ring.last_avail().wrapping_sub(1));
                self.mirror(event, 2);
            } else {
                self.q.disable_notification(&self.b).unwrap();
                self.compare(flags, 2);
            }
        }
    }

    /// The back end died and came back: a new ring from what the guest's
    /// used index says, as QEMU's SET_VRING_BASE after a reconnect.
    /// Chains in flight are lost or popped again.
    fn restart(&mut self) {
        let base = Self::read_u16(&self.a, self.addrs.used + 2);
        if !self.in_order {
            // Chains before the used index may still be out and chains
            // after it used: ownership says nothing once resumed there.
            self.owners_ok = false;
        }
        self.in_order = true;
        // SAFETY: the view and memory `a` live as long as the Fuzz state.
        let mut r =
            unsafe { SplitRing::new(&self.view, self.addrs) }.expect("ring translated before");
        r.event_idx = self.event_idx;
        r.indirect = self.indirect;
        r.sync(base, base);
        self.ring = r;
        self.q = reference_queue(&self.b, self.addrs, self.event_idx, base)
            .expect("reference queue valid before");
        self.outstanding.clear();
        self.recent.clear();
        self.unpublished.clear();
        if self.guest_avail.wrapping_sub(base) > self.size() {
            self.idx_sane = false;
        }
    }

    fn push_avail(&mut self, head: u16) {
        let size = self.size();
        let used = Self::read_u16(&self.a, self.addrs.used + 2);
        match self.owned.get_mut(head as usize) {
            Some(n) if *n == 0 && self.guest_avail.wrapping_sub(used) < size => *n += 1,
            // A head out of range, in flight already, or more offered than
            // the ring holds: no driver does that.
            _ => self.owners_ok = false,
        }
        let slot = (self.guest_avail & (size - 1)) as u64;
        self.guest_write(self.addrs.avail + 4 + 2 * slot, &head.to_le_bytes(), true);
        let idx = self.guest_avail.wrapping_add(1);
        self.guest_write(self.addrs.avail + 2, &idx.to_le_bytes(), true);
        // Written even if the avail ring lies partly outside memory.
        self.guest_avail = idx;
    }

    fn op(&mut self, u: &mut In) {
        let size = self.size();
        let op = u.u8() % 16;
        if self.trace {
            eprintln!(
                "op {op}: last_avail {} next_used {} guest_avail {} outstanding {} unpublished {} \
                 owners_ok {} idx_sane {} used_scribbled {}",
                self.ring.last_avail(),
                self.ring.next_used(),
                self.guest_avail,
                self.outstanding.len(),
                self.unpublished.len(),
                self.owners_ok,
                self.idx_sane,
                self.used_scribbled
            );
        }
        match op {
            // A descriptor: in the ring's table, or in a table anywhere
            // (indirect tables, or junk).
            0..=2 => {
                let sel = u.u8();
                let (table, index) = if sel & 1 == 0 {
                    (self.addrs.desc, u.u16() % size)
                } else {
                    (self.lay.addr(u, 16), u.u8() as u16 % 32)
                };
                let addr = self.lay.addr(u, 1);
                let len = if sel & 2 == 0 {
                    u.u16() as u32
                } else {
                    u.u32()
                };
                let f = u.u8();
                let flags = if f < 0xe0 {
                    let bit = |b: u8, flag: u16| if f & b != 0 { flag } else { 0 };
                    bit(1, VRING_DESC_F_NEXT)
                        | bit(2, VRING_DESC_F_WRITE)
                        | bit(4, VRING_DESC_F_INDIRECT)
                } else {
                    u.u16()
                };
                let next = u.u16();
                let next = if next & 0x8000 == 0 {
                    next % size.max(32)
                } else {
                    next
                };
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..].copy_from_slice(&next.to_le_bytes());
                self.guest_write(table.wrapping_add(16 * index as u64), &d, false);
            }
            3 | 4 => {
                let h = u.u16();
                self.push_avail(if h & 0x8000 == 0 { h % size } else { h });
            }
            5 => {
                // Rewrite an avail entry (maybe one already offered).
                let slot = (u.u16() % size) as u64;
                let head = u.u16();
                self.owners_ok = false;
                self.guest_write(self.addrs.avail + 4 + 2 * slot, &head.to_le_bytes(), false);
            }
            6 => {
                // Move the avail index without writing entries.
                let v = u.u16();
                self.owners_ok = false;
                self.guest_write(self.addrs.avail + 2, &v.to_le_bytes(), false);
            }
            7 => {
                // Anything, anywhere (flags, used_event, the used ring...).
                let gpa = self.lay.addr(u, 1);
                let n = u.u8() as usize % 64;
                let data = u.bytes(n).to_vec();
                self.guest_write(gpa, &data, false);
            }
            8 | 9 => {
                let sel = u.u8();
                let writable = sel & 1 != 0;
                let max_len = match (sel >> 1) & 3 {
                    0 => 65536 + 12,
                    1 => 1514 + 12,
                    2 => u.u16() as u64,
                    _ => u.u32() as u64,
                };
                let prefetch = (sel & 0x20 != 0).then(|| u.u8() as usize % 16);
                for _ in 0..1 + (sel >> 6) {
                    if !self.pop(writable, max_len, prefetch) {
                        break;
                    }
                }
            }
            10 | 11 => {
                let pick = u.u8() as usize;
                let len = u.u32();
                self.put_used(pick, len);
            }
            12 => self.publish(),
            13 => {
                let sel = u.u8();
                if sel & 0x80 == 0 {
                    self.unpop(sel as usize % (self.recent.len() + 1));
                } else {
                    self.abandon(sel as usize % (self.unpublished.len() + 1));
                }
            }
            14 => {
                let on = u.u8() & 1 != 0;
                self.kicks(on);
            }
            _ => self.restart(),
        }
    }
}

/// The `ring` fuzz target: panics on a finding.
pub fn ring(data: &[u8]) {
    let mut u = In::new(data);
    let lay = Layout::parse(&mut u);
    let ranges: Vec<_> = lay
        .regions
        .iter()
        .map(|&(g, l, _)| (GuestAddress(g), l as usize))
        .collect();
    let a = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");
    let b = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("guest memory");
    let mut view = MemView::empty();
    for &(g, l, perm) in &lay.regions {
        let host = a.get_host_address(GuestAddress(g)).unwrap();
        // SAFETY: `a`'s mappings live in the same Fuzz as the view (and
        // the rings translated with it) and outlive every use of them.
        assert!(unsafe { view.add(g, l, host, perm) });
    }
    let s = u.u8();
    let size = if s < 0xf0 { 1u16 << (s % 11) } else { u.u16() };
    let addrs = RingAddrs {
        desc: lay.addr(&mut u, 16),
        avail: lay.addr(&mut u, 2),
        used: lay.addr(&mut u, 4),
        size,
    };
    let feats = u.u8();
    let (event_idx, indirect) = (feats & 1 != 0, feats & 2 != 0);
    // SAFETY: `a` and the view outlive the ring (both live in the Fuzz).
    let ring = match unsafe { SplitRing::new(&view, addrs) } {
        Ok(r) => r,
        Err(_) => {
            // Refused: the reference must refuse too, unless vfrelay's rule
            // that each part lies in one region is what failed.
            let n = size as u64;
            let in_one = lay.in_one(addrs.desc, 16 * n, Perm::Read)
                && lay.in_one(addrs.avail, 6 + 2 * n, Perm::Read)
                && lay.in_one(addrs.used, 6 + 8 * n, Perm::ReadWrite);
            assert!(
                reference_queue(&b, addrs, event_idx, 0).is_none() || !in_one,
                "vfrelay refused ring {addrs:?} the reference accepts"
            );
            return;
        }
    };
    let q = reference_queue(&b, addrs, event_idx, 0)
        .unwrap_or_else(|| panic!("vfrelay accepted ring {addrs:?}, the reference refuses"));
    let mut f = Fuzz {
        lay,
        a,
        b,
        view,
        addrs,
        event_idx,
        indirect,
        ring,
        q,
        chain: Chain::default(),
        guest_avail: 0,
        outstanding: Vec::new(),
        recent: Vec::new(),
        unpublished: Vec::new(),
        next_id: 0,
        owned: vec![0; size as usize],
        owners_ok: true,
        in_order: true,
        idx_sane: true,
        used_scribbled: false,
        used_touched: false,
        trace: std::env::var_os("VFRELAY_FUZZ_TRACE").is_some(),
    };
    if f.trace {
        eprintln!(
            "{:x?} {addrs:x?} event_idx {event_idx} indirect {indirect}",
            f.lay.regions
        );
    }
    f.ring.event_idx = event_idx;
    f.ring.indirect = indirect;
    // Device writes to the used ring land on the avail index: vfrelay's
    // cached index and the fresh one may part.
    if overlaps(f.addrs.used, f.used_len(), f.addrs.avail + 2, 2) {
        f.idx_sane = false;
    }
    // ... and on avail entries: they no longer say what the guest offered.
    if overlaps(
        f.addrs.used,
        f.used_len(),
        f.addrs.avail,
        6 + 2 * size as u64,
    ) {
        f.owners_ok = false;
    }
    if overlaps(f.addrs.used + 2, 2, f.addrs.desc, 16 * size as u64)
        || overlaps(f.addrs.used + 2, 2, f.addrs.avail, 6 + 2 * size as u64)
    {
        f.used_scribbled = true;
    }
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        f.op(&mut u);
    }
    for &(g, l, _) in &f.lay.regions {
        f.compare(g, l);
    }
}

/// The reference queue for a ring, as a device would set it up, resuming
/// at `base`; None if the reference refuses the ring.
fn reference_queue(b: &GuestMemoryMmap, a: RingAddrs, event_idx: bool, base: u16) -> Option<Queue> {
    let mut q = Queue::new(MAX_QUEUE_SIZE).ok()?;
    q.try_set_size(a.size).ok()?;
    q.try_set_desc_table_address(GuestAddress(a.desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(a.avail)).ok()?;
    q.try_set_used_ring_address(GuestAddress(a.used)).ok()?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q.set_next_avail(base);
    q.set_next_used(base);
    q.is_valid(b).then_some(q)
}
