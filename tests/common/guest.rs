//! The tier-3 test guest: QEMU (TCG) booting the kernel + busybox initramfs
//! that `scripts/build-guest.sh` builds into `target/guest/`, driven through
//! its serial console on QEMU's stdio.
//!
//! The guest's /init prints `VFX-GUEST-READY` and then runs a shell with no
//! prompt and terminal echo off. [`Guest::run`] writes a command followed by
//! `echo "@@VFX""<n> $?"` and reads the console up to the line
//! `@@VFX<n> <status>` (the quotes keep the marker out of any echoed input).
//!
//! QEMU is killed on drop; while a test panics, drop also prints the console
//! transcript and QEMU's stderr.

use super::{repo_root, secs, unique_name};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

const READY: &str = "VFX-GUEST-READY";
const MARK: &str = "@@VFX";

/// Default guest MAC (QEMU's usual 52:54:00 prefix).
pub const DEFAULT_MAC: &str = "52:54:00:12:34:56";

/// How the guest's NIC is connected.
#[derive(Clone, Debug)]
pub enum Net {
    /// virtio-net-pci over vhost-user: QEMU connects to `socket` (or
    /// listens on it when `server`, for `vfrelay --client`).
    VhostUser {
        socket: PathBuf,
        queues: u16,
        server: bool,
    },
    /// QEMU's own tap backend (`vhost=off`): QEMU creates/opens tap `ifname`
    /// in the host namespace. Used to check the guest image without vfrelay.
    Tap { ifname: String },
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub nets: Vec<(Net, String)>,
    /// Extra kernel command line (e.g. `vfx.ip=10.1.0.2/24`).
    pub append: String,
    pub mem_mb: u32,
    pub boot_timeout: Duration,
    /// Extra raw QEMU arguments.
    pub qemu_args: Vec<String>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            nets: Vec::new(),
            append: String::new(),
            mem_mb: 512,
            boot_timeout: secs(180),
            qemu_args: Vec::new(),
        }
    }
}

impl GuestConfig {
    /// One virtio-net NIC over vhost-user socket `socket` with `queues` pairs.
    pub fn vhost_user(socket: &Path, queues: u16) -> GuestConfig {
        GuestConfig {
            nets: vec![(
                Net::VhostUser {
                    socket: socket.to_path_buf(),
                    queues,
                    server: false,
                },
                DEFAULT_MAC.to_string(),
            )],
            ..Default::default()
        }
    }

    /// One virtio-net NIC on QEMU's tap backend.
    pub fn qemu_tap(ifname: &str) -> GuestConfig {
        GuestConfig {
            nets: vec![(
                Net::Tap {
                    ifname: ifname.to_string(),
                },
                DEFAULT_MAC.to_string(),
            )],
            ..Default::default()
        }
    }

    /// Adds `vfx.ip=ADDR` (CIDR) for eth0 to the kernel command line.
    pub fn ip(mut self, cidr: &str) -> Self {
        self.append.push_str(&format!(" vfx.ip={cidr}"));
        self
    }
}

/// Paths of the built guest, running `scripts/build-guest.sh` once per test
/// process (it returns at once when the guest is up to date).
pub fn guest_images() -> (PathBuf, PathBuf) {
    static BUILD: Once = Once::new();
    let dir = std::env::var_os("VFRELAY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest"));
    BUILD.call_once(|| {
        let script = repo_root().join("scripts/build-guest.sh");
        let out = Command::new(&script)
            .env("VFRELAY_GUEST_DIR", &dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        if !out.status.success() {
            panic!(
                "{} failed ({}):\n{}{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
    (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"))
}

#[derive(Default)]
struct Console {
    buf: Vec<u8>,
    eof: bool,
}

type Shared = Arc<(Mutex<Console>, Condvar)>;

/// A running guest. Killed on drop.
pub struct Guest {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    console: Shared,
    stderr: Arc<Mutex<Vec<u8>>>,
    seq: u32,
    /// Console bytes before this offset were already returned by `run`.
    consumed: usize,
}

impl Guest {
    /// Starts QEMU and waits for the guest shell. Panics (with the console
    /// transcript) if it does not come up within `cfg.boot_timeout`.
    pub fn boot(cfg: &GuestConfig) -> Guest {
        let (kernel, initrd) = guest_images();
        let name = unique_name("g");
        let mut cmd = Command::new("qemu-system-x86_64");
        let mem = format!("{}M", cfg.mem_mb);
        cmd.args(["-name", &name])
            .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max"])
            .args(["-m", &mem, "-smp", "1"])
            .args(["-nographic", "-nodefaults", "-no-reboot"])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
                "-numa",
                "node,memdev=mem",
            ])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args([
                "-append",
                &format!(
                    "console=ttyS0 quiet loglevel=1 panic=-1 {}",
                    cfg.append.trim()
                ),
            ])
            .args(["-serial", "stdio"]);
        for (i, (net, mac)) in cfg.nets.iter().enumerate() {
            match net {
                Net::VhostUser {
                    socket,
                    queues,
                    server,
                } => {
                    let srv = if *server { ",server=on" } else { "" };
                    cmd.args([
                        "-chardev",
                        &format!("socket,id=chr{i},path={}{srv}", socket.display()),
                        "-netdev",
                        &format!("vhost-user,id=net{i},chardev=chr{i},queues={queues}"),
                    ]);
                    let mq = if *queues > 1 {
                        format!(",mq=on,vectors={}", 2 * *queues as u32 + 2)
                    } else {
                        String::new()
                    };
                    cmd.args([
                        "-device",
                        &format!("virtio-net-pci,netdev=net{i},mac={mac},romfile={mq}"),
                    ]);
                }
                Net::Tap { ifname } => {
                    cmd.args([
                        "-netdev",
                        &format!("tap,id=net{i},ifname={ifname},script=no,downscript=no,vhost=off"),
                        "-device",
                        &format!("virtio-net-pci,netdev=net{i},mac={mac},romfile="),
                    ]);
                }
            }
        }
        cmd.args(&cfg.qemu_args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));

        let console: Shared = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        let mut out = child.stdout.take().unwrap();
        let c = console.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                let n = out.read(&mut chunk).unwrap_or(0);
                let (lock, cv) = &*c;
                let mut con = lock.lock().unwrap();
                if n == 0 {
                    con.eof = true;
                    cv.notify_all();
                    return;
                }
                con.buf.extend_from_slice(&chunk[..n]);
                cv.notify_all();
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err = child.stderr.take().unwrap();
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err.read(&mut chunk) {
                if n == 0 {
                    return;
                }
                e.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });

        let stdin = child.stdin.take();
        let mut guest = Guest {
            name,
            child,
            stdin,
            console,
            stderr,
            seq: 0,
            consumed: 0,
        };
        let started = Instant::now();
        match guest.wait_for(READY, 0, cfg.boot_timeout) {
            Some(end) => guest.consumed = end,
            None => panic!(
                "guest {} did not boot within {:?}\n{}",
                guest.name,
                cfg.boot_timeout,
                guest.transcript()
            ),
        }
        // The shell is up once it answers.
        guest.ok("true");
        eprintln!(
            "guest {}: shell ready after {:.1}s",
            guest.name,
            started.elapsed().as_secs_f64()
        );
        guest
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until `needle` appears in the console at or after byte `from`;
    /// returns the offset just past it. `None` on timeout or QEMU exit.
    fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.console;
        let mut con = lock.lock().unwrap();
        loop {
            if let Some(pos) = find(&con.buf[from.min(con.buf.len())..], needle.as_bytes()) {
                return Some(from + pos + needle.len());
            }
            let now = Instant::now();
            if con.eof || now >= deadline {
                return None;
            }
            con = cv.wait_timeout(con, deadline - now).unwrap().0;
        }
    }

    /// Runs `cmd` in the guest shell; returns (exit status, output) with
    /// `\r` removed. Panics (with the transcript) on timeout.
    pub fn run_timeout(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        self.seq += 1;
        let seq = self.seq;
        let start = self.console.0.lock().unwrap().buf.len().max(self.consumed);
        // Marker split by quotes so echoed input never matches it.
        let text = format!("{cmd}\necho \"{MARK}\"\"{seq} $?\"\n");
        let stdin = self.stdin.as_mut().expect("guest stdin closed");
        if let Err(e) = stdin.write_all(text.as_bytes()).and_then(|_| stdin.flush()) {
            panic!(
                "guest {}: writing `{cmd}` failed: {e}\n{}",
                self.name,
                self.transcript()
            );
        }
        let marker = format!("{MARK}{seq} ");
        let Some(after) = self.wait_for(&marker, start, timeout) else {
            panic!(
                "guest {}: `{cmd}` did not finish within {timeout:?}\n{}",
                self.name,
                self.transcript()
            );
        };
        let Some(eol) = self.wait_for("\n", after, secs(5)) else {
            panic!(
                "guest {}: marker line incomplete\n{}",
                self.name,
                self.transcript()
            );
        };
        let con = self.console.0.lock().unwrap();
        let body_end = after - marker.len();
        let output = String::from_utf8_lossy(&con.buf[start..body_end]).replace('\r', "");
        let status = String::from_utf8_lossy(&con.buf[after..eol])
            .trim()
            .parse::<i32>()
            .unwrap_or(-1);
        drop(con);
        self.consumed = eol;
        (status, output)
    }

    /// [`run_timeout`](Self::run_timeout) with a 60 s (scaled) timeout.
    pub fn run(&mut self, cmd: &str) -> (i32, String) {
        self.run_timeout(cmd, secs(60))
    }

    /// Runs `cmd`, panics unless it exits 0; returns its output.
    pub fn ok(&mut self, cmd: &str) -> String {
        let (status, out) = self.run(cmd);
        if status != 0 {
            panic!(
                "guest {}: `{cmd}` exited {status}:\n{out}\n--- transcript ---\n{}",
                self.name,
                self.transcript()
            );
        }
        out
    }

    /// Waits (up to `timeout`) until `cmd` exits 0 in the guest, retrying
    /// every 500 ms. Returns the last (status, output).
    pub fn retry(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.run(cmd);
            if r.0 == 0 || Instant::now() >= deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Everything the guest printed so far (`\r` removed).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.0.lock().unwrap().buf).replace('\r', "")
    }

    /// QEMU's stderr so far.
    pub fn qemu_stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Console and QEMU stderr, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- guest {} console ---\n{}\n--- qemu stderr ---\n{}\n--- end guest {} ---",
            self.name,
            self.console(),
            self.qemu_stderr(),
            self.name
        )
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills QEMU (SIGKILL: the vhost-user back end sees an abrupt
    /// disconnect) and waits for it.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("{}", self.transcript());
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
