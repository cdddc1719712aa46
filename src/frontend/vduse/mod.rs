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

use crate::dataplane::mem::{MemView, Perm};
use crate::dataplane::ring::{ChainError, RingAddrs};
use crate::dataplane::vring::Notifier;
use crate::dataplane::worker::{MemProbe, QpRef};
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
    /// The view has nothing at IOVA 0. Under virtio_vdpa the bounce map
    /// appears with the driver's first DMA mapping, after DRIVER_OK and
    /// without an UPDATE_IOTLB; until it is seen, the worker probes for it
    /// before each round ([`Shared::mem_probe`]).
    probe_low: AtomicBool,
    kicks: [EventFd; 2],
    /// Ends the request thread (after detach: detaching needs answers).
    stop_requests: AtomicBool,
    broken: AtomicBool,
}

impl Notifier for Shared {
    fn signal(&self, vq: u16) {
        if let Err(e) = self.dev.inject_irq(vq as u32) {
            debug!("{}: VQ_INJECT_IRQ {vq}: {e}", self.name);
        }
    }
    fn broken(&self, vq: u16, err: &ChainError) {
        debug!("{}: queue {vq} stopped: {err}", self.name);
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
            probe_low: AtomicBool::new(true),
            kicks: [efd()?, efd()?],
            stop_requests: AtomicBool::new(false),
            broken: AtomicBool::new(false),
        });
        let n: Arc<dyn Notifier> = sh.clone();
        sh.qp.apply(move |s| {
            s.rx.notifier = Some(n.clone());
            s.tx.notifier = Some(n);
        });
        Ok(sh)
    }

    /// Re-reads the IOTLB into a fresh view and hands it to the worker in
    /// one step (the old one is unmapped once the worker lets go of it).
    /// While IOVA 0 is unmapped the worker probes for it before each round.
    fn refresh_view(self: &Arc<Self>, st: &mut State) {
        match iotlb::build_view(&self.dev) {
            Ok(v) => {
                let low = v.translate(0, 1, Perm::Read).is_none();
                self.probe_low.store(low, Ordering::SeqCst);
                let probe = (st.started && low).then(|| self.mem_probe());
                self.qp.apply(move |s| {
                    s.mem = v;
                    s.probe = probe;
                    // Cached ring translations keep the old view alive.
                    s.qp.reset();
                });
            }
            Err(e) => error!("{}: reading the IOTLB: {e}", self.name),
        }
    }

    /// One ioctl per round until the bounce map is there: the driver's first
    /// frames point into it, and a round run without it would stop the
    /// queue for a buffer "outside guest memory".
    fn mem_probe(self: &Arc<Self>) -> MemProbe {
        let sh = Arc::downgrade(self);
        Box::new(move || {
            let sh = sh.upgrade()?;
            if !sh.dev.iotlb_has(0, 0) {
                return None;
            }
            let v = iotlb::build_view(&sh.dev).ok()?;
            v.translate(0, 1, Perm::Read)?;
            // Not the state lock: its holder may be waiting for this worker.
            sh.probe_low.store(false, Ordering::SeqCst);
            debug!("{}: IOVA 0 mapped", sh.name);
            Some(v)
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
                let mut st = self.state.lock().unwrap();
                if st.started {
                    self.refresh_view(&mut st);
                } else {
                    // Mapped afresh at DRIVER_OK.
                    self.qp.apply(|s| {
                        s.mem = Arc::new(MemView::empty());
                        s.qp.reset();
                    });
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
            self.probe_low.store(true, Ordering::SeqCst);
            self.qp.apply(|s| {
                s.rx.reset();
                s.tx.reset();
                s.mem = Arc::new(MemView::empty());
                s.probe = None;
                s.qp.reset();
            });
            for k in &self.kicks {
                let _ = k.read();
            }
            return true;
        }
        st.status = status;
        if status & uapi::VIRTIO_CONFIG_S_DRIVER_OK != 0 && !st.started {
            if let Err(e) = self.start(&mut st) {
                error!("{}: starting the device: {e}", self.name);
                return false;
            }
        }
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
            debug!(
                "{}: queue {i}: size {} desc {:#x} avail {:#x} used {:#x} from {}",
                self.name,
                info.num,
                info.desc_addr,
                info.driver_addr,
                info.device_addr,
                vq.next_avail
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
        // Started before the view goes in, so the worker probes for IOVA 0
        // from its first round if it is not mapped yet.
        st.started = true;
        self.refresh_view(st);
        let event_idx = features & crate::net::F_EVENT_IDX != 0;
        self.qp.apply(move |s| {
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
            if self.probe_low.load(Ordering::SeqCst) {
                "not mapped yet"
            } else {
                "mapped"
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
                s.probe = None;
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
