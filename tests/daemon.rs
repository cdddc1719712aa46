//! `vfrelay daemon` and its control API (/work/spec/daemon.md): bad
//! requests get JSON-RPC errors and change nothing; one pinned poll worker
//! serves 32 testpmd ports with exact counts; adding and deleting ports
//! does not disturb a port that is moving traffic.
//!
//! Run as root: `cargo test --test daemon -- --ignored`
//! (the testpmd cases need `dpdk-testpmd` and 2 MiB hugepages, see
//! scripts/setup-host.sh). `RUST_LOG` sets the daemon's log level (printed
//! when a test fails).
//!
//! CPUs: the daemon's one worker runs on CPU 0 (`--workers 0`); testpmd
//! forwards on lcore 1 and reads commands on lcore 0, as in tests/testpmd.rs.

mod common;

use common::dpdk::{self, assert_exact, PortStats, Testpmd};
use common::vfrelay::{self, Rpc, Vfrelay};
use common::{secs, unique_name, wait_until, TempDir};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// Checks a JSON-RPC error response: version, `id`, `code`, a non-empty
/// message containing every one of `needles` (case-insensitive).
/// Returns the message.
fn expect_error(resp: &Value, id: &Value, code: i64, needles: &[&str]) -> String {
    assert_eq!(resp["jsonrpc"], "2.0", "{resp}");
    assert_eq!(&resp["id"], id, "reply to the wrong request: {resp}");
    assert!(resp.get("result").is_none(), "error with a result: {resp}");
    assert_eq!(resp["error"]["code"], code, "{resp}");
    let msg = resp["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {resp}"));
    assert!(!msg.trim().is_empty(), "empty error message: {resp}");
    for n in needles {
        assert!(
            msg.to_lowercase().contains(&n.to_lowercase()),
            "error message does not mention {n:?}: {resp}"
        );
    }
    msg.to_string()
}

/// Port names in `vfrelay port list --json`.
fn listed_ports(d: &Vfrelay) -> BTreeSet<String> {
    d.ctl_list(&["port", "list", "--json"], "ports")
        .iter()
        .map(|p| p["name"].as_str().expect("port name").to_string())
        .collect()
}

/// `vfrelay worker list --json`, parsed.
fn workers(d: &Vfrelay) -> Vec<Value> {
    d.ctl_list(&["worker", "list", "--json"], "workers")
}

/// `vfrelay port add NAME --vhost-user SOCK --backend loopback extra...`:
/// prints `port NAME added`, and the server socket is there on return.
fn add_port(d: &Vfrelay, name: &str, sock: &Path, extra: &[&str]) {
    let s = sock.to_str().unwrap();
    let mut args = vec![
        "port",
        "add",
        name,
        "--vhost-user",
        s,
        "--backend",
        "loopback",
    ];
    args.extend_from_slice(extra);
    let out = d.ctl_ok(&args);
    assert_eq!(out.trim(), format!("port {name} added"), "port add stdout");
    let is_sock = std::fs::metadata(sock).is_ok_and(|m| m.file_type().is_socket());
    assert!(is_sock, "port add {name} returned before {s} listens");
}

/// `vfrelay port del NAME`: prints `port NAME deleted`.
fn del_port(d: &Vfrelay, name: &str) {
    let out = d.ctl_ok(&["port", "del", name]);
    assert_eq!(
        out.trim(),
        format!("port {name} deleted"),
        "port del stdout"
    );
}

/// `vfrelay stats --json`: (rx_frames, tx_frames) of every port, summed
/// over its queue pairs, each list sorted.
fn frames_per_port(d: &Vfrelay) -> (Vec<u64>, Vec<u64>) {
    let (mut rx, mut tx): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    for p in &d.ctl_list(&["stats", "--json"], "ports") {
        let qps = p["queue_pairs"]
            .as_array()
            .unwrap_or_else(|| panic!("no queue_pairs: {p}"));
        let sum = |k: &str| -> u64 {
            qps.iter()
                .map(|q| q[k].as_u64().unwrap_or_else(|| panic!("no {k}: {q}")))
                .sum()
        };
        rx.push(sum("rx_frames"));
        tx.push(sum("tx_frames"));
    }
    rx.sort_unstable();
    tx.sort_unstable();
    (rx, tx)
}

/// SIGTERM: the daemon exits 0.
fn stop_daemon(d: Vfrelay) {
    let (st, log) = d.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "daemon did not exit cleanly on SIGTERM ({st:?})\n{log}"
    );
}

/// testpmd's accumulated forwarding counters in the output of `stop`:
/// nothing dropped.
fn assert_no_fwd_drops(stop_out: &str) {
    let acc = stop_out
        .find("Accumulated forward statistics")
        .map_or(stop_out, |i| &stop_out[i..]);
    if let Some(d) = dpdk::field(acc, "TX-dropped") {
        assert_eq!(d, 0, "testpmd dropped frames it forwarded:\n{stop_out}");
    }
}

/// A testpmd command that must succeed.
fn tp_cmd(tp: &mut Testpmd, c: &str) -> String {
    tp.cmd(c, secs(10)).unwrap_or_else(|e| panic!("{e}"))
}

/// testpmd on one virtio-user port at `sock`, sending its frames back
/// (`set fwd mac retry`, `start tx_first`) after the `setup` commands;
/// returns once `min` frames went out, with the counters then.
fn counted_stream(sock: &Path, setup: &[&str], what: &str, min: u64) -> (Testpmd, PortStats) {
    let eal = dpdk::virtio_user_eal(sock, 1);
    let mut tp = Testpmd::spawn("virtio-user", &eal, &dpdk::app_args(1), secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    for c in setup.iter().chain(&["set fwd mac retry", "start tx_first"]) {
        tp_cmd(&mut tp, c);
    }
    let s = tp.wait_stats(0, what, secs(60), secs(15), |s| s.tx_packets >= min);
    (tp, s)
}

#[test]
#[ignore = "starts a vfrelay daemon (worker pinned to CPU 0)"]
fn control_errors_get_jsonrpc_errors_and_the_daemon_goes_on() {
    let dir = TempDir::new();
    let control = dir.join("control.sock");
    let mut d = Vfrelay::daemon(&control, &["--workers", "0"]);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    let sock_a = dir.join("a.sock");
    let a = sock_a.to_str().unwrap();
    let mut rpc = Rpc::connect(&control);

    // Malformed JSON: parse error, id null.
    let r = rpc.send_line(r#"{"jsonrpc":"2.0","#);
    expect_error(&r, &Value::Null, -32700, &[]);

    let r = rpc.call(json!(1), "frobnicate", json!({}));
    expect_error(&r, &json!(1), -32601, &["frobnicate"]);

    let r = rpc.call(
        json!("add-a"),
        "port_add",
        json!({"name": "a", "vhost_user": a, "backend": "loopback"}),
    );
    assert_eq!(r["jsonrpc"], "2.0", "{r}");
    assert_eq!(r["id"], "add-a", "{r}");
    assert!(r.get("error").is_none(), "port_add a: {r}");
    let port = &r["result"];
    assert_eq!(port["name"], "a", "{r}");
    assert_eq!(port["kind"], "vhost-user", "{r}");
    assert_eq!(port["path"], a, "{r}");
    assert_eq!(port["client"], false, "{r}");
    assert_eq!(port["queues"], 1, "{r}");
    assert_eq!(port["queue_size"], 1024, "{r}");
    assert_eq!(port["mtu"], 1500, "{r}");
    assert_eq!(port["backend"], "loopback", "{r}");
    assert_eq!(port["connected"], false, "{r}");
    let qps = port["queue_pairs"].as_array().expect("queue_pairs");
    assert_eq!(qps.len(), 1, "{r}");
    assert_eq!(qps[0]["index"], 0, "{r}");
    let is_sock = std::fs::metadata(&sock_a).is_ok_and(|m| m.file_type().is_socket());
    assert!(is_sock, "port_add returned before {a} listens");

    // The same name again (another socket, so only the name clashes).
    let other = dir.join("a2.sock");
    let r = rpc.call(
        json!(3),
        "port_add",
        json!({"name": "a", "vhost_user": other.to_str().unwrap(), "backend": "loopback"}),
    );
    expect_error(&r, &json!(3), -32000, &["already exists"]);

    let r = rpc.call(json!(4), "port_del", json!({"name": "nosuch"}));
    expect_error(&r, &json!(4), -32000, &["no port named", "nosuch"]);

    // Another port on a's socket.
    let r = rpc.call(
        json!(5),
        "port_add",
        json!({"name": "b", "vhost_user": a, "backend": "loopback"}),
    );
    let msg = expect_error(&r, &json!(5), -32000, &[a]);
    eprintln!("socket in use: {msg}");

    let c_sock = dir.join("c.sock");
    let c = c_sock.to_str().unwrap();
    let r = rpc.call(
        json!(6),
        "port_add",
        json!({"name": "c", "vhost_user": c, "backend": "nope"}),
    );
    expect_error(&r, &json!(6), -32602, &["nope"]);

    // A multicast MAC cannot be a station address.
    let r = rpc.call(
        json!(7),
        "port_add",
        json!({"name": "c", "vhost_user": c, "backend": "loopback", "mac": "01:00:5e:00:00:01"}),
    );
    expect_error(&r, &json!(7), -32602, &["mac"]);

    let r = rpc.call(
        json!(8),
        "port_add",
        json!({"name": "c", "backend": "loopback"}),
    );
    let msg = expect_error(&r, &json!(8), -32602, &[]);
    let m = msg.to_lowercase();
    assert!(
        m.contains("vhost") || m.contains("vduse"),
        "missing front end: message names neither vhost_user nor vduse: {r}"
    );
    assert!(!c_sock.exists(), "a refused port_add left {c} behind");
    assert!(d.is_running(), "daemon exited\n{}", d.log_text());

    // The CLI, while the raw connection stays open.
    let (code, out, _) = d.ctl(&["port", "list"]);
    assert_eq!(code, 0, "port list: {out}");
    assert!(
        out.lines().any(|l| l.split_whitespace().any(|w| w == "a")),
        "port list does not show a:\n{out}"
    );
    let (code, out, err) = d.ctl(&["port", "del", "nosuch"]);
    assert_eq!(code, 1, "port del nosuch: stdout {out:?} stderr {err:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr must be one line: {err:?}");
    assert!(lines[0].starts_with("vfrelay: "), "stderr: {err:?}");
    assert!(lines[0].contains("nosuch"), "stderr: {err:?}");
    let nobody = dir.join("nobody.sock");
    let (code, out, err) = vfrelay::ctl_at(&nobody, &["port", "list"]);
    assert_eq!(code, 1, "no daemon: stdout {out:?} stderr {err:?}");
    assert!(err.contains("cannot reach"), "no daemon: stderr {err:?}");

    // The first connection still answers, and only a exists.
    let r = rpc.call(json!(9), "port_list", json!({}));
    assert_eq!(r["id"], 9, "{r}");
    let ports = r["result"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(ports.len(), 1, "{r}");
    assert_eq!(ports[0]["name"], "a", "{r}");
    assert_eq!(ports[0]["path"], a, "{r}");
    let ws = rpc.result("worker_list", json!({}));
    let ws = ws.as_array().unwrap_or_else(|| panic!("{ws}"));
    assert_eq!(ws.len(), 1, "--workers 0: {ws:?}");
    assert_eq!(ws[0]["cpu"], 0, "{ws:?}");
    assert_eq!(ws[0]["mode"], "event", "{ws:?}");
    assert_eq!(
        ws[0]["queue_pairs"],
        json!([{"port": "a", "index": 0}]),
        "{ws:?}"
    );
    assert_eq!(ports[0]["queue_pairs"][0]["worker"], ws[0]["id"], "{r}");

    drop(rpc);
    stop_daemon(d);
}

const PORTS: usize = 32;
/// Ring size of every port of the 32-port test: 32 x (256 RX + 256 TX)
/// descriptors fit [`dpdk::MBUFS`] mbufs with room for the frames in flight.
const RING: u32 = 256;
/// Hugepage memory of the 32-port testpmd (512 MiB: 256 pages of 2 MiB).
const MEM_MB: u32 = 512;
/// `start tx_first BURSTS`: bursts of 32 frames each port starts with.
const BURSTS: u64 = 4;

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn testpmd_32_ports_on_one_worker() {
    let _one_at_a_time = dpdk::testpmd_turn();
    let pages = dpdk::free_hugepages();
    let need = u64::from(MEM_MB) / 2 + 16;
    assert!(pages >= need, "{pages} free hugepages, need {need}");
    let dir = TempDir::new();
    let d = Vfrelay::daemon(&dir.join("control.sock"), &["--workers", "0", "--poll"]);
    let ring = RING.to_string();
    let socks: Vec<_> = (0..PORTS)
        .map(|i| dir.join(&format!("p{i}.sock")))
        .collect();
    for (i, s) in socks.iter().enumerate() {
        add_port(&d, &format!("p{i}"), s, &["--queue-size", &ring]);
    }

    let eal = dpdk::virtio_user_eal_ports(&socks, RING, MEM_MB, &unique_name("f"));
    let mut app = dpdk::app_args(1);
    app.extend([
        format!("--rxd={RING}"),
        format!("--txd={RING}"),
        // Each port forwards to itself: 32 independent circles.
        "--port-topology=loop".to_string(),
    ]);
    let mut tp =
        Testpmd::spawn("virtio-user x32", &eal, &app, secs(120)).unwrap_or_else(|e| panic!("{e}"));
    let all = |tp: &mut Testpmd| {
        let v = tp.all_port_stats().unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<u16> = v.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, (0..PORTS as u16).collect::<Vec<_>>(), "testpmd ports");
        v.into_iter().map(|(_, s)| s).collect::<Vec<PortStats>>()
    };
    let total = |v: &[PortStats]| v.iter().map(|s| s.tx_packets).sum::<u64>();

    tp_cmd(&mut tp, "set fwd mac retry");
    tp_cmd(&mut tp, &format!("start tx_first {BURSTS}"));
    let target = PORTS as u64 * 20_000;
    let (start, stall) = (Instant::now(), secs(15));
    let mut last = all(&mut tp);
    let mut last_change = Instant::now();
    while total(&last) < target && start.elapsed() < secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        let s = all(&mut tp);
        if total(&s) != total(&last) {
            last_change = Instant::now();
        }
        last = s;
        assert!(
            last_change.elapsed() < stall,
            "traffic stalled for {stall:?}: {last:?}"
        );
    }
    eprintln!(
        "testpmd: {} frames sent on {PORTS} ports in {:?}",
        total(&last),
        start.elapsed()
    );

    // While testpmd is connected: every port is, and the one worker on
    // CPU 0 polls all 32 queue pairs.
    let ws = workers(&d);
    let held = vfrelay::held_by_one_worker(&ws, "poll");
    let want: BTreeSet<(String, u64)> = (0..PORTS).map(|i| (format!("p{i}"), 0)).collect();
    assert_eq!(held, want, "queue pairs of the worker: {ws:?}");
    let ports = d.ctl_list(&["port", "list", "--json"], "ports");
    assert_eq!(ports.len(), PORTS, "{ports:?}");
    for p in &ports {
        assert_eq!(p["connected"], true, "testpmd is connected: {p}");
    }

    let fwd = tp_cmd(&mut tp, "stop");
    assert_no_fwd_drops(&fwd);
    // Receive what is still in flight.
    tp_cmd(&mut tp, "set fwd rxonly");
    tp_cmd(&mut tp, "start");
    let drained = Instant::now();
    let ok = wait_until(secs(10), || {
        let v = all(&mut tp);
        drained.elapsed() > Duration::from_millis(300)
            && v.iter().all(|s| s.rx_packets >= s.tx_packets)
    });
    tp_cmd(&mut tp, "stop");
    let fin = all(&mut tp);
    assert!(ok, "drain: not all frames came back: {fin:?}");
    for (i, s) in fin.iter().enumerate() {
        eprintln!("testpmd: port {i}: {s:?}");
        assert_exact(&format!("port {i}"), s);
        assert!(
            s.tx_packets > BURSTS * 32,
            "port {i}: nothing came back to forward: {s:?}"
        );
    }

    // vfrelay counts what testpmd counts, port by port: loopback takes
    // each frame from a port's TX ring and puts it on its RX ring.
    let mut want: Vec<u64> = fin.iter().map(|s| s.tx_packets).collect();
    want.sort_unstable();
    let mut got = (Vec::new(), Vec::new());
    let same = wait_until(secs(5), || {
        got = frames_per_port(&d);
        got.0 == want && got.1 == want
    });
    assert!(
        same,
        "vfrelay stats (sorted rx, tx frames per port) {got:?} vs testpmd {want:?}"
    );

    let st = tp.quit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "testpmd exit: {st}");
    stop_daemon(d);
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn churn_does_not_disturb_a_running_port() {
    let _one_at_a_time = dpdk::testpmd_turn();
    let dir = TempDir::new();
    let mut d = Vfrelay::daemon(&dir.join("control.sock"), &["--workers", "0", "--poll"]);
    let sock = dir.join("a.sock");
    add_port(&d, "a", &sock, &[]);

    let (mut tp, mut prev) = counted_stream(&sock, &[], "warm-up", 100_000);

    const ROUNDS: usize = 20;
    const CHURN: usize = 5;
    let names: Vec<String> = (0..CHURN).map(|i| format!("c{i}")).collect();
    for round in 0..ROUNDS {
        for n in &names {
            add_port(&d, n, &dir.join(&format!("r{round}{n}.sock")), &[]);
        }
        let mut want: BTreeSet<String> = names.iter().cloned().collect();
        want.insert("a".into());
        assert_eq!(listed_ports(&d), want, "round {round}");
        for n in &names {
            del_port(&d, n);
        }
        let s = tp.port_stats(0).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            s.tx_packets > prev.tx_packets,
            "round {round}: port a stopped moving: {prev:?} -> {s:?}"
        );
        prev = s;
        assert!(d.is_running(), "daemon exited\n{}", d.log_text());
    }
    eprintln!("testpmd: after {ROUNDS} churn rounds: {prev:?}");
    assert_eq!(
        listed_ports(&d),
        BTreeSet::from(["a".to_string()]),
        "after churn"
    );
    let ws = workers(&d);
    assert_eq!(ws.len(), 1, "{ws:?}");
    assert_eq!(
        ws[0]["queue_pairs"],
        json!([{"port": "a", "index": 0}]),
        "churned queue pairs left on the worker: {ws:?}"
    );

    let fwd = tp_cmd(&mut tp, "stop");
    assert_no_fwd_drops(&fwd);
    let s = tp.drain(0);
    eprintln!("testpmd: final {s:?}");
    assert_exact("port a", &s);

    let st = tp.quit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "testpmd exit: {st}");
    stop_daemon(d);
}

/// `port list --json` as name -> (path, mac).
fn ports_by_name(d: &Vfrelay) -> std::collections::BTreeMap<String, (String, String)> {
    d.ctl_list(&["port", "list", "--json"], "ports")
        .iter()
        .map(|p| {
            let s = |k: &str| {
                p[k].as_str()
                    .unwrap_or_else(|| panic!("no {k}: {p}"))
                    .to_string()
            };
            (s("name"), (s("path"), s("mac")))
        })
        .collect()
}

/// The port names saved in a state file.
fn saved_names(state: &Path) -> Vec<String> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    doc["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn state_file_brings_the_ports_back_after_sigkill() {
    let _one_at_a_time = dpdk::testpmd_turn();
    let dir = TempDir::new();
    let control = dir.join("control.sock");
    let state = dir.join("ports.json");
    let st = state.to_str().unwrap();
    let args = ["--workers", "0", "--state", st];
    let mut d = Vfrelay::daemon(&control, &args);
    let (a, b, c) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"));
    add_port(&d, "a", &a, &["--mac", "02:00:00:00:00:0a"]);
    add_port(&d, "b", &b, &[]);
    add_port(&d, "c", &c, &[]);
    del_port(&d, "c");
    let before = ports_by_name(&d);
    assert_eq!(saved_names(&state), ["a", "b"], "state after the changes");

    d.kill();
    let mut d = Vfrelay::daemon(&control, &args);
    // The killed daemon's socket file is still there until the new one
    // replaces it: ready is when it answers.
    assert!(
        wait_until(secs(10), || d.ctl(&["port", "list"]).0 == 0),
        "restarted daemon does not answer\n{}",
        d.log_text()
    );
    assert_eq!(
        ports_by_name(&d),
        before,
        "ports after the restart (names, sockets, MACs, the picked one too)\n{}",
        d.log_text()
    );
    d.wait_for_socket(&a, secs(10));

    // The restored port carries traffic, every frame back.
    let (mut tp, _) = counted_stream(&a, &[], "after restart", 10_000);
    let fwd = tp_cmd(&mut tp, "stop");
    assert_no_fwd_drops(&fwd);
    assert_exact("restored port a", &tp.drain(0));
    let st = tp.quit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "testpmd exit: {st}");

    // A clean stop tears the ports down but keeps them saved.
    stop_daemon(d);
    assert_eq!(saved_names(&state), ["a", "b"], "state after SIGTERM");
}

#[test]
#[ignore = "starts a vfrelay daemon (worker pinned to CPU 0)"]
fn a_saved_port_that_cannot_come_back_is_kept_until_deleted() {
    let dir = TempDir::new();
    let control = dir.join("control.sock");
    let state = dir.join("ports.json");
    let ok = dir.join("ok.sock");
    std::fs::write(
        &state,
        json!({"version": 1, "ports": [
            {"name": "gone", "vhost_user": dir.join("gone.sock"),
             "backend": "af-xdp,ifname=vfrnosuch0"},
            {"name": "ok", "vhost_user": ok, "backend": "loopback"},
        ]})
        .to_string(),
    )
    .unwrap();
    let d = Vfrelay::daemon(
        &control,
        &["--workers", "0", "--state", state.to_str().unwrap()],
    );
    assert_eq!(listed_ports(&d), BTreeSet::from(["ok".to_string()]));
    assert!(
        d.log().contains("gone: not restored from the state file"),
        "{}",
        d.log_text()
    );
    assert_eq!(
        saved_names(&state),
        ["ok", "gone"],
        "kept for the next start"
    );
    del_port(&d, "gone");
    assert_eq!(saved_names(&state), ["ok"]);
    stop_daemon(d);
}

#[test]
#[ignore = "starts a vfrelay daemon"]
fn a_state_file_that_is_not_ours_stops_the_start_and_is_left_alone() {
    let dir = TempDir::new();
    let state = dir.join("ports.json");
    std::fs::write(&state, "{\"ports\": oops").unwrap();
    let control = dir.join("control.sock");
    let mut d = Vfrelay::spawn(
        None,
        &[
            "daemon",
            "--control",
            control.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ],
    );
    assert!(
        wait_until(secs(10), || !d.is_running()),
        "daemon started on a broken state file"
    );
    let (st, log) = d.stop();
    assert!(st.is_some_and(|s| !s.success()), "exit status {st:?}");
    assert!(log.contains("state file"), "{log}");
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "{\"ports\": oops");
}

/// Can user `uid`/`gid` (no supplementary groups) connect to the unix
/// socket at `path`? Ok, or the errno of the refusal. Tried in a forked
/// child that drops to that user, so the test itself stays root.
fn connect_as(path: &Path, uid: u32, gid: u32) -> Result<(), i32> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain C data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child runs only async-signal-safe calls (setgroups,
    // setgid, setuid, socket, connect, _exit) on data prepared before the
    // fork, then exits without returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let code = if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                250
            } else {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                let ptr = &addr as *const libc::sockaddr_un as *const libc::sockaddr;
                if fd < 0 {
                    251
                } else if libc::connect(fd, ptr, len) == 0 {
                    0
                } else {
                    *libc::__errno_location()
                }
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status}");
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        c => {
            assert!(c < 250, "child could not become {uid}:{gid} ({c})");
            Err(c)
        }
    }
}

/// `id FLAG nobody`, e.g. `-u`, `-g`, `-gn`.
fn id_of_nobody(flag: &str) -> String {
    let out = std::process::Command::new("id")
        .args([flag, "nobody"])
        .output()
        .expect("id");
    assert!(out.status.success(), "id {flag} nobody");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
#[ignore = "needs root (chown, setuid) and starts a vfrelay daemon"]
fn socket_owner_and_mode_let_another_user_connect() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new();
    // Others must be able to reach the sockets' directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let uid: u32 = id_of_nobody("-u").parse().unwrap();
    let gid: u32 = id_of_nobody("-g").parse().unwrap();
    let owner = format!("nobody:{}", id_of_nobody("-gn"));
    let d = Vfrelay::daemon(&dir.join("control.sock"), &["--workers", "0"]);
    let (open, closed) = (dir.join("open.sock"), dir.join("closed.sock"));
    add_port(
        &d,
        "open",
        &open,
        &["--socket-owner", &owner, "--socket-mode", "0660"],
    );
    add_port(&d, "closed", &closed, &[]);

    let m = std::fs::metadata(&open).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (uid, gid, 0o660));
    let m = std::fs::metadata(&closed).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o600));
    assert_eq!(
        connect_as(&open, uid, gid),
        Ok(()),
        "nobody on the open socket"
    );
    assert_eq!(
        connect_as(&closed, uid, gid),
        Err(libc::EACCES),
        "nobody on the default socket"
    );

    // Both options are refused where they mean nothing, with one error.
    let (code, _, err) = d.ctl(&[
        "port",
        "add",
        "c",
        "--vhost-user",
        "/tmp/x.sock",
        "--client",
        "--socket-mode",
        "0660",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--client"), "{err}");
    let (code, _, err) = d.ctl(&[
        "port",
        "add",
        "v",
        "--vduse",
        "vd0",
        "--socket-owner",
        "nobody",
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("vhost-user port"), "{err}");
    assert_eq!(
        listed_ports(&d),
        BTreeSet::from(["open".to_string(), "closed".to_string()])
    );
    stop_daemon(d);
}

/// `GET /metrics` from `addr`: the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{r}"));
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "{head}"
    );
    body.to_string()
}

/// The value of one series in an exposition.
fn series(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn counters_and_metrics_match_what_testpmd_sent() {
    let _one_at_a_time = dpdk::testpmd_turn();
    let dir = TempDir::new();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let d = Vfrelay::daemon(
        &dir.join("control.sock"),
        &["--workers", "0", "--poll", "--metrics", &addr],
    );
    let sock = dir.join("a.sock");
    add_port(&d, "a", &sock, &[]);
    // 200-byte frames: all in the 128-255 bucket.
    let (mut tp, _) = counted_stream(&sock, &["set txpkts 200"], "warm-up", 20_000);
    // Scraped under traffic: the counters move between two scrapes.
    let tx = "vfrelay_tx_frames_total{port=\"a\",queue=\"0\"}";
    let first = series(&scrape(&addr), tx);
    std::thread::sleep(Duration::from_millis(500));
    let second = series(&scrape(&addr), tx);
    assert!(second > first && first > 0, "{first} -> {second}");

    let fwd = tp_cmd(&mut tp, "stop");
    assert_no_fwd_drops(&fwd);
    let s = tp.drain(0);
    assert_exact("port a", &s);
    // The worker publishes at least once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let ports = d.ctl_list(&["stats", "a", "--json"], "ports");
    let t = &ports[0]["total"];
    let get = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("no {k}: {t}"));
    // What testpmd sent, vfrelay took from its TX ring, and what came back
    // to testpmd, vfrelay delivered: frames and bytes.
    assert_eq!(
        (get("tx_frames"), get("tx_bytes")),
        (s.tx_packets, s.tx_bytes)
    );
    assert_eq!(
        (get("rx_frames"), get("rx_bytes")),
        (s.rx_packets, s.rx_bytes)
    );
    assert_eq!(get("tx_size_128_255"), s.tx_packets, "{t}");
    assert_eq!(get("rx_size_128_255"), s.rx_packets, "{t}");
    assert_eq!(get("tx_size_64") + get("tx_size_256_511"), 0, "{t}");
    assert_eq!((get("chain_errors"), get("rx_dropped")), (0, 0), "{t}");
    assert_eq!(
        get("backend_tx_frames"),
        s.tx_packets,
        "the loopback's own count"
    );
    let text = scrape(&addr);
    assert_eq!(series(&text, tx), s.tx_packets);
    assert_eq!(
        series(
            &text,
            "vfrelay_rx_size_frames_total{port=\"a\",queue=\"0\",size=\"128-255\"}"
        ),
        s.rx_packets
    );
    // The table names the port.
    let table = d.ctl_ok(&["stats"]);
    assert!(
        table.contains("RX_FRAMES") && table.lines().any(|l| l.starts_with("a ")),
        "{table}"
    );

    let st = tp.quit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "testpmd exit: {st}");
    // A deleted port leaves the exposition.
    del_port(&d, "a");
    assert!(!scrape(&addr).contains("port=\"a\""));
    stop_daemon(d);
}

#[test]
#[ignore = "needs root, dpdk-testpmd, hugepages"]
fn event_mode_counts_kicks_and_suppressed_interrupts() {
    let _one_at_a_time = dpdk::testpmd_turn();
    let dir = TempDir::new();
    // Event mode: the worker sleeps until testpmd kicks.
    let d = Vfrelay::daemon(&dir.join("control.sock"), &["--workers", "0"]);
    let sock = dir.join("a.sock");
    add_port(&d, "a", &sock, &[]);
    let (mut tp, _) = counted_stream(&sock, &[], "traffic", 20_000);
    tp_cmd(&mut tp, "stop");
    let s = tp.drain(0);
    assert_exact("port a", &s);
    std::thread::sleep(Duration::from_millis(1500));
    let ports = d.ctl_list(&["stats", "a", "--json"], "ports");
    let t = &ports[0]["total"];
    let get = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("no {k}: {t}"));
    // testpmd polls and asks for no interrupts: every used-ring update is
    // a suppressed interrupt, and none is sent.
    assert!(get("kicks") > 0, "{t}");
    assert!(get("interrupts_suppressed") > 0, "{t}");
    assert_eq!(get("interrupts"), 0, "{t}");
    assert_eq!(get("tx_frames"), s.tx_packets);
    let st = tp.quit(secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "testpmd exit: {st}");
    stop_daemon(d);
}

#[test]
#[ignore = "starts a vfrelay daemon"]
fn a_supervisor_hears_ready_once_the_saved_ports_are_back() {
    let dir = TempDir::new();
    let state = dir.join("ports.json");
    std::fs::write(
        &state,
        json!({"version": 1, "ports": [
            {"name": "a", "vhost_user": dir.join("a.sock"), "backend": "loopback"},
        ]})
        .to_string(),
    )
    .unwrap();
    // What systemd does for Type=notify: a datagram socket in the
    // environment.
    let notify = dir.join("notify.sock");
    let sup = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sup.set_read_timeout(Some(secs(10))).unwrap();
    let control = dir.join("control.sock");
    let (c, st, n) = (
        control.to_str().unwrap(),
        state.to_str().unwrap(),
        notify.to_str().unwrap(),
    );
    let mut d = Vfrelay::spawn_env(
        None,
        &["daemon", "--control", c, "--workers", "0", "--state", st],
        &[("NOTIFY_SOCKET", n)],
    );
    let mut buf = [0u8; 64];
    let got = sup
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY: {e}\n{}", d.log_text()));
    assert_eq!(&buf[..got], b"READY=1");
    // Ready means ready: the first request sees the restored port.
    let (code, out, err) = vfrelay::ctl_at(&control, &["port", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"a\""), "{out}");
    assert!(d.is_running());
    d.terminate(secs(5));
}
