//! The VDUSE character devices: /dev/vduse/control (create and destroy a
//! device) and /dev/vduse/NAME (virtqueue setup, feature and queue queries,
//! interrupts, IOTLB fds, and the kernel's requests). Requests are decoded by
//! [`parse_request`], a pure function: whatever the kernel sends, a bad
//! message becomes an error to answer with FAILED, never a panic.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::uapi::{self, DevConfig, IotlbEntry, IovaInfo, VqConfig, VqEventfd, VqInfo};

const CONTROL: &str = "/dev/vduse/control";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{CONTROL} not found: load the vduse kernel module (modprobe vduse)")]
    NoModule,
    #[error("VDUSE device name '{0}' must be 1-255 bytes without '/' or NUL")]
    BadName(String),
    #[error("VDUSE device '{0}' already exists")]
    Exists(String),
    #[error("VDUSE device '{0}' is served by another process (/dev/vduse/{0} is open)")]
    Busy(String),
    #[error("VDUSE config space of {0} bytes is larger than a page")]
    ConfigTooBig(usize),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// `ioctl(fd, req, arg)`; the return value (an fd for IOTLB_GET_FD) or errno.
///
/// # Safety
/// `arg` must point to what `req` reads and writes.
unsafe fn ioctl<T>(fd: RawFd, req: u32, arg: *mut T) -> io::Result<i32> {
    let r = libc::ioctl(fd, req as _, arg);
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn name_bytes(name: &str) -> Result<[u8; uapi::NAME_MAX], Error> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= uapi::NAME_MAX || b.contains(&b'/') || b.contains(&0) {
        return Err(Error::BadName(name.into()));
    }
    let mut out = [0u8; uapi::NAME_MAX];
    out[..b.len()].copy_from_slice(b);
    Ok(out)
}

/// Check a device name before anything is created.
pub fn validate_name(name: &str) -> Result<(), Error> {
    name_bytes(name).map(|_| ())
}

/// /dev/vduse/control with API version 0 selected.
pub struct Control {
    file: File,
}

impl Control {
    pub fn open() -> Result<Control, Error> {
        let file = match OpenOptions::new().read(true).write(true).open(CONTROL) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Error::NoModule),
            Err(e) => return Err(io_err(format!("opening {CONTROL}"))(e)),
        };
        let mut v = uapi::API_VERSION;
        // SAFETY: SET_API_VERSION reads one u64.
        unsafe { ioctl(file.as_raw_fd(), uapi::SET_API_VERSION, &mut v) }
            .map_err(io_err("VDUSE_SET_API_VERSION 0"))?;
        Ok(Control { file })
    }

    /// CREATE_DEV: a device named `name` with `vq_num` queues and `config` as
    /// its (read-only) config space.
    pub fn create(
        &self,
        name: &str,
        device_id: u32,
        features: u64,
        vq_num: u32,
        config: &[u8],
    ) -> Result<(), Error> {
        if config.len() > 4096 {
            return Err(Error::ConfigTooBig(config.len()));
        }
        let hdr = DevConfig {
            name: name_bytes(name)?,
            vendor_id: 0,
            device_id,
            features,
            vq_num,
            // Split-ring alignment the kernel driver uses for our rings.
            vq_align: 4096,
            reserved: [0; 13],
            config_size: config.len() as u32,
        };
        let hlen = std::mem::size_of::<DevConfig>();
        // The header is followed by the config bytes in one buffer; u64s
        // keep it aligned for the header.
        let mut buf = vec![0u64; (hlen + config.len()).div_ceil(8)];
        let bytes = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: buf holds hlen + config.len() bytes; DevConfig is plain
        // data without padding (336 bytes, checked in uapi's tests).
        unsafe {
            std::ptr::copy_nonoverlapping((&hdr as *const DevConfig).cast::<u8>(), bytes, hlen);
            std::ptr::copy_nonoverlapping(config.as_ptr(), bytes.add(hlen), config.len());
        }
        // SAFETY: CREATE_DEV reads the header and config_size bytes after it.
        match unsafe { ioctl(self.file.as_raw_fd(), uapi::CREATE_DEV, bytes) } {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(Error::Exists(name.into())),
            Err(e) => Err(io_err(format!("VDUSE_CREATE_DEV {name}"))(e)),
        }
    }

    pub fn destroy(&self, name: &str) -> Result<(), Error> {
        let mut n = name_bytes(name)?;
        // SAFETY: DESTROY_DEV reads NAME_MAX bytes.
        unsafe { ioctl(self.file.as_raw_fd(), uapi::DESTROY_DEV, n.as_mut_ptr()) }
            .map(|_| ())
            .map_err(io_err(format!("VDUSE_DESTROY_DEV {name}")))
    }
}

/// An open /dev/vduse/NAME. Its ioctls may be used from several threads.
pub struct Device {
    file: File,
    path: PathBuf,
}

impl Device {
    /// Opens the device node, waiting briefly for devtmpfs/udev to make it.
    pub fn open(name: &str) -> Result<Device, Error> {
        let path = Path::new("/dev/vduse").join(name);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(file) => return Ok(Device { file, path }),
                Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                // The kernel lets one process hold a device open.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(Error::Busy(name.into()))
                }
                Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
            }
        }
    }

    /// A device on any file, for tests of request handling.
    #[cfg(test)]
    pub fn from_file(file: File) -> Device {
        Device {
            file,
            path: PathBuf::from("/dev/null"),
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn what(&self, op: &str) -> String {
        format!("{op} on {}", self.path.display())
    }

    pub fn vq_setup(&self, index: u32, max_size: u16) -> Result<(), Error> {
        let mut c = VqConfig {
            index,
            max_size,
            reserved: [0; 13],
        };
        // SAFETY: VQ_SETUP reads a VqConfig.
        unsafe { ioctl(self.fd(), uapi::VQ_SETUP, &mut c) }
            .map(|_| ())
            .map_err(io_err(self.what("VDUSE_VQ_SETUP")))
    }

    /// Features the driver wrote.
    pub fn driver_features(&self) -> Result<u64, Error> {
        let mut f = 0u64;
        // SAFETY: DEV_GET_FEATURES writes one u64.
        unsafe { ioctl(self.fd(), uapi::DEV_GET_FEATURES, &mut f) }
            .map_err(io_err(self.what("VDUSE_DEV_GET_FEATURES")))?;
        Ok(f)
    }

    pub fn vq_info(&self, index: u32) -> Result<VqInfo, Error> {
        let mut info = VqInfo {
            index,
            ..Default::default()
        };
        // SAFETY: VQ_GET_INFO reads and writes a VqInfo.
        unsafe { ioctl(self.fd(), uapi::VQ_GET_INFO, &mut info) }
            .map_err(io_err(self.what("VDUSE_VQ_GET_INFO")))?;
        Ok(info)
    }

    /// Assigns (or with -1 deassigns) the eventfd the kernel signals on a kick.
    pub fn set_kickfd(&self, index: u32, fd: RawFd) -> Result<(), Error> {
        let mut e = VqEventfd { index, fd };
        // SAFETY: VQ_SETUP_KICKFD reads a VqEventfd.
        unsafe { ioctl(self.fd(), uapi::VQ_SETUP_KICKFD, &mut e) }
            .map(|_| ())
            .map_err(io_err(self.what("VDUSE_VQ_SETUP_KICKFD")))
    }

    pub fn inject_irq(&self, index: u32) -> io::Result<()> {
        let mut i = index;
        // SAFETY: VQ_INJECT_IRQ reads one u32.
        unsafe { ioctl(self.fd(), uapi::VQ_INJECT_IRQ, &mut i) }.map(|_| ())
    }

    /// The first IOTLB mapping overlapping `[start, last]` and an fd to mmap
    /// it; `Ok(None)` when there is none.
    pub fn iotlb_get_fd(
        &self,
        start: u64,
        last: u64,
    ) -> Result<Option<(OwnedFd, IotlbEntry)>, Error> {
        let mut e = IotlbEntry {
            start,
            last,
            ..Default::default()
        };
        // SAFETY: IOTLB_GET_FD reads and writes an IotlbEntry.
        match unsafe { ioctl(self.fd(), uapi::IOTLB_GET_FD, &mut e) } {
            // SAFETY: the kernel just installed this fd for us.
            Ok(fd) => Ok(Some((unsafe { OwnedFd::from_raw_fd(fd) }, e))),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(err) => Err(io_err(self.what("VDUSE_IOTLB_GET_FD"))(err)),
        }
    }

    /// The first IOTLB mapping overlapping `[start, last]` with its
    /// capabilities (one ioctl, no fd); None if there is none.
    pub fn iotlb_get_info(&self, start: u64, last: u64) -> Option<IovaInfo> {
        let mut i = IovaInfo {
            start,
            last,
            ..Default::default()
        };
        // SAFETY: IOTLB_GET_INFO reads and writes an IovaInfo.
        unsafe { ioctl(self.fd(), uapi::IOTLB_GET_INFO, &mut i) }
            .ok()
            .map(|_| i)
    }

    /// VDUSE_IOTLB_REG_UMEM: the kernel pins `[uaddr, uaddr+size)` and uses
    /// it as the bounce buffer. The pin counts against RLIMIT_MEMLOCK (the
    /// kernel checks it even for root), so on ENOMEM the limit is raised by
    /// `size` once (root may) and the call retried.
    pub fn iotlb_reg_umem(&self, uaddr: u64, iova: u64, size: u64) -> io::Result<()> {
        let reg = || {
            let mut u = uapi::IovaUmem {
                uaddr,
                iova,
                size,
                reserved: [0; 3],
            };
            // SAFETY: IOTLB_REG_UMEM reads an IovaUmem.
            unsafe { ioctl(self.fd(), uapi::IOTLB_REG_UMEM, &mut u) }.map(|_| ())
        };
        match reg() {
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && raise_memlock(size) => reg(),
            r => r,
        }
    }

    /// One request; `Ok(None)` when none is waiting (the fd is non-blocking
    /// only if opened so; we poll before reading).
    pub fn read_request(&self, buf: &mut [u8; uapi::MSG_SIZE]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    pub fn write_response(&self, resp: &[u8; uapi::MSG_SIZE]) -> io::Result<()> {
        let n = (&self.file).write(resp)?;
        if n != resp.len() {
            return Err(io::Error::other(format!("short response write: {n} bytes")));
        }
        Ok(())
    }
}

/// Raises RLIMIT_MEMLOCK (soft and hard) by `by` bytes; false if it could
/// not (an unprivileged process, or already unlimited).
fn raise_memlock(by: u64) -> bool {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0
        || r.rlim_cur == libc::RLIM_INFINITY
    {
        return false;
    }
    let want = r.rlim_cur.saturating_add(by);
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: r.rlim_max.max(want),
    };
    // SAFETY: setrlimit reads one struct rlimit.
    let ok = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) } == 0;
    if ok {
        log::debug!("RLIMIT_MEMLOCK raised to {want} bytes for the VDUSE bounce buffer");
    }
    ok
}

/// A request from the kernel, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    GetVqState {
        index: u32,
    },
    SetStatus {
        status: u8,
    },
    /// Mappings overlapping `[start, last]` are gone.
    UpdateIotlb {
        start: u64,
        last: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("request of {0} bytes, expected {size}", size = uapi::MSG_SIZE)]
    Short(usize),
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("UPDATE_IOTLB with start {start:#x} after last {last:#x}")]
    BadRange { start: u64, last: u64 },
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Decodes a request read from the device. `Err((Some(id), e))` for a
/// message that has an id to answer FAILED to; `Err((None, e))` for one too
/// short to carry one.
pub fn parse_request(buf: &[u8]) -> Result<(u32, Request), (Option<u32>, ParseError)> {
    if buf.len() < uapi::MSG_SIZE {
        let id = (buf.len() >= 8).then(|| u32_at(buf, 4));
        return Err((id, ParseError::Short(buf.len())));
    }
    let id = u32_at(buf, 4);
    let u = uapi::MSG_UNION_OFFSET;
    let req = match u32_at(buf, 0) {
        uapi::REQ_GET_VQ_STATE => Request::GetVqState {
            index: u32_at(buf, u),
        },
        uapi::REQ_SET_STATUS => Request::SetStatus { status: buf[u] },
        uapi::REQ_UPDATE_IOTLB => {
            let (start, last) = (u64_at(buf, u), u64_at(buf, u + 8));
            if start > last {
                return Err((Some(id), ParseError::BadRange { start, last }));
            }
            Request::UpdateIotlb { start, last }
        }
        t => return Err((Some(id), ParseError::UnknownType(t))),
    };
    Ok((id, req))
}

/// A response: OK or FAILED, with the split-ring state for GET_VQ_STATE.
/// Reserved bytes stay zero (the kernel refuses anything else).
pub fn encode_response(id: u32, ok: bool, vq_state: Option<(u32, u16)>) -> [u8; uapi::MSG_SIZE] {
    let mut b = [0u8; uapi::MSG_SIZE];
    b[0..4].copy_from_slice(&id.to_le_bytes());
    let result = if ok {
        uapi::RESULT_OK
    } else {
        uapi::RESULT_FAILED
    };
    b[4..8].copy_from_slice(&result.to_le_bytes());
    if let Some((index, avail)) = vq_state {
        let u = uapi::MSG_UNION_OFFSET;
        b[u..u + 4].copy_from_slice(&index.to_le_bytes());
        b[u + 4..u + 6].copy_from_slice(&avail.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use uapi::{DevRequest, DevResponse};

    fn req(t: u32, id: u32, payload: &[(usize, &[u8])]) -> [u8; uapi::MSG_SIZE] {
        let mut b = [0u8; uapi::MSG_SIZE];
        b[0..4].copy_from_slice(&t.to_le_bytes());
        b[4..8].copy_from_slice(&id.to_le_bytes());
        for (off, bytes) in payload {
            b[uapi::MSG_UNION_OFFSET + off..][..bytes.len()].copy_from_slice(bytes);
        }
        b
    }

    #[test]
    fn parses_each_request_type() {
        let b = req(0, 7, &[(0, &5u32.to_le_bytes())]);
        assert_eq!(parse_request(&b), Ok((7, Request::GetVqState { index: 5 })));
        let b = req(1, 8, &[(0, &[0x0f])]);
        assert_eq!(
            parse_request(&b),
            Ok((8, Request::SetStatus { status: 0x0f }))
        );
        let b = req(
            2,
            9,
            &[(0, &0x1000u64.to_le_bytes()), (8, &u64::MAX.to_le_bytes())],
        );
        assert_eq!(
            parse_request(&b),
            Ok((
                9,
                Request::UpdateIotlb {
                    start: 0x1000,
                    last: u64::MAX
                }
            ))
        );
        // A one-byte range is fine.
        let b = req(2, 10, &[(0, &5u64.to_le_bytes()), (8, &5u64.to_le_bytes())]);
        assert!(parse_request(&b).is_ok());
    }

    #[test]
    fn parser_offsets_agree_with_struct() {
        // The byte offsets the parser uses are those of the repr(C) struct.
        assert_eq!(offset_of!(DevRequest, payload), uapi::MSG_UNION_OFFSET);
        assert_eq!(offset_of!(DevResponse, payload), uapi::MSG_UNION_OFFSET);
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert_eq!(parse_request(&[]), Err((None, ParseError::Short(0))));
        assert_eq!(parse_request(&[1, 0, 0]), Err((None, ParseError::Short(3))));
        let full = req(1, 42, &[]);
        assert_eq!(
            parse_request(&full[..100]),
            Err((Some(42), ParseError::Short(100)))
        );
        assert_eq!(
            parse_request(&req(3, 11, &[])),
            Err((Some(11), ParseError::UnknownType(3)))
        );
        assert_eq!(
            parse_request(&req(u32::MAX, 12, &[])),
            Err((Some(12), ParseError::UnknownType(u32::MAX)))
        );
        let b = req(2, 13, &[(0, &9u64.to_le_bytes()), (8, &8u64.to_le_bytes())]);
        assert_eq!(
            parse_request(&b),
            Err((Some(13), ParseError::BadRange { start: 9, last: 8 }))
        );
        // Longer than a request: the first 152 bytes count.
        let mut long = vec![0u8; 400];
        long[..uapi::MSG_SIZE].copy_from_slice(&req(1, 14, &[(0, &[4])]));
        assert_eq!(
            parse_request(&long),
            Ok((14, Request::SetStatus { status: 4 }))
        );
    }

    #[test]
    fn response_encoding() {
        let r = encode_response(0x01020304, true, Some((1, 0xbeef)));
        assert_eq!(&r[0..4], &[4, 3, 2, 1]);
        assert_eq!(&r[4..8], &[0, 0, 0, 0]);
        assert!(r[8..24].iter().all(|b| *b == 0), "reserved stays zero");
        assert_eq!(&r[24..28], &[1, 0, 0, 0]);
        assert_eq!(&r[28..30], &[0xef, 0xbe]);
        assert!(r[30..].iter().all(|b| *b == 0));
        let r = encode_response(5, false, None);
        assert_eq!(&r[4..8], &uapi::RESULT_FAILED.to_le_bytes());
        assert!(r[8..].iter().all(|b| *b == 0));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("vd0").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a\0b").is_err());
        assert!(validate_name(&"x".repeat(255)).is_ok());
        assert!(validate_name(&"x".repeat(256)).is_err());
    }
}
