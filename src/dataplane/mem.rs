//! A flat view of guest memory for the hot path: guest-physical (or IOVA)
//! ranges mapped into this process, looked up without vm-memory's per-access
//! machinery. Both frontends build one: vhost-user from its memory table,
//! VDUSE from IOTLB mappings.
//!
//! Guest memory is shared with a guest that may change it at any moment, so
//! nothing here hands out Rust references into it: callers get raw pointers
//! and copy with `ptr::copy_nonoverlapping` or volatile/atomic accesses.

use std::sync::Arc;

/// One contiguous mapping: guest addresses `[gpa, gpa+len)` at `host`.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

impl Region {
    /// Covers nothing: every translation misses.
    pub const NONE: Region = Region {
        gpa: 0,
        len: 0,
        host: std::ptr::null_mut(),
    };

    /// Host address of `[gpa, gpa+len)` if it lies inside this region.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let off = gpa.wrapping_sub(self.gpa);
        // off < self.len rules out gpa below the start (it wraps high).
        if off < self.len && len <= self.len - off {
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
    pub fn add(&mut self, gpa: u64, len: u64, host: *mut u8) -> bool {
        if len == 0 || gpa.checked_add(len).is_none() {
            return false;
        }
        let end = gpa + len;
        if self
            .regions
            .iter()
            .any(|r| gpa < r.gpa + r.len && r.gpa < end)
        {
            return false;
        }
        let pos = self.regions.partition_point(|r| r.gpa < gpa);
        self.regions.insert(pos, Region { gpa, len, host });
        true
    }

    #[inline]
    fn find(&self, gpa: u64) -> Option<&Region> {
        // Few regions (QEMU typically sends 2-8): a short scan beats anything
        // cleverer, and the first region is usually the hit.
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)
    }

    /// The region holding `gpa`: (guest start, length, host start).
    #[inline]
    pub fn region(&self, gpa: u64) -> Option<Region> {
        self.find(gpa).copied()
    }

    /// Host pointer for `[gpa, gpa+len)`, which must lie in one region.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        self.find(gpa)?.translate(gpa, len)
    }

    /// Host pointer for `gpa` and how many bytes from there stay in the same
    /// region (at most `len`): for buffers that cross a region boundary.
    #[inline]
    pub fn translate_prefix(&self, gpa: u64, len: u64) -> Option<(*mut u8, u64)> {
        let r = self.find(gpa)?;
        let off = gpa - r.gpa;
        // SAFETY: off < r.len, inside the mapping.
        Some((unsafe { r.host.add(off as usize) }, len.min(r.len - off)))
    }
}

#[cfg(test)]
pub(crate) mod test_mem {
    //! A fake guest memory backed by a heap buffer, for unit tests.
    use super::MemView;

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
        pub fn view(&mut self) -> MemView {
            let mut v = MemView::empty();
            assert!(v.add(self.base, self.buf.len() as u64, self.buf.as_mut_ptr()));
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

    #[test]
    fn translate_checks_bounds() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        let mut v = MemView::empty();
        assert!(v.add(0x10000, 4096, a.as_mut_ptr()));
        assert!(v.add(0x11000, 4096, b.as_mut_ptr()));
        assert!(!v.add(0x10800, 16, a.as_mut_ptr()), "overlap refused");
        assert!(!v.add(u64::MAX - 1, 16, a.as_mut_ptr()), "wrap refused");
        assert_eq!(v.translate(0x10000, 4096), Some(a.as_mut_ptr()));
        assert_eq!(
            v.translate(0x10ff0, 16),
            Some(unsafe { a.as_mut_ptr().add(0xff0) })
        );
        assert_eq!(v.translate(0x10ff0, 17), None, "crosses into next region");
        assert_eq!(v.translate(0xffff, 1), None);
        assert_eq!(v.translate(0x12000, 1), None);
        assert_eq!(v.translate(u64::MAX, 2), None);
        assert_eq!(v.translate_prefix(0x10ff0, 100).unwrap().1, 16);
    }
}
