//! The UDP stream the guest tests check payloads with: `udpsend.py` sends
//! from a namespace, `udpcheck` (tests/guest-tools) in the guest validates
//! every datagram and writes its counters to [`STATS`].

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::guest::Guest;
use super::netns::Netns;
use super::{repo_root, secs, wait_until};

/// Where the guest's udpcheck keeps its counters.
pub const STATS: &str = "/tmp/udpcheck.stats";

/// Start udpcheck on `port` in the guest and wait for its first counters.
pub fn start_checker(guest: &mut Guest, port: u16) {
    guest.ok(&format!(
        "udpcheck -p {port} -o {STATS} </dev/null >/tmp/udpcheck.log 2>&1 &"
    ));
    let (st, out) = guest.retry(&format!("test -s {STATS}"), secs(10));
    assert_eq!(
        st,
        0,
        "udpcheck did not start:\n{out}{}",
        guest.run("cat /tmp/udpcheck.log; ps").1
    );
}

/// The sender process (in the namespace); SIGTERM on drop.
pub struct Sender {
    child: Child,
}

impl Sender {
    pub fn start(ns: &Netns, args: &[String]) -> Sender {
        let script = repo_root().join("tests/guest-tools/udpsend.py");
        let child = ns
            .command("python3")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start udpsend.py");
        Sender { child }
    }

    /// Stops it (SIGTERM) and returns its summary line and stderr.
    pub fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let child = &mut self.child;
        if !wait_until(secs(5), || matches!(child.try_wait(), Ok(Some(_)))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut out);
        }
        out.trim().to_string()
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type Stats = BTreeMap<String, String>;

pub fn stat(s: &Stats, key: &str) -> u64 {
    s.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The checker's counters, read over the console; `None` if the guest does
/// not answer (a broken guest is a finding, not a harness error).
pub fn read_stats(guest: &mut Guest) -> Option<Stats> {
    let (st, out) = guest.try_run_timeout(&format!("cat {STATS}"), secs(30))?;
    if st != 0 {
        return None;
    }
    Some(
        out.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().to_string()))
            })
            .collect(),
    )
}

pub fn summary(s: &Stats) -> String {
    [
        "received",
        "corrupt",
        "duplicate",
        "out_of_order",
        "gaps",
        "out_of_range",
        "max_seq",
        "last_bad",
    ]
    .iter()
    .map(|k| format!("{k}={}", s.get(*k).map(String::as_str).unwrap_or("?")))
    .collect::<Vec<_>>()
    .join(" ")
}

/// Waits up to `timeout` for the checker's `received` to pass `base`.
/// `Some(None)` when the console died.
pub fn rx_grows(guest: &mut Guest, base: u64, timeout: Duration) -> Option<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = read_stats(guest)?;
        if stat(&s, "received") > base {
            return Some(true);
        }
        if Instant::now() >= deadline {
            return Some(false);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
