//! The daemon: a table of ports on a fixed set of workers, driven at
//! runtime over a JSON-RPC control socket. One control thread runs every
//! vhost-user socket, the control socket and port management from one
//! epoll; workers run the queue pairs. The one-port commands (`vfrelay
//! vhost-user`, `vfrelay vduse`) are this daemon with one port and no
//! control socket.

pub mod metrics;
pub mod ports;
pub mod rpc;
pub mod state;

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use serde_json::{json, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::dataplane::worker::{QpKey, QpRef, Slot, WorkerHandle};
use crate::dataplane::{QueuePair, RxHalf};
use crate::frontend::{vduse, vhost_user};
use crate::net;
use crate::shutdown;
use crate::switch::{Switch, SwitchPort, UplinkTask};
pub use ports::{Kind, PortSpec};
use rpc::RpcError;
use vfrelay_backends::BackendSpec;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Port(String),
}

/// How the daemon runs.
pub struct Options {
    /// The control socket; None for the one-port commands.
    pub control: Option<PathBuf>,
    /// One worker per entry, pinned to that CPU (None: not pinned).
    pub workers: Vec<Option<usize>>,
    pub poll: bool,
    /// Where the port table is kept (`--state`); None: not kept.
    pub state: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`--metrics`).
    pub metrics: Option<String>,
}

enum Front {
    VhostUser(Box<vhost_user::Port>),
    Vduse(vduse::Port),
}

struct Port {
    id: u64,
    spec: PortSpec,
    mac: [u8; 6],
    /// Dropped (socket closed, device destroyed) after the queue pairs
    /// left their workers.
    front: Option<Front>,
    qps: Vec<QpRef>,
    /// Fds of `front` in the control epoll.
    watched: Vec<RawFd>,
    /// The switch this port is a member of, and its member number.
    member: Option<(Arc<Switch>, u16)>,
}

/// A switch of the daemon, and the worker receiving from its uplink.
struct SwitchEntry {
    sw: Arc<Switch>,
    uplink: Option<BackendSpec>,
    task: Option<(Arc<WorkerHandle>, u64)>,
}

const TOKEN_SHUTDOWN: u64 = 0;
const TOKEN_CONTROL: u64 = 1;
const TOKEN_CLIENT: u64 = 2 << 56;
const TOKEN_PORT: u64 = 3 << 56;
const TOKEN_KIND: u64 = 0xff << 56;

pub struct Daemon {
    workers: Vec<Arc<WorkerHandle>>,
    ports: Vec<Port>,
    switches: Vec<SwitchEntry>,
    next_id: u64,
    epoll: Epoll,
    control: Option<rpc::ControlServer>,
    state: Option<state::StateFile>,
    /// Saved ports that could not be rebuilt at start, kept until
    /// `port_add` or `port_del` names them.
    unrestored: Unrestored,
    /// The same for switches (`switch_add`, `switch_del`).
    unrestored_switches: Unrestored,
    /// What the metrics thread reads, if it runs.
    metrics: Option<metrics::Table>,
}

impl Daemon {
    pub fn new(opts: &Options) -> Result<Daemon, Error> {
        let mut workers = Vec::new();
        for (id, cpu) in opts.workers.iter().enumerate() {
            workers.push(Arc::new(WorkerHandle::spawn(id, *cpu, opts.poll)?));
        }
        let epoll = Epoll::new()?;
        if shutdown::wake_fd() >= 0 {
            epoll.ctl(
                ControlOperation::Add,
                shutdown::wake_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_SHUTDOWN),
            )?;
        }
        let control = match &opts.control {
            Some(p) => {
                let c = rpc::ControlServer::bind(p)?;
                epoll.ctl(
                    ControlOperation::Add,
                    c.listen_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_CONTROL),
                )?;
                info!("control socket {}", p.display());
                Some(c)
            }
            None => None,
        };
        info!(
            "{} worker(s) in {} mode: {}",
            workers.len(),
            if opts.poll { "poll" } else { "event" },
            workers
                .iter()
                .map(|w| match w.cpu {
                    Some(c) => format!("cpu {c}"),
                    None => "unpinned".into(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut d = Daemon {
            workers,
            ports: Vec::new(),
            switches: Vec::new(),
            next_id: 1,
            epoll,
            control,
            state: None,
            unrestored: Unrestored::default(),
            unrestored_switches: Unrestored::default(),
            metrics: None,
        };
        if let Some(addr) = &opts.metrics {
            let table = metrics::Table::default();
            metrics::serve(addr, table.clone()).map_err(Error::Port)?;
            d.metrics = Some(table);
        }
        if let Some(path) = &opts.state {
            // After the control socket is bound (a live daemon on it is
            // refused before its ports are touched), before any client is
            // served: the first `port list` sees the whole table.
            let file = state::StateFile::new(path.clone());
            let saved = file.load().map_err(Error::Port)?;
            d.restore(saved);
            d.state = Some(file);
            d.save_state()
                .map_err(|e| Error::Port(format!("state file {}: {e}", path.display())))?;
        }
        Ok(d)
    }

    /// Tell a supervisor (systemd `Type=notify`, `$NOTIFY_SOCKET`) that the
    /// daemon is ready: control socket bound, saved ports rebuilt. Without
    /// it `systemctl start` returns at once and a `port add` or a libvirt
    /// domain started right after can race the restore.
    pub fn notify_ready(&self) {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let sent = UnixDatagram::unbound().and_then(|s| {
            let b = path.as_bytes();
            let addr = match b.strip_prefix(b"@") {
                Some(name) => SocketAddr::from_abstract_name(name)?,
                None => SocketAddr::from_pathname(std::path::Path::new(&path))?,
            };
            s.send_to_addr(b"READY=1", &addr)
        });
        if let Err(e) = sent {
            warn!("telling the supervisor we are ready ($NOTIFY_SOCKET): {e}");
        }
    }

    /// Rebuild the switches and ports saved in the state file. One that
    /// fails (say its uplink or backend device is not there yet) is logged
    /// and kept in the file for the next start; the others come up
    /// regardless (a port on a switch that failed fails too).
    fn restore(&mut self, saved: state::Saved) {
        for params in saved.switches {
            let name = params["name"].as_str().unwrap_or("?").to_string();
            let added = self.switch_add_params(&params);
            match added {
                Ok(_) => info!("switch {name}: restored from the state file"),
                Err(e) => {
                    error!(
                        "switch {name}: not restored from the state file: {} (kept there; \
                         `vfrelay switch del {name}` forgets it)",
                        e.message
                    );
                    self.unrestored_switches.keep(name, params);
                }
            }
        }
        for params in saved.ports {
            let name = params["name"].as_str().unwrap_or("?").to_string();
            match PortSpec::from_params(&params).and_then(|s| self.add_port(s)) {
                Ok(_) => info!("{name}: port restored from the state file"),
                Err(e) => {
                    error!(
                        "{name}: not restored from the state file: {} (kept there; \
                         `vfrelay port del {name}` forgets it)",
                        e.message
                    );
                    self.unrestored.keep(name, params);
                }
            }
        }
    }

    /// Write the port table to the state file, if there is one.
    fn save_state(&self) -> io::Result<()> {
        let Some(file) = &self.state else {
            return Ok(());
        };
        let switches: Vec<Value> = self
            .switches
            .iter()
            .map(|e| {
                let mut v = json!({ "name": e.sw.name });
                if let Some(u) = &e.uplink {
                    v["uplink"] = json!(u.to_string());
                }
                v
            })
            .chain(self.unrestored_switches.params())
            .collect();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                // The MAC in effect, also where the daemon picked it.
                let mut spec = p.spec.clone();
                spec.mac = Some(p.mac);
                spec.to_params()
            })
            .chain(self.unrestored.params())
            .collect();
        file.save(&switches, &ports)
    }

    /// After a change by RPC: the state file follows, or the caller hears
    /// that it did not.
    fn persist(&self) -> Result<(), String> {
        self.save_state().map_err(|e| {
            let path = self.state.as_ref().map(|f| f.path().display().to_string());
            let msg = format!(
                "writing the state file {}: {e}",
                path.as_deref().unwrap_or("?")
            );
            error!("{msg}");
            msg
        })
    }

    /// Serve until SIGINT/SIGTERM, then tear every port down in order.
    /// With `exit_with_port`, a port whose device broke ends the daemon
    /// with an error (what the one-port commands did).
    pub fn run(&mut self, exit_with_port: bool) -> Result<(), Error> {
        let mut events = vec![EpollEvent::default(); 64];
        let mut result = Ok(());
        while !shutdown::requested() {
            let now = Instant::now();
            let next = self
                .ports
                .iter()
                .filter_map(|p| match &p.front {
                    Some(Front::VhostUser(v)) => v.deadline(),
                    _ => None,
                })
                .min();
            let timeout = next
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            let n = match self.epoll.wait(timeout.as_millis() as i32, &mut events[..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                self.event(ev.data());
            }
            let now = Instant::now();
            for i in 0..self.ports.len() {
                let due = match &self.ports[i].front {
                    Some(Front::VhostUser(v)) => v.deadline().is_some_and(|t| t <= now),
                    _ => false,
                };
                if due {
                    self.with_front(i, |f| {
                        if let Front::VhostUser(v) = f {
                            v.tick(now)
                        }
                    });
                }
            }
            if exit_with_port {
                if let Some(p) = self
                    .ports
                    .iter()
                    .find(|p| matches!(&p.front, Some(Front::Vduse(v)) if v.broken()))
                {
                    result = Err(Error::Port(format!(
                        "VDUSE device {} broke (the kernel stopped waiting for our answers)",
                        p.spec.name
                    )));
                    break;
                }
            }
        }
        while let Some(p) = self.ports.last() {
            let name = p.spec.name.clone();
            self.del_port(&name).ok();
        }
        result
    }

    fn event(&mut self, token: u64) {
        match token & TOKEN_KIND {
            _ if token == TOKEN_SHUTDOWN => {}
            _ if token == TOKEN_CONTROL => {
                let Some(c) = self.control.as_mut() else {
                    return;
                };
                for fd in c.accept() {
                    let ev = EpollEvent::new(EventSet::IN, TOKEN_CLIENT | fd as u64);
                    if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
                        warn!("control client: {e}");
                        c.close(fd);
                    }
                }
            }
            TOKEN_CLIENT => {
                let fd = (token & !TOKEN_KIND) as RawFd;
                // Taken out for the call: the handler is the daemon itself.
                let Some(mut c) = self.control.take() else {
                    return;
                };
                if !c.readable(fd, self) {
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                self.control = Some(c);
            }
            TOKEN_PORT => {
                let id = token & !TOKEN_KIND;
                if let Some(i) = self.ports.iter().position(|p| p.id == id) {
                    self.with_front(i, |f| {
                        if let Front::VhostUser(v) = f {
                            v.ready()
                        }
                    });
                }
            }
            _ => {}
        }
    }

    /// Run `f` on port `i`'s frontend with its fds out of the epoll (so a
    /// closed and reused fd number never keeps a stale registration), then
    /// watch what it wants watched now.
    fn with_front(&mut self, i: usize, f: impl FnOnce(&mut Front)) {
        let p = &mut self.ports[i];
        for fd in p.watched.drain(..) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        let Some(front) = p.front.as_mut() else {
            return;
        };
        f(front);
        if let Front::VhostUser(v) = front {
            for fd in v.watch() {
                let ev = EpollEvent::new(EventSet::IN, TOKEN_PORT | p.id);
                match self.epoll.ctl(ControlOperation::Add, fd, ev) {
                    Ok(()) => p.watched.push(fd),
                    Err(e) => warn!("{}: watching fd {fd}: {e}", p.spec.name),
                }
            }
        }
    }

    /// The least-loaded worker (fewest queue pairs).
    fn pick_worker(&self, extra: &[QpRef]) -> Arc<WorkerHandle> {
        let load = |w: &WorkerHandle| {
            self.ports
                .iter()
                .flat_map(|p| &p.qps)
                .chain(extra)
                .filter(|q| q.worker.id == w.id)
                .count()
        };
        self.workers
            .iter()
            .min_by_key(|w| (load(w), w.id))
            .expect("at least one worker")
            .clone()
    }

    pub fn add_port(&mut self, spec: PortSpec) -> Result<Value, RpcError> {
        if self.ports.iter().any(|p| p.spec.name == spec.name) {
            return Err(RpcError::failed(format!(
                "port '{}' already exists",
                spec.name
            )));
        }
        if let Kind::VhostUser { path, .. } = &spec.kind {
            if self
                .ports
                .iter()
                .any(|p| matches!(&p.spec.kind, Kind::VhostUser { path: q, .. } if q == path))
            {
                return Err(RpcError::failed(format!(
                    "socket {}: {}",
                    path.display(),
                    vhost_user::IN_USE
                )));
            }
        }
        if let Kind::Vduse { device, .. } = &spec.kind {
            if self
                .ports
                .iter()
                .any(|p| matches!(&p.spec.kind, Kind::Vduse { device: d, .. } if d == device))
            {
                return Err(RpcError::failed(format!(
                    "VDUSE device {device} is already served by this daemon"
                )));
            }
        }
        if let (Kind::Vduse { .. }, BackendSpec::Switch { .. }) = (&spec.kind, &spec.backend) {
            // Other ports' deliveries cannot yet look up IOVAs the kernel
            // maps without a request (the bounce map): the RX ring would
            // stop at the first frame.
            return Err(RpcError::failed(
                "a VDUSE port cannot join a switch yet (vhost-user ports can)",
            ));
        }
        let mac = spec.mac.unwrap_or_else(net::random_mac);
        let cfg = spec.net_config(mac);
        // A switch port: its first pair's RX ring is where other ports'
        // senders deliver, and every pair's backend switches what it sends.
        let mut member = None;
        let backends = match &spec.backend {
            BackendSpec::Switch { name, vlan } => {
                let sw = self
                    .switches
                    .iter()
                    .find(|e| e.sw.name == *name)
                    .map(|e| e.sw.clone())
                    .ok_or_else(|| {
                        RpcError::failed(format!(
                            "no switch named '{name}' (add it first: vfrelay switch add {name})"
                        ))
                    })?;
                let vlan = vlan.unwrap_or(0);
                let home = RxHalf::shared(format!("{}: rx of pair 0 (switch {name})", spec.name));
                let m = sw
                    .join(&spec.name, vlan, home.clone())
                    .map_err(RpcError::failed)?;
                let b: Vec<Box<dyn vfrelay_backends::Backend>> = (0..cfg.queue_pairs)
                    .map(|q| {
                        Box::new(SwitchPort::new(sw.clone(), m, vlan, q))
                            as Box<dyn vfrelay_backends::Backend>
                    })
                    .collect();
                member = Some((sw, m, home));
                b
            }
            b => b
                .open_with_mac(cfg.queue_pairs, mac)
                .map_err(|e| RpcError::failed(e.to_string()))?,
        };
        let id = self.next_id;
        self.next_id += 1;
        let mut qps = Vec::new();
        for (i, b) in backends.into_iter().enumerate() {
            let worker = self.pick_worker(&qps);
            let key = QpKey { port: id, index: i };
            let mut slot = Box::new(Slot::new(key, QueuePair::new(i, b)));
            if let (0, Some((_, _, home))) = (i, &member) {
                slot.attach_rx(home.clone());
            }
            qps.push(QpRef::add(worker, slot));
        }
        let member = member.map(|(sw, m, _)| (sw, m));
        let offloads = spec.backend.offload_features();
        let front = match &spec.kind {
            Kind::VhostUser { path, client } => {
                info!(
                    "{}: vhost-user virtio-net: mac {} mtu {} queue pairs {} backend {}",
                    spec.name,
                    net::format_mac(&mac),
                    cfg.mtu,
                    cfg.queue_pairs,
                    spec.backend
                );
                vhost_user::Port::new(
                    &spec.name,
                    path,
                    *client,
                    &spec.socket_access,
                    cfg,
                    offloads,
                    qps.clone(),
                )
                .map(|p| Front::VhostUser(Box::new(p)))
                .map_err(|e| e.to_string())
            }
            Kind::Vduse { device, attach } => {
                info!(
                    "{}: VDUSE virtio-net {device}: mac {} mtu {} backend {}",
                    spec.name,
                    net::format_mac(&mac),
                    cfg.mtu,
                    spec.backend
                );
                let v = vduse::VduseNet {
                    name: device.clone(),
                    attach: *attach,
                    cfg,
                    offloads,
                };
                vduse::Port::new(&v, qps[0].clone())
                    .map(Front::Vduse)
                    .map_err(|e| e.to_string())
            }
        };
        let front = match front {
            Ok(f) => f,
            Err(e) => {
                stop_port(member.as_ref(), &qps);
                return Err(RpcError::failed(e));
            }
        };
        self.ports.push(Port {
            id,
            spec,
            mac,
            front: Some(front),
            qps,
            watched: Vec::new(),
            member,
        });
        let i = self.ports.len() - 1;
        if let Some(t) = &self.metrics {
            let p = &self.ports[i];
            let qps = p
                .qps
                .iter()
                .map(|q| (q.key.index, q.stats.clone()))
                .collect();
            t.write()
                .unwrap_or_else(|e| e.into_inner())
                .push((p.spec.name.clone(), qps));
        }
        self.with_front(i, |_| {});
        Ok(self.port_json(&self.ports[i]))
    }

    pub fn del_port(&mut self, name: &str) -> Result<(), RpcError> {
        let Some(i) = self.ports.iter().position(|p| p.spec.name == name) else {
            return Err(RpcError::failed(format!("no port named '{name}'")));
        };
        self.with_front(i, |f| match f {
            Front::VhostUser(v) => v.close(),
            Front::Vduse(v) => v.close(),
        });
        let mut p = self.ports.remove(i);
        if let Some(t) = &self.metrics {
            t.write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(n, _)| n != name);
        }
        // Before the frontend's last resources go.
        stop_port(p.member.take().as_ref(), &p.qps);
        p.front = None;
        info!("{name}: port deleted");
        Ok(())
    }

    pub fn add_switch(
        &mut self,
        name: &str,
        uplink: Option<BackendSpec>,
    ) -> Result<Value, RpcError> {
        if !vfrelay_backends::valid_switch_name(name) {
            return Err(RpcError::invalid_params(format!(
                "'{name}' is not a valid switch name (letters, digits, '-', '_', '.')"
            )));
        }
        if self.switches.iter().any(|e| e.sw.name == name) {
            return Err(RpcError::failed(format!("switch '{name}' already exists")));
        }
        let backend = match &uplink {
            Some(BackendSpec::Switch { .. }) => {
                return Err(RpcError::invalid_params(
                    "an uplink is a device backend (af-xdp, tap, vf, loopback), not a switch",
                ))
            }
            Some(spec) => {
                let mut b = spec
                    .open(1)
                    .map_err(|e| RpcError::failed(format!("uplink {spec}: {e}")))?;
                Some((spec.to_string(), b.remove(0)))
            }
            None => None,
        };
        let sw = Switch::new(name, backend);
        let task = if sw.has_uplink() {
            let w = self.pick_worker(&[]);
            let tid = self.next_id;
            self.next_id += 1;
            w.add_task(tid, Box::new(UplinkTask::new(sw.clone())));
            Some((w, tid))
        } else {
            None
        };
        info!(
            "switch {name} added{}",
            uplink
                .as_ref()
                .map(|u| format!(" with uplink {u}"))
                .unwrap_or_default()
        );
        self.switches.push(SwitchEntry { sw, uplink, task });
        Ok(self.switch_json(self.switches.last().expect("just added")))
    }

    /// `switch_add` from its params (RPC, state file).
    fn switch_add_params(&mut self, params: &Value) -> Result<Value, RpcError> {
        let name = rpc::require(rpc::param_str(params, "name")?, "name")?.to_string();
        let uplink = match rpc::param_str(params, "uplink")? {
            Some(u) => Some(
                ports::parse_backend(u)
                    .map_err(|e| RpcError::invalid_params(format!("uplink: {e}")))?,
            ),
            None => None,
        };
        self.add_switch(&name, uplink)
    }

    pub fn del_switch(&mut self, name: &str) -> Result<(), RpcError> {
        let Some(i) = self.switches.iter().position(|e| e.sw.name == name) else {
            return Err(RpcError::failed(format!("no switch named '{name}'")));
        };
        let users: Vec<&str> = self
            .ports
            .iter()
            .filter(|p| p.member.as_ref().is_some_and(|(sw, _)| sw.name == name))
            .map(|p| p.spec.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(RpcError::failed(format!(
                "switch '{name}' still has ports: {} (delete them first)",
                users.join(", ")
            )));
        }
        let e = self.switches.remove(i);
        if let Some((w, tid)) = e.task {
            drop(w.remove_task(tid));
        }
        info!("switch {name} deleted");
        Ok(())
    }

    fn switch_json(&self, e: &SwitchEntry) -> Value {
        let mut v = e.sw.json();
        if let Some((w, _)) = &e.task {
            v["uplink_worker"] = json!(w.id);
        }
        if let Some(u) = &e.uplink {
            v["uplink_spec"] = json!(u.to_string());
        }
        v
    }

    fn port_json(&self, p: &Port) -> Value {
        let (kind, path, client, connected) = match (&p.spec.kind, &p.front) {
            (Kind::VhostUser { path, client }, Some(Front::VhostUser(v))) => (
                "vhost-user",
                path.display().to_string(),
                *client,
                v.connected(),
            ),
            (Kind::VhostUser { path, client }, _) => {
                ("vhost-user", path.display().to_string(), *client, false)
            }
            (Kind::Vduse { device, .. }, f) => (
                "vduse",
                device.clone(),
                false,
                matches!(f, Some(Front::Vduse(v)) if !v.broken()),
            ),
        };
        json!({
            "name": p.spec.name,
            "kind": kind,
            "path": path,
            "client": client,
            "queues": p.spec.queues,
            "queue_size": p.spec.queue_size,
            "mac": net::format_mac(&p.mac),
            "mtu": p.spec.mtu,
            "backend": p.spec.backend.to_string(),
            "connected": connected,
            "queue_pairs": p.qps.iter().map(|q| json!({"index": q.key.index, "worker": q.worker.id})).collect::<Vec<_>>(),
        })
    }

    fn stats_json(&self, name: Option<&str>) -> Result<Value, RpcError> {
        let ports: Vec<&Port> = match name {
            Some(n) => vec![self
                .ports
                .iter()
                .find(|p| p.spec.name == n)
                .ok_or_else(|| RpcError::failed(format!("no port named '{n}'")))?],
            None => self.ports.iter().collect(),
        };
        let out: Vec<Value> = ports
            .iter()
            .map(|p| {
                let mut total = crate::stats::QueueStats::default();
                let qps: Vec<Value> = p
                    .qps
                    .iter()
                    .map(|q| {
                        // The published copy: no command to a busy worker.
                        let st = q.stats.snapshot();
                        total = total.add(&st);
                        let mut v = st.json();
                        v.insert("index".into(), json!(q.key.index));
                        v.insert("worker".into(), json!(q.worker.id));
                        Value::Object(v)
                    })
                    .collect();
                json!({"name": p.spec.name, "total": total.json(), "queue_pairs": qps})
            })
            .collect();
        Ok(json!({ "ports": out }))
    }

    fn workers_json(&self) -> Value {
        Value::Array(
            self.workers
                .iter()
                .map(|w| {
                    let qps: Vec<Value> = self
                        .ports
                        .iter()
                        .flat_map(|p| p.qps.iter().map(move |q| (p, q)))
                        .filter(|(_, q)| q.worker.id == w.id)
                        .map(|(p, q)| json!({"port": p.spec.name, "index": q.key.index}))
                        .collect();
                    json!({
                        "id": w.id,
                        "cpu": w.cpu,
                        "mode": if w.poll { "poll" } else { "event" },
                        "busy": w.busy(),
                        "queue_pairs": qps,
                    })
                })
                .collect(),
        )
    }
}

/// Entries of the state file (name, params) that could not be rebuilt at
/// start: kept in the file (the next start tries again; a backend or
/// uplink device may simply not be there yet) until an add or delete of
/// that name replaces or forgets them.
#[derive(Default)]
struct Unrestored(Vec<(String, Value)>);

impl Unrestored {
    fn keep(&mut self, name: String, params: Value) {
        self.0.push((name, params));
    }

    /// Removes `name`'s entry, returning it (to put back if what replaces
    /// it is not kept after all).
    fn take(&mut self, name: &str) -> Option<(String, Value)> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(i))
    }

    fn put_back(&mut self, entry: Option<(String, Value)>) {
        self.0.extend(entry);
    }

    /// The params, as the state file keeps them.
    fn params(&self) -> impl Iterator<Item = Value> + '_ {
        self.0.iter().map(|(_, v)| v.clone())
    }
}

/// A port leaves its switch, if on one (nobody sends to it any more),
/// then its queue pairs leave their workers (backends close; a shared RX
/// ring is stopped too, so a sender still holding the old member list
/// finds no ring to write to); then what its pairs learned meanwhile is
/// forgotten, so its member number is free for the next port.
fn stop_port(member: Option<&(Arc<Switch>, u16)>, qps: &[QpRef]) {
    if let Some((sw, m)) = member {
        sw.leave(*m);
    }
    for q in qps {
        if let Some(mut slot) = q.worker.remove(q.key) {
            slot.with_rx(|s| s.reset());
        }
    }
    if let Some((sw, m)) = member {
        sw.forget(*m);
    }
}

impl rpc::Handler for Daemon {
    fn call(&mut self, method: &str, params: &Value) -> Result<Value, RpcError> {
        match method {
            "port_add" => {
                let spec = PortSpec::from_params(params)?;
                let name = spec.name.clone();
                let added = self.add_port(spec)?;
                // A saved port that was not restored is replaced by this one.
                let replaced = self.unrestored.take(&name);
                if let Err(e) = self.persist() {
                    // Not kept, so not made: a restart would lose it.
                    self.del_port(&name).ok();
                    self.unrestored.put_back(replaced);
                    return Err(RpcError::failed(format!("port '{name}' not added: {e}")));
                }
                Ok(added)
            }
            "port_del" => {
                let name = rpc::require(rpc::param_str(params, "name")?, "name")?;
                let live = self.ports.iter().any(|p| p.spec.name == name);
                if !live && self.unrestored.take(name).is_some() {
                    info!("{name}: forgotten (it was never restored)");
                } else {
                    self.del_port(name)?;
                }
                self.persist()
                    .map_err(|e| RpcError::failed(format!("port '{name}' deleted, but {e}")))?;
                Ok(json!({}))
            }
            "port_list" => Ok(Value::Array(
                self.ports.iter().map(|p| self.port_json(p)).collect(),
            )),
            "stats" => self.stats_json(rpc::param_str(params, "name")?),
            "worker_list" => Ok(self.workers_json()),
            "switch_add" => {
                let added = self.switch_add_params(params)?;
                let name = added["name"].as_str().unwrap_or("").to_string();
                // A saved switch that was not restored is replaced by this one.
                let replaced = self.unrestored_switches.take(&name);
                if let Err(e) = self.persist() {
                    self.del_switch(&name).ok();
                    self.unrestored_switches.put_back(replaced);
                    return Err(RpcError::failed(format!("switch '{name}' not added: {e}")));
                }
                Ok(added)
            }
            "switch_del" => {
                let name = rpc::require(rpc::param_str(params, "name")?, "name")?;
                let live = self.switches.iter().any(|e| e.sw.name == name);
                if !live && self.unrestored_switches.take(name).is_some() {
                    info!("switch {name}: forgotten (it was never restored)");
                } else {
                    self.del_switch(name)?;
                }
                self.persist()
                    .map_err(|e| RpcError::failed(format!("switch '{name}' deleted, but {e}")))?;
                Ok(json!({}))
            }
            "switch_list" => Ok(Value::Array(
                self.switches.iter().map(|e| self.switch_json(e)).collect(),
            )),
            m => Err(RpcError::method_not_found(m)),
        }
    }
}
