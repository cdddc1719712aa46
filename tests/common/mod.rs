//! Helpers shared by the integration tests.
//!
//! - [`netns`]: network namespaces, veth pairs, commands inside a namespace
//!   (RAII guards that clean up on drop, also while panicking).
//! - [`guest`]: the tier-3 QEMU guest built by `scripts/build-guest.sh`,
//!   driven through its serial console.
//! - [`vfrelay`]: the `vfrelay` binary as a child process guard.
//! - [`libvirt`]: a private libvirtd run by the test, and virsh against it.
//! - [`wire`]: a raw-socket peer on a tap in a namespace (ARP, ping, UDP,
//!   VLAN tags), the far end of an emulated NIC.
//!
//! Every name a test creates on the machine (namespaces, interfaces, temp
//! directories) starts with `vfxc<pid>`, so leftovers of a killed test run can
//! be recognised and removed ([`netns::reap_stale`]).
//!
//! Not every test binary uses every helper.
#![allow(dead_code)]

pub mod dpdk;
pub mod guest;
pub mod libvirt;
pub mod netns;
pub mod udp;
pub mod vfrelay;
pub mod wire;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Prefix of every object a test creates (namespaces, links, directories).
pub const PREFIX: &str = "vfxc";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique within this machine while this process lives:
/// `vfxc<pid><tag><n>`. With a one-letter tag it fits an interface name
/// (15 bytes) for any pid up to 7 digits and n < 1000.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}{tag}{n}", std::process::id())
}

/// True when running as root (the network and guest tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The repository root (the `vfrelay` package directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command to completion, capturing its output.
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs a command, panics (with its stderr) unless it succeeds; returns stdout.
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    if !out.status.success() {
        panic!(
            "`{prog} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Appends everything `pipes` yield (a child's stdout and stderr, say) to
/// one shared log, a thread per pipe.
pub fn collect_output(pipes: Vec<Box<dyn Read + Send>>) -> Arc<Mutex<Vec<u8>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    for mut pipe in pipes {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    return;
                }
                log.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
    }
    log
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Multiplier for every timeout, from `VFRELAY_TEST_TIMEOUT_SCALE` (default 1):
/// TCG guests on a loaded CI machine may need more time.
pub fn timeout_scale() -> f64 {
    std::env::var("VFRELAY_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0)
}

/// `secs` seconds, scaled by [`timeout_scale`].
pub fn secs(secs: u64) -> Duration {
    Duration::from_secs_f64(secs as f64 * timeout_scale())
}

/// A temporary directory `/tmp/vfxc<pid>d<n>`, removed on drop. Short on
/// purpose: unix socket paths must fit 108 bytes.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static REAP: std::sync::Once = std::sync::Once::new();
        REAP.call_once(reap_stale_dirs);
        let path = std::env::temp_dir().join(unique_name("d"));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// True if `name` was made by [`unique_name`] in a process that is gone.
pub fn is_stale_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    match digits.parse::<u32>() {
        Ok(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        Err(_) => false,
    }
}

/// Removes `/tmp/vfxc<pid>...` directories of test processes that are gone
/// (killed before their guards ran).
pub fn reap_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_stale_name(&name) && e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
