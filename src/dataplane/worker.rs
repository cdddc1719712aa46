//! Worker threads: each owns a set of queue pairs (from any ports) and runs
//! them, busy-polling or sleeping in one epoll over all their kicks and
//! backend fds.
//!
//! Control never touches a ring a worker is using. It sends a [`Cmd`]
//! (channel + eventfd wake-up) that the worker applies between bursts, and
//! waits for it: so a request that must not return before the rings are
//! quiet (GET_VRING_BASE, logging on, a new memory table) returns exactly
//! when no burst can still run under the old settings, and no request waits
//! on a busy queue for longer than one bounded service turn.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use log::{debug, error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::dirty_log::DirtyLog;
use super::mem::MemView;
use super::vring::Vring;
use super::{MissFn, QueuePair, SharedRx};
use crate::stats::SharedStats;

/// A port as the dataplane knows it: a number the daemon hands out.
pub type PortId = u64;

/// One queue pair of one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QpKey {
    pub port: PortId,
    pub index: usize,
}

/// Rounds an event-mode worker gives one queue pair before it looks at its
/// other queues and its commands again.
const SERVICE_ROUNDS: usize = 16;

/// Everything the dataplane needs to run one queue pair: what a frontend
/// hands over (memory view, vring state, notifier inside the vrings) plus
/// the backend queue and ring caches in [`QueuePair`].
pub struct Slot {
    pub key: QpKey,
    pub qp: QueuePair,
    pub rx: Vring,
    pub tx: Vring,
    pub mem: Arc<MemView>,
    /// The dirty log, only while the front end has logging on.
    pub log: Option<Arc<DirtyLog>>,
    /// Asked for an address a ring found outside `mem`, before the ring is
    /// stopped for it (VDUSE: mappings the kernel adds without a request).
    pub miss: Option<MissFn>,
    /// Where the RX ring really is when senders on other workers deliver
    /// into it (a switch port); `rx` is then an idle placeholder outside
    /// [`Self::with_rx`].
    rx_home: Option<SharedRx>,
}

impl Slot {
    pub fn new(key: QpKey, qp: QueuePair) -> Self {
        Slot {
            key,
            qp,
            rx: Vring::new(2 * key.index as u16),
            tx: Vring::new(2 * key.index as u16 + 1),
            mem: Arc::new(MemView::empty()),
            log: None,
            miss: None,
            rx_home: None,
        }
    }

    /// Move the RX ring to `home`, where senders on any worker reach it (a
    /// switch port's first pair). Its counters are added to the pair's.
    pub fn attach_rx(&mut self, home: SharedRx) {
        {
            let mut h = home.lock().unwrap_or_else(|e| e.into_inner());
            h.ctl.index = self.rx.index;
            std::mem::swap(&mut self.rx, &mut h.ctl);
            self.qp.shared.also_count(h.shared_stats());
        }
        self.rx_home = Some(home);
    }

    /// Run `f` with the real RX ring in `self.rx`: for a shared one, under
    /// its lock, so no sender delivers while a command changes it, and
    /// what the command set is in force for the next batch.
    pub fn with_rx<R>(&mut self, f: impl FnOnce(&mut Slot) -> R) -> R {
        let Some(home) = self.rx_home.clone() else {
            return f(self);
        };
        let mut h = home.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut self.rx, &mut h.ctl);
        let r = f(self);
        std::mem::swap(&mut self.rx, &mut h.ctl);
        let replaced = h.sync(&self.mem, self.log.as_ref(), self.qp.features());
        drop(h);
        drop(replaced);
        r
    }

    /// The front end went away or reset the device: rings, memory and log
    /// forgotten (and so unmapped once nothing else holds them).
    pub fn reset(&mut self) {
        self.rx.reset();
        self.tx.reset();
        self.mem = Arc::new(MemView::empty());
        self.log = None;
        self.qp.reset();
    }

    pub fn vring_mut(&mut self, vq: usize) -> &mut Vring {
        if vq.is_multiple_of(2) {
            &mut self.rx
        } else {
            &mut self.tx
        }
    }

    fn round(&mut self) -> usize {
        self.qp.defer_misses = self.miss.is_some();
        let n = self
            .qp
            .round(&self.mem, self.log.as_deref(), &mut self.rx, &mut self.tx);
        // A resolved miss is work: its ring goes on at once. Reported as
        // none, an event-mode worker could sleep on a ring whose avail_event
        // already passed the buffers the guest posted.
        let resolved = match self.miss.as_mut() {
            Some(h) => self
                .qp
                .resolve_misses(&mut self.mem, &mut self.rx, &mut self.tx, h),
            None => false,
        };
        n + usize::from(resolved)
    }

    fn set_kicks(&mut self, on: bool) {
        self.qp.set_kicks(&self.mem, &mut self.rx, &mut self.tx, on);
    }

    fn active(&self) -> bool {
        use super::RingCtl;
        self.rx.active() || self.tx.active()
    }

    /// Event mode: work until idle (at most `rounds`), then ask for kicks
    /// and look once more so a buffer added meanwhile is not missed. True
    /// if there is more to do right away.
    fn service(&mut self, rounds: usize) -> (usize, bool) {
        let mut moved = 0;
        for _ in 0..rounds {
            let n = self.round();
            moved += n;
            if n == 0 {
                self.set_kicks(true);
                let n = self.round();
                moved += n;
                if n > 0 {
                    self.set_kicks(false);
                    return (moved, true);
                }
                return (moved, false);
            }
        }
        (moved, true)
    }
}

/// A closure the worker runs on one of its queue pairs between bursts.
pub type ApplyFn = Box<dyn FnOnce(&mut Slot) + Send>;

/// Work a worker runs beside its queue pairs that is not a queue pair: a
/// switch's uplink, whose received frames go to the switch's ports.
pub trait Task: Send {
    /// Move what is waiting (a bounded amount); frames moved.
    fn round(&mut self) -> usize;
    /// Readable when there is work, watched edge-triggered in event mode
    /// (so `round` is called until it returns 0).
    fn poll_fd(&self) -> Option<RawFd>;
    /// Once a second: publish counters that cost a syscall to read.
    fn publish_stats(&mut self) {}
}

pub enum Cmd {
    Add(Box<Slot>),
    /// Take the queue pair out; it is sent back.
    Remove(QpKey, Sender<Box<Slot>>),
    Apply(QpKey, ApplyFn),
    AddTask(u64, Box<dyn Task>),
    /// Take the task out; it is sent back.
    RemoveTask(u64, Sender<Box<dyn Task>>),
    Stop,
}

/// What the control side sees of a worker.
pub struct WorkerHandle {
    pub id: usize,
    pub cpu: Option<usize>,
    pub poll: bool,
    tx: Sender<Cmd>,
    wake: Arc<EventFd>,
    /// Fraction of the last second spent moving frames, in millionths.
    busy_ppm: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Start worker `id`, pinned to `cpu` when given.
    pub fn spawn(id: usize, cpu: Option<usize>, poll: bool) -> io::Result<WorkerHandle> {
        let (tx, rx) = channel::unbounded();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let busy_ppm = Arc::new(AtomicU64::new(0));
        let mut w = Worker {
            id,
            poll,
            rx,
            wake: wake.clone(),
            busy_ppm: busy_ppm.clone(),
            epoll: Epoll::new()?,
            entries: Vec::new(),
            tasks: Vec::new(),
            next_uid: 0,
            any_active: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("worker{id}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to(cpu);
                }
                if let Err(e) = w.run() {
                    error!("worker {id}: {e}");
                }
            })?;
        Ok(WorkerHandle {
            id,
            cpu,
            poll,
            tx,
            wake,
            busy_ppm,
            thread: Some(thread),
        })
    }

    fn send(&self, c: Cmd) {
        if self.tx.send(c).is_err() {
            warn!("worker {}: gone, command dropped", self.id);
        }
        let _ = self.wake.write(1);
    }

    pub fn add(&self, slot: Box<Slot>) {
        self.send(Cmd::Add(slot));
    }

    /// Take a queue pair back (None if this worker does not have it).
    pub fn remove(&self, key: QpKey) -> Option<Box<Slot>> {
        let (tx, rx) = channel::bounded(1);
        self.send(Cmd::Remove(key, tx));
        rx.recv().ok()
    }

    /// Run `f` on queue pair `key` between two bursts and return its result
    /// once it ran (None if this worker does not have the pair). Waits as
    /// long as it takes: a worker finishes any burst in bounded time.
    pub fn apply<R: Send + 'static>(
        &self,
        key: QpKey,
        f: impl FnOnce(&mut Slot) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = channel::bounded(1);
        self.send(Cmd::Apply(
            key,
            Box::new(move |s| {
                let _ = tx.send(f(s));
            }),
        ));
        rx.recv().ok()
    }

    /// Run `task` (named `id`) on this worker until [`Self::remove_task`].
    pub fn add_task(&self, id: u64, task: Box<dyn Task>) {
        self.send(Cmd::AddTask(id, task));
    }

    pub fn remove_task(&self, id: u64) -> Option<Box<dyn Task>> {
        let (tx, rx) = channel::bounded(1);
        self.send(Cmd::RemoveTask(id, tx));
        rx.recv().ok()
    }

    pub fn busy(&self) -> f64 {
        self.busy_ppm.load(Ordering::Relaxed) as f64 / 1e6
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays inside it for
    // cpu < CPU_SETSIZE (checked), and sched_setaffinity reads it only.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            warn!("cpu {cpu} out of range, not pinning");
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            warn!("pinning to cpu {cpu}: {}", io::Error::last_os_error());
        }
    }
}

/// A queue pair inside a worker, with what the worker registered for it.
struct Entry {
    slot: Box<Slot>,
    uid: u64,
    /// Fds this entry has in the epoll (event mode).
    registered: Vec<RawFd>,
    /// Has work right now (a kick or backend event, or a turn cut short).
    ready: bool,
    /// Poll mode: guest kicks switched off for the rings as they are now.
    kicks_off: bool,
}

/// A task inside a worker.
struct TaskEntry {
    id: u64,
    uid: u64,
    task: Box<dyn Task>,
    registered: Option<RawFd>,
    ready: bool,
}

const WAKE_TOKEN: u64 = u64::MAX;
const KIND_BITS: u64 = 2;
const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const BACKEND: u64 = 2;

struct Worker {
    id: usize,
    poll: bool,
    rx: Receiver<Cmd>,
    wake: Arc<EventFd>,
    busy_ppm: Arc<AtomicU64>,
    epoll: Epoll,
    entries: Vec<Entry>,
    tasks: Vec<TaskEntry>,
    next_uid: u64,
    /// Some queue pair has a running ring, or there is a task
    /// (recomputed after commands).
    any_active: bool,
}

impl Worker {
    fn run(&mut self) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            self.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        debug!(
            "worker {}: running ({} mode)",
            self.id,
            if self.poll { "poll" } else { "event" }
        );
        let mut events = vec![EpollEvent::default(); 64];
        let mut window = Instant::now();
        let mut busy = Duration::ZERO;
        let mut last = Instant::now();
        loop {
            // Commands first: they are rare, and a poll-mode worker sees
            // them with a couple of loads, no syscall.
            if !self.rx.is_empty() && !self.commands() {
                return Ok(());
            }
            // A poll-mode worker with no running ring sleeps: a ring only
            // starts through a command, which wakes it.
            let moved = if self.poll && self.any_active {
                self.poll_round()
            } else {
                // `ready` means work only to an event-mode worker.
                let any_ready = !self.poll
                    && (self.entries.iter().any(|e| e.ready) || self.tasks.iter().any(|t| t.ready));
                let timeout = if any_ready { 0 } else { 1000 };
                let n = match self.epoll.wait(timeout, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(e) => return Err(e),
                };
                for ev in &events[..n] {
                    self.event(ev.data());
                }
                if !self.commands() {
                    return Ok(());
                }
                if self.poll {
                    0
                } else {
                    self.event_round()
                }
            };
            let now = Instant::now();
            if moved > 0 {
                busy += now - last;
            }
            last = now;
            if now - window >= Duration::from_secs(1) {
                let total = (now - window).as_nanos().max(1);
                let ppm = (busy.as_nanos() * 1_000_000 / total) as u64;
                self.busy_ppm.store(ppm.min(1_000_000), Ordering::Relaxed);
                busy = Duration::ZERO;
                window = now;
                // What changed without moving frames (a backend's own
                // counters, a kick, a ring that failed to start) shows
                // within a second.
                for e in &mut self.entries {
                    e.slot.qp.publish_stats();
                }
                for t in &mut self.tasks {
                    t.task.publish_stats();
                }
            }
        }
    }

    fn poll_round(&mut self) -> usize {
        let mut moved = 0;
        for e in &mut self.entries {
            if !e.kicks_off && e.slot.active() {
                e.slot.set_kicks(false);
                e.kicks_off = true;
            }
            moved += e.slot.round();
        }
        for t in &mut self.tasks {
            moved += t.task.round();
        }
        moved
    }

    fn event_round(&mut self) -> usize {
        let mut moved = 0;
        for e in &mut self.entries {
            if e.ready {
                let (n, more) = e.slot.service(SERVICE_ROUNDS);
                moved += n;
                e.ready = more;
            }
        }
        for t in &mut self.tasks {
            if t.ready {
                let mut n = 0;
                t.ready = false;
                for _ in 0..SERVICE_ROUNDS {
                    let k = t.task.round();
                    n += k;
                    if k == 0 {
                        break;
                    }
                    // Not drained yet: edge-triggered, so come back.
                    t.ready = true;
                }
                if n == 0 {
                    t.ready = false;
                }
                moved += n;
            }
        }
        moved
    }

    fn event(&mut self, token: u64) {
        if token == WAKE_TOKEN {
            let _ = self.wake.read();
            return;
        }
        let uid = token >> KIND_BITS;
        let Some(e) = self.entries.iter_mut().find(|e| e.uid == uid) else {
            if let Some(t) = self.tasks.iter_mut().find(|t| t.uid == uid) {
                t.ready = true;
            }
            return;
        };
        let kick = match token & ((1 << KIND_BITS) - 1) {
            RX_KICK => e.slot.rx.kick.as_ref(),
            TX_KICK => e.slot.tx.kick.as_ref(),
            _ => None,
        };
        if let Some(k) = kick {
            if let Ok(n) = k.read() {
                e.slot.qp.stats.kicks += n;
                e.slot.qp.stats_dirty = true;
            }
        }
        e.ready = true;
    }

    /// Apply every queued command; false on Stop.
    fn commands(&mut self) -> bool {
        while let Ok(c) = self.rx.try_recv() {
            match c {
                Cmd::Add(slot) => {
                    let uid = self.next_uid;
                    self.next_uid += 1;
                    let mut e = Entry {
                        slot,
                        uid,
                        registered: Vec::new(),
                        ready: true,
                        kicks_off: false,
                    };
                    register(&self.epoll, self.poll, self.id, &mut e);
                    self.entries.push(e);
                }
                Cmd::Remove(key, back) => {
                    if let Some(pos) = self.entries.iter().position(|e| e.slot.key == key) {
                        let mut e = self.entries.swap_remove(pos);
                        unregister(&self.epoll, &mut e);
                        let _ = back.send(e.slot);
                    }
                }
                Cmd::Apply(key, f) => {
                    let Some(e) = self.entries.iter_mut().find(|e| e.slot.key == key) else {
                        continue;
                    };
                    // Unregister while the old fds are still open: the
                    // closure may close them, and a number reused by a new
                    // fd must not inherit (or lose) a registration.
                    unregister(&self.epoll, e);
                    e.slot.with_rx(f);
                    e.kicks_off = false;
                    e.ready = true;
                    register(&self.epoll, self.poll, self.id, e);
                }
                Cmd::AddTask(id, task) => {
                    let uid = self.next_uid;
                    self.next_uid += 1;
                    let mut t = TaskEntry {
                        id,
                        uid,
                        task,
                        registered: None,
                        ready: true,
                    };
                    if !self.poll {
                        if let Some(fd) = t.task.poll_fd() {
                            let ev = EpollEvent::new(
                                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                                (uid << KIND_BITS) | BACKEND,
                            );
                            match self.epoll.ctl(ControlOperation::Add, fd, ev) {
                                Ok(()) => t.registered = Some(fd),
                                Err(err) => error!("worker {}: watching fd {fd}: {err}", self.id),
                            }
                        }
                    }
                    self.tasks.push(t);
                }
                Cmd::RemoveTask(id, back) => {
                    if let Some(pos) = self.tasks.iter().position(|t| t.id == id) {
                        let t = self.tasks.swap_remove(pos);
                        if let Some(fd) = t.registered {
                            let _ =
                                self.epoll
                                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        }
                        let _ = back.send(t.task);
                    }
                }
                Cmd::Stop => return false,
            }
            self.any_active =
                !self.tasks.is_empty() || self.entries.iter().any(|e| e.slot.active());
        }
        true
    }
}

fn register(epoll: &Epoll, poll: bool, id: usize, e: &mut Entry) {
    if poll {
        return;
    }
    let base = e.uid << KIND_BITS;
    let mut want = Vec::new();
    if let Some(fd) = e.slot.rx.kick_fd() {
        want.push((fd, base | RX_KICK, EventSet::IN));
    }
    if let Some(fd) = e.slot.tx.kick_fd() {
        want.push((fd, base | TX_KICK, EventSet::IN));
    }
    // Edge-triggered: the dataplane drains the backend on every event, and
    // a guest without RX buffers must not make the worker spin.
    let lent = e.slot.qp.extra_rx.iter().map(|(_, b)| b);
    for b in std::iter::once(&e.slot.qp.backend).chain(lent) {
        if let Some(fd) = b.poll_fd() {
            want.push((
                fd,
                base | BACKEND,
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            ));
        }
    }
    for (fd, token, set) in want {
        match epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token)) {
            Ok(()) => e.registered.push(fd),
            Err(err) => error!("worker {id}: watching fd {fd}: {err}"),
        }
    }
}

fn unregister(epoll: &Epoll, e: &mut Entry) {
    for fd in e.registered.drain(..) {
        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// Where one queue pair lives: its worker and key. What a frontend holds to
/// change the pair's state.
#[derive(Clone)]
pub struct QpRef {
    pub worker: Arc<WorkerHandle>,
    pub key: QpKey,
    /// The pair's counters as its worker last published them.
    pub stats: Arc<SharedStats>,
}

impl QpRef {
    /// Hand `slot` to `worker`; what the caller keeps of it.
    pub fn add(worker: Arc<WorkerHandle>, slot: Box<Slot>) -> QpRef {
        let (key, stats) = (slot.key, slot.qp.shared.clone());
        worker.add(slot);
        QpRef { worker, key, stats }
    }

    /// [`WorkerHandle::apply`] on this pair.
    pub fn apply<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Slot) -> R + Send + 'static,
    ) -> Option<R> {
        self.worker.apply(self.key, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfrelay_backends::loopback::Loopback;

    fn slot(index: usize) -> Box<Slot> {
        let key = QpKey { port: 7, index };
        Box::new(Slot::new(
            key,
            QueuePair::new(index, Box::new(Loopback::new(index))),
        ))
    }

    #[test]
    fn commands_run_on_the_worker_between_bursts() {
        for poll in [false, true] {
            let w = WorkerHandle::spawn(0, None, poll).unwrap();
            w.add(slot(0));
            w.add(slot(1));
            let k1 = QpKey { port: 7, index: 1 };
            let name = w
                .apply(k1, |s| {
                    s.rx.next_avail = 42;
                    std::thread::current().name().map(String::from)
                })
                .unwrap();
            assert_eq!(name.as_deref(), Some("worker0"));
            assert_eq!(w.apply(k1, |s| s.rx.next_avail), Some(42));
            // A pair the worker does not have: the command reports so.
            let k9 = QpKey { port: 7, index: 9 };
            assert_eq!(w.apply(k9, |_| ()), None);
            let back = w.remove(k1).unwrap();
            assert_eq!(back.rx.next_avail, 42);
            assert!(w.remove(k1).is_none());
            assert_eq!(w.apply(k1, |_| ()), None);
            assert!(w.busy() >= 0.0);
        }
    }
}
