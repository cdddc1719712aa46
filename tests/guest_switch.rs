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
//! Needs root, QEMU and the guest from scripts/build-guest.sh.
//!
//!     cargo nextest run --test guest_switch --run-ignored only

mod common;

use common::guest::{ping_both_ways, Guest, GuestConfig, DEFAULT_MAC};
use common::netns::{Netns, Veth};
use common::udp;
use common::vfrelay::Vfrelay;
use common::{secs, TempDir};
use std::path::Path;
use std::time::Instant;

const DATAGRAMS: u64 = 10_000;

fn guest_config(sock: &Path, ip: &str, mac: &str) -> GuestConfig {
    let mut cfg = GuestConfig::vhost_user(sock, 1).ip(&format!("{ip}/24"));
    cfg.nets[0].1 = mac.to_string();
    cfg
}

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
        .map(|i| Guest::boot(&guest_config(&socks[i], ips[i], macs[i])))
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
