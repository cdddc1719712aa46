//! A private libvirtd for tests, run by the test as a child process (no
//! systemd), that leaves the machine's own libvirt alone.
//!
//! A privileged libvirtd keeps its state at fixed places (/etc/libvirt,
//! /run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt). The
//! test's libvirtd runs in a mount namespace of its own (`unshare --mount`)
//! where each of them is a bind mount of a directory in a [`TempDir`], so a
//! domain it defines, its sockets, logs and capability cache all live and die
//! there. It still runs as root, so QEMU runs as `libvirt-qemu` as it would
//! under the packaged daemon. virsh reaches it through its socket
//! ([`Libvirtd::uri`]).
//!
//! Drop destroys and undefines every domain, stops libvirtd and kills any
//! QEMU it left; while a test panics it also prints libvirtd's log and each
//! domain's QEMU log.

use super::{secs, wait_until, TempDir};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// libvirtd's own places, each replaced by `<temp dir>/<key>`.
const MOUNTS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
];

const LIBVIRTD_CONF: &str = r#"# vfrelay test libvirtd: root's socket only, no polkit.
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:stderr"
"#;

/// QEMU user and group stay the packaged defaults (libvirt-qemu).
const QEMU_CONF: &str = r#"# vfrelay test libvirtd.
# No virtlogd runs: QEMU's output goes straight to log/qemu/NAME.log.
stdio_handler = "file"
# Make no cgroups on the host: the guest needs none.
cgroup_controllers = [ ]
"#;

pub struct Libvirtd {
    dir: TempDir,
    child: Child,
    log: Arc<Mutex<Vec<u8>>>,
    /// /run/libvirt was missing and this guard made it (the empty mount
    /// point): removed again on drop.
    made_run_dir: bool,
}

impl Libvirtd {
    /// Starts libvirtd and waits (30 s, scaled) until virsh gets an answer.
    pub fn start() -> Libvirtd {
        assert!(
            Path::new("/usr/sbin/libvirtd").exists(),
            "no /usr/sbin/libvirtd (run scripts/setup-host.sh)"
        );
        let dir = TempDir::new();
        let open = |p: &Path| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()))
        };
        open(dir.path());
        for (key, _) in MOUNTS {
            std::fs::create_dir(dir.join(key)).unwrap();
            open(&dir.join(key));
        }
        std::fs::write(dir.join("etc/libvirtd.conf"), LIBVIRTD_CONF).unwrap();
        std::fs::write(dir.join("etc/qemu.conf"), QEMU_CONF).unwrap();
        // /run is a tmpfs: the mount point exists only once a libvirtd ran.
        let made_run_dir = std::fs::create_dir("/run/libvirt").is_ok();

        let mut script = String::from("set -e\n");
        for (key, target) in MOUNTS {
            script.push_str(&format!("mount --bind \"$1/{key}\" {target}\n"));
        }
        // A pid file of its own: the default, /run/libvirtd.pid, is the
        // machine's.
        script.push_str(
            "exec libvirtd --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid\n",
        );
        // unshare and sh exec, so the child's pid is libvirtd's.
        let mut child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                "sh",
            ])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start unshare ... libvirtd: {e}"));
        let log = super::collect_output(vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ]);
        let mut d = Libvirtd {
            dir,
            child,
            log,
            made_run_dir,
        };
        let up = wait_until(secs(30), || {
            !d.is_running() || (d.socket().exists() && d.virsh(&["version"]).status.success())
        });
        assert!(
            up && d.is_running(),
            "libvirtd did not come up within {:?}\n{}",
            secs(30),
            d.log_text()
        );
        eprintln!("libvirtd {} on {}", d.child.id(), d.uri());
        d
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/libvirt-sock")
    }

    /// The connection URI of this daemon.
    pub fn uri(&self) -> String {
        format!("qemu:///system?socket={}", self.socket().display())
    }

    /// `virsh -c URI args...` (60 s, scaled, then killed).
    pub fn virsh(&self, args: &[&str]) -> Output {
        let limit = format!("{}", secs(60).as_secs().max(1));
        Command::new("timeout")
            .args(["-k", "5", &limit, "virsh", "-c", &self.uri()])
            .args(args)
            .env_remove("LIBVIRT_DEFAULT_URI")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run virsh: {e}"))
    }

    /// [`virsh`](Self::virsh) that must succeed; returns stdout.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        if !out.status.success() {
            panic!(
                "`virsh {}` failed ({}): {}{}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pid of domain `name`'s QEMU, from libvirt's pid file.
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        let path = self.dir.join(&format!("run/qemu/{name}.pid"));
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Domain `name`'s QEMU log: its command line, then its output.
    pub fn qemu_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(&format!("log/qemu/{name}.log"))).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// libvirtd's log, framed for a failure message.
    pub fn log_text(&self) -> String {
        format!(
            "--- libvirtd log ---\n{}--- end libvirtd log ---",
            String::from_utf8_lossy(&self.log.lock().unwrap())
        )
    }

    /// Names of all domains, defined or running.
    fn domains(&self) -> Vec<String> {
        let out = self.virsh(&["list", "--all", "--name"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// SIGTERM, `timeout`, then SIGKILL. True if libvirtd exited by itself.
    fn terminate(&mut self, timeout: Duration) -> bool {
        if !self.is_running() {
            return true;
        }
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if wait_until(timeout, || !self.is_running()) {
            return true;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// Destroys and undefines every domain, then stops libvirtd; panics
    /// unless that all worked and libvirtd exited on SIGTERM.
    pub fn stop(mut self) {
        for name in self.domains() {
            if !self.virsh_ok(&["domstate", &name]).starts_with("shut off") {
                self.virsh_ok(&["destroy", &name]);
            }
            self.virsh_ok(&["undefine", &name]);
        }
        let left = self.domains();
        assert!(left.is_empty(), "domains left: {left:?}");
        assert!(
            self.terminate(secs(15)),
            "libvirtd ignored SIGTERM\n{}",
            self.log_text()
        );
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_text());
        }
        let names = if self.is_running() {
            self.domains()
        } else {
            Vec::new()
        };
        for name in &names {
            if std::thread::panicking() {
                eprintln!(
                    "--- QEMU log of {name} ---\n{}--- end QEMU log ---",
                    self.qemu_log(name)
                );
            }
            let _ = self.virsh(&["destroy", name]);
            let _ = self.virsh(&["undefine", name]);
        }
        self.terminate(secs(10));
        // A QEMU libvirtd did not get to stop (it may have died first).
        if let Ok(entries) = std::fs::read_dir(self.dir.join("run/qemu")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(dom) = name.strip_suffix(".pid") else {
                    continue;
                };
                let Some(pid) = self.qemu_pid(dom) else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("qemu-system") {
                    // SAFETY: kill(2) with a pid we just checked runs QEMU.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
        if self.made_run_dir {
            // Only if empty: a libvirtd of the machine may have come since.
            let _ = std::fs::remove_dir("/run/libvirt");
        }
    }
}
