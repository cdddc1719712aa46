//! One vhost-user virtio-net device: what the front end configured over
//! its connection (features, memory table, vrings, dirty log), applied to
//! the queue pairs the workers run.
//!
//! Every request is checked here, where it enters. Changes reach a queue
//! pair only as a worker command, which returns once the worker applied it
//! between bursts: when GET_VRING_BASE, a new memory table or logging turned
//! on is answered, no burst can still run under the old settings.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;

use log::{debug, info, warn};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserMsgValidator, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64,
    VhostUserVirtioFeatures, VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::mmap::MmapRegion;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{body, Request, WireError};
use crate::dataplane::dirty_log::DirtyLog;
use crate::dataplane::mem::{MemView, Perm};
use crate::dataplane::ring::RingAddrs;
use crate::dataplane::worker::QpRef;
use crate::net;
use crate::net::NetConfig;

pub const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// The front end may ask for dirty-page logging.
pub const F_LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
/// Memory regions one device may have (GET_MAX_MEM_SLOTS).
pub const MAX_MEM_SLOTS: usize = 32;
/// SET_VRING_ADDR flag: log used-ring writes at `log`.
const VRING_F_LOG: u32 = 1;
/// Largest config space read (vhost-user caps GET_CONFIG payloads).
const MAX_CONFIG_READ: u32 = 256;

/// How a request failed.
#[derive(Debug)]
pub enum Failure {
    /// The request was refused; the connection goes on (REPLY_ACK says so).
    Refused(String),
    /// The front end broke the protocol: close this connection.
    Close(String),
}

impl From<WireError> for Failure {
    fn from(e: WireError) -> Self {
        Failure::Close(e.to_string())
    }
}

fn refused<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Refused(msg.into()))
}

fn close<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Close(msg.into()))
}

/// A mapped memory table entry.
#[derive(Clone)]
struct MemRegion {
    gpa: u64,
    size: u64,
    /// Where the front end has it mapped: ring addresses come in this space.
    uaddr: u64,
    map: Arc<MmapRegion<()>>,
}

/// What the front end told us about one vring.
#[derive(Default, Clone, Copy)]
struct VringCfg {
    size: u16,
    /// desc, used, avail in the front end's address space.
    va: Option<(u64, u64, u64)>,
    log_addr: Option<u64>,
    base: u16,
    enabled: bool,
    started: bool,
}

pub struct Device {
    name: String,
    cfg: NetConfig,
    offloads: u64,
    qps: Vec<QpRef>,
    acked: u64,
    protocol: u64,
    regions: Vec<MemRegion>,
    mem: Arc<MemView>,
    log: Option<Arc<DirtyLog>>,
    vrings: Vec<VringCfg>,
    /// Per queue pair: the pair its backend queue is lent to while the
    /// guest does not use it.
    lent_to: Vec<Option<usize>>,
    /// Test-only: pretend to log (VFRELAY_TEST_DISABLE_DIRTY_LOG=1), so the
    /// migration test can show it catches a missing log.
    log_disabled_for_test: bool,
}

impl Device {
    pub fn new(name: String, cfg: NetConfig, offloads: u64, qps: Vec<QpRef>) -> Self {
        let vrings = vec![VringCfg::default(); 2 * qps.len()];
        let lent_to = vec![None; qps.len()];
        Device {
            lent_to,
            name,
            cfg,
            offloads,
            qps,
            acked: 0,
            protocol: 0,
            regions: Vec::new(),
            mem: Arc::new(MemView::empty()),
            log: None,
            vrings,
            log_disabled_for_test: std::env::var_os("VFRELAY_TEST_DISABLE_DIRTY_LOG")
                .is_some_and(|v| v == "1"),
        }
    }

    /// Features offered to the driver.
    pub fn features(&self) -> u64 {
        self.cfg.virtio_features()
            | self.offloads
            | F_PROTOCOL_FEATURES
            | F_LOG_ALL
            | net::F_GUEST_ANNOUNCE
    }

    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP
    }

    pub fn reply_ack(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn logging(&self) -> bool {
        self.acked & F_LOG_ALL != 0
    }

    /// The log the workers mark: only while the front end has LOG_ALL on.
    fn active_log(&self) -> Option<Arc<DirtyLog>> {
        if !self.logging() || self.log_disabled_for_test {
            return None;
        }
        self.log.clone()
    }

    /// A new front end: drop what the backend received while nobody was
    /// attached, so it does not get stale frames seconds or minutes late.
    pub fn begin_connection(&mut self) {
        for (i, q) in self.qps.iter().enumerate() {
            let n = q.apply(|s| s.qp.discard_backend_rx()).unwrap_or(0);
            if n > 0 {
                info!(
                    "{}: queue pair {i}: dropped {n} frames that arrived while no front end was attached",
                    self.name
                );
            }
        }
    }

    /// The front end went away: log the counters, and forget its memory,
    /// log and rings (nothing of the old guest stays mapped: its QEMU may be
    /// gone for good, e.g. after migrating away).
    pub fn end_connection(&mut self) {
        self.vrings.fill(VringCfg::default());
        self.rebalance_rx();
        for (i, q) in self.qps.iter().enumerate() {
            let got = q.apply(|s| {
                s.qp.publish_stats();
                s.reset();
                // The published copy: it also holds what other workers
                // counted for this pair (a switch port's RX).
                s.qp.shared.snapshot()
            });
            if let Some(st) = got {
                info!(
                    "{}: queue pair {i} stats: rx_frames={} rx_bytes={} rx_dropped={} \
                     tx_frames={} tx_bytes={} tx_errors={} chain_errors={} \
                     backend_rx_frames={} backend_tx_frames={} backend_rx_dropped={} \
                     backend_tx_dropped={} rx_no_buffer={} kicks={} interrupts={}",
                    self.name,
                    st.rx_frames,
                    st.rx_bytes,
                    st.rx_dropped,
                    st.tx_frames,
                    st.tx_bytes,
                    st.tx_errors,
                    st.chain_errors,
                    st.backend_rx_frames,
                    st.backend_tx_frames,
                    st.backend_rx_dropped,
                    st.backend_tx_dropped,
                    st.rx_no_buffer,
                    st.kicks,
                    st.interrupts
                );
            }
        }
        self.acked = 0;
        self.protocol = 0;
        self.regions.clear();
        self.mem = Arc::new(MemView::empty());
        self.log = None;
    }

    /// Handle one request: Ok(Some(payload)) for a request with a defined
    /// reply, Ok(None) for one without.
    pub fn handle(&mut self, r: Request) -> Result<Option<Vec<u8>>, Failure> {
        use FrontendReq::*;
        let u64_reply = |v: u64| Ok(Some(VhostUserU64::new(v).as_slice().to_vec()));
        match r.req {
            GET_FEATURES => u64_reply(self.features()),
            SET_FEATURES => {
                let v = body::<VhostUserU64>(&r)?.value;
                self.set_features(v & self.features());
                Ok(None)
            }
            SET_OWNER => Ok(None),
            RESET_OWNER | RESET_DEVICE => {
                self.reset_device();
                Ok(None)
            }
            GET_PROTOCOL_FEATURES => u64_reply(Self::protocol_features().bits()),
            SET_PROTOCOL_FEATURES => {
                let v = body::<VhostUserU64>(&r)?.value;
                self.protocol = v & Self::protocol_features().bits();
                Ok(None)
            }
            GET_QUEUE_NUM => u64_reply(self.vrings.len() as u64),
            SET_MEM_TABLE => self.set_mem_table(r).map(|_| None),
            ADD_MEM_REG => self.add_mem_reg(r).map(|_| None),
            REM_MEM_REG => self.rem_mem_reg(&r).map(|_| None),
            GET_MAX_MEM_SLOTS => u64_reply(MAX_MEM_SLOTS as u64),
            SET_LOG_BASE => self.set_log_base(r).map(|_| Some(Vec::new())),
            // The legacy log eventfd: nothing to tell it (the fd is closed).
            SET_LOG_FD => Ok(None),
            SET_VRING_NUM => {
                let s = body::<VhostUserVringState>(&r)?;
                let v = self.vring_index(s.index)?;
                if s.num == 0 || s.num > self.cfg.queue_size as u32 || !s.num.is_power_of_two() {
                    return close(format!(
                        "vring {v}: size {} (a power of two up to {})",
                        { s.num },
                        self.cfg.queue_size
                    ));
                }
                self.vrings[v].size = s.num as u16;
                Ok(None)
            }
            SET_VRING_ADDR => self.set_vring_addr(&r).map(|_| None),
            SET_VRING_BASE => {
                let s = body::<VhostUserVringState>(&r)?;
                let v = self.vring_index(s.index)?;
                if s.num > u16::MAX as u32 {
                    return close(format!("vring {v}: base {} is not a ring index", { s.num }));
                }
                self.vrings[v].base = s.num as u16;
                Ok(None)
            }
            GET_VRING_BASE => {
                let s = body::<VhostUserVringState>(&r)?;
                let v = self.vring_index(s.index)?;
                let base = self.stop_ring(v);
                self.rebalance_rx();
                Ok(Some(
                    VhostUserVringState::new(v as u32, base as u32)
                        .as_slice()
                        .to_vec(),
                ))
            }
            SET_VRING_KICK => {
                let (v, fd) = self.vring_fd(r)?;
                self.start_ring(v, fd)?;
                self.rebalance_rx();
                Ok(None)
            }
            SET_VRING_CALL => {
                let (v, fd) = self.vring_fd(r)?;
                self.qp_of(v).apply(move |s| {
                    let vr = s.vring_mut(v);
                    vr.call = fd;
                    // QEMU hands the interrupt fd it really listens on
                    // after the ring started (also on reconnect): interrupt
                    // once through it, so a guest left waiting by a back end
                    // that died between publishing used entries and
                    // signalling looks at its ring.
                    if crate::dataplane::RingCtl::active(vr) {
                        crate::dataplane::RingCtl::signal(vr);
                    }
                });
                Ok(None)
            }
            SET_VRING_ERR => {
                let (v, fd) = self.vring_fd(r)?;
                self.qp_of(v).apply(move |s| s.vring_mut(v).err = fd);
                Ok(None)
            }
            // Accepted at any time: QEMU disables the extra queue pairs at
            // realize, before SET_FEATURES, as soon as PROTOCOL_FEATURES is
            // offered.
            SET_VRING_ENABLE => {
                let s = body::<VhostUserVringState>(&r)?;
                let v = self.vring_index(s.index)?;
                let on = s.num == 1;
                self.vrings[v].enabled = on;
                debug!(
                    "{}: vring {v} {}",
                    self.name,
                    if on { "enabled" } else { "disabled" }
                );
                self.qp_of(v).apply(move |s| s.vring_mut(v).enabled = on);
                self.rebalance_rx();
                Ok(None)
            }
            SEND_RARP => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(
                    r.body
                        .get(..6)
                        .ok_or_else(|| Failure::Close("SEND_RARP without a MAC".into()))?,
                );
                info!(
                    "{}: announcing {} (RARP) after migration",
                    self.name,
                    net::format_mac(&mac)
                );
                self.qps[0].apply(move |s| s.qp.announce(&mac));
                Ok(None)
            }
            GET_CONFIG => self.get_config(&r).map(Some),
            // virtio-net's config space is read-only for a modern driver.
            SET_CONFIG => refused("the virtio-net config space is read-only"),
            // Backend-initiated requests are not offered; take the fd and
            // drop it.
            SET_BACKEND_REQ_FD => Ok(None),
            other => close(format!("{other:?} is not supported (never offered)")),
        }
    }

    fn vring_index(&self, index: u32) -> Result<usize, Failure> {
        let v = index as usize;
        if v >= self.vrings.len() {
            return close(format!(
                "vring {index} does not exist (the device has {})",
                self.vrings.len()
            ));
        }
        Ok(v)
    }

    fn qp_of(&self, vring: usize) -> &QpRef {
        &self.qps[vring / 2]
    }

    /// SET_VRING_KICK/CALL/ERR: the vring and its eventfd (None: polled).
    fn vring_fd(&self, mut r: Request) -> Result<(usize, Option<EventFd>), Failure> {
        let v = body::<VhostUserU64>(&r)?.value;
        let vring = self.vring_index((v & 0xff) as u32)?;
        let Some(f) = r.files.pop() else {
            return Ok((vring, None));
        };
        // The worker reads kicks and writes interrupts on these: a blocking
        // fd (or a full pipe) must never hold it, and every port with it.
        // SAFETY: fcntl on an fd this File owns.
        let ok = unsafe {
            let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
            fl >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
        };
        if !ok {
            return close(format!(
                "{:?} fd: {}",
                r.req,
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the File owned this fd; ownership moves to the EventFd.
        Ok((
            vring,
            Some(unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }),
        ))
    }

    /// A guest may use fewer queue pairs than the port has (Linux enables
    /// min(pairs, vCPUs); `ethtool -L` lowers it). The NIC still steers
    /// frames to every backend queue, so the backend queue of each unused
    /// pair is lent to a used one, whose RX ring then takes its frames too;
    /// nothing is lost for that reason. Called after every change to which
    /// rings run.
    fn rebalance_rx(&mut self) {
        let running = |c: &VringCfg| c.started && c.enabled;
        let n = self.qps.len();
        let used: Vec<usize> = (0..n).filter(|i| running(&self.vrings[2 * i])).collect();
        let want: Vec<Option<usize>> = (0..n)
            .map(|i| {
                let idle = !running(&self.vrings[2 * i]) && !running(&self.vrings[2 * i + 1]);
                (idle && !used.is_empty()).then(|| used[i % used.len()])
            })
            .collect();
        // Take back what moves first: a pair about to lend or to run must
        // hold its own backend queue again.
        for (i, w) in want.iter().enumerate() {
            if let Some(t) = self.lent_to[i] {
                if *w == Some(t) {
                    continue;
                }
                let back = self.qps[t].apply(move |s| {
                    let pos = s.qp.extra_rx.iter().position(|(src, _)| *src == i)?;
                    Some(s.qp.extra_rx.swap_remove(pos).1)
                });
                if let Some(Some(b)) = back {
                    self.qps[i].apply(move |s| s.qp.backend = b);
                }
                self.lent_to[i] = None;
                debug!("{}: queue pair {i} has its backend queue back", self.name);
            }
        }
        for (i, w) in want.iter().enumerate() {
            let Some(t) = *w else { continue };
            if self.lent_to[i].is_some() {
                continue;
            }
            let b = self.qps[i].apply(|s| {
                let held = crate::dataplane::Lent(s.qp.backend.stats());
                std::mem::replace(&mut s.qp.backend, Box::new(held))
            });
            if let Some(b) = b {
                self.qps[t].apply(move |s| s.qp.extra_rx.push((i, b)));
                self.lent_to[i] = Some(t);
                info!(
                    "{}: queue pair {i} is not in use: frames for its backend queue go to queue pair {t}",
                    self.name
                );
            }
        }
    }

    fn set_features(&mut self, v: u64) {
        let was_logging = self.logging();
        debug!("{}: driver acked features {v:#x}", self.name);
        self.acked = v;
        if v & F_PROTOCOL_FEATURES == 0 {
            // Without PROTOCOL_FEATURES a ring is enabled once started.
            for c in &mut self.vrings {
                c.enabled = true;
            }
            self.rebalance_rx();
        }
        if self.logging() != was_logging {
            if self.logging() && self.log_disabled_for_test {
                warn!("dirty-page logging requested but disabled for testing: migration WILL corrupt guest memory");
            }
            info!(
                "{}: dirty-page logging {}",
                self.name,
                if self.logging() { "on" } else { "off" }
            );
        }
        self.sync_all();
    }

    /// Features, memory, log and enable state to every queue pair. Each
    /// apply returns after the worker's current burst: the reply to the
    /// request that changed them comes only when they are in force.
    fn sync_all(&self) {
        let features = self.acked;
        let log = self.active_log();
        for (i, q) in self.qps.iter().enumerate() {
            let mem = self.mem.clone();
            let log = log.clone();
            let en = (self.vrings[2 * i].enabled, self.vrings[2 * i + 1].enabled);
            let event_idx = features & net::F_EVENT_IDX != 0;
            // Running rings re-translated against this memory table in the
            // same step: the same front-end addresses may now mean other
            // guest memory, and no burst may see the new view with the old
            // addresses.
            let addrs = [2 * i, 2 * i + 1].map(|v| {
                if !self.vrings[v].started {
                    return None;
                }
                self.ring_addrs(v)
                    .inspect_err(|e| warn!("{}: {e}", self.name))
                    .ok()
            });
            q.apply(move |s| {
                s.qp.sync_features(features);
                s.mem = mem;
                s.log = log;
                s.rx.enabled = en.0;
                s.tx.enabled = en.1;
                s.rx.event_idx = event_idx;
                s.tx.event_idx = event_idx;
                if let Some(a) = addrs[0] {
                    s.rx.addrs = Some(a);
                }
                if let Some(a) = addrs[1] {
                    s.tx.addrs = Some(a);
                }
            });
        }
    }

    fn reset_device(&mut self) {
        self.vrings.fill(VringCfg::default());
        self.rebalance_rx();
        for q in &self.qps {
            q.apply(|s| {
                s.rx.reset();
                s.tx.reset();
                s.log = None;
                s.qp.reset();
            });
        }
        self.acked = 0;
        self.log = None;
    }

    /// Front-end address of a ring part to guest-physical.
    fn va_to_gpa(&self, va: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = va.checked_sub(r.uaddr)?;
            // Lazily: for a va far past this region, gpa + off overflows.
            (off < r.size && len <= r.size - off).then(|| r.gpa + off)
        })
    }

    fn ring_addrs(&self, v: usize) -> Result<RingAddrs, String> {
        let c = &self.vrings[v];
        let Some((desc, used, avail)) = c.va else {
            return Err(format!("vring {v} started without addresses"));
        };
        let size = if c.size == 0 {
            self.cfg.queue_size
        } else {
            c.size
        };
        let n = size as u64;
        let t = |va: u64, len: u64, what: &str| {
            self.va_to_gpa(va, len)
                .ok_or_else(|| format!("vring {v}: {what} at {va:#x} is outside the memory table"))
        };
        Ok(RingAddrs {
            desc: t(desc, 16 * n, "descriptor table")?,
            avail: t(avail, 6 + 2 * n, "avail ring")?,
            used: t(used, 6 + 8 * n, "used ring")?,
            size,
        })
    }

    fn start_ring(&mut self, v: usize, kick: Option<EventFd>) -> Result<(), Failure> {
        if self.vrings[v].started {
            // A new kick fd for a running ring: its indices stay where the
            // worker has them (resetting them would hand chains back twice).
            self.qp_of(v).apply(move |s| s.vring_mut(v).kick = kick);
            return Ok(());
        }
        let addrs = match self.ring_addrs(v) {
            Ok(a) => a,
            Err(e) => return refused(e),
        };
        let c = &mut self.vrings[v];
        c.started = true;
        let c = *c;
        // Features, memory and log are already the worker's: every change
        // to them went there through sync_all.
        let event_idx = self.acked & net::F_EVENT_IDX != 0;
        debug!(
            "{}: vring {v} started: {addrs:?} from {} ({})",
            self.name,
            c.base,
            if c.enabled { "enabled" } else { "disabled" }
        );
        self.qp_of(v).apply(move |s| {
            let r = s.vring_mut(v);
            r.addrs = Some(addrs);
            // Every chain before the base was used: used resumes there too.
            r.next_avail = c.base;
            r.next_used = c.base;
            r.event_idx = event_idx;
            r.enabled = c.enabled;
            r.log_addr = c.log_addr;
            r.kick = kick;
            r.started = true;
        });
        Ok(())
    }

    /// GET_VRING_BASE: stop the ring; where the guest should resume.
    fn stop_ring(&mut self, v: usize) -> u16 {
        self.vrings[v].started = false;
        let base = self
            .qp_of(v)
            .apply(move |s| {
                let r = s.vring_mut(v);
                r.started = false;
                r.kick = None;
                r.next_avail
            })
            .unwrap_or(self.vrings[v].base);
        debug!("{}: vring {v} stopped at {base}", self.name);
        base
    }

    fn set_vring_addr(&mut self, r: &Request) -> Result<(), Failure> {
        let a = body::<VhostUserVringAddr>(r)?;
        let v = self.vring_index(a.index)?;
        let before = self.vrings[v];
        let c = &mut self.vrings[v];
        c.va = Some((a.descriptor, a.used, a.available));
        c.log_addr = (a.flags & VRING_F_LOG != 0).then_some(a.log);
        if !c.started {
            return Ok(());
        }
        // QEMU sends this to a running ring to switch used-ring logging on
        // or off around a migration: addresses (normally the same) and log
        // address change between bursts, indices stay.
        let log_addr = c.log_addr;
        let addrs = match self.ring_addrs(v) {
            Ok(a) => a,
            Err(e) => {
                self.vrings[v] = before;
                return refused(e);
            }
        };
        self.qp_of(v).apply(move |s| {
            let r = s.vring_mut(v);
            r.addrs = Some(addrs);
            r.log_addr = log_addr;
        });
        Ok(())
    }

    fn map_region(&self, d: &VhostUserMemoryRegion, file: File) -> Result<MemRegion, Failure> {
        if !d.is_valid() {
            return close(format!(
                "memory region {:#x}+{:#x}: invalid",
                { d.guest_phys_addr },
                { d.memory_size }
            ));
        }
        if let Err(e) = crate::dataplane::mem::fd_covers(file.as_fd(), d.mmap_offset, d.memory_size)
        {
            return close(format!(
                "memory region {:#x}+{:#x}: {e}",
                { d.guest_phys_addr },
                { d.memory_size }
            ));
        }
        match d.mmap_region::<()>(file) {
            Ok(m) => Ok(MemRegion {
                gpa: d.guest_phys_addr,
                size: d.memory_size,
                uaddr: d.user_addr,
                map: Arc::new(m),
            }),
            Err(e) => refused(format!(
                "mapping memory region {:#x}+{:#x}: {e}",
                { d.guest_phys_addr },
                { d.memory_size }
            )),
        }
    }

    fn set_mem_table(&mut self, r: Request) -> Result<(), Failure> {
        let hdr = body::<VhostUserMemory>(&r)?;
        let n = hdr.num_regions as usize;
        let hl = std::mem::size_of::<VhostUserMemory>();
        let rl = std::mem::size_of::<VhostUserMemoryRegion>();
        if n != r.files.len() || r.body.len() != hl + n * rl {
            return close(format!(
                "SET_MEM_TABLE: {n} regions, {} fds, {} bytes",
                r.files.len(),
                r.body.len()
            ));
        }
        let mut regions = Vec::with_capacity(n);
        for (i, file) in r.files.into_iter().enumerate() {
            let off = hl + i * rl;
            let d = VhostUserMemoryRegion::from_slice(&r.body[off..off + rl])
                .copied()
                .ok_or_else(|| Failure::Close("SET_MEM_TABLE: short region".into()))?;
            regions.push(self.map_region(&d, file)?);
        }
        self.install_regions(regions)
    }

    fn add_mem_reg(&mut self, mut r: Request) -> Result<(), Failure> {
        let d = body::<VhostUserSingleMemoryRegion>(&r)?;
        if self.regions.len() >= MAX_MEM_SLOTS {
            return refused(format!("more than {MAX_MEM_SLOTS} memory regions"));
        }
        let file = r
            .files
            .pop()
            .expect("fd count checked by the protocol table");
        let new = self.map_region(&d, file)?;
        let mut regions = self.regions.clone();
        regions.push(new);
        self.install_regions(regions)
    }

    fn rem_mem_reg(&mut self, r: &Request) -> Result<(), Failure> {
        let d = body::<VhostUserSingleMemoryRegion>(r)?;
        let mut regions = self.regions.clone();
        regions.retain(|m| !(m.gpa == d.guest_phys_addr && m.size == d.memory_size));
        if regions.len() == self.regions.len() {
            return refused(format!(
                "REM_MEM_REG {:#x}+{:#x}: no such region",
                { d.guest_phys_addr },
                { d.memory_size }
            ));
        }
        self.install_regions(regions)
    }

    /// A new memory table: a fresh view to every queue pair (the old one is
    /// unmapped once the workers let go of it) and running rings
    /// re-translated, as the same front-end addresses may now mean other
    /// guest memory.
    fn install_regions(&mut self, regions: Vec<MemRegion>) -> Result<(), Failure> {
        let mut view = MemView::empty();
        for m in &regions {
            // SAFETY: the mapping is shared read-write and `owners` below
            // keeps it alive as long as the view.
            if !unsafe { view.add(m.gpa, m.size, m.map.as_ptr(), Perm::ReadWrite) } {
                return refused(format!(
                    "memory region {:#x}+{:#x} overlaps another",
                    m.gpa, m.size
                ));
            }
        }
        let owners: Vec<Arc<MmapRegion<()>>> = regions.iter().map(|m| m.map.clone()).collect();
        let view = Arc::new(view.with_owner(Arc::new(Owners(owners))));
        debug!("{}: guest memory: {view:?}", self.name);
        self.regions = regions;
        self.mem = view;
        self.sync_all();
        Ok(())
    }

    fn set_log_base(&mut self, r: Request) -> Result<(), Failure> {
        let l = body::<VhostUserLog>(&r)?;
        let file = &r.files[0];
        match DirtyLog::map(file.as_fd(), l.mmap_offset, l.mmap_size) {
            Ok(log) => {
                info!(
                    "{}: dirty log mapped: {} bytes ({} pages)",
                    self.name,
                    l.mmap_size,
                    log.pages()
                );
                // Replaces (and, once the workers let go, unmaps) any
                // earlier log: QEMU sends a new one when guest memory grows.
                self.log = Some(Arc::new(log));
                self.sync_all();
                Ok(())
            }
            // Acking a log we cannot write would let the migration corrupt
            // the guest.
            Err(e) => close(format!(
                "mapping the dirty log ({} bytes at {}): {e}",
                l.mmap_size, l.mmap_offset
            )),
        }
    }

    fn get_config(&self, r: &Request) -> Result<Vec<u8>, Failure> {
        let c = body::<VhostUserConfig>(r)?;
        let hl = std::mem::size_of::<VhostUserConfig>();
        if r.body.len() != hl + c.size as usize || c.size > MAX_CONFIG_READ {
            return close(format!(
                "GET_CONFIG of {} bytes in a {}-byte message",
                { c.size },
                r.body.len()
            ));
        }
        let status = 1; // VIRTIO_NET_S_LINK_UP
        let data = self.cfg.config_space(status, c.offset, c.size);
        let reply_hdr = VhostUserConfig {
            size: data.len() as u32,
            ..c
        };
        let mut out = reply_hdr.as_slice().to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }
}

/// Keeps the mapped regions of one memory table alive as long as a view.
struct Owners(#[allow(dead_code)] Vec<Arc<MmapRegion<()>>>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::dirty_log::tests::memfd;
    use crate::dataplane::worker::{QpKey, Slot, WorkerHandle};
    use crate::dataplane::QueuePair;
    use crate::frontend::vhost_user::protocol::Header;
    use vfrelay_backends::loopback::Loopback;

    fn device(pairs: usize) -> Device {
        let worker = Arc::new(WorkerHandle::spawn(0, None, false).unwrap());
        let qps = (0..pairs)
            .map(|i| {
                let key = QpKey { port: 1, index: i };
                let qp = QueuePair::new(i, Box::new(Loopback::new(i)));
                QpRef::add(worker.clone(), Box::new(Slot::new(key, qp)))
            })
            .collect();
        let cfg = NetConfig {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            mtu: 1500,
            queue_pairs: pairs,
            queue_size: 256,
        };
        Device::new("t".into(), cfg, 0, qps)
    }

    fn req(req: FrontendReq, body: &[u8], files: Vec<File>) -> Request {
        Request {
            hdr: Header {
                request: req as u32,
                flags: 1,
                size: body.len() as u32,
            },
            req,
            body: body.to_vec(),
            files,
        }
    }

    fn set_features(d: &mut Device, f: u64) {
        d.handle(req(FrontendReq::SET_FEATURES, &f.to_ne_bytes(), vec![]))
            .unwrap();
    }

    fn log_base(d: &mut Device, size: u64) -> Result<Option<Vec<u8>>, Failure> {
        let l = VhostUserLog::new(size, 0);
        let f = File::from(memfd(4096));
        d.handle(req(FrontendReq::SET_LOG_BASE, l.as_slice(), vec![f]))
    }

    fn worker_log(d: &Device, qp: usize) -> bool {
        d.qps[qp].apply(|s| s.log.is_some()).unwrap()
    }

    #[test]
    fn logging_follows_log_all_on_every_set_features() {
        let mut d = device(2);
        assert!(d.features() & F_LOG_ALL != 0);
        assert_eq!(log_base(&mut d, 4096).unwrap(), Some(Vec::new()));
        assert!(!worker_log(&d, 0), "no LOG_ALL yet");
        set_features(&mut d, net::F_VERSION_1 | F_LOG_ALL);
        assert!(worker_log(&d, 0) && worker_log(&d, 1));
        // Migration cancelled: QEMU acks the features again without LOG_ALL.
        set_features(&mut d, net::F_VERSION_1);
        assert!(!worker_log(&d, 0) && !worker_log(&d, 1));
        // A new connection forgets the log entirely.
        set_features(&mut d, net::F_VERSION_1 | F_LOG_ALL);
        d.end_connection();
        set_features(&mut d, net::F_VERSION_1 | F_LOG_ALL);
        assert!(!worker_log(&d, 0), "log base must be sent again");
    }

    #[test]
    fn vring_log_addresses_are_per_vring_and_reset() {
        let mut d = device(2);
        let addr = |index: u32, flags: u32, log: u64| {
            let a = VhostUserVringAddr {
                index,
                flags,
                descriptor: 0x1000,
                used: 0x2000,
                available: 0x3000,
                log,
            };
            d_req(a)
        };
        fn d_req(a: VhostUserVringAddr) -> Request {
            req(FrontendReq::SET_VRING_ADDR, a.as_slice(), vec![])
        }
        d.handle(addr(3, VRING_F_LOG, 0x5000)).unwrap();
        d.handle(addr(1, 0, 0x6000)).unwrap();
        assert!(matches!(
            d.handle(addr(99, VRING_F_LOG, 1)),
            Err(Failure::Close(_))
        ));
        assert_eq!(d.vrings[3].log_addr, Some(0x5000));
        assert_eq!(d.vrings[1].log_addr, None);
        d.end_connection();
        assert_eq!(d.vrings[3].log_addr, None);
    }

    #[test]
    fn an_unmappable_log_is_refused() {
        let mut d = device(1);
        assert!(matches!(log_base(&mut d, 0), Err(Failure::Close(_))));
        assert!(d.log.is_none());
    }

    #[test]
    fn requests_for_vrings_the_device_lacks_close_the_connection() {
        let mut d = device(1);
        let st = VhostUserVringState::new(2, 256);
        for r in [FrontendReq::SET_VRING_NUM, FrontendReq::GET_VRING_BASE] {
            assert!(matches!(
                d.handle(req(r, st.as_slice(), vec![])),
                Err(Failure::Close(_))
            ));
        }
        // Not a power of two, or larger than offered.
        for n in [0, 100, 512] {
            let st = VhostUserVringState::new(0, n);
            assert!(d
                .handle(req(FrontendReq::SET_VRING_NUM, st.as_slice(), vec![]))
                .is_err());
        }
    }

    #[test]
    fn an_unused_pairs_backend_queue_is_lent_to_a_used_one() {
        let mut d = device(2);
        let describe = |d: &Device, i: usize| d.qps[i].apply(|s| s.qp.backend.describe()).unwrap();
        let extra = |d: &Device, i: usize| {
            d.qps[i]
                .apply(|s| {
                    s.qp.extra_rx
                        .iter()
                        .map(|(src, _)| *src)
                        .collect::<Vec<_>>()
                })
                .unwrap()
        };
        let own = describe(&d, 1);
        // The guest runs pair 0 only.
        for v in [0, 1] {
            d.vrings[v].started = true;
            d.vrings[v].enabled = true;
        }
        d.rebalance_rx();
        assert_eq!(extra(&d, 0), vec![1]);
        assert_eq!(describe(&d, 1), "lent to another queue pair");
        // ethtool -L combined 2: pair 1 runs and has its queue back.
        for v in [2, 3] {
            d.vrings[v].started = true;
            d.vrings[v].enabled = true;
        }
        d.rebalance_rx();
        assert!(extra(&d, 0).is_empty());
        assert_eq!(describe(&d, 1), own);
        // Back to one pair, then the front end goes: nothing stays lent.
        d.vrings[2].enabled = false;
        d.vrings[3].enabled = false;
        d.rebalance_rx();
        assert_eq!(extra(&d, 0), vec![1]);
        d.end_connection();
        assert!(extra(&d, 0).is_empty());
        assert_eq!(describe(&d, 1), own);
    }

    fn add_region(d: &mut Device, gpa: u64, size: u64, file_size: u64) -> Result<(), Failure> {
        let r = VhostUserSingleMemoryRegion::new(gpa, size, 0x7f00_0000_0000 + gpa, 0);
        let f = File::from(memfd(file_size));
        d.handle(req(FrontendReq::ADD_MEM_REG, r.as_slice(), vec![f]))
            .map(|_| ())
    }

    #[test]
    fn memory_regions_are_checked_and_a_refused_one_changes_nothing() {
        let mut d = device(1);
        add_region(&mut d, 0, 0x10000, 0x10000).unwrap();
        // Overlapping: refused, the table stays as it was.
        assert!(matches!(
            add_region(&mut d, 0x8000, 0x10000, 0x10000),
            Err(Failure::Refused(_))
        ));
        assert_eq!(d.regions.len(), 1);
        assert!(d.mem.translate(0x100, 1, Perm::ReadWrite).is_some());
        // Larger than its file: touching it would be SIGBUS, so refused.
        assert!(matches!(
            add_region(&mut d, 0x100000, 0x20000, 0x1000),
            Err(Failure::Close(_))
        ));
        assert_eq!(d.regions.len(), 1);
        // A dirty log larger than its fd likewise.
        let l = VhostUserLog::new(1 << 20, 0);
        let f = File::from(memfd(4096));
        assert!(d
            .handle(req(FrontendReq::SET_LOG_BASE, l.as_slice(), vec![f]))
            .is_err());
    }

    #[test]
    fn vring_fds_are_made_non_blocking() {
        let mut d = device(1);
        // SAFETY: a plain eventfd, blocking, owned right away.
        let fd = unsafe { libc::eventfd(0, 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        let probe = f.try_clone().unwrap();
        d.handle(req(
            FrontendReq::SET_VRING_CALL,
            &0u64.to_ne_bytes(),
            vec![f],
        ))
        .unwrap();
        // SAFETY: F_GETFL on an fd we own.
        let fl = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_GETFL) };
        assert!(fl & libc::O_NONBLOCK != 0);
    }
}
