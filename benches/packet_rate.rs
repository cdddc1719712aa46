//! Packet-rate harness, vfrelay vs DPDK (issue 5). As root:
//!
//! ```sh
//! cargo bench --bench packet_rate                 # full run, ~20 min
//! cargo bench --bench packet_rate -- --smoke      # every configuration ~2 s
//! cargo bench --bench packet_rate -- --only loopback --reps 3 --sizes 64
//! cargo bench --bench packet_rate -- --only af-xdp --dir guest-to-wire
//! cargo bench --bench packet_rate -- --only ports --ports 1,4,16,64 --reps 3
//! cargo bench --bench packet_rate -- --only vm2vm --pairs 1,4 --reps 5
//! cargo bench --bench packet_rate -- --help      # every option
//! ```
//!
//! Writes `benches/results/<stamp>/{report.md,plot.svg,samples.csv}` and the
//! raw testpmd/vfrelay/OVS output to `benches/results/raw/<stamp>/`. See
//! benches/README.md.

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;

use std::path::PathBuf;

use clap::Parser;

fn main() {
    // Bad arguments exit 2 with clap's message before anything is set up.
    let args = harness::args::Args::parse();
    let cfg = args.config(
        std::env::var_os("VFRELAY_BENCH_SMOKE").as_deref(),
        common::repo_root().join("benches/results"),
        PathBuf::from(env!("CARGO_BIN_EXE_vfrelay")),
    );
    harness::run_all(&cfg);
}
