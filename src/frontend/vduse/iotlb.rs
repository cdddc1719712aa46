//! IOTLB -> [`MemView`]: the mappings the kernel's VDUSE domain holds, kept
//! in a [`Table`] across updates. Under virtio_vdpa that is the bounce
//! buffer at IOVA [0, bounce_size) plus coherent allocations (the rings);
//! under vhost_vdpa, the user's (QEMU's) memory.
//!
//! - An update re-reads only the range it is given and keeps the mapping of
//!   every entry that did not change (same range, offset, permission and
//!   file), so an UPDATE_IOTLB costs one IOTLB_GET_FD per entry and an mmap
//!   only per new entry. (The kernel's only sender, vduse_vdpa_set_map(),
//!   always says [0, u64::MAX]: the diff is what saves the work.)
//! - Each entry is mapped MAP_SHARED with the protection its permission
//!   gives the device: read-only entries PROT_READ (a write is refused by
//!   the view, and would fault rather than land in a private copy),
//!   write-only entries (RX buffers under a vIOMMU) PROT_READ|PROT_WRITE,
//!   the view granting the device only writes there (the RX path reads a
//!   header back before rewriting it). The fd
//!   IOTLB_GET_FD returns is the kernel's own file (the bounce domain, or
//!   the VMA file vhost-vdpa recorded): receive_fd() applies only O_CLOEXEC
//!   of the flags perm_to_file_flags() derives, so its access mode is that
//!   file's, not the entry's.
//! - The bounce range is served from our own memory, registered with
//!   VDUSE_IOTLB_REG_UMEM, instead of the domain fd: the kernel backs a
//!   bounce page only once the driver maps something there, and a fault on
//!   one it never backed is SIGBUS (vduse_domain_mmap_fault()), which would
//!   kill every port. Where the kernel refuses (no CAP_UMEM, RLIMIT_MEMLOCK)
//!   the domain fd is mapped as before, with a warning.
//! - An entry past the end of its (regular) file is refused, for the same
//!   reason: touching it would be SIGBUS.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use log::{debug, info, warn};

use super::dev::{Device, Error};
use super::uapi::{self, IotlbEntry, IovaInfo};
use crate::dataplane::mem::{MemView, Perm};

/// More than any real domain holds; stops a kernel that kept answering.
const MAX_MAPPINGS: usize = 4096;
const PAGE: u64 = 4096;

/// What the table needs of a VDUSE device (a fake in tests).
pub trait IotlbDev {
    /// The first mapping overlapping `[start, last]` and an fd to mmap it.
    fn get_fd(&self, start: u64, last: u64) -> Result<Option<(OwnedFd, IotlbEntry)>, Error>;
    /// The first mapping overlapping `[start, last]` and its capabilities.
    fn get_info(&self, start: u64, last: u64) -> Option<IovaInfo>;
    /// VDUSE_IOTLB_REG_UMEM: serve the bounce range from `[uaddr, +size)`.
    fn reg_umem(&self, uaddr: u64, iova: u64, size: u64) -> io::Result<()>;
}

impl IotlbDev for Device {
    fn get_fd(&self, start: u64, last: u64) -> Result<Option<(OwnedFd, IotlbEntry)>, Error> {
        self.iotlb_get_fd(start, last)
    }
    fn get_info(&self, start: u64, last: u64) -> Option<IovaInfo> {
        self.iotlb_get_info(start, last)
    }
    fn reg_umem(&self, uaddr: u64, iova: u64, size: u64) -> io::Result<()> {
        self.iotlb_reg_umem(uaddr, iova, size)
    }
}

/// One mmapped range, unmapped on drop.
struct Mapping {
    base: *mut libc::c_void,
    map_len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base/map_len are exactly what mmap returned.
        unsafe { libc::munmap(self.base, self.map_len) };
    }
}

// SAFETY: the pointer is only unmapped on drop; MemView does the
// (bounds-checked) access.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

/// Where the next lookup starts after `e`, None past the end of the space.
pub fn next_start(e: &IotlbEntry) -> Option<u64> {
    e.last.checked_add(1)
}

/// Checks an entry returned for a query starting at `from`: a sane range at
/// or after `from`, of a size we can map, with a known permission.
pub fn check_entry(e: &IotlbEntry, from: u64) -> Result<(), String> {
    if e.start > e.last || e.last < from {
        return Err(format!(
            "entry {:#x}..={:#x} does not answer a query from {from:#x}",
            e.start, e.last
        ));
    }
    let len = e.last - e.start;
    if len >= isize::MAX as u64 {
        return Err(format!("entry {:#x}..={:#x} too large", e.start, e.last));
    }
    if !matches!(e.perm, uapi::ACCESS_RO | uapi::ACCESS_WO | uapi::ACCESS_RW) {
        return Err(format!(
            "entry {:#x}: unknown permission {}",
            e.start, e.perm
        ));
    }
    Ok(())
}

/// mmap protection for an entry's permission. A write-only entry is
/// mapped readable too: the RX path reads a header back before rewriting it
/// (`MemView::add` promises readable memory), and the fd is the kernel's
/// own read-write file. The view's permission (`Perm::Write`) is what keeps
/// the device from taking a write-only buffer as one to read.
fn prot_of(perm: u8) -> libc::c_int {
    match perm {
        uapi::ACCESS_RO => libc::PROT_READ,
        _ => libc::PROT_READ | libc::PROT_WRITE,
    }
}

/// What the device may do in an entry: what its IOTLB permission says
/// (our bounce memory is read-write, as the kernel's bounce map is).
fn perm_of(b: &Backing, perm: u8) -> Perm {
    match (b, perm) {
        (Backing::Umem, _) => Perm::ReadWrite,
        (_, uapi::ACCESS_RO) => Perm::Read,
        (_, uapi::ACCESS_WO) => Perm::Write,
        _ => Perm::ReadWrite,
    }
}

/// Maps `e` through `fd`; the host address of `e.start` is
/// `base + e.offset % PAGE`.
fn map_entry(fd: &impl AsFd, e: &IotlbEntry) -> Result<Mapping, String> {
    let len = e.last - e.start + 1;
    crate::dataplane::mem::fd_covers(fd.as_fd(), e.offset, len).map_err(|m| {
        format!(
            "IOVA {:#x}..={:#x} (offset {:#x}): {m}",
            e.start, e.last, e.offset
        )
    })?;
    // mmap wants a page-aligned file offset.
    let lead = e.offset % PAGE;
    let map_len = (len + lead).div_ceil(PAGE) * PAGE;
    // SAFETY: a fresh shared mapping placed by the kernel; checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len as usize,
            prot_of(e.perm),
            libc::MAP_SHARED,
            fd.as_fd().as_raw_fd(),
            (e.offset - lead) as libc::off_t,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!(
            "mmap of IOVA {:#x}..={:#x} (offset {:#x}, perm {}): {}",
            e.start,
            e.last,
            e.offset,
            e.perm,
            io::Error::last_os_error()
        ));
    }
    Ok(Mapping {
        base,
        map_len: map_len as usize,
    })
}

/// Which file an fd is: two fds of one file give the same pair.
fn file_id(fd: &impl AsFd) -> (u64, u64) {
    // SAFETY: an all-zero struct stat is a valid value; fstat writes one.
    let (rc, st) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd.as_fd().as_raw_fd(), &mut st), st)
    };
    if rc != 0 {
        // Unknown: never equal to a mapped entry's, so it is remapped.
        return (u64::MAX, u64::MAX);
    }
    (st.st_dev, st.st_ino)
}

/// Our memory behind the bounce range, pinned by the kernel once registered.
struct Umem {
    map: Arc<Mapping>,
    size: u64,
}

enum Backing {
    Mapped(Arc<Mapping>),
    /// The registered [`Umem`]: the entry is the bounce range.
    Umem,
}

struct Entry {
    e: IotlbEntry,
    file: (u64, u64),
    backing: Backing,
}

/// The IOTLB as mapped into this process. Dropping it (or an entry) unmaps
/// once no view still holds the mapping.
#[derive(Default)]
pub struct Table {
    /// By IOVA start; non-overlapping (the kernel's interval tree).
    entries: BTreeMap<u64, Entry>,
    /// Registered once per open of the device, kept across resets (the
    /// kernel keeps it until the fd is closed or DEREG_UMEM).
    umem: Option<Umem>,
    /// REG_UMEM failed: not retried on every update.
    umem_refused: bool,
}

impl Table {
    /// Forget every mapping (a device reset). Our bounce memory stays
    /// registered: the kernel keeps using it when the driver maps again.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Whether the bounce range is served from our memory.
    #[cfg(test)]
    pub fn umem_registered(&self) -> bool {
        self.umem.is_some()
    }

    /// Re-reads the kernel's mappings overlapping `[start, last]`: new or
    /// changed entries are mapped, vanished ones dropped, unchanged ones
    /// kept as they are. An entry that cannot be mapped is left out
    /// (translations into it fail, stopping only the queue that uses it)
    /// with a log line. Returns whether anything changed. If the kernel
    /// cannot be read, every entry in the range not confirmed yet is
    /// dropped (the kernel may reuse what it unmapped as soon as the update
    /// is answered) and the error returned.
    pub fn update(&mut self, dev: &dyn IotlbDev, start: u64, last: u64) -> Result<bool, Error> {
        let mut seen = std::collections::HashSet::new();
        let mut changed = false;
        let mut from = start;
        let mut failed = None;
        let mut whole = false;
        for _ in 0..MAX_MAPPINGS {
            let (fd, e) = match dev.get_fd(from, last) {
                Ok(Some(x)) => x,
                Ok(None) => {
                    whole = true;
                    break;
                }
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            };
            if let Err(msg) = check_entry(&e, from) {
                warn!("IOTLB: {msg}; ignoring the rest");
                break;
            }
            let file = file_id(&fd);
            let unchanged = self
                .entries
                .get(&e.start)
                .is_some_and(|old| old.e == e && old.file == file);
            if !unchanged {
                changed = true;
                self.entries.remove(&e.start);
                if let Some(backing) = self.back(dev, &fd, &e) {
                    self.entries.insert(e.start, Entry { e, file, backing });
                }
            }
            seen.insert(e.start);
            match next_start(&e) {
                Some(n) if n <= last => from = n.max(from),
                _ => {
                    whole = true;
                    break;
                }
            }
        }
        if !whole && failed.is_none() {
            warn!("IOTLB: more than {MAX_MAPPINGS} entries; those past them are not mapped");
        }
        // Whatever overlapped the range and the kernel no longer has.
        let gone: Vec<u64> = self
            .entries
            .values()
            .filter(|x| x.e.start <= last && x.e.last >= start && !seen.contains(&x.e.start))
            .map(|x| x.e.start)
            .collect();
        for s in gone {
            let x = self.entries.remove(&s).unwrap();
            changed = true;
            debug!("IOTLB: {:#x}..={:#x} gone", x.e.start, x.e.last);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    /// What serves entry `e`: our registered memory for the bounce range,
    /// else a mapping of `fd`.
    fn back(&mut self, dev: &dyn IotlbDev, fd: &OwnedFd, e: &IotlbEntry) -> Option<Backing> {
        if e.start == 0 && self.umem_for(dev, e) {
            debug!(
                "IOTLB: bounce range {:#x}..={:#x} served from our memory",
                e.start, e.last
            );
            return Some(Backing::Umem);
        }
        match map_entry(fd, e) {
            Ok(m) => {
                debug!(
                    "IOTLB: mapped {:#x}..={:#x} perm {} offset {:#x}",
                    e.start, e.last, e.perm, e.offset
                );
                Some(Backing::Mapped(Arc::new(m)))
            }
            Err(msg) => {
                warn!("IOTLB: {msg}; translations into it will fail");
                None
            }
        }
    }

    /// Whether `e` (starting at IOVA 0) is the bounce range and is served
    /// from our memory, registering it the first time.
    fn umem_for(&mut self, dev: &dyn IotlbDev, e: &IotlbEntry) -> bool {
        let size = e.last.wrapping_add(1);
        match &self.umem {
            // Registered for another size; the kernel refuses a second.
            Some(u) if u.size != size => return false,
            None if self.umem_refused => return false,
            _ => {}
        }
        // Asked even with our memory registered: after a reset the bounce
        // map is gone, and an entry at IOVA 0 of the same size can be a
        // vhost-vdpa user's memory (one GET_INFO per new entry at IOVA 0).
        let cap = dev
            .get_info(0, 0)
            .is_some_and(|i| i.start == 0 && i.last == e.last && i.capability & 1 != 0);
        if !cap {
            // Not the bounce map (vhost-vdpa memory at IOVA 0), or a
            // kernel without VDUSE_IOVA_CAP_UMEM.
            return false;
        }
        if self.umem.is_some() {
            return true;
        }
        self.umem_refused = true;
        if size == 0 || !size.is_multiple_of(PAGE) || size > isize::MAX as u64 {
            warn!("IOTLB: bounce range of {size:#x} bytes: not registering our memory");
            return false;
        }
        // SAFETY: a fresh private anonymous mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            warn!(
                "IOTLB: allocating {size} bytes for the bounce range: {}; \
                 serving it from the kernel's pages",
                io::Error::last_os_error()
            );
            return false;
        }
        let map = Arc::new(Mapping {
            base,
            map_len: size as usize,
        });
        match dev.reg_umem(base as u64, 0, size) {
            Ok(()) => {
                info!("IOTLB: bounce range (IOVA 0..{size:#x}) served from vfrelay's memory");
                self.umem = Some(Umem { map, size });
                self.umem_refused = false;
                true
            }
            Err(err) => {
                warn!(
                    "IOTLB: VDUSE_IOTLB_REG_UMEM of {size} bytes refused ({err}); the bounce \
                     range is served from the kernel's pages, and a descriptor into a page \
                     the kernel never backed there will kill vfrelay with SIGBUS"
                );
                false
            }
        }
    }

    /// The table as a view for the dataplane; it keeps the mappings it
    /// uses alive, so the table may change under it.
    pub fn view(&self) -> Arc<MemView> {
        let mut view = MemView::empty();
        let mut owned: Vec<Arc<Mapping>> = Vec::new();
        for x in self.entries.values() {
            let len = x.e.last - x.e.start + 1;
            let (host, m) = match &x.backing {
                Backing::Mapped(m) => {
                    // SAFETY: offset % PAGE < PAGE <= map_len: inside the mapping.
                    let h = unsafe { (m.base as *mut u8).add((x.e.offset % PAGE) as usize) };
                    (h, m)
                }
                Backing::Umem => {
                    let u = self.umem.as_ref().expect("umem backing without umem");
                    (u.map.base as *mut u8, &u.map)
                }
            };
            // SAFETY: the mapping (or our bounce memory) goes into `owned`,
            // which the view keeps alive; it was mapped with the protection
            // `perm` allows (prot_of), umem read-write.
            if unsafe { view.add(x.e.start, len, host, perm_of(&x.backing, x.e.perm)) } {
                owned.push(m.clone());
            } else {
                warn!(
                    "IOTLB: overlapping entry {:#x}..={:#x} skipped",
                    x.e.start, x.e.last
                );
            }
        }
        Arc::new(view.with_owner(Arc::new(owned)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{memfd, FakeDevice};
    use super::*;
    use std::os::unix::fs::FileExt;

    fn e(start: u64, last: u64, perm: u8) -> IotlbEntry {
        IotlbEntry {
            offset: 0,
            start,
            last,
            perm,
        }
    }

    #[test]
    fn entries_are_checked() {
        assert!(check_entry(&e(0, 0xfff, uapi::ACCESS_RW), 0).is_ok());
        assert!(check_entry(&e(0x1000, 0x1fff, uapi::ACCESS_RO), 0x800).is_ok());
        assert!(check_entry(&e(0x2000, 0x1fff, uapi::ACCESS_RW), 0).is_err());
        assert!(check_entry(&e(0, 0xfff, uapi::ACCESS_RW), 0x1000).is_err());
        assert!(check_entry(&e(0, 0xfff, 0), 0).is_err());
        assert!(check_entry(&e(0, 0xfff, 7), 0).is_err());
        assert!(check_entry(&e(0, u64::MAX, uapi::ACCESS_RW), 0).is_err());
        assert_eq!(next_start(&e(0, 0xfff, 3)), Some(0x1000));
        assert_eq!(next_start(&e(0, u64::MAX, 3)), None);
    }

    fn read(view: &MemView, iova: u64, len: usize) -> Option<Vec<u8>> {
        let p = view.translate(iova, len as u64, Perm::Read)?;
        // SAFETY: translate checked [iova, iova+len) lies in one mapping.
        Some(unsafe { std::slice::from_raw_parts(p, len) }.to_vec())
    }

    #[test]
    fn maps_an_entry_at_its_offset() {
        let f = Arc::new(memfd(3 * PAGE));
        f.write_at(b"hello", PAGE + 16).unwrap();
        let dev = FakeDevice::default();
        dev.add(0x10000, 2 * PAGE, uapi::ACCESS_RW, f, PAGE);
        let mut t = Table::default();
        t.update(&dev, 0, u64::MAX).unwrap();
        let v = t.view();
        assert_eq!(read(&v, 0x10010, 5).unwrap(), b"hello");
        assert!(v.translate(0x10000 + 2 * PAGE, 1, Perm::Read).is_none());
    }

    #[test]
    fn an_update_says_whether_anything_changed_and_fails_closed() {
        let f = Arc::new(memfd(4 * PAGE));
        let dev = FakeDevice::default();
        dev.add(0x10000, PAGE, uapi::ACCESS_RW, f.clone(), 0);
        let mut t = Table::default();
        assert!(t.update(&dev, 0, u64::MAX).unwrap(), "new entry");
        assert!(!t.update(&dev, 0, u64::MAX).unwrap(), "nothing new");
        // The kernel cannot be read: nothing unconfirmed stays mapped (it
        // may reuse what it unmapped as soon as the update is answered).
        dev.broken.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(t.update(&dev, 0, u64::MAX).is_err());
        assert!(t.view().translate(0x10000, 1, Perm::Read).is_none());
    }

    #[test]
    fn an_update_keeps_unchanged_mappings_and_drops_vanished_ones() {
        let f = Arc::new(memfd(16 * PAGE));
        let dev = FakeDevice::default();
        dev.add(0x10000, PAGE, uapi::ACCESS_RW, f.clone(), 0);
        dev.add(0x20000, PAGE, uapi::ACCESS_RW, f.clone(), PAGE);
        dev.add(0x30000, PAGE, uapi::ACCESS_RW, f.clone(), 2 * PAGE);
        let mut t = Table::default();
        t.update(&dev, 0, u64::MAX).unwrap();
        let v1 = t.view();
        let a = v1.translate(0x10000, 1, Perm::Read).unwrap();
        let c = v1.translate(0x30000, 1, Perm::Read).unwrap();

        // The second entry is unmapped, a new one appears, the third is
        // re-mapped at another offset; the kernel says "everything".
        dev.remove(0x20000);
        dev.remove(0x30000);
        dev.add(0x30000, PAGE, uapi::ACCESS_RW, f.clone(), 3 * PAGE);
        dev.add(0x40000, PAGE, uapi::ACCESS_RW, f.clone(), 4 * PAGE);
        t.update(&dev, 0, u64::MAX).unwrap();
        let v2 = t.view();
        assert_eq!(
            v2.translate(0x10000, 1, Perm::Read),
            Some(a),
            "unchanged entry remapped"
        );
        assert!(v2.translate(0x20000, 1, Perm::Read).is_none());
        assert_ne!(
            v2.translate(0x30000, 1, Perm::Read).unwrap(),
            c,
            "changed entry kept"
        );
        assert!(v2.translate(0x40000, 1, Perm::Read).is_some());
        // The old view still works: it holds its own mappings.
        assert!(read(&v1, 0x20000, 1).is_some());

        // A ranged update looks only at its range.
        dev.remove(0x10000);
        dev.remove(0x40000);
        let calls = *dev.get_fd_calls.lock().unwrap();
        t.update(&dev, 0x40000, 0x40fff).unwrap();
        assert_eq!(*dev.get_fd_calls.lock().unwrap() - calls, 1);
        let v3 = t.view();
        assert!(
            v3.translate(0x10000, 1, Perm::Read).is_some(),
            "outside the range"
        );
        assert!(v3.translate(0x40000, 1, Perm::Read).is_none());
    }

    #[test]
    fn write_only_and_read_only_entries_are_mapped_shared() {
        let f = Arc::new(memfd(2 * PAGE));
        let dev = FakeDevice::default();
        dev.add(0x10000, PAGE, uapi::ACCESS_WO, f.clone(), 0);
        dev.add(0x20000, PAGE, uapi::ACCESS_RO, f.clone(), PAGE);
        let mut t = Table::default();
        t.update(&dev, 0, u64::MAX).unwrap();
        let v = t.view();
        // Write-only: an RX buffer under a vIOMMU. What we write is the
        // driver's memory, not a copy.
        let p = v
            .translate(0x10000, 4, Perm::Write)
            .expect("write-only entry mapped");
        assert!(
            v.translate(0x10000, 4, Perm::Read).is_none(),
            "not for reading"
        );
        // SAFETY: 4 bytes inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(b"rxok".as_ptr(), p, 4) };
        let mut b = [0u8; 4];
        f.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"rxok");
        // Read-only: the driver's bytes, read through a shared mapping.
        f.write_at(b"txok", PAGE).unwrap();
        assert_eq!(read(&v, 0x20000, 4).unwrap(), b"txok");
        assert!(
            v.translate(0x20000, 4, Perm::Write).is_none(),
            "not for writing"
        );
    }

    #[test]
    fn an_entry_past_the_end_of_its_file_is_refused() {
        // Touching the second page would be SIGBUS.
        let f = Arc::new(memfd(PAGE));
        let dev = FakeDevice::default();
        dev.add(0x10000, 2 * PAGE, uapi::ACCESS_RW, f, 0);
        let mut t = Table::default();
        t.update(&dev, 0, u64::MAX).unwrap();
        assert!(t.view().translate(0x10000, 1, Perm::Read).is_none());
    }

    /// The bounce domain's fd backs only the pages the driver mapped; a
    /// fault on any other is SIGBUS. An empty memfd faults the same way on
    /// every page. (fd_covers would refuse it, but the domain file is an
    /// anon inode, not a regular file, so nothing catches the real one.)
    /// Mapping it and reading, as the table did before REG_UMEM, kills the
    /// test process; served from our memory, the read gives zeros.
    #[test]
    fn the_bounce_range_is_served_from_our_memory() {
        let size = 16 * PAGE;
        let dev = FakeDevice {
            bounce: Some(size),
            ..Default::default()
        };
        dev.add(0, size, uapi::ACCESS_RW, Arc::new(memfd(0)), 0);
        dev.add(size, PAGE, uapi::ACCESS_RW, Arc::new(memfd(PAGE)), 0);
        let mut t = Table::default();
        t.update(&dev, 0, u64::MAX).unwrap();
        let v = t.view();
        assert_eq!(read(&v, 3 * PAGE, 8).unwrap(), vec![0; 8]);
        assert!(t.umem_registered());
        let (uaddr, usize_) = dev.umem.lock().unwrap().unwrap();
        assert_eq!(usize_, size);
        assert_eq!(v.translate(0, 1, Perm::Read).unwrap() as u64, uaddr);
        assert!(v.translate(size, 1, Perm::Read).is_some());
        // After a reset the bounce map goes and comes back: the same
        // memory, not a second registration.
        t.clear();
        t.update(&dev, 0, u64::MAX).unwrap();
        assert_eq!(t.view().translate(0, 1, Perm::Read).unwrap() as u64, uaddr);
    }

    /// After a reset the domain's bounce map is gone: an entry at IOVA 0
    /// of the same size (a vhost-vdpa user's memory) is the user's, not
    /// our bounce memory, though that stays registered.
    #[test]
    fn iova_0_after_the_bounce_map_is_not_our_memory() {
        let size = 4 * PAGE;
        let dev = FakeDevice {
            bounce: Some(size),
            ..Default::default()
        };
        dev.add(0, size, uapi::ACCESS_RW, Arc::new(memfd(0)), 0);
        let mut t = Table::default();
        t.update(&dev, 0, u64::MAX).unwrap();
        assert!(t.umem_registered());
        t.clear();
        dev.remove(0);
        dev.user_maps
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let f = Arc::new(memfd(size));
        f.write_at(b"guest", 16).unwrap();
        dev.add(0, size, uapi::ACCESS_RO, f.clone(), 0);
        t.update(&dev, 0, u64::MAX).unwrap();
        let v = t.view();
        assert_eq!(read(&v, 16, 5).unwrap(), b"guest");
        assert!(v.translate(16, 1, Perm::Write).is_none(), "read-only");
        // Read-write the same: still the user's.
        t.clear();
        dev.remove(0);
        dev.add(0, size, uapi::ACCESS_RW, f, 0);
        t.update(&dev, 0, u64::MAX).unwrap();
        assert_eq!(read(&t.view(), 16, 5).unwrap(), b"guest");
    }

    #[test]
    fn a_refused_umem_falls_back_to_the_kernels_pages() {
        let size = 4 * PAGE;
        let dev = FakeDevice {
            bounce: Some(size),
            refuse_umem: true,
            ..Default::default()
        };
        let f = Arc::new(memfd(size));
        f.write_at(b"kpage", 16).unwrap();
        dev.add(0, size, uapi::ACCESS_RW, f, 0);
        let mut t = Table::default();
        t.update(&dev, 0, u64::MAX).unwrap();
        assert!(!t.umem_registered());
        assert_eq!(read(&t.view(), 16, 5).unwrap(), b"kpage");
        // Not asked again at the next update.
        let calls = *dev.get_info_calls.lock().unwrap();
        t.clear();
        t.update(&dev, 0, u64::MAX).unwrap();
        assert_eq!(*dev.get_info_calls.lock().unwrap(), calls);
    }
}
