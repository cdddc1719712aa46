//! Tier 3, multiqueue: a QEMU guest with `-netdev vhost-user,queues=2` and
//! `mq=on` on vfrelay `--queues 2`. QEMU sends SET_VRING_ENABLE before
//! SET_FEATURES at device realize; vfrelay's control-socket relay must keep
//! the connection alive, and both queue pairs must then carry traffic.
//!
//! The backend is loopback: every frame the guest sends comes back on the
//! same queue pair with MACs swapped. The guest pings a made-up address
//! whose (static) neighbour entry points at a made-up MAC; XPS steers all of
//! the guest's transmit to one queue at a time. vfrelay logs per-queue-pair
//! counters each time the front end disconnects, which is what is checked.
//!
//! Needs root, QEMU and the guest from scripts/build-guest.sh.
//!
//!     cargo test --test guest_mq -- --ignored

mod common;

use common::guest::{Guest, GuestConfig, Net};
use common::vfrelay::Vfrelay;
use common::{secs, wait_until, TempDir};

const GUEST_IP: &str = "10.77.9.2";
const FAKE_IP: &str = "10.77.9.9";
const FAKE_MAC: &str = "02:00:00:77:09:09";

fn require_root() {
    assert!(
        common::is_root(),
        "guest tests need root (QEMU, vfrelay sockets)"
    );
}

/// (tx_frames, rx_frames) of queue pair `qp` from the last stats line.
fn last_stats(log: &str, qp: usize) -> Option<(u64, u64)> {
    let prefix = format!("queue pair {qp} stats: ");
    let line = log.lines().rev().find_map(|l| {
        let i = l.find(&prefix)?;
        Some(&l[i + prefix.len()..])
    })?;
    let field = |name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some((field("tx_frames")?, field("rx_frames")?))
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

/// Sends `n` pings through TX queue `q` only (XPS maps every CPU to it).
fn pings_on_queue(guest: &mut Guest, q: usize, n: u32) {
    let other = 1 - q;
    guest.ok(&format!(
        "echo 0 > /sys/class/net/eth0/queues/tx-{other}/xps_cpus && \
         echo 3 > /sys/class/net/eth0/queues/tx-{q}/xps_cpus"
    ));
    // Nobody answers (the echo is addressed to FAKE_IP): ping fails, the
    // frames still went out and came back.
    guest.run(&format!("ping -c {n} -i 0.2 -W 1 {FAKE_IP} >/dev/null"));
}

/// One guest lifetime on `cfg`: both queue pairs active, `n0` frames sent on
/// queue pair 0 and `n1` on queue pair 1; checks vfrelay's counters once
/// QEMU is gone. `before` are the counters before this guest.
fn boot_and_check(
    vf: &mut Vfrelay,
    cfg: &GuestConfig,
    round: usize,
    before: [(u64, u64); 2],
) -> [(u64, u64); 2] {
    let mut guest = Guest::boot(cfg);
    assert!(
        vf.is_running() && !vf.log().contains("connection ended"),
        "vfrelay lost QEMU while it set up the device\n{}",
        vf.log_text()
    );
    let out = guest.ok("nproc; ls /sys/class/net/eth0/queues");
    assert!(
        out.contains("tx-1") && out.contains("rx-1"),
        "guest did not bring up the second queue pair:\n{out}"
    );
    // Keep the link quiet so the counters mostly count our pings.
    guest.run("echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6");
    // busybox `ip` has no `neigh add`; `arp -s` makes a permanent entry.
    guest.ok(&format!("arp -i eth0 -s {FAKE_IP} {FAKE_MAC}"));
    let (n0, n1) = (10u64, 25u64);
    pings_on_queue(&mut guest, 1, n1 as u32);
    pings_on_queue(&mut guest, 0, n0 as u32);
    // The echoes reached the guest's stack, not just its rings.
    let rx = guest.ok("cat /sys/class/net/eth0/statistics/rx_packets");
    eprintln!("guest eth0 rx_packets: {}", rx.trim());
    let rx: u64 = rx.trim().parse().unwrap_or(0);
    assert!(rx >= n0 + n1, "guest eth0 received {rx} packets");
    guest.kill();

    let ok = wait_until(secs(10), || {
        count(&vf.log(), "front end disconnected") >= round
            && count(&vf.log(), "queue pair 1 stats") >= round
    });
    let log = vf.log();
    assert!(ok, "vfrelay did not log the disconnect\n{}", vf.log_text());
    assert!(
        !log.contains("inactive feature") && !log.contains("connection ended"),
        "the connection failed\n{}",
        vf.log_text()
    );
    let mut now = [(0, 0); 2];
    for (qp, want) in [(0, n0), (1, n1)] {
        let (tx, rx) = last_stats(&log, qp).expect("stats line");
        let (tx0, rx0) = before[qp];
        eprintln!(
            "boot {round}: queue pair {qp}: tx_frames +{} rx_frames +{}",
            tx - tx0,
            rx - rx0
        );
        assert!(
            tx - tx0 >= want && rx - rx0 >= want,
            "queue pair {qp}: expected >= {want} frames each way, got tx +{} rx +{}\n{}",
            tx - tx0,
            rx - rx0,
            vf.log_text()
        );
        now[qp] = (tx, rx);
    }
    now
}

fn mq_config(net: Net) -> GuestConfig {
    let mut cfg =
        GuestConfig::vhost_user(std::path::Path::new("unused"), 2).ip(&format!("{GUEST_IP}/24"));
    cfg.nets[0].0 = net;
    // virtio-net uses min(queue pairs, CPUs) by default; the later -smp
    // overrides the harness's -smp 1.
    cfg.qemu_args = vec!["-smp".into(), "2".into()];
    cfg
}

/// Server mode (QEMU connects), two guests in a row on one vfrelay.
#[test]
#[ignore = "needs root and QEMU"]
fn two_queue_pairs_carry_traffic_server_mode() {
    require_root();
    let dir = TempDir::new();
    let sock = dir.join("vhost.sock");
    let mut vf = Vfrelay::vhost_user(None, &sock, "loopback", &["--queues", "2"]);
    let cfg = mq_config(Net::VhostUser {
        socket: sock.clone(),
        queues: 2,
        server: false,
    });
    let mut counters = [(0, 0); 2];
    for round in 1..=2 {
        eprintln!("--- boot {round} ---");
        counters = boot_and_check(&mut vf, &cfg, round, counters);
        vf.wait_for_socket(&sock, secs(10));
    }
    let (st, log) = vf.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "vfrelay exit on SIGTERM: {st:?}\n{log}"
    );
}

/// Client mode (`--client`, QEMU listens): vfrelay connects through the
/// same relay.
#[test]
#[ignore = "needs root and QEMU"]
fn two_queue_pairs_carry_traffic_client_mode() {
    require_root();
    let dir = TempDir::new();
    let sock = dir.join("qemu.sock");
    let cfg = mq_config(Net::VhostUser {
        socket: sock.clone(),
        queues: 2,
        server: true,
    });
    let sock_s = sock.to_str().unwrap().to_string();
    let mut vf = Vfrelay::spawn(
        None,
        &[
            "vhost-user",
            "--socket",
            &sock_s,
            "--client",
            "--queues",
            "2",
            "--backend",
            "loopback",
        ],
    );
    boot_and_check(&mut vf, &cfg, 1, [(0, 0); 2]);
    // After QEMU goes, vfrelay releases the guest and starts reconnecting:
    // wait for that before stopping it (a SIGTERM first would rightly
    // stop it without reconnecting).
    let reconnecting = wait_until(secs(10), || vf.log().contains("reconnecting to"));
    let (st, log) = vf.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "vfrelay exit on SIGTERM: {st:?}\n{log}"
    );
    assert!(
        reconnecting,
        "vfrelay did not go back to reconnecting:\n{log}"
    );
}
