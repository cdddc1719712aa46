//! Tier 3, the switch and live migration: a QEMU (TCG) guest moves between
//! two vfrelay daemons whose switches share an uplink segment, while a
//! second guest on the first daemon's switch keeps pinging it.
//!
//! Topology: daemon A's switch and daemon B's switch each have an AF_XDP
//! uplink on a veth; both veths' other ends are ports of one Linux bridge
//! in a test namespace (the "segment"). Guest P (the pinger) and guest G
//! start on A's switch; G migrates to a QEMU on B's switch. After the
//! switch-over G's announcement (SEND_RARP to B, or the guest's own
//! gratuitous ARP) reaches A's switch over the uplink, which relearns G's
//! MAC there at once: P's pings resume with at most a few lost.
//!
//! Needs root, QEMU and the guest from scripts/build-guest.sh.
//!
//!     cargo nextest run --test migration_switch --run-ignored only

mod common;

use common::guest::{Guest, GuestConfig, MigrateParams, DEFAULT_MAC};
use common::netns::{Netns, Veth};
use common::vfrelay::Vfrelay;
use common::{secs, TempDir};
use std::path::Path;
use std::time::{Duration, Instant};

const G_IP: &str = "10.77.43.2";
const P_IP: &str = "10.77.43.3";
const P_MAC: &str = "52:54:00:12:34:58";
/// Pings P sends every second while G migrates.
const PING_INTERVAL: &str = "0.2";
/// Lost pings allowed across the switch-over ("at most a few").
const MAX_LOST: u64 = 10;

fn add_port(d: &Vfrelay, name: &str, sock: &Path, mac: &str) {
    let out = d.ctl_ok(&[
        "port",
        "add",
        name,
        "--vhost-user",
        sock.to_str().unwrap(),
        "--mac",
        mac,
        "--backend",
        "switch,name=sw",
    ]);
    assert_eq!(out.trim(), format!("port {name} added"));
}

/// Where `mac` is learned on daemon `d`'s switch, if anywhere.
fn learned_on(d: &Vfrelay, mac: &str) -> Option<String> {
    let sw = d.ctl_list(&["switch", "list", "--json"], "switches");
    sw[0]["macs"]
        .as_array()?
        .iter()
        .find(|m| m["mac"].as_str() == Some(mac))
        .and_then(|m| m["port"].as_str().map(String::from))
}

/// (transmitted, received) from busybox ping's summary.
fn ping_summary(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((nums.next()?.parse().ok()?, nums.next()?.parse().ok()?))
}

#[test]
#[ignore = "needs root and QEMU"]
fn a_guest_migrates_between_daemons_while_another_pings_it() {
    assert!(common::is_root(), "guest tests need root");
    let ns = Netns::new();
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let wires = [Veth::new(), Veth::new()];
    for w in &wires {
        common::netns::disable_ipv6(&w.host);
        common::run_ok("ip", &["link", "set", "dev", &w.peer, "netns", ns.name()]);
        ns.ip(&["link", "set", &w.peer, "master", "br0"]);
        ns.ip(&["link", "set", &w.peer, "up"]);
        ns.exec_ok("ethtool", &["-K", &w.peer, "tx", "off"]);
        common::run_ok("ip", &["link", "set", "dev", &w.host, "up"]);
    }
    let dir = TempDir::new();
    let mut daemons: Vec<Vfrelay> = (0..2)
        .map(|i| {
            let d = Vfrelay::daemon(&dir.join(&format!("control{i}.sock")), &[]);
            let uplink = format!("af-xdp,ifname={}", wires[i].host);
            d.ctl_ok(&["switch", "add", "sw", "--uplink", &uplink]);
            d
        })
        .collect();
    let (g_a, g_b, p_sock) = (
        dir.join("g-a.sock"),
        dir.join("g-b.sock"),
        dir.join("p.sock"),
    );
    add_port(&daemons[0], "g", &g_a, DEFAULT_MAC);
    add_port(&daemons[0], "p", &p_sock, P_MAC);
    add_port(&daemons[1], "g", &g_b, DEFAULT_MAC);

    let mut g = Guest::boot(
        &GuestConfig::vhost_user(&g_a, 1)
            .ip(&format!("{}/24", G_IP))
            .mac(DEFAULT_MAC),
    );
    let mut p = Guest::boot(
        &GuestConfig::vhost_user(&p_sock, 1)
            .ip(&format!("{}/24", P_IP))
            .mac(P_MAC),
    );
    let (st, out) = p.retry(&format!("ping -c 1 -W 2 {G_IP}"), secs(30));
    assert_eq!(st, 0, "P cannot reach G before the migration:\n{out}");
    assert_eq!(learned_on(&daemons[0], DEFAULT_MAC).as_deref(), Some("g"));

    // P pings G for the whole migration.
    p.ok(&format!(
        "ping -i {PING_INTERVAL} {G_IP} > /tmp/ping.out 2>&1 & echo $! > /tmp/ping.pid"
    ));
    std::thread::sleep(Duration::from_secs(2));
    let mut dest = Guest::incoming(
        &GuestConfig::vhost_user(&g_b, 1)
            .ip(&format!("{}/24", G_IP))
            .mac(DEFAULT_MAC),
    );
    let params = MigrateParams {
        max_bandwidth: 1 << 30,
        downtime_limit_ms: 300,
        hold: Duration::ZERO,
        timeout: secs(120),
    };
    let started = Instant::now();
    let outcome = g.migrate(&mut dest, &params);
    assert!(
        outcome.completed(),
        "migration: {} ({})",
        outcome.status,
        outcome.last_query
    );
    eprintln!(
        "migration completed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    dest.take_over(&g);
    g.quit();
    let mut g = dest;

    // A's switch relearns G's MAC on the uplink from G's announcement.
    let moved = common::wait_until(secs(10), || {
        learned_on(&daemons[0], DEFAULT_MAC).as_deref() == Some("uplink")
    });
    assert!(
        moved,
        "daemon A still has G's MAC on {:?}\n{}",
        learned_on(&daemons[0], DEFAULT_MAC),
        daemons[0].ctl_ok(&["switch", "list", "--json"])
    );
    assert_eq!(learned_on(&daemons[1], DEFAULT_MAC).as_deref(), Some("g"));
    std::thread::sleep(Duration::from_secs(3));
    p.ok("kill -INT $(cat /tmp/ping.pid); sleep 1; true");
    let out = p.ok("cat /tmp/ping.out");
    let (sent, got) = ping_summary(&out).unwrap_or_else(|| panic!("ping summary:\n{out}"));
    eprintln!("P -> G across the migration: {sent} sent, {got} received");
    assert!(sent >= 20, "ping ran too briefly:\n{out}");
    assert!(
        sent - got <= MAX_LOST,
        "{} pings lost across the switch-over:\n{out}",
        sent - got
    );
    // Still both ways, G now behind B's switch.
    let out = p.ok(&format!("ping -c 3 -i 0.2 -W 3 {G_IP}"));
    assert!(out.contains("3 packets received"), "P -> G after:\n{out}");
    let out = g.ok(&format!("ping -c 3 -i 0.2 -W 3 -s 1472 {P_IP}"));
    assert!(out.contains("3 packets received"), "G -> P after:\n{out}");

    g.kill();
    p.kill();
    for d in &mut daemons {
        assert!(d.is_running(), "a daemon exited\n{}", d.log_text());
    }
    for d in daemons {
        let (st, log) = d.stop();
        assert!(st.is_some_and(|s| s.success()), "daemon exit {st:?}\n{log}");
    }
}
