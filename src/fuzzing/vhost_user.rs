//! Fuzz target `vhost_user`: arbitrary message sequences, each with an
//! arbitrary request code, flags, size field, body and any number of fds
//! of any kind (memfds of any size and content, eventfds, /dev/null, either
//! end of a pipe), written with SCM_RIGHTS into one end of a socketpair and
//! served from the other by the daemon's own loop body
//! ([`serve_one`](crate::frontend::vhost_user::serve_one): the wire
//! reader, `Device::handle` and the replies) until the connection ends.
//!
//! The devices (1 or 2 queue pairs, two ring sizes) and their worker are
//! made once and reused: each input is one connection, opened and closed
//! with `begin_connection` / `end_connection` as a port does, so state
//! carried from one input to the next would be a reconnection bug. The
//! worker is real and runs whatever rings an input starts, over the
//! memfds it mapped, with loopback backends.
//!
//! Checked: no panic, no hang, and no fd left open once the connection is
//! gone (the process's fd count is the same before and after each input).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::In;
use crate::dataplane::worker::{QpKey, QpRef, Slot, WorkerHandle};
use crate::dataplane::QueuePair;
use crate::frontend::vhost_user::device::Device;
use crate::frontend::vhost_user::{protocol, serve_one};
use crate::net::NetConfig;
use vfrelay_backends::loopback::Loopback;

/// Messages per connection.
const MAX_MSGS: usize = 64;
/// Fds per input, all messages together (each one is a real open file).
const MAX_FDS: usize = 96;
/// Largest memfd: mappings are lazy, only written pages cost memory.
const MAX_MEMFD: u64 = 64 << 20;

/// Device variants: (queue pairs, ring size).
const VARIANTS: [(usize, u16); 4] = [(1, 256), (2, 256), (1, 1024), (2, 1024)];

fn devices() -> &'static [Mutex<Device>] {
    static DEVICES: OnceLock<Vec<Mutex<Device>>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        // The daemon is a Rust binary, whose runtime ignores SIGPIPE: a
        // write to a pipe nobody reads (a call fd) is EPIPE there. A fuzz
        // binary has no Rust main, so do the same here.
        // SAFETY: setting a signal's disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let worker = Arc::new(WorkerHandle::spawn(0, None, false).expect("worker"));
        VARIANTS
            .iter()
            .enumerate()
            .map(|(port, &(pairs, queue_size))| {
                let qps = (0..pairs)
                    .map(|index| {
                        let key = QpKey {
                            port: port as u64,
                            index,
                        };
                        let qp = QueuePair::new(index, Box::new(Loopback::new(index)));
                        QpRef::add(worker.clone(), Box::new(Slot::new(key, qp)))
                    })
                    .collect();
                let cfg = NetConfig {
                    mac: [0x52, 0x54, 0, 0, 0, 1],
                    mtu: 1500,
                    queue_pairs: pairs,
                    queue_size,
                };
                Mutex::new(Device::new(format!("fuzz{port}"), cfg, 0, qps))
            })
            .collect()
    })
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Kinds of fd a message may carry.
fn make_fd(u: &mut In) -> Option<OwnedFd> {
    let kind = u.u8();
    match kind % 5 {
        0 => {
            // SAFETY: memfd_create with a NUL-terminated name; the fd is
            // owned right below.
            let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return None;
            }
            // SAFETY: a fresh fd nothing else owns.
            let f = unsafe { File::from_raw_fd(fd) };
            let size = if kind & 0x80 == 0 {
                // Whole pages, as QEMU's guest RAM.
                (u.u16() as u64 * 4096).min(MAX_MEMFD)
            } else {
                u.u32() as u64 % MAX_MEMFD
            };
            f.set_len(size).ok()?;
            // Some content: rings and buffers a started queue walks.
            for _ in 0..u.u8() % 8 {
                let off = u.u32() as u64 % size.max(1);
                let n = u.u8() as usize;
                let data = u.bytes(n);
                let n = data.len().min((size - off.min(size)) as usize);
                let _ = f.write_at(&data[..n], off);
            }
            Some(f.into())
        }
        1 => {
            // SAFETY: eventfd returns a fresh fd, owned right below.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            // SAFETY: as above.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        }
        2 => File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .ok()
            .map(Into::into),
        _ => {
            let mut p = [-1 as RawFd; 2];
            // SAFETY: pipe2 writes two fresh fds into `p`.
            if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return None;
            }
            // SAFETY: both are fresh fds nothing else owns.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
            // The end kept here is closed when it goes out of scope.
            Some(if kind % 5 == 3 { r } else { w })
        }
    }
}

/// One message as bytes on the wire plus its fds.
fn message(u: &mut In, fds_left: &mut usize) -> (Vec<u8>, Vec<OwnedFd>) {
    let code = u.u8();
    let request = if code < 0xf0 {
        // The request codes there are, and a few past them.
        code as u32 % 48
    } else {
        u.u32()
    };
    let f = u.u8();
    let flags = match f >> 6 {
        // Version 1, with or without NEED_REPLY.
        0..=2 => 1 | (f as u32 & 8),
        _ => u.u32(),
    };
    let n = u.u16() as usize % 1024;
    let body = u.bytes(n).to_vec();
    let s = u.u8();
    let size = if s < 0xf0 { body.len() as u32 } else { u.u32() };
    let nfds = match u.u8() {
        k @ 0..=0xef => k as usize % 3,
        // More than a request may carry, or than the reader takes (32).
        k => k as usize % 40,
    }
    .min(*fds_left);
    let mut fds = Vec::with_capacity(nfds);
    for _ in 0..nfds {
        if let Some(fd) = make_fd(u) {
            fds.push(fd);
        }
    }
    *fds_left -= fds.len();
    let mut wire = Vec::with_capacity(protocol::HDR_LEN + body.len());
    wire.extend_from_slice(&request.to_ne_bytes());
    wire.extend_from_slice(&flags.to_ne_bytes());
    wire.extend_from_slice(&size.to_ne_bytes());
    wire.extend_from_slice(&body);
    (wire, fds)
}

/// The `vhost_user` fuzz target: panics on a finding.
pub fn vhost_user(data: &[u8]) {
    let devs = devices();
    let mut u = In::new(data);
    let mut dev = devs[u.u8() as usize % devs.len()]
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let before = open_fds();
    {
        let (front, back) = UnixStream::pair().expect("socketpair");
        // A full socket ends the sequence instead of blocking it.
        front.set_nonblocking(true).expect("non-blocking");
        let mut fds_left = MAX_FDS;
        for _ in 0..MAX_MSGS {
            if u.is_empty() {
                break;
            }
            let (wire, fds) = message(&mut u, &mut fds_left);
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let sent = if raw.is_empty() {
                (&front).write(&wire).map_err(|_| ())
            } else {
                front.send_with_fds(&[&wire[..]], &raw).map_err(|_| ())
            };
            // Our copies close here; the kernel holds the ones in flight.
            drop(fds);
            if sent != Ok(wire.len()) {
                break;
            }
        }
        // The front end is done: a message cut short meets the end of the
        // stream, not the 1 s timeout for a stalled one.
        let _ = front.shutdown(std::net::Shutdown::Write);
        // As a port attaches a connection.
        back.set_write_timeout(Some(protocol::MSG_TIMEOUT))
            .expect("write timeout");
        dev.begin_connection();
        while serve_one(&mut dev, &back, "fuzz").is_ok() {}
        dev.end_connection();
    }
    let after = open_fds();
    assert_eq!(before, after, "fds open before and after the connection");
}
