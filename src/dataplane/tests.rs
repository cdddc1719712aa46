//! Dataplane tests against a fake guest memory: whole frames through TX,
//! the loopback backend and RX, and malformed chains stopping one queue.

use std::cell::Cell;
use std::sync::Arc;

use vfrelay_backends::loopback::Loopback;

use super::mem::test_mem::TestMem;
use super::mem::{MemView, Perm};
use super::ring::{RingAddrs, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::*;

const BASE: u64 = 0x100000;
const QSIZE: u16 = 64;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | crate::net::F_EVENT_IDX;

/// One guest-side ring in the shared TestMem, driven like a virtio driver.
struct GuestRing {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

/// Frontend-side ring state, as vhost-user's Queue would hold it.
struct FakeCtl {
    addrs: RingAddrs,
    active: bool,
    next_avail: u16,
    next_used: u16,
    signals: Cell<u32>,
    broken: Option<ChainError>,
    log_addr: Option<u64>,
}

impl RingCtl for FakeCtl {
    fn active(&self) -> bool {
        self.active
    }
    fn addrs(&self) -> RingAddrs {
        self.addrs
    }
    fn next_avail(&self) -> u16 {
        self.next_avail
    }
    fn set_next_avail(&mut self, v: u16) {
        self.next_avail = v
    }
    fn next_used(&self) -> u16 {
        self.next_used
    }
    fn set_next_used(&mut self, v: u16) {
        self.next_used = v
    }
    fn event_idx(&self) -> bool {
        true
    }
    fn signal(&self) {
        self.signals.set(self.signals.get() + 1)
    }
    fn broken(&mut self, e: &ChainError) {
        self.broken = Some(e.clone())
    }
    fn log_addr(&self) -> Option<u64> {
        self.log_addr
    }
}

struct Guest {
    mem: TestMem,
    view: Arc<MemView>,
    rx: GuestRing,
    tx: GuestRing,
    rx_ctl: std::cell::RefCell<FakeCtl>,
    tx_ctl: std::cell::RefCell<FakeCtl>,
    data_next: u64,
    features: u64,
    log: Option<Arc<dirty_log::DirtyLog>>,
}

impl Guest {
    /// Event mode as a worker runs it: work until idle, then re-arm kicks
    /// and look once more.
    fn run_event(&self, q: &mut QueuePair) {
        q.sync_features(self.features);
        let (mem, log) = (&self.view, self.log.as_deref());
        let mut rx = self.rx_ctl.borrow_mut();
        let mut tx = self.tx_ctl.borrow_mut();
        loop {
            while q.round(mem, log, &mut *rx, &mut *tx) > 0 {}
            q.set_kicks(mem, &mut *rx, &mut *tx, true);
            if q.round(mem, log, &mut *rx, &mut *tx) == 0 {
                break;
            }
            q.set_kicks(mem, &mut *rx, &mut *tx, false);
        }
    }

    fn new() -> Box<Guest> {
        let mut mem = TestMem::new(BASE, 0x100000);
        let view = Arc::new(mem.view());
        let ring = |off: u64| GuestRing {
            desc: BASE + off,
            avail: BASE + off + 0x1000,
            used: BASE + off + 0x2000,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        };
        let rx = ring(0);
        let tx = ring(0x4000);
        let ctl = |r: &GuestRing| {
            std::cell::RefCell::new(FakeCtl {
                addrs: RingAddrs {
                    desc: r.desc,
                    avail: r.avail,
                    used: r.used,
                    size: QSIZE,
                },
                active: true,
                next_avail: 0,
                next_used: 0,
                signals: Cell::new(0),
                broken: None,
                log_addr: None,
            })
        };
        Box::new(Guest {
            rx_ctl: ctl(&rx),
            tx_ctl: ctl(&tx),
            mem,
            view,
            rx,
            tx,
            data_next: BASE + 0x10000,
            features: FEATURES,
            log: None,
        })
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.data_next;
        self.data_next += len.div_ceil(64) * 64;
        a
    }

    fn desc(&mut self, tx: bool, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let table = if tx { self.tx.desc } else { self.rx.desc };
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(table + 16 * (i % QSIZE) as u64, &b);
    }

    fn publish(&mut self, tx: bool, head: u16) {
        let r = if tx { &mut self.tx } else { &mut self.rx };
        let slot = (r.avail_idx % QSIZE) as u64;
        let (avail, idx) = (r.avail, r.avail_idx.wrapping_add(1));
        r.avail_idx = idx;
        self.mem.write(avail + 4 + 2 * slot, &head.to_le_bytes());
        self.mem.write(avail + 2, &idx.to_le_bytes());
    }

    /// Queue a frame for TX: header and payload in separate descriptors.
    fn send(&mut self, frame: &[u8]) {
        let h = self.alloc(12);
        let p = self.alloc(frame.len() as u64);
        self.mem.write(h, &[0; 12]);
        self.mem.write(p, frame);
        let i = self.tx.next_desc;
        self.tx.next_desc = self.tx.next_desc.wrapping_add(2);
        self.desc(true, i, h, 12, VRING_DESC_F_NEXT, i.wrapping_add(1) % QSIZE);
        self.desc(true, i + 1, p, frame.len() as u32, 0, 0);
        self.publish(true, i % QSIZE);
    }

    /// Post one RX buffer of `len` bytes; returns its address.
    fn post_rx(&mut self, len: u32) -> u64 {
        let a = self.alloc(len as u64);
        let i = self.rx.next_desc;
        self.rx.next_desc = self.rx.next_desc.wrapping_add(1);
        self.desc(false, i, a, len, VRING_DESC_F_WRITE, 0);
        self.publish(false, i % QSIZE);
        a
    }

    fn used(&mut self, tx: bool) -> Vec<(u32, u32)> {
        let r = if tx { &mut self.tx } else { &mut self.rx };
        let idx = u16::from_le_bytes(self.mem.read(r.used + 2, 2).try_into().unwrap());
        let mut out = Vec::new();
        while r.used_seen != idx {
            let b = self
                .mem
                .read(r.used + 4 + 8 * (r.used_seen % QSIZE) as u64, 8);
            out.push((
                u32::from_le_bytes(b[..4].try_into().unwrap()),
                u32::from_le_bytes(b[4..].try_into().unwrap()),
            ));
            r.used_seen = r.used_seen.wrapping_add(1);
        }
        out
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect();
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f
}

fn swapped(f: &[u8]) -> Vec<u8> {
    let mut g = f.to_vec();
    for i in 0..6 {
        g.swap(i, i + 6);
    }
    g
}

fn qp() -> QueuePair {
    let mut q = QueuePair::new(0, Box::new(Loopback::new(0)));
    q.set_features(FEATURES);
    q
}

#[test]
fn loopback_round_trip_with_payload() {
    let mut g = Guest::new();
    let mut q = qp();
    let bufs: Vec<u64> = (0..4).map(|_| g.post_rx(2048)).collect();
    let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(60 + 400 * i, i as u8)).collect();
    for f in &frames {
        g.send(f);
    }
    g.run_event(&mut q);
    assert_eq!(g.used(true).len(), 4, "all TX chains returned");
    let used = g.used(false);
    assert_eq!(used.len(), 4);
    for (i, (id, len)) in used.iter().enumerate() {
        assert_eq!(*id as usize, i);
        assert_eq!(*len as usize, 12 + frames[i].len());
        let hdr = g.mem.read(bufs[i], 12);
        assert_eq!(&hdr[..10], &[0; 10]);
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        assert_eq!(
            g.mem.read(bufs[i] + 12, frames[i].len()),
            &swapped(&frames[i])[..]
        );
    }
    assert_eq!(q.stats.tx_frames, 4);
    assert_eq!(q.stats.rx_frames, 4);
    assert!(g.rx_ctl.borrow().signals.get() >= 1);
    assert_eq!(g.rx_ctl.borrow().next_avail, 4);
    assert_eq!(g.tx_ctl.borrow().next_used, 4);
}

#[test]
fn mergeable_buffers_spread_a_large_frame() {
    let mut g = Guest::new();
    let mut q = qp();
    let bufs: Vec<u64> = (0..8).map(|_| g.post_rx(256)).collect();
    let f = frame(1000, 9);
    g.send(&f);
    g.run_event(&mut q);
    let used = g.used(false);
    // 12 + 1000 bytes in 256-byte buffers: 4 buffers.
    assert_eq!(used.len(), 4);
    assert_eq!(used.iter().map(|u| u.1).sum::<u32>(), 1012);
    let hdr = g.mem.read(bufs[0], 12).to_vec();
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 4);
    let mut got = g.mem.read(bufs[0] + 12, 244).to_vec();
    for (b, (_, len)) in bufs[1..].iter().zip(&used[1..]) {
        got.extend_from_slice(g.mem.read(*b, *len as usize));
    }
    assert_eq!(got, swapped(&f));
}

#[test]
fn num_buffers_split_across_segments_is_patched() {
    let mut g = Guest::new();
    let mut q = qp();
    // The first RX chain splits the header after byte 10: num_buffers'
    // two bytes land in different segments.
    let (a, b, c) = (g.alloc(11), g.alloc(1), g.alloc(100));
    let i = g.rx.next_desc;
    g.rx.next_desc = i.wrapping_add(3);
    let wn = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
    g.desc(false, i, a, 11, wn, (i + 1) % QSIZE);
    g.desc(false, i + 1, b, 1, wn, (i + 2) % QSIZE);
    g.desc(false, i + 2, c, 100, VRING_DESC_F_WRITE, 0);
    g.publish(false, i % QSIZE);
    for _ in 0..4 {
        g.post_rx(256);
    }
    g.send(&frame(500, 3));
    g.run_event(&mut q);
    // 12 + 500 bytes: 112 in the first chain, then 256 + 144.
    let used = g.used(false);
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        [112, 256, 144]
    );
    let (lo, hi) = (g.mem.read(a + 10, 1)[0], g.mem.read(b, 1)[0]);
    assert_eq!(u16::from_le_bytes([lo, hi]), 3, "num_buffers");
}

#[test]
fn frame_waits_for_rx_buffers() {
    let mut g = Guest::new();
    let mut q = qp();
    let f = frame(100, 1);
    g.send(&f);
    g.run_event(&mut q);
    assert_eq!(g.used(true).len(), 1, "TX done even without RX buffers");
    assert!(g.used(false).is_empty());
    // 112 bytes are needed: one 64-byte buffer is not enough (nothing may
    // be published), two are.
    let b0 = g.post_rx(64);
    g.run_event(&mut q);
    assert!(
        g.used(false).is_empty(),
        "partial frame must not be published"
    );
    assert!(q.stats.rx_no_buffer >= 2, "waited for buffers in both runs");
    let _b1 = g.post_rx(64);
    g.run_event(&mut q);
    let used = g.used(false);
    assert_eq!(used, vec![(0, 64), (1, 48)]);
    assert_eq!(g.mem.read(b0 + 12, 52), &swapped(&f)[..52]);
}

/// VIRTIO_F_IN_ORDER is offered: buffers must be used in the order they
/// were made available, whatever their descriptor ids, also when frames
/// wait for RX buffers.
#[test]
fn buffers_are_used_in_the_order_they_were_offered() {
    let mut g = Guest::new();
    let mut q = qp();
    // RX buffers published in an order unlike their ids: 5, 3, 4.
    let addrs: Vec<u64> = (0..3).map(|_| g.alloc(2048)).collect();
    for (id, a) in [5u16, 3, 4].into_iter().zip(&addrs) {
        g.desc(false, id, *a, 2048, VRING_DESC_F_WRITE, 0);
        g.publish(false, id);
    }
    for i in 0..3 {
        g.send(&frame(60 + 10 * i, i as u8));
    }
    g.run_event(&mut q);
    let rx: Vec<u32> = g.used(false).iter().map(|u| u.0).collect();
    assert_eq!(rx, [5, 3, 4], "RX used in avail order");
    let tx: Vec<u32> = g.used(true).iter().map(|u| u.0).collect();
    assert_eq!(tx, [0, 2, 4], "TX used in avail order");

    // Frames that wait in the backend for RX buffers, offered a few at a
    // time: used entries still follow the avail order.
    let sent = QSIZE as usize / 2 - 3;
    for i in 0..sent {
        g.send(&frame(60, i as u8));
    }
    g.run_event(&mut q);
    let tx_ids: Vec<u32> = g.used(true).iter().map(|u| u.0).collect();
    let want_tx: Vec<u32> = (3..3 + sent as u32)
        .map(|k| (2 * k) % QSIZE as u32)
        .collect();
    assert_eq!(tx_ids, want_tx);
    let mut rx_ids = Vec::new();
    let mut expect_rx = Vec::new();
    while rx_ids.len() < sent {
        for _ in 0..4 {
            expect_rx.push((g.rx.next_desc % QSIZE) as u32);
            g.post_rx(2048);
        }
        g.run_event(&mut q);
        rx_ids.extend(g.used(false).iter().map(|u| u.0));
        assert!(expect_rx.len() <= sent + 4, "RX never caught up");
    }
    assert_eq!(rx_ids, expect_rx[..sent]);
}

#[test]
fn without_mrg_a_too_small_buffer_drops_the_frame() {
    let mut g = Guest::new();
    let mut q = qp();
    g.features = VIRTIO_F_VERSION_1;
    g.post_rx(64);
    g.send(&frame(200, 3));
    g.send(&frame(40, 4));
    g.run_event(&mut q);
    let used = g.used(false);
    assert_eq!(used, vec![(0, 52)], "big frame dropped, buffer reused");
    assert_eq!(q.stats.rx_dropped, 1);
    let s = q.shared.snapshot();
    assert_eq!(
        (s.rx_dropped, s.rx_dropped_oversized),
        (1, 1),
        "published, by cause"
    );
}

#[test]
fn malformed_tx_chain_stops_only_that_queue() {
    let mut g = Guest::new();
    let mut q = qp();
    // A TX chain pointing outside guest memory.
    g.desc(true, 0, 0xdead_0000, 64, 0, 0);
    g.publish(true, 0);
    g.run_event(&mut q);
    assert!(matches!(
        g.tx_ctl.borrow().broken,
        Some(ChainError::BadAddress { .. })
    ));
    assert_eq!(q.stats.chain_errors, 1);
    let s = q.shared.snapshot();
    assert_eq!(
        (s.chain_errors, s.chain_bad_address),
        (1, 1),
        "published, by kind"
    );
    // The queue stays stopped: a good chain after it is not processed...
    g.tx.next_desc = 1;
    g.send(&frame(60, 0));
    g.run_event(&mut q);
    assert!(g.used(true).is_empty());
    assert_eq!(q.stats.chain_errors, 1, "logged once, not per burst");

    // ...while another queue pair on the same thread carries on.
    let mut g2 = Guest::new();
    let mut q2 = qp();
    g2.post_rx(2048);
    g2.send(&frame(60, 5));
    g2.run_event(&mut q2);
    assert_eq!(g2.used(false).len(), 1);

    // A frontend reset (ring stopped and restarted) clears the stop. The
    // ring resumes at the used ring, whatever base the frontend gives: the
    // bad chain, taken but never used, is met again.
    let restart = |g: &Guest, q: &mut QueuePair| {
        g.tx_ctl.borrow_mut().active = false;
        g.run_event(q);
        let mut c = g.tx_ctl.borrow_mut();
        (c.active, c.next_avail, c.broken) = (true, 1, None);
    };
    restart(&g, &mut q);
    g.run_event(&mut q);
    assert!(g.tx_ctl.borrow().broken.is_some(), "the bad chain again");
    assert_eq!(q.stats.chain_errors, 2);
    // Once the guest repairs it, both chains go out, in order.
    let p = g.alloc(72);
    g.desc(true, 0, p, 72, 0, 0);
    restart(&g, &mut q);
    g.run_event(&mut q);
    assert_eq!(g.used(true), vec![(0, 0), (1, 0)]);
}

#[test]
fn malformed_rx_chain_stops_rx_but_tx_goes_on() {
    let mut g = Guest::new();
    let mut q = qp();
    // A read-only descriptor in the RX ring.
    let a = g.alloc(2048);
    g.desc(false, 0, a, 2048, 0, 0);
    g.publish(false, 0);
    g.send(&frame(60, 0));
    g.run_event(&mut q);
    assert_eq!(
        g.rx_ctl.borrow().broken,
        Some(ChainError::ReadOnlyInWriteChain)
    );
    assert_eq!(g.used(true).len(), 1, "TX still served");
}

#[test]
fn undersized_tx_chain_is_refused() {
    let mut g = Guest::new();
    let mut q = qp();
    let a = g.alloc(8);
    g.desc(true, 0, a, 8, 0, 0);
    g.publish(true, 0);
    g.run_event(&mut q);
    assert!(matches!(
        g.tx_ctl.borrow().broken,
        Some(ChainError::Undersized { .. })
    ));
}

#[test]
fn inactive_rings_are_not_touched() {
    let mut g = Guest::new();
    let mut q = qp();
    g.tx_ctl.borrow_mut().active = false;
    g.send(&frame(60, 0));
    g.run_event(&mut q);
    assert!(g.used(true).is_empty());
    assert_eq!(q.stats.tx_frames, 0);
}

/// Pages set in a log, relative to the test memory's first page.
fn logged_pages(log: &dirty_log::DirtyLog) -> Vec<u64> {
    let mut v = Vec::new();
    for (i, b) in log.bytes().iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                v.push(i as u64 * 8 + bit - (BASE >> 12));
            }
        }
    }
    v
}

fn with_log(g: &mut Guest) -> Arc<dirty_log::DirtyLog> {
    use std::os::fd::AsFd;
    // Covers the test memory: (BASE + 1 MiB) / 4 KiB pages.
    let fd = dirty_log::tests::memfd(4096);
    let log = Arc::new(dirty_log::DirtyLog::map(fd.as_fd(), 0, 4096).unwrap());
    g.log = Some(log.clone());
    log
}

#[test]
fn rx_writes_and_used_ring_are_logged_while_logging() {
    let mut g = Guest::new();
    let log = with_log(&mut g);
    let (rx_used, tx_used) = (g.rx.used, g.tx.used);
    g.rx_ctl.borrow_mut().log_addr = Some(rx_used);
    g.tx_ctl.borrow_mut().log_addr = Some(tx_used);
    let mut q = qp();
    // A buffer that straddles a page boundary, and a second in a far page.
    g.data_next = BASE + 0x20000 - 100;
    let b0 = g.post_rx(2048);
    g.data_next = BASE + 0x30000;
    let b1 = g.post_rx(2048);
    g.send(&frame(1000, 1));
    g.send(&frame(60, 2));
    g.run_event(&mut q);
    assert_eq!(g.used(false).len(), 2);
    let pages = logged_pages(&log);
    let page = |a: u64| (a - BASE) >> 12;
    // Frame 1 (1012 bytes) crosses from b0's page into the next.
    assert!(
        pages.contains(&page(b0)) && pages.contains(&(page(b0) + 1)),
        "{pages:?}"
    );
    assert!(pages.contains(&page(b1)));
    // Both used rings (one page each here).
    assert!(pages.contains(&page(rx_used)) && pages.contains(&page(tx_used)));
    // TX buffers are only read: not logged.
    let tx_data_page = page(BASE + 0x10000);
    assert!(!pages.contains(&tx_data_page), "{pages:?}");
    // Each page counted once, however often it was marked.
    assert_eq!(
        q.shared.snapshot().dirty_pages_logged,
        pages.len() as u64,
        "{pages:?}"
    );
}

#[test]
fn nothing_is_logged_while_logging_is_off() {
    let mut g = Guest::new();
    let log = with_log(&mut g);
    g.log = None; // LOG_ALL not acked: the frontend hands no log
    g.rx_ctl.borrow_mut().log_addr = Some(g.rx.used);
    let mut q = qp();
    g.post_rx(2048);
    g.send(&frame(100, 1));
    g.run_event(&mut q);
    assert_eq!(g.used(false).len(), 1);
    assert!(logged_pages(&log).is_empty());
}

#[test]
fn rolled_back_mergeable_writes_are_still_logged() {
    let mut g = Guest::new();
    let log = with_log(&mut g);
    let mut q = qp();
    g.data_next = BASE + 0x50000;
    let b0 = g.post_rx(64);
    g.send(&frame(500, 1));
    g.run_event(&mut q);
    assert!(g.used(false).is_empty(), "frame needs more buffers");
    assert!(logged_pages(&log).contains(&((b0 - BASE) >> 12)));
}

#[test]
fn a_buffer_across_two_regions_is_logged_in_both() {
    // Guest memory in two regions: the test memory, and a second mapping
    // right after it (as QEMU sends for RAM split around a hole).
    let mut g = Guest::new();
    let log = with_log(&mut g);
    let mut extra = vec![0u8; 0x4000];
    let second = BASE + 0x100000;
    let mut view = g.mem.view();
    // SAFETY: `extra` outlives the view.
    assert!(unsafe {
        view.add(
            second,
            extra.len() as u64,
            extra.as_mut_ptr(),
            Perm::ReadWrite,
        )
    });
    g.view = Arc::new(view);
    let mut q = qp();
    // One RX buffer whose first 100 bytes are the last of region 1.
    g.data_next = second - 100;
    g.post_rx(2048);
    g.data_next = BASE + 0x60000; // TX data back in region 1
    g.send(&frame(1000, 7));
    g.run_event(&mut q);
    assert_eq!(g.used(false), vec![(0, 1012)]);
    let pages = logged_pages(&log);
    let page = |a: u64| (a - BASE) >> 12;
    assert!(pages.contains(&page(second - 100)), "{pages:?}");
    assert!(pages.contains(&page(second)), "{pages:?}");
    // The bytes really landed in the second region.
    assert_eq!(&extra[..912], &swapped(&frame(1000, 7))[88..]);
}

#[test]
fn rx_into_memory_the_device_may_only_read_stops_the_queue_untouched() {
    // A VDUSE driver maps TX buffers read-only: an RX descriptor pointing
    // there must stop the RX queue, not write where the guest never sees it.
    let mut g = Guest::new();
    let mut ro = vec![0u8; 0x4000];
    let second = BASE + 0x100000;
    let mut view = g.mem.view();
    // SAFETY: `ro` outlives the view.
    assert!(unsafe { view.add(second, ro.len() as u64, ro.as_mut_ptr(), Perm::Read) });
    g.view = Arc::new(view);
    let mut q = qp();
    // A TX frame from the read-only region is fine (a 12-byte header,
    // zeroed, then the frame)...
    let f = frame(200, 3);
    ro[12..12 + f.len()].copy_from_slice(&f);
    g.desc(true, 0, second, (12 + f.len()) as u32, 0, 0);
    g.publish(true, 0);
    // ...but its echo may not land in an RX buffer there.
    g.desc(false, 0, second + 0x1000, 2048, VRING_DESC_F_WRITE, 0);
    g.publish(false, 0);
    g.run_event(&mut q);
    assert_eq!(g.used(true), vec![(0, 0)], "TX read the read-only buffer");
    assert!(matches!(
        g.rx_ctl.borrow().broken,
        Some(ChainError::BadAddress { .. })
    ));
    assert!(g.used(false).is_empty());
    assert!(
        ro[0x1000..0x2000].iter().all(|&b| b == 0),
        "nothing written"
    );
}

#[test]
fn frames_queued_without_a_guest_are_discarded() {
    let mut g = Guest::new();
    let mut q = qp();
    // Frames reach the loopback backend (as if received while no guest was
    // attached), then a new front end connects.
    for i in 0..5 {
        let f = frame(60, i);
        assert!(vfrelay_backends::Segs::of(&[&f], |s| q.backend.tx_frame(s)).unwrap());
    }
    assert_eq!(q.discard_backend_rx(), 5);
    assert_eq!(q.stats.rx_dropped, 5);
    let s = q.shared.snapshot();
    assert_eq!(
        (s.rx_dropped, s.rx_dropped_stale),
        (5, 5),
        "published, by cause"
    );
    g.post_rx(2048);
    g.run_event(&mut q);
    assert!(g.used(false).is_empty(), "nothing stale delivered");
}

/// Known frames of known sizes move the counters by exactly that much.
#[test]
fn counters_follow_the_frames() {
    let mut g = Guest::new();
    let mut q = qp();
    for _ in 0..6 {
        g.post_rx(2048);
    }
    let mut bcast = frame(60, 1);
    bcast[..6].copy_from_slice(&[0xff; 6]);
    let mut mcast = frame(100, 2);
    mcast[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
    for f in [bcast, mcast, frame(64, 3), frame(300, 4), frame(1518, 5)] {
        g.send(&f);
    }
    g.run_event(&mut q);
    // The backend's own counters come with the worker's once-a-second
    // publish (reading them may be a syscall); the rest after every round.
    assert_eq!(q.shared.snapshot().backend_tx_frames, 0);
    q.publish_stats();
    let s = q.shared.snapshot();
    assert_eq!((s.tx_frames, s.rx_frames), (5, 5));
    assert_eq!(s.tx_bytes, 60 + 100 + 64 + 300 + 1518);
    assert_eq!(s.rx_bytes, s.tx_bytes);
    assert_eq!(
        [
            s.tx_size_64,
            s.tx_size_65_127,
            s.tx_size_256_511,
            s.tx_size_1024_1518
        ],
        [2, 1, 1, 1]
    );
    assert_eq!((s.tx_broadcast, s.tx_multicast), (1, 1));
    // The loopback swaps the MACs: what comes back is addressed to the
    // frames' unicast sources.
    assert_eq!((s.rx_broadcast, s.rx_multicast), (0, 0));
    assert_eq!(s.rx_size_64 + s.rx_size_65_127, 3);
    assert!(s.interrupts >= 1, "RX used entries published: {s:?}");
    assert_eq!(s.backend_tx_frames, 5, "the loopback's own count");
    assert_eq!(s.chain_errors, 0);
}

/// A mergeable frame whose second buffer is malformed: the queue stops and
/// the first buffer, already filled, is not published as a frame of its own.
#[test]
fn a_chain_error_mid_frame_publishes_no_part_of_it() {
    let mut g = Guest::new();
    let mut q = qp();
    g.post_rx(64);
    // The next buffer points outside guest memory.
    let i = g.rx.next_desc;
    g.rx.next_desc = i.wrapping_add(1);
    g.desc(false, i, 0xdead_0000, 64, VRING_DESC_F_WRITE, 0);
    g.publish(false, i % QSIZE);
    g.send(&frame(100, 7));
    g.run_event(&mut q);
    assert!(matches!(
        g.rx_ctl.borrow().broken,
        Some(ChainError::BadAddress { .. })
    ));
    assert_eq!(g.used(false), vec![], "a truncated frame was published");
    assert_eq!(q.stats.rx_frames, 0);
}

/// A back end that takes over rings another one ran (restarted after a
/// crash) resumes where the used rings are, whatever base the front end
/// gives: behind them (DPDK virtio-user sends 0 again) or ahead (the dead
/// one took a chain it never used).
#[test]
fn a_restarted_back_end_resumes_at_the_used_ring() {
    // 100 chains in a ring of 64, then the crash.
    for base in [0u16, 101] {
        let mut g = Guest::new();
        let mut q = qp();
        for i in 0..5 {
            for _ in 0..20 {
                g.post_rx(1024);
                g.send(&frame(100, i));
            }
            g.run_event(&mut q);
            assert_eq!((g.used(true).len(), g.used(false).len()), (20, 20));
        }
        for ctl in [&g.rx_ctl, &g.tx_ctl] {
            let mut c = ctl.borrow_mut();
            (c.next_avail, c.next_used) = (base, base);
        }
        let mut q = qp();
        let f = frame(300, 99);
        let buf = g.post_rx(1024);
        g.send(&f);
        g.run_event(&mut q);
        // Chain 100 of each ring (TX: two descriptors a frame), once. (A
        // used index moved backwards reads as some 65,000 new entries.)
        let (tx, rx) = (g.used(true), g.used(false));
        let first = |v: &[(u32, u32)]| (v.len(), v.first().copied());
        assert_eq!(first(&tx), (1, Some((200 % 64, 0))), "base {base}: TX");
        let want = (1, Some((100 % 64, 12 + f.len() as u32)));
        assert_eq!(first(&rx), want, "base {base}: RX");
        assert_eq!(g.mem.read(buf + 12, f.len()), &swapped(&f)[..]);
        for ctl in [&g.rx_ctl, &g.tx_ctl] {
            let c = ctl.borrow();
            assert_eq!((c.next_avail, c.next_used), (101, 101), "base {base}");
            assert!(c.broken.is_none(), "base {base}: {:?}", c.broken);
        }
    }
}

/// `g`'s memory plus `late`: a mapping the frontend learns of only when a
/// ring misses it (VDUSE's bounce map).
fn with_late(g: &mut Guest, late: &mut TestMem) -> Arc<MemView> {
    with_mems(g, &mut [late])
}

/// `g`'s memory plus each of `mems`.
fn with_mems(g: &mut Guest, mems: &mut [&mut TestMem]) -> Arc<MemView> {
    let mut v = g.mem.view();
    for m in mems {
        // SAFETY: the tests keep `m` alive while they use the view.
        assert!(unsafe {
            v.add(
                m.base,
                m.buf.len() as u64,
                m.buf.as_mut_ptr(),
                Perm::ReadWrite,
            )
        });
    }
    Arc::new(v)
}

/// Event-mode rounds as a worker with a miss handler runs them.
fn run_with_miss(
    g: &mut Guest,
    q: &mut QueuePair,
    h: &mut dyn FnMut(&MemView, u64) -> Option<Arc<MemView>>,
) {
    q.defer_misses = true;
    q.sync_features(g.features);
    for _ in 0..16 {
        let mut rx = g.rx_ctl.borrow_mut();
        let mut tx = g.tx_ctl.borrow_mut();
        let n = q.round(&g.view, None, &mut *rx, &mut *tx);
        let changed = q.resolve_misses(&mut g.view, &mut *rx, &mut *tx, h);
        if n == 0 && !changed {
            break;
        }
    }
}

const LATE: u64 = 0x900000;

#[test]
fn a_tx_buffer_outside_the_view_is_looked_up_on_a_miss() {
    let mut g = Guest::new();
    let mut late = TestMem::new(LATE, 0x10000);
    let mut q = qp();
    let rxbuf = g.post_rx(2048);
    let f = frame(300, 3);
    late.write(LATE, &[0; 12]);
    late.write(LATE + 64, &f);
    g.desc(true, 0, LATE, 12, VRING_DESC_F_NEXT, 1);
    g.desc(true, 1, LATE + 64, f.len() as u32, 0, 0);
    g.publish(true, 0);
    let full = with_late(&mut g, &mut late);
    let mut calls = Vec::new();
    run_with_miss(&mut g, &mut q, &mut |cur, addr| {
        calls.push(addr);
        (cur.translate(addr, 1, Perm::Read).is_none()
            && full.translate(addr, 1, Perm::Read).is_some())
        .then(|| full.clone())
    });
    assert_eq!(calls, vec![LATE], "asked once, for the missing address");
    assert_eq!(g.tx_ctl.borrow().broken, None);
    assert_eq!(q.stats.chain_errors, 0);
    assert_eq!(g.used(true), vec![(0, 0)], "the chain used once");
    let used = g.used(false);
    assert_eq!(used.len(), 1);
    assert_eq!(g.mem.read(rxbuf + 12, f.len()), &swapped(&f)[..]);
}

#[test]
fn an_rx_buffer_outside_the_view_is_looked_up_on_a_miss() {
    let mut g = Guest::new();
    let mut late = TestMem::new(LATE, 0x10000);
    let mut q = qp();
    g.desc(false, 0, LATE, 2048, VRING_DESC_F_WRITE, 0);
    g.publish(false, 0);
    g.rx.next_desc = 1;
    let f = frame(500, 9);
    g.send(&f);
    let full = with_late(&mut g, &mut late);
    let mut calls = 0;
    run_with_miss(&mut g, &mut q, &mut |cur, addr| {
        calls += 1;
        (cur.translate(addr, 1, Perm::Read).is_none()
            && full.translate(addr, 1, Perm::Read).is_some())
        .then(|| full.clone())
    });
    assert_eq!(calls, 1);
    assert_eq!(g.rx_ctl.borrow().broken, None);
    assert_eq!(g.used(false), vec![(0, 12 + f.len() as u32)]);
    assert_eq!(late.read(LATE + 12, f.len()), &swapped(&f)[..]);
    assert_eq!(q.stats.rx_frames, 1);
}

#[test]
fn a_miss_the_frontend_cannot_map_stops_the_queue_once() {
    let mut g = Guest::new();
    let mut q = qp();
    g.desc(true, 0, 0xdead_0000, 64, 0, 0);
    g.publish(true, 0);
    let mut calls = 0;
    for _ in 0..3 {
        run_with_miss(&mut g, &mut q, &mut |_, _| {
            calls += 1;
            None
        });
    }
    assert_eq!(calls, 1, "a stopped queue is not looked up again");
    assert!(matches!(
        g.tx_ctl.borrow().broken,
        Some(ChainError::BadAddress {
            addr: 0xdead_0000,
            ..
        })
    ));
    assert_eq!(
        (q.stats.chain_errors, q.shared.snapshot().chain_bad_address),
        (1, 1)
    );
}

/// A lookup that changed the frontend's view without mapping the missing
/// address (it dropped what the kernel no longer has): the worker takes
/// the new view all the same, and the queue stops.
#[test]
fn a_changed_view_without_the_address_is_taken_and_the_queue_stops() {
    let mut g = Guest::new();
    let mut late = TestMem::new(LATE, 0x10000);
    let mut q = qp();
    // Both halves use the late mapping; the frontend then drops it.
    g.view = with_late(&mut g, &mut late);
    g.desc(true, 0, 0xdead_0000, 64, 0, 0);
    g.publish(true, 0);
    let without = Arc::new(g.mem.view());
    let mut calls = 0;
    run_with_miss(&mut g, &mut q, &mut |_, _| {
        calls += 1;
        Some(without.clone())
    });
    assert_eq!(calls, 1);
    assert!(
        g.view.translate(LATE, 1, Perm::Write).is_none(),
        "the worker still maps what the frontend dropped"
    );
    assert!(matches!(
        g.tx_ctl.borrow().broken,
        Some(ChainError::BadAddress {
            addr: 0xdead_0000,
            ..
        })
    ));
}

/// TX and RX both miss in one mapping the frontend learns of late, in the
/// same round (TX runs first: frame A goes to the backend, frame B's chain
/// misses; RX then misses delivering A). The first lookup brings the
/// mapping in, the second finds nothing new, and both rings go on.
#[test]
fn two_rings_missing_in_one_new_mapping_both_go_on() {
    let mut g = Guest::new();
    let mut late = TestMem::new(LATE, 0x10000);
    let mut q = qp();
    let (a, b) = (frame(200, 5), frame(300, 6));
    g.send(&a);
    let i = g.tx.next_desc;
    late.write(LATE, &[0; 12]);
    late.write(LATE + 64, &b);
    g.desc(true, i, LATE, 12, VRING_DESC_F_NEXT, i + 1);
    g.desc(true, i + 1, LATE + 64, b.len() as u32, 0, 0);
    g.publish(true, i);
    g.desc(false, 0, LATE + 0x8000, 2048, VRING_DESC_F_WRITE, 0);
    g.desc(false, 1, LATE + 0x9000, 2048, VRING_DESC_F_WRITE, 0);
    g.publish(false, 0);
    g.publish(false, 1);
    let full = with_late(&mut g, &mut late);
    let mut calls = Vec::new();
    run_with_miss(&mut g, &mut q, &mut |_, addr| {
        calls.push(addr);
        (calls.len() == 1).then(|| full.clone())
    });
    assert_eq!(calls, vec![LATE, LATE + 0x8000], "each ring looked up once");
    assert_eq!(g.tx_ctl.borrow().broken, None);
    assert_eq!(
        g.rx_ctl.borrow().broken,
        None,
        "RX stopped: its lookup found nothing new"
    );
    assert_eq!(q.stats.chain_errors, 0);
    assert_eq!(g.used(true).len(), 2);
    let used = g.used(false);
    assert_eq!(used.len(), 2, "both frames delivered");
    assert_eq!(late.read(LATE + 0x8000 + 12, a.len()), &swapped(&a)[..]);
    assert_eq!(late.read(LATE + 0x9000 + 12, b.len()), &swapped(&b)[..]);
}

/// A TX buffer that runs from a mapping the view has into one the
/// frontend learns of late: the lookup is of the first byte the view
/// lacks (a lookup of the buffer's start would find only what is mapped).
#[test]
fn a_buffer_running_into_a_late_mapping_is_looked_up_where_it_misses() {
    const EARLY: u64 = LATE - 0x10000;
    let mut g = Guest::new();
    let mut early = TestMem::new(EARLY, 0x10000);
    let mut late = TestMem::new(LATE, 0x10000);
    let mut q = qp();
    let rxbuf = g.post_rx(2048);
    let f = frame(400, 7);
    // Header and the first 100 bytes in `early`, the rest in `late`.
    let at = LATE - 112;
    early.write(at, &[0; 12]);
    early.write(at + 12, &f[..100]);
    late.write(LATE, &f[100..]);
    g.desc(true, 0, at, 12 + f.len() as u32, 0, 0);
    g.publish(true, 0);
    g.view = with_late(&mut g, &mut early);
    let full = with_mems(&mut g, &mut [&mut early, &mut late]);
    let mut calls = Vec::new();
    run_with_miss(&mut g, &mut q, &mut |cur, addr| {
        calls.push(addr);
        // As the kernel's table: an entry is found only where it is.
        (addr >= LATE && cur.translate(addr, 1, Perm::Read).is_none()).then(|| full.clone())
    });
    assert_eq!(
        calls,
        vec![LATE],
        "looked up where the buffer leaves the view"
    );
    assert_eq!(g.tx_ctl.borrow().broken, None);
    assert_eq!(g.mem.read(rxbuf + 12, f.len()), &swapped(&f)[..]);
}

#[test]
fn nothing_is_looked_up_while_everything_is_mapped() {
    let mut g = Guest::new();
    let mut q = qp();
    let mut calls = 0;
    for i in 0..40u8 {
        g.post_rx(2048);
        g.send(&frame(100, i));
        run_with_miss(&mut g, &mut q, &mut |_, _| {
            calls += 1;
            None
        });
    }
    assert_eq!(g.used(false).len(), 40);
    assert_eq!(calls, 0);
}
