//! Tier 2: DPDK `dpdk-testpmd` with a `net_virtio_user` port as vhost-user
//! front end of vfrelay with the `loopback` backend. Exactly the frames
//! testpmd sends must come back: counts (and bytes) compared exactly, at
//! least 1,000,000 frames, 64- and 1500-byte frames, 1 and 2 queue pairs.
//!
//! Run as root: `cargo test --test testpmd -- --ignored`
//! (needs `dpdk-testpmd` and 2 MiB hugepages, see scripts/setup-host.sh).
//!
//! Environment:
//! - `VFRELAY_TESTPMD_FRAMES`: frames to send (default and minimum 1,000,000).
//! - `VFRELAY_TESTPMD_PEER=dpdk-vhost`: replace vfrelay by a second testpmd
//!   with DPDK's own `net_vhost` port in `mac` forwarding mode, to check this
//!   harness against a vhost-user back end nobody here wrote.
//! - `RUST_LOG`: vfrelay's log level (printed when a test fails).
//!
//! The method: testpmd `mac retry` forwarding with `start tx_first` keeps a
//! fixed population of frames circling testpmd -> vfrelay -> testpmd until
//! TX-packets passes the target; then `stop`, `set fwd rxonly`, `start` to
//! receive what is still in flight, and the port counters must match.

mod common;

use common::dpdk::{self, PortStats, Testpmd};
use common::vfrelay::Vfrelay;
use common::{secs, TempDir};
use std::path::Path;
use std::time::Duration;

const MIN_FRAMES: u64 = 1_000_000;

fn target_frames() -> u64 {
    std::env::var("VFRELAY_TESTPMD_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MIN_FRAMES)
        .max(MIN_FRAMES)
}

/// The vhost-user back end under test.
enum Peer {
    Vfrelay(Vfrelay),
    Dpdk(Testpmd),
}

impl Peer {
    fn start(sock: &Path, queues: usize) -> Peer {
        let q = queues.to_string();
        if std::env::var("VFRELAY_TESTPMD_PEER").as_deref() == Ok("dpdk-vhost") {
            let eal = dpdk::vhost_eal(sock, queues, &[]);
            let app = dpdk::app_args(queues);
            let mut t =
                Testpmd::spawn("vhost", &eal, &app, secs(60)).unwrap_or_else(|e| panic!("{e}"));
            for c in ["set fwd mac", "start"] {
                t.cmd(c, secs(10)).unwrap_or_else(|e| panic!("{e}"));
            }
            assert!(sock.exists(), "net_vhost did not create {}", sock.display());
            Peer::Dpdk(t)
        } else {
            Peer::Vfrelay(Vfrelay::vhost_user(
                None,
                sock,
                "loopback",
                &["--queues", &q, "--queue-size", "1024"],
            ))
        }
    }

    /// The back end must outlive its front end (vhost-user server mode).
    fn assert_running(&mut self) {
        let running = match self {
            Peer::Vfrelay(v) => v.is_running(),
            Peer::Dpdk(t) => t.is_running(),
        };
        assert!(
            running,
            "vhost-user back end exited when the front end left"
        );
    }

    /// Clean shutdown: vfrelay on SIGTERM exits and removes its socket.
    fn stop(self, sock: &Path) {
        match self {
            Peer::Vfrelay(v) => {
                let (st, log) = v.stop();
                assert!(
                    st.is_some_and(|s| s.success()),
                    "vfrelay did not exit cleanly on SIGTERM ({st:?})\n{log}"
                );
                assert!(
                    !sock.exists(),
                    "vfrelay left {} behind\n{log}",
                    sock.display()
                );
            }
            Peer::Dpdk(mut t) => {
                let _ = t.quit(secs(30));
            }
        }
    }
}

fn run_case(frame_len: usize, queues: usize) {
    let _one_at_a_time = dpdk::testpmd_turn();
    let target = target_frames();
    let dir = TempDir::new();
    let sock = dir.join("vu.sock");
    let mut peer = Peer::start(&sock, queues);

    let eal = dpdk::virtio_user_eal(&sock, queues);
    let app = dpdk::app_args(queues);
    let mut tp =
        Testpmd::spawn("virtio-user", &eal, &app, secs(60)).unwrap_or_else(|e| panic!("{e}"));
    let cmd = |tp: &mut Testpmd, c: &str| tp.cmd(c, secs(10)).unwrap_or_else(|e| panic!("{e}"));

    let out = cmd(&mut tp, &format!("set txpkts {frame_len}"));
    assert!(!out.to_lowercase().contains("invalid"), "set txpkts: {out}");
    // `retry`: on a full TX ring testpmd retries instead of dropping, so
    // the circling population stays constant.
    cmd(&mut tp, "set fwd mac retry");
    cmd(&mut tp, "start tx_first");
    let sent = tp.wait_stats(0, "TX target", secs(180), secs(15), |s| {
        s.tx_packets >= target
    });
    eprintln!("testpmd: {frame_len}-byte frames, {queues} queue pair(s): reached {sent:?}");
    let fwd = cmd(&mut tp, "stop");

    // Receive what is still in flight.
    let s = tp.drain(0);
    eprintln!("testpmd: final {s:?}");

    assert!(s.tx_packets >= target, "{s:?}");
    assert_eq!(
        s.rx_packets, s.tx_packets,
        "frames lost or duplicated: {s:?}"
    );
    let len = frame_len as u64;
    assert_eq!(
        s.tx_bytes,
        s.tx_packets * len,
        "TX bytes vs frame size: {s:?}"
    );
    assert_eq!(
        s.rx_bytes,
        s.rx_packets * len,
        "RX bytes vs frame size: {s:?}"
    );
    assert_eq!(
        (s.rx_errors, s.rx_missed, s.rx_nombuf, s.tx_errors),
        (0, 0, 0, 0),
        "errors: {s:?}"
    );
    // Every queue pair carried traffic, and each gave back what it took
    // (loopback answers on the queue pair a frame came from).
    let xstats = cmd(&mut tp, "show port xstats 0");
    for q in 0..queues {
        let get = |k: String| {
            dpdk::field(&xstats, &k).unwrap_or_else(|| panic!("no {k} in xstats:\n{xstats}"))
        };
        let (rx, tx) = (
            get(format!("rx_q{q}_good_packets")),
            get(format!("tx_q{q}_good_packets")),
        );
        eprintln!("testpmd: queue {q}: rx {rx} tx {tx}");
        assert!(tx > 0, "queue {q} sent nothing:\n{xstats}");
        assert_eq!(rx, tx, "queue {q}:\n{xstats}");
    }
    // testpmd's own forwarding counters (mac phase): nothing dropped.
    if let Some(d) = dpdk::field(&fwd, "TX-dropped") {
        assert_eq!(d, 0, "testpmd dropped frames it forwarded:\n{fwd}");
    }

    let st = tp.quit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "testpmd exit: {st}");
    std::thread::sleep(Duration::from_millis(200));
    peer.assert_running();
    peer.stop(&sock);
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn loopback_64b_1q() {
    run_case(64, 1);
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn loopback_1500b_1q() {
    run_case(1500, 1);
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn loopback_64b_2q() {
    run_case(64, 2);
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn loopback_1500b_2q() {
    run_case(1500, 2);
}

#[test]
fn parses_port_stats() {
    let out = "show port stats 0\n\n  ######################## NIC statistics for port 0  ########################\n  RX-packets: 19202816   RX-missed: 0          RX-bytes:  1228980224\n  RX-errors: 0\n  RX-nombuf:  0         \n  TX-packets: 19202848   TX-errors: 0          TX-bytes:  1228982272\n\n  Throughput (since last show)\n  Rx-pps:            0          Rx-bps:            0\n";
    let s = PortStats::parse(out).unwrap();
    assert_eq!(s.rx_packets, 19202816);
    assert_eq!(s.tx_packets, 19202848);
    assert_eq!(s.rx_bytes, 1228980224);
    assert_eq!(s.tx_bytes, 1228982272);
    assert_eq!(
        (s.rx_missed, s.rx_errors, s.rx_nombuf, s.tx_errors),
        (0, 0, 0, 0)
    );
    // Garbage, truncation and overflow are errors, never panics.
    for bad in [
        "",
        "NIC statistics for port 0\n RX-packets: x",
        "NIC statistics for port 0\n RX-packets: 99999999999999999999999",
        "RX-packets: 1 TX-packets: 1",
        "NIC statistics for port 0\n RX-packets:",
    ] {
        assert!(PortStats::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        dpdk::field("XRX-packets: 5 RX-packets: 7", "RX-packets"),
        Some(7)
    );
    assert_eq!(dpdk::field("TX-dropped: 0  ", "TX-dropped"), Some(0));
}

#[test]
fn parses_all_port_stats_blocks() {
    // `show port stats all` is one block per port; the helper splits there.
    let out = "\n  ######################## NIC statistics for port 0  ########################\n  RX-packets: 5          RX-missed: 0          RX-bytes:  320\n  RX-errors: 0\n  RX-nombuf:  0         \n  TX-packets: 6          TX-errors: 0          TX-bytes:  384\n\n  ######################## NIC statistics for port 1  ########################\n  RX-packets: 7          RX-missed: 0          RX-bytes:  448\n  RX-errors: 0\n  RX-nombuf:  0         \n  TX-packets: 8          TX-errors: 0          TX-bytes:  512\n";
    let v = dpdk::split_port_stats(out).unwrap();
    assert_eq!(v.len(), 2);
    assert_eq!((v[0].0, v[0].1.rx_packets, v[0].1.tx_bytes), (0, 5, 384));
    assert_eq!((v[1].0, v[1].1.rx_packets, v[1].1.tx_bytes), (1, 7, 512));
    assert!(dpdk::split_port_stats("NIC statistics for port x\n").is_err());
}
