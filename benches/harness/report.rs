//! The markdown report: medians per point, ratio vfrelay / DPDK, the idle
//! CPU figures and the conditions of the run.

use std::fmt::Write;
use std::time::Duration;

use super::{Config, Side};

#[derive(Clone, Debug)]
pub struct Sample {
    pub scenario: String,
    pub queues: usize,
    pub size: usize,
    pub side: Side,
    pub rep: usize,
    pub mpps: f64,
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// The highest sample: on a shared machine the least disturbed one.
pub fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// One row of the table: a (scenario, queues, size) point.
pub struct Point {
    pub scenario: String,
    pub queues: usize,
    pub size: usize,
    pub vfrelay: Vec<f64>,
    pub dpdk: Vec<f64>,
}

impl Point {
    pub fn ratio(&self) -> f64 {
        median(&self.vfrelay) / median(&self.dpdk)
    }
}

/// Samples grouped by point, in the order they were first measured.
pub fn points(samples: &[Sample]) -> Vec<Point> {
    let mut out: Vec<Point> = Vec::new();
    for s in samples {
        let i = match out
            .iter()
            .position(|p| p.scenario == s.scenario && p.queues == s.queues && p.size == s.size)
        {
            Some(i) => i,
            None => {
                out.push(Point {
                    scenario: s.scenario.clone(),
                    queues: s.queues,
                    size: s.size,
                    vfrelay: Vec::new(),
                    dpdk: Vec::new(),
                });
                out.len() - 1
            }
        };
        match s.side {
            Side::Vfrelay => out[i].vfrelay.push(s.mpps),
            Side::Dpdk => out[i].dpdk.push(s.mpps),
        }
    }
    out
}

pub struct Report<'a> {
    pub cfg: &'a Config,
    pub stamp: &'a str,
    pub samples: &'a [Sample],
    /// (mode, CPU seconds used, wall seconds).
    pub idle: &'a [(String, f64, f64)],
    pub load_before: &'a str,
    pub load_after: &'a str,
    pub elapsed: Duration,
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Report<'_> {
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let c = self.cfg;
        let _ = writeln!(
            m,
            "# Packet rate: vfrelay vs DPDK net_vhost ({})\n",
            self.stamp
        );
        let _ = writeln!(
            m,
            "Mode: {}; {} repetition(s) per point, alternating vfrelay and DPDK; \
             {:.1} s window after {:.1} s warm-up. Run took {:.0} s.\n",
            if c.smoke {
                "SMOKE (numbers not meaningful)"
            } else {
                "full"
            },
            c.reps,
            c.secs,
            c.warm,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            m,
            "Machine: {} cores, `{}`. Load average before: `{}`, after: `{}`.\n",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            self.load_before,
            self.load_after
        );
        let _ = writeln!(
            m,
            "Guest: `dpdk-testpmd` with `net_virtio_user` (queue size 1024), forwarding \
             on core 1. Back end on core 0: vfrelay `--poll` (pinned), or DPDK testpmd \
             `net_vhost` (one forwarding lcore). Frame sizes include the 4-byte FCS \
             (testpmd `set txpkts` = size - 4). Rates in Mpps, median of the \
             repetitions (all samples listed); the best-of ratio is context for a \
             machine shared with other work, the median ratio is the result.\n"
        );
        let _ = writeln!(
            m,
            "- loopback: guest `set fwd mac`, `start tx_first 32`; vfrelay `loopback` vs \
             DPDK `set fwd mac`; rate = frames back at the guest.\n\
             - af-xdp: vfrelay `af-xdp,mode=copy` on a veth whose peer is in a namespace \
             vs DPDK `net_vhost` <-> `net_af_xdp` (`set fwd io`) on the same kind of veth. \
             guest-to-wire: guest `txonly`, rate = the peer's rx_packets; wire-to-guest: an \
             AF_PACKET generator thread on the peer (pinned to core 1, sharing it with the \
             guest), guest `rxonly`, rate = guest RX.\n\
             - tap: the same through vfrelay `tap` vs DPDK `net_tap`, the tap inside the \
             namespace.\n"
        );
        let _ = writeln!(
            m,
            "| scenario | queue pairs | frame (B) | vfrelay Mpps | DPDK Mpps | vfrelay / DPDK | best vfrelay / best DPDK | vfrelay samples | DPDK samples |"
        );
        let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|");
        for p in points(self.samples) {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {:.3} | {:.3} | {:.2} | {:.2} | {} | {} |",
                p.scenario,
                p.queues,
                p.size,
                median(&p.vfrelay),
                median(&p.dpdk),
                p.ratio(),
                best(&p.vfrelay) / best(&p.dpdk),
                list(&p.vfrelay),
                list(&p.dpdk)
            );
        }
        if !self.idle.is_empty() {
            let _ = writeln!(
                m,
                "\n## Idle guest: vfrelay CPU\n\nvfrelay `loopback`, one queue pair, \
                 testpmd virtio-user attached with its port started but not forwarding; \
                 utime+stime from /proc/PID/stat.\n"
            );
            let _ = writeln!(
                m,
                "| vfrelay mode | CPU seconds | wall seconds | % of one core |"
            );
            let _ = writeln!(m, "|---|---|---|---|");
            for (mode, cpu, wall) in self.idle {
                let _ = writeln!(
                    m,
                    "| {mode} | {cpu:.2} | {wall:.1} | {:.2} |",
                    100.0 * cpu / wall
                );
            }
        }
        let _ = writeln!(
            m,
            "\nPlot: `plot.svg`; every sample: `samples.csv`; raw testpmd/vfrelay output: \
             `benches/results/raw/{}/` (not committed).",
            self.stamp
        );
        m
    }
}
