//! Tier 3, the switch: two QEMU (TCG) guests on one switch of one daemon,
//! whose uplink is an AF_XDP socket on a veth with a peer in a test
//! namespace.
//!
//! - The guests ping each other (56 and 1472 bytes) and exchange 10,000
//!   UDP datagrams each way, every payload checked by udpcheck in the
//!   receiving guest (sent by `udpcheck -s` in the other).
//! - Both reach the peer behind the uplink, and it reaches them.
//! - `switch list` shows each guest's MAC on its port and the peer's on
//!   the uplink.
//!
//! And VLANs: guests on access VLANs 10 and 20 of one switch, in one IP
//! subnet, cannot reach each other; each reaches the peer of its own VLAN
//! behind the uplink, its frames tagged there (the host has no 8021q, so
//! tests/guest-tools/vlan_demux.py splits the trunk into one tap per VLAN).
//!
//! Needs root, QEMU and the guest from scripts/build-guest.sh.
//!
//!     cargo nextest run --test guest_switch --run-ignored only

mod common;

use common::guest::{ping_both_ways, Guest, GuestConfig, DEFAULT_MAC};
use common::netns::{Netns, Veth};
use common::udp;
use common::vfrelay::Vfrelay;
use common::{repo_root, run_ok, secs, wait_until, TempDir};
use serde_json::Value;
use std::io::Read;
use std::process::{Child, Stdio};
use std::time::Instant;

const DATAGRAMS: u64 = 10_000;

/// Pings `to` from `g`: 56 and 1472 bytes, three each.
fn ping(g: &mut Guest, to: &str) {
    let (st, out) = g.retry(&format!("ping -c 1 -W 2 {to}"), secs(30));
    assert_eq!(st, 0, "{}: cannot reach {to}:\n{out}", g.name());
    for size in [56, 1472] {
        let out = g.ok(&format!("ping -c 3 -i 0.2 -W 3 -s {size} {to}"));
        assert!(
            out.contains("3 packets received"),
            "{} -> {to}, {size} bytes:\n{out}",
            g.name()
        );
    }
}

/// `from` sends DATAGRAMS to `to_ip`, where `to` checks every one.
fn udp_stream(from: &mut Guest, to: &mut Guest, to_ip: &str, port: u16) {
    udp::start_checker(to, port);
    let (st, out) = from.run_timeout(
        &format!("udpcheck -s {to_ip} -p {port} -n {DATAGRAMS}"),
        secs(300),
    );
    assert!(
        st == 0 && out.contains(&format!("sent {DATAGRAMS}")),
        "{}: sending: {out}",
        from.name()
    );
    let start = Instant::now();
    let s = loop {
        let s = udp::read_stats(to).expect("the receiving guest answers");
        if udp::stat(&s, "unique") >= DATAGRAMS || start.elapsed() > secs(30) {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let label = format!("{} -> {}", from.name(), to.name());
    eprintln!("{label}: {}", udp::summary(&s));
    assert_eq!(udp::stat(&s, "unique"), DATAGRAMS, "{label}: all arrived");
    assert_eq!(udp::stat(&s, "corrupt"), 0, "{label}: payloads intact");
    assert_eq!(udp::stat(&s, "duplicate"), 0, "{label}: no duplicates");
    to.ok("kill %1 2>/dev/null; killall udpcheck; true");
}

#[test]
#[ignore = "needs root and QEMU"]
fn two_guests_on_a_switch_reach_each_other_and_the_uplink() {
    assert!(common::is_root(), "guest tests need root");
    let ns = Netns::new();
    let veth = Veth::with_queues(1);
    let peer_ip = "10.77.40.1";
    veth.peer_for_af_xdp(&ns, &format!("{peer_ip}/24"));
    let dir = TempDir::new();
    // Event mode: a busy-polling worker would take a core from the guests.
    let mut d = Vfrelay::daemon(&dir.join("control.sock"), &["--workers", "0"]);
    let uplink = format!("af-xdp,ifname={}", veth.host);
    assert_eq!(
        d.ctl_ok(&["switch", "add", "sw0", "--uplink", &uplink])
            .trim(),
        "switch sw0 added"
    );
    let names = ["a", "b"];
    let macs = [DEFAULT_MAC, "52:54:00:12:34:57"];
    let ips = ["10.77.40.2", "10.77.40.3"];
    let socks = [dir.join("a.sock"), dir.join("b.sock")];
    for i in 0..2 {
        let out = d.ctl_ok(&[
            "port",
            "add",
            names[i],
            "--vhost-user",
            socks[i].to_str().unwrap(),
            "--mac",
            macs[i],
            "--backend",
            "switch,name=sw0",
        ]);
        assert_eq!(out.trim(), format!("port {} added", names[i]));
    }
    // One after the other: two TCG guests booting at once on two shared
    // cores only make each other slower.
    let mut guests: Vec<Guest> = (0..2)
        .map(|i| {
            Guest::boot(
                &GuestConfig::vhost_user(&socks[i], 1)
                    .ip(&format!("{}/24", ips[i]))
                    .mac(macs[i]),
            )
        })
        .collect();
    let (ga, gb) = guests.split_at_mut(1);
    let (a, b) = (&mut ga[0], &mut gb[0]);

    ping(a, ips[1]);
    ping(b, ips[0]);
    ping_both_ways(a, &ns, ips[0], peer_ip);
    ping_both_ways(b, &ns, ips[1], peer_ip);
    udp_stream(a, b, ips[1], 5555);
    udp_stream(b, a, ips[0], 5556);

    let sw = d.ctl_list(&["switch", "list", "--json"], "switches");
    let macs_seen = sw[0]["macs"].as_array().expect("macs").clone();
    let port_of = |mac: &str| {
        macs_seen
            .iter()
            .find(|m| m["mac"].as_str() == Some(mac))
            .map(|m| m["port"].as_str().unwrap_or("").to_string())
    };
    for i in 0..2 {
        assert_eq!(
            port_of(macs[i]).as_deref(),
            Some(names[i]),
            "guest {i}'s MAC learned on its port: {macs_seen:?}"
        );
    }
    let peer_mac = ns
        .exec_ok("cat", &[&format!("/sys/class/net/{}/address", veth.peer)])
        .trim()
        .to_string();
    assert_eq!(
        port_of(&peer_mac).as_deref(),
        Some("uplink"),
        "the peer's MAC learned on the uplink: {macs_seen:?}"
    );

    for g in guests {
        g.kill();
    }
    assert!(
        d.is_running(),
        "daemon exited after its guests went away\n{}",
        d.log_text()
    );
    for n in names {
        d.ctl_ok(&["port", "del", n]);
    }
    d.ctl_ok(&["switch", "del", "sw0"]);
    let (st, log) = d.stop();
    assert!(st.is_some_and(|s| s.success()), "daemon exit {st:?}\n{log}");
}

/// tests/guest-tools/vlan_demux.py in a namespace: the far end of the
/// uplink's trunk, one tap per VLAN in that VLAN's namespace. SIGTERM on
/// drop (its taps go with it).
struct VlanDemux {
    child: Option<Child>,
}

impl VlanDemux {
    /// Starts it in `ns` on `wire`; each `(vid, netns, tap)` gets a tap.
    /// Returns once every tap exists.
    fn start(ns: &Netns, wire: &str, vlans: &[(u16, &Netns, &str)]) -> VlanDemux {
        let script = repo_root().join("tests/guest-tools/vlan_demux.py");
        let mut cmd = ns.command("python3");
        cmd.arg(script).args(["--wire", wire]);
        for (vid, tns, tap) in vlans {
            cmd.args(["--vlan", &format!("{vid}:{}:{tap}", tns.name())]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start vlan_demux.py");
        let mut d = VlanDemux { child: Some(child) };
        let up = wait_until(secs(10), || {
            d.exited() || vlans.iter().all(|(_, tns, tap)| tns.has_link(tap))
        });
        let exited = d.exited();
        if !up || exited {
            panic!("vlan_demux.py did not make its taps:\n{}", d.finish());
        }
        d
    }

    /// True once it has exited (or was stopped).
    fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// SIGTERM, wait, and everything it printed.
    fn finish(&mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        if !wait_until(secs(5), || matches!(child.try_wait(), Ok(Some(_)))) {
            let _ = child.kill();
        }
        let status = child.wait();
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut out);
        }
        if !status.as_ref().is_ok_and(|s| s.success()) {
            out.push_str(&format!("\n(vlan_demux.py exit: {status:?})"));
        }
        out
    }

    /// Stops it and returns its counters (see the script's header).
    fn stop(mut self) -> Value {
        let out = self.finish();
        serde_json::from_str(out.lines().next().unwrap_or(""))
            .unwrap_or_else(|e| panic!("vlan_demux.py output: {e}:\n{out}"))
    }
}

impl Drop for VlanDemux {
    fn drop(&mut self) {
        let out = self.finish();
        if std::thread::panicking() && !out.is_empty() {
            eprintln!("--- vlan_demux.py ---\n{out}");
        }
    }
}

/// Frames the demultiplexer saw on the wire from `mac`, by VLAN ID
/// (`None`: untagged).
fn wire_frames_from(stats: &Value, mac: &str) -> Vec<(Option<u64>, u64)> {
    stats["wire_rx"]
        .as_array()
        .expect("wire_rx")
        .iter()
        .filter(|e| e["src"].as_str() == Some(mac))
        .map(|e| (e["vid"].as_u64(), e["frames"].as_u64().unwrap_or(0)))
        .collect()
}

/// The MAC of `ifname` in `ns`.
fn mac_of(ns: &Netns, ifname: &str) -> String {
    ns.exec_ok("cat", &[&format!("/sys/class/net/{ifname}/address")])
        .trim()
        .to_string()
}

/// No IPv6 in `ns` (no DAD, router solicitations or MLD on the wire).
fn no_ipv6(ns: &Netns) {
    ns.exec_ok(
        "sh",
        &[
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && \
             echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        ],
    );
}

/// Issue 12: guests on VLAN 10 and VLAN 20 of one switch share an IP
/// subnet, yet only the VLAN decides who hears whom. Behind the uplink,
/// 10.77.41.1 exists twice, once per VLAN (a tap in namespace ns10, one in
/// ns20, fed by the demultiplexer): each guest must reach its own.
#[test]
#[ignore = "needs root and QEMU"]
fn vlan_ports_reach_only_their_own_vlan() {
    assert!(common::is_root(), "guest tests need root");
    let wire_ns = Netns::new();
    let ns10 = Netns::new();
    let ns20 = Netns::new();
    let veth = Veth::with_queues(1);
    common::netns::disable_ipv6(&veth.host);
    // IPv6 off first, so the taps and the moved veth end start quiet.
    for ns in [&wire_ns, &ns10, &ns20] {
        no_ipv6(ns);
    }
    run_ok(
        "ip",
        &["link", "set", "dev", &veth.peer, "netns", wire_ns.name()],
    );
    wire_ns.ip(&["link", "set", "dev", &veth.peer, "up"]);
    run_ok("ip", &["link", "set", "dev", &veth.host, "up"]);
    let demux = VlanDemux::start(
        &wire_ns,
        &veth.peer,
        &[(10, &ns10, "v10"), (20, &ns20, "v20")],
    );
    let peer_ip = "10.77.41.1";
    ns10.configure("v10", &format!("{peer_ip}/24"));
    ns20.configure("v20", &format!("{peer_ip}/24"));
    let peer_macs = [mac_of(&ns10, "v10"), mac_of(&ns20, "v20")];
    assert_ne!(peer_macs[0], peer_macs[1]);

    let dir = TempDir::new();
    let mut d = Vfrelay::daemon(&dir.join("control.sock"), &["--workers", "0"]);
    let uplink = format!("af-xdp,ifname={}", veth.host);
    assert_eq!(
        d.ctl_ok(&["switch", "add", "sw0", "--uplink", &uplink])
            .trim(),
        "switch sw0 added"
    );
    let names = ["a", "b"];
    let vlans = [10u64, 20];
    let macs = [DEFAULT_MAC, "52:54:00:12:34:57"];
    let ips = ["10.77.41.2", "10.77.41.3"];
    let socks = [dir.join("a.sock"), dir.join("b.sock")];
    for i in 0..2 {
        let out = d.ctl_ok(&[
            "port",
            "add",
            names[i],
            "--vhost-user",
            socks[i].to_str().unwrap(),
            "--mac",
            macs[i],
            "--backend",
            &format!("switch,name=sw0,vlan={}", vlans[i]),
        ]);
        assert_eq!(out.trim(), format!("port {} added", names[i]));
    }
    let mut guests: Vec<Guest> = (0..2)
        .map(|i| {
            Guest::boot(
                &GuestConfig::vhost_user(&socks[i], 1)
                    .ip(&format!("{}/24", ips[i]))
                    .mac(macs[i]),
            )
        })
        .collect();
    let (ga, gb) = guests.split_at_mut(1);
    let (a, b) = (&mut ga[0], &mut gb[0]);

    // Each reaches its VLAN's peer, and the peer reaches it...
    ping_both_ways(a, &ns10, ips[0], peer_ip);
    ping_both_ways(b, &ns20, ips[1], peer_ip);
    // ...and it was that VLAN's peer: the one 10.77.41.1 each guest
    // resolved is the tap of its own VLAN.
    for (g, (peer_mac, other)) in [
        (&mut *a, (&peer_macs[0], &peer_macs[1])),
        (&mut *b, (&peer_macs[1], &peer_macs[0])),
    ] {
        let arp = g.ok("cat /proc/net/arp");
        assert!(
            arp.contains(peer_mac.as_str()) && !arp.contains(other.as_str()),
            "{}: {peer_ip} should be {peer_mac}:\n{arp}",
            g.name()
        );
    }

    // Neither guest reaches the other, though they share a subnet...
    for (g, to) in [(&mut *a, ips[1]), (&mut *b, ips[0])] {
        let (st, out) = g.run(&format!("ping -c 3 -W 1 {to}"));
        assert_ne!(st, 0, "{} reached {to} across VLANs:\n{out}", g.name());
    }
    // ...nor did one ARP request get through: neither learned the other's
    // MAC (an ARP request for its address would have taught it).
    for (g, other) in [(&mut *a, macs[1]), (&mut *b, macs[0])] {
        let arp = g.ok("cat /proc/net/arp");
        assert!(
            !arp.contains(other),
            "{} heard from {other} across VLANs:\n{arp}",
            g.name()
        );
    }
    // ...nor does a VLAN's peer reach the other VLAN's guest.
    for (ns, to) in [(&ns10, ips[1]), (&ns20, ips[0])] {
        if let Ok(out) = ns.ping(to, 2, 56) {
            panic!("{} reached {to} across VLANs:\n{out}", ns.name());
        }
    }

    // The switch learned each guest, and each peer, on its own VLAN.
    let sw = d.ctl_list(&["switch", "list", "--json"], "switches");
    let macs_seen = sw[0]["macs"].as_array().expect("macs").clone();
    let learned = |mac: &str| -> Vec<(u64, String)> {
        macs_seen
            .iter()
            .filter(|m| m["mac"].as_str() == Some(mac))
            .map(|m| {
                (
                    m["vlan"].as_u64().unwrap_or(u64::MAX),
                    m["port"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    for i in 0..2 {
        assert_eq!(
            learned(macs[i]),
            [(vlans[i], names[i].to_string())],
            "guest {i}'s MAC learned on its port and VLAN only: {macs_seen:?}"
        );
        assert_eq!(
            learned(&peer_macs[i]),
            [(vlans[i], "uplink".to_string())],
            "VLAN {}'s peer learned on the uplink: {macs_seen:?}",
            vlans[i]
        );
    }

    // On the wire, each guest's frames carried its VLAN's tag, never
    // another, never none.
    let stats = demux.stop();
    eprintln!("vlan_demux.py: {stats}");
    for i in 0..2 {
        let seen = wire_frames_from(&stats, macs[i]);
        assert!(
            !seen.is_empty() && seen.iter().all(|(vid, n)| *vid == Some(vlans[i]) && *n > 0),
            "guest {i} on the wire: {seen:?} (want VID {} only)\n{stats}",
            vlans[i]
        );
    }
    for v in ["10", "20"] {
        assert!(
            stats["to_tap"][v].as_u64() > Some(0) && stats["from_tap"][v].as_u64() > Some(0),
            "VLAN {v} carried both ways: {stats}"
        );
    }

    for g in guests {
        g.kill();
    }
    assert!(
        d.is_running(),
        "daemon exited after its guests went away\n{}",
        d.log_text()
    );
    for n in names {
        d.ctl_ok(&["port", "del", n]);
    }
    d.ctl_ok(&["switch", "del", "sw0"]);
    let (st, log) = d.stop();
    assert!(st.is_some_and(|s| s.success()), "daemon exit {st:?}\n{log}");
}
