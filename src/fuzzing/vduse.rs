//! Fuzz target `vduse`: the VDUSE request handler and its IOTLB over a
//! fake device ([`FakeDevice`]: the kernel's IOTLB as memfds, queue infos,
//! features), driven by an arbitrary sequence of
//! - requests as the kernel writes them, through the real parse, handler
//!   and encoder ([`Shared::answer`]): GET_VQ_STATE of any queue,
//!   SET_STATUS with any bits (DRIVER_OK starts the rings on the real
//!   worker, 0 resets), UPDATE_IOTLB of any range, unknown types, short
//!   messages, junk in the reserved bytes and past the fields;
//! - changes to the IOTLB the kernel would report: entries of any start,
//!   last, offset and permission (the bounce map among them), backed by
//!   memfds of any size (some shorter than the entry claims), overlapping
//!   or with holes, IOVA 0 mapped or not; entries removed, the bus driver
//!   switched (a vhost-vdpa user's maps after a reset: IOVA 0 is no longer
//!   the bounce map), the device broken (every ioctl fails);
//! - lookups of any IOVA, length and direction as a ring's miss does them:
//!   in the worker's view, else through the miss handler, on the worker
//!   between its bursts (the rings it runs write guest memory too);
//! - queue infos changed for the next DRIVER_OK, guest memory written, and
//!   a take-over of the device as after a crash ([`Shared::resume`]).
//!
//! Checked: no panic or crash (a write through a read-only mapping is a
//! SIGSEGV, a read past a file SIGBUS); every translation points into the
//! mapping of an entry the kernel has (or had, and has not yet said is
//! gone with an UPDATE_IOTLB over it or a reset) that covers the whole
//! range with the permission asked, at that entry's file offset (a marker
//! written through the file is read back through the pointer, or the other
//! way round), or into our bounce memory at that IOVA for the bounce map;
//! every response echoes the request's id, says OK or FAILED, keeps the
//! reserved bytes zero, carries a queue state only for GET_VQ_STATE of a
//! queue there is (and echoes its index), and FAILED what cannot be
//! parsed; no fd and no memfd mapping is left once the device is gone.
//!
//! One worker (event mode) and its queue pair are made once and reused:
//! each input is a device of its own (a [`Shared`] over a fresh fake),
//! released as a port closing releases it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use super::In;
use crate::dataplane::mem::Perm;
use crate::dataplane::worker::{QpKey, QpRef, Slot, WorkerHandle};
use crate::dataplane::QueuePair;
use crate::frontend::vduse::fake::{memfd, FakeDevice};
use crate::frontend::vduse::uapi::{self, IotlbEntry, VqInfo, VqStateUnion};
use crate::frontend::vduse::{state, Shared};
use vfrelay_backends::loopback::Loopback;

const PAGE: u64 = 4096;
/// Operations per input.
pub(crate) const MAX_OPS: usize = 128;
/// Memfds per input; the largest one.
const MAX_FILES: usize = 8;
const MAX_FILE: u64 = 1 << 20;
/// The device's queue size (what CREATE_DEV said; a driver's larger ring
/// is refused at DRIVER_OK).
const QSIZE: u16 = 256;

/// Operation codes (the first byte of each, modulo [`OPS`]).
pub(crate) mod op {
    pub const REQUEST: u8 = 0;
    pub const ADD_ENTRY: u8 = 1;
    pub const REMOVE_ENTRY: u8 = 2;
    pub const LOOKUP: u8 = 3;
    pub const WRITE_FILE: u8 = 4;
    pub const SET_VQ: u8 = 5;
    pub const BROKEN: u8 = 6;
    pub const REBIND: u8 = 7;
    pub const TAKE_OVER: u8 = 8;
}
const OPS: u8 = 9;

struct Fixture {
    qp: QpRef,
    store: state::Store,
}

/// The worker and its queue pair, made once; inputs take turns.
fn fixture() -> &'static Mutex<Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let worker = Arc::new(WorkerHandle::spawn(0, None, false).expect("worker"));
        let key = QpKey { port: 0, index: 0 };
        let qp = QueuePair::new(0, Box::new(Loopback::new(0)));
        let qp = QpRef::add(worker, Box::new(Slot::new(key, qp)));
        // The status records SET_STATUS writes.
        let store = state::Store::at(
            std::env::temp_dir().join(format!("vfrelay-fuzz-vduse-{}", std::process::id())),
        );
        Mutex::new(Fixture { qp, store })
    })
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Mappings of memfds (the IOTLB's; other mappings come and go with the
/// allocator).
fn memfd_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().filter(|l| l.contains("/memfd:")).count())
        .unwrap_or(0)
}

/// An IOVA: mostly whole pages low down, so entries overlap and leave
/// holes; sometimes inside a page or anywhere.
fn iova(u: &mut In) -> u64 {
    match u.u8() {
        k @ 0..=0x7f => k as u64 * PAGE,
        k @ 0x80..=0xbf => (k & 0x3f) as u64 * PAGE + u.u16() as u64 % PAGE,
        _ => u.u64(),
    }
}

fn vq_info(u: &mut In, index: u32) -> VqInfo {
    let num = match u.u8() {
        k @ 0..=0xef => 1 << (k % 10),
        _ => u.u32(),
    };
    let (desc_addr, driver_addr, device_addr) = (iova(u), iova(u), iova(u));
    let avail = u.u16();
    VqInfo {
        index,
        num,
        desc_addr,
        driver_addr,
        device_addr,
        state: VqStateUnion {
            words: [avail, 0, 0, 0],
        },
        ready: u.u8() & 1,
    }
}

/// An entry as the kernel might report it (or not: `last` before
/// `start`, permissions that do not exist); true for the bounce map.
fn entry(u: &mut In, bounce: Option<u64>) -> (IotlbEntry, bool) {
    let k = u.u8();
    if let (0xff, Some(b)) = (k, bounce) {
        // The bounce map: the whole range from 0, read-write.
        let e = IotlbEntry {
            offset: 0,
            start: 0,
            last: b - 1,
            perm: uapi::ACCESS_RW,
        };
        return (e, true);
    }
    let start = iova(u);
    let last = match u.u8() {
        l @ 0..=0xef => start.saturating_add((l as u64 % 16 + 1) * PAGE - 1),
        0xf0..=0xf7 => start.saturating_add(u.u16() as u64),
        _ => u.u64(),
    };
    let offset = match u.u8() {
        o @ 0..=0xef => (o as u64 % 32) * PAGE,
        0xf0..=0xf7 => u.u16() as u64,
        _ => u.u64(),
    };
    let perm = match u.u8() {
        p @ 0..=0xef => p % 3 + 1,
        p => p & 7,
    };
    let e = IotlbEntry {
        offset,
        start,
        last,
        perm,
    };
    (e, false)
}

/// One of the input's memfds, or a new one of any size.
fn file(u: &mut In, files: &mut Vec<Arc<File>>) -> Arc<File> {
    let i = u.u8() as usize % MAX_FILES;
    if i < files.len() {
        return files[i].clone();
    }
    let size = match u.u8() {
        s @ 0..=0xef => (s as u64 % 33) * PAGE,
        _ => u.u32() as u64 % MAX_FILE,
    };
    let f = Arc::new(memfd(size));
    files.push(f.clone());
    f
}

/// An entry the kernel has or had.
#[derive(Clone)]
struct Known {
    e: IotlbEntry,
    file: Arc<File>,
    /// The bounce map (what GET_INFO says of it when it is added): may be
    /// served from our memory instead of `file`.
    bounce: bool,
}

impl Known {
    fn covers(&self, iova: u64, end: u64, need: Perm) -> bool {
        let perm = match self.e.perm {
            uapi::ACCESS_RO => Perm::Read,
            uapi::ACCESS_WO => Perm::Write,
            uapi::ACCESS_RW => Perm::ReadWrite,
            _ => return false,
        };
        self.e.start <= iova && end <= self.e.last && perm.allows(need)
    }
}

/// What the table may legitimately translate through.
#[derive(Default)]
struct Model {
    /// In the fake's order.
    current: Vec<Known>,
    /// Removed from the fake, not yet covered by an UPDATE_IOTLB or reset:
    /// the table may still map them, as it may in front of the kernel.
    stale: Vec<Known>,
}

impl Model {
    fn forget_stale(&mut self, start: u64, last: u64) {
        self.stale
            .retain(|k| !(k.e.start <= last && k.e.last >= start));
    }
}

/// A request message, its length, and what was asked.
struct Msg {
    buf: [u8; uapi::MSG_SIZE],
    len: usize,
    kind: u32,
    id: u32,
    /// GET_VQ_STATE's queue.
    index: u32,
    /// UPDATE_IOTLB's range.
    range: (u64, u64),
}

fn request(u: &mut In, model: &Model) -> Msg {
    let mut b = [0u8; uapi::MSG_SIZE];
    let kind = match u.u8() {
        k @ 0..=0xef => k as u32 % 4,
        _ => u.u32(),
    };
    let id = u.u32();
    b[0..4].copy_from_slice(&kind.to_le_bytes());
    b[4..8].copy_from_slice(&id.to_le_bytes());
    if u.u8() >= 0xf0 {
        let r = u.bytes(16);
        b[uapi::MSG_RESERVED_OFFSET..][..r.len()].copy_from_slice(r);
    }
    let p = uapi::MSG_UNION_OFFSET;
    let (mut index, mut range) = (0, (0, 0));
    match kind {
        uapi::REQ_GET_VQ_STATE => {
            index = match u.u8() {
                k @ 0..=0xef => k as u32 % 3,
                _ => u.u32(),
            };
            b[p..p + 4].copy_from_slice(&index.to_le_bytes());
        }
        uapi::REQ_SET_STATUS => {
            b[p] = match u.u8() {
                k @ 0..=0x7f => [0, 1, 3, 0xb, 0xf][k as usize % 5],
                _ => u.u8(),
            };
        }
        uapi::REQ_UPDATE_IOTLB => {
            let all: Vec<&Known> = model.current.iter().chain(&model.stale).collect();
            range = match u.u8() {
                k @ 0..=0x7f if !all.is_empty() => {
                    let e = &all[k as usize % all.len()].e;
                    (e.start, e.last)
                }
                0x80..=0xbf => (0, u64::MAX),
                0xc0..=0xef => {
                    let s = iova(u);
                    (s, s.saturating_add(u.u32() as u64))
                }
                _ => (u.u64(), u.u64()),
            };
            b[p..p + 8].copy_from_slice(&range.0.to_le_bytes());
            b[p + 8..p + 16].copy_from_slice(&range.1.to_le_bytes());
        }
        _ => {}
    }
    // Junk past the fields.
    if u.u8() >= 0xf0 {
        let at = p + 16 + u.u8() as usize % (uapi::MSG_SIZE - p - 16);
        let r = u.bytes(uapi::MSG_SIZE - at);
        b[at..at + r.len()].copy_from_slice(r);
    }
    let len = match u.u8() {
        0..=0xef => uapi::MSG_SIZE,
        _ => u.u8() as usize % (uapi::MSG_SIZE + 1),
    };
    Msg {
        buf: b,
        len,
        kind,
        id,
        index,
        range,
    }
}

fn check_response(m: &Msg, resp: Option<[u8; uapi::MSG_SIZE]>) {
    if m.len < 8 {
        assert!(resp.is_none(), "an answer to a request without an id");
        return;
    }
    let r = resp.expect("no answer to a request with an id");
    let word = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().unwrap());
    assert_eq!(word(0), m.id, "response id");
    let result = word(4);
    assert!(
        result == uapi::RESULT_OK || result == uapi::RESULT_FAILED,
        "result {result}"
    );
    let p = uapi::MSG_UNION_OFFSET;
    assert!(
        r[uapi::MSG_RESERVED_OFFSET..p].iter().all(|&b| b == 0),
        "reserved bytes set"
    );
    let parsed = m.len == uapi::MSG_SIZE
        && match m.kind {
            uapi::REQ_GET_VQ_STATE | uapi::REQ_SET_STATUS => true,
            uapi::REQ_UPDATE_IOTLB => m.range.0 <= m.range.1,
            _ => false,
        };
    if !parsed {
        assert_eq!(result, uapi::RESULT_FAILED, "OK to a malformed request");
    }
    let vq_state = parsed && m.kind == uapi::REQ_GET_VQ_STATE && result == uapi::RESULT_OK;
    if vq_state {
        assert!(m.index < 2, "OK for queue {}", m.index);
        assert_eq!(word(p), m.index, "GET_VQ_STATE index");
        assert!(r[p + 6..].iter().all(|&b| b == 0), "bytes past the state");
    } else {
        assert!(
            r[p..].iter().all(|&b| b == 0),
            "payload in a response without a queue state"
        );
    }
    if parsed && m.kind == uapi::REQ_GET_VQ_STATE && m.index >= 2 {
        assert_eq!(result, uapi::RESULT_FAILED, "OK for queue {}", m.index);
    }
}

/// Whether `p` (translated for `need`, `n` bytes checked) is one of
/// `files`' places (a file at an offset): a marker written on one side is
/// read on the other. Runs on the worker, between its bursts: its rings
/// write guest memory.
fn locate(p: *mut u8, need: Perm, n: usize, files: &[(Arc<File>, u64)], seq: u64) -> bool {
    let marker = (seq | 0x8080_8080_8080_8080).to_le_bytes();
    let m = &marker[..n];
    match need {
        Perm::Write => {
            for (i, b) in m.iter().enumerate() {
                // SAFETY: the view said [p, p+len) is writable memory it
                // maps (n <= len); the caller holds the view.
                unsafe { std::ptr::write_volatile(p.add(i), *b) };
            }
            files.iter().any(|(f, off)| {
                let mut got = [0u8; 8];
                f.read_at(&mut got[..n], *off).is_ok_and(|k| k == n) && &got[..n] == m
            })
        }
        _ => files.iter().any(|(f, off)| {
            if f.write_at(m, *off).ok() != Some(n) {
                return false;
            }
            // SAFETY: the view said [p, p+len) is readable memory it maps
            // (n <= len); the caller holds the view.
            let got: Vec<u8> = (0..n)
                .map(|i| unsafe { std::ptr::read_volatile(p.add(i)) })
                .collect();
            got == m
        }),
    }
}

fn lookup(u: &mut In, sh: &Arc<Shared<FakeDevice>>, qp: &QpRef, model: &Model, seq: u64) {
    let all: Vec<&Known> = model.current.iter().chain(&model.stale).collect();
    let addr = match u.u8() {
        k @ 0..=0xbf if !all.is_empty() => {
            let e = &all[k as usize % all.len()].e;
            let span = e.last.wrapping_sub(e.start).saturating_add(1).max(1);
            e.start.wrapping_add(u.u32() as u64 % span)
        }
        _ => iova(u),
    };
    let len = match u.u8() {
        l @ 0..=0xef => l as u64 % 64 + 1,
        0xf0..=0xf7 => u.u16() as u64 + 1,
        _ => u.u64().max(1),
    };
    let need = if u.u8() & 1 == 0 {
        Perm::Read
    } else {
        Perm::Write
    };
    let Some(end) = addr.checked_add(len - 1) else {
        return;
    };
    let n = len.min(8) as usize;
    let covering: Vec<&Known> = all
        .into_iter()
        .filter(|k| k.covers(addr, end, need))
        .collect();
    let mut files = Vec::new();
    for k in &covering {
        let off = k.e.offset.checked_add(addr - k.e.start);
        let len = k.file.metadata().map(|m| m.len()).unwrap_or(0);
        if let Some(off) = off.filter(|o| o.checked_add(n as u64).is_some_and(|e| e <= len)) {
            files.push((k.file.clone(), off));
        }
    }
    let found = qp.apply(move |s| {
        let mut p = s.mem.translate(addr, len, need);
        if p.is_none() {
            // As the worker's resolve_misses().
            if let Some(h) = s.miss.as_mut() {
                if let Some(v) = h(&s.mem, addr) {
                    s.mem = v;
                }
            }
            p = s.mem.translate(addr, len, need);
        }
        p.map(|p| (p as u64, locate(p, need, n, &files, seq)))
    });
    if let Some(Some((p, in_file))) = found {
        // Our bounce memory, registered by the lookup itself perhaps.
        let umem = *sh.dev().umem.lock().unwrap();
        let in_umem = umem.is_some_and(|(uaddr, size)| {
            p == uaddr + addr
                && covering
                    .iter()
                    .any(|k| k.bounce && k.e.last.wrapping_add(1) == size)
        });
        assert!(
            in_file || in_umem,
            "IOVA {addr:#x}+{len:#x} ({need:?}) translated to memory no entry covering it \
             with that permission maps there: {p:#x}; umem {umem:x?}; covering {:x?}",
            covering
                .iter()
                .map(|k| (k.e.start, k.e.last, k.e.offset, k.e.perm, k.bounce))
                .collect::<Vec<_>>()
        );
    }
}

/// The `vduse` fuzz target: panics on a finding.
pub fn vduse(data: &[u8]) {
    let fx = fixture().lock().unwrap_or_else(|e| e.into_inner());
    let (fds, maps) = (open_fds(), memfd_maps());
    run(data, &fx);
    assert_eq!(open_fds(), fds, "fds open before and after the device");
    assert_eq!(memfd_maps(), maps, "memfd mappings before and after");
}

fn run(data: &[u8], fx: &Fixture) {
    let mut u = In::new(data);
    let flags = u.u8();
    let bounce = match (flags >> 1) % 4 {
        0 => None,
        1 => Some(16 * PAGE),
        2 => Some((u.u8() as u64 % 64 + 1) * PAGE),
        _ => Some(u.u32() as u64 | 1),
    };
    let features = match u.u8() {
        k @ 0..=0xef => {
            let mut f = crate::net::F_VERSION_1 | uapi::VIRTIO_F_ACCESS_PLATFORM;
            if k & 1 != 0 {
                f |= crate::net::F_EVENT_IDX;
            }
            f
        }
        _ => u.u64(),
    };
    let vqs = vec![vq_info(&mut u, 0), vq_info(&mut u, 1)];
    let dev = FakeDevice {
        bounce,
        refuse_umem: flags & 1 != 0,
        features,
        vqs: Mutex::new(vqs),
        ..Default::default()
    };
    let rec = state::Record {
        pid: 0,
        features,
        config: Vec::new(),
        queue_size: QSIZE,
        status: 0,
    };
    let sh = Shared::new(
        "fuzz".into(),
        dev,
        QSIZE,
        fx.qp.clone(),
        fx.store.clone(),
        rec,
    )
    .expect("device");
    let fake = sh.dev();
    let mut files: Vec<Arc<File>> = Vec::new();
    // The bounce domain's file (the bounce map's when our memory is not).
    let mut domain: Option<Arc<File>> = None;
    let mut model = Model::default();
    let mut fresh = true;
    for seq in 0..MAX_OPS as u64 {
        if u.is_empty() {
            break;
        }
        match u.u8() % OPS {
            op::REQUEST => {
                let m = request(&mut u, &model);
                let resp = sh.answer(&m.buf[..m.len]);
                check_response(&m, resp);
                if m.len == uapi::MSG_SIZE && !fake.broken.load(Ordering::Relaxed) {
                    match m.kind {
                        // Re-read from the kernel, or forgotten (before
                        // DRIVER_OK): either way nothing stale is left there.
                        uapi::REQ_UPDATE_IOTLB if m.range.0 <= m.range.1 => {
                            model.forget_stale(m.range.0, m.range.1)
                        }
                        uapi::REQ_SET_STATUS if m.buf[uapi::MSG_UNION_OFFSET] == 0 => {
                            model.stale.clear()
                        }
                        _ => {}
                    }
                }
                fresh = false;
            }
            op::ADD_ENTRY => {
                let (e, bounce_map) = entry(&mut u, bounce);
                let mut file = file(&mut u, &mut files);
                if bounce_map && !fake.user_maps.load(Ordering::Relaxed) {
                    // The domain's own file, which no user's entry has
                    // (a user's entry of that range is a user's file).
                    file = domain
                        .get_or_insert_with(|| Arc::new(memfd(bounce.unwrap_or(0).min(MAX_FILE))))
                        .clone();
                }
                let bounce = e.start == 0
                    && Some(e.last.wrapping_add(1)) == bounce
                    && e.perm == uapi::ACCESS_RW
                    && !fake.user_maps.load(Ordering::Relaxed);
                fake.insert(e, file.clone());
                model.current.push(Known { e, file, bounce });
            }
            op::REMOVE_ENTRY => {
                let i = u.u8() as usize;
                let mut v = fake.entries.lock().unwrap();
                if !v.is_empty() {
                    let i = i % v.len();
                    v.remove(i);
                    model.stale.push(model.current.remove(i));
                }
            }
            op::LOOKUP => lookup(&mut u, &sh, &fx.qp, &model, seq),
            op::WRITE_FILE => {
                let f = file(&mut u, &mut files);
                let off = u.u32() as u64 % MAX_FILE;
                let n = u.u8() as usize;
                let b = u.bytes(n);
                // Never past the end: that would grow the file under
                // entries that were refused for being past it.
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                let n = (b.len() as u64).min(size.saturating_sub(off)) as usize;
                let _ = f.write_at(&b[..n], off);
            }
            op::SET_VQ => {
                let i = u.u8() as usize % 2;
                let info = vq_info(&mut u, i as u32);
                fake.vqs.lock().unwrap()[i] = info;
            }
            op::BROKEN => fake.broken.store(u.u8() & 1 != 0, Ordering::Relaxed),
            op::REBIND => {
                // The driver reset the device and another bus driver took
                // it: the domain's entries are gone (the kernel says so
                // with the reset's SET_STATUS 0), and a vhost-vdpa user's
                // maps replace the bounce map.
                fake.user_maps.store(u.u8() & 1 != 0, Ordering::Relaxed);
                fake.entries.lock().unwrap().clear();
                model.stale.append(&mut model.current);
            }
            op::TAKE_OVER => {
                let status = u.u8() | uapi::VIRTIO_CONFIG_S_DRIVER_OK;
                // Only what a vfrelay that finds the device does first.
                if std::mem::take(&mut fresh) {
                    let _ = sh.resume(status);
                }
            }
            _ => unreachable!(),
        }
    }
    // As a port closing: the rings let go of the device.
    sh.release_qp();
    assert_eq!(
        Arc::strong_count(&sh),
        1,
        "references to the device left after release"
    );
}
