//! `dpdk-testpmd` as a scripted peer: spawned in interactive mode (`-i`) and
//! driven command by command over stdin, its output collected and parsed.
//! The process is killed on drop; while a test panics, drop prints the end of
//! the transcript.
//!
//! testpmd busy-polls its forwarding lcore, and this machine has two cores:
//! tests that run testpmd take [`exclusive`] first so at most one such test
//! runs at a time (also across the processes nextest starts).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub const TESTPMD: &str = "dpdk-testpmd";
const PROMPT: &str = "testpmd> ";

/// Hugepages one testpmd with `--total-num-mbufs=32768` needs, with margin.
pub const HUGEPAGES_NEEDED: u64 = 200;

/// Why testpmd tests cannot run here, or None when they can.
pub fn missing_prerequisite() -> Option<String> {
    if !super::is_root() {
        return Some("needs root".into());
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(TESTPMD).is_file()))
        .unwrap_or(false);
    if !found {
        return Some(format!("{TESTPMD} not in PATH (install dpdk-dev)"));
    }
    let free = free_hugepages();
    if free < HUGEPAGES_NEEDED {
        return Some(format!(
            "{free} free hugepages, need {HUGEPAGES_NEEDED} (scripts/setup-host.sh)"
        ));
    }
    None
}

/// `HugePages_Free` of /proc/meminfo (0 when unreadable).
pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// What every testpmd test starts with: the prerequisites are there (a
/// missing one fails the test with its reason, it is not skipped) and no
/// other testpmd test runs. Hold the result for the whole test.
pub fn testpmd_turn() -> Exclusive {
    if let Some(why) = missing_prerequisite() {
        panic!("testpmd test cannot run: {why}");
    }
    exclusive()
}

/// Held while a test runs testpmd: an exclusive flock, released on drop.
pub struct Exclusive(File);

/// Waits until no other testpmd test (in any process) runs.
pub fn exclusive() -> Exclusive {
    let f = File::create("/tmp/vfrelay-testpmd.lock").expect("create /tmp/vfrelay-testpmd.lock");
    // SAFETY: flock on a descriptor we own; blocks until granted.
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EINTR), "flock: {e}");
    }
    Exclusive(f)
}

/// Counters of `show port stats N`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_missed: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub rx_nombuf: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_bytes: u64,
}

/// The number after the first `key:` in `text` (testpmd prints
/// `RX-packets: 123    RX-missed: 0 ...`).
pub fn field(text: &str, key: &str) -> Option<u64> {
    let pat = format!("{key}:");
    let mut from = 0;
    while let Some(i) = text[from..].find(&pat) {
        let at = from + i;
        from = at + pat.len();
        // Whole key only: "RX-packets" must not match inside "XRX-packets".
        let prev = text[..at].chars().next_back();
        if prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            continue;
        }
        let digits: String = text[from..]
            .trim_start_matches([' ', '\t'])
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        return digits.parse().ok();
    }
    None
}

impl PortStats {
    /// Parses the output of `show port stats N` (one port).
    pub fn parse(text: &str) -> Result<PortStats, String> {
        let block = match text.find("NIC statistics for port") {
            Some(i) => &text[i..],
            None => return Err(format!("no port statistics in:\n{text}")),
        };
        let get = |k: &str| field(block, k).ok_or_else(|| format!("no {k} in:\n{block}"));
        Ok(PortStats {
            rx_packets: get("RX-packets")?,
            rx_missed: get("RX-missed")?,
            rx_bytes: get("RX-bytes")?,
            rx_errors: get("RX-errors")?,
            rx_nombuf: get("RX-nombuf")?,
            tx_packets: get("TX-packets")?,
            tx_errors: get("TX-errors")?,
            tx_bytes: get("TX-bytes")?,
        })
    }
}

/// The output of `show port stats all`: (port id, counters) per port, in
/// the order printed (port order).
pub fn split_port_stats(out: &str) -> Result<Vec<(u16, PortStats)>, String> {
    const HEAD: &str = "NIC statistics for port";
    let starts: Vec<usize> = out.match_indices(HEAD).map(|(i, _)| i).collect();
    let mut v = Vec::with_capacity(starts.len());
    for (k, &i) in starts.iter().enumerate() {
        let block = &out[i..starts.get(k + 1).copied().unwrap_or(out.len())];
        let id: String = block[HEAD.len()..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let id = id
            .parse()
            .map_err(|_| format!("no port number in:\n{block}"))?;
        v.push((id, PortStats::parse(block)?));
    }
    Ok(v)
}

/// Checks a drained port: something was sent, everything came back,
/// byte for byte, no errors.
pub fn assert_exact(what: &str, s: &PortStats) {
    assert!(s.tx_packets > 0, "{what}: sent nothing: {s:?}");
    assert_eq!(
        s.rx_packets, s.tx_packets,
        "{what}: frames lost or duplicated: {s:?}"
    );
    assert_eq!(s.rx_bytes, s.tx_bytes, "{what}: bytes: {s:?}");
    assert_eq!(
        (s.rx_errors, s.rx_missed, s.rx_nombuf, s.tx_errors),
        (0, 0, 0, 0),
        "{what}: errors: {s:?}"
    );
}

/// testpmd's mbuf pool: plenty for 2 queue pairs x (1024 RX + 1024 TX
/// descriptors) + frames in flight.
pub const MBUFS: u32 = 32768;

/// EAL arguments of a `net_virtio_user` front end on vhost-user socket
/// `sock`: forwarding lcore 1 (main lcore 0 only reads commands).
pub fn virtio_user_eal(sock: &std::path::Path, queues: usize) -> Vec<String> {
    vec![
        "--no-pci".into(),
        "--in-memory".into(),
        // One memory region for the whole heap: vhost-user allows few.
        "--single-file-segments".into(),
        "--no-telemetry".into(),
        "-l".into(),
        "0,1".into(),
        format!(
            "--vdev=net_virtio_user0,path={},queues={queues},queue_size=1024",
            sock.display()
        ),
    ]
}

/// EAL arguments of one `net_virtio_user` port per socket of `socks`
/// (port i on `socks[i]`, one queue pair, rings of `queue_size`), lcores as
/// in [`virtio_user_eal`]; `mem_mb` MiB of hugepages taken up front (many
/// ports: no heap growth, so no memory-table updates while traffic runs)
/// and file prefix `prefix`.
pub fn virtio_user_eal_ports(
    socks: &[std::path::PathBuf],
    queue_size: u32,
    mem_mb: u32,
    prefix: &str,
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--no-pci".into(),
        "--in-memory".into(),
        "--single-file-segments".into(),
        "--no-telemetry".into(),
        "-l".into(),
        "0,1".into(),
        format!("--file-prefix={prefix}"),
        "-m".into(),
        mem_mb.to_string(),
    ];
    v.extend(socks.iter().enumerate().map(|(i, s)| {
        format!(
            "--vdev=net_virtio_user{i},path={},queues=1,queue_size={queue_size}",
            s.display()
        )
    }));
    v
}

/// EAL arguments of DPDK's own vhost-user back end (`net_vhost`, server on
/// `sock`) plus `extra` vdevs: forwarding lcore 0, so that with a virtio-user
/// peer (forwarding on lcore 1) the two busy-pollers use both cores.
pub fn vhost_eal(sock: &std::path::Path, queues: usize, extra: &[String]) -> Vec<String> {
    let mut v = vhost_eal_base();
    v.push(format!(
        "--vdev=net_vhost0,iface={},queues={queues}",
        sock.display()
    ));
    v.extend_from_slice(extra);
    v
}

/// What every `net_vhost` back end here starts with: no PCI, no files,
/// forwarding lcore 0, main lcore 1.
fn vhost_eal_base() -> Vec<String> {
    [
        "--no-pci",
        "--in-memory",
        "--no-telemetry",
        "--main-lcore",
        "1",
        "-l",
        "0,1",
    ]
    .map(String::from)
    .to_vec()
}

/// EAL arguments of DPDK's `net_vhost` back end with one port per socket of
/// `socks` (server on `socks[i]`, one queue pair each), lcores as in
/// [`vhost_eal`] (forwarding lcore 0).
pub fn vhost_eal_ports(socks: &[std::path::PathBuf]) -> Vec<String> {
    let mut v = vhost_eal_base();
    v.extend(
        socks
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--vdev=net_vhost{i},iface={},queues=1", s.display())),
    );
    v
}

/// Application arguments: `queues` queue pairs, one forwarding core.
pub fn app_args(queues: usize) -> Vec<String> {
    vec![
        format!("--rxq={queues}"),
        format!("--txq={queues}"),
        "--nb-cores=1".into(),
        format!("--total-num-mbufs={MBUFS}"),
    ]
}

/// A running interactive testpmd.
pub struct Testpmd {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<Vec<u8>>,
    /// Everything it printed so far.
    out: String,
    /// End of the output already consumed by a prompt wait.
    seen: usize,
    args: Vec<String>,
}

impl Testpmd {
    /// Starts `dpdk-testpmd EAL... -- -i APP...` and waits (`timeout`) for
    /// the first prompt. `name` labels it in messages.
    pub fn spawn(
        name: &str,
        eal: &[String],
        app: &[String],
        timeout: Duration,
    ) -> Result<Testpmd, String> {
        Testpmd::spawn_in(None, name, eal, app, timeout)
    }

    /// [`spawn`](Self::spawn) inside network namespace `netns` when given
    /// (for PMDs that open interfaces: net_tap, net_af_xdp).
    pub fn spawn_in(
        netns: Option<&str>,
        name: &str,
        eal: &[String],
        app: &[String],
        timeout: Duration,
    ) -> Result<Testpmd, String> {
        let mut args: Vec<String> = eal.to_vec();
        args.push("--".into());
        args.push("-i".into());
        args.extend_from_slice(app);
        // Into a pipe testpmd's printf output is block-buffered while its
        // prompt is written directly: line-buffer stdio so that a command's
        // output arrives before the next prompt.
        // One pipe for stdout and stderr: with two, the reader threads could
        // splice a stderr line into the middle of the prompt, which testpmd
        // writes a character at a time ("t" + error line + "estpmd> ").
        let (reader, writer) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
        let writer2 = writer.try_clone().map_err(|e| format!("pipe: {e}"))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "stdbuf"]);
                c
            }
            None => Command::new("stdbuf"),
        };
        let mut child = cmd
            .args(["-oL", "-eL", TESTPMD])
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(writer)
            .stderr(writer2)
            .spawn()
            .map_err(|e| format!("cannot start stdbuf {TESTPMD}: {e}"))?;
        let (tx, rx) = channel();
        let pipes: Vec<Box<dyn Read + Send>> = vec![Box::new(reader)];
        for mut pipe in pipes {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 || tx.send(chunk[..n].to_vec()).is_err() {
                        return;
                    }
                }
            });
        }
        let mut t = Testpmd {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            rx,
            out: String::new(),
            seen: 0,
            args,
        };
        t.wait_prompt(timeout)
            .map_err(|e| format!("{e} (starting: {TESTPMD} {})", t.args.join(" ")))?;
        Ok(t)
    }

    /// Waits for the next prompt; returns the output before it.
    fn wait_prompt(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.out[self.seen..].find(PROMPT) {
                let text = self.out[self.seen..self.seen + i].to_string();
                self.seen += i + PROMPT.len();
                return Ok(text);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{}: no prompt within {timeout:?}", self.name));
            }
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.out.push_str(&String::from_utf8_lossy(&chunk)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(format!("{}: testpmd exited ({st})", self.name));
                }
            }
        }
    }

    /// Runs one command and returns its output (up to the next prompt).
    pub fn cmd(&mut self, command: &str, timeout: Duration) -> Result<String, String> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| format!("{}: stdin closed", self.name))?;
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("{}: write '{command}': {e}", self.name))?;
        self.wait_prompt(timeout)
            .map_err(|e| format!("{e} after '{command}'"))
    }

    /// `show port stats <port>`, parsed.
    pub fn port_stats(&mut self, port: u16) -> Result<PortStats, String> {
        let out = self.cmd(&format!("show port stats {port}"), Duration::from_secs(10))?;
        PortStats::parse(&out).map_err(|e| format!("{}: {e}", self.name))
    }

    /// `show port stats all`, parsed by [`split_port_stats`].
    pub fn all_port_stats(&mut self) -> Result<Vec<(u16, PortStats)>, String> {
        let out = self.cmd("show port stats all", Duration::from_secs(10))?;
        split_port_stats(&out).map_err(|e| format!("{}: {e}", self.name))
    }

    /// After `stop`: receive what is still in flight on `port` (rxonly
    /// until RX catches up with TX and 300 ms passed), stop again, and
    /// return the port's final counters.
    pub fn drain(&mut self, port: u16) -> PortStats {
        for c in ["set fwd rxonly", "start"] {
            self.cmd(c, super::secs(10))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let drained = Instant::now();
        let ten = super::secs(10);
        let _ = self.wait_stats(port, "drain", ten, ten, |s| {
            s.rx_packets >= s.tx_packets && drained.elapsed() > Duration::from_millis(300)
        });
        self.cmd("stop", ten).unwrap_or_else(|e| panic!("{e}"));
        self.port_stats(port).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls `show port stats <port>` until `done(stats)`; fails when
    /// `timeout` passes or the counters stop moving for `stall`.
    pub fn wait_stats(
        &mut self,
        port: u16,
        what: &str,
        timeout: Duration,
        stall: Duration,
        done: impl Fn(&PortStats) -> bool,
    ) -> PortStats {
        let start = Instant::now();
        let mut last = self.port_stats(port).unwrap_or_else(|e| panic!("{e}"));
        let mut last_change = Instant::now();
        loop {
            if done(&last) {
                return last;
            }
            assert!(
                start.elapsed() < timeout,
                "{what}: not reached within {timeout:?}: {last:?}"
            );
            assert!(
                last_change.elapsed() < stall,
                "{what}: traffic stalled for {stall:?}: {last:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
            let s = self.port_stats(port).unwrap_or_else(|e| panic!("{e}"));
            if (s.rx_packets, s.tx_packets) != (last.rx_packets, last.tx_packets) {
                last_change = Instant::now();
            }
            last = s;
        }
    }

    /// `quit`, then waits for the process to exit (killed after `timeout`).
    pub fn quit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let deadline = Instant::now() + timeout;
        loop {
            // Keep collecting output so the pipes never fill up.
            while let Ok(chunk) = self.rx.try_recv() {
                self.out.push_str(&String::from_utf8_lossy(&chunk));
            }
            match self.child.try_wait() {
                Ok(Some(st)) => return Ok(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "{}: did not exit within {timeout:?} of quit",
                        self.name
                    ));
                }
            }
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything testpmd printed so far.
    pub fn transcript(&self) -> &str {
        &self.out
    }

    /// The end of the transcript framed for a failure message.
    pub fn transcript_tail(&self, bytes: usize) -> String {
        let mut start = self.out.len().saturating_sub(bytes);
        while !self.out.is_char_boundary(start) {
            start += 1;
        }
        format!(
            "--- testpmd {} ({TESTPMD} {}) output, last {} bytes ---\n{}\n--- end testpmd {} ---",
            self.name,
            self.args.join(" "),
            self.out.len() - start,
            &self.out[start..],
            self.name
        )
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            while let Ok(chunk) = self.rx.try_recv() {
                self.out.push_str(&String::from_utf8_lossy(&chunk));
            }
            eprintln!("{}", self.transcript_tail(12000));
        }
    }
}
