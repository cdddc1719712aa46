//! A flat view of guest memory for the hot path: guest-physical (or IOVA)
//! ranges mapped into this process, looked up without vm-memory's per-access
//! machinery. Both frontends build one: vhost-user from its memory table,
//! VDUSE from IOTLB mappings.
//!
//! Guest memory is shared with a guest that may change it at any moment, so
//! nothing here hands out Rust references into it: callers get raw pointers.
//! What the dataplane interprets (ring indices, descriptors, used entries)
//! is read and written once, with atomic or volatile accesses at host
//! addresses whose alignment was checked; frame bytes are copied in or out
//! with plain copies, as data, and never read twice.

use std::sync::Arc;

/// What the device may do with a range of guest memory. vhost-user memory
/// is always both; a VDUSE IOTLB entry carries its own (a driver maps TX
/// buffers read-only and, under an IOMMU, RX buffers write-only), and a
/// write through a read-only mapping must be a queue error, not a write the
/// guest never sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Perm {
    Read = 1,
    Write = 2,
    ReadWrite = 3,
}

impl Perm {
    /// Whether this permission includes everything `need` asks for.
    #[inline]
    pub fn allows(self, need: Perm) -> bool {
        self as u8 & need as u8 == need as u8
    }

    /// What a queue needs of its buffers: RX writes them, TX reads them.
    #[inline]
    pub fn for_buffers(device_writes: bool) -> Perm {
        if device_writes {
            Perm::Write
        } else {
            Perm::Read
        }
    }
}

/// One contiguous mapping: guest addresses `[gpa, gpa+len)` at `host`.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    gpa: u64,
    len: u64,
    host: *mut u8,
    perm: Perm,
}

impl Region {
    /// Covers nothing: every translation misses.
    pub const NONE: Region = Region {
        gpa: 0,
        len: 0,
        host: std::ptr::null_mut(),
        perm: Perm::ReadWrite,
    };

    /// Host address of `[gpa, gpa+len)` if it lies inside this region
    /// and the region allows `need`.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64, need: Perm) -> Option<*mut u8> {
        let off = gpa.wrapping_sub(self.gpa);
        // off < self.len rules out gpa below the start (it wraps high).
        if off < self.len && len <= self.len - off && self.perm.allows(need) {
            // SAFETY: [off, off+len) is inside the region's mapping.
            Some(unsafe { self.host.add(off as usize) })
        } else {
            None
        }
    }
}

/// Whether `fd` has `size` bytes from `offset`: a shared mapping past the
/// end of its file raises SIGBUS on first touch, which would kill every
/// port, so a front end's fd is checked before it is mapped. (A front end
/// that shrinks the file afterwards can still do that: DPDK and QEMU's
/// vhost-user back ends trust it the same way.)
pub fn fd_covers(fd: std::os::fd::BorrowedFd<'_>, offset: u64, size: u64) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero struct stat is a valid value; fstat writes one
    // struct stat into it and reads nothing else.
    let (rc, st) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd.as_raw_fd(), &mut st), st)
    };
    if rc != 0 {
        return Err(format!("fstat: {}", std::io::Error::last_os_error()));
    }
    let end = offset
        .checked_add(size)
        .ok_or_else(|| format!("{offset:#x}+{size:#x} overflows"))?;
    if st.st_mode & libc::S_IFMT == libc::S_IFREG && end > st.st_size as u64 {
        return Err(format!(
            "{offset:#x}+{size:#x} goes past the end of the {}-byte file",
            st.st_size
        ));
    }
    Ok(())
}

/// Keeps whatever owns the mappings alive while a view exists.
type Owner = Arc<dyn Send + Sync>;

impl std::fmt::Debug for MemView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for r in &self.regions {
            l.entry(&format_args!("{:#x}+{:#x} at {:p}", r.gpa, r.len, r.host));
        }
        l.finish()
    }
}

pub struct MemView {
    /// Sorted by `gpa`, non-overlapping.
    regions: Vec<Region>,
    _owner: Option<Owner>,
}

// SAFETY: the raw pointers refer to shared mappings kept alive by `_owner`
// (or, for tests, by the caller); they are only dereferenced through
// bounds-checked translation.
unsafe impl Send for MemView {}
unsafe impl Sync for MemView {}

impl MemView {
    pub fn empty() -> Self {
        MemView {
            regions: Vec::new(),
            _owner: None,
        }
    }

    /// The same view, keeping `owner` (whatever unmaps the ranges added
    /// with [`add`](Self::add)) alive as long as the view.
    pub fn with_owner(mut self, owner: Owner) -> Self {
        self._owner = Some(owner);
        self
    }

    /// Add a mapping. Overlapping ranges are refused (false).
    ///
    /// # Safety
    /// `[host, host+len)` must stay mapped, readable and (if `perm` has
    /// `Write`) writable for as long as this view lives: the hot path
    /// dereferences what [`translate`](Self::translate) hands out. Keep its
    /// owner alive with [`with_owner`](Self::with_owner).
    pub unsafe fn add(&mut self, gpa: u64, len: u64, host: *mut u8, perm: Perm) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        if len == 0 {
            return false;
        }
        // Sorted and disjoint: only the neighbours can overlap.
        let pos = self.regions.partition_point(|r| r.gpa < gpa);
        let prev_ends_before = pos == 0 || {
            let p = &self.regions[pos - 1];
            p.gpa + p.len <= gpa
        };
        let next_starts_after = self.regions.get(pos).is_none_or(|n| end <= n.gpa);
        if !prev_ends_before || !next_starts_after {
            return false;
        }
        self.regions.insert(
            pos,
            Region {
                gpa,
                len,
                host,
                perm,
            },
        );
        true
    }

    #[inline]
    fn find(&self, gpa: u64, need: Perm) -> Option<&Region> {
        // A binary search: VDUSE may have thousands of IOTLB entries and
        // vhost-user up to 509 regions. Only the last region starting at or
        // below `gpa` can hold it.
        let i = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = &self.regions[i.checked_sub(1)?];
        (gpa - r.gpa < r.len && r.perm.allows(need)).then_some(r)
    }

    /// Whether `gpa` is mapped, for reading or writing or both.
    pub fn maps(&self, gpa: u64) -> bool {
        [Perm::Read, Perm::Write]
            .into_iter()
            .any(|p| self.find(gpa, p).is_some())
    }

    /// The region holding `gpa`, if it allows `need`.
    #[inline]
    pub fn region(&self, gpa: u64, need: Perm) -> Option<Region> {
        self.find(gpa, need).copied()
    }

    /// Host pointer for `[gpa, gpa+len)`, which must lie in one region
    /// that allows `need`.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64, need: Perm) -> Option<*mut u8> {
        self.find(gpa, need)?.translate(gpa, len, need)
    }

    /// Host pointer for `gpa` and how many bytes from there stay in the same
    /// region (at most `len`): for buffers that cross a region boundary.
    #[inline]
    pub fn translate_prefix(&self, gpa: u64, len: u64, need: Perm) -> Option<(*mut u8, u64)> {
        let r = self.find(gpa, need)?;
        let off = gpa - r.gpa;
        // SAFETY: off < r.len, inside the mapping.
        Some((unsafe { r.host.add(off as usize) }, len.min(r.len - off)))
    }
}

#[cfg(test)]
pub(crate) mod test_mem {
    //! A fake guest memory backed by a heap buffer, for unit tests.
    use super::{MemView, Perm};

    pub struct TestMem {
        pub buf: Vec<u8>,
        pub base: u64,
    }

    impl TestMem {
        pub fn new(base: u64, len: usize) -> Self {
            TestMem {
                buf: vec![0; len],
                base,
            }
        }
        /// A view of the whole buffer; the caller keeps `self` alive (and
        /// its buffer unmoved) while the view is used.
        pub fn view(&mut self) -> MemView {
            self.view_with(Perm::ReadWrite)
        }

        pub fn view_with(&mut self, perm: Perm) -> MemView {
            let mut v = MemView::empty();
            // SAFETY: the heap buffer outlives the tests' views (see above).
            assert!(unsafe {
                v.add(
                    self.base,
                    self.buf.len() as u64,
                    self.buf.as_mut_ptr(),
                    perm,
                )
            });
            v
        }
        pub fn write(&mut self, gpa: u64, data: &[u8]) {
            let o = (gpa - self.base) as usize;
            self.buf[o..o + data.len()].copy_from_slice(data);
        }
        pub fn read(&self, gpa: u64, len: usize) -> &[u8] {
            let o = (gpa - self.base) as usize;
            &self.buf[o..o + len]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: Perm = Perm::ReadWrite;

    #[test]
    fn translate_checks_bounds() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        let mut v = MemView::empty();
        // SAFETY (all `add`s in these tests): the vectors outlive the view
        // and are never resized.
        unsafe {
            assert!(v.add(0x10000, 4096, a.as_mut_ptr(), RW));
            assert!(v.add(0x11000, 4096, b.as_mut_ptr(), RW));
            assert!(!v.add(0x10800, 16, a.as_mut_ptr(), RW), "overlap refused");
            assert!(!v.add(0xf800, 0x1000, a.as_mut_ptr(), RW), "overlap below");
            assert!(!v.add(0x0, 0x20000, a.as_mut_ptr(), RW), "overlap around");
            assert!(!v.add(u64::MAX - 1, 16, a.as_mut_ptr(), RW), "wrap refused");
        }
        assert_eq!(v.translate(0x10000, 4096, RW), Some(a.as_mut_ptr()));
        assert_eq!(
            v.translate(0x10ff0, 16, RW),
            Some(unsafe { a.as_mut_ptr().add(0xff0) })
        );
        assert_eq!(
            v.translate(0x10ff0, 17, RW),
            None,
            "crosses into next region"
        );
        assert_eq!(v.translate(0xffff, 1, RW), None);
        assert_eq!(v.translate(0x12000, 1, RW), None);
        assert_eq!(v.translate(u64::MAX, 2, RW), None);
        assert_eq!(v.translate_prefix(0x10ff0, 100, RW).unwrap().1, 16);
    }

    #[test]
    fn translate_honours_permissions() {
        let mut ro = vec![0u8; 4096];
        let mut wo = vec![0u8; 4096];
        let mut v = MemView::empty();
        // SAFETY: as above.
        unsafe {
            assert!(v.add(0x1000, 4096, ro.as_mut_ptr(), Perm::Read));
            assert!(v.add(0x2000, 4096, wo.as_mut_ptr(), Perm::Write));
        }
        assert!(v.translate(0x1000, 1, Perm::Read).is_some());
        assert!(v.translate(0x1000, 1, Perm::Write).is_none());
        assert!(v.translate(0x1000, 1, RW).is_none());
        assert!(v.translate(0x2000, 1, Perm::Write).is_some());
        assert!(v.translate_prefix(0x2000, 1, Perm::Read).is_none());
        assert!(v.region(0x2000, Perm::Read).is_none());
    }

    #[test]
    fn many_regions_each_found_and_holes_missed() {
        // VDUSE can hand over thousands of entries: every one must be found,
        // and every hole between them missed.
        let mut buf = vec![0u8; 4096 * 0x100];
        let mut v = MemView::empty();
        for i in 0..4096u64 {
            // SAFETY: as above; 0x100 bytes of `buf` per region.
            let host = unsafe { buf.as_mut_ptr().add(i as usize * 0x100) };
            assert!(unsafe { v.add(i * 0x1000, 0x100, host, RW) });
        }
        for i in 0..4096u64 {
            let want = unsafe { buf.as_mut_ptr().add(i as usize * 0x100 + 0xff) };
            assert_eq!(v.translate(i * 0x1000 + 0xff, 1, RW), Some(want));
            assert_eq!(v.translate(i * 0x1000 + 0x100, 1, RW), None);
        }
    }
}
