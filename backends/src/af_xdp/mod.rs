//! `af-xdp,ifname=NAME[,queue=Q][,mode=copy|zerocopy|auto]`: frames go
//! through AF_XDP sockets bound to NIC queues Q, Q+1, ... (one per queue
//! pair), each with its own UMEM. An XDP program on the interface redirects
//! those queues' traffic to the sockets; traffic on other queues, or on a
//! queue whose socket is gone, continues to the normal stack (XDP_PASS).
//!
//! The program is attached through a bpf_link, so it is detached when the
//! last queue pair is dropped, or when the process dies.
//!
//! Frames are plain Ethernet: no vnet header, no offloads. A peer with TX
//! checksum offload can hand us frames whose L4 checksum is not filled in
//! (see README: `ethtool -K PEER tx off`).

mod bpf;
mod ring;
mod xsk;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use log::{debug, info};

use crate::{Backend, Error, Result, XdpMode};

/// The redirect program and its XSKMAP, shared by all queue pairs of one
/// interface.
pub(crate) struct XdpProgram {
    // Field order is drop order: closing the link detaches the program
    // first, then the program and the map go.
    _link: OwnedFd,
    _prog: OwnedFd,
    map: OwnedFd,
    ifname: String,
    ifindex: u32,
    /// Attached in driver (native) mode, else generic (SKB) mode.
    native: bool,
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        debug!("af-xdp: detaching XDP program from {}", self.ifname);
    }
}

fn busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EEXIST))
}

fn perm_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EPERM) {
        " (needs root, or CAP_NET_ADMIN + CAP_BPF)"
    } else {
        ""
    }
}

impl XdpProgram {
    fn attach(ifname: &str, ifindex: u32, max_entries: u32) -> Result<XdpProgram> {
        let map = bpf::create_xskmap(max_entries)
            .map_err(|e| Error::io(format!("af-xdp: creating XSKMAP{}", perm_hint(&e)), e))?;
        let prog = bpf::load_redirect_program(&map)
            .map_err(|e| Error::io(format!("af-xdp: loading XDP program{}", perm_hint(&e)), e))?;
        let already = |e: &io::Error| {
            Error::Other(format!(
                "af-xdp: {ifname} already has an XDP program attached ({e}); \
                 not replacing it (remove it with: ip link set dev {ifname} xdp off)"
            ))
        };
        // Native mode where the driver has it; generic (SKB) mode works on
        // any netdev, slower. A taken interface fails either way: stop there.
        let (link, native) = match bpf::link_xdp(&prog, ifindex, bpf::XDP_FLAGS_DRV_MODE) {
            Ok(l) => (l, true),
            Err(e) if busy(&e) => return Err(already(&e)),
            Err(native_err) => {
                debug!("af-xdp: native XDP on {ifname}: {native_err}; trying generic mode");
                match bpf::link_xdp(&prog, ifindex, bpf::XDP_FLAGS_SKB_MODE) {
                    Ok(l) => (l, false),
                    Err(e) if busy(&e) => return Err(already(&e)),
                    Err(e) => {
                        return Err(Error::Other(format!(
                            "af-xdp: attaching XDP program to {ifname}: {e} \
                             (native mode: {native_err}){}",
                            perm_hint(&e)
                        )))
                    }
                }
            }
        };
        Ok(XdpProgram {
            _link: link,
            _prog: prog,
            map,
            ifname: ifname.to_string(),
            ifindex,
            native,
        })
    }

    /// Steers `queue` to the socket `xsk`.
    fn insert(&self, queue: u32, xsk: &xsk::Xsk) -> Result<()> {
        bpf::map_update(self.map.as_raw_fd(), queue, xsk.raw_fd() as u32).map_err(|e| {
            Error::io(
                format!(
                    "af-xdp: {} queue {queue}: adding socket to XSKMAP",
                    self.ifname
                ),
                e,
            )
        })
    }
}

fn ifindex(ifname: &str) -> Result<u32> {
    let missing = || Error::Other(format!("af-xdp: no interface named {ifname}"));
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
        return Err(missing());
    }
    crate::if_index(ifname).ok_or_else(missing)
}

/// Number of RX queues, from sysfs; None if sysfs does not say (then the
/// bind reports a bad queue instead).
fn rx_queues(ifname: &str) -> Option<u32> {
    if ifname.contains('/') {
        return None;
    }
    let dir = std::fs::read_dir(format!("/sys/class/net/{ifname}/queues")).ok()?;
    let n = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    u32::try_from(n).ok().filter(|&n| n > 0)
}

/// Checks that queues `first .. first + pairs` exist; returns the XSKMAP
/// size needed to hold them.
fn check_queues(ifname: &str, first: u32, pairs: usize, have: Option<u32>) -> Result<u32> {
    if pairs == 0 {
        return Err(Error::Other("af-xdp: need at least one queue pair".into()));
    }
    let end = u32::try_from(pairs)
        .ok()
        .and_then(|p| first.checked_add(p))
        .ok_or_else(|| {
            Error::Other(format!(
                "af-xdp: queue {first} + {pairs} queue pairs is out of range"
            ))
        })?;
    if let Some(n) = have {
        if end > n {
            let missing = n.max(first);
            return Err(Error::Other(if pairs == 1 {
                format!("af-xdp: {ifname} has {n} queues, queue {first} does not exist")
            } else {
                format!(
                    "af-xdp: {ifname} has {n} queues, queue {missing} does not exist \
                     ({pairs} queue pairs from queue {first} need queues {first}..{})",
                    end - 1
                )
            }));
        }
    }
    Ok(end)
}

/// Opens `queue_pairs` AF_XDP sockets on `ifname`, queue pair i bound to
/// NIC queue `queue + i`, and attaches the redirect program.
pub fn open(
    ifname: &str,
    queue: u32,
    mode: XdpMode,
    queue_pairs: usize,
) -> Result<Vec<Box<dyn Backend>>> {
    let ifindex = ifindex(ifname)?;
    let map_size = check_queues(ifname, queue, queue_pairs, rx_queues(ifname))?;
    let prog = Arc::new(XdpProgram::attach(ifname, ifindex, map_size)?);
    let mut out: Vec<Box<dyn Backend>> = Vec::with_capacity(queue_pairs);
    for q in queue..map_size {
        let s = xsk::Xsk::open(&prog, q, mode)?;
        prog.insert(q, &s)?;
        info!("{} ready", s.describe());
        out.push(Box::new(s));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_range_checks() {
        assert_eq!(check_queues("v", 0, 1, Some(1)).unwrap(), 1);
        assert_eq!(check_queues("v", 1, 2, Some(4)).unwrap(), 3);
        assert_eq!(check_queues("v", 3, 1, None).unwrap(), 4);
        assert_eq!(
            check_queues("v", 1, 1, Some(1)).unwrap_err().to_string(),
            "af-xdp: v has 1 queues, queue 1 does not exist"
        );
        let e = check_queues("v", 0, 3, Some(2)).unwrap_err().to_string();
        assert!(e.contains("queue 2 does not exist"), "{e}");
        assert!(check_queues("v", 0, 0, Some(2)).is_err());
        assert!(check_queues("v", u32::MAX, 1, None).is_err());
        assert!(check_queues("v", 0, usize::MAX, None).is_err());
    }

    #[test]
    fn missing_interface_is_reported_by_name() {
        for name in ["vfxa-no-such", "", "a\0b", "waytoolonginterfacename"] {
            let e = open(name, 0, XdpMode::Copy, 1).err().unwrap().to_string();
            assert_eq!(e, format!("af-xdp: no interface named {name}"));
        }
    }
}
