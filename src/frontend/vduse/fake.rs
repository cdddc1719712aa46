//! A VDUSE device without a kernel: an IOTLB of memfds, queue infos and
//! features as a driver would have set them, for tests of the IOTLB table
//! and of the request handling above it, and for the `vduse` fuzz target.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::dev::Error;
use super::iotlb::IotlbDev;
use super::uapi::{self, IotlbEntry, IovaInfo, VqInfo};
use super::VduseDev;

pub fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a valid name; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"vfx-iotlb-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

#[derive(Default)]
pub struct FakeDevice {
    /// The kernel's IOTLB, in no particular order (unlike the kernel's
    /// interval tree, entries may overlap).
    pub entries: Mutex<Vec<(IotlbEntry, Arc<File>)>>,
    /// An entry at IOVA 0 of this size is the bounce map (CAP_UMEM)...
    pub bounce: Option<u64>,
    /// ...unless the entries are a vhost-vdpa user's (set_map): the
    /// domain's bounce map is gone after a reset, and IOVA 0 is then the
    /// user's memory, whatever its size.
    pub user_maps: AtomicBool,
    pub refuse_umem: bool,
    pub umem: Mutex<Option<(u64, u64)>>,
    pub get_fd_calls: Mutex<u64>,
    pub get_info_calls: Mutex<u64>,
    /// What the driver negotiated and set up (DEV_GET_FEATURES,
    /// VQ_GET_INFO for the queue at each index).
    pub features: u64,
    pub vqs: Mutex<Vec<VqInfo>>,
    /// Every ioctl fails, as on a device the kernel marked broken.
    pub broken: AtomicBool,
    pub kickfds: Mutex<Vec<(u32, RawFd)>>,
    pub irqs: AtomicU64,
}

impl FakeDevice {
    #[cfg(test)]
    pub fn add(&self, start: u64, len: u64, perm: u8, file: Arc<File>, offset: u64) {
        let e = IotlbEntry {
            offset,
            start,
            last: start + len - 1,
            perm,
        };
        self.insert(e, file);
    }
    /// Any entry, however wrong.
    pub fn insert(&self, e: IotlbEntry, file: Arc<File>) {
        self.entries.lock().unwrap().push((e, file));
    }
    #[cfg(test)]
    pub fn remove(&self, start: u64) {
        self.entries
            .lock()
            .unwrap()
            .retain(|(e, _)| e.start != start);
    }
    fn first(&self, start: u64, last: u64) -> Option<(IotlbEntry, Arc<File>)> {
        let v = self.entries.lock().unwrap();
        v.iter()
            .filter(|(e, _)| e.start <= last && e.last >= start)
            .min_by_key(|(e, _)| e.start)
            .cloned()
    }
    fn check(&self, what: &str) -> Result<(), Error> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(Error::Io {
                what: what.into(),
                source: io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        Ok(())
    }
}

impl IotlbDev for FakeDevice {
    fn get_fd(&self, start: u64, last: u64) -> Result<Option<(OwnedFd, IotlbEntry)>, Error> {
        *self.get_fd_calls.lock().unwrap() += 1;
        self.check("VDUSE_IOTLB_GET_FD")?;
        Ok(self
            .first(start, last)
            .map(|(e, f)| (f.try_clone().unwrap().into(), e)))
    }
    fn get_info(&self, start: u64, last: u64) -> Option<IovaInfo> {
        *self.get_info_calls.lock().unwrap() += 1;
        self.check("VDUSE_IOTLB_GET_INFO").ok()?;
        let (e, _) = self.first(start, last)?;
        // As vduse_dev_ioctl(): the bounce map is the whole range, RW.
        let bounce = e.start == 0
            && Some(e.last.wrapping_add(1)) == self.bounce
            && e.perm == uapi::ACCESS_RW
            && !self.user_maps.load(Ordering::Relaxed);
        Some(IovaInfo {
            start: e.start,
            last: e.last,
            capability: bounce as u64,
            ..Default::default()
        })
    }
    fn reg_umem(&self, uaddr: u64, iova: u64, size: u64) -> io::Result<()> {
        if self.refuse_umem || self.broken.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let mut u = self.umem.lock().unwrap();
        if u.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        // As vduse_dev_reg_umem(): the whole bounce range or nothing.
        if iova != 0 || Some(size) != self.bounce {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        *u = Some((uaddr, size));
        Ok(())
    }
}

impl VduseDev for FakeDevice {
    fn driver_features(&self) -> Result<u64, Error> {
        self.check("VDUSE_DEV_GET_FEATURES")?;
        Ok(self.features)
    }
    fn vq_info(&self, index: u32) -> Result<VqInfo, Error> {
        self.check("VDUSE_VQ_GET_INFO")?;
        let vqs = self.vqs.lock().unwrap();
        vqs.get(index as usize).copied().ok_or_else(|| Error::Io {
            what: "VDUSE_VQ_GET_INFO".into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })
    }
    fn set_kickfd(&self, index: u32, fd: RawFd) -> Result<(), Error> {
        self.check("VDUSE_VQ_SETUP_KICKFD")?;
        self.kickfds.lock().unwrap().push((index, fd));
        Ok(())
    }
    fn inject_irq(&self, _index: u32) -> io::Result<()> {
        self.irqs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
