//! Tier 3, crash survival (issue 11). Either side of a vhost-user
//! connection is killed with SIGKILL and started again, over and over,
//! while traffic runs; nobody touches the survivors.
//!
//! - vfrelay killed: a QEMU (TCG) guest receives a UDP stream through
//!   `vfrelay vhost-user --client` (QEMU is the socket server, as OVS-DPDK
//!   deploys it). After each restart traffic must come back, and the
//!   guest's checker (udpcheck) must never see a corrupt, duplicated or
//!   reordered datagram: only what was in flight at the crash may be lost.
//! - The same with `vfrelay daemon --state` and four ports (the guest's
//!   and three testpmd virtio-user ports, all reconnecting), next to a
//!   second daemon that is never killed: only the killed daemon's ports
//!   pause; the other daemon's stream keeps its exact count and never
//!   stops.
//! - QEMU killed: a guest on two ports of one daemon (one where the daemon
//!   is the socket server, one where it is the client) is killed and booted
//!   again; each new guest pings through both, while a third port's
//!   testpmd stream keeps its exact count and never stops, and the daemon
//!   leaks no fd and no mapping.
//!
//! CPUs: testpmd busy-polls one of the two cores; the guest, the daemons
//! (event mode, their worker on CPU 0) and the sender share the other. The
//! testpmd streams are paced ([`paced_testpmd`]) so that they need little
//! of it.
//!
//! Needs root, QEMU and the guest from scripts/build-guest.sh; the daemon
//! tests also `dpdk-testpmd` and hugepages (scripts/setup-host.sh).

mod common;

use common::dpdk::{self, assert_exact, PortStats, Testpmd};
use common::guest::{Guest, GuestConfig, Net};
use common::netns::{Netns, Veth};
use common::udp::{read_stats, rx_grows, start_checker, stat, summary, Sender, Stats};
use common::vfrelay::Vfrelay;
use common::{secs, unique_name, wait_until, TempDir};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const GUEST_IP: &str = "10.77.30.2";
const PEER_IP: &str = "10.77.30.1";
const PORT: u16 = 5556;
const KILLS: usize = 20;

/// `vfrelay vhost-user --client` on QEMU's socket, AF_XDP on `ifname`.
fn start(sock: &Path, ifname: &str) -> Vfrelay {
    let backend = format!("af-xdp,ifname={ifname}");
    Vfrelay::spawn(
        None,
        &[
            "vhost-user",
            "--socket",
            sock.to_str().unwrap(),
            "--client",
            "--backend",
            &backend,
        ],
    )
}

/// A guest on vhost-user socket `sock` with QEMU as the socket server
/// (`server=on`: QEMU waits for the back end, and keeps the device while
/// back ends come and go).
fn server_guest(sock: &Path, cidr: &str) -> GuestConfig {
    let mut cfg = GuestConfig::vhost_user(sock, 1).ip(cidr);
    if let Net::VhostUser { server, .. } = &mut cfg.nets[0].0 {
        *server = true;
    }
    cfg
}

/// Boots the guest, starts its checker and the sender's stream to it
/// (2000 datagrams/s from `ns`) and waits until the guest receives.
fn guest_with_stream(cfg: &GuestConfig, ns: &Netns, what: &dyn Fn() -> String) -> (Guest, Sender) {
    let mut guest = Guest::boot(cfg);
    start_checker(&mut guest, PORT);
    let (st, out) = guest.retry(&format!("ping -c 1 -W 2 {PEER_IP}"), secs(30));
    assert_eq!(st, 0, "guest cannot reach {PEER_IP}:\n{out}\n{}", what());
    let sender = Sender::start(
        ns,
        &[
            "--dst".into(),
            GUEST_IP.into(),
            "--port".into(),
            PORT.to_string(),
            "--rate".into(),
            "2000".into(),
            "--duration".into(),
            "900".into(),
        ],
    );
    assert_eq!(
        rx_grows(&mut guest, 0, secs(20)),
        Some(true),
        "the guest receives nothing\n{}",
        what()
    );
    (guest, sender)
}

/// The checker's `received`.
fn received(guest: &mut Guest) -> u64 {
    stat(&read_stats(guest).expect("checker stats"), "received")
}

/// After a kill: what the guest still had queued is counted before the
/// clock starts: two equal readings 200 ms apart. Returns the count.
fn settled(guest: &mut Guest) -> u64 {
    let mut before = received(guest);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = received(guest);
        if now == before {
            return now;
        }
        before = now;
    }
}

/// Nothing but loss: no datagram corrupt, duplicated, reordered or
/// malformed, and some arrived.
fn assert_only_loss(s: &Stats) {
    for k in [
        "corrupt",
        "duplicate",
        "out_of_order",
        "bad_size",
        "bad_magic",
        "bad_len",
        "bad_crc",
        "bad_content",
        "out_of_range",
    ] {
        assert_eq!(stat(s, k), 0, "{k}: {}", summary(s));
    }
    assert!(stat(s, "received") > 0);
}

/// The guest's NIC was never reset: no transmit timeout, eth0 still up.
fn assert_nic_never_reset(guest: &mut Guest) {
    let dmesg = guest.ok("dmesg");
    assert!(!dmesg.contains("NETDEV WATCHDOG"), "{dmesg}");
    let up = guest.ok("cat /sys/class/net/eth0/operstate");
    assert!(up.contains("up"), "eth0: {up}");
}

fn median_worst(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    (v[v.len() / 2].as_secs_f64(), v[v.len() - 1].as_secs_f64())
}

#[test]
#[ignore = "needs root and QEMU"]
fn sigkill_of_vfrelay_under_a_receiving_guest_loses_only_what_was_in_flight() {
    assert!(common::is_root(), "needs root (namespaces, veths, QEMU)");
    let ns = Netns::new();
    let veth = Veth::new();
    veth.peer_for_af_xdp(&ns, &format!("{PEER_IP}/24"));
    let dir = TempDir::new();
    let sock = dir.join("qemu.sock");

    let mut vf = start(&sock, &veth.host);
    let cfg = server_guest(&sock, &format!("{GUEST_IP}/24"));
    let (mut guest, sender) = guest_with_stream(&cfg, &ns, &|| vf.log_text());

    let mut resumed = Vec::new();
    for round in 1..=KILLS {
        vf.kill();
        let before = settled(&mut guest);
        let t = Instant::now();
        vf = start(&sock, &veth.host);
        let back = rx_grows(&mut guest, before, secs(20));
        let took = t.elapsed();
        assert_eq!(
            back,
            Some(true),
            "round {round}: traffic did not come back after the restart\n{}",
            vf.log_text()
        );
        eprintln!(
            "round {round}: traffic back {:.2} s after the restart",
            took.as_secs_f64()
        );
        // An upper bound (it includes the console reads): within 1 s.
        assert!(took <= secs(1), "round {round}: back only after {took:?}");
        resumed.push(took);
    }
    std::thread::sleep(Duration::from_secs(1));
    let sent = sender.stop();
    let s = read_stats(&mut guest).expect("final checker stats");
    eprintln!("sender: {sent}\nchecker: {}", summary(&s));
    assert_only_loss(&s);
    let (median, worst) = median_worst(&mut resumed);
    eprintln!(
        "traffic back after a restart: median {median:.2} s, worst {worst:.2} s (upper bounds: \
         they include reading the guest's counters over its console)"
    );
    assert_nic_never_reset(&mut guest);
    guest.kill();
    let (st, log) = vf.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "vfrelay exit: {st:?}\n{log}"
    );
}

/// Ring size of every testpmd port (and the vfrelay default).
const RING: u32 = 1024;
/// testpmd's hugepage memory, MiB.
const TP_MEM_MB: u32 = 256;
/// `start tx_first` bursts: 4 x 32 frames circulate on every port. More
/// than the 64 a worker moves in one round, the most a crash can catch
/// between a port's TX and RX rings: a loop loses part of itself at
/// worst, never all.
const TX_FIRST: u32 = 4;
/// testpmd holds what it receives and sends it all back every 20 ms
/// (`noisy` forwarding): 128 / 20 ms = 6,400 frames/s per port. Unpaced,
/// each loop would take whatever CPU the guest leaves.
const FLUSH_MS: u32 = 20;
/// How often the watcher reads testpmd's counters.
const SAMPLE: Duration = Duration::from_millis(100);
/// A port that must not pause moves in every window this long. (Seen:
/// 100 to 490 ms, the guest booting or a neighbour's fuzzers taking the
/// CPU.)
const MAX_STALL: Duration = Duration::from_secs(1);
/// How long the killed daemon stays down each round: its ports pause for
/// longer than [`MAX_STALL`], so a stall it caused elsewhere would show.
const DOWN: Duration = Duration::from_secs(2);

/// testpmd with one virtio-user port per socket of `socks`, in order; a
/// `true` one in server mode (`server=1`), for a `--client` vfrelay port:
/// testpmd waits for the back end and takes back whichever connects next,
/// with no command. Every port sends back what it receives, paced (see
/// [`FLUSH_MS`]); the counts of a port whose back end is a loopback are
/// exact when nothing is lost. Returns with the frames sent.
fn paced_testpmd(socks: &[(PathBuf, bool)]) -> Testpmd {
    let paths: Vec<PathBuf> = socks.iter().map(|(p, _)| p.clone()).collect();
    let mut eal = dpdk::virtio_user_eal_ports(&paths, RING, TP_MEM_MB, &unique_name("f"));
    let vdevs = eal.iter_mut().filter(|a| a.starts_with("--vdev="));
    for (arg, (_, server)) in vdevs.zip(socks) {
        if *server {
            arg.push_str(",server=1");
        }
    }
    let mut app = dpdk::app_args(1);
    app.extend([
        format!("--rxd={RING}"),
        format!("--txd={RING}"),
        "--port-topology=loop".into(),
        "--noisy-tx-sw-buffer-size=4096".into(),
        format!("--noisy-tx-sw-buffer-flushtime={FLUSH_MS}"),
    ]);
    let mut tp =
        Testpmd::spawn("virtio-user", &eal, &app, secs(120)).unwrap_or_else(|e| panic!("{e}"));
    for c in ["set fwd noisy retry", &format!("start tx_first {TX_FIRST}")] {
        tp.cmd(c, secs(10)).unwrap_or_else(|e| panic!("{e}"));
    }
    tp
}

/// What the watcher saw last.
struct Seen {
    at: Instant,
    ports: Vec<PortStats>,
    /// When port `steady` last moved.
    moved: Instant,
    /// Its longest stall so far (between the readings around it).
    longest: Duration,
    error: Option<String>,
}

/// Reads testpmd's counters every [`SAMPLE`] on a thread of its own, so a
/// port that must never pause is watched also while the test waits for a
/// guest; [`Watch::now`] gives the latest reading.
struct Watch {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Testpmd>>,
}

impl Watch {
    /// Watches `tp`; port `steady` must move in every [`MAX_STALL`].
    fn start(mut tp: Testpmd, steady: usize) -> Watch {
        let first = tp.all_port_stats().unwrap_or_else(|e| panic!("{e}"));
        let now = Instant::now();
        let seen = Arc::new(Mutex::new(Seen {
            at: now,
            ports: first.into_iter().map(|(_, s)| s).collect(),
            moved: now,
            longest: Duration::ZERO,
            error: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                std::thread::sleep(SAMPLE);
                let r = tp.all_port_stats();
                let now = Instant::now();
                let mut seen = s.lock().unwrap();
                match r {
                    Ok(v) => {
                        let ports: Vec<PortStats> = v.into_iter().map(|(_, s)| s).collect();
                        if ports[steady].rx_packets != seen.ports[steady].rx_packets {
                            seen.longest = seen.longest.max(now - seen.moved);
                            seen.moved = now;
                        }
                        (seen.at, seen.ports) = (now, ports);
                    }
                    Err(e) => {
                        seen.error = Some(e);
                        break;
                    }
                }
            }
            tp
        });
        Watch {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// The latest counters; panics if the steady port stalled or testpmd
    /// stopped answering.
    fn now(&self) -> Vec<PortStats> {
        // Copied out: no assertion fails with the lock held.
        let (ports, stall, error) = {
            let seen = self.seen.lock().unwrap();
            let stall = seen.longest.max(seen.at - seen.moved);
            (seen.ports.clone(), stall, seen.error.clone())
        };
        if let Some(e) = error {
            panic!("reading testpmd's counters: {e}");
        }
        // What the PMD counts when a back end hands it a descriptor it
        // did not offer, or one twice ("no mbuf cookie").
        let bad = ports.iter().any(|p| p.rx_errors + p.tx_errors > 0);
        assert!(!bad, "testpmd counts errors: {ports:?}");
        assert!(
            stall < MAX_STALL,
            "the port that must not pause stood still for {stall:?}: {ports:?}"
        );
        ports
    }

    /// Waits until every port moved since `from` (or `timeout` passes);
    /// the time each first did, None for those that did not.
    fn moved_since(
        &self,
        from: &[PortStats],
        ports: &[usize],
        timeout: Duration,
    ) -> Vec<Option<Duration>> {
        let t = Instant::now();
        let mut back = vec![None; ports.len()];
        while back.iter().any(Option::is_none) && t.elapsed() < timeout {
            let now = self.now();
            for (b, &p) in back.iter_mut().zip(ports) {
                if b.is_none() && now[p].rx_packets > from[p].rx_packets {
                    *b = Some(t.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        back
    }

    /// Stops watching: testpmd back, and the steady port's longest stall.
    fn stop(mut self) -> (Testpmd, Duration) {
        let _ = self.now();
        self.stop.store(true, Ordering::Relaxed);
        let tp = self.thread.take().unwrap().join().expect("watcher thread");
        let longest = self.seen.lock().unwrap().longest;
        (tp, longest)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // testpmd is killed when the thread's Testpmd drops (here).
        if let Some(Ok(tp)) = self.thread.take().map(JoinHandle::join) {
            if std::thread::panicking() {
                eprintln!("{}", tp.transcript_tail(8000));
            }
        }
    }
}

/// `vfrelay port add NAME --vhost-user SOCK extra...` on daemon `d`.
fn add_port(d: &Vfrelay, name: &str, sock: &Path, extra: &[&str]) {
    let mut args = vec!["port", "add", name, "--vhost-user", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = d.ctl_ok(&args);
    assert_eq!(out.trim(), format!("port {name} added"), "port add stdout");
}

/// testpmd's drained counters of `port` must be exact, and the daemon `d`
/// serving it as port `name` must have counted the same frames.
fn assert_exact_everywhere(tp: &mut Testpmd, port: u16, d: &Vfrelay, name: &str) -> PortStats {
    tp.cmd("stop", secs(10)).unwrap_or_else(|e| panic!("{e}"));
    let s = tp.drain(port);
    assert_exact(&format!("testpmd port {port} on {name}"), &s);
    // The worker publishes at least once a second.
    let mut t = serde_json::Value::Null;
    let same = wait_until(secs(5), || {
        let ports = d.ctl_list(&["stats", name, "--json"], "ports");
        t = ports[0]["total"].clone();
        t["tx_frames"] == s.tx_packets && t["rx_frames"] == s.rx_packets
    });
    assert!(same, "{name}: vfrelay counted {t} for testpmd's {s:?}");
    // The PMD's complaint when a back end hands it a descriptor twice.
    let tr = tp.transcript();
    assert!(
        !tr.contains("no mbuf cookie"),
        "{}",
        tp.transcript_tail(4000)
    );
    s
}

fn assert_clean_exit(d: Vfrelay, what: &str) {
    let (st, log) = d.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "{what} exit: {st:?}\n{log}"
    );
}

#[test]
#[ignore = "needs root, QEMU, dpdk-testpmd, hugepages"]
fn sigkill_of_a_daemon_pauses_only_its_own_ports() {
    let _one_at_a_time = dpdk::testpmd_turn();
    let ns = Netns::new();
    let veth = Veth::new();
    veth.peer_for_af_xdp(&ns, &format!("{PEER_IP}/24"));
    let dir = TempDir::new();
    // Daemon 1, killed over and over: the guest's port and three testpmd
    // ports, every one a client (the front ends are the socket servers and
    // wait), rebuilt from its state file at each start.
    let c1 = dir.join("d1.sock");
    let state = dir.join("d1.json");
    let args1 = ["--workers", "0", "--state", state.to_str().unwrap()];
    let mut d1 = Vfrelay::daemon(&c1, &args1);
    let qemu = dir.join("qemu.sock");
    let xdp = format!("af-xdp,ifname={}", veth.host);
    add_port(&d1, "g", &qemu, &["--client", "--backend", &xdp]);
    let socks: Vec<PathBuf> = (1..=3).map(|i| dir.join(&format!("t{i}.sock"))).collect();
    for (i, s) in socks.iter().enumerate() {
        let name = format!("t{}", i + 1);
        add_port(&d1, &name, s, &["--client", "--backend", "loopback"]);
    }
    // Daemon 2, never killed: one port, testpmd its client.
    let d2 = Vfrelay::daemon(&dir.join("d2.sock"), &["--workers", "0"]);
    let steady = dir.join("s.sock");
    add_port(&d2, "s", &steady, &["--backend", "loopback"]);

    // The guest boots before testpmd takes a core.
    let cfg = server_guest(&qemu, &format!("{GUEST_IP}/24"));
    let (mut guest, sender) = guest_with_stream(&cfg, &ns, &|| d1.log_text());
    // testpmd ports 0-2 on daemon 1, port 3 on daemon 2.
    let mut tp_socks: Vec<(PathBuf, bool)> = socks.iter().map(|s| (s.clone(), true)).collect();
    tp_socks.push((steady.clone(), false));
    let watch = Watch::start(paced_testpmd(&tp_socks), 3);
    let all = [0, 1, 2, 3];
    let zero = vec![PortStats::default(); 4];
    let moving = watch.moved_since(&zero, &all, secs(30));
    assert!(
        moving.iter().all(Option::is_some),
        "testpmd ports not all moving: {moving:?} {:?}\n{}\n{}",
        watch.now(),
        d1.log_text(),
        d2.log_text()
    );

    let mut guest_back = Vec::new();
    let mut tp_back = Vec::new();
    for round in 1..=KILLS {
        d1.kill();
        let killed = Instant::now();
        let before = settled(&mut guest);
        // Daemon 1's testpmd ports have stopped too, for all of DOWN.
        let a = watch.now();
        std::thread::sleep(DOWN.saturating_sub(killed.elapsed()));
        let b = watch.now();
        for p in 0..3 {
            assert_eq!(
                a[p].rx_packets, b[p].rx_packets,
                "round {round}: port {p} of the killed daemon still moves"
            );
        }
        let t = Instant::now();
        d1 = Vfrelay::daemon(&c1, &args1);
        let tp = watch.moved_since(&b, &[0, 1, 2], secs(20));
        let back = rx_grows(&mut guest, before, secs(20));
        let took = t.elapsed();
        assert_eq!(
            back,
            Some(true),
            "round {round}: no traffic to the guest after the restart\n{}",
            d1.log_text()
        );
        let tp: Vec<Duration> = tp
            .into_iter()
            .enumerate()
            .map(|(p, b)| {
                b.unwrap_or_else(|| {
                    panic!(
                        "round {round}: testpmd port {p} did not come back: {:?}\n{}",
                        watch.now(),
                        d1.log_text()
                    )
                })
            })
            .collect();
        eprintln!(
            "round {round}: guest traffic back {:.2} s, testpmd ports {:.2?} s after the restart",
            took.as_secs_f64(),
            tp.iter().map(Duration::as_secs_f64).collect::<Vec<_>>()
        );
        // Upper bounds (console reads and the watcher's period included).
        assert!(
            took <= secs(1),
            "round {round}: guest back only after {took:?}"
        );
        for (p, d) in tp.iter().enumerate() {
            assert!(
                *d <= secs(1),
                "round {round}: port {p} back only after {d:?}"
            );
        }
        guest_back.push(took);
        tp_back.extend(tp);
    }
    std::thread::sleep(Duration::from_secs(1));
    let sent = sender.stop();
    let s = read_stats(&mut guest).expect("final checker stats");
    eprintln!("sender: {sent}\nchecker: {}", summary(&s));
    assert_only_loss(&s);
    assert_nic_never_reset(&mut guest);
    let (mut tp, longest) = watch.stop();
    let fin = assert_exact_everywhere(&mut tp, 3, &d2, "s");
    let (gm, gw) = median_worst(&mut guest_back);
    let (tm, tw) = median_worst(&mut tp_back);
    eprintln!(
        "after a restart: guest traffic back median {gm:.2} s, worst {gw:.2} s; testpmd ports \
         median {tm:.2} s, worst {tw:.2} s (upper bounds); the other daemon's port: {fin:?}, \
         longest stall {longest:?} (readings every {SAMPLE:?})"
    );
    let st = tp.quit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "testpmd exit: {st}");
    guest.kill();
    assert_clean_exit(d1, "daemon 1");
    assert_clean_exit(d2, "daemon 2");
}

/// Open fds and mappings of process `pid`.
fn fds_and_maps(pid: u32) -> (usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("/proc/PID/maps")
        .lines()
        .count();
    (fds, maps)
}

const QEMU_BOOTS: usize = 20;

#[test]
#[ignore = "needs root, QEMU, dpdk-testpmd, hugepages"]
fn sigkill_of_qemu_leaves_the_daemons_other_ports_alone() {
    let _one_at_a_time = dpdk::testpmd_turn();
    // The guest's two NICs: eth0 on a port where the daemon is the socket
    // server (QEMU the client, the usual case), eth1 on one where the
    // daemon is the client (QEMU `server=on`).
    let nets = [("10.77.34.2", "10.77.34.1"), ("10.77.35.2", "10.77.35.1")];
    let wires: Vec<(Netns, Veth)> = nets
        .iter()
        .map(|(_, peer)| {
            let (ns, veth) = (Netns::new(), Veth::new());
            veth.peer_for_af_xdp(&ns, &format!("{peer}/24"));
            (ns, veth)
        })
        .collect();
    let dir = TempDir::new();
    let d = Vfrelay::daemon(&dir.join("control.sock"), &["--workers", "0"]);
    let (srv, cli, steady) = (
        dir.join("vm.sock"),
        dir.join("vmc.sock"),
        dir.join("s.sock"),
    );
    let xdp = |i: usize| format!("af-xdp,ifname={}", wires[i].1.host);
    add_port(&d, "vm", &srv, &["--backend", &xdp(0)]);
    add_port(&d, "vmc", &cli, &["--client", "--backend", &xdp(1)]);
    add_port(&d, "s", &steady, &["--backend", "loopback"]);
    let watch = Watch::start(paced_testpmd(&[(steady.clone(), false)]), 0);
    let zero = vec![PortStats::default()];
    assert!(
        watch.moved_since(&zero, &[0], secs(30))[0].is_some(),
        "testpmd's stream does not move\n{}",
        d.log_text()
    );

    let mut cfg = GuestConfig::vhost_user(&srv, 1).ip(&format!("{}/24", nets[0].0));
    cfg.nets.push((
        Net::VhostUser {
            socket: cli.clone(),
            queues: 1,
            server: true,
        },
        "52:54:00:12:34:57".into(),
    ));
    let connected = |d: &Vfrelay| -> Vec<bool> {
        d.ctl_list(&["port", "list", "--json"], "ports")
            .iter()
            .filter(|p| p["name"] != "s")
            .map(|p| p["connected"] == true)
            .collect()
    };
    let mut first = None;
    let mut rounds = Vec::new();
    for round in 1..=QEMU_BOOTS {
        let t = Instant::now();
        let mut guest = Guest::boot(&cfg);
        guest.ok(&format!(
            "ip addr add {}/24 dev eth1 && ip link set eth1 up",
            nets[1].0
        ));
        for ((ip, peer), (ns, _)) in nets.iter().zip(&wires) {
            let (st, out) = guest.retry(&format!("ping -c 1 -W 2 {peer}"), secs(30));
            assert_eq!(
                st,
                0,
                "round {round}: guest cannot reach {peer}:\n{out}\n{}",
                d.log_text()
            );
            if let Err(out) = ns.ping(ip, 1, 1472) {
                panic!(
                    "round {round}: {peer} cannot reach the guest at {ip}:\n{out}\n{}",
                    d.log_text()
                );
            }
        }
        assert_eq!(connected(&d), [true, true], "round {round}");
        let up = t.elapsed();
        let _ = watch.now();
        guest.kill();
        // Both connections are gone: the server port listens again, the
        // client port tries to reconnect.
        let gone = wait_until(secs(10), || connected(&d) == [false, false]);
        assert!(
            gone,
            "round {round}: the daemon still sees a guest\n{}",
            d.log_text()
        );
        assert!(srv.exists(), "round {round}: {} gone", srv.display());
        let now = fds_and_maps(d.pid());
        eprintln!(
            "round {round}: guest up and pinging through both ports in {:.1} s; daemon fds {} maps {}",
            up.as_secs_f64(),
            now.0,
            now.1
        );
        first.get_or_insert(now);
        rounds.push(up);
    }
    let (first, last) = (first.unwrap(), fds_and_maps(d.pid()));
    // The same state as after the first guest went: nothing may pile up.
    assert!(
        last.0 <= first.0 + 2 && last.1 <= first.1 + 4,
        "fds {} -> {}, mappings {} -> {} after {QEMU_BOOTS} guests",
        first.0,
        last.0,
        first.1,
        last.1
    );
    let log = d.log();
    let relisten = log.matches("vm: listening again").count();
    assert_eq!(
        relisten, QEMU_BOOTS,
        "server port back to listening each time"
    );
    let (mut tp, longest) = watch.stop();
    let fin = assert_exact_everywhere(&mut tp, 0, &d, "s");
    let (median, worst) = median_worst(&mut rounds);
    eprintln!(
        "{QEMU_BOOTS} guests: boot to pinging median {median:.1} s, worst {worst:.1} s; daemon fds \
         {} -> {}, mappings {} -> {}; the steady port: {fin:?}, longest stall {longest:?} \
         (readings every {SAMPLE:?})",
        first.0, last.0, first.1, last.1
    );
    let st = tp.quit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "testpmd exit: {st}");
    assert_clean_exit(d, "daemon");
}
