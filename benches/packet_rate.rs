//! Packet-rate harness, vfrelay vs DPDK (issue 5). As root:
//!
//! ```sh
//! cargo bench --bench packet_rate                 # full run, ~16 min
//! cargo bench --bench packet_rate -- --smoke      # every configuration ~2 s
//! cargo bench --bench packet_rate -- --only loopback --reps 3 --sizes 64
//! cargo bench --bench packet_rate -- --only af-xdp --dir guest-to-wire
//! cargo bench --bench packet_rate -- --only ports --ports 1,4,16,64 --reps 3
//! ```
//!
//! Writes `benches/results/<stamp>/{report.md,plot.svg,samples.csv}` and the
//! raw testpmd/vfrelay output to `benches/results/raw/<stamp>/`. See
//! benches/README.md.

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;

use std::path::PathBuf;

fn main() {
    let root = common::repo_root();
    let mut smoke = std::env::var_os("VFRELAY_BENCH_SMOKE").is_some_and(|v| v == "1");
    let mut args = std::env::args().skip(1);
    let mut only = Vec::new();
    let mut reps = None;
    let mut secs = None;
    let mut sizes = None;
    let mut queues = None;
    let mut ports = None;
    let mut dirs = Vec::new();
    let mut exe = PathBuf::from(env!("CARGO_BIN_EXE_vfrelay"));
    let mut out = root.join("benches/results");
    while let Some(a) = args.next() {
        let mut val = |what: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{a} needs a value ({what})"))
        };
        match a.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--smoke" => smoke = true,
            "--only" => only.push(val("loopback|af-xdp|tap|idle|ports")),
            "--reps" => reps = Some(val("N").parse().expect("--reps N")),
            "--secs" => secs = Some(val("seconds").parse().expect("--secs S")),
            "--sizes" => {
                sizes = Some(
                    val("64,256,...")
                        .split(',')
                        .map(|s| s.parse().expect("--sizes 64,1518"))
                        .collect(),
                )
            }
            "--queues" => {
                queues = Some(
                    val("1,2")
                        .split(',')
                        .map(|s| s.parse().expect("--queues 1,2"))
                        .collect(),
                )
            }
            "--ports" => {
                ports = Some(
                    val("1,4,16,64")
                        .split(',')
                        .map(|s| s.parse().expect("--ports 1,4,16,64"))
                        .collect(),
                )
            }
            "--dir" => dirs.push(val("guest-to-wire|wire-to-guest")),
            // Another build, e.g. to compare a change against its parent.
            "--vfrelay" => exe = PathBuf::from(val("path")),
            "--out" => out = PathBuf::from(val("dir")),
            other => panic!(
                "unknown argument {other}: [--smoke] [--only SCENARIO]... [--reps N] \
                 [--secs S] [--sizes 64,1518] [--queues 1,2] [--ports 1,4,16,64] [--dir guest-to-wire|wire-to-guest]... \
                 [--vfrelay PATH] [--out DIR]"
            ),
        }
    }
    let raw = out.join("raw");
    let mut cfg = harness::Config::new(smoke, out, raw, exe);
    cfg.only = only;
    cfg.dirs = dirs;
    if let Some(r) = reps {
        cfg.reps = r;
    }
    if let Some(s) = secs {
        cfg.secs = s;
    }
    if let Some(q) = queues {
        cfg.loopback_queues = q;
    }
    if let Some(p) = ports {
        cfg.ports = p;
    }
    if let Some(s) = sizes {
        cfg.sizes = s;
    }
    harness::run_all(&cfg);
}
