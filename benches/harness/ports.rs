//! The `ports` scenario: N loopback ports on one worker core.
//!
//! Front end: `dpdk-testpmd` with N `net_virtio_user` ports (one queue
//! pair, ring 1024), `--port-topology=loop`, `set fwd mac`,
//! `start tx_first 32` on every port, forwarding on lcore 1. Back end on
//! core 0: the vfrelay daemon (`--workers 0 --poll`, pinned) with N
//! `loopback` ports added over its control socket, or testpmd with N
//! `net_vhost` ports in mac forwarding on lcore 0; the daemon without
//! `--poll` (event mode) as a third side that DPDK has no counterpart for.
//! Rate = frames back at the front end, summed over the ports.
//!
//! Debian's DPDK 22.11 is built with `RTE_MAX_ETHPORTS=32`, so one testpmd
//! holds at most 32 ports: above 32 the ports are split evenly over several
//! front-end processes (and, for DPDK, several back-end processes), which
//! then share their lcore (front ends core 1, DPDK back ends core 0) in
//! scheduler time slices. The report says so next to those rows.
//!
//! Also: the CPU of an idle event-mode daemon with the largest N connected
//! (front ends started, not forwarding) and the daemon's VmRSS with 0 and N
//! ports.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{cmd, cpu_seconds, pin, sleep, Config, Raw, RuntimeDir};
use crate::common::dpdk::{self, Testpmd};
use crate::common::vfrelay::{Rpc, Vfrelay};
use crate::common::{wait_until, TempDir};

/// `RTE_MAX_ETHPORTS` of Debian's DPDK 22.11 (rte_build_config.h): ports
/// one testpmd process can hold.
pub const MAX_PORTS_PER_TESTPMD: usize = 32;
/// Ring size of every port (virtio-user `queue_size`, testpmd --rxd/--txd,
/// the daemon's `queue_size`).
pub const RING: u32 = 1024;
/// `start tx_first BURSTS`: bursts of 32 frames each port starts with
/// (1024 frames per port, one ring's worth, as in the loopback scenario).
pub const BURSTS: u32 = 32;
/// Frame size on the wire (testpmd `set txpkts` = 60, no FCS).
pub const FRAME: usize = 64;

/// Which back end serves the ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// vfrelay daemon `--workers 0 --poll`.
    Poll,
    /// testpmd `net_vhost` ports, mac forwarding.
    Dpdk,
    /// vfrelay daemon `--workers 0` (event mode).
    Event,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Poll => "vfrelay",
            Mode::Dpdk => "dpdk",
            Mode::Event => "vfrelay-event",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PortsSample {
    pub ports: usize,
    /// testpmd front-end processes the ports were split over.
    pub frontends: usize,
    pub mode: Mode,
    pub rep: usize,
    pub mpps: f64,
    /// Ports whose RX counter did not move during the window.
    pub silent: usize,
    /// vfrelay: ports the daemon listed as connected before traffic.
    pub connected: Option<usize>,
    /// vfrelay: the daemon's VmRSS (kB) after the window.
    pub rss_kb: Option<u64>,
}

/// The idle event-mode daemon.
#[derive(Clone, Debug)]
pub struct IdleCpu {
    pub ports: usize,
    pub frontends: usize,
    pub connected: usize,
    pub cpu: f64,
    pub wall: f64,
}

/// One VmRSS reading of the event-mode daemon.
#[derive(Clone, Debug)]
pub struct Rss {
    pub what: String,
    pub ports: usize,
    pub vm_rss_kb: u64,
    pub rss_anon_kb: u64,
}

#[derive(Clone, Debug, Default)]
pub struct PortsResult {
    pub samples: Vec<PortsSample>,
    pub idle: Option<IdleCpu>,
    pub rss: Vec<Rss>,
}

/// `socks` split evenly over as few testpmd processes as
/// [`MAX_PORTS_PER_TESTPMD`] allows.
fn groups(socks: &[PathBuf]) -> Vec<&[PathBuf]> {
    let procs = socks.len().div_ceil(MAX_PORTS_PER_TESTPMD).max(1);
    socks.chunks(socks.len().div_ceil(procs)).collect()
}

/// mbufs of a front end with `ports` ports: per port its RX ring (filled),
/// its TX ring (freed lazily) and the injected frames, plus slack for the
/// per-lcore caches.
pub(super) fn frontend_mbufs(ports: usize) -> u32 {
    ports as u32 * (2 * RING + BURSTS * 32) + 8192
}

/// Hugepage memory (MiB) of such a front end: ~2.5 KiB per mbuf, 128 MiB
/// for everything else, in 64 MiB steps.
pub(super) fn frontend_mem_mb(ports: usize) -> u32 {
    let mb = frontend_mbufs(ports) as u64 * 2560 / (1 << 20) + 128;
    (mb.div_ceil(64) * 64) as u32
}

/// mbufs of a DPDK back end (net_vhost holds none between bursts).
const BACKEND_MBUFS: u32 = 32768;
/// Hugepages (2 MiB) a DPDK back end takes, with margin.
const BACKEND_PAGES: u64 = 80;

/// The front end of `socks`; its runtime directory's guard goes to `dirs`.
fn frontend(socks: &[PathBuf], dirs: &mut Vec<RuntimeDir>) -> Testpmd {
    let n = socks.len();
    let (dir, prefix) = RuntimeDir::new();
    dirs.push(dir);
    let eal = dpdk::virtio_user_eal_ports(socks, RING, frontend_mem_mb(n), &prefix);
    let app = vec![
        "--rxq=1".to_string(),
        "--txq=1".into(),
        "--nb-cores=1".into(),
        format!("--total-num-mbufs={}", frontend_mbufs(n)),
        format!("--rxd={RING}"),
        format!("--txd={RING}"),
        // Each port forwards to itself: N independent circles.
        "--port-topology=loop".into(),
    ];
    Testpmd::spawn(
        &format!("virtio-user x{n}"),
        &eal,
        &app,
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn dpdk_backend(socks: &[PathBuf]) -> Testpmd {
    let n = socks.len();
    let eal = dpdk::vhost_eal_ports(socks);
    let app = vec![
        "--rxq=1".to_string(),
        "--txq=1".into(),
        "--nb-cores=1".into(),
        format!("--total-num-mbufs={BACKEND_MBUFS}"),
        "--port-topology=loop".into(),
    ];
    let mut t = Testpmd::spawn(&format!("vhost x{n}"), &eal, &app, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    cmd(&mut t, "set fwd mac");
    cmd(&mut t, "start");
    for s in socks {
        assert!(s.exists(), "net_vhost did not create {}", s.display());
    }
    t
}

/// A daemon on `control`, pinned to core 0 (like the single-port runs);
/// `--workers 0` puts its one worker there too.
pub(super) fn daemon(cfg: &Config, control: &Path, poll: bool) -> Vfrelay {
    let c = control.to_str().unwrap();
    let mut args = vec!["daemon", "--control", c, "--workers", "0"];
    if poll {
        args.push("--poll");
    }
    let mut v = Vfrelay::spawn_with(None, &cfg.vfrelay, &args, &[("RUST_LOG", "info")]);
    v.wait_for_control(control);
    pin(v.pid(), 0);
    v
}

fn add_ports(control: &Path, socks: &[PathBuf]) {
    let mut rpc = Rpc::connect(control);
    for (i, s) in socks.iter().enumerate() {
        rpc.result(
            "port_add",
            json!({
                "name": format!("p{i}"),
                "vhost_user": s,
                "backend": "loopback",
                "queue_size": RING,
            }),
        );
    }
}

/// Ports the daemon lists as connected.
fn connected(control: &Path) -> usize {
    let v = Rpc::connect(control).result("port_list", json!({}));
    v.as_array()
        .map(|a| a.iter().filter(|p| p["connected"] == true).count())
        .unwrap_or(0)
}

/// Waits (up to 15 s) for `n` connected ports; returns how many are.
pub(super) fn wait_connected(control: &Path, n: usize) -> usize {
    let mut c = 0;
    wait_until(Duration::from_secs(15), || {
        c = connected(control);
        c >= n
    });
    c
}

/// `(VmRSS, RssAnon)` of `pid` in kB.
fn rss_kb(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("RssAnon:"))
}

/// RX counters of every port of every front end, and the instant they
/// stand for (the middle of the reads).
fn rx_per_port(fes: &mut [Testpmd]) -> (Vec<u64>, Instant) {
    let t0 = Instant::now();
    let v = fes
        .iter_mut()
        .flat_map(|t| {
            t.all_port_stats()
                .unwrap_or_else(|e| panic!("{e}"))
                .into_iter()
                .map(|(_, s)| s.rx_packets)
        })
        .collect();
    let t1 = Instant::now();
    (v, t0 + (t1 - t0) / 2)
}

enum Back {
    Vfrelay(Vfrelay),
    Dpdk(Vec<Testpmd>),
}

/// One back end instance with `n` ports: one window.
fn sample(cfg: &Config, raw: &Raw, n: usize, mode: Mode, rep: usize) -> PortsSample {
    let tmp = TempDir::new();
    let socks: Vec<PathBuf> = (0..n).map(|i| tmp.join(&format!("p{i}.sock"))).collect();
    let control = tmp.join("control.sock");
    let tag = format!("ports-x{n}-{}-rep{rep}", mode.name());
    let back = match mode {
        Mode::Poll | Mode::Event => {
            let v = daemon(cfg, &control, mode == Mode::Poll);
            add_ports(&control, &socks);
            Back::Vfrelay(v)
        }
        Mode::Dpdk => Back::Dpdk(groups(&socks).into_iter().map(dpdk_backend).collect()),
    };
    let mut dirs = Vec::new();
    let mut fes: Vec<Testpmd> = groups(&socks)
        .into_iter()
        .map(|g| frontend(g, &mut dirs))
        .collect();
    let conn = match &back {
        Back::Vfrelay(v) => {
            let c = wait_connected(&control, n);
            // Threads the daemon started for the connections.
            pin(v.pid(), 0);
            Some(c)
        }
        Back::Dpdk(_) => None,
    };
    for fe in &mut fes {
        let out = cmd(fe, &format!("set txpkts {}", FRAME - 4));
        assert!(!out.to_lowercase().contains("invalid"), "{out}");
        cmd(fe, "set fwd mac");
        cmd(fe, &format!("start tx_first {BURSTS}"));
    }
    sleep(cfg.warm);
    let (a, t0) = rx_per_port(&mut fes);
    sleep(cfg.secs);
    let (b, t1) = rx_per_port(&mut fes);
    let secs = (t1 - t0).as_secs_f64();
    let pkts: u64 = b.iter().zip(&a).map(|(b, a)| b.saturating_sub(*a)).sum();
    let silent = b.iter().zip(&a).filter(|(b, a)| b <= a).count();
    let mpps = pkts as f64 / secs / 1e6;
    let rss = match &back {
        Back::Vfrelay(v) => Some(rss_kb(v.pid()).0),
        Back::Dpdk(_) => None,
    };
    for (i, fe) in fes.iter_mut().enumerate() {
        let _ = fe.cmd("stop", Duration::from_secs(10));
        let _ = fe.quit(Duration::from_secs(30));
        raw.save(&format!("{tag}-virtio-user{i}.log"), fe.transcript());
    }
    drop(fes);
    match back {
        Back::Vfrelay(v) => {
            let (_, log) = v.stop();
            raw.save(&format!("{tag}-vfrelay.log"), &log);
        }
        Back::Dpdk(bs) => {
            for (i, mut t) in bs.into_iter().enumerate() {
                let _ = t.cmd("stop", Duration::from_secs(10));
                let _ = t.quit(Duration::from_secs(30));
                raw.save(&format!("{tag}-dpdk-vhost{i}.log"), t.transcript());
            }
        }
    }
    let frontends = groups(&socks).len();
    let mut note = String::new();
    if silent > 0 {
        note += &format!(", {silent} port(s) carried nothing");
    }
    if let Some(c) = conn.filter(|&c| c < n) {
        note += &format!(", only {c} of {n} connected");
    }
    eprintln!(
        "  ports x{n:<2} ({frontends} front end(s)) {:>13} rep {rep}: {mpps:.3} Mpps{note}",
        mode.name()
    );
    PortsSample {
        ports: n,
        frontends,
        mode,
        rep,
        mpps,
        silent,
        connected: conn,
        rss_kb: rss,
    }
}

/// Hugepages the largest configuration needs at once.
fn pages_needed(n: usize) -> u64 {
    let tmp: Vec<PathBuf> = (0..n).map(|i| PathBuf::from(format!("{i}"))).collect();
    groups(&tmp)
        .iter()
        .map(|g| u64::from(frontend_mem_mb(g.len())) / 2 + BACKEND_PAGES)
        .sum()
}

/// The idle event-mode daemon with `n` ports: VmRSS with none, with `n`
/// added, with `n` connected; CPU over `secs` while connected and idle.
fn idle(cfg: &Config, raw: &Raw, n: usize, secs: f64) -> (IdleCpu, Vec<Rss>) {
    let tmp = TempDir::new();
    let socks: Vec<PathBuf> = (0..n).map(|i| tmp.join(&format!("p{i}.sock"))).collect();
    let control = tmp.join("control.sock");
    let v = daemon(cfg, &control, false);
    let mut rss = Vec::new();
    let mut read = |what: &str, ports: usize| {
        let (vm, anon) = rss_kb(v.pid());
        rss.push(Rss {
            what: what.to_string(),
            ports,
            vm_rss_kb: vm,
            rss_anon_kb: anon,
        });
    };
    sleep(0.5);
    read("no ports", 0);
    add_ports(&control, &socks);
    sleep(0.5);
    read("ports added, nothing connected", n);
    let mut dirs = Vec::new();
    let mut fes: Vec<Testpmd> = groups(&socks)
        .into_iter()
        .map(|g| frontend(g, &mut dirs))
        .collect();
    let conn = wait_connected(&control, n);
    pin(v.pid(), 0);
    sleep(1.0);
    read("ports connected, front ends idle", n);
    let (c0, t0) = (cpu_seconds(v.pid()), Instant::now());
    sleep(secs);
    let (c1, t1) = (cpu_seconds(v.pid()), Instant::now());
    let wall = (t1 - t0).as_secs_f64();
    let row = IdleCpu {
        ports: n,
        frontends: fes.len(),
        connected: conn,
        cpu: c1 - c0,
        wall,
    };
    eprintln!(
        "  idle event-mode daemon, {n} ports ({conn} connected): {:.2} % of a core over {wall:.1} s",
        100.0 * row.cpu / wall
    );
    for (i, fe) in fes.iter_mut().enumerate() {
        let _ = fe.quit(Duration::from_secs(30));
        raw.save(
            &format!("ports-idle-x{n}-virtio-user{i}.log"),
            fe.transcript(),
        );
    }
    drop(fes);
    let (_, log) = v.stop();
    raw.save(&format!("ports-idle-x{n}-vfrelay.log"), &log);
    (row, rss)
}

/// The whole scenario: every N of `cfg.ports`, `cfg.reps` rounds, the
/// back ends' order rotating each round; then the idle daemon with the
/// largest N.
pub fn run(cfg: &Config, raw: &Raw) -> PortsResult {
    let mut res = PortsResult::default();
    let Some(&max) = cfg.ports.iter().max() else {
        return res;
    };
    let need = pages_needed(max);
    let free = dpdk::free_hugepages();
    assert!(
        free >= need,
        "ports scenario: {free} free hugepages, {max} ports need {need}"
    );
    for &n in &cfg.ports {
        eprintln!("ports, {n} loopback port(s) on one worker core");
        for rep in 0..cfg.reps {
            let mut order = [Mode::Poll, Mode::Dpdk, Mode::Event];
            order.rotate_left(rep % 3);
            for mode in order {
                res.samples.push(sample(cfg, raw, n, mode, rep));
            }
        }
    }
    eprintln!("ports, idle event-mode daemon with {max} ports");
    let secs = if cfg.smoke { 1.0 } else { 5.0 };
    let (row, rss) = idle(cfg, raw, max, secs);
    res.idle = Some(row);
    res.rss = rss;
    res
}

/// ports.csv: every sample.
pub fn csv(res: &PortsResult) -> String {
    let mut s = String::from("ports,frontends,side,rep,mpps,silent_ports,connected,rss_kb\n");
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for x in &res.samples {
        s += &format!(
            "{},{},{},{},{:.4},{},{},{}\n",
            x.ports,
            x.frontends,
            x.mode.name(),
            x.rep,
            x.mpps,
            x.silent,
            opt(x.connected.map(|c| c as u64)),
            opt(x.rss_kb)
        );
    }
    s
}
