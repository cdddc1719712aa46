//! The seed corpora in `fuzz/corpus/<target>/`, written field by field in
//! the formats `ring.rs` and `vhost_user.rs` read: a few valid sequences
//! each, for the fuzzer to start from. `tests/fuzz_regressions.rs` checks
//! the committed files are these (and rewrites them with
//! `VFRELAY_WRITE_SEEDS=1`).

use vhost::vhost_user::message::{
    VhostUserConfig, VhostUserConfigFlags, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr,
    VhostUserVringState,
};
use vm_memory::ByteValued;

use super::Out;
use crate::frontend::vhost_user::device::{F_LOG_ALL, F_PROTOCOL_FEATURES};
use crate::net;

/// Every target's seeds: (target, file name, bytes).
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut v = Vec::new();
    for (name, b) in ring() {
        v.push(("ring", name, b));
    }
    for (name, b) in vhost_user() {
        v.push(("vhost_user", name, b));
    }
    v
}

// ---- ring ----

/// Ring input writer: the layout, the ring, then operations.
struct Ring(Out);

impl Ring {
    /// `regions`: (pages, hole in pages after it), the first at page 1.
    fn new(regions: &[(u8, u8)], size_log2: u8, offs: [u16; 3], feats: u8) -> Ring {
        let mut o = Out::default();
        o.u8(regions.len() as u8 - 1).u8(0);
        for &(pages, gap) in regions {
            o.u8(pages - 1).u8(gap);
        }
        o.u8(size_log2);
        // Desc, avail, used in region 0 at these offsets.
        for off in offs {
            o.u8(0).u16(off);
        }
        o.u8(feats);
        Ring(o)
    }

    /// A guest address in region `r` at `off` (Layout::addr kind 0).
    fn addr(&mut self, r: u8, off: u16) -> &mut Self {
        self.0.u8(r << 2).u16(off);
        self
    }

    /// Descriptor `i` of the ring's table (or of a table at region 0 +
    /// `table`): buffer in region `r` at `off`.
    #[allow(clippy::too_many_arguments)]
    fn desc(
        &mut self,
        table: Option<u16>,
        i: u16,
        r: u8,
        off: u16,
        len: u16,
        flags: u8,
        next: u16,
    ) -> &mut Self {
        self.0.u8(0);
        match table {
            None => {
                self.0.u8(0).u16(i);
            }
            Some(t) => {
                self.0.u8(1);
                self.addr(0, t);
                self.0.u8(i as u8);
            }
        }
        self.addr(r, off);
        self.0.u16(len).u8(flags).u16(next);
        self
    }

    fn push(&mut self, head: u16) -> &mut Self {
        self.0.u8(3).u16(head);
        self
    }

    /// Pop `times` (1-4) chains: RX (writable) or TX, 64 KiB chains.
    fn pop(&mut self, writable: bool, times: u8) -> &mut Self {
        self.0
            .u8(8)
            .u8(writable as u8 | 0x20 | ((times - 1) << 6))
            .u8(0);
        self
    }

    fn put(&mut self, pick: u8, len: u32) -> &mut Self {
        self.0.u8(10).u8(pick).u32(len);
        self
    }

    fn publish(&mut self) -> &mut Self {
        self.0.u8(12);
        self
    }

    fn unpop(&mut self, n: u8) -> &mut Self {
        self.0.u8(13).u8(n);
        self
    }

    fn kicks(&mut self, on: bool) -> &mut Self {
        self.0.u8(14).u8(on as u8);
        self
    }

    fn restart(&mut self) -> &mut Self {
        self.0.u8(15);
        self
    }
}

const NEXT: u8 = 1;
const WRITE: u8 = 2;
const INDIRECT: u8 = 4;

fn ring() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = Vec::new();

    // TX: one buffer, popped, used, published.
    let mut r = Ring::new(&[(16, 0)], 4, [0, 0x1000, 0x2000], 0);
    r.desc(None, 0, 0, 0x4000, 100, 0, 0)
        .push(0)
        .pop(false, 1)
        .put(0, 0)
        .publish();
    v.push(("tx-one-buffer", r.0 .0));

    // RX with EVENT_IDX and indirect descriptors over two adjacent regions:
    // a chain whose second buffer straddles them, an indirect table, kicks
    // on and off, a restart from the used index.
    let mut r = Ring::new(&[(8, 0), (8, 2)], 3, [0, 0x1000, 0x2000], 3);
    r.desc(None, 0, 0, 0x4000, 64, NEXT | WRITE, 1)
        .desc(None, 1, 0, 0x7f00, 0x200, WRITE, 0)
        .desc(Some(0x5000), 0, 1, 0x100, 1500, NEXT | WRITE, 1)
        .desc(Some(0x5000), 1, 1, 0x800, 100, WRITE, 0)
        .desc(None, 2, 0, 0x5000, 32, INDIRECT, 0)
        .push(0)
        .push(2)
        .kicks(false)
        .pop(true, 2)
        .put(0, 1000)
        .put(0, 64)
        .publish()
        .kicks(true)
        .push(0)
        .pop(true, 1)
        .restart()
        .pop(true, 1)
        .put(0, 10)
        .publish();
    v.push(("rx-indirect-event-idx", r.0 .0));

    // A small ring wrapping several times; a frame that found no room
    // (pop, put, unpop) in the middle.
    let mut r = Ring::new(&[(4, 1), (4, 0)], 2, [0x100, 0x800, 0xa00], 0);
    for i in 0..4 {
        r.desc(None, i, 1, 0x100 * i, 256, WRITE, 0);
    }
    for round in 0..6u16 {
        for i in 0..4 {
            r.push(i);
        }
        r.pop(true, 4);
        if round == 2 {
            r.put(3, 1).unpop(1).pop(true, 1);
        }
        for _ in 0..4 {
            r.put(0, 60);
        }
        r.publish();
    }
    v.push(("rx-wrap-unpop", r.0 .0));

    // Buffers in the hole between two regions, and a chain that loops.
    let mut r = Ring::new(&[(2, 3), (2, 0)], 4, [0, 0x400, 0x800], 2);
    r.desc(None, 0, 0, 0x1ff8, 16, 0, 0)
        .desc(None, 1, 0, 0x1000, 16, NEXT, 2)
        .desc(None, 2, 0, 0x1010, 16, NEXT, 1)
        .push(0)
        .push(1)
        .pop(false, 2)
        .publish();
    v.push(("holes-and-loop", r.0 .0));
    v
}

// ---- vhost_user ----

/// vhost-user input writer: a device variant, then messages.
struct Vu(Out);

/// An fd to send along.
enum Fd<'a> {
    /// A memfd of this many pages with (offset, bytes) written in it.
    Mem(u16, &'a [(u32, &'a [u8])]),
    Event,
}

impl Vu {
    fn new(variant: u8) -> Vu {
        let mut o = Out::default();
        o.u8(variant);
        Vu(o)
    }

    fn msg(&mut self, request: u8, need_reply: bool, body: &[u8], fds: &[Fd]) -> &mut Self {
        let o = &mut self.0;
        o.u8(request).u8(if need_reply { 8 } else { 0 });
        o.u16(body.len() as u16).bytes(body);
        o.u8(0).u8(fds.len() as u8);
        for fd in fds {
            match fd {
                Fd::Mem(pages, writes) => {
                    o.u8(0).u16(*pages).u8(writes.len() as u8);
                    for (off, data) in *writes {
                        o.u32(*off).u8(data.len() as u8).bytes(data);
                    }
                }
                Fd::Event => {
                    o.u8(1);
                }
            }
        }
        self
    }
}

fn u64_body(v: u64) -> Vec<u8> {
    VhostUserU64::new(v).as_slice().to_vec()
}

fn state(index: u32, num: u32) -> Vec<u8> {
    VhostUserVringState::new(index, num).as_slice().to_vec()
}

/// Front-end address of guest memory (QEMU's mapping of guest RAM).
const UADDR: u64 = 0x7f00_0000_0000;

fn mem_table(size: u64) -> Vec<u8> {
    let mut b = VhostUserMemory::new(1).as_slice().to_vec();
    b.extend_from_slice(VhostUserMemoryRegion::new(0, size, UADDR, 0).as_slice());
    b
}

fn desc(addr: u64, len: u32, flags: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes());
    d
}

/// A QEMU-like start of both rings of pair 0 over one memfd, whose content
/// has an RX buffer posted and a TX frame waiting.
fn handshake(v: &mut Vu, features: u64) {
    let proto = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::LOG_SHMFD;
    v.msg(1, false, &[], &[])
        .msg(15, false, &[], &[])
        .msg(16, false, &u64_body(proto.bits()), &[])
        .msg(17, false, &[], &[])
        .msg(3, false, &[], &[])
        .msg(18, false, &state(0, 1), &[])
        .msg(2, false, &u64_body(features), &[]);
    // Rings: RX at 0 (desc) 0x1000 (avail) 0x2000 (used), TX at 0x10000..;
    // the RX buffer at 0x30000, the TX frame (header + 60 bytes) at 0x20000.
    let rx_desc = desc(0x30000, 2048, 2);
    let tx_desc = desc(0x20000, 72, 0);
    let avail = [0u8, 0, 1, 0, 0, 0];
    let frame = [0xffu8; 72];
    let writes: [(u32, &[u8]); 5] = [
        (0, &rx_desc),
        (0x1000, &avail),
        (0x10000, &tx_desc),
        (0x11000, &avail),
        (0x20000, &frame),
    ];
    v.msg(5, true, &mem_table(64 * 4096), &[Fd::Mem(64, &writes)]);
    for (i, base) in [(0u32, 0u64), (1, 0x10000)] {
        let a = VhostUserVringAddr {
            index: i,
            flags: 0,
            descriptor: UADDR + base,
            used: UADDR + base + 0x2000,
            available: UADDR + base + 0x1000,
            log: 0,
        };
        v.msg(8, false, &state(i, 256), &[])
            .msg(9, false, a.as_slice(), &[])
            .msg(10, false, &state(i, 0), &[])
            .msg(12, false, &u64_body(i as u64), &[Fd::Event])
            .msg(13, false, &u64_body(i as u64), &[Fd::Event])
            .msg(18, false, &state(i, 1), &[]);
    }
}

fn vhost_user() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = Vec::new();
    let features = net::F_VERSION_1 | F_PROTOCOL_FEATURES;

    let mut s = Vu::new(0);
    handshake(&mut s, features);
    s.msg(11, false, &state(0, 0), &[])
        .msg(11, false, &state(1, 0), &[]);
    v.push(("qemu-start-stop", s.0 .0));

    // Migration: a dirty log, logging on, the used ring logged, memory
    // hot-added and removed, a RARP, then a device reset.
    let mut s = Vu::new(1);
    handshake(&mut s, features);
    let log = VhostUserLog::new(4096, 0);
    s.msg(6, true, log.as_slice(), &[Fd::Mem(1, &[])]).msg(
        2,
        false,
        &u64_body(features | F_LOG_ALL),
        &[],
    );
    let a = VhostUserVringAddr {
        index: 0,
        flags: 1,
        descriptor: UADDR,
        used: UADDR + 0x2000,
        available: UADDR + 0x1000,
        log: 0x2000,
    };
    let reg = VhostUserSingleMemoryRegion::new(0x100000, 0x10000, UADDR + 0x100000, 0);
    s.msg(9, true, a.as_slice(), &[])
        .msg(36, false, &[], &[])
        .msg(37, true, reg.as_slice(), &[Fd::Mem(16, &[])])
        .msg(38, true, reg.as_slice(), &[])
        .msg(19, false, &[0x52, 0x54, 0, 0, 0, 1, 0, 0], &[])
        .msg(2, false, &u64_body(features), &[])
        .msg(34, false, &[], &[]);
    v.push(("migration-log", s.0 .0));

    // Config space reads, and requests the device refuses or never offered.
    let mut s = Vu::new(2);
    let mut cfg = VhostUserConfig::new(0, 12, VhostUserConfigFlags::empty())
        .as_slice()
        .to_vec();
    cfg.extend_from_slice(&[0; 12]);
    s.msg(1, false, &[], &[])
        .msg(
            16,
            false,
            &u64_body(VhostUserProtocolFeatures::CONFIG.bits()),
            &[],
        )
        .msg(24, false, &cfg, &[])
        .msg(25, true, &cfg, &[])
        .msg(8, true, &state(7, 256), &[]);
    v.push(("config-and-refusals", s.0 .0));
    v
}
