//! vhost-user frontend: virtio-net devices served over vhost-user sockets
//! (QEMU `-netdev vhost-user`, DPDK virtio-user, libvirt). Control plane
//! only: the daemon's control thread drives every port's socket from one
//! epoll; [`device`] turns requests into worker commands.

pub mod device;
pub mod protocol;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vhost::vhost_user::message::VhostUserU64;
use vm_memory::ByteValued;

use crate::daemon::rpc::{OwnerOnly, SocketAccess};
use crate::dataplane::worker::QpRef;
use crate::net::NetConfig;
use device::{Device, Failure};
use protocol::WireError;

/// How long a front end may take to send the rest of a message it began.
const MSG_TIMEOUT: Duration = protocol::MSG_TIMEOUT;
/// Client mode: how often to try reaching a front end that is not there.
const RECONNECT: Duration = Duration::from_millis(500);

/// What a socket path some server already listens on is told.
pub const IN_USE: &str = "a vfrelay or other server is already listening there";

const SOCKET: OwnerOnly<'static> = OwnerOnly {
    label: "socket",
    live: IN_USE,
};

/// Read one request from `conn`, handle it and reply: an error ends the
/// connection. (The fuzz target drives the same function.)
pub(crate) fn serve_one(dev: &mut Device, conn: &UnixStream, name: &str) -> Result<(), WireError> {
    let r = protocol::recv(conn)?;
    let hdr = r.hdr;
    let req = r.req;
    let ack = dev.reply_ack() && hdr.need_reply();
    debug!("{name}: {req:?}");
    let out = dev.handle(r);
    let status = match out {
        Ok(Some(payload)) => return Ok(protocol::reply(conn, &hdr, &payload)?),
        Ok(None) => 0,
        Err(Failure::Refused(m)) if !protocol::has_reply(req) => {
            warn!("{name}: {req:?} refused: {m}");
            1
        }
        Err(Failure::Refused(m)) | Err(Failure::Close(m)) => {
            return Err(WireError::Bad(format!("{req:?}: {m}")))
        }
    };
    if ack {
        protocol::reply(conn, &hdr, VhostUserU64::new(status).as_slice())?;
    }
    Ok(())
}

/// One vhost-user port: its socket, its connection, its device.
pub struct Port {
    path: PathBuf,
    client: bool,
    listener: Option<UnixListener>,
    conn: Option<UnixStream>,
    next_connect: Option<Instant>,
    dev: Device,
    name: String,
}

impl Port {
    /// Server mode binds the socket now (owner-only; a stale one from a
    /// crashed run replaced, a live one refused); client mode starts trying
    /// to reach the front end.
    pub fn new(
        name: &str,
        path: &Path,
        client: bool,
        access: &SocketAccess,
        cfg: NetConfig,
        offloads: u64,
        qps: Vec<QpRef>,
    ) -> io::Result<Port> {
        let listener = if client {
            None
        } else {
            let l = SOCKET.bind(path)?;
            if let Err(e) = access.apply(path) {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
            l.set_nonblocking(true)?;
            info!("{name}: listening on {}", path.display());
            Some(l)
        };
        Ok(Port {
            path: path.to_path_buf(),
            client,
            listener,
            conn: None,
            next_connect: client.then(Instant::now),
            dev: Device::new(name.to_string(), cfg, offloads, qps),
            name: name.to_string(),
        })
    }

    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The fds the control thread should watch now.
    pub fn watch(&self) -> Vec<RawFd> {
        match (&self.conn, &self.listener) {
            (Some(c), _) => vec![c.as_raw_fd()],
            // One front end at a time: others wait in the backlog.
            (None, Some(l)) => vec![l.as_raw_fd()],
            (None, None) => Vec::new(),
        }
    }

    /// When the control thread should call [`tick`](Self::tick) next.
    pub fn deadline(&self) -> Option<Instant> {
        if self.conn.is_some() {
            None
        } else {
            self.next_connect
        }
    }

    /// Client mode: try to reach the front end when it is time.
    pub fn tick(&mut self, now: Instant) {
        if self.conn.is_some() || self.next_connect.is_none_or(|t| t > now) {
            return;
        }
        match UnixStream::connect(&self.path) {
            Ok(s) => self.attach(s),
            Err(e) => {
                debug!("{}: connecting to {}: {e}", self.name, self.path.display());
                self.next_connect = Some(now + RECONNECT);
            }
        }
    }

    fn attach(&mut self, s: UnixStream) {
        // A front end that stops reading our replies ends its connection,
        // not the control thread (reads get a per-message deadline).
        if let Err(e) = s.set_write_timeout(Some(MSG_TIMEOUT)) {
            warn!("{}: {e}", self.name);
        }
        self.dev.begin_connection();
        self.conn = Some(s);
        info!("{}: front end connected", self.name);
    }

    /// One of the fds from [`watch`](Self::watch) is readable.
    pub fn ready(&mut self) {
        if self.conn.is_none() {
            if let Some(l) = &self.listener {
                match l.accept() {
                    Ok((s, _)) => {
                        if let Err(e) = s.set_nonblocking(false) {
                            warn!("{}: {e}", self.name);
                        }
                        self.attach(s);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => warn!("{}: accepting front end: {e}", self.name),
                }
            }
            return;
        }
        if let Err(e) = self.serve_one() {
            match e {
                WireError::Closed => info!("{}: front end disconnected", self.name),
                e => warn!("{}: front end connection ended: {e}", self.name),
            }
            self.detach();
        }
    }

    fn serve_one(&mut self) -> Result<(), WireError> {
        let conn = self.conn.as_ref().expect("connected");
        serve_one(&mut self.dev, conn, &self.name)
    }

    fn detach(&mut self) {
        self.conn = None;
        self.dev.end_connection();
        if self.client {
            info!("{}: reconnecting to {}", self.name, self.path.display());
            self.next_connect = Some(Instant::now() + RECONNECT);
        } else {
            info!("{}: listening again on {}", self.name, self.path.display());
        }
    }

    /// Close the connection (the front end sees the back end go) and, in
    /// server mode, remove the socket.
    pub fn close(&mut self) {
        if self.conn.is_some() {
            self.conn = None;
            self.dev.end_connection();
        }
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        self.close();
    }
}
