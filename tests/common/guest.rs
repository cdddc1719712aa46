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
//!
//! [`Guest::attach`] drives the same guest started by someone else (a
//! libvirt domain) through a unix socket on its serial console instead.
//!
//! Live migration: every QEMU gets a QMP socket in its own temp directory
//! ([`Guest::qmp`], a small [`Qmp`] client). [`Guest::incoming`] starts a
//! second QEMU with the same config waiting on `-incoming unix:...`;
//! [`Guest::migrate`] moves the guest there. The destination's serial console
//! is then the live one: [`Guest::take_over`] carries the command counter
//! over, so the test keeps driving whichever `Guest` now runs the VM.

use super::netns::Netns;
use super::{repo_root, secs, unique_name, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    /// Run QEMU inside this network namespace (`ip netns exec`), e.g. so
    /// `Net::Tap` opens a tap that lives there.
    pub netns: Option<String>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            nets: Vec::new(),
            append: String::new(),
            mem_mb: 512,
            boot_timeout: secs(180),
            qemu_args: Vec::new(),
            netns: None,
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

    /// Shares host directory `dir` read-only over 9p (tag `vfx`); the guest
    /// copies its `root/` over / with [`Guest::install_share`]. The guest
    /// needs the 9p and 9pnet_virtio modules (`vfx.modules=`).
    pub fn share(mut self, dir: &Path) -> Self {
        self.qemu_args.extend([
            "-virtfs".to_string(),
            format!(
                "local,path={},mount_tag=vfx,security_model=none,readonly=on",
                dir.display()
            ),
        ]);
        self
    }

    /// Adds `vfx.ip=ADDR` (CIDR) for eth0 to the kernel command line.
    pub fn ip(mut self, cidr: &str) -> Self {
        self.append.push_str(&format!(" vfx.ip={cidr}"));
        self
    }

    /// The first NIC's MAC address.
    pub fn mac(mut self, mac: &str) -> Self {
        self.nets[0].1 = mac.to_string();
        self
    }
}

/// Copies host program `bin` to `dir/root/<dest>` and the shared libraries
/// `ldd` names to the same paths under `dir/root` (the guest has no glibc),
/// for a guest that copies `dir` in over a 9p share.
pub fn stage_program(dir: &Path, bin: &Path, dest: &str) {
    let root = dir.join("root");
    let put = |src: &Path, dst_rel: &str| {
        let dst = root.join(dst_rel.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    };
    put(bin, dest);
    let ldd = super::run_ok("ldd", &[bin.to_str().unwrap()]);
    for line in ldd.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let real = std::fs::canonicalize(p).unwrap();
            put(&real, p);
        }
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

/// Host path of guest tool `name` (a static binary from tests/guest-tools/
/// that [`guest_images`] built into the initramfs staging tree), to run it
/// on the host too, e.g. `udpburst send` from a test namespace.
pub fn guest_tool(name: &str) -> PathBuf {
    let (kernel, _) = guest_images();
    let tool = kernel
        .parent()
        .unwrap()
        .join("initramfs-root/bin")
        .join(name);
    assert!(tool.is_file(), "{} missing", tool.display());
    tool
}

/// Pings `peer_ip` from the guest and `guest_ip` from `ns`, 3 packets each
/// way with 56- and 1472-byte payloads (the latter fills a 1500-byte MTU).
pub fn ping_both_ways(guest: &mut Guest, ns: &Netns, guest_ip: &str, peer_ip: &str) {
    // The first ping also waits for the link and ARP to settle.
    let (st, out) = guest.retry(&format!("ping -c 1 -W 2 {peer_ip}"), secs(30));
    assert_eq!(st, 0, "guest cannot reach {peer_ip}:\n{out}");
    for size in [56, 1472] {
        let out = guest.ok(&format!("ping -c 3 -i 0.2 -W 3 -s {size} {peer_ip}"));
        assert!(
            out.contains("3 packets received"),
            "guest -> peer, {size} bytes:\n{out}"
        );
        let out = ns
            .ping(guest_ip, 3, size)
            .unwrap_or_else(|out| panic!("peer -> guest {guest_ip}, {size} bytes failed:\n{out}"));
        assert!(
            out.contains("3 packets received"),
            "peer -> guest, {size} bytes:\n{out}"
        );
    }
}

#[derive(Default)]
struct Console {
    buf: Vec<u8>,
    eof: bool,
}

type Shared = Arc<(Mutex<Console>, Condvar)>;

/// A running guest. Killed on drop (if this `Guest` started its QEMU).
pub struct Guest {
    name: String,
    /// QEMU, when this `Guest` started it; `None` for [`Guest::attach`].
    child: Option<Child>,
    /// Where console input goes: QEMU's stdin or the console socket.
    stdin: Option<Box<dyn Write + Send>>,
    /// The console socket of an attached guest, shut down on stop so the
    /// reader thread ends.
    socket: Option<UnixStream>,
    console: Shared,
    stderr: Arc<Mutex<Vec<u8>>>,
    seq: u32,
    /// Console bytes before this offset were already returned by `run`.
    consumed: usize,
    /// Holds the QMP and incoming-migration sockets.
    dir: TempDir,
    qmp: Option<Qmp>,
}

impl Guest {
    /// Starts QEMU and waits for the guest shell. Panics (with the console
    /// transcript) if it does not come up within `cfg.boot_timeout`.
    pub fn boot(cfg: &GuestConfig) -> Guest {
        let mut guest = Guest::spawn(cfg, &[]);
        guest.wait_ready(cfg.boot_timeout);
        guest
    }

    /// Drives a guest that something else started (a libvirt domain) over
    /// `console`, a connection to its serial console made before the guest
    /// ran (so no byte of its boot is lost), and waits for its shell like
    /// [`boot`](Self::boot). Dropping it closes the connection only.
    pub fn attach(name: &str, console: UnixStream, boot_timeout: Duration) -> Guest {
        let reader = console.try_clone().expect("clone console socket");
        let writer = console.try_clone().expect("clone console socket");
        let mut guest = Guest {
            name: name.to_string(),
            child: None,
            stdin: Some(Box::new(writer)),
            socket: Some(console),
            console: read_console(reader),
            stderr: Arc::new(Mutex::new(Vec::new())),
            seq: 0,
            consumed: 0,
            dir: TempDir::new(),
            qmp: None,
        };
        guest.wait_ready(boot_timeout);
        guest
    }

    /// Waits for `READY` and a first answer from the shell; panics with the
    /// transcript after `timeout`.
    fn wait_ready(&mut self, timeout: Duration) {
        let started = Instant::now();
        match self.wait_for(READY, 0, timeout) {
            Some(end) => self.consumed = end,
            None => panic!(
                "guest {} did not boot within {timeout:?}\n{}",
                self.name,
                self.transcript()
            ),
        }
        // The shell is up once it answers.
        self.ok("true");
        eprintln!(
            "guest {}: shell ready after {:.1}s",
            self.name,
            started.elapsed().as_secs_f64()
        );
    }

    /// Starts a migration destination: QEMU with the same devices as `cfg`
    /// waiting on [`migration_uri`](Self::migration_uri). Returns once its
    /// QMP monitor answers (its vhost-user back ends are then connected).
    pub fn incoming(cfg: &GuestConfig) -> Guest {
        Guest::incoming_opts(cfg, false)
    }

    /// [`incoming`](Self::incoming), but the VM stays paused after the
    /// migration (`-S`) until QMP `cont`: its RAM can then be compared with
    /// the paused source's, before any device touches it.
    pub fn incoming_paused(cfg: &GuestConfig) -> Guest {
        Guest::incoming_opts(cfg, true)
    }

    fn incoming_opts(cfg: &GuestConfig, paused: bool) -> Guest {
        let dir = TempDir::new();
        let uri = format!("unix:{}", dir.join("mig.sock").display());
        let mut extra = vec!["-incoming".to_string(), uri];
        if paused {
            extra.push("-S".into());
        }
        let mut guest = Guest::spawn_in(cfg, &extra, dir);
        let status = guest.qmp().status();
        assert_eq!(
            status.as_deref(),
            Some("inmigrate"),
            "destination {} not waiting for migration\n{}",
            guest.name,
            guest.transcript()
        );
        eprintln!("guest {}: migration destination ready", guest.name);
        guest
    }

    /// Where [`incoming`](Self::incoming) listens (`unix:PATH`).
    pub fn migration_uri(&self) -> String {
        format!("unix:{}", self.dir.join("mig.sock").display())
    }

    fn spawn(cfg: &GuestConfig, extra: &[String]) -> Guest {
        Guest::spawn_in(cfg, extra, TempDir::new())
    }

    fn spawn_in(cfg: &GuestConfig, extra: &[String], dir: TempDir) -> Guest {
        let (kernel, initrd) = guest_images();
        let name = unique_name("g");
        let mut cmd = match &cfg.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let mem = format!("{}M", cfg.mem_mb);
        let qmp = dir.join("qmp.sock");
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
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        cmd.args(extra);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}"));

        let console = read_console(child.stdout.take().unwrap());
        let stderr = super::collect_output(vec![Box::new(child.stderr.take().unwrap())]);

        let stdin = child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn Write + Send>);
        Guest {
            name,
            child: Some(child),
            stdin,
            socket: None,
            console,
            stderr,
            seq: 0,
            consumed: 0,
            dir,
            qmp: None,
        }
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
        match self.try_run_timeout(cmd, timeout) {
            Some(r) => r,
            None => {
                let transcript = self.transcript();
                // init restarts a shell that died: ask the new one why (the
                // console keeps kernel messages quiet).
                let kernel = if transcript.contains("init: shell exited") {
                    self.try_run_timeout("dmesg | tail -n 40", secs(20))
                        .map(|(_, out)| format!("--- guest dmesg ---\n{out}"))
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                panic!(
                    "guest {}: `{cmd}` did not finish within {timeout:?}\n{transcript}\n{kernel}",
                    self.name
                )
            }
        }
    }

    /// Like [`run_timeout`](Self::run_timeout) but `None` on timeout or
    /// QEMU exit, for tests that expect a guest may be broken.
    pub fn try_run_timeout(&mut self, cmd: &str, timeout: Duration) -> Option<(i32, String)> {
        self.seq += 1;
        let seq = self.seq;
        let start = self.console.0.lock().unwrap().buf.len().max(self.consumed);
        // Marker split by quotes so echoed input never matches it.
        let text = format!("{cmd}\necho \"{MARK}\"\"{seq} $?\"\n");
        let stdin = self.stdin.as_mut()?;
        if stdin
            .write_all(text.as_bytes())
            .and_then(|_| stdin.flush())
            .is_err()
        {
            return None;
        }
        let marker = format!("{MARK}{seq} ");
        let after = self.wait_for(&marker, start, timeout)?;
        let eol = self.wait_for("\n", after, secs(5))?;
        let con = self.console.0.lock().unwrap();
        let body_end = after - marker.len();
        let output = String::from_utf8_lossy(&con.buf[start..body_end]).replace('\r', "");
        let status = String::from_utf8_lossy(&con.buf[after..eol])
            .trim()
            .parse::<i32>()
            .unwrap_or(-1);
        drop(con);
        self.consumed = eol;
        Some((status, output))
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

    /// Waits (in the guest) until `cond` (a shell test) holds; panics with
    /// /tmp/vf.log (where guest tests put vfrelay's output) if it does not
    /// within `timeout` seconds.
    pub fn wait_until(&mut self, cond: &str, what: &str, timeout: u64) {
        let (st, out) = self.run_timeout(
            &format!(
                "i=0; while ! {cond}; do i=$((i+1)); [ $i -gt {} ] && exit_code=1 && break; sleep 0.2; done; [ -z \"$exit_code\" ]; r=$?; unset exit_code; [ $r = 0 ]",
                timeout * 5
            ),
            secs(timeout + 30),
        );
        if st != 0 {
            let log = self.run("cat /tmp/vf.log").1;
            panic!("{what}: not within {timeout}s\n{out}\n--- vfrelay log ---\n{log}");
        }
    }

    /// Starts `udpburst recv` (a guest tool) in the namespace whose holder
    /// pid is in shell variable `ns`, and returns once it listens. Its
    /// report goes to /tmp/udp.out, its pid to /tmp/udp.pid.
    pub fn udp_recv_start(&mut self, ns: &str, port: u16, frames: u32, idle_secs: u32) {
        self.ok(&format!(
            "nsenter -t ${ns} -n udpburst recv {port} {frames} {idle_secs} > /tmp/udp.out 2>&1 & echo $! > /tmp/udp.pid"
        ));
        self.wait_until("grep -q listening /tmp/udp.out", "UDP receiver", 10);
    }

    /// Waits for the receiver of [`udp_recv_start`](Self::udp_recv_start)
    /// to end and returns its report; panics (with vfrelay's log) unless
    /// all `frames` arrived.
    pub fn udp_recv_finish(&mut self, frames: u32, label: &str) -> String {
        self.run_timeout("wait $(cat /tmp/udp.pid)", secs(60));
        let got = self.ok("cat /tmp/udp.out");
        assert!(
            got.contains(&format!("unique {frames}")),
            "{label}: frames lost: {got}\n--- vfrelay log ---\n{}",
            self.run("cat /tmp/vf.log").1
        );
        got
    }

    /// Starts `vfrelay vduse --name NAME --attach virtio-vdpa ARGS` in the
    /// background (output in /tmp/vf.log, pid in /tmp/vf.pid; vfrelay staged
    /// into the guest) and returns the virtio-net netdev virtio_vdpa made.
    pub fn start_vduse_netdev(&mut self, name: &str, args: &str, timeout: u64) -> String {
        self.ok(&format!(
            "RUST_LOG=debug vfrelay vduse --name {name} --attach virtio-vdpa {args} > /tmp/vf.log 2>&1 & echo $! > /tmp/vf.pid"
        ));
        self.wait_until(
            &format!("ls /sys/bus/vdpa/devices/{name}/virtio*/net/ >/dev/null 2>&1"),
            "virtio-net netdev from virtio_vdpa",
            timeout,
        );
        let ifname = self
            .ok(&format!("ls /sys/bus/vdpa/devices/{name}/virtio*/net/"))
            .trim()
            .to_string();
        assert!(
            !ifname.is_empty() && !ifname.contains(char::is_whitespace),
            "netdev: {ifname:?}"
        );
        ifname
    }

    /// Copies the 9p share's `root/` (see [`GuestConfig::share`]) over /.
    pub fn install_share(&mut self) {
        self.ok("mkdir -p /mnt/vfx && mount -t 9p -o trans=virtio,version=9p2000.L vfx /mnt/vfx && cp -a /mnt/vfx/root/. / && umount /mnt/vfx");
    }

    /// The QMP monitor of this QEMU (connected on first use).
    pub fn qmp(&mut self) -> &mut Qmp {
        if self.qmp.is_none() {
            let path = self.dir.join("qmp.sock");
            match Qmp::connect(&path, secs(30)) {
                Ok(q) => self.qmp = Some(q),
                Err(e) => panic!(
                    "guest {}: QMP {}: {e}\n{}",
                    self.name,
                    path.display(),
                    self.transcript()
                ),
            }
        }
        self.qmp.as_mut().unwrap()
    }

    /// Migrates this (source) VM to `dest` (from [`incoming`](Self::incoming))
    /// with `params`, polling `query-migrate` until it completes, fails or
    /// `params.timeout` passes (then it is cancelled). Never panics on a
    /// failed migration: the caller decides what a failure means.
    pub fn migrate(&mut self, dest: &mut Guest, params: &MigrateParams) -> MigrationOutcome {
        self.migrate_with(dest, params, Duration::MAX, |_| {})
    }

    /// [`migrate`](Self::migrate), calling `during(self)` once when the
    /// migration has been `active` for `after` (e.g. to read the guest's
    /// state over the console while RAM is being copied; use short timeouts
    /// there: the VM stops when the migration ends).
    pub fn migrate_with(
        &mut self,
        dest: &mut Guest,
        params: &MigrateParams,
        after: Duration,
        mut during: impl FnMut(&mut Guest),
    ) -> MigrationOutcome {
        let started = Instant::now();
        let uri = dest.migration_uri();
        let name = self.name.clone();
        let q = self.qmp();
        q.execute(
            "migrate-set-parameters",
            &format!(
                r#"{{"max-bandwidth": {}, "downtime-limit": {}}}"#,
                params.max_bandwidth,
                if params.hold.is_zero() {
                    params.downtime_limit_ms
                } else {
                    1
                }
            ),
        )
        .unwrap_or_else(|e| panic!("guest {name}: migrate-set-parameters: {e}"));
        if let Err(e) = q.execute("migrate", &format!(r#"{{"uri": "{uri}"}}"#)) {
            return MigrationOutcome {
                status: "error".into(),
                elapsed: started.elapsed(),
                last_query: e,
            };
        }
        let deadline = started + params.timeout;
        let mut last = String::new();
        let mut hook_done = false;
        let mut held = params.hold.is_zero();
        let status = loop {
            std::thread::sleep(Duration::from_millis(200));
            if !held && started.elapsed() >= params.hold {
                held = true;
                let limit = format!(r#"{{"downtime-limit": {}}}"#, params.downtime_limit_ms);
                if let Err(e) = self.qmp().execute("migrate-set-parameters", &limit) {
                    break format!("migrate-set-parameters: {e}");
                }
            }
            if !hook_done && started.elapsed() >= after {
                hook_done = true;
                during(self);
            }
            let q = self.qmp();
            last = match q.execute("query-migrate", "{}") {
                Ok(r) => r,
                Err(e) => break format!("query-migrate error: {e}"),
            };
            let st = json_field(&last, "status").unwrap_or_default();
            if matches!(st.as_str(), "completed" | "failed" | "cancelled") {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = q.execute("migrate_cancel", "{}");
                break "timeout".into();
            }
        };
        let elapsed = started.elapsed();
        if status == "completed" {
            // The source reports completion once everything is sent; the
            // destination then loads the last state and starts running (or
            // stays paused, with -S).
            let loaded = |st: Option<String>| matches!(st.as_deref(), Some("running" | "paused"));
            super::wait_until(secs(30), || {
                !dest.is_running() || loaded(dest.qmp().status())
            });
            let running = dest.is_running() && loaded(dest.qmp().status());
            if !running {
                let state = if dest.is_running() {
                    format!("{:?}", dest.qmp().status())
                } else {
                    format!("exited: {}", dest.qemu_stderr().trim())
                };
                return MigrationOutcome {
                    status: format!("destination not running ({state})"),
                    elapsed,
                    last_query: last,
                };
            }
        }
        MigrationOutcome {
            status,
            elapsed,
            last_query: last,
        }
    }

    /// Makes this QEMU (a completed migration destination) the one the test
    /// drives: console commands continue the source's numbering.
    pub fn take_over(&mut self, source: &Guest) {
        self.seq = self.seq.max(source.seq);
    }

    /// Asks QEMU to exit (`quit`), waiting up to 10 s; kills it after that.
    pub fn quit(mut self) {
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.execute("quit", "{}");
        } else if let Ok(mut q) = Qmp::connect(&self.dir.join("qmp.sock"), secs(5)) {
            let _ = q.execute("quit", "{}");
        }
        super::wait_until(secs(10), || !self.is_running());
        self.stop();
    }

    /// QEMU's process id (`ip netns exec` execs QEMU, so also with a netns).
    /// Panics for an attached guest, whose QEMU this `Guest` did not start.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("attached guest: no QEMU child")
            .id()
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
        let stderr = match self.child {
            Some(_) => self.qemu_stderr(),
            None => "(not ours: attached to a console)".to_string(),
        };
        format!(
            "--- guest {} console ---\n{}\n--- qemu stderr ---\n{stderr}\n--- end guest {} ---",
            self.name,
            self.console(),
            self.name
        )
    }

    /// True while QEMU runs (attached: while its console is open).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => !self.console.0.lock().unwrap().eof,
        }
    }

    /// Kills QEMU (SIGKILL: the vhost-user back end sees an abrupt
    /// disconnect) and waits for it.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.stdin.take();
        if let Some(sock) = self.socket.take() {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
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

/// Migration settings for [`Guest::migrate`].
#[derive(Clone, Debug)]
pub struct MigrateParams {
    /// Bytes per second (QMP `max-bandwidth`).
    pub max_bandwidth: u64,
    /// Longest acceptable pause of the VM at the end (QMP `downtime-limit`).
    pub downtime_limit_ms: u64,
    /// For this long the downtime limit is 1 ms, which a running guest
    /// cannot meet: QEMU keeps iterating (re-sending only pages reported
    /// dirty) instead of switching over right after the first RAM pass.
    pub hold: Duration,
    /// Give up (and `migrate_cancel`) after this long.
    pub timeout: Duration,
}

/// How a migration ended.
#[derive(Clone, Debug)]
pub struct MigrationOutcome {
    /// `completed`, `failed`, `cancelled`, `timeout`, `error` (QEMU refused
    /// to start it) or a note that the destination did not start running.
    pub status: String,
    pub elapsed: Duration,
    /// The last `query-migrate` reply (or the error), for reports.
    pub last_query: String,
}

impl MigrationOutcome {
    pub fn completed(&self) -> bool {
        self.status == "completed"
    }
}

/// A minimal QMP client: one command at a time, replies matched as the next
/// line with `return` or `error`; asynchronous events are kept in `events`.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub events: Vec<String>,
}

impl Qmp {
    /// Connects (retrying until `timeout`: QEMU creates the socket a moment
    /// after it starts) and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(secs(60)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = q.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("unexpected greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", "{}")?;
        Ok(q)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => Ok(l.trim().to_string()),
            Err(e) => Err(format!("QMP read: {e}")),
        }
    }

    /// Runs `cmd` with JSON object `args`; `Ok(reply line)` for a `return`,
    /// `Err(reply line)` for an `error`.
    pub fn execute(&mut self, cmd: &str, args: &str) -> Result<String, String> {
        let msg = format!("{{\"execute\": \"{cmd}\", \"arguments\": {args}}}\n");
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let l = self.line()?;
            if l.starts_with("{\"return\"") {
                return Ok(l);
            }
            if l.starts_with("{\"error\"") {
                return Err(l);
            }
            self.events.push(l);
        }
    }

    /// `query-status` run state (`running`, `inmigrate`, `postmigrate`...).
    pub fn status(&mut self) -> Option<String> {
        let r = self.execute("query-status", "{}").ok()?;
        json_field(&r, "status")
    }
}

/// The value of the first `"key": value` in `json` (strings unquoted,
/// escapes not decoded); enough for QMP's flat replies.
pub fn json_field(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let at = json.find(&pat)? + pat.len();
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(body) = rest.strip_prefix('"') {
        Some(body[..body.find('"')?].to_string())
    } else {
        let end = rest
            .find(|c: char| c == ',' || c == '}' || c == ']' || c.is_whitespace())
            .unwrap_or(rest.len());
        Some(rest[..end].to_string())
    }
}

/// Collects everything `out` (the console) yields into a [`Shared`] buffer
/// on a thread of its own; `eof` once it closes.
fn read_console(mut out: impl Read + Send + 'static) -> Shared {
    let console: Shared = Arc::new((Mutex::new(Console::default()), Condvar::new()));
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
    console
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
