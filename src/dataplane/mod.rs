//! The hot path, shared by both frontends. A frontend (vhost-user, VDUSE)
//! hands a worker a memory view ([`MemView`]), the vring state the worker
//! then owns ([`vring::Vring`]) and a way to interrupt the guest; everything
//! that touches descriptors lives here.

pub mod dirty_log;
pub mod mem;
pub mod ring;
mod rx;
mod tx;
pub mod vring;
pub mod worker;

use std::sync::Arc;

use log::{debug, error, warn};
use vfrelay_backends::Backend;

use crate::stats::{QueueStats, SharedStats};
use dirty_log::{DirtyLog, LogCache};
use mem::{MemView, Perm};
use ring::{Chain, ChainError, RingAddrs, SplitRing};

/// Frames moved per burst before the other direction gets a turn.
pub const BURST: usize = 64;

pub use crate::net::{
    F_INDIRECT_DESC as VIRTIO_RING_F_INDIRECT_DESC, F_MRG_RXBUF as VIRTIO_NET_F_MRG_RXBUF,
    F_VERSION_1 as VIRTIO_F_VERSION_1,
};

/// What the dataplane needs of one virtqueue's state ([`vring::Vring`] in
/// the daemon; a fake in tests).
pub trait RingCtl {
    /// Started and enabled: the device may process it.
    fn active(&self) -> bool;
    fn addrs(&self) -> RingAddrs;
    fn next_avail(&self) -> u16;
    fn set_next_avail(&mut self, v: u16);
    fn next_used(&self) -> u16;
    fn set_next_used(&mut self, v: u16);
    fn event_idx(&self) -> bool;
    /// Interrupt the guest.
    fn signal(&self);
    /// The queue is stopped for a guest error; raise NEEDS_RESET or the
    /// error fd where the transport has one.
    fn broken(&mut self, _err: &ChainError) {}
    /// Guest address to log used-ring writes at (VHOST_VRING_F_LOG), if
    /// the frontend asked for used-ring logging.
    fn log_addr(&self) -> Option<u64> {
        None
    }
}

/// A starting ring resumes where the guest's used ring says, whatever base
/// the front end gave. Every ring here is used in order and nothing stays
/// popped between bursts, so every chain before `used->idx` was used and
/// none after it: resuming there hands no chain back twice, leaves none
/// behind and never moves the used index backwards. The base can be wrong
/// when a back end died: DPDK's virtio-user in server mode sends 0 again
/// when a restarted back end reconnects, its rings thousands of entries
/// further. A base ahead of the used index would skip the chains a dead
/// back end took but never used, which then never come back to the guest.
/// DPDK's vhost library resumes there too (libvhost-user for devices
/// that say they process in order). It assumes the previous back end
/// completed in order as well: true of vfrelay, and of a migration source
/// that is vfrelay or DPDK; after one that completed out of order, chains
/// could be handed back twice.
fn resume_from_used(ctl: &mut dyn RingCtl, r: &SplitRing, what: &str) {
    let used = r.used_idx();
    if (ctl.next_avail(), ctl.next_used()) != (used, used) {
        warn!(
            "{what}: front end says resume at avail {} used {}; the guest's used ring is at \
             {used}: resuming there",
            ctl.next_avail(),
            ctl.next_used()
        );
        ctl.set_next_avail(used);
        ctl.set_next_used(used);
    }
}

/// The virtio-net header the driver expects with `features`: 12 bytes
/// (`virtio_net_hdr_v1`, num_buffers) with VERSION_1 or MRG_RXBUF, else
/// the legacy 10.
fn hdr_len(features: u64) -> usize {
    if features & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

/// Cached translation of one ring plus its stop state.
#[derive(Default)]
struct RingSlot {
    ring: Option<SplitRing>,
    /// Identity of the MemView the ring was translated with.
    mem: Option<Arc<MemView>>,
    broken: bool,
    /// Resumed from the guest's used ring, and the guest interrupted, since
    /// the ring last became active.
    resumed: bool,
    /// Stopped for an address outside the view, not yet reported: the
    /// worker first asks the frontend ([`QueuePair::resolve_misses`]).
    missed: Option<ChainError>,
}

/// Where a ring or buffer address was missing from the view, if that is
/// why `e` stopped the queue; `need`: the access the ring's buffers need.
fn miss_addr(e: &ChainError, mem: &MemView, need: Perm) -> Option<u64> {
    match *e {
        // The first byte the view lacks, not the buffer's start: a buffer
        // may run from a mapping the view has into one added since, and a
        // lookup of its start would find only the first. (An indirect
        // table is read whatever the ring, hence Read after `need`.)
        ChainError::BadAddress { addr, len } => {
            let end = addr.saturating_add(len as u64);
            let first = [need, Perm::Read]
                .into_iter()
                .find_map(|p| first_unmapped(mem, addr, end, p));
            Some(first.unwrap_or(addr))
        }
        ChainError::BadRing {
            desc, avail, used, ..
        } => [
            (desc, Perm::Read),
            (avail, Perm::Read),
            (used, Perm::ReadWrite),
        ]
        .into_iter()
        .find(|(a, p)| mem.translate(*a, 1, *p).is_none())
        .map(|(a, _)| a),
        _ => None,
    }
}

/// The first byte of `[addr, end)` that `mem` does not map for `need`.
fn first_unmapped(mem: &MemView, addr: u64, end: u64, need: Perm) -> Option<u64> {
    let mut a = addr;
    while a < end {
        match mem.translate_prefix(a, end - a, need) {
            Some((_, n)) => a += n,
            None => return Some(a),
        }
    }
    None
}

/// Whether `new` maps `addr` for an access `old` did not map it for: else
/// the miss was a bad address or a lacking permission, and trying again
/// would only fail again. (Mapped in both, if elsewhere, is not new: an
/// entry remapped on every lookup would otherwise be looked up every
/// round.)
fn newly_mapped(old: &MemView, new: &MemView, addr: u64) -> bool {
    [Perm::Read, Perm::Write]
        .into_iter()
        .any(|p| old.translate(addr, 1, p).is_none() && new.translate(addr, 1, p).is_some())
}

impl RingSlot {
    /// Ready the cached ring for a burst: None if inactive or stopped.
    fn prepare(
        &mut self,
        ctl: &mut dyn RingCtl,
        mem: &Arc<MemView>,
        features: u64,
        what: &str,
        stats: &mut QueueStats,
        defer_miss: bool,
    ) -> Option<&mut SplitRing> {
        if !ctl.active() {
            // A stopped ring that is restarted is a fresh start.
            self.ring = None;
            self.mem = None;
            self.broken = false;
            self.resumed = false;
            self.missed = None;
            return None;
        }
        if self.broken {
            return None;
        }
        let addrs = ctl.addrs();
        let stale = match (&self.ring, &self.mem) {
            (Some(r), Some(m)) => r.addrs != addrs || !Arc::ptr_eq(m, mem),
            _ => true,
        };
        if stale {
            // SAFETY: the ring is cached with `mem` (self.mem below) and
            // dropped or re-made whenever the view changes.
            match unsafe { SplitRing::new(mem, addrs) } {
                Ok(r) => {
                    debug!(
                        "{what}: ring {addrs:?} base avail {} used {} (guest used idx {})",
                        ctl.next_avail(),
                        ctl.next_used(),
                        r.used_idx()
                    );
                    // Once when a ring starts, not on every new memory
                    // view (VDUSE gets one per IOTLB update).
                    if !self.resumed {
                        self.resumed = true;
                        resume_from_used(ctl, &r, what);
                        // A back end that died after publishing used
                        // entries but before the interrupt leaves a guest
                        // waiting for it, with no RX buffers posted: nobody
                        // would ever move again (seen after SIGKILL and
                        // restart). A spurious interrupt costs the driver
                        // one look. (vhost-user also does it when a call fd
                        // arrives for a running ring.)
                        ctl.signal();
                    }
                    self.ring = Some(r);
                    self.mem = Some(mem.clone());
                }
                Err(e) => {
                    self.fail(ctl, what, &e, stats, defer_miss);
                    return None;
                }
            }
        }
        let r = self.ring.as_mut().unwrap();
        r.event_idx = ctl.event_idx();
        r.indirect = features & VIRTIO_RING_F_INDIRECT_DESC != 0;
        r.sync(ctl.next_avail(), ctl.next_used());
        Some(r)
    }

    /// Stop the ring for `e`. With `defer_miss`, an address outside the
    /// view is only noted: the worker asks the frontend for it first.
    fn fail(
        &mut self,
        ctl: &mut dyn RingCtl,
        what: &str,
        e: &ChainError,
        stats: &mut QueueStats,
        defer_miss: bool,
    ) {
        self.broken = true;
        if defer_miss
            && self.missed.is_none()
            && matches!(
                e,
                ChainError::BadAddress { .. } | ChainError::BadRing { .. }
            )
        {
            self.missed = Some(e.clone());
            return;
        }
        error!("{what}: stopping queue: {e}");
        stats.count_chain_error(e);
        ctl.broken(e);
    }

    /// Hand indices back to the frontend and interrupt if the guest wants it.
    /// While logging, the used ring (entries, index, avail_event) and the
    /// buffers marked during the burst reach the log before the ring can be
    /// stopped (GET_VRING_BASE waits for this burst).
    fn finish(
        &mut self,
        ctl: &mut dyn RingCtl,
        log: Option<&DirtyLog>,
        cache: &mut LogCache,
        stats: &mut QueueStats,
    ) {
        if let Some(r) = self.ring.as_mut() {
            let published = r.publish();
            let notify = published == Some(true);
            match published {
                Some(true) => stats.interrupts += 1,
                Some(false) => stats.interrupts_suppressed += 1,
                None => {}
            }
            // Marked after the writes: a log sync between a mark and the
            // write it covers would send the page before it changed.
            if let Some(log) = log {
                if let Some(addr) = ctl.log_addr() {
                    cache.mark(log, addr, r.used_len());
                }
                cache.flush(log);
            }
            if notify {
                ctl.signal();
            }
            ctl.set_next_avail(r.last_avail());
            ctl.set_next_used(r.next_used());
        }
    }
}

/// One queue pair: RX ring (guest receives), TX ring (guest sends) and the
/// backend they relay to. Owned by one thread.
pub struct QueuePair {
    pub backend: Box<dyn Backend>,
    /// Counted here by the owning worker; read by others from `shared`.
    pub stats: QueueStats,
    pub shared: Arc<SharedStats>,
    /// Counted outside a round (a kick, a chain error, a discard) and not
    /// yet published.
    pub stats_dirty: bool,
    features: u64,
    hdr_len: usize,
    rx: RingSlot,
    tx: RingSlot,
    rx_chain: Chain,
    tx_chain: Chain,
    log_cache: LogCache,
    /// TX stopped because the backend was full: wait for it, not the guest.
    tx_blocked: bool,
    rx_name: String,
    tx_name: String,
    /// Backend queues of this port's disabled queue pairs, lent to this one:
    /// what the NIC steers to them reaches the guest through this RX ring
    /// (a guest may enable fewer pairs than the port has).
    pub extra_rx: Vec<(usize, Box<dyn Backend>)>,
    /// A ring stopped for an address outside the view waits for
    /// [`Self::resolve_misses`] instead of being reported at once (set
    /// while the frontend has a [`MissFn`]).
    pub defer_misses: bool,
    /// A RARP to send at the next round ([`Self::announce`]).
    announce: Option<[u8; 6]>,
}

/// Asked when a ring stops for an address its view lacks (`addr`, under
/// the view `cur`): the frontend's view if the lookup changed it, else
/// None. A changed view is installed even when it still lacks `addr`
/// (the lookup may have dropped mappings the kernel no longer has, which
/// the worker must stop using); the ring goes on only if `addr` is now
/// mapped where it was not. VDUSE mappings appear without a request (the
/// bounce map with the driver's first DMA mapping), so they are looked up
/// on a miss, never on every round.
pub type MissFn = Box<dyn FnMut(&MemView, u64) -> Option<Arc<MemView>> + Send>;

/// What a queue pair holds while its backend queue is lent to another:
/// the backend's counters as they were, so the pair's stay where they were
/// instead of falling to zero (a counter reset, to Prometheus).
pub struct Lent(pub vfrelay_backends::BackendStats);

impl Backend for Lent {
    fn describe(&self) -> String {
        "lent to another queue pair".into()
    }
    fn tx_frame(&mut self, _segs: vfrelay_backends::Segs<'_>) -> vfrelay_backends::Result<bool> {
        // The guest does not use a disabled pair's TX ring; should it, the
        // frame has nowhere to go.
        Ok(true)
    }
    fn rx_burst(
        &mut self,
        _max: usize,
        _sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> vfrelay_backends::Result<usize> {
        Ok(0)
    }
    fn stats(&self) -> vfrelay_backends::BackendStats {
        self.0
    }
}

impl QueuePair {
    pub fn new(index: usize, backend: Box<dyn Backend>) -> Self {
        QueuePair {
            rx_name: format!(
                "queue {} (rx of pair {index}, {})",
                2 * index,
                backend.describe()
            ),
            tx_name: format!(
                "queue {} (tx of pair {index}, {})",
                2 * index + 1,
                backend.describe()
            ),
            backend,
            stats: QueueStats::default(),
            shared: Arc::new(SharedStats::default()),
            stats_dirty: false,
            features: 0,
            hdr_len: 12,
            rx: RingSlot::default(),
            tx: RingSlot::default(),
            rx_chain: Chain::default(),
            tx_chain: Chain::default(),
            log_cache: LogCache::default(),
            tx_blocked: false,
            extra_rx: Vec::new(),
            defer_misses: false,
            announce: None,
        }
    }

    /// The features last set.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn sync_features(&mut self, features: u64) {
        if features != self.features {
            self.set_features(features);
        }
    }

    /// Features the driver acked: fixes the header layout and offloads.
    pub fn set_features(&mut self, features: u64) {
        self.features = features;
        self.hdr_len = hdr_len(features);
        for b in std::iter::once(&mut self.backend).chain(self.extra_rx.iter_mut().map(|(_, b)| b))
        {
            if let Err(e) = b.set_offloads(features) {
                error!("{}: setting offloads: {e}", b.describe());
            }
        }
    }

    /// Send a RARP for `mac` out of the backend, so the network learns where
    /// a migrated guest now is: at the start of the next round, not in the
    /// control command that asks for it. A command runs under a switch
    /// port's RX lock, and a switch floods the RARP into other ports' RX
    /// rings and the uplink: taken from there, a second lock (AB-BA with
    /// another port announcing, or with the uplink task).
    pub fn announce(&mut self, mac: &[u8; 6]) {
        self.announce = Some(*mac);
    }

    fn send_announce(&mut self, mac: &[u8; 6]) {
        let frame = crate::net::rarp_frame(mac);
        let hdr = [0u8; vfrelay_backends::VNET_HDR_LEN];
        let parts: &[&[u8]] = if self.backend.vnet_hdr() {
            &[&hdr, &frame]
        } else {
            &[&frame]
        };
        let backend = &mut self.backend;
        // Flushed inside the borrow: a backend may copy only at the flush.
        match vfrelay_backends::Segs::of(parts, |s| {
            backend.tx_frame(s).and_then(|_| backend.tx_flush())
        }) {
            Ok(()) => {}
            Err(e) => error!("{}: sending RARP: {e}", self.backend.describe()),
        }
    }

    /// Drop whatever the backend received while no guest was attached, so
    /// a new guest (or a guest migrating back) does not get stale frames
    /// seconds or minutes late. Counted as rx_dropped.
    pub fn discard_backend_rx(&mut self) -> u64 {
        let mut n = 0u64;
        // Bounded: a backend that receives as fast as we drain must not
        // hold the worker (and the control thread waiting for it).
        for _ in 0..64 {
            match self.backend.rx_burst(BURST, &mut |_| true) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        self.stats.rx_dropped += n;
        self.stats.rx_dropped_stale += n;
        self.publish_stats();
        n
    }

    /// Copy the counters where others read them. The backend's own are
    /// refreshed only here, not in [`Self::publish_round`]: reading them
    /// can be a syscall (AF_XDP's XDP_STATISTICS).
    pub fn publish_stats(&mut self) {
        self.stats.set_backend(&self.backend.stats());
        self.publish_round();
    }

    /// After a busy round: the dataplane's counters, no syscall.
    fn publish_round(&mut self) {
        self.shared.publish(&self.stats);
        self.stats_dirty = false;
    }

    /// Forget ring state (frontend disconnected or device reset).
    pub fn reset(&mut self) {
        self.rx = RingSlot::default();
        self.tx = RingSlot::default();
        self.tx_blocked = false;
    }

    /// One round: a TX burst then an RX burst. Returns frames moved.
    pub fn round(
        &mut self,
        mem: &Arc<MemView>,
        log: Option<&DirtyLog>,
        rx: &mut dyn RingCtl,
        tx: &mut dyn RingCtl,
    ) -> usize {
        if let Some(mac) = self.announce.take() {
            self.send_announce(&mac);
        }
        let mut moved = 0;
        let feats = self.features;
        let defer = self.defer_misses;
        if let Some(ring) = self
            .tx
            .prepare(tx, mem, feats, &self.tx_name, &mut self.stats, defer)
        {
            match tx::burst(
                ring,
                mem,
                &mut self.tx_chain,
                &mut *self.backend,
                self.hdr_len,
                &mut self.stats,
            ) {
                Ok((n, blocked)) => {
                    moved += n;
                    self.tx_blocked = blocked;
                }
                Err(e) => {
                    self.tx.fail(tx, &self.tx_name, &e, &mut self.stats, defer);
                    self.stats_dirty = true;
                }
            }
            self.tx
                .finish(tx, log, &mut self.log_cache, &mut self.stats);
        }
        if let Some(ring) = self
            .rx
            .prepare(rx, mem, feats, &self.rx_name, &mut self.stats, defer)
        {
            let mrg = feats & VIRTIO_NET_F_MRG_RXBUF != 0;
            let backends =
                std::iter::once(&mut self.backend).chain(self.extra_rx.iter_mut().map(|(_, b)| b));
            let mut res = Ok(0);
            for b in backends {
                res = rx::burst(
                    ring,
                    mem,
                    &mut self.rx_chain,
                    &mut **b,
                    self.hdr_len,
                    mrg,
                    log.map(|l| (l, &mut self.log_cache)),
                    &mut self.stats,
                )
                .map(|n| n + res.unwrap_or(0));
                if res.is_err() {
                    break;
                }
            }
            match res {
                Ok(n) => moved += n,
                Err(e) => {
                    self.rx.fail(rx, &self.rx_name, &e, &mut self.stats, defer);
                    self.stats_dirty = true;
                }
            }
            self.rx
                .finish(rx, log, &mut self.log_cache, &mut self.stats);
        }
        if log.is_some() {
            let (marked, beyond) = self.log_cache.take_marked();
            self.stats.dirty_pages_logged += marked;
            self.stats.dirty_pages_beyond_log += beyond;
        }
        if moved > 0 || self.stats_dirty {
            self.publish_round();
        }
        if moved > 0 {
            // Loopback frames produced by TX are waiting; a blocked TX may
            // have room now that RX drained.
            self.tx_blocked = false;
        }
        moved
    }

    pub fn set_kicks(
        &mut self,
        mem: &Arc<MemView>,
        rx: &mut dyn RingCtl,
        tx: &mut dyn RingCtl,
        on: bool,
    ) {
        let feats = self.features;
        let set = |r: &mut SplitRing| {
            if on {
                r.enable_kicks();
            } else {
                r.disable_kicks();
            }
        };
        let defer = self.defer_misses;
        if let Some(r) = self
            .rx
            .prepare(rx, mem, feats, &self.rx_name, &mut self.stats, defer)
        {
            set(r);
        }
        if let Some(r) = self
            .tx
            .prepare(tx, mem, feats, &self.tx_name, &mut self.stats, defer)
        {
            set(r);
        }
    }

    /// After a round: a ring that stopped for an address outside `mem`
    /// asks `handler` for it. Given a view that covers it, the ring goes
    /// on under that view from its last used entry (every chain popped
    /// after it failed or was given back, so none was used twice);
    /// otherwise it stops for good, reported as any chain error. True if
    /// `mem` changed.
    pub fn resolve_misses(
        &mut self,
        mem: &mut Arc<MemView>,
        rx: &mut dyn RingCtl,
        tx: &mut dyn RingCtl,
        handler: &mut dyn FnMut(&MemView, u64) -> Option<Arc<MemView>>,
    ) -> bool {
        let mut changed = false;
        // The view the round ran under: a ring that missed there goes on if
        // the view is now mapping its address, whichever ring's lookup
        // brought that in (both may miss in one new mapping; the second
        // lookup then finds nothing new).
        let ran = mem.clone();
        let rings: [(&mut RingSlot, &mut dyn RingCtl, &str, Perm); 2] = [
            (&mut self.tx, tx, &self.tx_name, Perm::Read),
            (&mut self.rx, rx, &self.rx_name, Perm::Write),
        ];
        for (slot, ctl, what, need) in rings {
            let Some(e) = slot.missed.take() else {
                continue;
            };
            let mut found = None;
            if let Some(a) = miss_addr(&e, &ran, need) {
                if let Some(v) = handler(mem, a) {
                    *mem = v;
                    changed = true;
                }
                if newly_mapped(&ran, mem, a) {
                    found = Some(a);
                }
            }
            match found {
                Some(a) => {
                    debug!("{what}: IOVA {a:#x} is mapped now; going on");
                    slot.broken = false;
                    ctl.set_next_avail(ctl.next_used());
                }
                None => {
                    error!("{what}: stopping queue: {e}");
                    self.stats.count_chain_error(&e);
                    ctl.broken(&e);
                    self.stats_dirty = true;
                }
            }
        }
        changed
    }
}

/// The RX ring of a queue pair that senders on any worker deliver into (a
/// switch port's first pair), with everything delivering needs, behind one
/// lock a sender takes once per batch. The Vring itself lives here while
/// the pair is shared: its worker swaps it into the `Slot` around each
/// control command ([`worker::Slot::with_rx`]), so commands read and change
/// it as for any queue pair, with senders shut out meanwhile.
pub struct RxHalf {
    pub(crate) ctl: vring::Vring,
    ring: RingSlot,
    chain: Chain,
    log_cache: LogCache,
    mem: Arc<MemView>,
    log: Option<Arc<DirtyLog>>,
    features: u64,
    hdr_len: usize,
    name: String,
    /// Guest RX kicks are switched off for the ring as it is now: senders
    /// never wait for buffers, so a kick would only cost the guest.
    kicks_off: bool,
    stats: QueueStats,
    shared: Arc<SharedStats>,
}

/// [`RxHalf`] as senders hold it.
pub type SharedRx = Arc<std::sync::Mutex<RxHalf>>;

impl RxHalf {
    /// A shared RX ring, not running yet; `name` for logs.
    pub fn shared(name: String) -> SharedRx {
        Arc::new(std::sync::Mutex::new(RxHalf::new(
            vring::Vring::new(0),
            name,
        )))
    }

    fn new(ctl: vring::Vring, name: String) -> Self {
        RxHalf {
            ctl,
            ring: RingSlot::default(),
            chain: Chain::default(),
            log_cache: LogCache::default(),
            mem: Arc::new(MemView::empty()),
            log: None,
            features: 0,
            hdr_len: 12,
            name,
            kicks_off: false,
            stats: QueueStats::default(),
            shared: Arc::new(SharedStats::default()),
        }
    }

    pub(crate) fn shared_stats(&self) -> Arc<SharedStats> {
        self.shared.clone()
    }

    /// After a control command changed the queue pair: what it set, in
    /// force for the next batch.
    /// Returns the view and log it replaced, for the caller to drop after
    /// the lock: the last reference unmaps guest memory, which senders
    /// waiting for the lock need not wait for.
    pub(crate) fn sync(
        &mut self,
        mem: &Arc<MemView>,
        log: Option<&Arc<DirtyLog>>,
        features: u64,
    ) -> (Arc<MemView>, Option<Arc<DirtyLog>>) {
        let old = (
            std::mem::replace(&mut self.mem, mem.clone()),
            std::mem::replace(&mut self.log, log.cloned()),
        );
        self.features = features;
        self.hdr_len = hdr_len(features);
        if !self.ctl.active() {
            // Stopped or reset: the next start is a fresh one (resume from
            // the used ring, a new stop state), as `prepare` would see it.
            self.ring = RingSlot::default();
            self.kicks_off = false;
        }
        old
    }

    /// Lock `rx` for a batch of frames.
    pub fn batch(rx: &std::sync::Mutex<RxHalf>) -> RxBatch<'_> {
        let mut half = rx.lock().unwrap_or_else(|e| e.into_inner());
        let h = &mut *half;
        let ready =
            match h
                .ring
                .prepare(&mut h.ctl, &h.mem, h.features, &h.name, &mut h.stats, false)
            {
                Some(r) => {
                    if !h.kicks_off {
                        r.disable_kicks();
                        h.kicks_off = true;
                    }
                    true
                }
                None => false,
            };
        RxBatch {
            half,
            ready,
            moved: false,
        }
    }
}

/// One destination's RX ring, locked for a batch: frames go in with
/// [`Self::push`]; the used index is published, the guest interrupted and
/// the counters published when it is dropped.
pub struct RxBatch<'a> {
    half: std::sync::MutexGuard<'a, RxHalf>,
    ready: bool,
    moved: bool,
}

impl RxBatch<'_> {
    /// Copy one frame (Ethernet header onwards) into the guest's buffers.
    /// A frame that finds no room, or no running ring, is dropped and
    /// counted: a sender never waits for a receiver.
    pub fn push(&mut self, frame: vfrelay_backends::Segs<'_>) -> bool {
        let h = &mut *self.half;
        self.moved = true;
        if !self.ready {
            h.stats.rx_dropped += 1;
            h.stats.rx_dropped_no_ring += 1;
            return false;
        }
        let dst = frame.head::<6>();
        let len = frame.bytes();
        let ring = h.ring.ring.as_mut().expect("a prepared ring");
        let zero = [0u8; vfrelay_backends::VNET_HDR_LEN];
        let mrg = h.features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let log = h.log.as_deref().map(|l| (l, &mut h.log_cache));
        match rx::deliver(
            ring,
            &h.mem,
            &mut h.chain,
            &zero,
            rx::Src::new(frame),
            h.hdr_len,
            mrg,
            log,
        ) {
            Ok(rx::Delivery::Done) => {
                h.stats.count_rx(len, dst.as_ref().map(|d| &d[..]));
                true
            }
            Ok(rx::Delivery::NoRoom) => {
                h.stats.rx_dropped += 1;
                h.stats.rx_dropped_full += 1;
                false
            }
            Ok(rx::Delivery::TooBig) => {
                h.stats.rx_dropped += 1;
                h.stats.rx_dropped_oversized += 1;
                false
            }
            Err(e) => {
                h.ring.fail(&mut h.ctl, &h.name, &e, &mut h.stats, false);
                h.stats.rx_dropped += 1;
                self.ready = false;
                false
            }
        }
    }
}

impl Drop for RxBatch<'_> {
    fn drop(&mut self) {
        if !self.moved {
            return;
        }
        let RxHalf {
            ring,
            ctl,
            log,
            log_cache,
            stats,
            shared,
            ..
        } = &mut *self.half;
        ring.finish(ctl, log.as_deref(), log_cache, stats);
        if log.is_some() {
            let (marked, beyond) = log_cache.take_marked();
            stats.dirty_pages_logged += marked;
            stats.dirty_pages_beyond_log += beyond;
        }
        shared.publish(stats);
    }
}

#[cfg(test)]
mod tests;
