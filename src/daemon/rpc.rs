//! Control API plumbing (see spec/daemon.md): JSON-RPC 2.0 framing, one
//! request per line over a unix stream socket; the daemon's listening side
//! (driven from the caller's epoll loop) and the one-shot client used by
//! the `vfrelay port|stats|worker` subcommands.

// Wired into the daemon in a later commit.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use log::{debug, info, warn};
use serde_json::{json, Value};

/// Where the daemon listens unless --control or $VFRELAY_CONTROL says otherwise.
pub const DEFAULT_CONTROL_PATH: &str = "/run/vfrelay/control.sock";
/// A request line may be this long (newline excluded); longer is garbage.
pub const MAX_LINE: usize = 1 << 20;
/// How long a client waits for the daemon's answer (port_add may open a
/// backend and wait for a VDUSE attach, hence generous).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the daemon blocks on one response write before giving up on a
/// client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 64 * 1024;

// JSON-RPC 2.0 error codes; -32000 is ours, from the server-defined range.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const FAILED: i64 = -32000;

/// A JSON-RPC error object. Displays as its message alone, which is what
/// the client prints after "vfrelay: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn parse_error(msg: impl Into<String>) -> RpcError {
        RpcError::new(PARSE_ERROR, msg)
    }
    pub fn invalid_request(msg: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_REQUEST, msg)
    }
    pub fn method_not_found(method: &str) -> RpcError {
        RpcError::new(METHOD_NOT_FOUND, format!("unknown method '{method}'"))
    }
    pub fn invalid_params(msg: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_PARAMS, msg)
    }
    pub fn failed(msg: impl Into<String>) -> RpcError {
        RpcError::new(FAILED, msg)
    }
}

/// The daemon's method table. `params` is always an object (`{}` when the
/// request had none); unknown methods answer `RpcError::method_not_found`.
pub trait Handler {
    fn call(&mut self, method: &str, params: &Value) -> Result<Value, RpcError>;
}

/// Optional string field: absent or null is None.
pub fn param_str<'a>(p: &'a Value, key: &str) -> Result<Option<&'a str>, RpcError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::invalid_params(format!(
            "'{key}' must be a string"
        ))),
    }
}

/// Optional non-negative integer field: absent or null is None.
pub fn param_u64(p: &Value, key: &str) -> Result<Option<u64>, RpcError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            RpcError::invalid_params(format!("'{key}' must be a non-negative integer"))
        }),
    }
}

/// Optional boolean field: absent or null is None.
pub fn param_bool(p: &Value, key: &str) -> Result<Option<bool>, RpcError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RpcError::invalid_params(format!(
            "'{key}' must be a boolean"
        ))),
    }
}

/// Turn an absent field into "missing 'key'".
pub fn require<T>(opt: Option<T>, key: &str) -> Result<T, RpcError> {
    opt.ok_or_else(|| RpcError::invalid_params(format!("missing '{key}'")))
}

fn error_response(id: Value, e: &RpcError) -> String {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": { "code": e.code, "message": e.message },
    })
    .to_string()
}

/// Handle one request line (newline already stripped). Returns the response
/// text without a trailing newline, or None for a well-formed notification
/// (JSON-RPC never answers those, not even with an error).
pub fn handle_line(line: &[u8], h: &mut dyn Handler) -> Option<String> {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_response(
                Value::Null,
                &RpcError::parse_error(format!("parse error: {e}")),
            ))
        }
    };
    let obj = match req {
        Value::Object(o) => o,
        Value::Array(_) => {
            return Some(error_response(
                Value::Null,
                &RpcError::invalid_request("batches are not supported"),
            ))
        }
        _ => {
            return Some(error_response(
                Value::Null,
                &RpcError::invalid_request("request must be a JSON object"),
            ))
        }
    };
    // None: a notification. An id of the wrong type cannot be echoed, so
    // the answer carries id null, as JSON-RPC 2.0 prescribes.
    let id = match obj.get("id") {
        None => None,
        Some(v @ (Value::Number(_) | Value::String(_) | Value::Null)) => Some(v.clone()),
        Some(_) => {
            return Some(error_response(
                Value::Null,
                &RpcError::invalid_request("'id' must be a number, a string or null"),
            ))
        }
    };
    // A malformed notification still gets an answer: without a usable
    // request we cannot tell it was meant as one.
    let invalid = |msg: &str| {
        Some(error_response(
            id.clone().unwrap_or(Value::Null),
            &RpcError::invalid_request(msg),
        ))
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("'jsonrpc' must be \"2.0\"");
    }
    let method = match obj.get("method") {
        Some(Value::String(m)) => m.as_str(),
        _ => return invalid("'method' must be a string"),
    };
    let empty = Value::Object(Default::default());
    let result = match obj.get("params") {
        None => h.call(method, &empty),
        Some(p @ Value::Object(_)) => h.call(method, p),
        Some(_) => Err(RpcError::invalid_params("'params' must be an object")),
    };
    let id = id?;
    Some(match result {
        Ok(r) => json!({ "jsonrpc": "2.0", "id": id, "result": r }).to_string(),
        Err(e) => error_response(id, &e),
    })
}

struct Client {
    stream: UnixStream,
    /// Bytes received but not yet ending in a newline.
    buf: Vec<u8>,
}

/// The daemon's control socket: a nonblocking listener plus its clients,
/// driven by the caller's (level- or edge-triggered) epoll loop.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// (dev, ino) of the socket file we created, so Drop never removes a
    /// file someone else put there since.
    ident: Option<(u64, u64)>,
    clients: HashMap<RawFd, Client>,
    /// Clients dropped by the last `readable`, closed on the next call in:
    /// their fd must stay open (and its number unused) until the caller
    /// has taken it out of its epoll set.
    gone: Vec<UnixStream>,
    scratch: Vec<u8>,
}

/// umask is process-wide: serialise our set/restore pairs so two binds in
/// parallel (tests) cannot leave the process with the restrictive mask.
pub(crate) static UMASK_LOCK: Mutex<()> = Mutex::new(());

/// A unix socket at `path` that only its owner may use: what the control
/// socket and the vhost-user sockets both are. A stale socket from a crashed
/// run is replaced; a live one (`live` says whose) or anything that is not a
/// socket is refused. Errors are prefixed with `label` and the path.
pub(crate) struct OwnerOnly<'a> {
    pub label: &'a str,
    pub live: &'a str,
}

impl OwnerOnly<'_> {
    fn err(&self, path: &Path, what: impl std::fmt::Display) -> String {
        format!("{} {}: {what}", self.label, path.display())
    }

    pub(crate) fn bind(&self, path: &Path) -> io::Result<UnixListener> {
        // Held throughout, not just around umask: a directory created by a
        // parallel bind inside another's umask window would be unusable.
        let _g = UMASK_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| io::Error::new(e.kind(), self.err(path, e)))?;
        }
        self.prepare(path)?;
        // Owner-only from the moment it exists, not after a chmod race.
        let bound = {
            // SAFETY: umask has no memory-safety preconditions.
            let old = unsafe { libc::umask(0o177) };
            let r = UnixListener::bind(path);
            // SAFETY: as above; restores the caller's mask.
            unsafe { libc::umask(old) };
            r
        };
        let listener = bound.map_err(|e| io::Error::new(e.kind(), self.err(path, e)))?;
        // Belt and braces for filesystems that ignore umask on sockets.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io::Error::new(e.kind(), self.err(path, e)))?;
        Ok(listener)
    }

    fn prepare(&self, path: &Path) -> io::Result<()> {
        let path_error = |p: &Path, w: &dyn std::fmt::Display| self.err(p, w);
        prepare_path(path, self.live, &path_error)
    }
}

/// Who besides root may use a vhost-user server socket: `--socket-owner
/// USER[:GROUP]` and `--socket-mode OCTAL` (QEMU under libvirt runs as
/// `libvirt-qemu` and cannot open a 0600 root socket). Applied right after
/// the bind, while the socket is still root's and 0600, so nobody else can
/// connect before the port is as asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketAccess {
    pub owner: Option<Owner>,
    pub mode: Option<u32>,
}

/// `USER`, `USER:GROUP` or `:GROUP`, names or numbers, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// As given: what `port_add` params and the state file carry.
    pub spec: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Look a user or group up with the reentrant libc call `f`
/// (getpwnam_r or getgrnam_r); the id comes out of `id` once found.
///
/// # Safety
/// `T` must be the C struct `f` fills (libc's `passwd` for getpwnam_r,
/// `group` for getgrnam_r): plain data for which all-zero bytes are valid.
unsafe fn lookup<T>(
    name: &str,
    what: &str,
    f: unsafe extern "C" fn(
        *const libc::c_char,
        *mut T,
        *mut libc::c_char,
        libc::size_t,
        *mut *mut T,
    ) -> libc::c_int,
    id: impl Fn(&T) -> u32,
) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let cname = std::ffi::CString::new(name).map_err(|_| format!("{what} '{name}': bad name"))?;
    // Large groups (a directory service) need more than the usual 16 KiB.
    let mut len = 16 << 10;
    loop {
        let mut buf = vec![0 as libc::c_char; len];
        // SAFETY: the caller's promise on T.
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut found: *mut T = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the strings `entry`
        // points into live in `buf`, which outlives the only read (`id`).
        let rc = unsafe {
            f(
                cname.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            libc::ERANGE if len < 16 << 20 => len *= 4,
            0 if !found.is_null() => return Ok(id(&entry)),
            0 | libc::ENOENT | libc::ESRCH => return Err(format!("no {what} named '{name}'")),
            e => {
                return Err(format!(
                    "{what} '{name}': {}",
                    io::Error::from_raw_os_error(e)
                ))
            }
        }
    }
}

pub fn parse_owner(s: &str) -> Result<Owner, String> {
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    if user.is_empty() && group.is_none_or(str::is_empty) {
        return Err(format!("'{s}' is not USER[:GROUP] or :GROUP"));
    }
    let uid = (!user.is_empty())
        // SAFETY: passwd is what getpwnam_r fills.
        .then(|| unsafe { lookup(user, "user", libc::getpwnam_r, |p: &libc::passwd| p.pw_uid) })
        .transpose()?;
    let gid = match group {
        Some("") => return Err(format!("'{s}': empty group after ':'")),
        // SAFETY: group is what getgrnam_r fills.
        Some(g) => {
            Some(unsafe { lookup(g, "group", libc::getgrnam_r, |g: &libc::group| g.gr_gid) }?)
        }
        None => None,
    };
    Ok(Owner {
        spec: s.to_string(),
        uid,
        gid,
    })
}

pub fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "'{s}' is not a permission mode in octal, 0000 to 0777 (like 0660)"
        )),
    }
}

impl SocketAccess {
    pub fn is_default(&self) -> bool {
        self.owner.is_none() && self.mode.is_none()
    }

    /// The mode as it is spelled on the command line.
    pub fn mode_text(&self) -> Option<String> {
        self.mode.map(|m| format!("{m:04o}"))
    }

    /// Give the socket at `path` its mode, then its owner (root may change
    /// the mode of a file it owns without CAP_FOWNER; after the chown it
    /// could not). Both act on the inode opened without following
    /// symlinks, so a path swapped for a link by someone who can write the
    /// directory cannot make root chmod or chown another file.
    pub fn apply(&self, path: &Path) -> io::Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;
        let fail = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("socket {}: {what}: {e}", path.display()))
        };
        if self.is_default() {
            return Ok(());
        }
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|e| fail("path", io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        // SAFETY: a valid C string; the fd returned is owned below.
        let raw = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(fail("open", io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fstat writes into a zeroed stat we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: our fd, and a stat buffer of the right type.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(fail("stat", io::Error::last_os_error()));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(fail(
                "owner and mode",
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no longer the socket just bound",
                ),
            ));
        }
        if let Some(m) = self.mode {
            // chmod through the fd's /proc link reaches the opened inode.
            let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
            std::fs::set_permissions(&link, std::fs::Permissions::from_mode(m))
                .map_err(|e| fail(&format!("mode {m:04o}"), e))?;
        }
        if let Some(o) = &self.owner {
            let id = |v: Option<u32>| v.unwrap_or(u32::MAX);
            // SAFETY: fchownat on our fd with an empty path (AT_EMPTY_PATH).
            let rc = unsafe {
                libc::fchownat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    id(o.uid),
                    id(o.gid),
                    libc::AT_EMPTY_PATH,
                )
            };
            if rc != 0 {
                return Err(fail(
                    &format!("owner {}", o.spec),
                    io::Error::last_os_error(),
                ));
            }
        }
        Ok(())
    }
}

const CONTROL: OwnerOnly<'static> = OwnerOnly {
    label: "control socket",
    live: "a vfrelay daemon is already listening there",
};

/// Replace a stale socket from a crashed daemon; refuse a live one or
/// anything that is not a socket.
fn prepare_path(
    path: &Path,
    live: &str,
    path_error: &dyn Fn(&Path, &dyn std::fmt::Display) -> String,
) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io::Error::new(e.kind(), path_error(path, &e))),
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            path_error(path, &"exists and is not a socket"),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            path_error(path, &live),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!("removing stale socket {}", path.display());
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(io::Error::new(e.kind(), path_error(path, &e)))
                }
                _ => Ok(()),
            }
        }
        // Removed under us: nothing left to replace.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // e.g. EACCES: we cannot tell whether it is live, so do not unlink it.
        Err(e) => Err(io::Error::new(e.kind(), path_error(path, &e))),
    }
}

impl ControlServer {
    pub fn bind(path: &Path) -> io::Result<ControlServer> {
        let listener = CONTROL.bind(path)?;
        listener.set_nonblocking(true)?;
        let ident = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            ident,
            clients: HashMap::new(),
            gone: Vec::new(),
            scratch: vec![0; READ_CHUNK],
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Add this to the epoll set (EPOLLIN); call `accept` when it fires.
    pub fn listen_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accept every pending client. The caller adds the returned fds to its
    /// epoll (EPOLLIN) and calls `readable` when they fire.
    pub fn accept(&mut self) -> Vec<RawFd> {
        self.gone.clear();
        let mut fds = Vec::new();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // Blocking with a send timeout: a response is written
                    // whole or the client is dropped, with no output buffer
                    // and EPOLLOUT juggling. Reads use MSG_DONTWAIT instead.
                    if let Err(e) = stream
                        .set_nonblocking(false)
                        .and_then(|_| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
                    {
                        warn!("control client: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    debug!("control client {fd} connected");
                    self.clients.insert(
                        fd,
                        Client {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                    fds.push(fd);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // EMFILE and friends: retried on the next wakeup.
                    warn!("control socket {}: accept: {e}", self.path.display());
                    break;
                }
            }
        }
        fds
    }

    /// Read what client `fd` has sent, answer every complete line. Returns
    /// false when the client is gone (closed, error, or garbage) and was
    /// dropped: the caller then removes `fd` from its epoll; the fd itself
    /// is closed on the next call into the server.
    pub fn readable(&mut self, fd: RawFd, h: &mut dyn Handler) -> bool {
        self.gone.clear();
        let Some(mut c) = self.clients.remove(&fd) else {
            return false;
        };
        let keep = serve_client(&mut c, &mut self.scratch, h);
        if keep {
            self.clients.insert(fd, c);
        } else {
            debug!("control client {fd} gone");
            // The peer sees EOF now even if no further call comes soon.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            self.gone.push(c.stream);
        }
        keep
    }

    /// Drop a client the caller no longer wants, after removing it from
    /// its epoll set (closes the fd now).
    pub fn close(&mut self, fd: RawFd) {
        self.gone.clear();
        self.clients.remove(&fd);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| Some((m.dev(), m.ino())) == self.ident)
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Nonblocking read on a blocking socket (the socket stays blocking for
/// the timed response writes).
fn recv_dontwait(s: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid writable region of buf.len() bytes for the
    // duration of the call; the fd is owned by `s` and open.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Drain the socket, answering complete lines as they arrive. False: drop.
fn serve_client(c: &mut Client, scratch: &mut [u8], h: &mut dyn Handler) -> bool {
    loop {
        let n = match recv_dontwait(&c.stream, scratch) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!("control client: read: {e}");
                return false;
            }
        };
        if n == 0 {
            // EOF: a last request without its newline is still answered,
            // since the client can still read after shutdown(SHUT_WR).
            if !c.buf.is_empty() && c.buf.len() <= MAX_LINE {
                let line = std::mem::take(&mut c.buf);
                let out = answer(&line, h).map(|mut r| {
                    r.push('\n');
                    r
                });
                if let Some(out) = out {
                    let _ = c.stream.write_all(out.as_bytes());
                }
            }
            return false;
        }
        let scan_from = c.buf.len();
        c.buf.extend_from_slice(&scratch[..n]);
        if !answer_lines(c, scan_from, h) {
            return false;
        }
    }
}

/// Empty (whitespace-only) lines are ignored rather than answered with a
/// parse error, so `echo` with an extra newline stays quiet.
fn answer(line: &[u8], h: &mut dyn Handler) -> Option<String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    handle_line(line, h)
}

/// Answer every complete line in c.buf (only bytes from `scan_from` on are
/// new), keep the unterminated tail. False: the client must be dropped.
fn answer_lines(c: &mut Client, scan_from: usize, h: &mut dyn Handler) -> bool {
    let mut out = String::new();
    let mut start = 0;
    let mut pos = scan_from;
    let mut too_long = false;
    while let Some(off) = c.buf[pos..].iter().position(|&b| b == b'\n') {
        let end = pos + off;
        if end - start > MAX_LINE {
            too_long = true;
            break;
        }
        if let Some(r) = answer(&c.buf[start..end], h) {
            out.push_str(&r);
            out.push('\n');
        }
        start = end + 1;
        pos = start;
    }
    // Drain once per chunk, not per line: many small lines stay linear.
    c.buf.drain(..start);
    if too_long || c.buf.len() > MAX_LINE {
        let e = RpcError::parse_error(format!(
            "request line longer than {MAX_LINE} bytes; closing the connection"
        ));
        out.push_str(&error_response(Value::Null, &e));
        out.push('\n');
    }
    if !out.is_empty() {
        if let Err(e) = c.stream.write_all(out.as_bytes()) {
            debug!("control client: write: {e}");
            return false;
        }
    }
    !too_long && c.buf.len() <= MAX_LINE
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the vfrelay daemon at {}: {source} (is `vfrelay daemon` running? see --control)",
        path.display()
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the vfrelay daemon at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the vfrelay daemon at {} did not answer within {} s", path.display(), CLIENT_TIMEOUT.as_secs())]
    Timeout { path: PathBuf },
    #[error("the vfrelay daemon at {} closed the connection without answering", path.display())]
    Closed { path: PathBuf },
    #[error("bad answer from the vfrelay daemon at {}: {msg}", path.display())]
    Protocol { path: PathBuf, msg: String },
    /// The daemon answered with an error; displays as its message.
    #[error("{0}")]
    Rpc(RpcError),
}

/// One request on a fresh connection. `params` Null is sent as no params
/// (the daemon then sees `{}`).
pub fn call(path: &Path, method: &str, params: Value) -> Result<Value, ClientError> {
    let io_err = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            ClientError::Timeout { path: path.into() }
        } else {
            ClientError::Io {
                path: path.into(),
                source,
            }
        }
    };
    let protocol = |msg: String| ClientError::Protocol {
        path: path.into(),
        msg,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.into(),
        source,
    })?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(io_err)?;
    let mut req = json!({ "jsonrpc": "2.0", "id": 1, "method": method });
    if !params.is_null() {
        req["params"] = params;
    }
    let mut text = req.to_string();
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(io_err)?;

    let mut line = Vec::new();
    BufReader::new(&stream)
        .read_until(b'\n', &mut line)
        .map_err(io_err)?;
    if line.last() != Some(&b'\n') {
        return Err(ClientError::Closed { path: path.into() });
    }
    let resp: Value =
        serde_json::from_slice(&line).map_err(|e| protocol(format!("not JSON: {e}")))?;
    if resp.get("id") != Some(&json!(1)) {
        // The daemon could not read our request (id null) or answered
        // someone else's: report its error if it sent one.
        if let Some(e) = resp.get("error") {
            return Err(ClientError::Rpc(rpc_error_of(e).map_err(protocol)?));
        }
        return Err(protocol(format!("unexpected id in {resp}")));
    }
    if let Some(e) = resp.get("error") {
        return Err(ClientError::Rpc(rpc_error_of(e).map_err(protocol)?));
    }
    match resp.get("result") {
        Some(r) => Ok(r.clone()),
        None => Err(protocol(format!("neither result nor error in {resp}"))),
    }
}

fn rpc_error_of(e: &Value) -> Result<RpcError, String> {
    match (
        e.get("code").and_then(Value::as_i64),
        e.get("message").and_then(Value::as_str),
    ) {
        (Some(code), Some(message)) => Ok(RpcError::new(code, message)),
        _ => Err(format!("malformed error object {e}")),
    }
}

/// The control socket a client talks to, or the daemon listens on.
pub fn default_control_path(flag: Option<&Path>) -> PathBuf {
    control_path_from(flag, std::env::var_os("VFRELAY_CONTROL"))
}

/// Split out so tests need not mutate the process environment. An empty
/// $VFRELAY_CONTROL counts as unset.
fn control_path_from(flag: Option<&Path>, env: Option<OsString>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match env {
        Some(e) if !e.is_empty() => PathBuf::from(e),
        _ => PathBuf::from(DEFAULT_CONTROL_PATH),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::JoinHandle;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Default)]
    struct TestHandler {
        notes: usize,
    }

    impl Handler for TestHandler {
        fn call(&mut self, method: &str, p: &Value) -> Result<Value, RpcError> {
            match method {
                "echo" => Ok(p.clone()),
                "note" => {
                    self.notes += 1;
                    Ok(json!(self.notes))
                }
                "add" => {
                    let a = require(param_u64(p, "a")?, "a")?;
                    let b = param_u64(p, "b")?.unwrap_or(0);
                    Ok(json!(a + b))
                }
                "fail" => Err(RpcError::failed("no port named 'x'")),
                _ => Err(RpcError::method_not_found(method)),
            }
        }
    }

    fn run(line: &str) -> Value {
        let mut h = TestHandler::default();
        serde_json::from_str(&handle_line(line.as_bytes(), &mut h).unwrap()).unwrap()
    }

    fn err_code(v: &Value) -> i64 {
        v["error"]["code"].as_i64().unwrap()
    }

    #[test]
    fn success_and_ids_echoed() {
        let v = run(r#"{"jsonrpc":"2.0","id":7,"method":"add","params":{"a":2,"b":3}}"#);
        assert_eq!(v, json!({"jsonrpc":"2.0","id":7,"result":5}));
        let v = run(r#"{"jsonrpc":"2.0","id":"abc","method":"echo","params":{"k":[1]}}"#);
        assert_eq!(v, json!({"jsonrpc":"2.0","id":"abc","result":{"k":[1]}}));
        let v = run(r#"{"jsonrpc":"2.0","id":null,"method":"echo"}"#);
        assert_eq!(v, json!({"jsonrpc":"2.0","id":null,"result":{}}));
        let v = run(r#"{"jsonrpc":"2.0","id":1.5,"method":"fail"}"#);
        assert_eq!(v["id"], json!(1.5));
        assert_eq!(err_code(&v), FAILED);
        assert_eq!(v["error"]["message"], "no port named 'x'");
    }

    #[test]
    fn notification_gets_no_answer_but_runs() {
        let mut h = TestHandler::default();
        let r = handle_line(br#"{"jsonrpc":"2.0","method":"note"}"#, &mut h);
        assert_eq!(r, None);
        assert_eq!(h.notes, 1);
        // Even its errors stay silent.
        let r = handle_line(br#"{"jsonrpc":"2.0","method":"nope"}"#, &mut h);
        assert_eq!(r, None);
        let r = handle_line(br#"{"jsonrpc":"2.0","method":"note","params":3}"#, &mut h);
        assert_eq!(r, None);
        assert_eq!(h.notes, 1);
    }

    #[test]
    fn error_kinds() {
        let v = run(r#"{"jsonrpc":"2.0","id":1,"#);
        assert_eq!(err_code(&v), PARSE_ERROR);
        assert_eq!(v["id"], Value::Null);
        let mut h = TestHandler::default();
        let v: Value = serde_json::from_str(&handle_line(b"\xff\xfe", &mut h).unwrap()).unwrap();
        assert_eq!(err_code(&v), PARSE_ERROR);

        for (line, id) in [
            (r#""just a string""#, Value::Null),
            (r#"42"#, Value::Null),
            (r#"{"id":3,"method":"echo"}"#, json!(3)),
            (r#"{"jsonrpc":"1.0","id":"x","method":"echo"}"#, json!("x")),
            (r#"{"jsonrpc":2.0,"id":4,"method":"echo"}"#, json!(4)),
            (r#"{"jsonrpc":"2.0","id":5,"method":17}"#, json!(5)),
            (r#"{"jsonrpc":"2.0","id":6}"#, json!(6)),
            (
                r#"{"jsonrpc":"2.0","id":true,"method":"echo"}"#,
                Value::Null,
            ),
            (r#"{"jsonrpc":"2.0","id":[1],"method":"echo"}"#, Value::Null),
            // Malformed notifications are answered: no way to know.
            (r#"{"method":"echo"}"#, Value::Null),
        ] {
            let v = run(line);
            assert_eq!(err_code(&v), INVALID_REQUEST, "{line}");
            assert_eq!(v["id"], id, "{line}");
        }

        let v = run(r#"[{"jsonrpc":"2.0","id":1,"method":"echo"}]"#);
        assert_eq!(err_code(&v), INVALID_REQUEST);
        assert_eq!(v["error"]["message"], "batches are not supported");
        assert_eq!(v["id"], Value::Null);

        let v = run(r#"{"jsonrpc":"2.0","id":8,"method":"frob"}"#);
        assert_eq!(err_code(&v), METHOD_NOT_FOUND);
        assert_eq!(v["error"]["message"], "unknown method 'frob'");
        assert_eq!(v["id"], json!(8));

        for params in ["[1,2]", "null", "\"s\"", "3"] {
            let v = run(&format!(
                r#"{{"jsonrpc":"2.0","id":9,"method":"echo","params":{params}}}"#
            ));
            assert_eq!(err_code(&v), INVALID_PARAMS, "{params}");
            assert_eq!(v["id"], json!(9));
        }
    }

    #[test]
    fn param_helpers() {
        let p = json!({"s": "x", "n": 5, "neg": -1, "b": true, "z": null});
        assert_eq!(param_str(&p, "s"), Ok(Some("x")));
        assert_eq!(param_str(&p, "absent"), Ok(None));
        assert_eq!(param_str(&p, "z"), Ok(None));
        let e = param_str(&p, "n").unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (INVALID_PARAMS, "'n' must be a string")
        );
        assert_eq!(param_u64(&p, "n"), Ok(Some(5)));
        assert_eq!(param_u64(&p, "neg").unwrap_err().code, INVALID_PARAMS);
        assert_eq!(param_u64(&p, "s").unwrap_err().code, INVALID_PARAMS);
        assert_eq!(param_bool(&p, "b"), Ok(Some(true)));
        assert_eq!(
            param_bool(&p, "n").unwrap_err().message,
            "'n' must be a boolean"
        );
        let e = require(param_str(&p, "name").unwrap(), "name").unwrap_err();
        assert_eq!(
            (e.code, e.to_string()),
            (INVALID_PARAMS, "missing 'name'".into())
        );
    }

    #[test]
    fn control_path_precedence() {
        let flag = Path::new("/x/flag.sock");
        assert_eq!(
            control_path_from(Some(flag), Some("/env.sock".into())),
            flag
        );
        assert_eq!(
            control_path_from(None, Some("/env.sock".into())),
            Path::new("/env.sock")
        );
        assert_eq!(
            control_path_from(None, Some("".into())),
            Path::new(DEFAULT_CONTROL_PATH)
        );
        assert_eq!(
            control_path_from(None, None),
            Path::new(DEFAULT_CONTROL_PATH)
        );
        assert_eq!(default_control_path(Some(flag)), flag);
    }

    /// A private directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let d = std::env::temp_dir().join(format!(
                "vfrelay-rpc-{}-{name}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&d).unwrap();
            // Explicit mode: a parallel bind's umask window must not matter.
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Drive a server from a small epoll loop in a thread, as the daemon will.
    struct Running {
        stop: EventFd,
        thread: Option<JoinHandle<ControlServer>>,
    }

    impl Running {
        fn start(server: ControlServer) -> Running {
            let stop = EventFd::new(EFD_NONBLOCK).unwrap();
            let stop_fd = stop.as_raw_fd();
            let thread = std::thread::spawn(move || {
                let mut server = server;
                let mut h = TestHandler::default();
                let ep = Epoll::new().unwrap();
                let add = |fd: RawFd| {
                    ep.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, fd as u64),
                    )
                    .unwrap()
                };
                add(stop_fd);
                add(server.listen_fd());
                let mut events = vec![EpollEvent::default(); 16];
                loop {
                    let n = ep.wait(-1, &mut events).unwrap();
                    for ev in &events[..n] {
                        let fd = ev.fd();
                        if fd == stop_fd {
                            return server;
                        } else if fd == server.listen_fd() {
                            for c in server.accept() {
                                add(c);
                            }
                        } else if !server.readable(fd, &mut h) {
                            ep.ctl(ControlOperation::Delete, fd, EpollEvent::default())
                                .unwrap();
                        }
                    }
                }
            });
            Running {
                stop,
                thread: Some(thread),
            }
        }

        fn finish(mut self) -> ControlServer {
            self.stop.write(1).unwrap();
            self.thread.take().unwrap().join().unwrap()
        }
    }

    fn send_lines(s: &mut UnixStream, data: &[u8], n: usize) -> Vec<Value> {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(data).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        (0..n)
            .map(|_| {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                assert!(l.ends_with('\n'), "{l:?}");
                serde_json::from_str(&l).unwrap()
            })
            .collect()
    }

    #[test]
    fn server_round_trip() {
        let dir = TempDir::new("rt");
        // Parent created on demand.
        let path = dir.0.join("sub/control.sock");
        let server = ControlServer::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let running = Running::start(server);

        assert_eq!(
            call(&path, "add", json!({"a": 40, "b": 2})).unwrap(),
            json!(42)
        );
        assert_eq!(call(&path, "echo", Value::Null).unwrap(), json!({}));
        match call(&path, "fail", json!({})) {
            Err(ClientError::Rpc(e)) => {
                assert_eq!(e.code, FAILED);
                assert_eq!(e.to_string(), "no port named 'x'");
            }
            r => panic!("{r:?}"),
        }
        match call(&path, "add", json!({})) {
            Err(e @ ClientError::Rpc(_)) => assert_eq!(e.to_string(), "missing 'a'"),
            r => panic!("{r:?}"),
        }

        // Several requests on one connection, in one write, answered in
        // order; a notification and empty lines in between stay silent.
        let mut s = UnixStream::connect(&path).unwrap();
        let v = send_lines(
            &mut s,
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"add\",\"params\":{\"a\":1}}\n\
              \n  \r\n{\"jsonrpc\":\"2.0\",\"method\":\"note\"}\n\
              {\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"note\"}\n",
            2,
        );
        assert_eq!(v[0], json!({"jsonrpc":"2.0","id":1,"result":1}));
        assert_eq!(v[1], json!({"jsonrpc":"2.0","id":2,"result":2}));
        // A request split across writes.
        s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":3,").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let v = send_lines(&mut s, b"\"method\":\"echo\"}\n", 1);
        assert_eq!(v[0]["id"], json!(3));
        // Garbage does not end the connection.
        let v = send_lines(
            &mut s,
            b"this is not json\n{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"echo\"}\n",
            2,
        );
        assert_eq!(err_code(&v[0]), PARSE_ERROR);
        assert_eq!(v[0]["id"], Value::Null);
        assert_eq!(v[1], json!({"jsonrpc":"2.0","id":4,"result":{}}));
        // A last request without newline is answered at EOF.
        s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"echo\"}")
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        let v: Value = serde_json::from_str(rest.trim_end()).unwrap();
        assert_eq!(v["id"], json!(5));

        // Over-long line: one parse error, then the connection is closed.
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&vec![b'x'; MAX_LINE + 1]).unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        let lines: Vec<&str> = rest.lines().collect();
        assert_eq!(lines.len(), 1, "{rest:?}");
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(err_code(&v), PARSE_ERROR);

        // Still serving others.
        assert_eq!(call(&path, "add", json!({"a": 1})).unwrap(), json!(1));

        let server = running.finish();
        drop(server);
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[test]
    fn bind_refuses_live_replaces_stale() {
        let dir = TempDir::new("bind");
        let path = dir.0.join("control.sock");

        // A stale socket file left by a dead process (std does not unlink).
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = ControlServer::bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let e = ControlServer::bind(&path)
            .err()
            .expect("live socket refused");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            e.to_string(),
            format!(
                "control socket {}: a vfrelay daemon is already listening there",
                path.display()
            )
        );
        // The refused bind left the live socket alone.
        assert!(UnixStream::connect(&path).is_ok());
        drop(live);
        assert!(!path.exists());

        let file = dir.0.join("plain");
        std::fs::write(&file, b"x").unwrap();
        let e = ControlServer::bind(&file).err().expect("not a socket");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert!(file.exists());
    }

    #[test]
    fn client_errors() {
        let dir = TempDir::new("client");
        let path = dir.0.join("none.sock");
        let e = call(&path, "port_list", json!({})).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }));
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot reach the vfrelay daemon at {}: ",
                path.display()
            )) && msg.ends_with("(is `vfrelay daemon` running? see --control)"),
            "{msg}"
        );

        // A peer that hangs up without answering.
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(
                req,
                json!({"jsonrpc":"2.0","id":1,"method":"m","params":{"k":1}})
            );
        });
        let e = call(&path, "m", json!({"k": 1})).unwrap_err();
        assert!(matches!(e, ClientError::Closed { .. }), "{e:?}");
        t.join().unwrap();
    }

    #[test]
    fn readable_unknown_fd_is_false() {
        let dir = TempDir::new("unknown");
        let mut server = ControlServer::bind(&dir.0.join("c.sock")).unwrap();
        let mut h = TestHandler::default();
        assert!(!server.readable(12345, &mut h));
    }
}
