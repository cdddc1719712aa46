//! VDUSE frontend: vfrelay as a vDPA device in the kernel, for containers
//! (virtio_vdpa: a kernel virtio-net netdev) and VMs (vhost_vdpa:
//! /dev/vhost-vdpa-N for `qemu -netdev vhost-vdpa`).
//!
//! Like the vhost-user frontend it only supplies memory (the IOTLB as a
//! [`MemView`]), ring addresses and indices ([`RingCtl`]), kicks and
//! interrupts; the shared dataplane does everything else.
//!
//! Threads: the daemon's control thread creates, attaches and tears down;
//! a request thread per device answers the kernel (SET_STATUS,
//! GET_VQ_STATE, UPDATE_IOTLB), which it must do even while the control
//! thread waits for the kernel (attaching and detaching need answers). The
//! queue pair runs on a shared worker like any other; requests reach it as
//! worker commands applied between bursts.

pub mod dev;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fake;
pub mod iotlb;
pub mod netlink;
pub mod state;
pub mod uapi;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dataplane::mem::{MemView, Perm};
use crate::dataplane::ring::{ChainError, RingAddrs};
use crate::dataplane::vring::Notifier;
use crate::dataplane::worker::QpRef;
use crate::dataplane::MissFn;
use crate::net::NetConfig;
use dev::{Control, Device, Request};
use uapi::VqInfo;

/// Virtqueues: receiveq1 (0) and transmitq1 (1). VDUSE refuses CTRL_VQ, so
/// there is no way to negotiate more pairs.
const VQ_NUM: u32 = 2;

/// Which vDPA bus driver takes the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attach {
    /// Kernel virtio-net netdev (containers).
    VirtioVdpa,
    /// /dev/vhost-vdpa-N (QEMU -netdev vhost-vdpa).
    VhostVdpa,
    /// Create the device only; attach it yourself (`vdpa dev add`).
    None,
}

impl Attach {
    fn driver(self) -> Option<&'static str> {
        match self {
            Attach::VirtioVdpa => Some("virtio_vdpa"),
            Attach::VhostVdpa => Some("vhost_vdpa"),
            Attach::None => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dev(#[from] dev::Error),
    #[error(transparent)]
    Netlink(#[from] netlink::Error),
    #[error("vDPA bus driver {0} is not loaded: load the {0} kernel module (modprobe {0})")]
    NoDriver(&'static str),
    #[error("vdpa device {name}: bound to {got} instead of {want}")]
    Bind {
        name: String,
        want: &'static str,
        got: String,
    },
    #[error(
        "VDUSE device {name} exists and vfrelay has no record of creating it ({}): it \
         belongs to another program, so it is left alone",
        path.display()
    )]
    NotOurs { name: String, path: PathBuf },
    #[error("VDUSE device {name} is served by another process (vfrelay pid {pid} created it)")]
    Served { name: String, pid: u32 },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

/// What `vfrelay vduse` was asked for.
pub struct VduseNet {
    pub name: String,
    pub attach: Attach,
    pub cfg: NetConfig,
    /// Offload feature bits the backend can honour.
    pub offloads: u64,
}

impl VduseNet {
    /// Features offered: what the dataplane handles, minus what VDUSE
    /// refuses for net (CTRL_VQ, and MQ which needs it), plus
    /// ACCESS_PLATFORM, which VDUSE requires (all addresses are IOVAs).
    pub fn device_features(&self) -> u64 {
        (self.cfg.virtio_features() | self.offloads | uapi::VIRTIO_F_ACCESS_PLATFORM)
            & !(crate::net::F_MQ | uapi::VIRTIO_NET_F_CTRL_VQ)
    }

    fn config_space(&self) -> Vec<u8> {
        // mac, status (link up), max_virtqueue_pairs (1), mtu.
        self.cfg.config_space(1, 0, crate::net::CONFIG_LEN as u32)
    }
}

#[derive(Clone, Copy, Default)]
struct VqState {
    ready: bool,
    addrs: Option<RingAddrs>,
    next_avail: u16,
}

/// What the request thread knows of the device (the rings themselves are
/// the worker's).
struct State {
    /// DRIVER_OK seen and the rings set up.
    started: bool,
    status: u8,
}

/// What the request handler needs of a VDUSE device, besides the IOTLB:
/// the real [`Device`] (its ioctls), or in tests and fuzzing
/// [`fake::FakeDevice`]. The request thread's own reads and writes of the
/// device stay [`Device`]'s ([`serve_requests`]).
pub(crate) trait VduseDev: iotlb::IotlbDev + Send + Sync + 'static {
    fn driver_features(&self) -> Result<u64, dev::Error>;
    fn vq_info(&self, index: u32) -> Result<VqInfo, dev::Error>;
    fn set_kickfd(&self, index: u32, fd: RawFd) -> Result<(), dev::Error>;
    fn inject_irq(&self, index: u32) -> io::Result<()>;
}

impl VduseDev for Device {
    fn driver_features(&self) -> Result<u64, dev::Error> {
        Device::driver_features(self)
    }
    fn vq_info(&self, index: u32) -> Result<VqInfo, dev::Error> {
        Device::vq_info(self, index)
    }
    fn set_kickfd(&self, index: u32, fd: RawFd) -> Result<(), dev::Error> {
        Device::set_kickfd(self, index, fd)
    }
    fn inject_irq(&self, index: u32) -> io::Result<()> {
        Device::inject_irq(self, index)
    }
}

/// Generic over the device so tests and the `vduse` fuzz target run the
/// same handler over a fake; the daemon's is `Shared<Device>`.
pub(crate) struct Shared<D: VduseDev = Device> {
    name: String,
    dev: D,
    qsize: u16,
    qp: QpRef,
    state: Mutex<State>,
    /// The IOTLB as mapped here. Its own lock, never held while waiting for
    /// the worker: the worker takes it on a miss ([`Shared::miss_handler`])
    /// and to build the view a refresh hands it ([`Shared::refresh_view`]).
    iotlb: Arc<Mutex<iotlb::Table>>,
    /// Our record of the device (kept up to date with the driver's status,
    /// for a vfrelay that takes the device over after a crash).
    store: state::Store,
    record: Mutex<state::Record>,
    kicks: [EventFd; 2],
    /// Ends the request thread (after detach: detaching needs answers).
    stop_requests: AtomicBool,
    broken: AtomicBool,
}

impl<D: VduseDev> Notifier for Shared<D> {
    fn signal(&self, vq: u16) {
        if let Err(e) = self.dev.inject_irq(vq as u32) {
            debug!("{}: VQ_INJECT_IRQ {vq}: {e}", self.name);
        }
    }
    fn broken(&self, vq: u16, err: &ChainError) {
        // Counted (chain_errors) and logged by the dataplane. The driver
        // cannot be told: DEVICE_NEEDS_RESET is a status bit, and a VDUSE
        // device has no call that sets its status (vduse_vdpa_get_status()
        // returns what the driver last set; no VDUSE ioctl writes it).
        debug!(
            "{}: queue {vq} stopped ({err}); VDUSE has no way to raise NEEDS_RESET",
            self.name
        );
    }
}

/// The used index a ring's driver last saw from the device, read from guest
/// memory (where a device that resumes must resume: every chain before it
/// was used, none after it).
fn used_idx(view: &MemView, used: u64) -> Option<u16> {
    let p = view.translate(used.checked_add(2)?, 2, Perm::Read)?;
    // SAFETY: translate checked both bytes lie in one mapping. Bytewise
    // volatile reads: no alignment assumed, no reference into guest memory.
    let b = unsafe {
        [
            std::ptr::read_volatile(p),
            std::ptr::read_volatile(p.add(1)),
        ]
    };
    Some(u16::from_le_bytes(b))
}

impl<D: VduseDev> Shared<D> {
    /// A device before DRIVER_OK: no rings, no memory view, nothing acked.
    pub(crate) fn new(
        name: String,
        dev: D,
        qsize: u16,
        qp: QpRef,
        store: state::Store,
        record: state::Record,
    ) -> Result<Arc<Shared<D>>, Error> {
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(sys("eventfd"));
        let sh = Arc::new(Shared {
            name,
            dev,
            qsize,
            qp,
            state: Mutex::new(State {
                started: false,
                status: 0,
            }),
            iotlb: Arc::new(Mutex::new(iotlb::Table::default())),
            store,
            record: Mutex::new(record),
            kicks: [efd()?, efd()?],
            stop_requests: AtomicBool::new(false),
            broken: AtomicBool::new(false),
        });
        let n: Arc<dyn Notifier> = sh.clone();
        let miss = sh.miss_handler();
        sh.qp.apply(move |s| {
            s.rx.notifier = Some(n.clone());
            s.tx.notifier = Some(n);
            s.miss = Some(miss);
        });
        Ok(sh)
    }

    /// The device, for tests and the fuzz target to play the kernel.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn dev(&self) -> &D {
        &self.dev
    }

    /// Re-reads the IOTLB in `[start, last]` and hands the worker the new
    /// view in one step (the old one is unmapped once the worker lets go
    /// of it). Returns once the worker uses it: the kernel may reuse what
    /// was unmapped as soon as we answer.
    fn refresh_view(&self, start: u64, last: u64) {
        match self.iotlb.lock().unwrap().update(&self.dev, start, last) {
            // Nothing to hand over (vhost-vdpa sends an update of the
            // whole range for every map and unmap).
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => error!("{}: reading the IOTLB: {e}", self.name),
        }
        // The view is made on the worker: a miss it resolves before this
        // command runs may change the table again, and a view made here
        // now would undo that change when it arrived.
        let table = self.iotlb.clone();
        self.qp.apply(move |s| s.mem = table.lock().unwrap().view());
    }

    /// Asked by the worker when a ring finds an address outside its view:
    /// the kernel adds some mappings without telling us (the bounce map
    /// with the driver's first DMA mapping, coherent allocations). One
    /// lookup per miss, never one per round.
    pub(crate) fn miss_handler(self: &Arc<Self>) -> MissFn {
        let sh = Arc::downgrade(self);
        Box::new(move |_cur: &MemView, addr: u64| {
            let sh = sh.upgrade()?;
            let mut t = sh.iotlb.lock().unwrap();
            // Whatever changed goes to the worker, found or not: an entry
            // the lookup dropped (the kernel no longer has it) must leave
            // the worker's view too, or a later update of its range finds
            // nothing to change and the worker keeps writing there. A
            // failed lookup may have dropped entries as well.
            let changed = t.update(&sh.dev, addr, addr).unwrap_or_else(|e| {
                debug!("{}: IOTLB lookup of {addr:#x}: {e}", sh.name);
                true
            });
            changed.then(|| {
                let v = t.view();
                if v.maps(addr) {
                    debug!("{}: IOVA {addr:#x} found on a miss", sh.name);
                } else {
                    debug!(
                        "{}: IOTLB changed on a miss at {addr:#x}, which it does not map",
                        sh.name
                    );
                }
                v
            })
        })
    }

    fn handle(self: &Arc<Self>, req: Request) -> (bool, Option<(u32, u16)>) {
        match req {
            Request::GetVqState { index } => {
                if index >= VQ_NUM {
                    warn!(
                        "{}: GET_VQ_STATE for queue {index}: no such queue",
                        self.name
                    );
                    return (false, None);
                }
                let avail = self
                    .qp
                    .apply(move |s| s.vring_mut(index as usize).next_avail)
                    .unwrap_or(0);
                debug!("{}: GET_VQ_STATE {index} -> avail {avail}", self.name);
                (true, Some((index, avail)))
            }
            Request::SetStatus { status } => (self.set_status(status), None),
            Request::UpdateIotlb { start, last } => {
                debug!("{}: UPDATE_IOTLB {start:#x}..={last:#x}", self.name);
                let st = self.state.lock().unwrap();
                if st.started {
                    self.refresh_view(start, last);
                } else {
                    // Mapped afresh at DRIVER_OK.
                    self.iotlb.lock().unwrap().clear();
                    self.qp.apply(|s| s.mem = Arc::new(MemView::empty()));
                }
                (true, None)
            }
        }
    }

    /// Keeps the record's status in step with the driver's, before the
    /// kernel hears OK: a crash after this line and before the answer
    /// leaves the request pending, and the kernel hands it to the next
    /// opener again (vduse_dev_release() requeues it).
    fn record_status(&self, status: u8) {
        let mut r = self.record.lock().unwrap();
        r.status = status;
        r.pid = std::process::id();
        if let Err(e) = self.store.write(&self.name, &r) {
            warn!(
                "{}: writing {}: {e}",
                self.name,
                self.store.path(&self.name).display()
            );
        }
    }

    fn set_status(self: &Arc<Self>, status: u8) -> bool {
        let mut st = self.state.lock().unwrap();
        debug!("{}: SET_STATUS {status:#x}", self.name);
        if status == 0 {
            if st.started {
                info!("{}: driver reset the device", self.name);
            }
            st.started = false;
            st.status = 0;
            self.iotlb.lock().unwrap().clear();
            self.qp.apply(|s| {
                s.rx.reset();
                s.tx.reset();
                s.mem = Arc::new(MemView::empty());
                s.qp.reset();
            });
            for k in &self.kicks {
                let _ = k.read();
            }
            self.record_status(0);
            return true;
        }
        if status & uapi::VIRTIO_CONFIG_S_DRIVER_OK != 0 && !st.started {
            if let Err(e) = self.start(&mut st, false) {
                error!("{}: starting the device: {e}", self.name);
                return false;
            }
        }
        st.status = status;
        self.record_status(status);
        true
    }

    /// Takes over a device whose driver a killed vfrelay was serving (its
    /// status in our record says DRIVER_OK): the rings resume where the
    /// used rings say.
    pub(crate) fn resume(self: &Arc<Self>, status: u8) -> Result<(), String> {
        let mut st = self.state.lock().unwrap();
        if st.started {
            return Ok(());
        }
        self.start(&mut st, true)?;
        st.status = status;
        self.record_status(status);
        // Kicks sent to the dead process's eventfds are lost: look at the
        // rings now.
        for k in &self.kicks {
            let _ = k.write(1);
        }
        Ok(())
    }

    /// DRIVER_OK: features, ring addresses and indices, memory, kick fds.
    /// `resume`: the driver has run for a while (a crashed vfrelay served
    /// it), so the indices are the used rings', not VQ_GET_INFO's.
    fn start(self: &Arc<Self>, st: &mut State, resume: bool) -> Result<(), String> {
        let features = self.dev.driver_features().map_err(|e| e.to_string())?;
        let mut vqs = [VqState::default(); 2];
        for (i, vq) in vqs.iter_mut().enumerate() {
            let info = self.dev.vq_info(i as u32).map_err(|e| e.to_string())?;
            vq.ready = info.ready != 0;
            if !vq.ready {
                continue;
            }
            if info.num == 0 || info.num > self.qsize as u32 || !info.num.is_power_of_two() {
                return Err(format!("queue {i}: bad size {}", info.num));
            }
            vq.addrs = Some(RingAddrs {
                desc: info.desc_addr,
                avail: info.driver_addr,
                used: info.device_addr,
                size: info.num as u16,
            });
            // What the driver says (0 after a reset; the saved index after
            // vhost-vdpa's SET_VRING_BASE). The dataplane resumes a
            // starting ring at the guest's used index whatever this says
            // (dataplane::resume_from_used); they agree unless a back end
            // died with chains in flight.
            vq.next_avail = info.split_avail_index();
        }
        let view = {
            let mut t = self.iotlb.lock().unwrap();
            t.clear();
            t.update(&self.dev, 0, u64::MAX)
                .map_err(|e| format!("reading the IOTLB: {e}"))?;
            t.view()
        };
        for (i, vq) in vqs.iter_mut().enumerate() {
            let Some(a) = vq.addrs else { continue };
            if resume {
                // This device completes chains in order, so the used index
                // is also how far it had consumed.
                vq.next_avail = used_idx(&view, a.used)
                    .ok_or(format!("queue {i}: used ring {:#x} not mapped", a.used))?;
            }
            debug!(
                "{}: queue {i}: size {} desc {:#x} avail {:#x} used {:#x} from {}",
                self.name, a.size, a.desc, a.avail, a.used, vq.next_avail
            );
        }
        let mut kicks = Vec::new();
        for (i, k) in self.kicks.iter().enumerate() {
            let _ = k.read();
            self.dev
                .set_kickfd(i as u32, k.as_raw_fd())
                .map_err(|e| e.to_string())?;
            kicks.push(k.try_clone().map_err(|e| e.to_string())?);
        }
        st.started = true;
        let event_idx = features & crate::net::F_EVENT_IDX != 0;
        let low = view.maps(0);
        self.qp.apply(move |s| {
            s.mem = view;
            s.qp.sync_features(features);
            for (i, (vq, kick)) in vqs.iter().zip(kicks).enumerate() {
                let r = s.vring_mut(i);
                r.addrs = vq.addrs;
                r.next_avail = vq.next_avail;
                r.next_used = vq.next_avail;
                r.event_idx = event_idx;
                r.enabled = true;
                r.kick = Some(kick);
                r.started = vq.ready;
            }
        });
        info!(
            "{}: driver ready, features {features:#x}, IOVA 0 {}",
            self.name,
            if low {
                "mapped"
            } else {
                "not mapped yet (looked up when a ring first needs it)"
            }
        );
        Ok(())
    }

    /// Lets go of the queue pair: its rings stopped and forgotten, and
    /// with them their references to `self` (for interrupts, misses).
    pub(crate) fn release_qp(&self) {
        self.qp.apply(|s| {
            s.rx.notifier = None;
            s.tx.notifier = None;
            s.miss = None;
            s.reset();
        });
    }

    /// The response to one request as read from the device; None for one
    /// without an id to answer.
    pub(crate) fn answer(self: &Arc<Self>, msg: &[u8]) -> Option<[u8; uapi::MSG_SIZE]> {
        Some(match dev::parse_request(msg) {
            Ok((id, req)) => {
                let (ok, vq_state) = self.handle(req);
                dev::encode_response(id, ok, vq_state)
            }
            Err((Some(id), e)) => {
                warn!(
                    "{}: malformed request {id}: {e}; answering FAILED",
                    self.name
                );
                dev::encode_response(id, false, None)
            }
            Err((None, e)) => {
                warn!("{}: malformed request without an id: {e}", self.name);
                return None;
            }
        })
    }
}

/// Answers the kernel's requests until told to stop or the device breaks.
fn serve_requests(sh: Arc<Shared>) {
    let mut buf = [0u8; uapi::MSG_SIZE];
    while !sh.stop_requests.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: sh.dev.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n <= 0 {
            continue;
        }
        if pfd.revents & libc::POLLERR != 0 {
            error!("{}: device broken (a request timed out)", sh.name);
            sh.broken.store(true, Ordering::SeqCst);
            return;
        }
        if pfd.revents & libc::POLLIN == 0 {
            continue;
        }
        let len = match sh.dev.read_request(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("{}: reading a request: {e}", sh.name);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(resp) = sh.answer(&buf[..len]) else {
            continue;
        };
        if let Err(e) = sh.dev.write_response(&resp) {
            warn!("{}: writing a response: {e}", sh.name);
        }
    }
}

/// Whether process `pid` exists and is a vfrelay.
fn vfrelay_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "vfrelay")
}

fn sysfs_write(path: &Path, val: &str) -> Result<(), Error> {
    std::fs::write(path, val).map_err(sys(format!("writing '{val}' to {}", path.display())))
}

fn current_driver(devdir: &Path) -> Option<String> {
    std::fs::read_link(devdir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Binds vdpa device `name` to `driver`: driver_override, then unbind from
/// whatever took it when it was added, then reprobe.
fn bind_driver(name: &str, driver: &'static str) -> Result<(), Error> {
    let bus = Path::new("/sys/bus/vdpa");
    let devdir = bus.join("devices").join(name);
    sysfs_write(&devdir.join("driver_override"), driver)?;
    let cur = current_driver(&devdir);
    if cur.as_deref() == Some(driver) {
        return Ok(());
    }
    if let Some(c) = &cur {
        info!("{name}: unbinding from {c}");
        sysfs_write(&bus.join("drivers").join(c).join("unbind"), name)?;
    }
    sysfs_write(&bus.join("drivers_probe"), name)?;
    match current_driver(&devdir) {
        Some(d) if d == driver => Ok(()),
        got => Err(Error::Bind {
            name: name.into(),
            want: driver,
            got: got.unwrap_or_else(|| "no driver".into()),
        }),
    }
}

/// What the bound driver made of the device, for the log.
fn describe_binding(name: &str) -> String {
    let devdir = PathBuf::from("/sys/bus/vdpa/devices").join(name);
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&devdir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("vhost-vdpa-") {
                found.push(format!("/dev/{n}"));
            } else if n.starts_with("virtio") {
                if let Ok(nets) = std::fs::read_dir(e.path().join("net")) {
                    for i in nets.flatten() {
                        found.push(format!("netdev {}", i.file_name().to_string_lossy()));
                    }
                }
            }
        }
    }
    if found.is_empty() {
        "nothing visible from this network namespace (yet)".into()
    } else {
        found.join(", ")
    }
}

/// One VDUSE port: the device, its request thread, its attachment.
pub struct Port {
    name: String,
    control: Control,
    store: state::Store,
    shared: Option<Arc<Shared>>,
    requests: Option<JoinHandle<()>>,
    /// A vdpa device we added and must delete.
    added: bool,
    /// With --attach none the user may have attached it.
    user_attached: bool,
    /// A device of ours exists, to destroy on drop.
    created: bool,
}

impl Port {
    /// Creates the device, starts answering the kernel, and attaches it to
    /// the bus driver asked for. `qp` is the queue pair (already on a
    /// worker) that carries its traffic.
    ///
    /// A device of that name left by a vfrelay that was killed (our record
    /// of it in /run/vfrelay/vduse, and nobody holding it open) is taken
    /// over: served again as it is, with its driver and netdev, or, if it
    /// was created with other settings or the kernel gave up on it,
    /// detached, destroyed and created afresh.
    pub fn new(net: &VduseNet, qp: QpRef) -> Result<Port, Error> {
        dev::validate_name(&net.name)?;
        let control = Control::open()?;
        let driver = net.attach.driver();
        if let Some(d) = driver {
            if !Path::new("/sys/bus/vdpa/drivers").join(d).exists() {
                return Err(Error::NoDriver(d));
            }
        }
        let mut port = Port {
            name: net.name.clone(),
            control,
            store: state::Store::default(),
            shared: None,
            requests: None,
            added: false,
            user_attached: false,
            created: false,
        };
        let want = state::Record {
            pid: std::process::id(),
            features: net.device_features(),
            config: net.config_space(),
            queue_size: net.cfg.queue_size,
            status: 0,
        };
        match port.create(&want) {
            Err(Error::Dev(dev::Error::Exists(_))) => {
                if port.take_over(net, &want, qp.clone())? {
                    return Ok(port);
                }
                port.create(&want)?;
            }
            r => r?,
        }
        info!(
            "created VDUSE device {} (features {:#x})",
            net.name, want.features
        );
        // On any error below, dropping `port` destroys the device again.
        let device = Device::open(&net.name)?;
        for i in 0..VQ_NUM {
            device.vq_setup(i, net.cfg.queue_size)?;
        }
        port.serve(device, net, qp, want, |_| Ok(()))?;
        match driver {
            Some(d) => {
                netlink::dev_add(&net.name)?;
                port.added = true;
                bind_driver(&net.name, d)?;
                info!(
                    "{} attached to {d}: {}",
                    net.name,
                    describe_binding(&net.name)
                );
            }
            None => {
                port.user_attached = true;
                info!(
                    "{} ready; attach with: vdpa dev add name {} mgmtdev vduse",
                    net.name, net.name
                );
            }
        }
        Ok(port)
    }

    /// CREATE_DEV, and our record of it.
    fn create(&mut self, want: &state::Record) -> Result<(), Error> {
        self.control.create(
            &self.name,
            uapi::VIRTIO_ID_NET,
            want.features,
            VQ_NUM,
            &want.config,
        )?;
        self.created = true;
        if let Err(e) = self.store.write(&self.name, want) {
            warn!(
                "{}: writing {}: {e}; a vfrelay started after a crash of this one will not \
                 take the device over",
                self.name,
                self.store.path(&self.name).display()
            );
        }
        Ok(())
    }

    /// Starts answering the kernel's requests on `device`.
    fn serve(
        &mut self,
        device: Device,
        net: &VduseNet,
        qp: QpRef,
        record: state::Record,
        before: impl FnOnce(&Arc<Shared>) -> Result<(), Error>,
    ) -> Result<Arc<Shared>, Error> {
        let sh = Shared::new(
            net.name.clone(),
            device,
            net.cfg.queue_size,
            qp,
            self.store.clone(),
            record,
        )?;
        self.shared = Some(sh.clone());
        // Before any request is answered: the kernel re-queues those a dead
        // vfrelay left unanswered, and they must meet the state restored.
        // Its failure is returned once the thread runs: tearing the device
        // down needs our answers.
        let restored = before(&sh);
        let t = sh.clone();
        self.requests = Some(
            std::thread::Builder::new()
                .name(format!("vduse-{}", net.name))
                .spawn(move || serve_requests(t))
                .map_err(sys("spawning the request thread"))?,
        );
        restored.map(|()| sh)
    }

    /// The device exists already. Ours (we have a record of it) and not
    /// held open by anyone (the kernel allows one opener; EBUSY otherwise):
    /// serve it again and return true, or destroy it and return false when
    /// it cannot be served as asked. Anything else is an error, and the
    /// device is left alone.
    fn take_over(
        &mut self,
        net: &VduseNet,
        want: &state::Record,
        qp: QpRef,
    ) -> Result<bool, Error> {
        let name = net.name.clone();
        let path = self.store.path(&name);
        let rec = match self.store.read(&name) {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Error::NotOurs { name, path }),
            Err(e) => {
                return Err(Error::Sys {
                    what: format!("VDUSE device {name} exists; reading {}", path.display()),
                    source: e,
                })
            }
        };
        if rec.pid != std::process::id() && vfrelay_runs(rec.pid) {
            // Created, not opened yet: it is starting.
            return Err(Error::Served { name, pid: rec.pid });
        }
        let device = Device::open(&name).map_err(|e| match e {
            dev::Error::Busy(_) => Error::Served {
                name: name.clone(),
                pid: rec.pid,
            },
            e => e.into(),
        })?;
        // From here the device is ours to serve or destroy (a failure below
        // detaches and destroys it, so the next attempt starts afresh).
        self.created = true;
        // A device the kernel marked broken (a request timed out while
        // nobody served it) refuses every ioctl with EPERM.
        let broken = device.driver_features().is_err();
        let why = if broken {
            Some("the kernel gave up on it (a request timed out)")
        } else if !rec.same_device(want) {
            Some("it was created with other settings")
        } else {
            None
        };
        let restore = |sh: &Arc<Shared>| -> Result<(), Error> {
            if why.is_some() {
                return Ok(());
            }
            if rec.status & uapi::VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                sh.resume(rec.status).map_err(|e| Error::Sys {
                    what: format!("{name}: resuming the device a previous vfrelay left"),
                    source: io::Error::other(e),
                })
            } else {
                sh.state.lock().unwrap().status = rec.status;
                sh.record_status(rec.status);
                Ok(())
            }
        };
        // Known before serving: a failed restore tears down, detach first.
        let attached = Path::new("/sys/bus/vdpa/devices").join(&name).exists();
        self.added = attached;
        let sh = self.serve(device, net, qp, rec.clone(), restore)?;
        if let Some(why) = why {
            info!(
                "{name}: destroying the VDUSE device a previous vfrelay (pid {}) left: {why}",
                rec.pid
            );
            // Detaching resets the device, which needs our answers; then
            // the last reference to it goes (`sh` too) so it can be closed
            // and destroyed.
            drop(sh);
            self.destroy();
            return Ok(false);
        }
        match net.attach.driver() {
            Some(d) => {
                if !attached {
                    netlink::dev_add(&name)?;
                }
                self.added = true;
                bind_driver(&name, d)?;
            }
            None => self.user_attached = true,
        }
        info!(
            "{name}: took over the VDUSE device a previous vfrelay (pid {}) left, driver status \
             {:#x}: {}",
            rec.pid,
            rec.status,
            describe_binding(&name)
        );
        Ok(true)
    }

    /// The kernel stopped waiting for our answers: the device is dead.
    pub fn broken(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.broken.load(Ordering::SeqCst))
    }

    /// Detach (the driver's teardown resets the device, which needs the
    /// request thread), stop answering, and let go of the queue pair.
    pub fn close(&mut self) {
        if self.added || self.user_attached {
            match netlink::dev_del(&self.name) {
                Ok(()) => info!("{}: detached", self.name),
                Err(e) if !self.added => debug!("{}: {e}", self.name),
                Err(e) => error!("{}: detaching: {e}", self.name),
            }
            self.added = false;
            self.user_attached = false;
        }
        if let Some(sh) = &self.shared {
            sh.stop_requests.store(true, Ordering::SeqCst);
        }
        if let Some(t) = self.requests.take() {
            let _ = t.join();
        }
        if let Some(sh) = &self.shared {
            sh.release_qp();
        }
    }

    /// Close, then destroy the device and its record.
    fn destroy(&mut self) {
        self.close();
        // Last reference: closes /dev/vduse/NAME so it can be destroyed.
        self.shared = None;
        if !std::mem::take(&mut self.created) {
            return;
        }
        // Destroying can race the vdpa device's final release for a moment.
        let mut destroyed = self.control.destroy(&self.name);
        for _ in 0..50 {
            match &destroyed {
                Err(dev::Error::Io { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                    destroyed = self.control.destroy(&self.name);
                }
                _ => break,
            }
        }
        match destroyed {
            Ok(()) => {
                self.store.remove(&self.name);
                info!("destroyed VDUSE device {}", self.name)
            }
            Err(e) => error!("{e}"),
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.destroy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfrelay_backends::BackendSpec;

    use crate::dataplane::worker::{QpKey, Slot, WorkerHandle};
    use crate::dataplane::QueuePair;

    /// A device on /dev/null whose queue pair runs on its own worker.
    fn shared(poll: bool) -> Arc<Shared> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        shared_on(Device::from_file(file), poll)
    }

    /// The handler over `dev`, its queue pair on its own worker.
    fn shared_on<D: VduseDev>(dev: D, poll: bool) -> Arc<Shared<D>> {
        let backend = BackendSpec::Loopback.open(1).unwrap().pop().unwrap();
        let worker = Arc::new(WorkerHandle::spawn(0, None, poll).unwrap());
        let key = QpKey { port: 1, index: 0 };
        let qp = QpRef::add(worker, Box::new(Slot::new(key, QueuePair::new(0, backend))));
        let store = state::Store::at(std::env::temp_dir().join(format!(
            "vfx-vduse-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )));
        let rec = state::Record {
            pid: 0,
            features: 0,
            config: Vec::new(),
            queue_size: 256,
            status: 0,
        };
        Shared::new("test".into(), dev, 256, qp, store, rec).unwrap()
    }

    /// Removes what `shared` wrote (status records).
    fn done<D: VduseDev>(sh: Arc<Shared<D>>) {
        let _ = std::fs::remove_dir_all(sh.store.dir());
    }

    fn set_next_avail(sh: &Shared, vq: usize, v: u16) {
        sh.qp
            .apply(move |s| s.vring_mut(vq).next_avail = v)
            .unwrap();
    }

    fn next_avail(sh: &Shared, vq: usize) -> u16 {
        sh.qp.apply(move |s| s.vring_mut(vq).next_avail).unwrap()
    }

    #[test]
    fn get_vq_state_reports_next_avail() {
        for poll in [false, true] {
            let sh = shared(poll);
            set_next_avail(&sh, 0, 17);
            set_next_avail(&sh, 1, 0xfffe);
            let r = sh.handle(Request::GetVqState { index: 0 });
            assert_eq!(r, (true, Some((0, 17))));
            let r = sh.handle(Request::GetVqState { index: 1 });
            assert_eq!(r, (true, Some((1, 0xfffe))));
            // A queue the device does not have: FAILED, no panic.
            for index in [2, u32::MAX] {
                assert_eq!(sh.handle(Request::GetVqState { index }), (false, None));
            }
            done(sh);
        }
    }

    #[test]
    fn reset_and_iotlb_updates_before_driver_ok() {
        let sh = shared(false);
        let r = sh.handle(Request::UpdateIotlb {
            start: 0,
            last: u64::MAX,
        });
        assert_eq!(r, (true, None));
        // ACKNOWLEDGE | DRIVER | FEATURES_OK: recorded, nothing started.
        assert_eq!(sh.handle(Request::SetStatus { status: 0xb }), (true, None));
        assert!(!sh.state.lock().unwrap().started);
        // Where a vfrelay taking the device over after a crash finds it.
        let rec = || sh.store.read("test").unwrap().unwrap();
        assert_eq!((rec().status, rec().pid), (0xb, std::process::id()));
        set_next_avail(&sh, 0, 5);
        assert_eq!(sh.handle(Request::SetStatus { status: 0 }), (true, None));
        assert_eq!(sh.state.lock().unwrap().status, 0);
        assert_eq!(next_avail(&sh, 0), 0);
        assert_eq!(rec().status, 0);
        done(sh);
    }

    #[test]
    fn driver_ok_fails_cleanly_when_the_kernel_refuses() {
        // /dev/null answers no VDUSE ioctl: starting must fail (FAILED to
        // the driver), not panic, and leave the device stopped.
        let sh = shared(false);
        assert_eq!(sh.handle(Request::SetStatus { status: 0xf }), (false, None));
        assert!(!sh.state.lock().unwrap().started);
        // Not recorded as DRIVER_OK: a successor must not resume it.
        assert!(sh
            .store
            .read("test")
            .unwrap()
            .is_none_or(|r| r.status & uapi::VIRTIO_CONFIG_S_DRIVER_OK == 0));
        done(sh);
    }

    #[test]
    fn the_used_index_is_read_from_guest_memory() {
        let mut buf = vec![0u8; 64];
        buf[0x12..0x14].copy_from_slice(&0xbeefu16.to_le_bytes());
        let mut v = MemView::empty();
        // SAFETY: `buf` outlives the view.
        assert!(unsafe { v.add(0x1000, 64, buf.as_mut_ptr(), Perm::ReadWrite) });
        // used->idx is at used + 2.
        assert_eq!(used_idx(&v, 0x1010), Some(0xbeef));
        assert_eq!(used_idx(&v, 0x103f), None, "past the mapping");
        assert_eq!(used_idx(&v, u64::MAX), None);
    }

    #[test]
    fn the_miss_handler_maps_what_the_kernel_added_and_nothing_else() {
        use fake::{memfd, FakeDevice};
        let dev = FakeDevice {
            bounce: Some(0x4000),
            ..Default::default()
        };
        let sh = shared_on(dev, false);
        let fake = &sh.dev;
        fake.add(0x10000, 0x1000, uapi::ACCESS_RW, Arc::new(memfd(0x1000)), 0);
        let mut miss = sh.miss_handler();
        let empty = MemView::empty();
        let v = miss(&empty, 0x10800).expect("an entry the view lacks");
        assert!(v.translate(0x10800, 1, Perm::Read).is_some());
        assert!(miss(&v, 0x10800).is_none(), "mapped the same: a bad access");
        assert!(miss(&v, 0xdead_0000).is_none(), "mapped nowhere");
        // The bounce map appears without a request: found on the miss, and
        // served from our memory.
        fake.add(0, 0x4000, uapi::ACCESS_RW, Arc::new(memfd(0)), 0);
        let v2 = miss(&v, 0x100).expect("bounce map");
        let (uaddr, _) = fake.umem.lock().unwrap().unwrap();
        assert_eq!(v2.translate(0, 1, Perm::Read).unwrap() as u64, uaddr);
        assert!(
            v2.translate(0x10800, 1, Perm::Read).is_some(),
            "the rest is kept"
        );
        assert_eq!(
            *fake.get_info_calls.lock().unwrap(),
            1,
            "CAP_UMEM asked once"
        );
        done(sh);
    }

    #[test]
    fn offered_features() {
        let net = VduseNet {
            name: "x".into(),
            attach: Attach::None,
            cfg: NetConfig {
                mac: [0x52, 0x54, 0, 0, 0, 1],
                mtu: 1500,
                queue_pairs: 1,
                queue_size: 256,
            },
            offloads: 0,
        };
        let f = net.device_features();
        assert!(f & uapi::VIRTIO_F_ACCESS_PLATFORM != 0);
        assert!(f & crate::dataplane::VIRTIO_F_VERSION_1 != 0);
        assert_eq!(f & uapi::VIRTIO_NET_F_CTRL_VQ, 0);
        assert_eq!(f & crate::net::F_MQ, 0);
        assert_eq!(net.config_space().len(), 12);
    }
}
