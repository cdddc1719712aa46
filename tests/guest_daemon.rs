//! Tier 3 on `vfrelay daemon`: real QEMU (TCG) guests on ports of one
//! daemon, each port relayed to an AF_XDP socket on a veth whose other end
//! sits in a test network namespace with the guest's peer address.
//!
//! - Two guests, two ports, one event-mode worker: each guest and its peer
//!   ping each other; the worker runs both ports' queue pairs.
//! - A one-vCPU guest on a two-queue-pair port over a two-queue veth: the
//!   guest enables only min(queue pairs, vCPUs) = 1 pair, yet the veth still
//!   delivers into both AF_XDP sockets. Frames arriving on the veth's RX
//!   queue 1 (the disabled pair's socket) must still reach the guest.
//!
//! How a veth picks the RX queue: `veth_xmit` hands the skb to the other
//! end's RX queue numbered `skb->queue_mapping`, the TX queue the sending
//! end's stack chose for it (`netdev_pick_tx`). That is the socket's cached
//! queue if it has one, else XPS (`queues/tx-N/xps_cpus`: the sending CPU's
//! queue), else a hash of the flow (`skb_tx_hash`). A veth sets up no XPS,
//! so by default the flow hash decides, and pings from the same pair of
//! addresses typically all land on one queue (which one depends on the
//! hash). The test therefore sets XPS on the peer end so that every CPU
//! maps to one TX queue: everything the peer sends (our pings and UDP, its
//! ARP and echo replies from softirq) then arrives on that RX queue of the
//! host end, where the XDP program redirects it to that queue's AF_XDP
//! socket. veth's per-RX-queue counters (`ethtool -S`:
//! `rx_queue_N_xdp_packets`, counted once XDP runs on the queue) confirm it.
//!
//! Needs root, QEMU and the guest from scripts/build-guest.sh.
//!
//!     cargo nextest run --test guest_daemon --run-ignored only

mod common;

use common::guest::{guest_tool, ping_both_ways, Guest, GuestConfig, DEFAULT_MAC};
use common::netns::{nic_stat, Netns, Veth};
use common::vfrelay::Vfrelay;
use common::{secs, TempDir};
use std::collections::BTreeSet;
use std::path::Path;

fn require_root() {
    assert!(
        common::is_root(),
        "guest tests need root (network namespaces, AF_XDP, QEMU)"
    );
}

/// A guest's wire: a veth (`queues` queues per end) whose peer end is in
/// `ns` with `peer_ip`; the guest gets `guest_ip` (both in 10.77.`net`/24).
struct Link {
    ns: Netns,
    veth: Veth,
    guest_ip: String,
    peer_ip: String,
}

impl Link {
    fn new(net: u8, queues: u32) -> Link {
        let ns = Netns::new();
        let veth = Veth::with_queues(queues);
        let (guest_ip, peer_ip) = (format!("10.77.{net}.2"), format!("10.77.{net}.1"));
        veth.peer_for_af_xdp(&ns, &format!("{peer_ip}/24"));
        Link {
            ns,
            veth,
            guest_ip,
            peer_ip,
        }
    }

    /// `rx_queue_Q_xdp_packets` of the host end: frames the peer sent that
    /// arrived on RX queue `q` and went through the XDP program.
    fn rx_queue_packets(&self, q: u32) -> u64 {
        let name = format!("rx_queue_{q}_xdp_packets");
        nic_stat(&self.veth.host, &name)
            .unwrap_or_else(|| panic!("ethtool -S {} has no {name}", self.veth.host))
    }

    /// A guest config on vhost-user socket `sock` with `queues` pairs, MAC
    /// `mac` and this link's guest address.
    fn guest(&self, sock: &Path, queues: u16, mac: &str) -> GuestConfig {
        GuestConfig::vhost_user(sock, queues)
            .ip(&format!("{}/24", self.guest_ip))
            .mac(mac)
    }
}

/// `vfrelay port add NAME --vhost-user SOCK --mac MAC --backend
/// af-xdp,ifname=IFNAME extra...`.
fn add_port(d: &Vfrelay, name: &str, sock: &Path, mac: &str, ifname: &str, extra: &[&str]) {
    let backend = format!("af-xdp,ifname={ifname}");
    let mut args = vec![
        "port",
        "add",
        name,
        "--vhost-user",
        sock.to_str().unwrap(),
        "--mac",
        mac,
        "--backend",
        &backend,
    ];
    args.extend_from_slice(extra);
    let out = d.ctl_ok(&args);
    assert_eq!(out.trim(), format!("port {name} added"), "port add stdout");
}

fn stop_daemon(d: Vfrelay) {
    let (st, log) = d.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "daemon exit on SIGTERM: {st:?}\n{log}"
    );
}

#[test]
#[ignore = "needs root and QEMU"]
fn two_guests_on_one_daemon_each_ping_their_peer() {
    require_root();
    let links = [Link::new(30, 1), Link::new(31, 1)];
    let names = ["a", "b"];
    let macs = [DEFAULT_MAC, "52:54:00:12:34:57"];
    let dir = TempDir::new();
    let socks = [dir.join("a.sock"), dir.join("b.sock")];
    let mut d = Vfrelay::daemon(&dir.join("control.sock"), &["--workers", "0"]);
    for i in 0..2 {
        add_port(&d, names[i], &socks[i], macs[i], &links[i].veth.host, &[]);
    }
    // One after the other: two TCG guests booting at once on two shared
    // cores only make each other slower.
    let mut guests: Vec<Guest> = (0..2)
        .map(|i| Guest::boot(&links[i].guest(&socks[i], 1, macs[i])))
        .collect();

    let ws = d.ctl_list(&["worker", "list", "--json"], "workers");
    let held = common::vfrelay::held_by_one_worker(&ws, "event");
    let want: BTreeSet<(String, u64)> = names.iter().map(|n| (n.to_string(), 0)).collect();
    assert_eq!(held, want, "queue pairs of worker 0: {ws:?}");
    let ports = d.ctl_list(&["port", "list", "--json"], "ports");
    assert_eq!(ports.len(), 2, "{ports:?}");
    for p in &ports {
        assert_eq!(p["connected"], true, "its guest is up: {p}");
        assert_eq!(
            p["queue_pairs"],
            serde_json::json!([{"index": 0, "worker": ws[0]["id"]}]),
            "{p}"
        );
    }

    for (i, (guest, link)) in guests.iter_mut().zip(&links).enumerate() {
        eprintln!("--- guest {} on port {} ---", guest.name(), names[i]);
        ping_both_ways(guest, &link.ns, &link.guest_ip, &link.peer_ip);
    }
    for g in guests {
        g.kill();
    }
    assert!(
        d.is_running(),
        "daemon exited after its guests went away\n{}",
        d.log_text()
    );
    stop_daemon(d);
}

/// UDP datagrams in the burst through veth RX queue 1.
const UDP_FRAMES: u32 = 300;
/// Pings in the burst through veth RX queue 1.
const PINGS: u32 = 20;

#[test]
#[ignore = "needs root and QEMU"]
fn one_vcpu_guest_on_a_two_queue_af_xdp_port_pings() {
    require_root();
    let link = Link::new(32, 2);
    let (host, peer, ns) = (&link.veth.host, &link.veth.peer, &link.ns);
    let (guest_ip, peer_ip) = (link.guest_ip.as_str(), link.peer_ip.as_str());
    let dir = TempDir::new();
    let sock = dir.join("mq.sock");
    let d = Vfrelay::daemon(&dir.join("control.sock"), &[]);
    add_port(&d, "mq", &sock, DEFAULT_MAC, host, &["--queues", "2"]);
    // Two queue pairs offered (mq=on, queues=2), one vCPU (the harness's
    // -smp 1): virtio-net enables min(pairs, CPUs) = 1.
    let mut guest = Guest::boot(&link.guest(&sock, 2, DEFAULT_MAC));
    let out = guest.ok("nproc; ls /sys/class/net/eth0/queues");
    assert!(
        out.contains("rx-0") && !out.contains("rx-1") && !out.contains("tx-1"),
        "a one-vCPU guest should enable one queue pair only:\n{out}"
    );
    let ports = d.ctl_list(&["port", "list", "--json"], "ports");
    assert_eq!(ports[0]["connected"], true, "{ports:?}");
    let diag = |d: &Vfrelay| {
        format!(
            "--- daemon stats ---\n{}\n--- ethtool -S {host} ---\n{}",
            d.ctl_ok(&["stats", "--json"]),
            common::run_ok("ethtool", &["-S", host])
        )
    };

    // Queue 0, the enabled pair's: the plain pings.
    ns.xps_only(peer, 0, 2);
    let q0 = link.rx_queue_packets(0);
    ping_both_ways(&mut guest, ns, guest_ip, peer_ip);
    let via0 = link.rx_queue_packets(0) - q0;
    eprintln!("veth RX queue 0: {via0} frames from the peer");
    // 6 echo requests from the peer, 6 replies to the guest's pings.
    assert!(via0 >= 12, "pings did not come in on queue 0\n{}", diag(&d));

    // Queue 1, the disabled pair's socket: pings both ways and a UDP burst.
    ns.xps_only(peer, 1, 2);
    let q1 = link.rx_queue_packets(1);
    let out = ns.exec(
        "busybox",
        &[
            "ping",
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.05",
            "-W",
            "3",
            guest_ip,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{PINGS} packets received")),
        "peer -> guest via veth RX queue 1:\n{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        diag(&d)
    );
    let (st, out) = guest.run(&format!("ping -c 3 -i 0.2 -W 3 {peer_ip}"));
    assert!(
        st == 0 && out.contains("3 packets received"),
        "guest -> peer, replies via veth RX queue 1:\n{out}\n{}",
        diag(&d)
    );
    guest.ok(&format!(
        "udpburst recv 5000 {UDP_FRAMES} 5 > /tmp/udp.out 2>&1 & echo $! > /tmp/udp.pid"
    ));
    guest.wait_until("grep -q listening /tmp/udp.out", "UDP receiver", 10);
    let udpburst = guest_tool("udpburst");
    let sent = ns.exec_ok(
        udpburst.to_str().unwrap(),
        &["send", guest_ip, "5000", &UDP_FRAMES.to_string(), "512"],
    );
    assert!(sent.contains(&format!("sent {UDP_FRAMES}")), "{sent}");
    guest.run_timeout("wait $(cat /tmp/udp.pid)", secs(60));
    let got = guest.ok("cat /tmp/udp.out");
    assert!(
        got.contains(&format!("unique {UDP_FRAMES}")),
        "UDP via veth RX queue 1: frames lost: {got}\n{}",
        diag(&d)
    );
    let via1 = link.rx_queue_packets(1) - q1;
    eprintln!("veth RX queue 1: {via1} frames from the peer");
    let want = (PINGS + 3 + UDP_FRAMES) as u64;
    assert!(
        via1 >= want,
        "only {via1} of at least {want} frames came in on queue 1: the test did not exercise it\n{}",
        diag(&d)
    );

    guest.kill();
    stop_daemon(d);
}
