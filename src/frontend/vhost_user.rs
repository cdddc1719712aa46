//! vhost-user frontend: a virtio-net device served over a vhost-user socket
//! (QEMU `-netdev vhost-user`, DPDK virtio-user, ...), built on rust-vmm's
//! vhost-user-backend. It only translates the protocol's view of memory and
//! rings for the shared dataplane.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock, VringState, VringT,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::dataplane::dirty_log::DirtyLog;
use crate::dataplane::mem::MemView;
use crate::dataplane::ring::RingAddrs;
use crate::dataplane::{QueuePair, RingCtl, RingPairAccess, RoundFn};
use crate::device::NetConfig;
use crate::shutdown;

mod relay;

type GM = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Vring = VringRwLock<GM>;

const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket {0}: a vfrelay or other server is already listening there")]
    SocketInUse(PathBuf),
    #[error("socket {0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// The device as vhost-user-backend sees it. Cloned into every worker
/// thread; survives front-end reconnects (backends stay open).
#[derive(Clone)]
pub struct VhostUserNet {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: NetConfig,
    offloads: u64,
    /// One per queue pair; each is locked only by its own worker thread.
    qps: Vec<Mutex<QueuePair>>,
    /// Backend fds, one per queue pair (None for loopback).
    backend_fds: Vec<Option<i32>>,
    mem: RwLock<Arc<MemView>>,
    acked: AtomicU64,
    /// Set when the current connection ends: poll loops return.
    stop: AtomicBool,
    /// The front end's dirty log (SET_LOG_BASE), used while LOG_ALL is on.
    log: RwLock<Option<Arc<DirtyLog>>>,
    logging: AtomicBool,
    /// Per vring: where used-ring writes are logged (NO_LOG_ADDR: nowhere).
    vring_log: Vec<AtomicU64>,
    /// Per queue pair: bursts begun plus bursts ended, odd while one runs.
    bursts: Vec<AtomicU64>,
    /// Test-only: pretend to log (VFRELAY_TEST_DISABLE_DIRTY_LOG=1), so the
    /// migration test can show it catches a missing log.
    log_disabled_for_test: bool,
    /// A SEND_RARP waiting for the polling worker of queue pair 0.
    pending_rarp: Mutex<Option<[u8; 6]>>,
    /// The current connection's worker epoll handlers (empty between
    /// connections, so they and this struct don't keep each other alive).
    handlers: Mutex<Vec<Arc<VringEpollHandler<VhostUserNet>>>>,
}

const NO_LOG_ADDR: u64 = u64::MAX;
/// VHOST_F_LOG_ALL: the front end may ask for dirty-page logging.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// VIRTIO_NET_F_GUEST_ANNOUNCE: QEMU lets the guest announce itself after
/// migration; without it QEMU asks us to (SEND_RARP).
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;

/// How the backend fd is watched: edge-triggered, because the dataplane
/// drains the backend on every event and a guest without RX buffers must
/// not make the worker spin on a readable fd.
const BACKEND_EVENTS: EventSet = EventSet::IN
    .union(EventSet::OUT)
    .union(EventSet::EDGE_TRIGGERED);

impl VhostUserNet {
    /// The epoll data of a backend fd: just past the daemon's own range.
    fn backend_event(&self) -> u64 {
        2 * self.inner.cfg.queue_pairs as u64 + 1
    }

    /// Queue pair `qp`'s epoll handler and backend fd, if it has one.
    fn backend_watch(&self, qp: usize) -> Option<(Arc<VringEpollHandler<VhostUserNet>>, i32)> {
        let fd = (*self.inner.backend_fds.get(qp)?)?;
        let h = self.inner.handlers.lock().unwrap().get(qp)?.clone();
        Some((h, fd))
    }

    pub fn new(
        cfg: NetConfig,
        offloads: u64,
        backends: Vec<Box<dyn vfrelay_backends::Backend>>,
    ) -> Self {
        let backend_fds = backends.iter().map(|b| b.poll_fd()).collect();
        let queue_pairs = cfg.queue_pairs;
        let qps = backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| Mutex::new(QueuePair::new(i, b)))
            .collect();
        VhostUserNet {
            inner: Arc::new(Inner {
                cfg,
                offloads,
                qps,
                backend_fds,
                mem: RwLock::new(Arc::new(MemView::empty())),
                acked: AtomicU64::new(0),
                stop: AtomicBool::new(false),
                log: RwLock::new(None),
                logging: AtomicBool::new(false),
                vring_log: (0..2 * queue_pairs)
                    .map(|_| AtomicU64::new(NO_LOG_ADDR))
                    .collect(),
                bursts: (0..queue_pairs).map(|_| AtomicU64::new(0)).collect(),
                log_disabled_for_test: std::env::var_os("VFRELAY_TEST_DISABLE_DIRTY_LOG")
                    .is_some_and(|v| v == "1"),
                pending_rarp: Mutex::new(None),
                handlers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Features offered to the driver.
    pub fn device_features(&self) -> u64 {
        self.inner.cfg.virtio_features()
            | self.inner.offloads
            | VHOST_USER_F_PROTOCOL_FEATURES
            | VHOST_F_LOG_ALL
            | VIRTIO_NET_F_GUEST_ANNOUNCE
    }

    /// Forget everything about the previous front end: its memory and log
    /// are unmapped (the workers are stopped), rings and indices reset.
    fn reset_connection_state(&self) {
        let i = &self.inner;
        i.acked.store(0, Ordering::SeqCst);
        i.logging.store(false, Ordering::SeqCst);
        *i.log.write().unwrap() = None;
        for v in &i.vring_log {
            v.store(NO_LOG_ADDR, Ordering::SeqCst);
        }
        *i.pending_rarp.lock().unwrap() = None;
        for qp in &i.qps {
            qp.lock().unwrap().reset();
        }
        *i.mem.write().unwrap() = Arc::new(MemView::empty());
    }

    fn begin_connection(&self) {
        self.inner.stop.store(false, Ordering::SeqCst);
        self.reset_connection_state();
        for qp in &self.inner.qps {
            let mut qp = qp.lock().unwrap();
            let n = qp.discard_backend_rx();
            if n > 0 {
                info!(
                    "queue pair {}: dropped {n} frames that arrived while no front end was attached",
                    qp.index
                );
            }
        }
    }

    fn end_connection(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
    }

    /// Log per-queue counters (workers must be stopped).
    pub fn log_stats(&self) {
        for qp in &self.inner.qps {
            let qp = qp.lock().unwrap();
            info!(
                "queue pair {} stats: {} backend: {:?}",
                qp.index,
                qp.stats,
                qp.backend.stats()
            );
        }
    }
}

/// A locked vring as the dataplane sees it, with its used-ring log address.
struct VuRing<'a>(&'a mut VringState<GM>, Option<u64>);

impl RingCtl for VuRing<'_> {
    fn active(&self) -> bool {
        self.0.get_queue().ready() && self.0.is_enabled()
    }
    fn addrs(&self) -> RingAddrs {
        let q = self.0.get_queue();
        RingAddrs {
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            size: q.size(),
        }
    }
    fn next_avail(&self) -> u16 {
        self.0.get_queue().next_avail()
    }
    fn set_next_avail(&mut self, v: u16) {
        self.0.get_queue_mut().set_next_avail(v)
    }
    fn next_used(&self) -> u16 {
        self.0.get_queue().next_used()
    }
    fn set_next_used(&mut self, v: u16) {
        self.0.get_queue_mut().set_next_used(v)
    }
    fn event_idx(&self) -> bool {
        self.0.get_queue().event_idx_enabled()
    }
    fn signal(&self) {
        if let Err(e) = self.0.signal_used_queue() {
            debug!("signalling guest: {e}");
        }
    }
    fn log_addr(&self) -> Option<u64> {
        self.1
    }
}

struct VuPair<'a> {
    inner: &'a Inner,
    /// Queue pair index: vrings 2*qp (rx) and 2*qp+1 (tx).
    qp: usize,
    rx: &'a Vring,
    tx: &'a Vring,
}

impl VuPair<'_> {
    fn log_addr(&self, vring: usize) -> Option<u64> {
        let a = self.inner.vring_log.get(vring)?.load(Ordering::SeqCst);
        (a != NO_LOG_ADDR).then_some(a)
    }
}

impl RingPairAccess for VuPair<'_> {
    fn features(&self) -> u64 {
        self.inner.acked.load(Ordering::Relaxed)
    }
    fn round(&self, f: &mut RoundFn<'_>) -> usize {
        // Odd from before the log is looked up until the burst's last write
        // is marked: Inner::wait_for_bursts relies on it. Only this queue
        // pair's worker (holding its QueuePair) gets here.
        let bursts = &self.inner.bursts[self.qp];
        let begun = bursts.fetch_add(1, Ordering::SeqCst);
        let log = self.inner.active_log();
        let (rx_log, tx_log) = (self.log_addr(2 * self.qp), self.log_addr(2 * self.qp + 1));
        // Held for one burst: GET_VRING_BASE waits for it, so the ring base
        // it reports is consistent with what was used.
        let mut rx = self.rx.get_mut();
        let mut tx = self.tx.get_mut();
        // Read only now that the rings are locked: the front end sends its
        // memory table before it makes a ring ready, so a ring seen ready
        // here is in this view. Read before the locks, a worker preempted
        // in between (it shares a core with the message thread when pinned)
        // saw a ring made ready meanwhile against the old, empty view and
        // stopped it as "not in guest memory".
        let mem = self.inner.mem.read().unwrap().clone();
        let n = f(
            &mem,
            log.as_deref(),
            &mut VuRing(&mut rx, rx_log),
            &mut VuRing(&mut tx, tx_log),
        );
        bursts.store(begun + 2, Ordering::Release);
        n
    }
    fn take_announce(&self) -> Option<[u8; 6]> {
        if self.qp != 0 {
            return None;
        }
        self.inner.pending_rarp.lock().unwrap().take()
    }
}

impl VhostUserBackend for VhostUserNet {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.inner.cfg.queue_pairs
    }

    fn max_queue_size(&self) -> usize {
        self.inner.cfg.queue_size as usize
    }

    fn features(&self) -> u64 {
        self.device_features()
    }

    fn acked_features(&self, features: u64) {
        debug!("driver acked features {features:#x}");
        self.inner.acked.store(features, Ordering::SeqCst);
        // rust-vmm's handler keeps logging once a log base was set; logging
        // follows LOG_ALL here, so a cancelled migration stops it again.
        let on = features & VHOST_F_LOG_ALL != 0;
        if self.inner.logging.swap(on, Ordering::SeqCst) != on {
            if on && self.inner.log_disabled_for_test {
                warn!("dirty-page logging requested but disabled for testing: migration WILL corrupt guest memory");
            }
            if on {
                self.inner.wait_for_bursts();
            }
            info!("dirty-page logging {}", if on { "on" } else { "off" });
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Read per burst from the queue itself.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let status = 1; // VIRTIO_NET_S_LINK_UP
        self.inner.cfg.config_space(status, offset, size)
    }

    fn update_memory(&self, mem: GM) -> io::Result<()> {
        let guard = mem.memory();
        let arc = guard.into_inner();
        let view = MemView::from_guest_memory(&*arc, arc.clone());
        debug!("guest memory: {view:?}");
        *self.inner.mem.write().unwrap() = Arc::new(view);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue pair: RX and TX of a pair share the
        // backend queue, so they never need a lock between them.
        (0..self.inner.cfg.queue_pairs)
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(qp), [rx, tx]) = (self.inner.qps.get(thread_id), vrings) else {
            return Err(io::Error::other(format!(
                "unexpected worker {thread_id} with {} vrings",
                vrings.len()
            )));
        };
        let mut qp = qp.lock().unwrap();
        let access = VuPair {
            inner: &self.inner,
            qp: thread_id,
            rx,
            tx,
        };
        if self.inner.cfg.poll {
            // The backend fd only has to start polling: while we poll, a
            // watched AF_XDP socket would make the kernel run this epoll's
            // wake-up for every frame it frees after transmit (~9 % of
            // guest-to-wire frame rate).
            let watch = self.backend_watch(thread_id);
            if let Some((h, fd)) = &watch {
                if let Err(e) = h.unregister_listener(*fd, BACKEND_EVENTS, self.backend_event()) {
                    debug!("queue pair {thread_id}: unwatching backend: {e}");
                }
            }
            qp.run_poll(&access, &self.inner.stop);
            if let Some((h, fd)) = &watch {
                if let Err(e) = h.register_listener(*fd, BACKEND_EVENTS, self.backend_event()) {
                    warn!("queue pair {thread_id}: watching backend again: {e}");
                }
            }
        } else {
            qp.run_event(&access);
        }
        Ok(())
    }
}

/// Check what is at `path` before binding: replace a stale socket from a
/// crashed run, refuse a live one or anything that is not a socket.
fn prepare_socket_path(path: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Socket {
            path: path.into(),
            source: e,
        }),
        Ok(m) if !m.file_type().is_socket() => Err(Error::NotASocket(path.into())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(Error::SocketInUse(path.into())),
            Err(_) => {
                info!("removing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| Error::Socket {
                    path: path.into(),
                    source: e,
                })
            }
        },
    }
}

fn bind_listener(path: &Path) -> Result<Listener, Error> {
    prepare_socket_path(path)?;
    // The socket gives control of guest memory mappings: owner-only from
    // the moment it exists (umask), not after a chmod race.
    // SAFETY: umask has no memory-safety preconditions.
    let old = unsafe { libc::umask(0o177) };
    let l = Listener::new(path, false);
    unsafe { libc::umask(old) };
    let l = l.map_err(|e| Error::Socket {
        path: path.into(),
        source: io::Error::other(e.to_string()),
    })?;
    // Belt and braces if umask was not honoured (some filesystems).
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

/// Serve the device until SIGINT/SIGTERM: server mode listens on `socket`
/// and goes back to listening after each disconnect; client mode connects
/// to a listening front end and reconnects.
pub fn run(net: VhostUserNet, socket: &Path, client: bool) -> Result<(), Error> {
    let mut listener = if client {
        None
    } else {
        Some(bind_listener(socket)?)
    };
    let result = serve_loop(&net, socket, listener.as_mut());
    if let Some(l) = listener.take() {
        drop(l);
        let _ = std::fs::remove_file(socket);
    }
    result
}

impl Inner {
    /// The log to mark, only while the front end has LOG_ALL on.
    fn active_log(&self) -> Option<Arc<DirtyLog>> {
        if !self.logging.load(Ordering::SeqCst) || self.log_disabled_for_test {
            return None;
        }
        self.log.read().unwrap().clone()
    }

    /// After logging was turned on or moved (LOG_ALL, SET_LOG_BASE, a used
    /// ring log address): return once every burst that may have looked at
    /// the old setting has ended. QEMU takes the reply to such a request
    /// as "from now on every write is logged" and then reads (or frees) the
    /// log; a burst still writing under the old setting would slip past it.
    fn wait_for_bursts(&self) {
        // The change (an atomic or a lock) before any count is read.
        std::sync::atomic::fence(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(1);
        for (qp, b) in self.bursts.iter().enumerate() {
            let seen = b.load(Ordering::SeqCst);
            if seen % 2 == 0 {
                continue;
            }
            while b.load(Ordering::SeqCst) == seen {
                if Instant::now() > deadline {
                    warn!("queue pair {qp}: a burst did not end within 1 s of a dirty-log change");
                    break;
                }
                // The worker may share this core: let it finish.
                std::thread::yield_now();
            }
        }
    }
}

impl relay::Hooks for Inner {
    fn set_log_base(&self, fd: &OwnedFd, size: u64, offset: u64) -> bool {
        match DirtyLog::map(fd.as_fd(), offset, size) {
            Ok(l) => {
                info!("dirty log mapped: {size} bytes ({} pages)", l.pages());
                // Replaces (and, once the workers let go, unmaps) any
                // earlier log: QEMU sends a new one when guest memory grows.
                *self.log.write().unwrap() = Some(Arc::new(l));
                self.wait_for_bursts();
                true
            }
            Err(e) => {
                error!("mapping the dirty log ({size} bytes at {offset}): {e}");
                false
            }
        }
    }

    fn set_vring_log(&self, index: u32, log_addr: Option<u64>) {
        if let Some(v) = self.vring_log.get(index as usize) {
            v.store(log_addr.unwrap_or(NO_LOG_ADDR), Ordering::SeqCst);
            if log_addr.is_some() {
                self.wait_for_bursts();
            }
        }
    }

    fn send_rarp(&self, mac: [u8; 6]) {
        info!(
            "announcing {} (RARP) after migration",
            crate::device::format_mac(&mac)
        );
        if self.cfg.poll {
            // The polling worker owns queue pair 0; it sends at its next round.
            *self.pending_rarp.lock().unwrap() = Some(mac);
        } else if let Some(qp) = self.qps.first() {
            // Event mode: the worker holds the lock only during a burst.
            qp.lock().unwrap().announce(&mac);
        }
    }
}

/// Run the daemon on a private connection and relay the front end's
/// connection `front` to it.
fn start_relayed(
    daemon: &mut VhostUserDaemon<VhostUserNet>,
    front: UnixStream,
    hooks: Arc<dyn relay::Hooks>,
) -> io::Result<relay::Relay> {
    let (mut private, back) = relay::private_endpoint()?;
    daemon
        .start(&mut private)
        .map_err(|e| io::Error::other(e.to_string()))?;
    if let Err(e) = relay::ensure_ours_accepted(&private) {
        daemon.request_shutdown();
        let _ = daemon.wait();
        return Err(e);
    }
    relay::Relay::start(front, back, hooks)
}

fn serve_loop(
    net: &VhostUserNet,
    socket: &Path,
    listener: Option<&mut Listener>,
) -> Result<(), Error> {
    let path_str = socket.to_string_lossy().to_string();
    if listener.is_some() {
        info!("listening on {}", socket.display());
    }
    loop {
        // Take the front end's connection ourselves (or give up on shutdown):
        // it is relayed to the daemon, see relay.rs for why.
        let front = match listener.as_deref() {
            Some(l) => {
                if !shutdown::wait_readable(l.as_raw_fd()) {
                    return Ok(());
                }
                match l.accept() {
                    Ok(Some(s)) => s,
                    Ok(None) => continue,
                    Err(e) => {
                        warn!("accepting front end: {e}");
                        continue;
                    }
                }
            }
            None => {
                if shutdown::requested() {
                    return Ok(());
                }
                match UnixStream::connect(socket) {
                    Ok(s) => s,
                    Err(e) => {
                        debug!("connecting to {path_str}: {e}");
                        if shutdown::sleep(Duration::from_millis(500)) {
                            return Ok(());
                        }
                        continue;
                    }
                }
            }
        };

        let mut daemon = VhostUserDaemon::new(
            "vfrelay".into(),
            net.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| Error::Daemon(e.to_string()))?;
        net.begin_connection();
        let handlers = daemon.get_epoll_handlers();
        for (i, h) in handlers.iter().enumerate() {
            if let Some(Some(fd)) = net.inner.backend_fds.get(i) {
                h.register_listener(*fd, BACKEND_EVENTS, net.backend_event())
                    .map_err(|e| Error::Daemon(format!("watching backend fd: {e}")))?;
            }
        }
        *net.inner.handlers.lock().unwrap() = handlers;

        let relay = match start_relayed(&mut daemon, front, net.inner.clone()) {
            Ok(r) => r,
            Err(e) => {
                warn!("starting vhost-user connection: {e}");
                continue;
            }
        };
        info!("front end connected");
        if let Some(h) = daemon.shutdown_handle() {
            shutdown::set_handle(Some(h));
        }
        match daemon.wait() {
            Ok(()) => info!("front end disconnected"),
            // A front end that quits or is killed just closes the socket.
            Err(e) if e.to_string().contains("disconnected") => info!("front end disconnected"),
            Err(e) => warn!("front end connection ended: {e}"),
        }
        shutdown::set_handle(None);
        relay.finish();
        net.end_connection();
        net.inner.handlers.lock().unwrap().clear();
        // Dropping the daemon stops and joins its worker threads.
        drop(daemon);
        net.log_stats();
        // Nothing of the old guest stays mapped (its QEMU may be gone for
        // good, e.g. after migrating away).
        net.reset_connection_state();
        if shutdown::requested() {
            return Ok(());
        }
        if listener.is_some() {
            info!("listening again on {}", socket.display());
        } else {
            info!("reconnecting to {path_str}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::dirty_log::tests::memfd;
    use crate::dataplane::VIRTIO_F_VERSION_1;
    use relay::Hooks;

    fn net() -> VhostUserNet {
        let cfg = NetConfig {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            mtu: 1500,
            queue_pairs: 2,
            queue_size: 256,
            poll: false,
        };
        let backends: Vec<Box<dyn vfrelay_backends::Backend>> = (0..2)
            .map(|q| Box::new(vfrelay_backends::loopback::Loopback::new(q)) as _)
            .collect();
        VhostUserNet::new(cfg, 0, backends)
    }

    #[test]
    fn turning_logging_on_waits_for_the_burst_in_flight() {
        use relay::Hooks;
        let n = net();
        let fd = memfd(4096);
        // Idle workers: nothing to wait for.
        let t = Instant::now();
        assert!(n.inner.set_log_base(&fd, 4096, 0));
        n.acked_features(VIRTIO_F_VERSION_1 | VHOST_F_LOG_ALL);
        assert!(t.elapsed() < Duration::from_millis(500));
        n.acked_features(VIRTIO_F_VERSION_1);

        // A burst that began before the change (count odd) may not have
        // seen it: each change returns only after that burst has ended.
        let changes: [&dyn Fn(); 3] = [
            &|| n.acked_features(VIRTIO_F_VERSION_1 | VHOST_F_LOG_ALL),
            &|| assert!(n.inner.set_log_base(&fd, 4096, 0)),
            &|| n.inner.set_vring_log(0, Some(0x1000)),
        ];
        for (i, change) in changes.iter().enumerate() {
            let odd = 2 * i as u64 + 1;
            n.inner.bursts[0].store(odd, Ordering::SeqCst);
            let inner = n.inner.clone();
            let ender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                inner.bursts[0].store(odd + 1, Ordering::Release);
            });
            let t = Instant::now();
            change();
            let waited = t.elapsed();
            ender.join().unwrap();
            assert!(
                waited >= Duration::from_millis(150),
                "change {i} returned after {waited:?}"
            );
        }
    }

    #[test]
    fn logging_follows_log_all_on_every_set_features() {
        let n = net();
        assert!(n.device_features() & VHOST_F_LOG_ALL != 0);
        let fd = memfd(4096);
        assert!(n.inner.set_log_base(&fd, 4096, 0));
        assert!(n.inner.active_log().is_none(), "no LOG_ALL yet");
        n.acked_features(VIRTIO_F_VERSION_1 | VHOST_F_LOG_ALL);
        assert!(n.inner.active_log().is_some());
        // Migration cancelled: QEMU acks the features again without LOG_ALL.
        n.acked_features(VIRTIO_F_VERSION_1);
        assert!(n.inner.active_log().is_none());
        // A new connection forgets the log entirely.
        n.acked_features(VIRTIO_F_VERSION_1 | VHOST_F_LOG_ALL);
        n.reset_connection_state();
        n.acked_features(VIRTIO_F_VERSION_1 | VHOST_F_LOG_ALL);
        assert!(
            n.inner.active_log().is_none(),
            "log base must be sent again"
        );
    }

    #[test]
    fn vring_log_addresses_are_per_vring_and_reset() {
        let n = net();
        n.inner.set_vring_log(3, Some(0x5000));
        n.inner.set_vring_log(1, None);
        n.inner.set_vring_log(99, Some(1)); // out of range: ignored
        let get = |i: usize| n.inner.vring_log[i].load(Ordering::SeqCst);
        assert_eq!(get(3), 0x5000);
        assert_eq!(get(1), NO_LOG_ADDR);
        n.reset_connection_state();
        assert_eq!(get(3), NO_LOG_ADDR);
    }

    #[test]
    fn an_unmappable_log_is_refused() {
        let n = net();
        let fd = memfd(4096);
        assert!(!n.inner.set_log_base(&fd, 0, 0));
        assert!(n.inner.log.read().unwrap().is_none());
    }
}
