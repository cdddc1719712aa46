//! The packet-rate harness: vfrelay against DPDK's own vhost-user back end,
//! driven by `dpdk-testpmd` with a `net_virtio_user` port as the guest.
//! Shared by `benches/packet_rate.rs` (the real run) and
//! `tests/bench_smoke.rs` (CI: smoke mode, once). Both crates include
//! `tests/common` as `crate::common`.
//!
//! Cores: the machine has two. The guest's testpmd forwards on lcore 1; the
//! back end under test gets core 0 (vfrelay pinned there with
//! sched_setaffinity, DPDK's testpmd with `--main-lcore 1 -l 0,1`).

pub mod args;
mod gen;
mod plot;
mod ports;
mod report;
pub mod vm2vm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::dpdk::{self, Testpmd};
use crate::common::netns::{Netns, Veth};
use crate::common::vfrelay::Vfrelay;
use crate::common::{run, unique_name, TempDir};

pub use ports::PortsResult;
pub use report::Sample;
pub use vm2vm::Vm2vmResult;

/// Frame sizes on the wire (with the 4-byte FCS, RFC 2544 style); testpmd
/// is given `size - 4` as virtio frames carry no FCS.
pub const SIZES: [usize; 5] = [64, 256, 512, 1024, 1518];

#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    pub reps: usize,
    /// Measurement window per point.
    pub secs: f64,
    /// Warm-up before each window.
    pub warm: f64,
    /// Report directory: `<out>/<stamp>/`; raw output `<raw>/<stamp>/`.
    pub out: PathBuf,
    pub raw: PathBuf,
    pub vfrelay: PathBuf,
    /// Scenarios to run (all when empty): loopback, af-xdp, tap, idle, ports,
    /// vm2vm.
    pub only: Vec<String>,
    pub sizes: Vec<usize>,
    /// Queue pairs of the loopback scenario.
    pub loopback_queues: Vec<usize>,
    /// Directions of the af-xdp and tap scenarios (both when empty):
    /// guest-to-wire, wire-to-guest.
    pub dirs: Vec<String>,
    /// Port counts of the ports scenario; the idle daemon there gets the
    /// largest.
    pub ports: Vec<usize>,
    /// Pair counts of the vm2vm scenario (2 ports a pair).
    pub vm2vm_pairs: Vec<usize>,
    /// Frame sizes of the vm2vm scenario: the smallest and the largest
    /// unless --sizes says otherwise (three back ends, two pair counts).
    pub vm2vm_sizes: Vec<usize>,
}

impl Config {
    /// The full run (`smoke` false) or the CI smoke mode: one repetition,
    /// ~2 s per configuration (the smallest and largest frame, 1 s each), so
    /// that it stays well under two minutes.
    pub fn new(smoke: bool, out: PathBuf, raw: PathBuf, vfrelay: PathBuf) -> Config {
        Config {
            smoke,
            reps: if smoke { 1 } else { 5 },
            secs: if smoke { 1.0 } else { 2.0 },
            warm: if smoke { 0.5 } else { 0.7 },
            out,
            raw,
            vfrelay,
            only: Vec::new(),
            sizes: if smoke {
                vec![SIZES[0], SIZES[SIZES.len() - 1]]
            } else {
                SIZES.to_vec()
            },
            loopback_queues: vec![1, 2],
            dirs: Vec::new(),
            ports: if smoke {
                vec![1, 4]
            } else {
                vec![1, 4, 16, 64]
            },
            vm2vm_pairs: vec![1, 4],
            vm2vm_sizes: vec![SIZES[0], SIZES[SIZES.len() - 1]],
        }
    }

    fn wants(&self, what: &str) -> bool {
        debug_assert!(args::is_scenario(what), "--only cannot name {what}");
        self.only.is_empty() || self.only.iter().any(|o| o == what)
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C: finish unwinding (every guard removes what it made) instead of
/// dying with namespaces, veths and hugepages left behind.
fn catch_sigint() {
    let h = on_sigint as extern "C" fn(libc::c_int);
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, h as libc::sighandler_t);
        libc::signal(libc::SIGTERM, h as libc::sighandler_t);
    }
}

/// Sleeps `secs`, panicking (so guards clean up) on Ctrl-C.
fn sleep(secs: f64) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        if INTERRUPTED.load(Ordering::SeqCst) {
            panic!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

/// Reserves 2 MiB hugepages for the run and gives back what it added.
struct Hugepages {
    before: u64,
}

impl Hugepages {
    const PATH: &str = "/proc/sys/vm/nr_hugepages";
    const WANT: u64 = 1024;

    fn reserve() -> Hugepages {
        let read = || {
            std::fs::read_to_string(Self::PATH)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let before = read();
        if before < Self::WANT {
            std::fs::write(Self::PATH, Self::WANT.to_string())
                .unwrap_or_else(|e| panic!("writing {}: {e}", Self::PATH));
        }
        let _ = std::fs::create_dir_all("/dev/hugepages");
        if !run("mountpoint", &["-q", "/dev/hugepages"])
            .status
            .success()
        {
            crate::common::run_ok("mount", &["-t", "hugetlbfs", "nodev", "/dev/hugepages"]);
        }
        assert!(
            read() >= dpdk::HUGEPAGES_NEEDED * 2,
            "could not reserve hugepages"
        );
        Hugepages { before }
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        if self.before < Self::WANT {
            let _ = std::fs::write(Self::PATH, self.before.to_string());
        }
    }
}

/// DPDK's runtime directory of a front end's unique file prefix:
/// `--in-memory` still makes it and leaves it behind (empty), so it is
/// removed with this guard.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn new() -> (RuntimeDir, String) {
        let prefix = unique_name("f");
        (RuntimeDir(Path::new("/var/run/dpdk").join(&prefix)), prefix)
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pins every thread of `pid` to `cpu` (threads made later inherit it).
fn pin(pid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    for tid in tasks {
        // SAFETY: set is a valid cpu_set_t of the size passed.
        unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    }
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends with the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15; index 11 and 12 after ')'.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// Which vhost-user back end serves the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Vfrelay,
    /// testpmd `net_vhost` (in vm2vm: io forwarding between the pairs).
    Dpdk,
    /// OVS-DPDK, vm2vm only.
    Ovs,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Vfrelay => "vfrelay",
            Side::Dpdk => "dpdk",
            Side::Ovs => "ovs",
        }
    }
}

/// The host side a back end relays to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    Loopback,
    AfXdp,
    Tap,
}

/// A running back end; dropping it stops it.
enum Backend {
    Vfrelay(Vfrelay),
    Dpdk(Testpmd),
}

/// Collects raw output under `<raw>/<stamp>/`.
struct Raw {
    dir: PathBuf,
}

impl Raw {
    fn save(&self, name: &str, text: &str) {
        let _ = std::fs::write(self.dir.join(name), text);
    }
}

struct Net {
    ns: Netns,
    /// AF_XDP: the veth pair (host end for the back end, peer in `ns`).
    veth: Option<Veth>,
    /// The interface whose counters show guest-to-wire delivery, in `ns`,
    /// and the one the wire-to-guest generator sends on.
    ifname: String,
}

fn start_backend(
    cfg: &Config,
    side: Side,
    wire: Wire,
    sock: &Path,
    queues: usize,
    net: Option<&Net>,
) -> Backend {
    let q = queues.to_string();
    match side {
        Side::Vfrelay => {
            let spec = match wire {
                Wire::Loopback => "loopback".to_string(),
                Wire::AfXdp => format!(
                    "af-xdp,ifname={},mode=copy",
                    net.unwrap().veth.as_ref().unwrap().host
                ),
                Wire::Tap => format!("tap,ifname={}", net.unwrap().ifname),
            };
            let ns = if wire == Wire::Tap {
                net.map(|n| &n.ns)
            } else {
                None
            };
            let sock_s = sock.to_str().unwrap();
            let args = [
                "vhost-user",
                "--socket",
                sock_s,
                "--backend",
                &spec,
                "--queues",
                &q,
                "--queue-size",
                "1024",
                "--poll",
            ];
            let mut v = Vfrelay::spawn_with(ns, &cfg.vfrelay, &args, &[("RUST_LOG", "info")]);
            v.wait_for_socket(sock, Duration::from_secs(10));
            pin(v.pid(), 0);
            Backend::Vfrelay(v)
        }
        Side::Dpdk => {
            let (extra, fwd, ns) = match wire {
                Wire::Loopback => (vec![], "mac", None),
                Wire::AfXdp => (
                    vec![format!(
                        "--vdev=net_af_xdp0,iface={},start_queue=0,queue_count={queues}",
                        net.unwrap().veth.as_ref().unwrap().host
                    )],
                    "io",
                    None,
                ),
                Wire::Tap => (
                    vec![format!("--vdev=net_tap0,iface={}", net.unwrap().ifname)],
                    "io",
                    Some(net.unwrap().ns.name()),
                ),
            };
            let eal = dpdk::vhost_eal(sock, queues, &extra);
            let app = dpdk::app_args(queues);
            let mut t = Testpmd::spawn_in(ns, "vhost", &eal, &app, Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("{e}"));
            for c in [format!("set fwd {fwd}"), "start".into()] {
                t.cmd(&c, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            assert!(sock.exists(), "net_vhost did not create {}", sock.display());
            Backend::Dpdk(t)
        }
        Side::Ovs => unreachable!("OVS is a peer of the vm2vm scenario only"),
    }
}

impl Backend {
    /// Pins threads vfrelay started for the new connection too.
    fn repin(&self) {
        if let Backend::Vfrelay(v) = self {
            pin(v.pid(), 0);
        }
    }

    fn stop(self, raw: &Raw, tag: &str) {
        match self {
            Backend::Vfrelay(v) => {
                let (_, log) = v.stop();
                raw.save(&format!("{tag}-vfrelay.log"), &log);
            }
            Backend::Dpdk(mut t) => {
                let _ = t.cmd("stop", Duration::from_secs(10));
                let _ = t.quit(Duration::from_secs(20));
                raw.save(&format!("{tag}-dpdk-vhost.log"), t.transcript());
            }
        }
    }
}

fn guest(sock: &Path, queues: usize) -> Testpmd {
    let eal = dpdk::virtio_user_eal(sock, queues);
    let app = dpdk::app_args(queues);
    Testpmd::spawn("virtio-user", &eal, &app, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn cmd(tp: &mut Testpmd, c: &str) -> String {
    tp.cmd(c, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Counter readings over the measurement window: (packets, seconds).
fn window(cfg: &Config, mut read: impl FnMut() -> u64) -> (u64, f64) {
    sleep(cfg.warm);
    let (a, t0) = (read(), Instant::now());
    sleep(cfg.secs);
    let (b, t1) = (read(), Instant::now());
    (b.saturating_sub(a), (t1 - t0).as_secs_f64())
}

/// `frames` received on `ifname` inside `ns` (the wire side's view).
fn if_rx_packets(ns: &Netns, ifname: &str) -> u64 {
    let out = ns.exec(
        "cat",
        &[&format!("/sys/class/net/{ifname}/statistics/rx_packets")],
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Stops forwarding and takes in what is still in flight, so the next
/// point starts from empty rings.
fn drain(tp: &mut Testpmd) {
    cmd(tp, "stop");
    cmd(tp, "set fwd rxonly");
    cmd(tp, "start");
    sleep(0.2);
    cmd(tp, "stop");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Guest transmits (testpmd txonly), counted where it lands.
    GuestToWire,
    /// A generator in the namespace sends, the guest counts (rxonly).
    WireToGuest,
}

/// One back end instance: every frame size, one point each.
#[allow(clippy::too_many_arguments)]
fn run_points(
    cfg: &Config,
    raw: &Raw,
    scenario: &str,
    side: Side,
    wire: Wire,
    dir: Option<Dir>,
    queues: usize,
    rep: usize,
    net: Option<&Net>,
    out: &mut Vec<Sample>,
) {
    let tmp = TempDir::new();
    let sock = tmp.join("vu.sock");
    let be = start_backend(cfg, side, wire, &sock, queues, net);
    let mut tp = guest(&sock, queues);
    be.repin();
    let tag = format!("{scenario}-{queues}q-{}-rep{rep}", side.name());
    for &size in &cfg.sizes {
        let out_txt = cmd(&mut tp, &format!("set txpkts {}", size - 4));
        assert!(!out_txt.to_lowercase().contains("invalid"), "{out_txt}");
        let (pkts, secs) = match (wire, dir) {
            (Wire::Loopback, _) => {
                // The DTS virtio-user loopback test: mac forwarding with 32
                // bursts injected, the rate is what comes back.
                cmd(&mut tp, "set fwd mac");
                cmd(&mut tp, "start tx_first 32");
                let r = window(cfg, || tp.port_stats(0).unwrap().rx_packets);
                drain(&mut tp);
                r
            }
            (_, Some(Dir::GuestToWire)) => {
                let n = net.unwrap();
                cmd(&mut tp, "set fwd txonly");
                cmd(&mut tp, "start");
                let r = window(cfg, || if_rx_packets(&n.ns, &n.ifname));
                drain(&mut tp);
                r
            }
            (_, _) => {
                let n = net.unwrap();
                cmd(&mut tp, "set fwd rxonly");
                cmd(&mut tp, "start");
                let g = gen::Generator::start(n.ns.name(), &n.ifname, size - 4, 1);
                let r = window(cfg, || tp.port_stats(0).unwrap().rx_packets);
                let sent = g.stop();
                cmd(&mut tp, "stop");
                raw.save(
                    &format!("{tag}-{size}B-generator.txt"),
                    &format!("generator sent {sent} frames\n"),
                );
                r
            }
        };
        let mpps = pkts as f64 / secs / 1e6;
        eprintln!(
            "  {scenario} {queues}q {size:>4}B {:>7} rep {rep}: {mpps:.3} Mpps",
            side.name()
        );
        out.push(Sample {
            scenario: scenario.to_string(),
            queues,
            size,
            side,
            rep,
            mpps,
        });
    }
    let _ = tp.quit(Duration::from_secs(20));
    raw.save(&format!("{tag}-virtio-user.log"), tp.transcript());
    drop(tp);
    be.stop(raw, &tag);
}

/// Every repetition runs both back ends, the order alternating, so slow
/// drifts of the machine hit both alike.
#[allow(clippy::too_many_arguments)]
fn alternate(
    cfg: &Config,
    raw: &Raw,
    scenario: &str,
    wire: Wire,
    dir: Option<Dir>,
    queues: usize,
    net: Option<&Net>,
    out: &mut Vec<Sample>,
) {
    for rep in 0..cfg.reps {
        let order = if rep % 2 == 0 {
            [Side::Vfrelay, Side::Dpdk]
        } else {
            [Side::Dpdk, Side::Vfrelay]
        };
        for side in order {
            run_points(cfg, raw, scenario, side, wire, dir, queues, rep, net, out);
        }
    }
}

fn veth_net() -> Net {
    let ns = Netns::new();
    let veth = Veth::new();
    veth.peer_into(&ns, "10.213.0.2/24");
    // AF_XDP copy mode on veth: keep the MTU in the range XDP accepts.
    let ifname = veth.peer.clone();
    Net {
        ns,
        veth: Some(veth),
        ifname,
    }
}

fn tap_net() -> Net {
    let ns = Netns::new();
    let ifname = crate::common::unique_name("t");
    Net {
        ns,
        veth: None,
        ifname,
    }
}

/// Event mode: vfrelay without --poll next to a connected but idle guest.
fn idle_cpu(cfg: &Config, raw: &Raw) -> Vec<(String, f64, f64)> {
    let secs = if cfg.smoke { 2.0 } else { 10.0 };
    let mut rows = Vec::new();
    for poll in [false, true] {
        let tmp = TempDir::new();
        let sock = tmp.join("vu.sock");
        let mut args = vec![
            "vhost-user",
            "--socket",
            sock.to_str().unwrap(),
            "--backend",
            "loopback",
            "--queue-size",
            "1024",
        ];
        if poll {
            args.push("--poll");
        }
        let mut v = Vfrelay::spawn_with(None, &cfg.vfrelay, &args, &[("RUST_LOG", "info")]);
        v.wait_for_socket(&sock, Duration::from_secs(10));
        pin(v.pid(), 0);
        let mut tp = guest(&sock, 1);
        pin(v.pid(), 0);
        sleep(1.0);
        let (c0, t0) = (cpu_seconds(v.pid()), Instant::now());
        sleep(secs);
        let (c1, t1) = (cpu_seconds(v.pid()), Instant::now());
        let wall = (t1 - t0).as_secs_f64();
        let mode = if poll { "--poll" } else { "event (no --poll)" };
        eprintln!(
            "  idle guest, vfrelay {mode}: {:.2} % of a core over {wall:.1} s",
            100.0 * (c1 - c0) / wall
        );
        rows.push((mode.to_string(), c1 - c0, wall));
        let _ = tp.quit(Duration::from_secs(20));
        let (_, log) = v.stop();
        raw.save(
            &format!("idle-{}.log", if poll { "poll" } else { "event" }),
            &log,
        );
    }
    rows
}

fn stamp() -> String {
    let out = run("date", &["-u", "+%Y%m%dT%H%M%SZ"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs everything `cfg` asks for; returns the report directory.
pub fn run_all(cfg: &Config) -> PathBuf {
    if let Some(why) = dpdk::missing_prerequisite().filter(|w| !w.contains("hugepages")) {
        panic!("packet-rate harness cannot run: {why}");
    }
    catch_sigint();
    let _huge = Hugepages::reserve();
    // Another testpmd user (the tier-2 tests) would share our cores.
    let _excl = dpdk::exclusive();
    let stamp = stamp();
    let dir = cfg.out.join(&stamp);
    let raw = Raw {
        dir: cfg.raw.join(&stamp),
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&raw.dir).unwrap();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let started = Instant::now();
    let mut samples = Vec::new();

    if cfg.wants("loopback") {
        for &queues in &cfg.loopback_queues {
            eprintln!("loopback, {queues} queue pair(s)");
            alternate(
                cfg,
                &raw,
                "loopback",
                Wire::Loopback,
                None,
                queues,
                None,
                &mut samples,
            );
        }
    }
    for (wire, name) in [(Wire::AfXdp, "af-xdp"), (Wire::Tap, "tap")] {
        if !cfg.wants(name) {
            continue;
        }
        for (dir_, what) in [
            (Dir::GuestToWire, "guest-to-wire"),
            (Dir::WireToGuest, "wire-to-guest"),
        ] {
            debug_assert!(args::is_direction(what), "--dir cannot name {what}");
            if !cfg.dirs.is_empty() && !cfg.dirs.iter().any(|d| d == what) {
                continue;
            }
            eprintln!("{name} {what}");
            let net = if wire == Wire::AfXdp {
                veth_net()
            } else {
                tap_net()
            };
            alternate(
                cfg,
                &raw,
                &format!("{name} {what}"),
                wire,
                Some(dir_),
                1,
                Some(&net),
                &mut samples,
            );
        }
    }
    let idle = if cfg.wants("idle") {
        eprintln!("idle CPU");
        idle_cpu(cfg, &raw)
    } else {
        Vec::new()
    };
    let ports = if cfg.wants("ports") {
        ports::run(cfg, &raw)
    } else {
        PortsResult::default()
    };
    let vm2vm = if cfg.wants("vm2vm") {
        vm2vm::run(cfg, &raw)
    } else {
        Vm2vmResult::default()
    };
    // Into samples.csv and the plot with the others; the report gives them
    // a section of their own (three back ends).
    samples.extend(vm2vm.samples.iter().cloned());
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let rep = report::Report {
        cfg,
        stamp: &stamp,
        samples: &samples,
        idle: &idle,
        ports: &ports,
        vm2vm: &vm2vm,
        load_before: load_before.trim(),
        load_after: load_after.trim(),
        elapsed: started.elapsed(),
    };
    std::fs::write(dir.join("report.md"), rep.markdown()).unwrap();
    plot::draw(&dir.join("plot.svg"), &samples).unwrap_or_else(|e| panic!("plot: {e}"));
    let mut csv = String::from("scenario,queues,size,side,rep,mpps\n");
    for s in &samples {
        csv += &format!(
            "{},{},{},{},{},{:.4}\n",
            s.scenario,
            s.queues,
            s.size,
            s.side.name(),
            s.rep,
            s.mpps
        );
    }
    std::fs::write(dir.join("samples.csv"), csv).unwrap();
    if !ports.samples.is_empty() {
        std::fs::write(dir.join("ports.csv"), ports::csv(&ports)).unwrap();
    }
    eprintln!("report: {}", dir.join("report.md").display());
    dir
}
