//! CI keeps the packet-rate harness (benches/packet_rate.rs) working: one
//! smoke-mode run (every configuration briefly, one repetition) must write a
//! report, a plot and non-zero rates for both back ends; the ports scenario
//! (1 and 4 ports in smoke mode) non-zero rates for every back end with every
//! port carrying frames; the vm2vm scenario (1 and 4 pairs through a switch)
//! non-zero rates for vfrelay, OVS-DPDK and testpmd with every port
//! receiving. Never a timed test.
//!
//! Run as root: `cargo test --test bench_smoke -- --ignored`.
//!
//! The harness's argument parser is tested here too, without root
//! (`harness::args::tests`: cargo runs no tests of a `harness = false` bench).

mod common;
#[path = "../benches/harness/mod.rs"]
mod harness;

use std::path::PathBuf;

#[test]
#[ignore = "needs root, dpdk-testpmd, OVS-DPDK, hugepages; runs about two minutes"]
fn harness_smoke_mode_writes_a_report() {
    let dir = common::TempDir::new();
    let cfg = harness::Config::new(
        true,
        dir.join("results"),
        dir.join("results/raw"),
        PathBuf::from(common::vfrelay::bin()),
    );
    let out = harness::run_all(&cfg);
    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    let svg = std::fs::read_to_string(out.join("plot.svg")).expect("plot.svg");
    assert!(svg.contains("<svg"), "plot.svg is not an SVG");
    let csv = std::fs::read_to_string(out.join("samples.csv")).expect("samples.csv");
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    for scenario in [
        "loopback",
        "af-xdp guest-to-wire",
        "af-xdp wire-to-guest",
        "tap guest-to-wire",
        "tap wire-to-guest",
    ] {
        for side in ["vfrelay", "dpdk"] {
            let mine: Vec<_> = rows
                .iter()
                .filter(|r| r[0] == scenario && r[3] == side)
                .collect();
            assert!(!mine.is_empty(), "no {scenario} {side} samples:\n{csv}");
            for r in mine {
                let mpps: f64 = r[5].parse().unwrap();
                assert!(mpps > 0.0, "zero rate: {r:?}\n{report}");
            }
        }
    }
    assert!(report.contains("% of one core"), "{report}");

    let csv = std::fs::read_to_string(out.join("ports.csv")).expect("ports.csv");
    // ports,frontends,side,rep,mpps,silent_ports,connected,rss_kb
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    for n in cfg.ports.iter().map(|n| n.to_string()) {
        for side in ["vfrelay", "dpdk", "vfrelay-event"] {
            let mine: Vec<_> = rows.iter().filter(|r| r[0] == n && r[2] == side).collect();
            assert!(!mine.is_empty(), "no ports x{n} {side} samples:\n{csv}");
            for r in mine {
                let mpps: f64 = r[4].parse().unwrap();
                assert!(mpps > 0.0, "zero rate: {r:?}\n{report}");
                assert_eq!(r[5], "0", "ports that carried nothing: {r:?}\n{report}");
                if side != "dpdk" {
                    assert_eq!(r[6], n, "ports not connected: {r:?}\n{report}");
                }
            }
        }
    }
    assert!(report.contains("## ports"), "{report}");
    assert!(
        report.contains("Idle: the daemon in event mode"),
        "{report}"
    );
    assert!(report.contains("VmRSS per port"), "{report}");

    // vm2vm rows are in samples.csv beside the others, one side per back end.
    let csv = std::fs::read_to_string(out.join("samples.csv")).expect("samples.csv");
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    for pairs in &cfg.vm2vm_pairs {
        let scenario = harness::vm2vm::scenario(*pairs);
        for side in ["vfrelay", "ovs", "dpdk"] {
            let mine: Vec<_> = rows
                .iter()
                .filter(|r| r[0] == scenario && r[3] == side)
                .collect();
            assert_eq!(
                mine.len(),
                cfg.vm2vm_sizes.len(),
                "{scenario} {side} samples:\n{csv}"
            );
            for r in mine {
                let mpps: f64 = r[5].parse().unwrap();
                assert!(mpps > 0.0, "zero rate: {r:?}\n{report}");
            }
        }
    }
    assert!(report.contains("## vm2vm"), "{report}");
    // The vm2vm notes name every window in which a port received nothing.
    assert!(!report.contains("received nothing"), "{report}");
}
