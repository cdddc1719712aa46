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
pub mod iotlb;
pub mod netlink;
pub mod uapi;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dataplane::mem::MemView;
use crate::dataplane::ring::{ChainError, RingAddrs};
use crate::dataplane::vring::Notifier;
use crate::dataplane::worker::QpRef;
use crate::dataplane::MissFn;
use crate::net::NetConfig;
use dev::{Control, Device, Request};

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

struct Shared {
    name: String,
    dev: Device,
    qsize: u16,
    qp: QpRef,
    state: Mutex<State>,
    /// The IOTLB as mapped here. Its own lock, never held while waiting for
    /// the worker: the worker takes it on a miss ([`Shared::miss_handler`]).
    iotlb: Mutex<iotlb::Table>,
    kicks: [EventFd; 2],
    /// Ends the request thread (after detach: detaching needs answers).
    stop_requests: AtomicBool,
    broken: AtomicBool,
    /// Tests: an IOTLB of memfds instead of the device's.
    #[cfg(test)]
    fake_iotlb: std::sync::OnceLock<Arc<iotlb::fake::FakeIotlb>>,
}

impl Notifier for Shared {
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

impl Shared {
    /// A device before DRIVER_OK: no rings, no memory view, nothing acked.
    fn new(name: String, dev: Device, qsize: u16, qp: QpRef) -> Result<Arc<Shared>, Error> {
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
            iotlb: Mutex::new(iotlb::Table::default()),
            kicks: [efd()?, efd()?],
            stop_requests: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            #[cfg(test)]
            fake_iotlb: std::sync::OnceLock::new(),
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

    fn iotlb_dev(&self) -> &dyn iotlb::IotlbDev {
        #[cfg(test)]
        if let Some(f) = self.fake_iotlb.get() {
            return &**f;
        }
        &self.dev
    }

    /// Re-reads the IOTLB in `[start, last]` and hands the worker the new
    /// view in one step (the old one is unmapped once the worker lets go
    /// of it). Returns once the worker uses it: the kernel may reuse what
    /// was unmapped as soon as we answer.
    fn refresh_view(&self, start: u64, last: u64) {
        let v = {
            let mut t = self.iotlb.lock().unwrap();
            if let Err(e) = t.update(self.iotlb_dev(), start, last) {
                error!("{}: reading the IOTLB: {e}", self.name);
            }
            t.view()
        };
        self.qp.apply(move |s| s.mem = v);
    }

    /// Asked by the worker when a ring finds an address outside its view:
    /// the kernel adds some mappings without telling us (the bounce map
    /// with the driver's first DMA mapping, coherent allocations). One
    /// lookup per miss, never one per round.
    fn miss_handler(self: &Arc<Self>) -> MissFn {
        let sh = Arc::downgrade(self);
        Box::new(move |cur: &MemView, addr: u64| {
            let sh = sh.upgrade()?;
            let mut t = sh.iotlb.lock().unwrap();
            if let Err(e) = t.update(sh.iotlb_dev(), addr, addr) {
                debug!("{}: IOTLB lookup of {addr:#x}: {e}", sh.name);
                return None;
            }
            let v = t.view();
            // A new view only if it maps `addr` differently: else the
            // address is bad (or lacks the access needed) and the queue
            // stops.
            let new = v.translate(addr, 1);
            (new.is_some() && new != cur.translate(addr, 1)).then(|| {
                debug!("{}: IOVA {addr:#x} found on a miss", sh.name);
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
            return true;
        }
        if status & uapi::VIRTIO_CONFIG_S_DRIVER_OK != 0 && !st.started {
            if let Err(e) = self.start(&mut st) {
                error!("{}: starting the device: {e}", self.name);
                return false;
            }
        }
        st.status = status;
        true
    }

    /// DRIVER_OK: features, ring addresses and indices, memory, kick fds.
    fn start(self: &Arc<Self>, st: &mut State) -> Result<(), String> {
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
            // Where the driver wants us to resume (0 after a reset; the
            // saved index after vhost-vdpa's SET_VRING_BASE). Every chain
            // before it was used, so used resumes there too.
            vq.next_avail = info.split_avail_index();
        }
        let view = {
            let mut t = self.iotlb.lock().unwrap();
            t.clear();
            t.update(self.iotlb_dev(), 0, u64::MAX)
                .map_err(|e| format!("reading the IOTLB: {e}"))?;
            t.view()
        };
        for (i, vq) in vqs.iter().enumerate() {
            let Some(a) = vq.addrs else { continue };
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
        let low = view.translate(0, 1).is_some();
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
        let resp = match dev::parse_request(&buf[..len]) {
            Ok((id, req)) => {
                let (ok, vq_state) = sh.handle(req);
                dev::encode_response(id, ok, vq_state)
            }
            Err((Some(id), e)) => {
                warn!("{}: malformed request {id}: {e}; answering FAILED", sh.name);
                dev::encode_response(id, false, None)
            }
            Err((None, e)) => {
                warn!("{}: malformed request without an id: {e}", sh.name);
                continue;
            }
        };
        if let Err(e) = sh.dev.write_response(&resp) {
            warn!("{}: writing a response: {e}", sh.name);
        }
    }
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
        "nothing visible yet".into()
    } else {
        found.join(", ")
    }
}

/// One VDUSE port: the device, its request thread, its attachment.
pub struct Port {
    name: String,
    control: Control,
    shared: Option<Arc<Shared>>,
    requests: Option<JoinHandle<()>>,
    /// A vdpa device we added and must delete.
    added: bool,
    /// With --attach none the user may have attached it.
    user_attached: bool,
}

impl Port {
    /// Creates the device, starts answering the kernel, and attaches it to
    /// the bus driver asked for. `qp` is the queue pair (already on a
    /// worker) that carries its traffic.
    pub fn new(net: &VduseNet, qp: QpRef) -> Result<Port, Error> {
        dev::validate_name(&net.name)?;
        let control = Control::open()?;
        let driver = net.attach.driver();
        if let Some(d) = driver {
            if !Path::new("/sys/bus/vdpa/drivers").join(d).exists() {
                return Err(Error::NoDriver(d));
            }
        }
        control.create(
            &net.name,
            uapi::VIRTIO_ID_NET,
            net.device_features(),
            VQ_NUM,
            &net.config_space(),
        )?;
        info!(
            "created VDUSE device {} (features {:#x})",
            net.name,
            net.device_features()
        );
        let mut port = Port {
            name: net.name.clone(),
            control,
            shared: None,
            requests: None,
            added: false,
            user_attached: driver.is_none(),
        };
        // On any error below, dropping `port` destroys the device again.
        let device = Device::open(&net.name)?;
        for i in 0..VQ_NUM {
            device.vq_setup(i, net.cfg.queue_size)?;
        }
        let sh = Shared::new(net.name.clone(), device, net.cfg.queue_size, qp)?;
        port.shared = Some(sh.clone());
        port.requests = Some(
            std::thread::Builder::new()
                .name(format!("vduse-{}", net.name))
                .spawn(move || serve_requests(sh))
                .map_err(sys("spawning the request thread"))?,
        );
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
            None => info!(
                "{} ready; attach with: vdpa dev add name {} mgmtdev vduse",
                net.name, net.name
            ),
        }
        Ok(port)
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
            // The worker's rings hold the device (for interrupts) until now.
            sh.qp.apply(|s| {
                s.rx.notifier = None;
                s.tx.notifier = None;
                s.miss = None;
                s.reset();
            });
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.close();
        // Last reference: closes /dev/vduse/NAME so it can be destroyed.
        self.shared = None;
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
            Ok(()) => info!("destroyed VDUSE device {}", self.name),
            Err(e) => error!("{e}"),
        }
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
        let backend = BackendSpec::Loopback.open(1).unwrap().pop().unwrap();
        let worker = Arc::new(WorkerHandle::spawn(0, None, poll).unwrap());
        let key = QpKey { port: 1, index: 0 };
        let qp = QpRef::add(worker, Box::new(Slot::new(key, QueuePair::new(0, backend))));
        Shared::new("test".into(), Device::from_file(file), 256, qp).unwrap()
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
        set_next_avail(&sh, 0, 5);
        assert_eq!(sh.handle(Request::SetStatus { status: 0 }), (true, None));
        let st = sh.state.lock().unwrap();
        assert_eq!((st.status, next_avail(&sh, 0)), (0, 0));
    }

    #[test]
    fn driver_ok_fails_cleanly_when_the_kernel_refuses() {
        // /dev/null answers no VDUSE ioctl: starting must fail (FAILED to
        // the driver), not panic, and leave the device stopped.
        let sh = shared(false);
        assert_eq!(sh.handle(Request::SetStatus { status: 0xf }), (false, None));
        assert!(!sh.state.lock().unwrap().started);
    }

    #[test]
    fn the_miss_handler_maps_what_the_kernel_added_and_nothing_else() {
        use iotlb::fake::{memfd, FakeIotlb};
        let sh = shared(false);
        let fake = Arc::new(FakeIotlb {
            bounce: Some(0x4000),
            ..Default::default()
        });
        assert!(sh.fake_iotlb.set(fake.clone()).is_ok());
        fake.add(0x10000, 0x1000, uapi::ACCESS_RW, Arc::new(memfd(0x1000)), 0);
        let mut miss = sh.miss_handler();
        let empty = MemView::empty();
        let v = miss(&empty, 0x10800).expect("an entry the view lacks");
        assert!(v.translate(0x10800, 1).is_some());
        assert!(miss(&v, 0x10800).is_none(), "mapped the same: a bad access");
        assert!(miss(&v, 0xdead_0000).is_none(), "mapped nowhere");
        // The bounce map appears without a request: found on the miss, and
        // served from our memory.
        fake.add(0, 0x4000, uapi::ACCESS_RW, Arc::new(memfd(0)), 0);
        let v2 = miss(&v, 0x100).expect("bounce map");
        let (uaddr, _) = fake.umem.lock().unwrap().unwrap();
        assert_eq!(v2.translate(0, 1).unwrap() as u64, uaddr);
        assert!(v2.translate(0x10800, 1).is_some(), "the rest is kept");
        assert_eq!(
            *fake.get_info_calls.lock().unwrap(),
            1,
            "CAP_UMEM asked once"
        );
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
