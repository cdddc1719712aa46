//! Just enough of bpf(2) to install the AF_XDP redirect program: an XSKMAP,
//! the six-instruction program, a bpf_link to the interface, map updates.
//! No libbpf: `union bpf_attr` is filled by byte offset (uapi/linux/bpf.h).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;

const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
const XDP_PASS: i32 = 2;

/// XDP attach modes for BPF_LINK_CREATE (uapi/linux/if_link.h).
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `union bpf_attr`, large enough for every command used here. Unused tail
/// bytes must be zero: the kernel rejects non-zero bytes it does not know.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(mut self, off: usize, v: &[u8]) -> Self {
        self.0[off..off + v.len()].copy_from_slice(v);
        self
    }
}

fn sys_bpf(cmd: libc::c_int, attr: &mut Attr) -> io::Result<libc::c_long> {
    loop {
        // SAFETY: attr is a valid, writable buffer of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.0.as_mut_ptr(),
                std::mem::size_of::<Attr>() as libc::c_uint,
            )
        };
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn sys_bpf_fd(cmd: libc::c_int, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: these commands return a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Name for kernel objects (bpftool shows it): [A-Za-z0-9_.], < 16 bytes.
fn obj_name(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out[..15].iter_mut().zip(name.bytes()) {
        *o = b;
    }
    out
}

/// An XSKMAP: key = rx queue index, value = AF_XDP socket fd.
pub fn create_xskmap(max_entries: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new()
        .u32(0, BPF_MAP_TYPE_XSKMAP)
        .u32(4, 4) // key_size
        .u32(8, 4) // value_size
        .u32(12, max_entries)
        .bytes(28, &obj_name("vfrelay_xsks"));
    sys_bpf_fd(BPF_MAP_CREATE, &mut a)
}

/// `map[key] = value` (for XSKMAP: queue -> socket fd).
pub fn map_update(map: RawFd, key: u32, value: u32) -> io::Result<()> {
    let mut a = Attr::new()
        .u32(0, map as u32)
        .u64(8, &key as *const u32 as u64)
        .u64(16, &value as *const u32 as u64)
        .u64(24, 0); // BPF_ANY
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
}

/// One `struct bpf_insn`: opcode, dst/src register nibbles, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    u64::from_le_bytes([
        code,
        (src << 4) | (dst & 0xf),
        o[0],
        o[1],
        i[0],
        i[1],
        i[2],
        i[3],
    ])
}

/// `return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);`
/// Queues without a socket in the map fall through to the normal stack.
pub fn redirect_program(map: RawFd) -> [u64; 6] {
    [
        insn(0x61, 2, 1, 16, 0), // r2 = *(u32 *)(r1 + 16): rx_queue_index
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map), // r1 = map (ld_imm64, 1/2)
        insn(0, 0, 0, 0, 0),     // (ld_imm64, 2/2)
        insn(0xb7, 3, 0, 0, XDP_PASS), // r3 = XDP_PASS
        insn(0x85, 0, 0, 0, BPF_FUNC_REDIRECT_MAP), // call bpf_redirect_map
        insn(0x95, 0, 0, 0, 0),  // exit
    ]
}

/// Loads the redirect program. On failure the error carries the last line
/// of the verifier log, which is what tells a user why.
pub fn load_redirect_program(map: &OwnedFd) -> io::Result<OwnedFd> {
    let insns = redirect_program(map.as_raw_fd());
    let license = b"GPL\0";
    let attr = |log: Option<&mut [u8]>| {
        let (level, size, buf) = match log {
            Some(l) => (1, l.len() as u32, l.as_mut_ptr() as u64),
            None => (0, 0, 0),
        };
        Attr::new()
            .u32(0, BPF_PROG_TYPE_XDP)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, level)
            .u32(28, size)
            .u64(32, buf)
            .bytes(48, &obj_name("vfrelay_xsk"))
            .u32(68, BPF_XDP) // expected_attach_type
    };
    // The verifier may return EAGAIN under memory pressure; libbpf retries too.
    let mut err = None;
    for _ in 0..5 {
        match sys_bpf_fd(BPF_PROG_LOAD, &mut attr(None)) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => err = Some(e),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EAGAIN));
    if err.raw_os_error() == Some(libc::EPERM) {
        return Err(err);
    }
    // Load once more with the verifier log on, only to explain the failure.
    let mut log = vec![0u8; 64 * 1024];
    let _ = sys_bpf_fd(BPF_PROG_LOAD, &mut attr(Some(&mut log)));
    let text =
        String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
    match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(last) => Err(io::Error::new(
            err.kind(),
            format!("{err}; verifier: {}", last.trim()),
        )),
        None => Err(err),
    }
}

/// Attaches `prog` to `ifindex` through a bpf_link: the program stays
/// attached exactly as long as the returned fd is open, so even a crash
/// detaches it. Fails with EBUSY/EEXIST if the device already has one.
pub fn link_xdp(prog: &OwnedFd, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(4, ifindex)
        .u32(8, BPF_XDP)
        .u32(12, flags);
    sys_bpf_fd(BPF_LINK_CREATE, &mut a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_matches_reference_bytes() {
        let p = redirect_program(0x0a0b0c0d);
        let bytes: Vec<u8> = p.iter().flat_map(|i| i.to_le_bytes()).collect();
        #[rustfmt::skip]
        let want: [u8; 48] = [
            0x61, 0x12, 0x10, 0, 0, 0, 0, 0,
            0x18, 0x11, 0, 0, 0x0d, 0x0c, 0x0b, 0x0a,
            0, 0, 0, 0, 0, 0, 0, 0,
            0xb7, 0x03, 0, 0, 0x02, 0, 0, 0,
            0x85, 0, 0, 0, 0x33, 0, 0, 0,
            0x95, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(bytes, want);
    }

    #[test]
    fn attr_fields_land_at_offsets() {
        let a = Attr::new().u32(4, 0x11223344).u64(8, 0x5566778899aabbcc);
        assert_eq!(&a.0[..4], &[0; 4]);
        assert_eq!(
            u32::from_ne_bytes(a.0[4..8].try_into().unwrap()),
            0x11223344
        );
        assert_eq!(
            u64::from_ne_bytes(a.0[8..16].try_into().unwrap()),
            0x5566778899aabbcc
        );
        assert!(a.0[16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn object_names_are_truncated_and_terminated() {
        let n = obj_name("a_very_long_object_name");
        assert_eq!(&n[..15], b"a_very_long_obj");
        assert_eq!(n[15], 0);
        assert_eq!(&obj_name("xs")[..3], b"xs\0");
    }
}
