//! Tier 3, crash survival (issue 11): a QEMU (TCG) guest receives a UDP
//! stream through `vfrelay vhost-user --client` (QEMU is the socket server,
//! as OVS-DPDK deploys it), and vfrelay is killed with SIGKILL and started
//! again, over and over. After each restart traffic must come back without
//! anyone touching the guest, and the guest's checker (udpcheck) must never
//! see a corrupt, duplicated or reordered datagram: only what was in flight
//! at the crash may be lost.
//!
//! Needs root, QEMU and the guest from scripts/build-guest.sh.

mod common;

use common::guest::{Guest, GuestConfig, Net};
use common::netns::{Netns, Veth};
use common::udp::{read_stats, rx_grows, start_checker, stat, summary, Sender};
use common::vfrelay::Vfrelay;
use common::{secs, TempDir};
use std::path::Path;
use std::time::{Duration, Instant};

const GUEST_IP: &str = "10.77.30.2";
const PEER_IP: &str = "10.77.30.1";
const PORT: u16 = 5556;
const KILLS: usize = 20;

/// `vfrelay vhost-user --client` on QEMU's socket, AF_XDP on `ifname`.
fn start(sock: &Path, ifname: &str) -> Vfrelay {
    let backend = format!("af-xdp,ifname={ifname}");
    Vfrelay::spawn(
        None,
        &[
            "vhost-user",
            "--socket",
            sock.to_str().unwrap(),
            "--client",
            "--backend",
            &backend,
        ],
    )
}

#[test]
#[ignore = "needs root and QEMU"]
fn sigkill_of_vfrelay_under_a_receiving_guest_loses_only_what_was_in_flight() {
    assert!(common::is_root(), "needs root (namespaces, veths, QEMU)");
    let ns = Netns::new();
    let veth = Veth::new();
    veth.peer_for_af_xdp(&ns, &format!("{PEER_IP}/24"));
    let dir = TempDir::new();
    let sock = dir.join("qemu.sock");

    let mut vf = start(&sock, &veth.host);
    let mut cfg = GuestConfig::vhost_user(&sock, 1).ip(&format!("{GUEST_IP}/24"));
    if let Net::VhostUser { server, .. } = &mut cfg.nets[0].0 {
        *server = true;
    }
    let mut guest = Guest::boot(&cfg);
    start_checker(&mut guest, PORT);
    let (st, out) = guest.retry(&format!("ping -c 1 -W 2 {PEER_IP}"), secs(30));
    assert_eq!(st, 0, "guest cannot reach {PEER_IP}:\n{out}");
    let sender = Sender::start(
        &ns,
        &[
            "--dst".into(),
            GUEST_IP.into(),
            "--port".into(),
            PORT.to_string(),
            "--rate".into(),
            "2000".into(),
            "--duration".into(),
            "600".into(),
        ],
    );
    assert_eq!(
        rx_grows(&mut guest, 0, secs(20)),
        Some(true),
        "the guest receives nothing\n{}",
        vf.log_text()
    );

    let mut resumed = Vec::new();
    for round in 1..=KILLS {
        vf.kill();
        // What the guest still had queued is counted before the clock
        // starts: two equal readings in a row.
        let received = |g: &mut Guest| stat(&read_stats(g).expect("checker stats"), "received");
        let mut before = received(&mut guest);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = received(&mut guest);
            if now == before {
                break;
            }
            before = now;
        }
        let t = Instant::now();
        vf = start(&sock, &veth.host);
        let back = rx_grows(&mut guest, before, secs(20));
        let took = t.elapsed();
        assert_eq!(
            back,
            Some(true),
            "round {round}: traffic did not come back after the restart\n{}",
            vf.log_text()
        );
        eprintln!(
            "round {round}: traffic back {:.2} s after the restart",
            took.as_secs_f64()
        );
        // An upper bound (it includes the console reads): within 1 s.
        assert!(took <= secs(1), "round {round}: back only after {took:?}");
        resumed.push(took);
    }
    std::thread::sleep(Duration::from_secs(1));
    let sent = sender.stop();
    let s = read_stats(&mut guest).expect("final checker stats");
    eprintln!("sender: {sent}\nchecker: {}", summary(&s));
    for k in [
        "corrupt",
        "duplicate",
        "out_of_order",
        "bad_size",
        "bad_magic",
        "bad_len",
        "bad_crc",
        "bad_content",
        "out_of_range",
    ] {
        assert_eq!(stat(&s, k), 0, "{k}: {}", summary(&s));
    }
    assert!(stat(&s, "received") > 0);
    resumed.sort();
    eprintln!(
        "traffic back after a restart: median {:.2} s, worst {:.2} s (upper bounds: \
         they include reading the guest's counters over its console)",
        resumed[resumed.len() / 2].as_secs_f64(),
        resumed[resumed.len() - 1].as_secs_f64()
    );
    // The guest's NIC was never reset: no transmit timeout, eth0 still up.
    let dmesg = guest.ok("dmesg");
    assert!(!dmesg.contains("NETDEV WATCHDOG"), "{dmesg}");
    let up = guest.ok("cat /sys/class/net/eth0/operstate");
    assert!(up.contains("up"), "eth0: {up}");
    guest.kill();
    let (st, log) = vf.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "vfrelay exit: {st:?}\n{log}"
    );
}
