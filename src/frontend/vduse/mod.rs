//! VDUSE frontend: vfrelay as a vDPA device in the kernel, for containers
//! (virtio_vdpa: a kernel virtio-net netdev) and VMs (vhost_vdpa:
//! /dev/vhost-vdpa-N for `qemu -netdev vhost-vdpa`).
//!
//! Like the vhost-user frontend it only supplies memory (the IOTLB as a
//! [`MemView`]), ring addresses and indices ([`RingCtl`]), kicks and
//! interrupts; the shared dataplane does everything else.
//!
//! Threads: the main thread creates, attaches, waits for SIGINT/SIGTERM and
//! tears down; a request thread answers the kernel (SET_STATUS,
//! GET_VQ_STATE, UPDATE_IOTLB); one worker runs the queue pair on kicks and
//! backend readiness (or busy-polls with --poll).
//!
//! Locking: the worker holds `State` for one burst (one `round`), so the
//! request thread sees ring indices and swaps memory views only between
//! bursts. In event mode the request thread also takes the QueuePair lock
//! first (same order as the worker), so the worker is wholly idle while a
//! request changes the device, and cached translations are dropped.

pub mod dev;
pub mod iotlb;
pub mod netlink;
pub mod uapi;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dataplane::mem::MemView;
use crate::dataplane::ring::RingAddrs;
use crate::dataplane::{QueuePair, RingCtl, RingPairAccess, RoundFn, VIRTIO_RING_F_EVENT_IDX};
use crate::device::NetConfig;
use crate::shutdown;
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
    #[error("VDUSE device {0} broke (the kernel stopped waiting for our answers)")]
    Broken(String),
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
            & !(crate::device::VIRTIO_NET_F_MQ | uapi::VIRTIO_NET_F_CTRL_VQ)
    }

    fn config_space(&self) -> Vec<u8> {
        // mac, status (link up), max_virtqueue_pairs (1), mtu.
        self.cfg
            .config_space(1, 0, crate::device::CONFIG_LEN as u32)
    }
}

#[derive(Clone, Copy)]
struct VqState {
    ready: bool,
    addrs: RingAddrs,
    next_avail: u16,
    next_used: u16,
}

impl Default for VqState {
    fn default() -> Self {
        VqState {
            ready: false,
            addrs: RingAddrs {
                desc: 0,
                avail: 0,
                used: 0,
                size: 0,
            },
            next_avail: 0,
            next_used: 0,
        }
    }
}

struct State {
    /// DRIVER_OK seen and the rings set up.
    started: bool,
    status: u8,
    features: u64,
    vqs: [VqState; 2],
    mem: Arc<MemView>,
    /// The view has nothing at IOVA 0. Under virtio_vdpa the bounce map
    /// appears with the driver's first DMA mapping, after DRIVER_OK and
    /// without an UPDATE_IOTLB; until it is seen, each round checks for it
    /// (one ioctl) and rebuilds the view once it is there.
    probe_low: bool,
}

struct Shared {
    name: String,
    dev: Device,
    poll: bool,
    qsize: u16,
    state: Mutex<State>,
    qp: Mutex<QueuePair>,
    kicks: [EventFd; 2],
    /// Wakes the worker (start, stop).
    wake: EventFd,
    /// Ends the worker (and poll loops).
    stop: AtomicBool,
    /// Ends the request thread (after detach: detaching needs answers).
    stop_requests: AtomicBool,
    broken: AtomicBool,
    acked: AtomicU64,
}

/// A locked virtqueue as the dataplane sees it.
struct VdRing<'a> {
    vq: &'a mut VqState,
    index: u32,
    started: bool,
    event_idx: bool,
    dev: &'a Device,
}

impl RingCtl for VdRing<'_> {
    fn active(&self) -> bool {
        self.started && self.vq.ready
    }
    fn addrs(&self) -> RingAddrs {
        self.vq.addrs
    }
    fn next_avail(&self) -> u16 {
        self.vq.next_avail
    }
    fn set_next_avail(&mut self, v: u16) {
        self.vq.next_avail = v;
    }
    fn next_used(&self) -> u16 {
        self.vq.next_used
    }
    fn set_next_used(&mut self, v: u16) {
        self.vq.next_used = v;
    }
    fn event_idx(&self) -> bool {
        self.event_idx
    }
    fn signal(&self) {
        if let Err(e) = self.dev.inject_irq(self.index) {
            debug!("VQ_INJECT_IRQ {}: {e}", self.index);
        }
    }
}

struct VdPair<'a>(&'a Shared);

impl RingPairAccess for VdPair<'_> {
    fn features(&self) -> u64 {
        self.0.acked.load(Ordering::Relaxed)
    }
    fn round(&self, f: &mut RoundFn<'_>) -> usize {
        let sh = self.0;
        let mut st = sh.state.lock().unwrap();
        if st.started && st.probe_low && sh.dev.iotlb_has(0, 0) {
            sh.refresh_view(&mut st);
        }
        let mem = st.mem.clone();
        let started = st.started;
        let event_idx = st.features & VIRTIO_RING_F_EVENT_IDX != 0;
        let [rx, tx] = &mut st.vqs;
        let mut rx = VdRing {
            vq: rx,
            index: 0,
            started,
            event_idx,
            dev: &sh.dev,
        };
        let mut tx = VdRing {
            vq: tx,
            index: 1,
            started,
            event_idx,
            dev: &sh.dev,
        };
        // No dirty log: VDUSE has none (vhost-vdpa migrates through QEMU's
        // shadow virtqueues).
        f(&mem, None, &mut rx, &mut tx)
    }
}

impl Shared {
    /// A device before DRIVER_OK: no rings, no memory view, nothing acked.
    fn new(
        name: String,
        dev: Device,
        poll: bool,
        qsize: u16,
        backend: Box<dyn vfrelay_backends::Backend>,
    ) -> Result<Shared, Error> {
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(sys("eventfd"));
        Ok(Shared {
            name,
            dev,
            poll,
            qsize,
            state: Mutex::new(State {
                started: false,
                status: 0,
                features: 0,
                vqs: Default::default(),
                mem: Arc::new(MemView::empty()),
                probe_low: true,
            }),
            qp: Mutex::new(QueuePair::new(0, backend)),
            kicks: [efd()?, efd()?],
            wake: efd()?,
            stop: AtomicBool::new(false),
            stop_requests: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            acked: AtomicU64::new(0),
        })
    }

    /// Re-reads the IOTLB into a fresh view (the old one is dropped once
    /// no cached ring holds it).
    fn refresh_view(&self, st: &mut State) {
        // Drop ours first so entries the kernel removed are unmapped now.
        st.mem = Arc::new(MemView::empty());
        match iotlb::build_view(&self.dev) {
            Ok(v) => {
                st.probe_low = v.translate(0, 1).is_none();
                st.mem = v;
            }
            Err(e) => error!("{}: reading the IOTLB: {e}", self.name),
        }
    }

    /// Takes the worker out of the way for a request: in event mode the
    /// QueuePair lock (the worker holds it while running), then State.
    fn quiesce(&self) -> Option<std::sync::MutexGuard<'_, QueuePair>> {
        (!self.poll).then(|| self.qp.lock().unwrap())
    }

    fn handle(&self, req: Request) -> (bool, Option<(u32, u16)>) {
        match req {
            Request::GetVqState { index } => {
                if index >= VQ_NUM {
                    warn!(
                        "{}: GET_VQ_STATE for queue {index}: no such queue",
                        self.name
                    );
                    return (false, None);
                }
                let _qp = self.quiesce();
                let st = self.state.lock().unwrap();
                let avail = st.vqs[index as usize].next_avail;
                debug!("{}: GET_VQ_STATE {index} -> avail {avail}", self.name);
                (true, Some((index, avail)))
            }
            Request::SetStatus { status } => (self.set_status(status), None),
            Request::UpdateIotlb { start, last } => {
                debug!("{}: UPDATE_IOTLB {start:#x}..={last:#x}", self.name);
                let mut qp = self.quiesce();
                let mut st = self.state.lock().unwrap();
                if st.started {
                    self.refresh_view(&mut st);
                } else {
                    // Mapped afresh at DRIVER_OK.
                    st.mem = Arc::new(MemView::empty());
                }
                if let Some(qp) = qp.as_mut() {
                    // Cached ring translations keep the old view alive.
                    qp.reset();
                }
                (true, None)
            }
        }
    }

    fn set_status(&self, status: u8) -> bool {
        let mut qp = self.quiesce();
        let mut st = self.state.lock().unwrap();
        debug!("{}: SET_STATUS {status:#x}", self.name);
        if status == 0 {
            if st.started {
                info!("{}: driver reset the device", self.name);
            }
            st.started = false;
            st.status = 0;
            st.features = 0;
            st.vqs = Default::default();
            st.mem = Arc::new(MemView::empty());
            if let Some(qp) = qp.as_mut() {
                qp.reset();
            }
            for k in &self.kicks {
                let _ = k.read();
            }
            return true;
        }
        st.status = status;
        if status & uapi::VIRTIO_CONFIG_S_DRIVER_OK != 0 && !st.started {
            match self.start(&mut st) {
                Ok(()) => {
                    if let Some(qp) = qp.as_mut() {
                        qp.reset();
                    }
                    drop(st);
                    drop(qp);
                    let _ = self.wake.write(1);
                }
                Err(e) => {
                    error!("{}: starting the device: {e}", self.name);
                    return false;
                }
            }
        }
        true
    }

    /// DRIVER_OK: features, ring addresses and indices, memory, kick fds.
    fn start(&self, st: &mut State) -> Result<(), String> {
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
            vq.addrs = RingAddrs {
                desc: info.desc_addr,
                avail: info.driver_addr,
                used: info.device_addr,
                size: info.num as u16,
            };
            // Where the driver wants us to resume (0 after a reset; the
            // saved index after vhost-vdpa's SET_VRING_BASE). Every chain
            // before it was used, so used resumes there too.
            vq.next_avail = info.split_avail_index();
            vq.next_used = vq.next_avail;
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
        for (i, k) in self.kicks.iter().enumerate() {
            let _ = k.read();
            self.dev
                .set_kickfd(i as u32, k.as_raw_fd())
                .map_err(|e| e.to_string())?;
        }
        st.vqs = vqs;
        st.features = features;
        self.acked.store(features, Ordering::SeqCst);
        self.refresh_view(st);
        st.started = true;
        info!(
            "{}: driver ready, features {features:#x}, IOVA 0 {}",
            self.name,
            if st.probe_low {
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
            shutdown::request();
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

/// Runs the queue pair on kicks, backend readiness and start/stop wake-ups.
fn worker(sh: Arc<Shared>, backend_fd: Option<RawFd>) {
    // SAFETY: plain epoll syscalls on fds that outlive this thread.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        error!("{}: epoll_create: {}", sh.name, io::Error::last_os_error());
        return;
    }
    let add = |fd: RawFd, events: u32| {
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        // SAFETY: ev is valid for the call.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            error!("{}: epoll_ctl: {}", sh.name, io::Error::last_os_error());
        }
    };
    for k in &sh.kicks {
        add(k.as_raw_fd(), libc::EPOLLIN as u32);
    }
    add(sh.wake.as_raw_fd(), libc::EPOLLIN as u32);
    // Edge-triggered: the dataplane drains the backend on every event, and
    // a driver without RX buffers must not make us spin.
    let backend_events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32;
    if let Some(fd) = backend_fd {
        add(fd, backend_events);
    }
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
    let access = VdPair(&sh);
    while !sh.stop.load(Ordering::SeqCst) {
        // SAFETY: events is writable for its length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 1000) };
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            error!("{}: epoll_wait: {}", sh.name, io::Error::last_os_error());
            break;
        }
        for k in &sh.kicks {
            let _ = k.read();
        }
        let _ = sh.wake.read();
        if sh.stop.load(Ordering::SeqCst) || !sh.state.lock().unwrap().started {
            continue;
        }
        let mut qp = sh.qp.lock().unwrap();
        if sh.poll {
            // The backend fd only has to start polling: while we poll, a
            // watched AF_XDP socket would make the kernel run this epoll's
            // wake-up for every frame it frees after transmit.
            if let Some(fd) = backend_fd {
                // SAFETY: a plain epoll_ctl on fds that outlive this thread.
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
            }
            qp.run_poll(&access, &sh.stop);
            qp.reset();
            if let Some(fd) = backend_fd {
                add(fd, backend_events);
            }
        } else {
            qp.run_event(&access);
        }
    }
    // SAFETY: ep is ours.
    unsafe { libc::close(ep) };
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

/// Creates the device, attaches it, serves it until SIGINT/SIGTERM, then
/// detaches, closes and destroys it so the name is free again at once.
pub fn run(net: VduseNet, backends: Vec<Box<dyn vfrelay_backends::Backend>>) -> Result<(), Error> {
    dev::validate_name(&net.name)?;
    let control = Control::open()?;
    let driver = net.attach.driver();
    if let Some(d) = driver {
        if !Path::new("/sys/bus/vdpa/drivers").join(d).exists() {
            return Err(Error::NoDriver(d));
        }
    }
    let Some(backend) = backends.into_iter().next() else {
        return Err(Error::Broken("no backend".into()));
    };
    let backend_fd = backend.poll_fd();
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
    let result = serve(&net, driver, backend, backend_fd);
    // The fd is closed by now (serve owns the device); destroying can race
    // the vdpa device's final release for a moment.
    let mut destroyed = control.destroy(&net.name);
    for _ in 0..50 {
        match &destroyed {
            Err(dev::Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(100));
                destroyed = control.destroy(&net.name);
            }
            _ => break,
        }
    }
    match destroyed {
        Ok(()) => info!("destroyed VDUSE device {}", net.name),
        Err(e) => error!("{e}"),
    }
    result
}

fn serve(
    net: &VduseNet,
    driver: Option<&'static str>,
    backend: Box<dyn vfrelay_backends::Backend>,
    backend_fd: Option<RawFd>,
) -> Result<(), Error> {
    let device = Device::open(&net.name)?;
    for i in 0..VQ_NUM {
        device.vq_setup(i, net.cfg.queue_size)?;
    }
    let sh = Arc::new(Shared::new(
        net.name.clone(),
        device,
        net.cfg.poll,
        net.cfg.queue_size,
        backend,
    )?);
    let requests = {
        let sh = sh.clone();
        std::thread::Builder::new()
            .name("vduse-requests".into())
            .spawn(move || serve_requests(sh))
            .map_err(sys("spawning the request thread"))?
    };
    let work = {
        let sh = sh.clone();
        std::thread::Builder::new()
            .name("vduse-qp0".into())
            .spawn(move || worker(sh, backend_fd))
            .map_err(sys("spawning the worker"))?
    };

    let mut result = Ok(());
    let mut added = false;
    if let Some(d) = driver {
        result = netlink::dev_add(&net.name)
            .map_err(Error::from)
            .inspect(|_| added = true)
            .and_then(|_| bind_driver(&net.name, d));
        match &result {
            Ok(()) => info!(
                "{} attached to {d}: {}",
                net.name,
                describe_binding(&net.name)
            ),
            Err(e) => error!("{}: attaching: {e}", net.name),
        }
    } else {
        info!(
            "{} ready; attach with: vdpa dev add name {} mgmtdev vduse",
            net.name, net.name
        );
    }
    if result.is_ok() {
        while !shutdown::sleep(Duration::from_millis(500)) {}
        if sh.broken.load(Ordering::SeqCst) {
            result = Err(Error::Broken(net.name.clone()));
        }
    }

    // Detach first: the driver's teardown resets the device, which needs
    // the request thread. With --attach none the user may have attached it.
    if added || driver.is_none() {
        match netlink::dev_del(&net.name) {
            Ok(()) => info!("{}: detached", net.name),
            Err(e) if !added => debug!("{}: {e}", net.name),
            Err(e) => error!("{}: detaching: {e}", net.name),
        }
    }
    sh.stop_requests.store(true, Ordering::SeqCst);
    sh.stop.store(true, Ordering::SeqCst);
    let _ = sh.wake.write(1);
    let _ = requests.join();
    let _ = work.join();
    {
        let qp = sh.qp.lock().unwrap();
        info!(
            "queue pair 0 stats: {} backend: {:?}",
            qp.stats,
            qp.backend.stats()
        );
    }
    // Last reference: closes /dev/vduse/NAME so it can be destroyed.
    drop(sh);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfrelay_backends::BackendSpec;

    fn shared(poll: bool) -> Shared {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        let backend = BackendSpec::Loopback.open(1).unwrap().pop().unwrap();
        Shared::new("test".into(), Device::from_file(file), poll, 256, backend).unwrap()
    }

    #[test]
    fn get_vq_state_reports_next_avail() {
        for poll in [false, true] {
            let sh = shared(poll);
            {
                let mut st = sh.state.lock().unwrap();
                st.vqs[0].next_avail = 17;
                st.vqs[1].next_avail = 0xfffe;
            }
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
        sh.state.lock().unwrap().vqs[0].next_avail = 5;
        assert_eq!(sh.handle(Request::SetStatus { status: 0 }), (true, None));
        let st = sh.state.lock().unwrap();
        assert_eq!((st.status, st.vqs[0].next_avail), (0, 0));
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
                poll: false,
            },
            offloads: 0,
        };
        let f = net.device_features();
        assert!(f & uapi::VIRTIO_F_ACCESS_PLATFORM != 0);
        assert!(f & crate::dataplane::VIRTIO_F_VERSION_1 != 0);
        assert_eq!(f & uapi::VIRTIO_NET_F_CTRL_VQ, 0);
        assert_eq!(f & crate::device::VIRTIO_NET_F_MQ, 0);
        assert_eq!(net.config_space().len(), 12);
    }
}
