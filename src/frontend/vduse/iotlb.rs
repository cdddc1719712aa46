//! IOTLB -> [`MemView`]: every mapping the kernel's VDUSE domain holds, each
//! mmapped through the fd IOTLB_GET_FD hands out. Under virtio_vdpa that is
//! the bounce buffer at IOVA [0, bounce_size) plus coherent allocations (the
//! rings); under vhost_vdpa, the user's (QEMU's) memory.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{debug, warn};

use super::dev::{Device, Error};
use super::uapi::{self, IotlbEntry};
use crate::dataplane::mem::{MemView, Perm};

/// More than any real domain holds; stops a kernel that kept answering.
const MAX_MAPPINGS: usize = 4096;
const PAGE: u64 = 4096;

/// One mmapped IOTLB entry, unmapped on drop.
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

/// Owns the mappings of one view; dropping the last view unmaps them.
struct Maps(#[allow(dead_code)] Vec<Mapping>);

// SAFETY: the raw pointers are only unmapped on drop; MemView does the
// (bounds-checked) access.
unsafe impl Send for Maps {}
unsafe impl Sync for Maps {}

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

fn map_entry(fd: &impl AsRawFd, e: &IotlbEntry) -> Result<Mapping, String> {
    let len = e.last - e.start + 1;
    // mmap wants a page-aligned file offset.
    let lead = e.offset % PAGE;
    let map_len = (len + lead).div_ceil(PAGE) * PAGE;
    // A read-only entry comes with an O_RDONLY fd and is mapped read-only;
    // the view marks it so, and a device write into it is a queue error.
    let (prot, flags) = match e.perm {
        uapi::ACCESS_RO => (libc::PROT_READ, libc::MAP_SHARED),
        _ => (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED),
    };
    // SAFETY: a fresh mapping chosen by the kernel; checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len as usize,
            prot,
            flags,
            fd.as_raw_fd(),
            (e.offset - lead) as libc::off_t,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!(
            "mmap of IOVA {:#x}..={:#x} (offset {:#x}): {}",
            e.start,
            e.last,
            e.offset,
            std::io::Error::last_os_error()
        ));
    }
    Ok(Mapping {
        base,
        map_len: map_len as usize,
    })
}

/// Maps every IOTLB entry the device has now and returns them as a view.
/// An entry that cannot be mapped is left out (translations into it fail,
/// stopping only the queue that uses it) with a log line.
pub fn build_view(dev: &Device) -> Result<Arc<MemView>, Error> {
    let mut view = MemView::empty();
    let mut maps = Vec::new();
    let mut from = 0u64;
    for _ in 0..MAX_MAPPINGS {
        let Some((fd, e)) = dev.iotlb_get_fd(from, u64::MAX)? else {
            break;
        };
        if let Err(msg) = check_entry(&e, from) {
            warn!("IOTLB: {msg}; ignoring the rest");
            break;
        }
        if e.perm == uapi::ACCESS_WO {
            // An O_WRONLY fd cannot be mmapped; nothing the device reads
            // may live there, and rings and RX buffers are never write-only.
            warn!(
                "IOTLB: skipping write-only entry {:#x}..={:#x}",
                e.start, e.last
            );
        } else {
            match map_entry(&fd, &e) {
                Ok(m) => {
                    // SAFETY: offset % PAGE < the mapping's length.
                    let host = unsafe { (m.base as *mut u8).add((e.offset % PAGE) as usize) };
                    let perm = if e.perm == uapi::ACCESS_RO {
                        Perm::Read
                    } else {
                        Perm::ReadWrite
                    };
                    // SAFETY: `m` is kept in `maps`, which the view owns, and
                    // is writable unless `perm` says read-only.
                    if unsafe { view.add(e.start, e.last - e.start + 1, host, perm) } {
                        debug!(
                            "IOTLB: mapped {:#x}..={:#x} perm {} offset {:#x}",
                            e.start, e.last, e.perm, e.offset
                        );
                        maps.push(m);
                    } else {
                        warn!(
                            "IOTLB: overlapping entry {:#x}..={:#x} skipped",
                            e.start, e.last
                        );
                    }
                }
                Err(msg) => warn!("IOTLB: {msg}"),
            }
        }
        match next_start(&e) {
            Some(n) => from = n.max(from),
            None => break,
        }
    }
    Ok(Arc::new(view.with_owner(Arc::new(Maps(maps)))))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn maps_a_memfd_entry_at_its_offset() {
        // SAFETY: plain syscalls on a fresh memfd.
        let fd = unsafe { libc::memfd_create(c"vfx-iotlb-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(3 * PAGE).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_at(b"hello", PAGE + 16).unwrap();
        let ent = IotlbEntry {
            offset: PAGE,
            start: 0x10000,
            last: 0x10000 + 2 * PAGE - 1,
            perm: uapi::ACCESS_RW,
        };
        let m = map_entry(&file, &ent).unwrap();
        let mut view = MemView::empty();
        // SAFETY: `m` outlives the view.
        assert!(unsafe { view.add(ent.start, 2 * PAGE, m.base as *mut u8, Perm::ReadWrite) });
        let p = view.translate(0x10010, 5, Perm::Read).unwrap();
        let got = unsafe { std::slice::from_raw_parts(p, 5) };
        assert_eq!(got, b"hello");
        assert!(view.translate(0x10000 + 2 * PAGE, 1, Perm::Read).is_none());
    }
}
