//! Network namespaces and veth pairs for tests, with guards that remove what
//! they created on drop (also during a panic).
//!
//! Names are `vfxc<pid><tag><n>` (see [`super::unique_name`]); the first
//! constructor call in a process also removes leftovers from test processes
//! that no longer exist ([`reap_stale`]), e.g. after a CI timeout killed one.

use super::{is_stale_name as is_stale, run, run_ok, unique_name, wait_until};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::Duration;

static REAP: Once = Once::new();

/// Deletes namespaces and links named `vfxc<pid>...` whose process is gone.
pub fn reap_stale() {
    let out = run("ip", &["netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if is_stale(name) {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
    let out = run("ip", &["-o", "link", "show"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "12: vfxc123v0@vfxc123w0: <...>"
        let Some(name) = line.split(':').nth(1) else {
            continue;
        };
        let name = name.trim().split('@').next().unwrap_or("");
        if is_stale(name) {
            let _ = run("ip", &["link", "del", name]);
        }
    }
}

fn reap_once() {
    REAP.call_once(reap_stale);
}

/// A network namespace `vfxc<pid>n<k>` with `lo` up; deleted on drop
/// (interfaces inside go with it: veth ends are destroyed, taps unregistered).
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Netns {
        reap_once();
        let name = unique_name("n");
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `prog` inside the namespace (`ip netns exec`
    /// execs it, so the child's pid is `prog`'s pid).
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    /// Runs `prog args` inside the namespace and returns its output.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Output {
        self.command(prog)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {}: {e}", self.name))
    }

    /// Like [`exec`](Self::exec) but panics unless it succeeds; returns stdout.
    pub fn exec_ok(&self, prog: &str, args: &[&str]) -> String {
        let out = self.exec(prog, args);
        if !out.status.success() {
            panic!(
                "in netns {}: `{prog} {}` failed ({}): {}{}",
                self.name,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -n NS args...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// True if interface `ifname` exists in the namespace.
    pub fn has_link(&self, ifname: &str) -> bool {
        run("ip", &["-n", &self.name, "link", "show", "dev", ifname])
            .status
            .success()
    }

    /// Moves host interface `ifname` into this namespace, gives it `addr`
    /// (CIDR, e.g. "10.55.0.1/24") and sets it up.
    pub fn adopt(&self, ifname: &str, addr: &str) {
        run_ok("ip", &["link", "set", "dev", ifname, "netns", &self.name]);
        self.configure(ifname, addr);
    }

    /// Gives `ifname` (already in the namespace) `addr` and sets it up.
    pub fn configure(&self, ifname: &str, addr: &str) {
        self.ip(&["addr", "add", addr, "dev", ifname]);
        self.ip(&["link", "set", "dev", ifname, "up"]);
    }

    /// Makes `ifname` (in the namespace, `queues` TX queues) transmit on
    /// TX queue `queue` only: XPS maps every CPU to it and none to the
    /// others. Without XPS the kernel picks a TX queue by flow hash, which
    /// a test cannot aim.
    pub fn xps_only(&self, ifname: &str, queue: u32, queues: u32) {
        let dir = format!("/sys/class/net/{ifname}/queues");
        // The chosen queue first: a CPU mapped to no queue would fall back
        // to the hash.
        let mut script = format!("echo {} > {dir}/tx-{queue}/xps_cpus", all_cpus_mask());
        for q in (0..queues).filter(|q| *q != queue) {
            script.push_str(&format!(" && echo 0 > {dir}/tx-{q}/xps_cpus"));
        }
        // `ip netns exec` mounts a /sys that shows the namespace's links.
        self.exec_ok("sh", &["-c", &script]);
    }

    /// Pings `dst` from inside the namespace (busybox ping: the host may have
    /// no iputils). Returns the output; `Err` carries it when ping fails.
    pub fn ping(&self, dst: &str, count: u32, size: u32) -> Result<String, String> {
        let out = self.exec(
            "busybox",
            &[
                "ping",
                "-c",
                &count.to_string(),
                "-s",
                &size.to_string(),
                "-i",
                "0.2",
                "-W",
                "3",
                dst,
            ],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A veth pair created in the host namespace: `host` (`vfxc<pid>v<k>`) and
/// `peer` (`vfxc<pid>w<k>`). Deleting either end deletes both; drop deletes
/// `host` if it still exists in the host namespace and `peer` likewise (an end
/// moved into a [`Netns`] goes away with that namespace).
pub struct Veth {
    pub host: String,
    pub peer: String,
}

impl Veth {
    pub fn new() -> Veth {
        reap_once();
        let host = unique_name("v");
        let peer = unique_name("w");
        run_ok(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        );
        Veth { host, peer }
    }

    /// A pair whose ends each have `queues` RX and TX queues. What one end
    /// sends on TX queue q arrives on RX queue q of the other end (veth
    /// keeps the skb's queue mapping), so [`Netns::xps_only`] on one end
    /// picks the RX queue of the other.
    pub fn with_queues(queues: u32) -> Veth {
        reap_once();
        let host = unique_name("v");
        let peer = unique_name("w");
        let q = queues.to_string();
        let per_end = ["numrxqueues", &q, "numtxqueues", &q];
        let mut args = vec!["link", "add", &host];
        args.extend(per_end);
        args.extend(["type", "veth", "peer", "name", &peer]);
        args.extend(per_end);
        run_ok("ip", &args);
        Veth { host, peer }
    }

    /// Moves the peer end into `ns` with address `addr`, sets both ends up.
    pub fn peer_into(&self, ns: &Netns, addr: &str) {
        ns.adopt(&self.peer, addr);
        run_ok("ip", &["link", "set", "dev", &self.host, "up"]);
    }

    /// [`peer_into`](Self::peer_into) for a host end an AF_XDP backend
    /// serves: no IPv6 chatter on it, and the peer sends complete
    /// checksums (AF_XDP copies frames without the skb's CHECKSUM_PARTIAL
    /// state).
    pub fn peer_for_af_xdp(&self, ns: &Netns, addr: &str) {
        disable_ipv6(&self.host);
        self.peer_into(ns, addr);
        ns.exec_ok("ethtool", &["-K", &self.peer, "tx", "off"]);
    }
}

impl Default for Veth {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        for end in [&self.host, &self.peer] {
            if run("ip", &["link", "show", "dev", end]).status.success() {
                let _ = run("ip", &["link", "del", end]);
            }
        }
    }
}

/// Waits until interface `ifname` exists in the host namespace.
pub fn wait_for_link(ifname: &str, timeout: Duration) -> bool {
    wait_until(timeout, || {
        std::path::Path::new(&format!("/sys/class/net/{ifname}")).exists()
    })
}

/// Turns IPv6 off on host interface `ifname`, which keeps the link quiet
/// (no DAD, no router solicitations); best effort.
pub fn disable_ipv6(ifname: &str) {
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
}

/// Counter `name` of `ethtool -S ifname` (host namespace); None if the
/// driver has no such counter.
pub fn nic_stat(ifname: &str, name: &str) -> Option<u64> {
    let out = run_ok("ethtool", &["-S", ifname]);
    out.lines().find_map(|l| {
        let (k, v) = l.trim().split_once(':')?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

/// A cpumask (`xps_cpus` format: 32-bit hex words, comma-separated, most
/// significant first) with every configured CPU set.
fn all_cpus_mask() -> String {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize;
    (0..n.div_ceil(32))
        .rev()
        .map(|w| {
            let bits = (n - w * 32).min(32);
            let word = if bits == 32 {
                u32::MAX
            } else {
                (1u32 << bits) - 1
            };
            format!("{word:08x}")
        })
        .collect::<Vec<_>>()
        .join(",")
}
