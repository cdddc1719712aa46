//! The `vm2vm` scenario: guest to guest through an L2 switch on one core.
//!
//! Front end: one `dpdk-testpmd` with 2 x P `net_virtio_user` ports (one
//! queue pair, ring 1024, MAC `02:76:66:00:00:<i+1>`), ports paired 0-1,
//! 2-3, ... (`--port-topology=paired`), `set fwd mac` with `--eth-peer`
//! so that what port 2k sends is addressed from its own MAC to port 2k+1's
//! and back: the switch sees unicast frames to MACs it has learned (the
//! first frames of `start tx_first 32` go to a MAC not yet learned and are
//! flooded). Forwarding on core 1.
//!
//! Back ends on core 0, the order rotating each repetition:
//! - vfrelay: `vfrelay daemon --workers 0 --poll` (pinned), `switch add
//!   sw0`, 2 x P vhost-user ports with `--backend switch,name=sw0`;
//! - OVS-DPDK 3.1 (see [`Ovs`]): bridge `datapath_type=netdev`, flow NORMAL,
//!   2 x P `dpdkvhostuserclient` ports (OVS connects, so the front end's
//!   virtio-user ports are the servers), its one PMD thread on core 0;
//! - testpmd `net_vhost` ports with `set fwd io` between the pairs: no
//!   lookup at all, the ceiling.
//!
//! Rate = frames received by the front end, all ports summed. Each window
//! also counts the ports that received nothing and RX / TX of the front end
//! (1.00 when every frame is delivered once; flooding to a pair's
//! neighbours shows above it with more than one pair).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::ports::{self, BURSTS, RING};
use super::{cmd, drain, sleep, Config, Raw, RuntimeDir, Sample, Side};
use crate::common::dpdk::{self, Testpmd};
use crate::common::netns::Netns;
use crate::common::vfrelay::{Rpc, Vfrelay};
use crate::common::{wait_until, TempDir};

/// Pairs one front end can hold: 2 x 16 = `RTE_MAX_ETHPORTS` of Debian's
/// DPDK 22.11.
pub const MAX_PAIRS: usize = ports::MAX_PORTS_PER_TESTPMD / 2;
/// The switch vfrelay's ports join.
pub const SWITCH: &str = "sw0";
/// OVS's DPDK memory (MiB, NUMA node 0): its shared mbuf pool for MTU 1500
/// starts at 256 Ki mbufs and halves until it fits, so this bounds it.
const OVS_SOCKET_MEM_MB: u64 = 512;
/// Where Debian's openvswitch-switch-dpdk puts the DPDK build of
/// ovs-vswitchd (`/usr/sbin/ovs-vswitchd` is whichever update-alternatives
/// picked, by default the one without DPDK).
pub const OVS_VSWITCHD_DPDK: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";
const OVS_SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";

/// The scenario name of `pairs` pairs in samples.csv and the report.
pub fn scenario(pairs: usize) -> String {
    format!("vm2vm {pairs} pair{}", if pairs == 1 { "" } else { "s" })
}

/// MAC of front-end port `i` (locally administered).
pub fn mac(i: usize) -> String {
    format!("02:76:66:00:00:{:02x}", i + 1)
}

/// The port `i` forwards to and addresses its frames to.
pub fn peer(i: usize) -> usize {
    i ^ 1
}

/// Installs OVS-DPDK (scripts/setup-ovs.sh, idempotent) unless it is there.
fn ensure_ovs() {
    if Path::new(OVS_VSWITCHD_DPDK).exists() && which("ovsdb-server") && which("ovs-vsctl") {
        return;
    }
    let script = crate::common::repo_root().join("scripts/setup-ovs.sh");
    eprintln!("vm2vm: installing OVS-DPDK ({})", script.display());
    let st = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("bash {}: {e}", script.display()));
    assert!(st.success(), "{} failed ({st})", script.display());
}

fn which(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// The front end, file prefix `prefix`, virtio-user servers if `server`;
/// mbufs and hugepage memory as the ports scenario's.
fn frontend(socks: &[PathBuf], server: bool, prefix: &str) -> Testpmd {
    let n = socks.len();
    let mut eal: Vec<String> = [
        "--no-pci",
        "--in-memory",
        // One memory region for the whole heap: vhost-user allows few.
        "--single-file-segments",
        "--no-telemetry",
        "-l",
        "0,1",
    ]
    .map(String::from)
    .to_vec();
    eal.push(format!("--file-prefix={prefix}"));
    eal.push("-m".into());
    eal.push(ports::frontend_mem_mb(n).to_string());
    for (i, s) in socks.iter().enumerate() {
        eal.push(format!(
            "--vdev=net_virtio_user{i},path={},queues=1,queue_size={RING},mac={}{}",
            s.display(),
            mac(i),
            if server { ",server=1" } else { "" }
        ));
    }
    let mut app = vec![
        "--rxq=1".to_string(),
        "--txq=1".into(),
        "--nb-cores=1".into(),
        format!("--total-num-mbufs={}", ports::frontend_mbufs(n)),
        format!("--rxd={RING}"),
        format!("--txd={RING}"),
        "--port-topology=paired".into(),
    ];
    // mac forwarding writes peer_eth_addrs[tx port] as the destination and
    // the TX port's own MAC as the source: what leaves port i is for the
    // port its pair partner is plugged into the switch with.
    app.extend((0..n).map(|i| format!("--eth-peer={i},{}", mac(peer(i)))));
    Testpmd::spawn(
        &format!("virtio-user x{n}"),
        &eal,
        &app,
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// testpmd with one `net_vhost` port per socket, io forwarding between
/// the pairs (port 2k <-> 2k+1), forwarding lcore 0.
fn dpdk_backend(socks: &[PathBuf]) -> Testpmd {
    let n = socks.len();
    let eal = dpdk::vhost_eal_ports(socks);
    let app = vec![
        "--rxq=1".to_string(),
        "--txq=1".into(),
        "--nb-cores=1".into(),
        "--total-num-mbufs=32768".into(),
        "--port-topology=paired".into(),
    ];
    let mut t = Testpmd::spawn(&format!("vhost x{n}"), &eal, &app, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    cmd(&mut t, "set fwd io");
    cmd(&mut t, "start");
    for s in socks {
        assert!(s.exists(), "net_vhost did not create {}", s.display());
    }
    t
}

/// `vfrelay ARGS... --control CONTROL` of the binary under test (the
/// client, as a user would type it); panics unless it exits 0.
fn vfrelay_ctl(cfg: &Config, control: &Path, args: &[&str]) -> String {
    let out = Command::new(&cfg.vfrelay)
        .args(args)
        .arg("--control")
        .arg(control)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", cfg.vfrelay.display()));
    assert!(
        out.status.success(),
        "`vfrelay {} --control {}` failed ({}): {}{}",
        args.join(" "),
        control.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The vfrelay daemon with switch `sw0` and one vhost-user port on it per
/// socket.
fn vfrelay_backend(cfg: &Config, control: &Path, socks: &[PathBuf]) -> Vfrelay {
    let v = ports::daemon(cfg, control, true);
    vfrelay_ctl(cfg, control, &["switch", "add", SWITCH]);
    let mut rpc = Rpc::connect(control);
    for (i, s) in socks.iter().enumerate() {
        rpc.result(
            "port_add",
            json!({
                "name": format!("p{i}"),
                "vhost_user": s,
                "backend": format!("switch,name={SWITCH}"),
                "queue_size": RING,
            }),
        );
    }
    v
}

/// A child process that is stopped (SIGTERM, then SIGKILL) on drop.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn stop(&mut self) {
        if !self.running() {
            return;
        }
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if !wait_until(Duration::from_secs(5), || !self.running()) {
            eprintln!("{} did not stop on SIGTERM, killing it", self.name);
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// OVS-DPDK run by the harness: ovsdb-server and `ovs-vswitchd-dpdk` with
/// a private database, run, log and vhost socket directory in a temp dir,
/// in a network namespace of their own (a netdev bridge's local port is a
/// kernel tap, which then appears and goes away there, not on the host).
/// No system service, nothing under /etc or /var. Dropping it stops both
/// processes, then removes the namespace and the directory.
pub struct Ovs {
    // Field order is drop order: the processes before their namespace and
    // the directory holding their sockets.
    vswitchd: Option<Proc>,
    db: Proc,
    ns: Netns,
    dir: TempDir,
}

impl Ovs {
    /// Starts both daemons, configured for DPDK with the PMD thread on
    /// core 0, and a bridge `br0` (`datapath_type=netdev`, flow NORMAL).
    pub fn start() -> Ovs {
        let dir = TempDir::new();
        let ns = Netns::new();
        let d = dir.path().to_path_buf();
        let db = d.join("conf.db");
        crate::common::run_ok("ovsdb-tool", &["create", db.to_str().unwrap(), OVS_SCHEMA]);
        let out = |name: &str| {
            let f = std::fs::File::create(d.join(name)).expect("create log");
            (Stdio::from(f.try_clone().unwrap()), Stdio::from(f))
        };
        let (o, e) = out("ovsdb-server.out");
        let mut c = Command::new("ovsdb-server");
        c.arg(&db)
            .arg(format!("--remote=punix:{}", d.join("db.sock").display()))
            .arg(format!(
                "--unixctl={}",
                d.join("ovsdb-server.ctl").display()
            ))
            .arg(format!(
                "--pidfile={}",
                d.join("ovsdb-server.pid").display()
            ))
            .arg(format!(
                "--log-file={}",
                d.join("ovsdb-server.log").display()
            ));
        let dbp = Proc {
            name: "ovsdb-server",
            child: spawn_on_core0(&mut c, &d, o, e),
        };
        let mut ovs = Ovs {
            vswitchd: None,
            db: dbp,
            ns,
            dir,
        };
        let sock = ovs.dir.join("db.sock");
        let up = wait_until(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        assert!(up, "ovsdb-server not listening:\n{}", ovs.logs_tail());
        ovs.vsctl(&["--no-wait", "init"]);
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:dpdk-init=true",
            &format!("other_config:dpdk-socket-mem={OVS_SOCKET_MEM_MB}"),
            // The main lcore (and so OVS's non-PMD threads' EAL mapping)
            // on core 0 with the PMD: core 1 is the front end's.
            "other_config:dpdk-lcore-mask=0x1",
            "other_config:pmd-cpu-mask=0x1",
            // No files in /dev/hugepages or /var/run/dpdk, no PCI scan,
            // no telemetry socket: as the harness's testpmds.
            "other_config:dpdk-extra=--in-memory --no-pci --no-telemetry",
        ]);
        let (o, e) = out("ovs-vswitchd.out");
        let mut c = ovs.ns.command(OVS_VSWITCHD_DPDK);
        c.arg(format!("unix:{}", d.join("db.sock").display()))
            .arg(format!(
                "--unixctl={}",
                d.join("ovs-vswitchd.ctl").display()
            ))
            .arg(format!(
                "--pidfile={}",
                d.join("ovs-vswitchd.pid").display()
            ))
            .arg(format!(
                "--log-file={}",
                d.join("ovs-vswitchd.log").display()
            ));
        ovs.vswitchd = Some(Proc {
            name: "ovs-vswitchd",
            child: spawn_on_core0(&mut c, &d, o, e),
        });
        // Without --no-wait ovs-vsctl waits until ovs-vswitchd has applied
        // the change: DPDK is up and the bridge exists.
        ovs.vsctl_t(
            120,
            &[
                "add-br",
                "br0",
                "--",
                "set",
                "bridge",
                "br0",
                "datapath_type=netdev",
            ],
        );
        ovs
    }

    /// `ovs-vsctl --db=... --timeout=30 ARGS`, panicking with the logs on
    /// failure; returns stdout.
    pub fn vsctl(&self, args: &[&str]) -> String {
        self.vsctl_t(30, args)
    }

    fn vsctl_t(&self, timeout: u32, args: &[&str]) -> String {
        let out = self
            .client("ovs-vsctl")
            .arg(format!("--db=unix:{}", self.dir.join("db.sock").display()))
            .arg(format!("--timeout={timeout}"))
            .args(args)
            .output()
            .expect("ovs-vsctl");
        assert!(
            out.status.success(),
            "ovs-vsctl {} failed ({}): {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ovs-appctl -t <vswitchd> ARGS`: stdout, or the error text.
    pub fn appctl(&self, args: &[&str]) -> String {
        let out = self
            .client("ovs-appctl")
            .arg(format!(
                "--target={}",
                self.dir.join("ovs-vswitchd.ctl").display()
            ))
            .arg("--timeout=10")
            .args(args)
            .output()
            .expect("ovs-appctl");
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            s += &format!("({}) {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        s
    }

    /// A client command that looks for nothing outside the temp dir.
    fn client(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.stdin(Stdio::null());
        ovs_env(&mut c, self.dir.path());
        c
    }

    /// Adds `dpdkvhostuserclient` port `name` connecting to `path`.
    pub fn add_vhost_client(&self, name: &str, path: &Path) {
        self.vsctl(&[
            "add-port",
            "br0",
            name,
            "--",
            "set",
            "Interface",
            name,
            "type=dpdkvhostuserclient",
            &format!("options:vhost-server-path={}", path.display()),
        ]);
    }

    /// `link_state` of interface `name` ("up" once its vhost-user
    /// connection is set up).
    pub fn link_state(&self, name: &str) -> String {
        self.vsctl(&["get", "Interface", name, "link_state"])
            .trim()
            .trim_matches('"')
            .to_string()
    }

    fn vswitchd_running(&mut self) -> bool {
        self.vswitchd.as_mut().is_some_and(Proc::running)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn logs_tail(&self) -> String {
        let mut s = String::new();
        for f in [
            "ovsdb-server.out",
            "ovsdb-server.log",
            "ovs-vswitchd.out",
            "ovs-vswitchd.log",
        ] {
            let t = self.log(f);
            let mut start = t.len().saturating_sub(6000);
            while !t.is_char_boundary(start) {
                start += 1;
            }
            s += &format!("--- {f} (end) ---\n{}\n", &t[start..]);
        }
        s
    }

    /// Stops both daemons and saves their logs as `<tag>-<log>`.
    pub(super) fn stop(mut self, raw: &Raw, tag: &str) {
        // A clean exit: the bridge and its ports go, the PMD stops.
        let _ = self.appctl(&["exit", "--cleanup"]);
        let _ = wait_until(Duration::from_secs(10), || !self.vswitchd_running());
        if let Some(p) = &mut self.vswitchd {
            p.stop();
        }
        self.db.stop();
        for f in [
            "ovsdb-server.out",
            "ovsdb-server.log",
            "ovs-vswitchd.out",
            "ovs-vswitchd.log",
        ] {
            raw.save(&format!("{tag}-{f}"), &self.log(f));
        }
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs_tail());
        }
    }
}

/// OVS's run, database, log and package-config directories all in `dir`:
/// nothing of the system's OVS is read or written.
fn ovs_env(c: &mut Command, dir: &Path) {
    for k in ["OVS_RUNDIR", "OVS_DBDIR", "OVS_LOGDIR", "OVS_SYSCONFDIR"] {
        c.env(k, dir);
    }
}

/// Spawns `c` with OVS's environment for `dir`, its output into the given
/// files, pinned to core 0 (its threads inherit it; OVS pins its PMD thread
/// itself), and sent SIGTERM if the harness dies without unwinding: a
/// leftover PMD would busy-poll core 0 for good.
fn spawn_on_core0(c: &mut Command, dir: &Path, out: Stdio, err: Stdio) -> Child {
    ovs_env(c, dir);
    c.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: sched_setaffinity and prctl are async-signal-safe; the
    // closure touches nothing else of the parent. The death signal follows
    // the spawning thread, the harness's main thread.
    unsafe {
        c.pre_exec(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    c.spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", c.get_program()))
}

/// One running back end.
enum Back {
    Vfrelay(Vfrelay),
    Ovs(Box<Ovs>),
    Dpdk(Testpmd),
}

/// Sums of the front end's counters: (RX per port, RX total, TX total) and
/// the instant they stand for (the middle of the read).
fn counters(fe: &mut Testpmd) -> (Vec<u64>, u64, u64, Instant) {
    let t0 = Instant::now();
    let st = fe.all_port_stats().unwrap_or_else(|e| panic!("{e}"));
    let t1 = Instant::now();
    let rx: Vec<u64> = st.iter().map(|(_, s)| s.rx_packets).collect();
    let tx = st.iter().map(|(_, s)| s.tx_packets).sum();
    let sum = rx.iter().sum();
    (rx, sum, tx, t0 + (t1 - t0) / 2)
}

/// (flooded, flooded + unicast) frames of vfrelay's switch so far, over
/// all its ports.
fn switched(control: &Path) -> (u64, u64) {
    let v = Rpc::connect(control).result("switch_list", json!({}));
    let sw = v
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == SWITCH));
    let sw = sw.unwrap_or_else(|| panic!("no switch {SWITCH} in switch_list: {v}"));
    let n = |p: &serde_json::Value, k: &str| p[k].as_u64().unwrap_or(0);
    let ports = sw["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let flooded = ports.iter().map(|p| n(p, "flooded")).sum();
    let unicast: u64 = ports.iter().map(|p| n(p, "unicast")).sum();
    (flooded, flooded + unicast)
}

/// What a window showed besides the rate.
#[derive(Clone, Debug)]
pub struct Check {
    pub scenario: String,
    pub size: usize,
    pub side: Side,
    pub rep: usize,
    /// Front-end ports whose RX counter did not move.
    pub silent: usize,
    /// Front-end RX / TX over the window.
    pub fanout: f64,
    /// vfrelay: frames its switch flooded and frames it switched in all
    /// during the window (its `switch_list` counters, summed over ports).
    pub flooded: Option<(u64, u64)>,
}

#[derive(Clone, Debug, Default)]
pub struct Vm2vmResult {
    pub samples: Vec<Sample>,
    pub checks: Vec<Check>,
}

/// One back-end instance with `pairs` pairs: every frame size, one point
/// each.
fn instance(cfg: &Config, raw: &Raw, pairs: usize, side: Side, rep: usize, res: &mut Vm2vmResult) {
    let n = 2 * pairs;
    let scen = scenario(pairs);
    let tag = format!("vm2vm-x{pairs}-{}-rep{rep}", side.name());
    let tmp = TempDir::new();
    let socks: Vec<PathBuf> = (0..n).map(|i| tmp.join(&format!("p{i}.sock"))).collect();
    let control = tmp.join("control.sock");
    let (_rundir, prefix) = RuntimeDir::new();
    let (back, mut fe) = match side {
        Side::Vfrelay => {
            let v = vfrelay_backend(cfg, &control, &socks);
            let fe = frontend(&socks, false, &prefix);
            let c = ports::wait_connected(&control, n);
            assert_eq!(
                c,
                n,
                "vfrelay: {c} of {n} ports connected\n{}",
                v.log_text()
            );
            // Threads the daemon started for the connections.
            super::pin(v.pid(), 0);
            (Back::Vfrelay(v), fe)
        }
        Side::Ovs => {
            let ovs = Ovs::start();
            // virtio-user in server mode may wait in its probe for each
            // client in turn, so the front end starts on a thread while its
            // sockets are handed to OVS as they appear: OVS's first connect
            // is at once, a retry only a second later.
            let (s2, p2) = (socks.clone(), prefix.clone());
            let h = std::thread::spawn(move || frontend(&s2, true, &p2));
            let mut h = Some(h);
            for (i, s) in socks.iter().enumerate() {
                let fin = || h.as_ref().is_none_or(|h| h.is_finished());
                wait_until(Duration::from_secs(60), || s.exists() || fin());
                if !s.exists() {
                    // Its panic (testpmd's output) says more than ours; the
                    // join ends within its own prompt timeout.
                    if let Some(Err(e)) = h.take().map(|h| h.join()) {
                        std::panic::resume_unwind(e);
                    }
                    panic!("the front end did not create {}", s.display());
                }
                ovs.add_vhost_client(&format!("vhu{i}"), s);
            }
            let fe = match h.take().expect("joined only on failure").join() {
                Ok(fe) => fe,
                Err(e) => std::panic::resume_unwind(e),
            };
            let up = wait_until(Duration::from_secs(30), || {
                (0..n).all(|i| ovs.link_state(&format!("vhu{i}")) == "up")
            });
            assert!(up, "OVS vhost ports not up:\n{}", ovs.vsctl(&["show"]));
            (Back::Ovs(Box::new(ovs)), fe)
        }
        Side::Dpdk => {
            let t = dpdk_backend(&socks);
            (Back::Dpdk(t), frontend(&socks, false, &prefix))
        }
    };
    for &size in &cfg.vm2vm_sizes {
        let out = cmd(&mut fe, &format!("set txpkts {}", size - 4));
        assert!(!out.to_lowercase().contains("invalid"), "{out}");
        cmd(&mut fe, "set fwd mac");
        cmd(&mut fe, &format!("start tx_first {BURSTS}"));
        sleep(cfg.warm);
        let sw0 = matches!(back, Back::Vfrelay(_)).then(|| switched(&control));
        let (a, rx0, tx0, t0) = counters(&mut fe);
        sleep(cfg.secs);
        let (b, rx1, tx1, t1) = counters(&mut fe);
        let flooded = sw0.map(|(f0, all0)| {
            let (f1, all1) = switched(&control);
            (f1.saturating_sub(f0), all1.saturating_sub(all0))
        });
        let secs = (t1 - t0).as_secs_f64();
        let (rx, tx) = (rx1.saturating_sub(rx0), tx1.saturating_sub(tx0));
        let silent = b.iter().zip(&a).filter(|(b, a)| b <= a).count();
        let fanout = if tx > 0 { rx as f64 / tx as f64 } else { 0.0 };
        let mpps = rx as f64 / secs / 1e6;
        // What the switch learned and how it forwards, while traffic runs.
        match &back {
            Back::Vfrelay(_) => raw.save(
                &format!("{tag}-{size}B-switch-list.json"),
                &vfrelay_ctl(cfg, &control, &["switch", "list", "--json"]),
            ),
            Back::Ovs(o) => {
                let mut s = String::new();
                for c in [
                    &["fdb/show", "br0"][..],
                    &["dpctl/dump-flows"],
                    &["dpif-netdev/pmd-stats-show"],
                    &["dpif-netdev/pmd-rxq-show"],
                ] {
                    s += &format!("$ ovs-appctl {}\n{}\n", c.join(" "), o.appctl(c));
                }
                raw.save(&format!("{tag}-{size}B-ovs-state.txt"), &s);
            }
            Back::Dpdk(_) => {}
        }
        drain(&mut fe);
        let mut note = String::new();
        if silent > 0 {
            note += &format!(", {silent} port(s) received nothing");
        }
        if let Some((f, all)) = flooded {
            note += &format!(", {f} of {all} switched frames flooded");
        }
        eprintln!(
            "  {scen} {size:>4}B {:>7} rep {rep}: {mpps:.3} Mpps (RX/TX {fanout:.2}){note}",
            side.name()
        );
        res.samples.push(Sample {
            scenario: scen.clone(),
            queues: 1,
            size,
            side,
            rep,
            mpps,
        });
        res.checks.push(Check {
            scenario: scen.clone(),
            size,
            side,
            rep,
            silent,
            fanout,
            flooded,
        });
    }
    let _ = fe.quit(Duration::from_secs(30));
    raw.save(&format!("{tag}-virtio-user.log"), fe.transcript());
    drop(fe);
    match back {
        Back::Vfrelay(v) => {
            let stats = Command::new(&cfg.vfrelay)
                .args(["stats", "--json", "--control"])
                .arg(&control)
                .output();
            let (_, log) = v.stop();
            if let Ok(s) = stats {
                raw.save(
                    &format!("{tag}-stats.json"),
                    &String::from_utf8_lossy(&s.stdout),
                );
            }
            raw.save(&format!("{tag}-vfrelay.log"), &log);
        }
        Back::Ovs(o) => o.stop(raw, &tag),
        Back::Dpdk(mut t) => {
            let _ = t.cmd("stop", Duration::from_secs(10));
            let _ = t.quit(Duration::from_secs(30));
            raw.save(&format!("{tag}-dpdk-vhost.log"), t.transcript());
        }
    }
}

/// Hugepages (2 MiB) the largest configuration needs at once: the front
/// end and the biggest back end (OVS).
fn pages_needed(pairs: usize) -> u64 {
    u64::from(ports::frontend_mem_mb(2 * pairs)) / 2 + OVS_SOCKET_MEM_MB / 2 + 16
}

/// The whole scenario: every pair count of `cfg.vm2vm_pairs`, `cfg.reps`
/// rounds, the back ends' order rotating each round.
pub(super) fn run(cfg: &Config, raw: &Raw) -> Vm2vmResult {
    let mut res = Vm2vmResult::default();
    let Some(&max) = cfg.vm2vm_pairs.iter().max() else {
        return res;
    };
    assert!(
        max <= MAX_PAIRS,
        "vm2vm: {max} pairs, one front end holds {MAX_PAIRS}"
    );
    ensure_ovs();
    let need = pages_needed(max);
    let free = dpdk::free_hugepages();
    assert!(
        free >= need,
        "vm2vm: {free} free hugepages, {max} pairs need {need}"
    );
    for &pairs in &cfg.vm2vm_pairs {
        eprintln!("vm2vm, {pairs} pair(s) of guest ports through a switch on one core");
        for rep in 0..cfg.reps {
            let mut order = [Side::Vfrelay, Side::Ovs, Side::Dpdk];
            order.rotate_left(rep % 3);
            for side in order {
                instance(cfg, raw, pairs, side, rep, &mut res);
            }
        }
    }
    res
}

#[cfg(test)]
mod tests {
    #![allow(unused)]

    use super::*;

    #[test]
    fn pairs_address_each_other() {
        assert_eq!((peer(0), peer(1), peer(6), peer(7)), (1, 0, 7, 6));
        assert_eq!(mac(0), "02:76:66:00:00:01");
        assert_eq!(mac(31), "02:76:66:00:00:20");
        assert_eq!(scenario(1), "vm2vm 1 pair");
        assert_eq!(scenario(4), "vm2vm 4 pairs");
    }
}
