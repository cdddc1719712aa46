//! virtio-net facts both frontends share: the feature bits (numbers from
//! virtio-bindings, as masks), the config space, MAC addresses, the RARP
//! frame.

use virtio_bindings::{virtio_config as vc, virtio_net as vn, virtio_ring as vr};

const fn bit(n: u32) -> u64 {
    1 << n
}

pub const F_MTU: u64 = bit(vn::VIRTIO_NET_F_MTU);
pub const F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
pub const F_STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
pub const F_MQ: u64 = bit(vn::VIRTIO_NET_F_MQ);
pub const F_CTRL_VQ: u64 = bit(vn::VIRTIO_NET_F_CTRL_VQ);
pub const F_MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
/// QEMU lets the guest announce itself after migration; without it QEMU
/// asks the back end to (SEND_RARP).
pub const F_GUEST_ANNOUNCE: u64 = bit(vn::VIRTIO_NET_F_GUEST_ANNOUNCE);
pub const F_INDIRECT_DESC: u64 = bit(vr::VIRTIO_RING_F_INDIRECT_DESC);
pub const F_EVENT_IDX: u64 = bit(vr::VIRTIO_RING_F_EVENT_IDX);
pub const F_VERSION_1: u64 = bit(vc::VIRTIO_F_VERSION_1);
pub const F_ACCESS_PLATFORM: u64 = bit(vc::VIRTIO_F_ACCESS_PLATFORM);
/// Buffers are used in the order they were made available. The dataplane
/// always does (chains are popped and marked used in ring order, a chain
/// put back is the next one popped), and a driver that knows it can skip
/// its free-list bookkeeping: DPDK's virtio PMD takes its cheaper in-order
/// RX and TX paths.
pub const F_IN_ORDER: u64 = bit(vc::VIRTIO_F_IN_ORDER);

/// Size of the virtio_net_config fields we implement
/// (mac, status, max_virtqueue_pairs, mtu).
pub const CONFIG_LEN: usize = 12;
/// vhost-user caps GET_CONFIG payloads at 256 bytes.
pub const MAX_CONFIG_READ: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub mtu: u16,
    pub queue_pairs: usize,
    pub queue_size: u16,
}

impl NetConfig {
    /// The virtio-net features both frontends offer (backend offloads and
    /// transport bits are added by each frontend).
    pub fn virtio_features(&self) -> u64 {
        let mut f = F_VERSION_1
            | F_MRG_RXBUF
            | F_EVENT_IDX
            | F_INDIRECT_DESC
            | F_MAC
            | F_STATUS
            | F_MTU
            | F_IN_ORDER;
        if self.queue_pairs > 1 {
            f |= F_MQ;
        }
        f
    }

    /// Bytes `[offset, offset+size)` of the config space, zero beyond the
    /// fields we implement; empty for a request outside what may be asked.
    pub fn config_space(&self, status: u16, offset: u32, size: u32) -> Vec<u8> {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&(self.queue_pairs as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        match offset.checked_add(size) {
            Some(end) if end <= MAX_CONFIG_READ => (offset..end)
                .map(|i| c.get(i as usize).copied().unwrap_or(0))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Parse `aa:bb:cc:dd:ee:ff`; refuses multicast addresses (a NIC's own
/// address must be unicast).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("'{s}' is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(format!("'{s}' is not a MAC address (aa:bb:cc:dd:ee:ff)"));
        }
        *m = u8::from_str_radix(p, 16)
            .map_err(|_| format!("'{s}' is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "'{s}' is a multicast address; a device MAC must be unicast"
        ));
    }
    if mac == [0; 6] {
        return Err("00:00:00:00:00:00 is not a usable MAC address".into());
    }
    Ok(mac)
}

/// A random locally administered unicast MAC (like QEMU's 52:54:00 default,
/// but unique per process so two ports never collide).
pub fn random_mac() -> [u8; 6] {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 6 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0) as u64
            ^ std::process::id() as u64;
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b[0] = (b[0] & 0xfe) | 0x02;
    b
}

/// The frame a migrated guest's port sends so switches learn where its MAC
/// went (what QEMU's announce sends): a broadcast RARP "reverse request"
/// from and about `mac`, padded to the Ethernet minimum.
pub fn rarp_frame(mac: &[u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // ETH_P_RARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(mac); // sender hardware address
    f[32..38].copy_from_slice(mac); // target hardware address
    f
}

pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NetConfig {
        NetConfig {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            mtu: 1500,
            queue_pairs: 2,
            queue_size: 256,
        }
    }

    #[test]
    fn config_space_layout() {
        let c = cfg().config_space(1, 0, 12);
        assert_eq!(c, vec![0x52, 0x54, 0, 1, 2, 3, 1, 0, 2, 0, 0xdc, 0x05]);
        assert_eq!(cfg().config_space(1, 10, 2), vec![0xdc, 0x05]);
        // Beyond our fields: zeros; beyond what may be asked: nothing.
        assert_eq!(
            cfg().config_space(1, 8, 8),
            vec![2, 0, 0xdc, 0x05, 0, 0, 0, 0]
        );
        assert!(cfg().config_space(1, 250, 10).is_empty());
        assert!(cfg().config_space(1, u32::MAX, 2).is_empty());
    }

    #[test]
    fn rarp_layout() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_frame(&mac);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert!(f[38..].iter().all(|b| *b == 0));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:6d:90:02").unwrap(),
            [0x52, 0x54, 0, 0x6d, 0x90, 2]
        );
        for bad in [
            "",
            "52:54:00:6d:90",
            "52:54:00:6d:90:02:01",
            "zz:54:00:6d:90:02",
            "5:54:00:6d:90:02",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let m = random_mac();
        assert_eq!(m[0] & 3, 2, "locally administered unicast");
        assert_eq!(parse_mac(&format_mac(&m)).unwrap(), m);
    }
}
