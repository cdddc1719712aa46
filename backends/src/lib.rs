//! Where vfrelay's packets go: the host side of a virtio-net port.
//!
//! Every backend implements [`Backend`], one instance per queue pair. The
//! dataplane (in the `vfrelay` crate) drives it from a single thread per queue
//! pair, so a backend needs no locking: `&mut self` is enough.
//!
//! Frames cross the trait as plain Ethernet frames, or, when
//! [`Backend::vnet_hdr`] is true, prefixed by the 12-byte `virtio_net_hdr_v1`
//! (tap with IFF_VNET_HDR: offload metadata passes through untouched).

use std::fmt;
use std::os::fd::RawFd;
use std::str::FromStr;

pub mod af_xdp;
pub mod loopback;
pub mod tap;
pub mod vf;

/// Size of `struct virtio_net_hdr_v1` (VERSION_1 / MRG_RXBUF layout): 12.
pub const VNET_HDR_LEN: usize =
    std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>();

/// Largest frame any backend hands over: a 64 KiB GSO frame plus header.
pub const MAX_FRAME_LEN: usize = 65536 + VNET_HDR_LEN + 14 + 4;

/// virtio-net feature bits a backend can serve (subset of VIRTIO_NET_F_*),
/// as masks of the spec's bit numbers.
pub mod features {
    use virtio_bindings::virtio_net as vn;

    pub const CSUM: u64 = 1 << vn::VIRTIO_NET_F_CSUM;
    pub const GUEST_CSUM: u64 = 1 << vn::VIRTIO_NET_F_GUEST_CSUM;
    pub const GUEST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO4;
    pub const GUEST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO6;
    pub const GUEST_ECN: u64 = 1 << vn::VIRTIO_NET_F_GUEST_ECN;
    pub const GUEST_UFO: u64 = 1 << vn::VIRTIO_NET_F_GUEST_UFO;
    pub const HOST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO4;
    pub const HOST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO6;
    pub const HOST_ECN: u64 = 1 << vn::VIRTIO_NET_F_HOST_ECN;
    pub const HOST_UFO: u64 = 1 << vn::VIRTIO_NET_F_HOST_UFO;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid backend spec '{spec}': {reason}")]
    Spec { spec: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
    /// `what` plus errno, for failed syscalls.
    pub fn last_os(what: impl Into<String>) -> Self {
        Self::io(what, std::io::Error::last_os_error())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Per-backend counters, read by the stats reporter.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the backend had to drop (e.g. oversized, kernel refused).
    pub tx_dropped: u64,
    pub rx_dropped: u64,
    /// tap: writes the kernel refused with an error (also in tx_dropped).
    pub tx_write_errors: u64,
    /// AF_XDP: frames that could not go back on the fill ring at once.
    pub fill_shortfall: u64,
    /// AF_XDP: times TX found every UMEM frame still awaiting completion.
    pub completion_shortfall: u64,
}

/// A frame as scatter-gather segments, each readable for its length while
/// `'a` lasts. Backends read through it without checking anything again, so
/// making one is the unsafe step: the ring walker does it for segments it
/// checked against guest memory, tests for buffers of their own.
#[derive(Clone, Copy)]
pub struct Segs<'a>(&'a [libc::iovec]);

impl<'a> Segs<'a> {
    /// # Safety
    /// Every segment with a non-zero `iov_len` must be readable for
    /// `iov_len` bytes from `iov_base` for as long as `'a`. The bytes may
    /// change under the reader (guest memory): backends copy, never borrow.
    #[inline]
    pub unsafe fn new(iov: &'a [libc::iovec]) -> Self {
        Segs(iov)
    }
}

impl<'a> Segs<'a> {
    /// The segments for as long as `'a` (Deref ties them to the `Segs`).
    #[inline]
    pub fn into_iovecs(self) -> &'a [libc::iovec] {
        self.0
    }

    /// Total bytes. (Not `len`: through Deref that is the number of
    /// segments, which backends pass to writev.)
    #[inline]
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|v| v.iov_len).sum()
    }

    /// The first `N` bytes (a header), or None if the frame is shorter.
    /// One unaligned load when the first segment holds them (the usual
    /// case): a call into memcpy cost more than the copy at 64 B frames.
    #[inline]
    pub fn head<const N: usize>(&self) -> Option<[u8; N]> {
        match self.0.first() {
            Some(v) if v.iov_len >= N => {
                // SAFETY: N <= iov_len bytes, readable by the promise
                // `new` took; copied out, never borrowed.
                Some(unsafe { std::ptr::read_unaligned(v.iov_base as *const [u8; N]) })
            }
            _ => {
                let mut out = [0u8; N];
                (self.peek(&mut out) == N).then_some(out)
            }
        }
    }

    /// Copy the first `out.len()` bytes (or fewer, if the frame is
    /// shorter) into `out`; returns how many. For reading headers that may
    /// straddle segments.
    pub fn peek(&self, out: &mut [u8]) -> usize {
        let mut n = 0;
        for v in self.0 {
            if n == out.len() {
                break;
            }
            let k = v.iov_len.min(out.len() - n);
            // SAFETY: k <= iov_len, readable by the promise `new` took;
            // `out` is ours.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base as *const u8, out[n..].as_mut_ptr(), k)
            };
            n += k;
        }
        n
    }
}

impl Segs<'_> {
    /// Run `f` on segments over byte slices the caller holds (tests, and
    /// frames vfrelay builds itself such as the RARP): safe, the slices are
    /// borrowed for the whole call.
    pub fn of<R>(bufs: &[&[u8]], f: impl FnOnce(Segs<'_>) -> R) -> R {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every segment is a slice borrowed for the call.
        f(unsafe { Segs::new(&iov) })
    }
}

impl std::ops::Deref for Segs<'_> {
    type Target = [libc::iovec];
    #[inline]
    fn deref(&self) -> &[libc::iovec] {
        self.0
    }
}

/// Copy `n` bytes from `src` to `dst` (no overlap), inline for the sizes
/// of small frames and headers: two possibly overlapping 16-, 32- or 64-byte
/// moves instead of a call into libc's `memcpy`, whose size dispatch cost
/// as much as the move itself at 64 B frames. Larger copies go to libc.
///
/// # Safety
/// As for [`std::ptr::copy_nonoverlapping`].
#[inline(always)]
pub unsafe fn copy_frame(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY (all arms): every access stays within [0, n) of both
    // buffers, which the caller promises are valid and disjoint.
    unsafe {
        match n {
            65..=128 => {
                let a = std::ptr::read_unaligned(src as *const [u8; 64]);
                let b = std::ptr::read_unaligned(src.add(n - 64) as *const [u8; 64]);
                std::ptr::write_unaligned(dst as *mut [u8; 64], a);
                std::ptr::write_unaligned(dst.add(n - 64) as *mut [u8; 64], b);
            }
            32..=64 => {
                let a = std::ptr::read_unaligned(src as *const [u8; 32]);
                let b = std::ptr::read_unaligned(src.add(n - 32) as *const [u8; 32]);
                std::ptr::write_unaligned(dst as *mut [u8; 32], a);
                std::ptr::write_unaligned(dst.add(n - 32) as *mut [u8; 32], b);
            }
            16..=31 => {
                let a = std::ptr::read_unaligned(src as *const [u8; 16]);
                let b = std::ptr::read_unaligned(src.add(n - 16) as *const [u8; 16]);
                std::ptr::write_unaligned(dst as *mut [u8; 16], a);
                std::ptr::write_unaligned(dst.add(n - 16) as *mut [u8; 16], b);
            }
            _ => std::ptr::copy_nonoverlapping(src, dst, n),
        }
    }
}

/// One queue pair's host-side endpoint.
pub trait Backend: Send {
    /// Short description for logs, e.g. `tap vfr0 q0`.
    fn describe(&self) -> String;

    /// True when frames in both directions carry a leading
    /// `virtio_net_hdr_v1` ([`VNET_HDR_LEN`] bytes).
    fn vnet_hdr(&self) -> bool {
        false
    }

    /// Queue one frame for transmission, given as scatter-gather segments.
    ///
    /// The segments may point into guest memory, which the guest can change
    /// at any time: copy out of them, never build references to them. Their
    /// bytes stay readable until the next [`Self::tx_flush`] returns (the
    /// dataplane hands the buffers back to the guest only after it), so a
    /// backend may note the segments and copy at the flush, for a whole
    /// burst at once (the switch does).
    /// Returns `Ok(false)` when the backend is full and the frame was NOT
    /// taken (the dataplane retries it later); `Ok(true)` when it was taken
    /// (sent, queued or deliberately dropped and counted).
    fn tx_frame(&mut self, segs: Segs<'_>) -> Result<bool>;

    /// Push queued frames out (e.g. one sendto() kick for a whole burst).
    fn tx_flush(&mut self) -> Result<()> {
        Ok(())
    }

    /// Offer up to `max` received frames to `sink`, oldest first. `sink`
    /// returns false when it has no room: the backend then stops and keeps
    /// that frame for the next call. Returns how many frames were consumed.
    fn rx_burst(&mut self, max: usize, sink: &mut dyn FnMut(&[u8]) -> bool) -> Result<usize>;

    /// A file descriptor that becomes readable when frames are waiting (and
    /// writable when a full TX path has room again), or None when the backend
    /// only ever has frames as a result of `tx_frame` (loopback). It is
    /// watched edge-triggered, so `rx_burst` must be called until it drains.
    fn poll_fd(&self) -> Option<RawFd> {
        None
    }

    /// The guest acked these virtio-net features (offloads it can receive).
    fn set_offloads(&mut self, _virtio_features: u64) -> Result<()> {
        Ok(())
    }

    fn stats(&self) -> BackendStats;
}

/// A parsed `--backend SPEC` (QEMU -netdev style).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    Loopback,
    Tap {
        ifname: String,
    },
    AfXdp {
        ifname: String,
        queue: u32,
        mode: XdpMode,
    },
    Vf {
        pf: String,
        index: u32,
        /// Port VLAN the PF tags the VF's traffic with (0 = untagged).
        vlan: Option<u16>,
    },
    /// A port of the daemon's switch NAME (opened by the daemon, which
    /// owns switches: [`BackendSpec::open`] refuses it).
    Switch {
        name: String,
        /// Access VLAN (1..4094); None: untagged.
        vlan: Option<u16>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    Copy,
    ZeroCopy,
    Auto,
}

impl Default for BackendSpec {
    fn default() -> Self {
        BackendSpec::Tap {
            ifname: "vfr0".into(),
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Loopback => write!(f, "loopback"),
            BackendSpec::Tap { ifname } => write!(f, "tap,ifname={ifname}"),
            BackendSpec::AfXdp {
                ifname,
                queue,
                mode,
            } => {
                let m = match mode {
                    XdpMode::Copy => "copy",
                    XdpMode::ZeroCopy => "zerocopy",
                    XdpMode::Auto => "auto",
                };
                write!(f, "af-xdp,ifname={ifname},queue={queue},mode={m}")
            }
            BackendSpec::Vf { pf, index, vlan } => {
                write!(f, "vf,pf={pf},index={index}")?;
                match vlan {
                    Some(v) => write!(f, ",vlan={v}"),
                    None => Ok(()),
                }
            }
            BackendSpec::Switch { name, vlan } => {
                write!(f, "switch,name={name}")?;
                match vlan {
                    Some(v) => write!(f, ",vlan={v}"),
                    None => Ok(()),
                }
            }
        }
    }
}

pub(crate) use vfrelay_sriov::if_index;

/// A switch name: what a port name may be (letters, digits, '-', '_', '.').
pub fn valid_switch_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.contains(['/', ' ', ',', '='])
        && name != "."
        && name != ".."
}

impl FromStr for BackendSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let err = |reason: String| Error::Spec {
            spec: spec.to_string(),
            reason,
        };
        let mut parts = spec.split(',');
        let kind = parts.next().unwrap_or_default();
        let mut opts: Vec<(&str, &str)> = Vec::new();
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| err(format!("option '{p}' is not key=value")))?;
            if opts.iter().any(|(ok, _)| *ok == k) {
                return Err(err(format!("option '{k}' given twice")));
            }
            opts.push((k, v));
        }
        let allow = |names: &[&str]| -> Result<()> {
            for (k, _) in &opts {
                if !names.contains(k) {
                    return Err(err(format!("unknown option '{k}' for {kind}")));
                }
            }
            Ok(())
        };
        let get = |k: &str| opts.iter().find(|(ok, _)| *ok == k).map(|(_, v)| *v);
        let ifname = |k: &str, default: Option<&str>| -> Result<String> {
            let v = get(k)
                .or(default)
                .ok_or_else(|| err(format!("{kind} needs {k}=NAME")))?;
            if !valid_ifname(v) {
                return Err(err(format!("'{v}' is not a valid interface name")));
            }
            Ok(v.to_string())
        };
        let number = |k: &str, default: Option<u32>| -> Result<u32> {
            match get(k) {
                Some(v) => v
                    .parse()
                    .map_err(|_| err(format!("{k}={v} is not a number"))),
                None => default.ok_or_else(|| err(format!("{kind} needs {k}=N"))),
            }
        };
        match kind {
            "loopback" => {
                allow(&[])?;
                Ok(BackendSpec::Loopback)
            }
            "tap" => {
                allow(&["ifname"])?;
                Ok(BackendSpec::Tap {
                    ifname: ifname("ifname", Some("vfr0"))?,
                })
            }
            "af-xdp" => {
                allow(&["ifname", "queue", "mode"])?;
                let mode = match get("mode").unwrap_or("auto") {
                    "copy" => XdpMode::Copy,
                    "zerocopy" => XdpMode::ZeroCopy,
                    "auto" => XdpMode::Auto,
                    m => return Err(err(format!("mode={m}: expected copy, zerocopy or auto"))),
                };
                Ok(BackendSpec::AfXdp {
                    ifname: ifname("ifname", None)?,
                    queue: number("queue", Some(0))?,
                    mode,
                })
            }
            "vf" => {
                allow(&["pf", "index", "vlan"])?;
                let vlan = match get("vlan") {
                    None => None,
                    Some(v) => Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|&n| n <= 4095)
                            .ok_or_else(|| err(format!("vlan={v}: expected 0..4095")))?,
                    ),
                };
                Ok(BackendSpec::Vf {
                    pf: ifname("pf", None)?,
                    index: number("index", None)?,
                    vlan,
                })
            }
            "switch" => {
                allow(&["name", "vlan"])?;
                let name = get("name").ok_or_else(|| err("switch needs name=NAME".into()))?;
                if !valid_switch_name(name) {
                    return Err(err(format!(
                        "'{name}' is not a valid switch name (letters, digits, '-', '_', '.')"
                    )));
                }
                let vlan = match get("vlan") {
                    None => None,
                    Some(v) => Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|n| (1..=4094).contains(n))
                            .ok_or_else(|| err(format!("vlan={v}: expected 1..4094")))?,
                    ),
                };
                Ok(BackendSpec::Switch {
                    name: name.to_string(),
                    vlan,
                })
            }
            "" => Err(err("empty backend spec".into())),
            other => Err(err(format!(
                "unknown backend '{other}' (expected loopback, tap, af-xdp, vf or switch)"
            ))),
        }
    }
}

impl BackendSpec {
    /// virtio-net offload features this backend can honour.
    pub fn offload_features(&self) -> u64 {
        match self {
            BackendSpec::Tap { .. } => tap::OFFLOAD_FEATURES,
            _ => 0,
        }
    }

    /// Open the backend: one [`Backend`] per queue pair. A `vf` backend
    /// opened this way keeps the VF's MAC as it is; see [`Self::open_with_mac`].
    pub fn open(&self, queue_pairs: usize) -> Result<Vec<Box<dyn Backend>>> {
        self.open_inner(queue_pairs, None)
    }

    /// Open the backend for a device with MAC `mac`: a `vf` backend gives
    /// its VF that MAC, so the NIC delivers the guest's frames to it.
    pub fn open_with_mac(&self, queue_pairs: usize, mac: [u8; 6]) -> Result<Vec<Box<dyn Backend>>> {
        self.open_inner(queue_pairs, Some(mac))
    }

    fn open_inner(
        &self,
        queue_pairs: usize,
        mac: Option<[u8; 6]>,
    ) -> Result<Vec<Box<dyn Backend>>> {
        match self {
            BackendSpec::Loopback => Ok((0..queue_pairs)
                .map(|q| Box::new(loopback::Loopback::new(q)) as Box<dyn Backend>)
                .collect()),
            BackendSpec::Tap { ifname } => tap::open(ifname, queue_pairs),
            BackendSpec::AfXdp {
                ifname,
                queue,
                mode,
            } => af_xdp::open(ifname, *queue, *mode, queue_pairs),
            BackendSpec::Vf { pf, index, vlan } => vf::open(pf, *index, *vlan, mac, queue_pairs),
            BackendSpec::Switch { name, .. } => Err(Error::Other(format!(
                "switch {name}: a switch port is made by the daemon, not opened"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_frame_copies_every_size_exactly() {
        let src: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in 0..=200 {
            let mut dst = vec![0xeeu8; 256];
            // SAFETY: n <= 200 bytes inside both buffers, which are disjoint.
            unsafe { copy_frame(src.as_ptr().add(5), dst.as_mut_ptr().add(1), n) };
            assert_eq!(&dst[1..1 + n], &src[5..5 + n], "size {n}");
            assert_eq!(dst[0], 0xee, "size {n}: wrote before");
            assert!(
                dst[1 + n..].iter().all(|&b| b == 0xee),
                "size {n}: wrote past"
            );
        }
    }

    #[test]
    fn segs_count_segments_and_bytes_apart() {
        Segs::of(&[&[1u8; 3], &[], &[2u8; 2000]], |s| {
            // writev and UIO_MAXIOV checks take the count.
            assert_eq!(s.len(), 3);
            assert_eq!(s.bytes(), 2003);
            let mut h = [0u8; 5];
            assert_eq!(s.peek(&mut h), 5);
            assert_eq!(h, [1, 1, 1, 2, 2]);
            assert_eq!(s.head::<2>(), Some([1, 1]));
            assert_eq!(s.head::<5>(), Some([1, 1, 1, 2, 2]));
            assert_eq!(s.head::<2004>(), None);
        });
    }

    #[test]
    fn parses_specs() {
        assert_eq!(
            "loopback".parse::<BackendSpec>().unwrap(),
            BackendSpec::Loopback
        );
        assert_eq!(
            "tap".parse::<BackendSpec>().unwrap(),
            BackendSpec::Tap {
                ifname: "vfr0".into()
            }
        );
        assert_eq!(
            "tap,ifname=t1".parse::<BackendSpec>().unwrap(),
            BackendSpec::Tap {
                ifname: "t1".into()
            }
        );
        assert_eq!(
            "af-xdp,ifname=veth0,queue=1,mode=copy"
                .parse::<BackendSpec>()
                .unwrap(),
            BackendSpec::AfXdp {
                ifname: "veth0".into(),
                queue: 1,
                mode: XdpMode::Copy
            }
        );
        assert_eq!(
            "vf,pf=eth0,index=3".parse::<BackendSpec>().unwrap(),
            BackendSpec::Vf {
                pf: "eth0".into(),
                index: 3,
                vlan: None
            }
        );
        assert_eq!(
            "vf,pf=eth0,index=0,vlan=4095"
                .parse::<BackendSpec>()
                .unwrap(),
            BackendSpec::Vf {
                pf: "eth0".into(),
                index: 0,
                vlan: Some(4095)
            }
        );
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "",
            "tun",
            "tap,ifname",
            "tap,ifname=",
            "tap,ifname=a/b",
            "tap,ifname=waytoolonginterfacename",
            "tap,foo=1",
            "tap,ifname=a,ifname=b",
            "af-xdp",
            "af-xdp,ifname=v,queue=x",
            "af-xdp,ifname=v,mode=fast",
            "vf,pf=eth0",
            "vf,pf=eth0,index=0,vlan=4096",
            "vf,pf=eth0,index=0,vlan=-1",
            "vf,pf=eth0,index=0,vlan=",
            "vf,pf=eth0,index=0,qos=1",
            "vf,index=0",
            "loopback,x=1",
            "switch",
            "switch,name=",
            "switch,name=a/b",
            "switch,name=s,vlan=0",
            "switch,name=s,vlan=4095",
            "switch,name=s,mac=1",
        ] {
            let e = bad.parse::<BackendSpec>().unwrap_err();
            assert!(
                e.to_string().starts_with("invalid backend spec"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn feature_masks_and_header_size_match_the_spec() {
        use features::*;
        assert_eq!(VNET_HDR_LEN, 12);
        assert_eq!(CSUM | GUEST_CSUM, 0b11);
        assert_eq!(GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | GUEST_UFO, 0b1111 << 7);
        assert_eq!(HOST_TSO4 | HOST_TSO6 | HOST_ECN | HOST_UFO, 0b1111 << 11);
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "loopback",
            "tap,ifname=x",
            "af-xdp,ifname=v,queue=2,mode=copy",
            "vf,pf=p,index=1",
            "vf,pf=p,index=1,vlan=42",
            "switch,name=sw0",
            "switch,name=sw0,vlan=10",
        ] {
            let spec: BackendSpec = s.parse().unwrap();
            assert_eq!(spec.to_string().parse::<BackendSpec>().unwrap(), spec);
        }
    }
}
