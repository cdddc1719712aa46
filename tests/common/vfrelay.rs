//! The `vfrelay` binary as a child-process guard: spawned with arguments,
//! its stdout+stderr collected into a log, SIGTERM (then SIGKILL) on drop.
//! While a test panics, drop prints the log.

use super::netns::Netns;
use super::{secs, wait_until};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Path of the vfrelay binary cargo built for this test run.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vfrelay")
}

pub struct Vfrelay {
    child: Child,
    log: Arc<Mutex<Vec<u8>>>,
    args: Vec<String>,
    exited: Option<ExitStatus>,
}

impl Vfrelay {
    /// Spawns `vfrelay args...` (in `ns` when given). `RUST_LOG` is passed
    /// through; it defaults to `debug` so failure messages say enough.
    pub fn spawn(ns: Option<&Netns>, args: &[&str]) -> Vfrelay {
        Vfrelay::spawn_env(ns, args, &[])
    }

    /// [`spawn`](Self::spawn) with extra environment variables (test-only
    /// switches such as `VFRELAY_TEST_DISABLE_DIRTY_LOG`).
    pub fn spawn_env(ns: Option<&Netns>, args: &[&str], env: &[(&str, &str)]) -> Vfrelay {
        Vfrelay::spawn_with(ns, Path::new(bin()), args, env)
    }

    /// [`spawn_env`](Self::spawn_env) of the binary at `exe` (the benchmark
    /// harness runs a release build).
    pub fn spawn_with(
        ns: Option<&Netns>,
        exe: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Vfrelay {
        let exe = exe.to_str().expect("utf-8 path");
        let mut cmd = match ns {
            Some(ns) => ns.command(exe),
            None => Command::new(exe),
        };
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {exe}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let pipes: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
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
        Vfrelay {
            child,
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
            exited: None,
        }
    }

    /// `vfrelay vhost-user --socket SOCKET --backend BACKEND extra...`, then
    /// waits (10 s, scaled) for the socket to appear. Panics with the log if
    /// it does not or vfrelay exits.
    pub fn vhost_user(ns: Option<&Netns>, socket: &Path, backend: &str, extra: &[&str]) -> Vfrelay {
        Vfrelay::vhost_user_env(ns, socket, backend, extra, &[])
    }

    /// [`vhost_user`](Self::vhost_user) with extra environment variables.
    pub fn vhost_user_env(
        ns: Option<&Netns>,
        socket: &Path,
        backend: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Vfrelay {
        let sock = socket.to_str().expect("utf-8 socket path");
        let mut args = vec!["vhost-user", "--socket", sock, "--backend", backend];
        args.extend_from_slice(extra);
        let mut v = Vfrelay::spawn_env(ns, &args, env);
        v.wait_for_socket(socket, secs(10));
        v
    }

    /// Waits until `path` exists; panics with the log on timeout or exit.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) {
        let path: PathBuf = path.to_path_buf();
        let ok = wait_until(timeout, || path.exists() || !self.is_running());
        if !ok || !path.exists() {
            panic!(
                "vfrelay did not create {} within {timeout:?} (running: {})\n{}",
                path.display(),
                self.is_running(),
                self.log_text()
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.exited = Some(st);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Everything vfrelay wrote so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// The log framed for a failure message.
    pub fn log_text(&self) -> String {
        format!(
            "--- vfrelay {} (pid {}) log ---\n{}--- end vfrelay log ---",
            self.args.join(" "),
            self.child.id(),
            self.log()
        )
    }

    /// Sends SIGTERM and waits up to `timeout`; SIGKILL after that.
    /// Returns the exit status, or None if it had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.exited {
            return Some(st);
        }
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if wait_until(timeout, || !self.is_running()) {
            return self.exited;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    /// Stops vfrelay (SIGTERM, 5 s grace) and returns (status, log).
    pub fn stop(mut self) -> (Option<ExitStatus>, String) {
        let st = self.terminate(secs(5));
        // Let the reader threads drain the pipes.
        std::thread::sleep(Duration::from_millis(100));
        (st, self.log())
    }
}

impl Drop for Vfrelay {
    fn drop(&mut self) {
        self.terminate(secs(5));
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_millis(100));
            eprintln!("{}", self.log_text());
        }
    }
}
