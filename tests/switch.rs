//! The daemon's L2 switch (`vfrelay switch ...`, `--backend switch,...`)
//! with DPDK testpmd as the guests: one front end with N `net_virtio_user`
//! ports on one switch, one pinned poll worker.
//!
//! - Broadcast: every port sends one burst to ff:ff:ff:ff:ff:ff; every port
//!   receives every other port's burst exactly once, and never its own.
//! - Unicast, after the switch learned every port's MAC from those
//!   broadcasts: ports forward in pairs (0-1, 2-3, ...), each frame
//!   addressed to the partner's MAC; every port receives exactly what its
//!   partner sent and nothing from any other pair.
//!
//! Run as root: `cargo test --test switch -- --ignored` (needs
//! `dpdk-testpmd` and 2 MiB hugepages, see scripts/setup-host.sh).

mod common;

use common::dpdk::{self, PortStats, Testpmd};
use common::vfrelay::Vfrelay;
use common::{secs, unique_name, wait_until, TempDir};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Ring size of every port on both sides.
const RING: u32 = 1024;
const MEM_MB: u32 = 512;
/// Bursts of 32 each port starts the unicast phase with: frames in flight
/// towards one port stay below its RX ring, so a full ring (where the
/// switch drops rather than make a sender wait) never happens.
const BURSTS: u64 = 8;
/// testpmd's default burst: what `start tx_first` sends per port.
const BURST: u64 = 32;

fn mac(i: usize) -> String {
    format!("02:00:00:5e:00:{:02x}", i + 1)
}

fn tp_cmd(tp: &mut Testpmd, c: &str) -> String {
    tp.cmd(c, secs(10)).unwrap_or_else(|e| panic!("{e}"))
}

fn all(tp: &mut Testpmd, n: usize) -> Vec<PortStats> {
    let v = tp.all_port_stats().unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<u16> = v.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (0..n as u16).collect::<Vec<_>>(), "testpmd ports");
    v.into_iter().map(|(_, s)| s).collect()
}

/// `vfrelay stats --json`: rx_frames of port `p{i}`, for every i.
fn vfrelay_rx(d: &Vfrelay, n: usize) -> Vec<u64> {
    let ports = d.ctl_list(&["stats", "--json"], "ports");
    (0..n)
        .map(|i| {
            let p = ports
                .iter()
                .find(|p| p["name"] == format!("p{i}"))
                .unwrap_or_else(|| panic!("no p{i} in {ports:?}"));
            p["total"]["rx_frames"].as_u64().unwrap_or(0)
        })
        .collect()
}

fn switch_with_testpmd_ports(n: usize, daemon_args: &[&str]) {
    let _one_at_a_time = dpdk::testpmd_turn();
    let dir = TempDir::new();
    let d = Vfrelay::daemon(&dir.join("control.sock"), daemon_args);
    assert_eq!(
        d.ctl_ok(&["switch", "add", "sw0"]).trim(),
        "switch sw0 added"
    );
    let socks: Vec<PathBuf> = (0..n).map(|i| dir.join(&format!("p{i}.sock"))).collect();
    for (i, s) in socks.iter().enumerate() {
        let out = d.ctl_ok(&[
            "port",
            "add",
            &format!("p{i}"),
            "--vhost-user",
            s.to_str().unwrap(),
            "--queue-size",
            &RING.to_string(),
            "--mac",
            &mac(i),
            "--backend",
            "switch,name=sw0",
        ]);
        assert_eq!(out.trim(), format!("port p{i} added"));
    }

    let mut eal = dpdk::virtio_user_eal_ports(&socks, RING, MEM_MB, &unique_name("s"));
    for (i, a) in eal
        .iter_mut()
        .filter(|a| a.starts_with("--vdev="))
        .enumerate()
    {
        a.push_str(&format!(",mac={}", mac(i)));
    }
    let mut app = dpdk::app_args(1);
    app.extend([
        format!("--rxd={RING}"),
        format!("--txd={RING}"),
        // Port 0 forwards to 1 and 1 to 0, 2 to 3 ...
        "--port-topology=paired".to_string(),
    ]);
    let mut tp = Testpmd::spawn(&format!("virtio-user x{n}"), &eal, &app, secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    let connected = wait_until(secs(10), || {
        d.ctl_list(&["port", "list", "--json"], "ports")
            .iter()
            .all(|p| p["connected"] == true)
    });
    assert!(connected, "testpmd did not connect every port");
    let workers: std::collections::BTreeSet<u64> = d
        .ctl_list(&["port", "list", "--json"], "ports")
        .iter()
        .flat_map(|p| p["queue_pairs"].as_array().cloned().unwrap_or_default())
        .filter_map(|q| q["worker"].as_u64())
        .collect();
    let want_workers = if daemon_args.contains(&"0,1") { 2 } else { 1 };
    assert_eq!(workers.len(), want_workers, "workers serving the ports");

    // Broadcast: one burst from every port.
    for i in 0..n {
        tp_cmd(&mut tp, &format!("set eth-peer {i} ff:ff:ff:ff:ff:ff"));
    }
    tp_cmd(&mut tp, "set fwd rxonly");
    tp_cmd(&mut tp, "start tx_first");
    let want = BURST * (n as u64 - 1);
    let mut bc = Vec::new();
    let arrived = wait_until(secs(10), || {
        bc = all(&mut tp, n);
        bc.iter().all(|s| s.rx_packets >= want)
    });
    // Anything late would show as more than `want`.
    std::thread::sleep(Duration::from_millis(300));
    tp_cmd(&mut tp, "stop");
    bc = all(&mut tp, n);
    assert!(arrived, "broadcast did not reach every port: {bc:?}");
    for (i, s) in bc.iter().enumerate() {
        assert_eq!(s.tx_packets, BURST, "port {i} broadcast sent: {s:?}");
        assert_eq!(
            s.rx_packets, want,
            "port {i}: every other port's broadcast once, never its own: {s:?}"
        );
    }
    // The switch learned every port's MAC on that port.
    let sw = d.ctl_list(&["switch", "list", "--json"], "switches");
    assert_eq!(sw.len(), 1, "{sw:?}");
    let macs = sw[0]["macs"].as_array().expect("macs");
    for i in 0..n {
        let m = macs.iter().find(|m| m["mac"] == mac(i));
        assert_eq!(
            m.map(|m| m["port"].clone()),
            Some(format!("p{i}").into()),
            "MAC of p{i} learned on p{i}: {macs:?}"
        );
    }

    // Unicast in pairs.
    tp_cmd(&mut tp, "clear port stats all");
    for a in (0..n).step_by(2) {
        tp_cmd(&mut tp, &format!("set eth-peer {a} {}", mac(a + 1)));
        tp_cmd(&mut tp, &format!("set eth-peer {} {}", a + 1, mac(a)));
    }
    tp_cmd(&mut tp, "set fwd mac retry");
    tp_cmd(&mut tp, &format!("start tx_first {BURSTS}"));
    let target = n as u64 * 20_000;
    let start = Instant::now();
    let total = |v: &[PortStats]| v.iter().map(|s| s.tx_packets).sum::<u64>();
    let mut last = all(&mut tp, n);
    let mut last_change = Instant::now();
    while total(&last) < target && start.elapsed() < secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        let s = all(&mut tp, n);
        if total(&s) != total(&last) {
            last_change = Instant::now();
        }
        last = s;
        assert!(
            last_change.elapsed() < secs(15),
            "unicast stalled: {last:?}"
        );
    }
    eprintln!(
        "testpmd: {} frames sent on {n} ports in {:?}",
        total(&last),
        start.elapsed()
    );
    tp_cmd(&mut tp, "stop");
    tp_cmd(&mut tp, "set fwd rxonly");
    tp_cmd(&mut tp, "start");
    let partner_sent = |v: &[PortStats], i: usize| v[i ^ 1].tx_packets;
    let drained = Instant::now();
    let ok = wait_until(secs(10), || {
        let v = all(&mut tp, n);
        drained.elapsed() > Duration::from_millis(300)
            && (0..n).all(|i| v[i].rx_packets >= partner_sent(&v, i))
    });
    tp_cmd(&mut tp, "stop");
    let fin = all(&mut tp, n);
    assert!(ok, "drain: not every frame arrived: {fin:?}");
    for (i, s) in fin.iter().enumerate() {
        eprintln!("testpmd: port {i}: {s:?}");
        let p = &fin[i ^ 1];
        assert!(s.tx_packets > BURSTS * BURST, "port {i} sent: {s:?}");
        assert_eq!(
            (s.rx_packets, s.rx_bytes),
            (p.tx_packets, p.tx_bytes),
            "port {i} receives exactly what port {} sent, nothing else",
            i ^ 1
        );
        assert_eq!(
            (s.rx_errors, s.rx_missed, s.rx_nombuf, s.tx_errors),
            (0, 0, 0, 0),
            "port {i}: errors: {s:?}"
        );
    }
    // vfrelay counted the same, both phases.
    let want: Vec<u64> = (0..n)
        .map(|i| bc[i].rx_packets + fin[i].rx_packets)
        .collect();
    let mut got = Vec::new();
    let same = wait_until(secs(5), || {
        got = vfrelay_rx(&d, n);
        got == want
    });
    assert!(
        same,
        "vfrelay rx_frames per port {got:?} vs testpmd {want:?}"
    );

    // A switch with ports is not deleted; one without is.
    let (code, _, err) = d.ctl(&["switch", "del", "sw0"]);
    assert_ne!(code, 0, "switch del with ports succeeded");
    assert!(err.contains("still has ports"), "{err}");
    let st = tp.quit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "testpmd exit: {st}");
    for i in 0..n {
        d.ctl_ok(&["port", "del", &format!("p{i}")]);
    }
    assert_eq!(
        d.ctl_ok(&["switch", "del", "sw0"]).trim(),
        "switch sw0 deleted"
    );
    assert!(d
        .ctl_list(&["switch", "list", "--json"], "switches")
        .is_empty());
    let (st, log) = d.stop();
    assert!(st.is_some_and(|s| s.success()), "daemon exit {st:?}\n{log}");
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn two_testpmd_ports_on_a_switch() {
    switch_with_testpmd_ports(2, &["--workers", "0", "--poll"]);
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn eight_testpmd_ports_on_a_switch() {
    switch_with_testpmd_ports(8, &["--workers", "0", "--poll"]);
}

/// The ports' queue pairs spread over two workers (event mode: two
/// busy-polling workers would leave testpmd no core): frames cross between
/// workers both ways, each destination's RX ring written by senders on
/// either.
#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn eight_testpmd_ports_on_a_switch_across_two_workers() {
    switch_with_testpmd_ports(8, &["--workers", "0,1"]);
}

#[test]
#[ignore = "starts a vfrelay daemon"]
fn the_state_file_brings_switches_back_before_their_ports() {
    let dir = TempDir::new();
    let control = dir.join("control.sock");
    let state = dir.join("state.json");
    let args = ["--workers", "0", "--state", state.to_str().unwrap()];
    let mut d = Vfrelay::daemon(&control, &args);
    d.ctl_ok(&["switch", "add", "sw1", "--uplink", "loopback"]);
    d.ctl_ok(&["switch", "add", "sw0"]);
    let sock = dir.join("p.sock");
    d.ctl_ok(&[
        "port",
        "add",
        "p",
        "--vhost-user",
        sock.to_str().unwrap(),
        "--backend",
        "switch,name=sw0,vlan=7",
    ]);
    let names = |d: &Vfrelay| -> Vec<(String, String)> {
        d.ctl_list(&["switch", "list", "--json"], "switches")
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or("").to_string(),
                    s["uplink_spec"].as_str().unwrap_or("-").to_string(),
                )
            })
            .collect()
    };
    let before = names(&d);
    assert_eq!(
        before,
        [
            ("sw1".into(), "loopback".into()),
            ("sw0".into(), "-".into())
        ]
    );
    d.kill();
    let d = Vfrelay::daemon(&control, &args);
    assert!(
        wait_until(secs(10), || d.ctl(&["port", "list"]).0 == 0),
        "restarted daemon does not answer\n{}",
        d.log_text()
    );
    assert_eq!(names(&d), before, "switches after the restart");
    let ports = d.ctl_list(&["port", "list", "--json"], "ports");
    assert_eq!(ports.len(), 1, "{ports:?}\n{}", d.log_text());
    assert_eq!(ports[0]["backend"], "switch,name=sw0,vlan=7");
    let sw = d.ctl_list(&["switch", "list", "--json"], "switches");
    let members: Vec<&serde_json::Value> = sw
        .iter()
        .flat_map(|s| s["ports"].as_array().unwrap().iter())
        .collect();
    assert_eq!(members.len(), 1, "{sw:?}");
    assert_eq!(
        (members[0]["name"].as_str(), members[0]["vlan"].as_u64()),
        (Some("p"), Some(7))
    );
    let (st, log) = d.stop();
    assert!(st.is_some_and(|s| s.success()), "daemon exit {st:?}\n{log}");
}

#[test]
#[ignore = "starts a vfrelay daemon"]
fn a_saved_switch_that_cannot_come_back_is_kept_until_deleted() {
    let dir = TempDir::new();
    let control = dir.join("control.sock");
    let state = dir.join("state.json");
    std::fs::write(
        &state,
        r#"{"version": 1, "switches": [{"name": "gone", "uplink": "af-xdp,ifname=vfrnosuch0"}], "ports": []}"#,
    )
    .unwrap();
    let saved = |p: &std::path::Path| -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v["switches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let d = Vfrelay::daemon(
        &control,
        &["--workers", "0", "--state", state.to_str().unwrap()],
    );
    assert!(d
        .ctl_list(&["switch", "list", "--json"], "switches")
        .is_empty());
    assert_eq!(saved(&state), ["gone"], "kept for the next start");
    // A VDUSE port cannot join a switch (yet): one clear error.
    d.ctl_ok(&["switch", "add", "sw0"]);
    let (code, _, err) = d.ctl(&[
        "port",
        "add",
        "v",
        "--vduse",
        "vfrnosuch",
        "--backend",
        "switch,name=sw0",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("VDUSE port cannot join a switch"), "{err}");
    assert_eq!(saved(&state), ["sw0", "gone"]);
    d.ctl_ok(&["switch", "del", "gone"]);
    assert_eq!(saved(&state), ["sw0"], "forgotten once deleted");
    let (st, log) = d.stop();
    assert!(st.is_some_and(|s| s.success()), "daemon exit {st:?}\n{log}");
}
