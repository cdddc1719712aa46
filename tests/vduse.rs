//! Tier 4: the VDUSE frontend inside the QEMU (TCG) test guest, whose
//! Debian 6.12 kernel has vdpa, vduse, virtio_vdpa and vhost_vdpa.
//!
//! The vfrelay binary under test (and the shared libraries it links) reach
//! the guest over a read-only 9p share. One guest runs all three parts:
//!
//! 1. `--attach virtio-vdpa` with the af-xdp backend on a guest veth: the
//!    virtio-net netdev moves into a network namespace (the "container"),
//!    pings the veth peer in another namespace both ways (56 and 1472-byte
//!    payloads), and 10,000 UDP datagrams cross each way, none lost.
//! 2. SIGKILL, and the same command again: it takes the device over at
//!    once (the netdev stays where it is, in the container), traffic flows
//!    both ways; a third vfrelay for the same name is refused while the
//!    second serves it, and so is one finding a device without vfrelay's
//!    record of it; after another SIGKILL, the command with another MAC
//!    destroys and recreates the device.
//! 3. SIGTERM: the netdev and /dev/vduse/NAME are gone, and
//! 4. a second vfrelay with the same name starts at once, `--attach
//!    vhost-vdpa`: /dev/vhost-vdpa-N appears and vdpa_probe (a static C
//!    tool in the guest image) reads device id, features and the MAC
//!    through the vhost-vdpa ioctls; vdpa_drive, a userspace driver that
//!    picks every IOVA and permission as a guest behind a vIOMMU does,
//!    gets its frame echoed into a write-only RX buffer (and again from a
//!    buffer mapped while the device runs), has an RX buffer in read-only
//!    memory refused and left untouched, and a TX buffer in a page past
//!    its file's end (SIGBUS to touch) refused, vfrelay alive after each.
//!
//!     cargo nextest run --test vduse --run-ignored only

mod common;

use common::guest::{Guest, GuestConfig};
use common::{secs, TempDir};
use std::path::Path;

const NAME: &str = "vfxvd0";
const MAC1: &str = "52:54:00:a1:b2:01";
const MAC2: &str = "52:54:00:a1:b2:02";
const CTR_IP: &str = "10.66.0.2";
const PEER_IP: &str = "10.66.0.1";
const FRAMES: u32 = 10_000;

fn require_root() {
    assert!(common::is_root(), "the VDUSE test needs root (QEMU, 9p)");
}

fn udp_across(guest: &mut Guest, from_ns: &str, to_ns: &str, to_ip: &str, label: &str) {
    udp_n(guest, from_ns, to_ns, to_ip, label, FRAMES);
}

fn udp_n(guest: &mut Guest, from_ns: &str, to_ns: &str, to_ip: &str, label: &str, frames: u32) {
    guest.udp_recv_start(to_ns, 5000, frames, 10);
    let out = guest.run_timeout(
        &format!("nsenter -t ${from_ns} -n udpburst send {to_ip} 5000 {frames} 512"),
        secs(300),
    );
    assert_eq!(out.0, 0, "{label}: sender failed:\n{}", out.1);
    assert!(
        out.1.contains(&format!("sent {frames}")),
        "{label}: {}",
        out.1
    );
    let got = guest.udp_recv_finish(frames, label);
    eprintln!("{label}: {}", got.trim());
}

/// SIGKILL the vfrelay in /tmp/vf.pid and reap it.
fn kill9(g: &mut Guest) {
    g.ok("kill -KILL $(cat /tmp/vf.pid)");
    g.run_timeout("wait $(cat /tmp/vf.pid)", secs(60));
}

fn ping(guest: &mut Guest, ns: &str, ip: &str, size: u32, label: &str) {
    let (st, out) = guest.run(&format!(
        "nsenter -t ${ns} -n ping -c 3 -i 0.3 -W 3 -s {size} {ip}"
    ));
    assert!(
        st == 0 && out.contains("3 packets received"),
        "{label}, {size} bytes:\n{out}\n--- vfrelay log ---\n{}",
        guest.run("cat /tmp/vf.log").1
    );
}

#[test]
#[ignore = "needs root and QEMU"]
fn vduse_virtio_vdpa_vhost_vdpa_and_teardown() {
    require_root();
    let share = TempDir::new();
    common::guest::stage_program(
        share.path(),
        Path::new(common::vfrelay::bin()),
        "/bin/vfrelay",
    );
    let mut cfg = GuestConfig {
        append: "vfx.modules=vdpa,vduse,virtio_vdpa,vhost_vdpa,veth,9p,9pnet_virtio".into(),
        ..Default::default()
    };
    cfg.mem_mb = 768;
    let cfg = cfg.share(share.path());
    let mut g = Guest::boot(&cfg);
    g.install_share();
    g.ok(
        "ls /dev/vduse/control /sys/bus/vdpa/drivers/virtio_vdpa /sys/bus/vdpa/drivers/vhost_vdpa",
    );

    // Namespaces: "ctr" gets the VDUSE netdev, "peer" the far end of a veth
    // whose near end (vxa) is vfrelay's af-xdp backend.
    g.ok("unshare -n sleep 100000 & echo $! > /tmp/ctr.pid; unshare -n sleep 100000 & echo $! > /tmp/peer.pid; sleep 0.3; ctr=$(cat /tmp/ctr.pid); peer=$(cat /tmp/peer.pid)");
    // busybox `ip` ignores "peer name": rename the kernel-named peer.
    g.ok("ip link add vxa type veth && p=$(ls /sys/class/net | grep '^veth' | head -n1) && ip link set $p name vxb");
    g.ok(&format!(
        "echo 1 > /proc/sys/net/ipv6/conf/vxa/disable_ipv6; ip link set vxa up; ip link set vxb netns $peer && nsenter -t $peer -n sh -c 'ip link set lo up; ip addr add {PEER_IP}/24 dev vxb; ip link set vxb up'"
    ));

    // --- 1. virtio-vdpa ---
    let ifname = g.start_vduse_netdev(
        NAME,
        &format!("--mac {MAC1} --backend af-xdp,ifname=vxa"),
        60,
    );
    let mac = g.ok(&format!("cat /sys/class/net/{ifname}/address"));
    assert!(mac.contains(MAC1), "netdev MAC {mac}, want {MAC1}");
    g.ok(&format!(
        "ip link set {ifname} netns $ctr && nsenter -t $ctr -n sh -c 'ip link set lo up; ip addr add {CTR_IP}/24 dev {ifname}; ip link set {ifname} up'"
    ));
    // First contact waits for link and ARP.
    let (st, out) = g.retry(
        &format!("nsenter -t $ctr -n ping -c 1 -W 2 {PEER_IP}"),
        secs(60),
    );
    assert_eq!(
        st,
        0,
        "container cannot reach the peer:\n{out}\n--- vfrelay log ---\n{}",
        g.run("cat /tmp/vf.log").1
    );
    for size in [56, 1472] {
        ping(&mut g, "ctr", PEER_IP, size, "container -> peer");
        ping(&mut g, "peer", CTR_IP, size, "peer -> container");
    }
    udp_across(&mut g, "peer", "ctr", CTR_IP, "peer -> container UDP");
    udp_across(&mut g, "ctr", "peer", PEER_IP, "container -> peer UDP");

    // The bounce buffer is ours (VDUSE_IOTLB_REG_UMEM), found when the
    // first buffer in it missed.
    let log = g.ok("cat /tmp/vf.log");
    assert!(
        log.contains("served from vfrelay's memory") && log.contains("found on a miss"),
        "{log}"
    );

    // --- 2. SIGKILL, and the same command again ---
    let cmd = format!(
        "RUST_LOG=debug vfrelay vduse --name {NAME} --attach virtio-vdpa --mac {MAC1} --backend af-xdp,ifname=vxa"
    );
    kill9(&mut g);
    g.ok(&format!("cat /run/vfrelay/vduse/{NAME}"));
    g.ok(&format!("{cmd} > /tmp/vf.log 2>&1 & echo $! > /tmp/vf.pid"));
    g.wait_until("grep -q 'took over' /tmp/vf.log", "take-over", 30);
    // The driver never noticed: the netdev is the one in the container.
    let links = g.ok("nsenter -t $ctr -n ip -o link");
    assert!(links.contains(&ifname), "netdev {ifname} gone:\n{links}");
    let (st, out) = g.retry(
        &format!("nsenter -t $ctr -n ping -c 1 -W 1 {PEER_IP}"),
        secs(5),
    );
    assert_eq!(
        st,
        0,
        "no traffic after the take-over:\n{out}\n--- vfrelay log ---\n{}",
        g.run("cat /tmp/vf.log").1
    );
    ping(
        &mut g,
        "peer",
        CTR_IP,
        1472,
        "peer -> container after take-over",
    );
    udp_n(
        &mut g,
        "peer",
        "ctr",
        CTR_IP,
        "peer -> container UDP after take-over",
        2000,
    );
    udp_n(
        &mut g,
        "ctr",
        "peer",
        PEER_IP,
        "container -> peer UDP after take-over",
        2000,
    );

    let log = g.ok("cat /tmp/vf.log");
    eprintln!("--- vfrelay log (take-over) ---\n{log}");
    assert!(log.contains("served from vfrelay's memory"), "{log}");

    // Served: a third vfrelay for the name is refused and leaves it alone.
    let (st, out) = g.run(&format!(
        "vfrelay vduse --name {NAME} --attach virtio-vdpa --backend loopback 2>&1"
    ));
    assert!(
        st != 0 && out.contains("served by another process"),
        "a served device taken: {st}\n{out}"
    );
    ping(
        &mut g,
        "ctr",
        PEER_IP,
        56,
        "container -> peer beside a refused vfrelay",
    );

    // Not ours: without vfrelay's record the device is left alone...
    kill9(&mut g);
    g.ok(&format!("mv /run/vfrelay/vduse/{NAME} /tmp/record"));
    let (st, out) = g.run(&format!("{cmd} 2>&1"));
    assert!(
        st != 0 && out.contains("no record of creating it"),
        "a device without a record taken: {st}\n{out}"
    );
    let links = g.ok("nsenter -t $ctr -n ip -o link");
    assert!(links.contains(&ifname), "netdev {ifname} gone:\n{links}");
    // ...and with it back, taken over again.
    g.ok(&format!("mv /tmp/record /run/vfrelay/vduse/{NAME}"));
    g.ok(&format!("{cmd} > /tmp/vf.log 2>&1 & echo $! > /tmp/vf.pid"));
    g.wait_until("grep -q 'took over' /tmp/vf.log", "second take-over", 30);
    let (st, out) = g.retry(
        &format!("nsenter -t $ctr -n ping -c 1 -W 1 {PEER_IP}"),
        secs(5),
    );
    assert_eq!(st, 0, "no traffic after the second take-over:\n{out}");

    // Other settings: the device is destroyed and made afresh.
    kill9(&mut g);
    g.ok(&format!(
        "RUST_LOG=debug vfrelay vduse --name {NAME} --attach virtio-vdpa --mac {MAC2} --backend loopback > /tmp/vf.log 2>&1 & echo $! > /tmp/vf.pid"
    ));
    g.wait_until(
        &format!("( grep -q 'attached to virtio_vdpa' /tmp/vf.log && ls /sys/bus/vdpa/devices/{NAME}/virtio*/net/ >/dev/null 2>&1 )"),
        "recreated device",
        60,
    );
    let log = g.ok("cat /tmp/vf.log");
    assert!(log.contains("created with other settings"), "{log}");
    let new_if = g
        .ok(&format!("ls /sys/bus/vdpa/devices/{NAME}/virtio*/net/"))
        .trim()
        .to_string();
    let mac = g.ok(&format!("cat /sys/class/net/{new_if}/address"));
    assert!(
        mac.contains(MAC2),
        "recreated netdev MAC {mac}, want {MAC2}"
    );

    // --- 3. SIGTERM tears everything down ---
    g.ok("kill -TERM $(cat /tmp/vf.pid)");
    g.run_timeout("wait $(cat /tmp/vf.pid)", secs(60));
    let log = g.ok("cat /tmp/vf.log");
    eprintln!("--- vfrelay log (virtio-vdpa) ---\n{log}");
    assert!(log.contains("destroyed VDUSE device"), "{log}");
    let links = g.ok("nsenter -t $ctr -n ip -o link");
    assert!(
        !links.contains(&ifname),
        "netdev {ifname} still there:\n{links}"
    );
    g.ok(&format!(
        "! ls /dev/vduse/{NAME} 2>/dev/null && ! ls /sys/bus/vdpa/devices/{NAME} 2>/dev/null && ! ls /run/vfrelay/vduse/{NAME} 2>/dev/null"
    ));

    // --- 4. the same name at once, vhost-vdpa ---
    g.ok(&format!(
        "RUST_LOG=debug vfrelay vduse --name {NAME} --attach vhost-vdpa --mac {MAC2} --backend loopback > /tmp/vf.log 2>&1 & echo $! > /tmp/vf.pid"
    ));
    g.wait_until(
        &format!("ls -d /sys/bus/vdpa/devices/{NAME}/vhost-vdpa-* >/dev/null 2>&1"),
        "vhost-vdpa device",
        60,
    );
    let vdev = g
        .ok(&format!(
            "basename $(ls -d /sys/bus/vdpa/devices/{NAME}/vhost-vdpa-*)"
        ))
        .trim()
        .to_string();
    g.wait_until(&format!("[ -c /dev/{vdev} ]"), "/dev node", 20);
    let probe = g.ok(&format!("vdpa_probe /dev/{vdev}"));
    eprintln!("vdpa_probe:\n{probe}");
    assert!(probe.contains("device_id 1\n"), "not virtio-net: {probe}");
    assert!(probe.contains(&format!("mac {MAC2}")), "MAC: {probe}");
    let feats = probe
        .lines()
        .find_map(|l| l.strip_prefix("features 0x"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no features: {probe}"));
    for (bit, what) in [
        (32, "VERSION_1"),
        (33, "ACCESS_PLATFORM"),
        (5, "MAC"),
        (3, "MTU"),
    ] {
        assert!(feats & (1 << bit) != 0, "{what} missing in {feats:#x}");
    }
    assert!(feats & (1 << 17) == 0, "CTRL_VQ offered: {feats:#x}");
    assert!(probe.contains("vring_base0 0"), "GET_VQ_STATE: {probe}");
    for (mode, want) in [
        ("wo", "rx ok 2"),
        ("ro-rx", "rx refused, memory untouched"),
        ("past-eof", "tx refused"),
    ] {
        let (st, out) = g.run_timeout(&format!("vdpa_drive /dev/{vdev} {mode}"), secs(60));
        let alive = g.run("kill -0 $(cat /tmp/vf.pid)").0 == 0;
        assert!(
            st == 0 && out.contains(want) && alive,
            "vdpa_drive {mode}: exit {st}, vfrelay alive {alive}\n{out}\n--- vfrelay log ---\n{}",
            g.run("cat /tmp/vf.log").1
        );
        eprintln!("vdpa_drive {mode}: {}", out.trim());
    }
    let log = g.ok("cat /tmp/vf.log");
    assert!(
        log.matches("stopping queue").count() >= 2,
        "refused buffers not reported:\n{log}"
    );
    g.ok("kill -TERM $(cat /tmp/vf.pid)");
    g.run_timeout("wait $(cat /tmp/vf.pid)", secs(60));
    let log = g.ok("cat /tmp/vf.log");
    eprintln!("--- vfrelay log (vhost-vdpa) ---\n{log}");
    assert!(log.contains("destroyed VDUSE device"), "{log}");
    g.ok(&format!(
        "! ls /dev/vduse/{NAME} 2>/dev/null && ! ls /dev/{vdev} 2>/dev/null"
    ));
}
