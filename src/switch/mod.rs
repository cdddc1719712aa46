//! The in-process L2 switch (VALE-style): ports of one switch exchange
//! frames guest buffer to guest buffer, plus an optional uplink (any
//! backend) to reach the outside.
//!
//! A port joins with `--backend switch,name=NAME[,vlan=ID]`. Each of its
//! queue pairs gets a [`SwitchPort`] as its backend: the worker's TX burst
//! hands it the guest's frames, which stay in guest memory until the burst
//! is flushed (see `Backend::tx_frame`). At the flush the port looks the
//! whole burst up, then copies each frame once, straight into each
//! destination's RX ring, taking each destination's lock once for the
//! batch ([`RxHalf::batch`]). A destination without room drops the frame
//! and counts it; a sender never waits for a receiver.
//!
//! Senders share no lock: the MAC table is a seqlocked array
//! ([`table`]), and the list of members is a copy-on-write snapshot each
//! sender re-reads only when a generation counter moved.
//!
//! Lock order, so that no two workers can wait for each other: a thread
//! holds at most one destination (`RxHalf`) lock at a time, and takes the
//! uplink's lock only while holding no destination lock; only the uplink's
//! own receive task holds the uplink's lock while it delivers.
//!
//! A port's frames are delivered to its first queue pair's RX ring (what a
//! guest always runs); its other pairs only send.

pub mod table;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use vfrelay_backends::{Backend, BackendStats, Segs, VNET_HDR_LEN};

use crate::dataplane::worker::Task;
use crate::dataplane::{RxHalf, SharedRx, BURST};
use crate::net;
use table::{MacTable, UPLINK};

/// Per-frame verdicts besides a member number.
const FLOOD: u16 = u16::MAX - 1;
const DROP: u16 = u16::MAX - 2;
/// Member numbers stay below the verdicts.
const MAX_MEMBERS: usize = DROP as usize;
// A burst's frames are tracked as bits of a u64 (`flush_burst`).
const _: () = assert!(BURST <= 64);

const ETH_HLEN: usize = 14;
const TPID_8021Q: [u8; 2] = [0x81, 0x00];
const TPID_8021AD: [u8; 2] = [0x88, 0xa8];

/// Counters a member's senders keep (relaxed adds, once per batch).
#[derive(Default)]
pub struct Counters {
    /// Frames sent to one known destination.
    pub unicast: AtomicU64,
    /// Broadcast, multicast and unknown unicast frames, sent to every
    /// other port of the VLAN (counted once each).
    pub flooded: AtomicU64,
    /// Frames dropped at the sender: too short, tagged on an access port,
    /// or addressed to a MAC learned on the sending port itself.
    pub dropped: AtomicU64,
}

impl Counters {
    fn add(&self, unicast: u64, flooded: u64, dropped: u64) {
        for (c, n) in [
            (&self.unicast, unicast),
            (&self.flooded, flooded),
            (&self.dropped, dropped),
        ] {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    fn json(&self) -> Value {
        json!({
            "unicast": self.unicast.load(Ordering::Relaxed),
            "flooded": self.flooded.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
        })
    }
}

/// A port of the switch as senders see it.
pub struct Member {
    pub name: String,
    /// Access VLAN; 0: untagged.
    pub vlan: u16,
    rx: SharedRx,
    counters: Counters,
}

/// The members, indexed by member number (a MAC table value).
#[derive(Default)]
struct View {
    members: Vec<Option<Arc<Member>>>,
}

struct UplinkInner {
    backend: Box<dyn Backend>,
    /// Segments of the frame being sent (tag or header inserted).
    scratch: Vec<libc::iovec>,
}

// SAFETY: `scratch` holds pointers only while one `send` runs, under the
// lock; the backend is Send.
unsafe impl Send for UplinkInner {}

/// A backend attached to the switch: frames for unknown or outside MACs go
/// out of it, tagged with their port's VLAN; what it receives is switched
/// to the ports (by the tag's VLAN, untagged to VLAN 0).
pub struct Uplink {
    spec: String,
    inner: Mutex<UplinkInner>,
    vnet: bool,
    fd: Option<RawFd>,
    counters: Counters,
    /// Frames received and switched to ports, and dropped on the way in.
    rx_frames: AtomicU64,
    rx_dropped: AtomicU64,
}

pub struct Switch {
    pub name: String,
    table: MacTable,
    epoch: Instant,
    /// Bumped whenever `view` changes: a sender compares it once a batch.
    gen: AtomicU64,
    view: Mutex<Arc<View>>,
    uplink: Option<Uplink>,
}

impl Switch {
    /// A switch, with `uplink` (already opened from `spec`) if given.
    pub fn new(name: &str, uplink: Option<(String, Box<dyn Backend>)>) -> Arc<Switch> {
        let uplink = uplink.map(|(spec, backend)| Uplink {
            spec,
            vnet: backend.vnet_hdr(),
            fd: backend.poll_fd(),
            inner: Mutex::new(UplinkInner {
                backend,
                scratch: Vec::with_capacity(64),
            }),
            counters: Counters::default(),
            rx_frames: AtomicU64::new(0),
            rx_dropped: AtomicU64::new(0),
        });
        Arc::new(Switch {
            name: name.to_string(),
            table: MacTable::default(),
            epoch: Instant::now(),
            gen: AtomicU64::new(0),
            view: Mutex::new(Arc::new(View::default())),
            uplink,
        })
    }

    /// The learning clock: seconds since the switch was made.
    fn now(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    fn view(&self) -> Arc<View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn change(&self, f: impl FnOnce(&mut Vec<Option<Arc<Member>>>)) {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let mut members = v.members.clone();
        f(&mut members);
        *v = Arc::new(View { members });
        self.gen.fetch_add(1, Ordering::Release);
    }

    /// Add a port whose frames arrive at `rx`; its member number.
    pub fn join(&self, name: &str, vlan: u16, rx: SharedRx) -> Result<u16, String> {
        let mut id = None;
        self.change(|m| {
            let free = m.iter().position(|x| x.is_none()).unwrap_or(m.len());
            if free >= MAX_MEMBERS {
                return;
            }
            let member = Some(Arc::new(Member {
                name: name.to_string(),
                vlan,
                rx,
                counters: Counters::default(),
            }));
            if free == m.len() {
                m.push(member);
            } else {
                m[free] = member;
            }
            id = Some(free as u16);
        });
        id.ok_or_else(|| format!("switch '{}' is full", self.name))
    }

    /// The port left: nothing is sent to it any more (a sender that still
    /// holds the old member list delivers into an RX ring the port's
    /// removal stops, so the frame is dropped, never written anywhere).
    pub fn leave(&self, id: u16) {
        self.change(|m| {
            if let Some(x) = m.get_mut(usize::from(id)) {
                *x = None;
            }
        });
        self.forget(id);
    }

    /// Forget what was learned on member number `id` (after its queue
    /// pairs stopped sending).
    pub fn forget(&self, id: u16) {
        self.table.forget_port(id);
    }

    pub fn has_uplink(&self) -> bool {
        self.uplink.is_some()
    }

    pub fn json(&self) -> Value {
        let view = self.view();
        let name_of = |p: u16| -> String {
            if p == UPLINK {
                return "uplink".into();
            }
            view.members
                .get(usize::from(p))
                .and_then(|m| m.as_ref())
                .map_or_else(|| "?".into(), |m| m.name.clone())
        };
        let macs: Vec<Value> = self
            .table
            .entries(self.now())
            .into_iter()
            .map(|l| {
                json!({
                    "mac": net::format_mac(&l.mac),
                    "vlan": l.vlan,
                    "port": name_of(l.port),
                    "age": l.age,
                })
            })
            .collect();
        let ports: Vec<Value> = view
            .members
            .iter()
            .flatten()
            .map(|m| {
                let mut c = m.counters.json();
                c["name"] = json!(m.name);
                c["vlan"] = json!(m.vlan);
                c
            })
            .collect();
        let uplink = self.uplink.as_ref().map(|u| {
            let b = u
                .inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .backend
                .stats();
            let mut c = u.counters.json();
            c["spec"] = json!(u.spec);
            c["rx_frames"] = json!(u.rx_frames.load(Ordering::Relaxed));
            c["rx_dropped"] = json!(u.rx_dropped.load(Ordering::Relaxed));
            c["backend"] = json!({
                "rx_frames": b.rx_frames, "tx_frames": b.tx_frames,
                "rx_dropped": b.rx_dropped, "tx_dropped": b.tx_dropped,
            });
            c
        });
        json!({ "name": self.name, "uplink": uplink, "ports": ports, "macs": macs })
    }
}

/// The header fields a lookup needs: (destination, source, tagged).
fn parse_eth(h: &[u8]) -> ([u8; 6], [u8; 6], bool) {
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&h[..6]);
    src.copy_from_slice(&h[6..12]);
    let tpid = [h[12], h[13]];
    (dst, src, tpid == TPID_8021Q || tpid == TPID_8021AD)
}

fn is_group(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

/// A sender's cached copy of the member list.
struct Cached {
    gen: u64,
    view: Arc<View>,
}

impl Cached {
    fn new(sw: &Switch) -> Self {
        let gen = sw.gen.load(Ordering::Acquire);
        Cached {
            gen,
            view: sw.view(),
        }
    }

    /// One load per batch; the lock only after the list changed.
    fn refresh(&mut self, sw: &Switch) {
        let g = sw.gen.load(Ordering::Acquire);
        if g != self.gen {
            self.gen = g;
            self.view = sw.view();
        }
    }
}

/// One frame of the burst being switched.
#[derive(Clone, Copy)]
struct Frame {
    start: u32,
    segs: u32,
    len: u32,
    dest: u16,
}

/// The backend of one queue pair of a switch port: switches the frames its
/// guest sends.
pub struct SwitchPort {
    sw: Arc<Switch>,
    me: u16,
    vlan: u16,
    queue: usize,
    cached: Cached,
    frames: Vec<Frame>,
    /// Segments of `frames`, valid until the flush (Backend::tx_frame).
    iovs: Vec<libc::iovec>,
    /// The source MAC last learned, and when: a burst from one guest
    /// usually has one, learned once.
    learned: Option<([u8; 6], u32)>,
    stats: BackendStats,
}

// SAFETY: `iovs` holds pointers only between a tx_frame and the flush that
// follows on the same thread; nothing else in it is tied to a thread.
unsafe impl Send for SwitchPort {}

impl SwitchPort {
    pub fn new(sw: Arc<Switch>, me: u16, vlan: u16, queue: usize) -> Self {
        SwitchPort {
            cached: Cached::new(&sw),
            sw,
            me,
            vlan,
            queue,
            frames: Vec::with_capacity(BURST),
            iovs: Vec::with_capacity(BURST * 4),
            learned: None,
            stats: BackendStats::default(),
        }
    }

    /// The segments of frame `f`.
    fn segs(&self, f: &Frame) -> Segs<'_> {
        let s = f.start as usize;
        // SAFETY: tx_frame copied these iovecs from Segs whose bytes stay
        // readable until the flush, which is running now.
        unsafe { Segs::new(&self.iovs[s..s + f.segs as usize]) }
    }

    /// Decide where each frame goes, learning source addresses.
    fn classify(&mut self, now: u32) {
        // A burst usually goes to one MAC: looked up once.
        let mut last: Option<([u8; 6], u16)> = None;
        for i in 0..self.frames.len() {
            let f = self.frames[i];
            let dest = if let Some(h) = self.segs(&f).head::<ETH_HLEN>() {
                let (dst, src, tagged) = parse_eth(&h);
                if tagged {
                    // Member ports are access ports: a guest does not pick
                    // its VLAN.
                    DROP
                } else {
                    if !is_group(&src) && self.learned != Some((src, now)) {
                        self.sw.table.learn(self.vlan, &src, self.me, now);
                        self.learned = Some((src, now));
                    }
                    if is_group(&dst) {
                        FLOOD
                    } else if let Some((_, d)) = last.filter(|(m, _)| *m == dst) {
                        d
                    } else {
                        let d = match self.sw.table.lookup(self.vlan, &dst, now) {
                            Some(p) if p == self.me => DROP,
                            Some(p) => p,
                            None => FLOOD,
                        };
                        last = Some((dst, d));
                        d
                    }
                }
            } else {
                DROP
            };
            self.frames[i].dest = dest;
        }
    }

    /// Deliver every frame for member `id` (and, with `flood`, every
    /// flooded one) into its RX ring, in order, under one lock.
    fn deliver_to(&self, m: &Member, id: u16, flood: bool) {
        let mut batch = RxHalf::batch(&m.rx);
        for f in &self.frames {
            if f.dest == id || (flood && f.dest == FLOOD) {
                batch.push(self.segs(f));
            }
        }
    }

    fn flush_burst(&mut self) {
        if self.frames.is_empty() {
            return;
        }
        self.cached.refresh(&self.sw);
        let now = self.sw.now();
        self.classify(now);
        let view = self.cached.view.clone();
        // A unicast destination that left, or (a table entry older than a
        // port number's reuse) is on another VLAN: dropped, and counted so.
        for f in self.frames.iter_mut() {
            if f.dest < DROP {
                let ok = matches!(view.members.get(usize::from(f.dest)),
                    Some(Some(m)) if m.vlan == self.vlan);
                if !ok {
                    f.dest = DROP;
                }
            }
        }
        let any_flood = self.frames.iter().any(|f| f.dest == FLOOD);
        if any_flood {
            // Every member of the VLAN gets the flooded frames plus its own,
            // in the order they were sent.
            for (id, m) in view.members.iter().enumerate() {
                let id = id as u16;
                match m {
                    Some(m) if id != self.me && m.vlan == self.vlan => {
                        self.deliver_to(m, id, true);
                    }
                    _ => {}
                }
            }
        } else {
            // Usually one destination: each distinct one once.
            let mut done: u64 = 0;
            for i in 0..self.frames.len() {
                let d = self.frames[i].dest;
                if done & (1 << i) != 0 || d == DROP || d == UPLINK {
                    continue;
                }
                for (j, f) in self.frames.iter().enumerate().skip(i) {
                    if f.dest == d {
                        done |= 1 << j;
                    }
                }
                if let Some(Some(m)) = view.members.get(usize::from(d)) {
                    self.deliver_to(m, d, false);
                }
            }
        }
        if let Some(up) = &self.sw.uplink {
            let out = self
                .frames
                .iter()
                .filter(|f| f.dest == UPLINK || f.dest == FLOOD)
                .map(|f| self.segs(f));
            up.send(out, self.vlan);
        }
        let (mut uni, mut flood, mut dropped, mut bytes) = (0, 0, 0, 0);
        for f in &self.frames {
            match f.dest {
                DROP => dropped += 1,
                FLOOD => flood += 1,
                _ => uni += 1,
            }
            if f.dest != DROP {
                bytes += u64::from(f.len);
            }
        }
        self.stats.tx_frames += uni + flood;
        self.stats.tx_bytes += bytes;
        self.stats.tx_dropped += dropped;
        if let Some(Some(m)) = view.members.get(usize::from(self.me)) {
            m.counters.add(uni, flood, dropped);
        }
        self.frames.clear();
        self.iovs.clear();
    }
}

impl Backend for SwitchPort {
    fn describe(&self) -> String {
        format!("switch {} q{}", self.sw.name, self.queue)
    }

    fn tx_frame(&mut self, segs: Segs<'_>) -> vfrelay_backends::Result<bool> {
        if self.frames.len() == BURST {
            // Earlier frames are still readable: their flush has not come.
            self.flush_burst();
        }
        let len = segs.bytes();
        let iov = segs.into_iovecs();
        self.frames.push(Frame {
            start: self.iovs.len() as u32,
            segs: iov.len() as u32,
            len: len as u32,
            dest: DROP,
        });
        match iov {
            [one] => self.iovs.push(*one),
            _ => self.iovs.extend_from_slice(iov),
        }
        Ok(true)
    }

    fn tx_flush(&mut self) -> vfrelay_backends::Result<()> {
        self.flush_burst();
        Ok(())
    }

    fn rx_burst(
        &mut self,
        _max: usize,
        _sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> vfrelay_backends::Result<usize> {
        // Frames for this port are written into its RX ring by senders.
        Ok(0)
    }

    fn stats(&self) -> BackendStats {
        self.stats
    }
}

static ZERO_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

impl Uplink {
    /// Send `frames` from a port on `vlan` out of the uplink (tagged when
    /// `vlan` is not 0), under one lock. A full backend drops (counted).
    fn send<'a>(&self, frames: impl Iterator<Item = Segs<'a>>, vlan: u16) {
        let mut frames = frames.peekable();
        if frames.peek().is_none() {
            return;
        }
        let tag = [
            TPID_8021Q[0],
            TPID_8021Q[1],
            (vlan >> 8) as u8 & 0x0f,
            vlan as u8,
        ];
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let UplinkInner { backend, scratch } = &mut *inner;
        let (mut sent, mut dropped) = (0, 0);
        for segs in frames {
            scratch.clear();
            if self.vnet {
                scratch.push(iovec(&ZERO_HDR));
            }
            if vlan == 0 {
                scratch.extend_from_slice(segs.into_iovecs());
            } else {
                split_with(segs.into_iovecs(), 12, &tag, scratch);
            }
            // SAFETY: the frame's segments are readable until the caller's
            // flush ends, after this call; `tag` and ZERO_HDR outlive the
            // flush below.
            match backend.tx_frame(unsafe { Segs::new(scratch) }) {
                Ok(true) => sent += 1,
                _ => dropped += 1,
            }
        }
        if let Err(e) = backend.tx_flush() {
            log::debug!("{}: uplink flush: {e}", backend.describe());
        }
        self.counters.add(sent, 0, dropped);
    }
}

fn iovec(b: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr() as *mut libc::c_void,
        iov_len: b.len(),
    }
}

/// `src` with `insert` placed after its first `at` bytes, into `out`.
fn split_with(src: &[libc::iovec], at: usize, insert: &[u8], out: &mut Vec<libc::iovec>) {
    let mut left = at;
    let mut inserted = false;
    for v in src {
        if !inserted && left < v.iov_len {
            if left > 0 {
                out.push(libc::iovec {
                    iov_base: v.iov_base,
                    iov_len: left,
                });
            }
            out.push(iovec(insert));
            // SAFETY: left < iov_len: inside the segment.
            let rest = unsafe { (v.iov_base as *mut u8).add(left) };
            out.push(libc::iovec {
                iov_base: rest as *mut libc::c_void,
                iov_len: v.iov_len - left,
            });
            inserted = true;
        } else {
            out.push(*v);
            if !inserted {
                left -= v.iov_len;
            }
        }
    }
    if !inserted {
        out.push(iovec(insert));
    }
}

/// Receives from a switch's uplink and switches what arrives, on a worker.
pub struct UplinkTask {
    sw: Arc<Switch>,
    cached: Cached,
}

impl UplinkTask {
    pub fn new(sw: Arc<Switch>) -> Self {
        UplinkTask {
            cached: Cached::new(&sw),
            sw,
        }
    }
}

impl Task for UplinkTask {
    fn round(&mut self) -> usize {
        let Some(up) = &self.sw.uplink else {
            return 0;
        };
        self.cached.refresh(&self.sw);
        let view = &self.cached.view;
        let table = &self.sw.table;
        let now = self.sw.now();
        let mut inner = up.inner.lock().unwrap_or_else(|e| e.into_inner());
        // The destination of the last frame, still locked: frames from the
        // wire to one guest usually come in runs.
        let mut cur: Option<(u16, crate::dataplane::RxBatch<'_>)> = None;
        let (mut switched, mut dropped) = (0u64, 0u64);
        let mut sink = |frame: &[u8]| -> bool {
            let f = if up.vnet {
                frame.get(VNET_HDR_LEN..).unwrap_or(&[])
            } else {
                frame
            };
            if f.len() < ETH_HLEN {
                dropped += 1;
                return true;
            }
            let mut h = [0u8; ETH_HLEN + 4];
            let k = f.len().min(h.len());
            h[..k].copy_from_slice(&f[..k]);
            let (dst, src, tagged) = parse_eth(&h);
            let (vlan, parts): (u16, [&[u8]; 2]) = if tagged {
                if f.len() < ETH_HLEN + 4 || [h[12], h[13]] != TPID_8021Q {
                    dropped += 1;
                    return true;
                }
                let vid = u16::from_be_bytes([h[14], h[15]]) & 0x0fff;
                (vid, [&f[..12], &f[16..]])
            } else {
                (0, [f, &[]])
            };
            if !is_group(&src) {
                table.learn(vlan, &src, UPLINK, now);
            }
            let iov = [iovec(parts[0]), iovec(parts[1])];
            // SAFETY: both parts borrow `frame` for this call, and push
            // copies them before it returns.
            let segs = unsafe { Segs::new(&iov[..if parts[1].is_empty() { 1 } else { 2 }]) };
            let dest = if is_group(&dst) {
                FLOOD
            } else {
                match table.lookup(vlan, &dst, now) {
                    Some(UPLINK) => DROP,
                    Some(p) => p,
                    None => FLOOD,
                }
            };
            match dest {
                DROP => dropped += 1,
                FLOOD => {
                    cur = None;
                    for m in view.members.iter().flatten().filter(|m| m.vlan == vlan) {
                        RxHalf::batch(&m.rx).push(segs);
                    }
                    switched += 1;
                }
                p => match view.members.get(usize::from(p)).and_then(|m| m.as_ref()) {
                    Some(m) if m.vlan == vlan => {
                        if cur.as_ref().map(|c| c.0) != Some(p) {
                            // One destination lock at a time.
                            drop(cur.take());
                            cur = Some((p, RxHalf::batch(&m.rx)));
                        }
                        if let Some((_, b)) = cur.as_mut() {
                            b.push(segs);
                        }
                        switched += 1;
                    }
                    _ => dropped += 1,
                },
            }
            true
        };
        let n = match inner.backend.rx_burst(BURST, &mut sink) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("{}: uplink rx: {e}", inner.backend.describe());
                0
            }
        };
        drop(cur);
        if switched > 0 {
            up.rx_frames.fetch_add(switched, Ordering::Relaxed);
        }
        if dropped > 0 {
            up.rx_dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        n
    }

    fn poll_fd(&self) -> Option<RawFd> {
        self.sw.uplink.as_ref().and_then(|u| u.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(iov: &[libc::iovec]) -> Vec<u8> {
        let mut out = Vec::new();
        for v in iov {
            // SAFETY: test iovecs over live arrays.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        out
    }

    #[test]
    fn a_tag_goes_after_the_addresses_wherever_segments_split() {
        let frame: Vec<u8> = (0..40u8).collect();
        let tag = [0x81, 0, 0, 10];
        let mut want = frame[..12].to_vec();
        want.extend_from_slice(&tag);
        want.extend_from_slice(&frame[12..]);
        for cut in [1, 6, 11, 12, 13, 30] {
            let parts = [iovec(&frame[..cut]), iovec(&frame[cut..])];
            let mut out = Vec::new();
            split_with(&parts, 12, &tag, &mut out);
            assert_eq!(bytes_of(&out), want, "split at {cut}");
        }
    }
}
