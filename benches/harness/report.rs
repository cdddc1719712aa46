//! The markdown report: medians per point, ratio vfrelay / DPDK, the idle
//! CPU figures and the conditions of the run.

use std::fmt::Write;
use std::time::Duration;

use super::ports::{Mode, PortsResult, BURSTS, FRAME, MAX_PORTS_PER_TESTPMD, RING};
use super::vm2vm::{self, Vm2vmResult};
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

/// The median of `a[i] / b[i]`: samples of the same repetition, taken
/// minutes apart at most, so a host that slows down for a while slows
/// both sides of each pair alike (the ratio of the medians mixes samples
/// from different moments).
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&r)
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
    /// vm2vm only.
    pub ovs: Vec<f64>,
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
                    ovs: Vec::new(),
                });
                out.len() - 1
            }
        };
        match s.side {
            Side::Vfrelay => out[i].vfrelay.push(s.mpps),
            Side::Dpdk => out[i].dpdk.push(s.mpps),
            Side::Ovs => out[i].ovs.push(s.mpps),
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
    /// The `ports` scenario (empty when not run).
    pub ports: &'a PortsResult,
    /// The `vm2vm` scenario (empty when not run); its samples are in
    /// `samples` too.
    pub vm2vm: &'a Vm2vmResult,
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
        // vm2vm has three back ends and a section of its own.
        let single: Vec<Sample> = self
            .samples
            .iter()
            .filter(|s| !s.scenario.starts_with("vm2vm"))
            .cloned()
            .collect();
        if !single.is_empty() {
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
            "| scenario | queue pairs | frame (B) | vfrelay Mpps | DPDK Mpps | vfrelay / DPDK | median of per-repetition ratios | best vfrelay / best DPDK | vfrelay samples | DPDK samples |"
        );
            let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|");
            for p in points(&single) {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} | {} | {} |",
                    p.scenario,
                    p.queues,
                    p.size,
                    median(&p.vfrelay),
                    median(&p.dpdk),
                    p.ratio(),
                    paired_ratio(&p.vfrelay, &p.dpdk),
                    best(&p.vfrelay) / best(&p.dpdk),
                    list(&p.vfrelay),
                    list(&p.dpdk)
                );
            }
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
        if !self.ports.samples.is_empty() {
            m += &ports_markdown(self.ports);
        }
        if !self.vm2vm.samples.is_empty() {
            m += &vm2vm_markdown(self.vm2vm);
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

/// `median (min..max)` of `v`, or a dash.
fn spread(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.3} ({lo:.2}..{hi:.2})", median(v))
}

/// The `ports` section: a row per N, the idle daemon, RSS per port.
pub fn ports_markdown(res: &PortsResult) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "\n## ports: N loopback ports on one worker core\n\n\
         Front end: testpmd with N `net_virtio_user` ports (1 queue pair, ring {RING}), \
         `--port-topology=loop`, `set fwd mac`, `start tx_first {BURSTS}` on every port, \
         {FRAME} B frames, forwarding on core 1. Back end on core 0: the vfrelay daemon \
         `--workers 0 --poll` (pinned) with N `loopback` ports, or testpmd with N \
         `net_vhost` ports (`set fwd mac`, one forwarding lcore); \"event\" is the daemon \
         without `--poll` (DPDK has no event mode). Rate = frames back at the front \
         end(s), all ports summed; median (min..max) of the repetitions, the order of \
         the three back ends rotating each repetition.\n\n\
         DPDK here is built with RTE_MAX_ETHPORTS={MAX_PORTS_PER_TESTPMD}: above \
         {MAX_PORTS_PER_TESTPMD} ports the ports are split evenly over several \
         testpmd front ends sharing core 1, and DPDK's back end over as many testpmd \
         processes sharing core 0 (time-sliced by the scheduler), so those rows are \
         not one-lcore DPDK against one worker.\n"
    );
    let _ = writeln!(
        m,
        "| ports | front ends | vfrelay --poll Mpps | DPDK Mpps | vfrelay / DPDK (medians) | median of per-repetition ratios | vfrelay event Mpps | vfrelay --poll samples | DPDK samples | event samples | notes |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|");
    let mut ns: Vec<usize> = Vec::new();
    for s in &res.samples {
        if !ns.contains(&s.ports) {
            ns.push(s.ports);
        }
    }
    for n in ns {
        let mine: Vec<_> = res.samples.iter().filter(|s| s.ports == n).collect();
        let of = |mode: Mode| -> Vec<f64> {
            mine.iter()
                .filter(|s| s.mode == mode)
                .map(|s| s.mpps)
                .collect()
        };
        let (p, d, e) = (of(Mode::Poll), of(Mode::Dpdk), of(Mode::Event));
        let mut notes = Vec::new();
        for s in &mine {
            if s.silent > 0 {
                notes.push(format!(
                    "{} rep {}: {} port(s) carried nothing",
                    s.mode.name(),
                    s.rep,
                    s.silent
                ));
            }
            if let Some(c) = s.connected.filter(|&c| c < n) {
                notes.push(format!(
                    "{} rep {}: {c} of {n} connected",
                    s.mode.name(),
                    s.rep
                ));
            }
        }
        let rss: Vec<u64> = mine.iter().filter_map(|s| s.rss_kb).collect();
        if let (Some(lo), Some(hi)) = (rss.iter().min(), rss.iter().max()) {
            notes.push(format!("daemon VmRSS after traffic {lo}..{hi} kB"));
        }
        let _ = writeln!(
            m,
            "| {n} | {} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            mine.first().map_or(0, |s| s.frontends),
            spread(&p),
            spread(&d),
            median(&p) / median(&d),
            paired_ratio(&p, &d),
            spread(&e),
            list(&p),
            list(&d),
            list(&e),
            notes.join("; ")
        );
    }
    if let Some(i) = &res.idle {
        let _ = writeln!(
            m,
            "\nIdle: the daemon in event mode with {} loopback ports, {} connected \
             ({} testpmd front end(s) with their ports started, not forwarding); \
             utime+stime from /proc/PID/stat over {:.1} s: {:.2} CPU s, \
             **{:.2} % of one core**.",
            i.ports,
            i.connected,
            i.frontends,
            i.wall,
            i.cpu,
            100.0 * i.cpu / i.wall
        );
    }
    if let Some(base) = res.rss.iter().find(|r| r.ports == 0) {
        let _ = writeln!(
            m,
            "\nMemory of that daemon, /proc/PID/status:\n\n\
             | daemon | ports | VmRSS kB | RssAnon kB | VmRSS per port over none, kB |\n\
             |---|---|---|---|---|"
        );
        for r in &res.rss {
            let per = if r.ports > 0 {
                format!(
                    "{:.1}",
                    (r.vm_rss_kb as f64 - base.vm_rss_kb as f64) / r.ports as f64
                )
            } else {
                "-".into()
            };
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {per} |",
                r.what, r.ports, r.vm_rss_kb, r.rss_anon_kb
            );
        }
    }
    m
}

/// The `vm2vm` section: a row per (pairs, frame size), the three back ends
/// side by side.
pub fn vm2vm_markdown(res: &Vm2vmResult) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "\n## vm2vm: guest to guest through a switch on one core\n\n\
         Front end: one testpmd with 2 x P `net_virtio_user` ports (1 queue pair, \
         ring {RING}, a MAC each), pairs 0-1, 2-3, ... (`--port-topology=paired`), \
         `set fwd mac` with `--eth-peer` so every frame goes from its port's MAC to \
         its partner's, `start tx_first {BURSTS}` on every port, forwarding on core 1. \
         Back ends on core 0, the order rotating each repetition: the vfrelay daemon \
         `--workers 0 --poll` (pinned) with `switch add {sw}` and the ports on \
         `--backend switch,name={sw}`; OVS-DPDK 3.1 (`ovs-vswitchd-dpdk`, private \
         database, bridge `datapath_type=netdev`, flow NORMAL, `dpdkvhostuserclient` \
         ports, front end's virtio-user as servers, `pmd-cpu-mask=0x1`, \
         `dpdk-lcore-mask=0x1`, the whole process on core 0); testpmd `net_vhost` \
         ports with `set fwd io` between the pairs (no lookup: the ceiling). All \
         ports of one configuration are on one switch or bridge. Rate = frames \
         received by the front end, all ports summed; median (min..max).\n\n\
         RX/TX is the front end's RX over its TX in the window, worst of the \
         repetitions: 1.00 when every frame arrives once; with more than one pair, \
         frames flooded to a MAC not learned would push it above 1. vfrelay's \
         own count of what its switch flooded during the windows (`switch_list` \
         counters, all repetitions) is beside it: 0 once every MAC is learned.\n",
        sw = vm2vm::SWITCH
    );
    let _ = writeln!(
        m,
        "| configuration | frame (B) | vfrelay Mpps | OVS-DPDK Mpps | testpmd io Mpps | vfrelay / OVS | vfrelay / testpmd | RX/TX vfrelay, OVS, testpmd | vfrelay flooded / switched | vfrelay samples | OVS samples | testpmd samples | notes |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in points(&res.samples) {
        let mine: Vec<_> = res
            .checks
            .iter()
            .filter(|c| c.scenario == p.scenario && c.size == p.size)
            .collect();
        let worst = |side: Side| {
            mine.iter()
                .filter(|c| c.side == side)
                .map(|c| c.fanout)
                .fold(f64::NAN, f64::max)
        };
        let notes: Vec<String> = mine
            .iter()
            .filter(|c| c.silent > 0)
            .map(|c| {
                format!(
                    "{} rep {}: {} port(s) received nothing",
                    c.side.name(),
                    c.rep,
                    c.silent
                )
            })
            .collect();
        let (flooded, switched) = mine
            .iter()
            .filter_map(|c| c.flooded)
            .fold((0, 0), |(f, a), (f1, a1)| (f + f1, a + a1));
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2}, {:.2}, {:.2} | {flooded} / {switched} | {} | {} | {} | {} |",
            p.scenario.trim_start_matches("vm2vm "),
            p.size,
            spread(&p.vfrelay),
            spread(&p.ovs),
            spread(&p.dpdk),
            median(&p.vfrelay) / median(&p.ovs),
            median(&p.vfrelay) / median(&p.dpdk),
            worst(Side::Vfrelay),
            worst(Side::Ovs),
            worst(Side::Dpdk),
            list(&p.vfrelay),
            list(&p.ovs),
            list(&p.dpdk),
            notes.join("; ")
        );
    }
    let _ = writeln!(
        m,
        "\nRaw: what each switch learned and how it forwarded during each window \
         (`*-switch-list.json` for vfrelay; `*-ovs-state.txt`: `fdb/show`, \
         `dpctl/dump-flows`, PMD statistics for OVS) and every log."
    );
    m
}
