//! Tier 4: SR-IOV VF management and a VF-backed port, inside the QEMU (TCG)
//! test guest with an emulated Intel 82576 (`-device igb`, 7 VFs) and the
//! guest kernel's igb/igbvf drivers.
//!
//! The igb's "wire" is a tap in a host network namespace the test creates
//! (QEMU runs inside it), where [`WirePeer`] plays the switch port and the
//! host behind it: it answers ARP and ping on VLAN 42 and counts and sends
//! UDP datagrams, all with the tag inline (the host has no 8021q).
//!
//! 1. `vfrelay vf create` (2 VFs, then 7: the count is reset to 0 first),
//!    `vf list --json`, `vf config` MAC + VLAN 42 on VF 0, checked with
//!    iproute2's `ip link show` (staged into the guest; busybox's `ip`
//!    knows nothing of VFs).
//! 2. `vfrelay vduse --attach virtio-vdpa --backend vf,pf=eth0,index=0,vlan=42`:
//!    the VDUSE netdev sits in a namespace ("container"); ping and UDP
//!    cross both ways, and the peer sees the frames tagged 42 from the
//!    configured MAC and none untagged.
//! 3. Every `vf` backend and CLI error the guest can produce, with its
//!    exact message: no such PF, not an SR-IOV PF, VF not enabled, VF bound
//!    to vfio-pci, VF with no driver, too many VFs, VF index out of range.
//!    ("no XDP support" cannot be provoked here: generic XDP works on every
//!    netdev; its message is unit-tested in backends/src/vf.rs.)
//!
//! QEMU 10.0's igb registers its VFs before it sets their BARs' 64-bit type
//! (hw/net/igb.c calls pcie_sriov_pf_init before pcie_sriov_pf_init_vf_bar),
//! so a VF BAR above 4 GiB is mapped at its low 32 bits, i.e. not at all:
//! the VF driver then reads zeros ("PF still in reset state") and never gets
//! a link. `q35-pcihost.pci-hole64-size=0` leaves the guest no 64-bit window,
//! so it places the VF BARs below 4 GiB and the VFs work.
//!
//!     cargo nextest run --test sriov --run-ignored only

mod common;

use common::guest::{stage_program, Guest, GuestConfig};
use common::netns::Netns;
use common::wire::WirePeer;
use common::{secs, unique_name, TempDir};
use std::path::Path;

const PF: &str = "eth0";
const VF_MAC: &str = "52:54:00:6d:90:02";
const VF_MAC_BYTES: [u8; 6] = [0x52, 0x54, 0x00, 0x6d, 0x90, 0x02];
const VLAN: u16 = 42;
const PEER_IP: [u8; 4] = [10, 77, 0, 1];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x01];
const CTR_IP: &str = "10.77.0.2";
const NAME: &str = "vfxsr0";
const FRAMES: u32 = 1000;

/// Runs `vfrelay ARGS` in the guest and returns (status, output).
fn vfrelay(g: &mut Guest, args: &str) -> (i32, String) {
    g.run_timeout(&format!("vfrelay {args} 2>&1"), secs(120))
}

/// `vfrelay vduse` with `backend` must fail at once with exactly `want`.
fn backend_error(g: &mut Guest, backend: &str, want: &str) {
    let (st, out) = vfrelay(
        g,
        &format!("vduse --name vfxerr --attach virtio-vdpa --mac {VF_MAC} --backend {backend}"),
    );
    assert_eq!(st, 1, "`--backend {backend}` should fail (exit 1):\n{out}");
    assert!(
        out.lines().any(|l| l.trim() == format!("vfrelay: {want}")),
        "`--backend {backend}`:\n  want: vfrelay: {want}\n  got:  {out}"
    );
}

fn cli_error(g: &mut Guest, args: &str, want: &str) {
    let (st, out) = vfrelay(g, args);
    assert_ne!(st, 0, "`vfrelay {args}` should fail:\n{out}");
    assert!(
        out.lines().any(|l| l.trim() == format!("vfrelay: {want}")),
        "`vfrelay {args}`:\n  want: vfrelay: {want}\n  got:  {out}"
    );
}

fn vf_pci(g: &mut Guest, index: u32) -> String {
    g.ok(&format!(
        "basename $(readlink /sys/class/net/{PF}/device/virtfn{index})"
    ))
    .trim()
    .to_string()
}

#[test]
#[ignore = "needs root and QEMU"]
fn sriov_vf_management_and_vf_port() {
    assert!(
        common::is_root(),
        "the SR-IOV test needs root (QEMU, netns)"
    );
    let wire = Netns::new();
    let tap = unique_name("w");
    let share = TempDir::new();
    stage_program(
        share.path(),
        Path::new(common::vfrelay::bin()),
        "/bin/vfrelay",
    );
    // iproute2 under its own name in its own directory: it picks its mode
    // from argv[0], and busybox owns /bin/ip.
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("iproute2 ip");
    stage_program(share.path(), Path::new(ip), "/opt/iproute2/ip");

    let mut cfg = GuestConfig {
        // An emulated IOMMU (passthrough for the kernel's own DMA): vfio-pci
        // binds only to devices in an IOMMU group, and Debian's kernel has
        // no VFIO no-IOMMU mode.
        append:
            "intel_iommu=on iommu=pt vfx.modules=igb,igbvf,vdpa,vduse,virtio_vdpa,9p,9pnet_virtio"
                .into(),
        netns: Some(wire.name().to_string()),
        ..Default::default()
    };
    cfg.mem_mb = 768;
    cfg.qemu_args = vec![
        "-device".into(),
        "intel-iommu,intremap=off".into(),
        "-global".into(),
        "q35-pcihost.pci-hole64-size=0".into(),
        "-netdev".into(),
        format!("tap,id=wire,ifname={tap},script=no,downscript=no,vhost=off"),
        "-device".into(),
        "igb,netdev=wire,mac=52:54:00:aa:00:01".into(),
    ];
    let cfg = cfg.share(share.path());
    let mut g = Guest::boot(&cfg);
    g.install_share();
    let drv = g.ok(&format!(
        "basename $(readlink /sys/class/net/{PF}/device/driver)"
    ));
    assert_eq!(drv.trim(), "igb", "{PF} is not the igb PF");
    wire.ip(&["link", "set", &tap, "up"]);
    let peer = WirePeer::start(wire.name(), &tap, PEER_IP, PEER_MAC, VLAN);
    g.ok(&format!("ip link set {PF} up"));

    // --- errors before any VF exists ---
    backend_error(
        &mut g,
        "vf,pf=eth9,index=0",
        "vf backend: no such PF 'eth9'",
    );
    backend_error(
        &mut g,
        "vf,pf=lo,index=0",
        "vf backend: 'lo' is not an SR-IOV PF (no sriov_totalvfs)",
    );
    cli_error(
        &mut g,
        &format!("vf create --pf {PF} --count 8"),
        "eth0 supports at most 7 VFs, not 8",
    );

    // --- 1. create, list, config ---
    let (st, out) = vfrelay(&mut g, &format!("vf create --pf {PF} --count 2"));
    assert_eq!(st, 0, "vf create 2:\n{out}");
    backend_error(
        &mut g,
        "vf,pf=eth0,index=3",
        "vf backend: VF 3 of eth0 is not enabled (eth0 has 2 VFs; run 'vfrelay vf create --pf eth0 --count 4')",
    );
    let (st, out) = vfrelay(&mut g, &format!("vf create --pf {PF} --count 7"));
    assert_eq!(st, 0, "vf create 7:\n{out}");
    let n = g.ok(&format!("ls -d /sys/class/net/{PF}/device/virtfn* | wc -l"));
    assert_eq!(n.trim(), "7", "VFs after create --count 7");
    g.wait_until(
        &format!("[ $(ls /sys/class/net/{PF}/device/virtfn*/net | grep -c '^eth') = 7 ]"),
        "7 igbvf netdevs",
        60,
    );
    let json = g.ok("vfrelay vf list --json");
    eprintln!("vf list --json:\n{json}");
    assert!(json.contains(&format!("\"name\":\"{PF}\"")), "{json}");
    assert!(json.contains("\"total_vfs\":7"), "{json}");
    assert!(json.contains("\"num_vfs\":7"), "{json}");
    for i in 0..7 {
        let pci = vf_pci(&mut g, i);
        assert!(
            json.contains(&format!("\"index\":{i},\"pci\":\"{pci}\"")),
            "VF {i} ({pci}) missing in:\n{json}"
        );
    }
    cli_error(
        &mut g,
        &format!("vf config --pf {PF} --index 7 --mac {VF_MAC}"),
        "VF 7 of eth0 does not exist (eth0 supports 7 VFs: 0 to 6)",
    );
    let (st, out) = vfrelay(
        &mut g,
        &format!("vf config --pf {PF} --index 0 --mac {VF_MAC} --vlan {VLAN}"),
    );
    assert_eq!(st, 0, "vf config:\n{out}");
    let link = g.ok(&format!("/opt/iproute2/ip link show {PF}"));
    let vf0 = link
        .lines()
        .find(|l| l.trim_start().starts_with("vf 0 "))
        .unwrap_or_else(|| panic!("no vf 0 in:\n{link}"));
    assert!(
        vf0.contains(&format!("link/ether {VF_MAC}")) && vf0.contains(&format!("vlan {VLAN}")),
        "ip link show disagrees: {vf0}"
    );
    let table = g.ok(&format!("vfrelay vf list --pf {PF}"));
    eprintln!("vf list:\n{table}");
    assert!(table.contains(VF_MAC), "{table}");

    // --- 3. errors that need VFs ---
    let pci6 = vf_pci(&mut g, 6);
    g.ok("modprobe vfio_pci");
    g.ok(&format!(
        "echo vfio-pci > /sys/bus/pci/devices/{pci6}/driver_override && echo {pci6} > /sys/bus/pci/devices/{pci6}/driver/unbind && echo {pci6} > /sys/bus/pci/drivers_probe"
    ));
    let (_, drv6) = g.run(&format!("readlink /sys/bus/pci/devices/{pci6}/driver"));
    assert!(
        drv6.trim().ends_with("/vfio-pci"),
        "VF 6 not on vfio-pci: {drv6}\n{}",
        g.run("dmesg | tail -n 15").1
    );
    backend_error(
        &mut g,
        "vf,pf=eth0,index=6",
        &format!("vf backend: VF 6 of eth0 ({pci6}) is bound to vfio-pci, not a network driver; bind it to its VF driver"),
    );
    let pci5 = vf_pci(&mut g, 5);
    g.ok(&format!(
        "echo {pci5} > /sys/bus/pci/devices/{pci5}/driver/unbind"
    ));
    backend_error(
        &mut g,
        "vf,pf=eth0,index=5",
        &format!("vf backend: VF 5 of eth0 ({pci5}) has no driver bound; bind it to its VF driver"),
    );

    // --- 2. a VDUSE port on VF 0 ---
    g.ok("unshare -n sleep 100000 & echo $! > /tmp/ctr.pid; sleep 0.3; ctr=$(cat /tmp/ctr.pid)");
    let ifname = g.start_vduse_netdev(
        NAME,
        &format!("--mac {VF_MAC} --backend vf,pf={PF},index=0,vlan={VLAN}"),
        90,
    );
    let vfdev = g
        .ok(&format!("ls /sys/class/net/{PF}/device/virtfn0/net/"))
        .trim()
        .to_string();
    let vfmac = g.ok(&format!("cat /sys/class/net/{vfdev}/address"));
    assert_eq!(vfmac.trim(), VF_MAC, "VF netdev {vfdev} MAC");
    g.ok(&format!(
        "ip link set {ifname} netns $ctr && nsenter -t $ctr -n sh -c 'ip link set lo up; ip addr add {CTR_IP}/24 dev {ifname}; ip link set {ifname} up'"
    ));
    let peer_ip = "10.77.0.1";
    let (st, out) = g.retry(
        &format!("nsenter -t $ctr -n ping -c 1 -W 2 {peer_ip}"),
        secs(90),
    );
    assert_eq!(
        st,
        0,
        "container cannot reach the wire peer:\n{out}\npeer saw:\n{}\n--- vfrelay log ---\n{}",
        peer.seen(),
        g.run("cat /tmp/vf.log").1
    );
    let (st, out) = g.run(&format!(
        "nsenter -t $ctr -n ping -c 5 -i 0.3 -W 3 -s 1000 {peer_ip}"
    ));
    assert!(
        st == 0 && out.contains("5 packets received"),
        "ping 1000 B:\n{out}"
    );

    // Container -> wire: UDP, counted by the peer.
    let out = g.run_timeout(
        &format!("nsenter -t $ctr -n udpburst send {peer_ip} 5000 {FRAMES} 512"),
        secs(300),
    );
    assert!(out.1.contains(&format!("sent {FRAMES}")), "{}", out.1);
    assert!(
        common::wait_until(secs(20), || peer.seen().udp_unique(5000) == FRAMES as usize),
        "peer got {} of {FRAMES} datagrams\n{}",
        peer.seen().udp_unique(5000),
        peer.seen()
    );

    // Wire -> container: UDP sent by the peer, counted in the container.
    g.udp_recv_start("ctr", 5001, FRAMES, 15);
    peer.send_udp(VF_MAC_BYTES, [10, 77, 0, 2], 5001, FRAMES, 512);
    g.udp_recv_finish(FRAMES, "wire -> container UDP");

    let seen = peer.seen();
    eprintln!("wire peer saw:\n{seen}");
    assert!(
        seen.from(VF_MAC_BYTES, Some(VLAN)) >= FRAMES as u64,
        "frames from {VF_MAC} on VLAN {VLAN}: {}",
        seen.from(VF_MAC_BYTES, Some(VLAN))
    );
    assert_eq!(
        seen.from(VF_MAC_BYTES, None),
        0,
        "untagged frames from {VF_MAC} left the NIC"
    );
    let stats = g.ok(&format!(
        "cat /sys/class/net/{vfdev}/statistics/tx_packets /sys/class/net/{vfdev}/statistics/rx_packets"
    ));
    eprintln!(
        "VF netdev {vfdev} tx/rx packets: {}",
        stats.replace('\n', " ")
    );

    g.ok("kill -TERM $(cat /tmp/vf.pid)");
    g.run_timeout("wait $(cat /tmp/vf.pid)", secs(60));
    let log = g.ok("cat /tmp/vf.log");
    eprintln!("--- vfrelay log ---\n{log}");
    assert!(log.contains("destroyed VDUSE device"), "{log}");
}
