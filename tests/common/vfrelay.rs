//! The `vfrelay` binary as a child-process guard: spawned with arguments,
//! its stdout+stderr collected into a log, SIGTERM (then SIGKILL) on drop.
//! While a test panics, drop prints the log.
//!
//! For `vfrelay daemon`: [`Vfrelay::daemon`] starts one on a given control
//! socket, [`Vfrelay::ctl`] runs client subcommands against it and [`Rpc`]
//! speaks raw JSON-RPC to it.

use super::netns::Netns;
use super::{secs, wait_until};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
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
    /// The control socket, for a `vfrelay daemon`.
    control: Option<PathBuf>,
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
        let log = super::collect_output(vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ]);
        Vfrelay {
            child,
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
            exited: None,
            control: None,
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

    /// `vfrelay daemon --control CONTROL extra...`, then waits (10 s,
    /// scaled) for the control socket (the daemon is ready when it exists).
    /// Panics with the log if it does not appear or the daemon exits.
    pub fn daemon(control: &Path, extra: &[&str]) -> Vfrelay {
        let c = control.to_str().expect("utf-8 control path");
        let mut args = vec!["daemon", "--control", c];
        args.extend_from_slice(extra);
        let mut v = Vfrelay::spawn(None, &args);
        v.wait_for_control(control);
        v.control = Some(control.to_path_buf());
        v
    }

    /// Waits until this daemon accepts on its control socket `control`;
    /// panics with the log if it does not or the daemon exits.
    pub fn wait_for_control(&mut self, control: &Path) {
        self.wait_for_socket(control, secs(10));
        // The file appears at bind(), a moment before listen(): a client
        // started in between is refused. Ready is when a connect works.
        let ok = wait_until(secs(10), || {
            std::os::unix::net::UnixStream::connect(control).is_ok() || !self.is_running()
        });
        assert!(
            ok && self.is_running(),
            "daemon not accepting on {}\n{}",
            control.display(),
            self.log_text()
        );
    }

    /// The control socket of a [`daemon`](Self::daemon).
    pub fn control(&self) -> &Path {
        self.control.as_deref().expect("not a vfrelay daemon")
    }

    /// Runs the client `vfrelay ARGS... --control <this daemon's socket>`
    /// (30 s, scaled, then killed) and returns (exit code, stdout, stderr).
    /// `RUST_LOG` and `$VFRELAY_CONTROL` are not passed on, so stderr holds
    /// only what the client says to its user.
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        ctl_at(self.control(), args)
    }

    /// [`ctl`](Self::ctl) that must exit 0; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctl(args);
        assert_eq!(
            code,
            0,
            "`vfrelay {} --control {}` failed: stdout {out:?}, stderr {err:?}",
            args.join(" "),
            self.control().display()
        );
        out
    }

    /// [`ctl_ok`](Self::ctl_ok) of a `--json` listing; returns the list:
    /// the array itself, or the array under `key` if the client wraps it
    /// in an object (`ports`, `workers`).
    pub fn ctl_list(&self, args: &[&str], key: &str) -> Vec<serde_json::Value> {
        let out = self.ctl_ok(args);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`vfrelay {}`: {e}: {out}", args.join(" ")));
        v.as_array()
            .or_else(|| v[key].as_array())
            .unwrap_or_else(|| panic!("no {key} list in {v}"))
            .clone()
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

    /// SIGKILL, as a crash would end it, and reap it.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            if let Ok(st) = self.child.wait() {
                self.exited = Some(st);
            }
        }
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

/// The client `vfrelay ARGS... --control CONTROL` as in [`Vfrelay::ctl`],
/// also where no daemon listens. Returns (exit code, stdout, stderr); a
/// client killed by a signal panics.
pub fn ctl_at(control: &Path, args: &[&str]) -> (i32, String, String) {
    let what = format!("vfrelay {} --control {}", args.join(" "), control.display());
    let mut child = Command::new(bin())
        .args(args)
        .arg("--control")
        .arg(control)
        .env_remove("RUST_LOG")
        .env_remove("VFRELAY_CONTROL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let read_all = |mut p: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = p.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let mut status = None;
    let exited = wait_until(secs(30), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`{what}` did not finish within {:?}", secs(30));
    }
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let code = status
        .and_then(|s| s.code())
        .unwrap_or_else(|| panic!("`{what}` killed: {status:?}, stderr {err:?}"));
    (code, out, err)
}

/// One JSON-RPC 2.0 connection to a daemon's control socket: one request
/// line out, one response line in. Reads time out after 10 s (scaled).
pub struct Rpc {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Rpc {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> Rpc {
        let s =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(secs(10)))
            .expect("set_read_timeout");
        Rpc {
            reader: BufReader::new(s.try_clone().expect("clone UnixStream")),
            writer: s,
        }
    }

    /// Sends `line` plus `\n` as it is (it need not be valid JSON) and
    /// returns the parsed response line.
    pub fn send_line(&mut self, line: &str) -> serde_json::Value {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("write {line:?}: {e}"));
        let mut resp = String::new();
        match self.reader.read_line(&mut resp) {
            Ok(0) => panic!("daemon closed the connection after {line:?}"),
            Ok(_) if resp.ends_with('\n') => {}
            Ok(_) => panic!("unterminated response {resp:?} to {line:?}"),
            Err(e) => panic!("no response to {line:?}: {e}"),
        }
        serde_json::from_str(&resp)
            .unwrap_or_else(|e| panic!("response {resp:?} to {line:?} is not JSON: {e}"))
    }

    /// Sends `{"jsonrpc":"2.0","id":ID,"method":METHOD,"params":PARAMS}`;
    /// returns the whole response object.
    pub fn call(
        &mut self,
        id: serde_json::Value,
        method: &str,
        params: serde_json::Value,
    ) -> serde_json::Value {
        let req =
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send_line(&req.to_string())
    }

    /// [`call`](Self::call) that must succeed: returns `result`, panics
    /// with the response otherwise.
    pub fn result(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let resp = self.call(serde_json::json!(0), method, params);
        match resp.get("result") {
            Some(r) if resp.get("error").is_none() => r.clone(),
            _ => panic!("{method} failed: {resp}"),
        }
    }
}

/// `worker list --json` of a daemon started with `--workers 0`: asserts it
/// is one worker on CPU 0 in `mode`, and returns the (port, index) pairs it
/// holds.
pub fn held_by_one_worker(ws: &[serde_json::Value], mode: &str) -> BTreeSet<(String, u64)> {
    assert_eq!(ws.len(), 1, "--workers 0: {ws:?}");
    assert_eq!(ws[0]["cpu"], 0, "{ws:?}");
    assert_eq!(ws[0]["mode"], mode, "{ws:?}");
    ws[0]["queue_pairs"]
        .as_array()
        .unwrap_or_else(|| panic!("{ws:?}"))
        .iter()
        .map(|q| {
            let port = q["port"].as_str().unwrap_or_else(|| panic!("{q}"));
            (port.to_string(), q["index"].as_u64().expect("index"))
        })
        .collect()
}
