//! The VDUSE uAPI (Linux include/uapi/linux/vduse.h, API version 0): ioctl
//! numbers and the structures they carry, as x86-64 lays them out. No crate
//! provides these; the layout tests pin every size and offset to the numbers
//! in the reference (shared/reference/vduse-uapi.md).

#![allow(dead_code)]

pub const API_VERSION: u64 = 0;
/// Longest device name including the NUL.
pub const NAME_MAX: usize = 256;

pub const VIRTIO_ID_NET: u32 = 1;
pub use crate::net::{
    F_ACCESS_PLATFORM as VIRTIO_F_ACCESS_PLATFORM, F_CTRL_VQ as VIRTIO_NET_F_CTRL_VQ,
};
pub const VIRTIO_CONFIG_S_DRIVER_OK: u8 = 4;

/// Request types (enum vduse_req_type).
pub const REQ_GET_VQ_STATE: u32 = 0;
pub const REQ_SET_STATUS: u32 = 1;
pub const REQ_UPDATE_IOTLB: u32 = 2;
pub const RESULT_OK: u32 = 0;
pub const RESULT_FAILED: u32 = 1;

/// IOTLB permissions (vduse_iotlb_entry.perm).
pub const ACCESS_RO: u8 = 1;
pub const ACCESS_WO: u8 = 2;
pub const ACCESS_RW: u8 = 3;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const VDUSE_BASE: u32 = 0x81;

/// `_IOC(dir, type, nr, size)` as asm-generic/ioctl.h encodes it.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (VDUSE_BASE << 8) | nr
}

pub const GET_API_VERSION: u32 = ioc(IOC_READ, 0x00, 8);
pub const SET_API_VERSION: u32 = ioc(IOC_WRITE, 0x01, 8);
pub const CREATE_DEV: u32 = ioc(IOC_WRITE, 0x02, std::mem::size_of::<DevConfig>());
pub const DESTROY_DEV: u32 = ioc(IOC_WRITE, 0x03, NAME_MAX);
pub const IOTLB_GET_FD: u32 = ioc(
    IOC_READ | IOC_WRITE,
    0x10,
    std::mem::size_of::<IotlbEntry>(),
);
pub const DEV_GET_FEATURES: u32 = ioc(IOC_READ, 0x11, 8);
pub const DEV_SET_CONFIG: u32 = ioc(IOC_WRITE, 0x12, std::mem::size_of::<ConfigData>());
pub const DEV_INJECT_CONFIG_IRQ: u32 = ioc(IOC_NONE, 0x13, 0);
pub const VQ_SETUP: u32 = ioc(IOC_WRITE, 0x14, std::mem::size_of::<VqConfig>());
pub const VQ_GET_INFO: u32 = ioc(IOC_READ | IOC_WRITE, 0x15, std::mem::size_of::<VqInfo>());
pub const VQ_SETUP_KICKFD: u32 = ioc(IOC_WRITE, 0x16, std::mem::size_of::<VqEventfd>());
pub const VQ_INJECT_IRQ: u32 = ioc(IOC_WRITE, 0x17, 4);
pub const IOTLB_REG_UMEM: u32 = ioc(IOC_WRITE, 0x18, std::mem::size_of::<IovaUmem>());
pub const IOTLB_DEREG_UMEM: u32 = ioc(IOC_WRITE, 0x19, std::mem::size_of::<IovaUmem>());
pub const IOTLB_GET_INFO: u32 = ioc(IOC_READ | IOC_WRITE, 0x1a, std::mem::size_of::<IovaInfo>());

/// struct vduse_dev_config without its trailing `config[]` bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevConfig {
    pub name: [u8; NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    pub reserved: [u32; 13],
    pub config_size: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
}

/// struct vduse_config_data without its trailing `buffer[]`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ConfigData {
    pub offset: u32,
    pub length: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct VqConfig {
    pub index: u32,
    pub max_size: u16,
    pub reserved: [u16; 13],
}

/// The split/packed state union; split uses the first u16.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct VqStateUnion {
    pub words: [u16; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct VqInfo {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    pub state: VqStateUnion,
    pub ready: u8,
}

impl VqInfo {
    /// Split ring: the next avail index the device should read.
    pub fn split_avail_index(&self) -> u16 {
        self.state.words[0]
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct VqEventfd {
    pub index: u32,
    pub fd: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct IovaUmem {
    pub uaddr: u64,
    pub iova: u64,
    pub size: u64,
    pub reserved: [u64; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct IovaInfo {
    pub start: u64,
    pub last: u64,
    pub capability: u64,
    pub reserved: [u64; 3],
}

/// Wire size of struct vduse_dev_request and struct vduse_dev_response.
pub const MSG_SIZE: usize = 152;
/// Offset of the request/response union (after type/id and 4 reserved u32).
pub const MSG_UNION_OFFSET: usize = 24;
/// Offset of `reserved[4]` in both messages.
pub const MSG_RESERVED_OFFSET: usize = 8;

/// struct vduse_dev_request; the union is kept as raw words and decoded by
/// `dev::parse_request`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevRequest {
    pub req_type: u32,
    pub request_id: u32,
    pub reserved: [u32; 4],
    /// union { vq_state; s; iova; padding[32] } (8-aligned: iova has u64s).
    pub payload: [u64; 16],
}

/// struct vduse_dev_response.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DevResponse {
    pub request_id: u32,
    pub result: u32,
    pub reserved: [u32; 4],
    /// union { vq_state; padding[32] }.
    pub payload: [u32; 32],
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn ioctl_numbers_match_reference() {
        assert_eq!(GET_API_VERSION, 0x80088100);
        assert_eq!(SET_API_VERSION, 0x40088101);
        assert_eq!(CREATE_DEV, 0x41508102);
        assert_eq!(DESTROY_DEV, 0x41008103);
        assert_eq!(IOTLB_GET_FD, 0xc0208110);
        assert_eq!(DEV_GET_FEATURES, 0x80088111);
        assert_eq!(DEV_SET_CONFIG, 0x40088112);
        assert_eq!(DEV_INJECT_CONFIG_IRQ, 0x00008113);
        assert_eq!(VQ_SETUP, 0x40208114);
        assert_eq!(VQ_GET_INFO, 0xc0308115);
        assert_eq!(VQ_SETUP_KICKFD, 0x40088116);
        assert_eq!(VQ_INJECT_IRQ, 0x40048117);
        assert_eq!(IOTLB_REG_UMEM, 0x40308118);
        assert_eq!(IOTLB_DEREG_UMEM, 0x40308119);
        assert_eq!(IOTLB_GET_INFO, 0xc030811a);
    }

    #[test]
    fn struct_layouts_match_reference() {
        assert_eq!(size_of::<DevConfig>(), 336);
        assert_eq!(offset_of!(DevConfig, vendor_id), 256);
        assert_eq!(offset_of!(DevConfig, device_id), 260);
        assert_eq!(offset_of!(DevConfig, features), 264);
        assert_eq!(offset_of!(DevConfig, vq_num), 272);
        assert_eq!(offset_of!(DevConfig, vq_align), 276);
        assert_eq!(offset_of!(DevConfig, reserved), 280);
        assert_eq!(offset_of!(DevConfig, config_size), 332);

        assert_eq!(size_of::<IotlbEntry>(), 32);
        assert_eq!(offset_of!(IotlbEntry, start), 8);
        assert_eq!(offset_of!(IotlbEntry, last), 16);
        assert_eq!(offset_of!(IotlbEntry, perm), 24);

        assert_eq!(size_of::<ConfigData>(), 8);
        assert_eq!(size_of::<VqConfig>(), 32);
        assert_eq!(offset_of!(VqConfig, max_size), 4);
        assert_eq!(offset_of!(VqConfig, reserved), 6);

        assert_eq!(size_of::<VqStateUnion>(), 8);
        assert_eq!(size_of::<VqInfo>(), 48);
        assert_eq!(offset_of!(VqInfo, num), 4);
        assert_eq!(offset_of!(VqInfo, desc_addr), 8);
        assert_eq!(offset_of!(VqInfo, driver_addr), 16);
        assert_eq!(offset_of!(VqInfo, device_addr), 24);
        assert_eq!(offset_of!(VqInfo, state), 32);
        assert_eq!(offset_of!(VqInfo, ready), 40);

        assert_eq!(size_of::<VqEventfd>(), 8);
        assert_eq!(offset_of!(VqEventfd, fd), 4);
        assert_eq!(size_of::<IovaUmem>(), 48);
        assert_eq!(size_of::<IovaInfo>(), 48);
        assert_eq!(offset_of!(IovaInfo, capability), 16);

        assert_eq!(size_of::<DevRequest>(), MSG_SIZE);
        assert_eq!(offset_of!(DevRequest, request_id), 4);
        assert_eq!(offset_of!(DevRequest, reserved), MSG_RESERVED_OFFSET);
        assert_eq!(offset_of!(DevRequest, payload), MSG_UNION_OFFSET);
        assert_eq!(size_of::<DevResponse>(), MSG_SIZE);
        assert_eq!(offset_of!(DevResponse, result), 4);
        assert_eq!(offset_of!(DevResponse, reserved), MSG_RESERVED_OFFSET);
        assert_eq!(offset_of!(DevResponse, payload), MSG_UNION_OFFSET);
    }
}
