//! vfrelay: a software vDPA dataplane. Serves virtio-net rings to a guest
//! and relays every packet to a host-side backend.

mod vf_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use log::info;
use serde_json::{json, Value};
use vfrelay_backends::BackendSpec;

use vfrelay::daemon::ports::{self, parse_backend, parse_queue_size};
use vfrelay::daemon::{rpc, Daemon, Kind, Options, PortSpec};
use vfrelay::{net, shutdown};

#[derive(Parser, Debug)]
#[command(
    name = "vfrelay",
    version,
    about = "Software vDPA dataplane for virtio-net"
)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: many ports on shared worker cores, managed over a
    /// control socket (`vfrelay port|stats|worker`).
    Daemon(DaemonArgs),
    /// Add, delete or list the daemon's ports.
    Port(PortArgs),
    /// Per-queue counters of the daemon's ports.
    Stats(StatsArgs),
    /// The daemon's workers and the queue pairs each runs.
    Worker(WorkerArgs),
    /// The daemon's L2 switches: ports join one with
    /// `--backend switch,name=NAME[,vlan=ID]`.
    Switch(SwitchArgs),
    /// Serve a virtio-net device over a vhost-user socket.
    VhostUser(VhostUserArgs),
    /// Serve a virtio-net device as a VDUSE (vDPA) device in this kernel.
    Vduse(VduseArgs),
    /// SR-IOV: list VFs, enable them, set a VF's MAC/VLAN/trust/link.
    Vf(vf_cmd::VfArgs),
}

/// Where client subcommands find the daemon.
#[derive(Args, Debug)]
struct ControlArg {
    /// The daemon's control socket (default: $VFRELAY_CONTROL, else
    /// /run/vfrelay/control.sock).
    #[arg(long)]
    control: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DaemonArgs {
    #[command(flatten)]
    control: ControlArg,
    /// Worker CPUs, e.g. `0,2-3`: one worker thread per CPU, pinned
    /// (default: one worker, not pinned).
    #[arg(long, value_parser = parse_cpulist)]
    workers: Option<CpuList>,
    /// Workers busy-poll their queues instead of sleeping on kicks.
    #[arg(long)]
    poll: bool,
    /// Keep the port table in FILE (rewritten atomically at each change)
    /// and rebuild the ports from it at start.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen_addr)]
    metrics: Option<String>,
}

/// `--metrics ADDR`: host:port, checked here so a typo is a usage error.
fn parse_listen_addr(s: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    match s.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(_)) => Ok(s.to_string()),
        _ => Err(format!(
            "'{s}' is not an address to listen on (like 127.0.0.1:9464)"
        )),
    }
}

#[derive(Clone, Debug)]
struct CpuList(Vec<usize>);

fn parse_cpulist(s: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let bad = || format!("'{s}' is not a CPU list (like 0,2-3)");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a.trim().parse().map_err(|_| bad())?;
        let b: usize = b.trim().parse().map_err(|_| bad())?;
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return Err(bad());
        }
        for c in a..=b {
            if !cpus.contains(&c) {
                cpus.push(c);
            }
        }
    }
    Ok(CpuList(cpus))
}

#[derive(Args, Debug)]
struct PortArgs {
    #[command(subcommand)]
    cmd: PortCmd,
}

#[derive(Subcommand, Debug)]
enum PortCmd {
    /// Add a vhost-user or VDUSE port.
    Add(PortAddArgs),
    /// Delete a port (its connection closes, its socket or device goes).
    Del {
        name: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// List the ports.
    List(ListArgs),
}

/// A listing: a table, or with `--json` one JSON document.
#[derive(Args, Debug)]
struct ListArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    control: ControlArg,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("frontend").required(true).args(["vhost_user", "vduse"])))]
struct PortAddArgs {
    /// Port name (letters, digits, '-', '_', '.').
    #[arg(value_parser = ports::check_name)]
    name: String,
    /// Serve a vhost-user socket at PATH.
    #[arg(long, value_name = "PATH")]
    vhost_user: Option<PathBuf>,
    /// Connect to a front end that listens at PATH instead.
    #[arg(long, requires = "vhost_user")]
    client: bool,
    /// Serve a VDUSE device named DEV.
    #[arg(long, value_name = "DEV")]
    vduse: Option<String>,
    #[arg(long, value_enum, requires = "vduse")]
    attach: Option<vfrelay::Attach>,
    /// Queue pairs.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: Option<u16>,
    /// Largest ring size (power of two).
    #[arg(long, value_parser = parse_queue_size)]
    queue_size: Option<u16>,
    #[arg(long, value_parser = net::parse_mac)]
    mac: Option<[u8; 6]>,
    #[arg(long, value_parser = clap::value_parser!(u16).range(68..=9000))]
    mtu: Option<u16>,
    /// Where packets go (SPEC as for `vfrelay vhost-user --backend`).
    #[arg(long, value_parser = parse_backend)]
    backend: Option<BackendSpec>,
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    control: ControlArg,
}

/// Who may open a vhost-user socket vfrelay listens on.
#[derive(Args, Debug)]
struct SocketArgs {
    /// Give the socket to USER[:GROUP] (names or numbers), e.g. the
    /// `libvirt-qemu` user QEMU runs as under libvirt.
    #[arg(long, value_name = "USER[:GROUP]", value_parser = rpc::parse_owner, conflicts_with = "client")]
    socket_owner: Option<rpc::Owner>,
    /// The socket's permission bits in octal, e.g. 0660 (default 0600).
    #[arg(long, value_name = "OCTAL", value_parser = rpc::parse_mode, conflicts_with = "client")]
    socket_mode: Option<u32>,
}

impl SocketArgs {
    fn access(&self) -> rpc::SocketAccess {
        rpc::SocketAccess {
            owner: self.socket_owner.clone(),
            mode: self.socket_mode,
        }
    }
}

#[derive(Args, Debug)]
struct StatsArgs {
    /// One port (default: all).
    name: Option<String>,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Args, Debug)]
struct WorkerArgs {
    #[command(subcommand)]
    cmd: WorkerCmd,
}

#[derive(Subcommand, Debug)]
enum WorkerCmd {
    /// List the workers, their CPUs, load and queue pairs.
    List(ListArgs),
}

#[derive(Args, Debug)]
struct SwitchArgs {
    #[command(subcommand)]
    cmd: SwitchCmd,
}

#[derive(Subcommand, Debug)]
enum SwitchCmd {
    /// Add a switch, optionally with an uplink to the outside.
    Add {
        /// Switch name (letters, digits, '-', '_', '.').
        name: String,
        /// A device backend the switch reaches the outside through:
        /// tap[,ifname=NAME] | af-xdp,ifname=NAME[,queue=Q][,mode=...] |
        /// vf,pf=NAME,index=N | loopback. VLAN ports' frames carry their
        /// tag on it.
        #[arg(long, value_parser = ports::parse_backend)]
        uplink: Option<vfrelay_backends::BackendSpec>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Delete a switch that has no ports left.
    Del {
        name: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// List the switches: ports, MACs learned, counters.
    List(ListArgs),
}

#[derive(Args, Debug)]
struct DeviceArgs {
    /// Guest MAC address (default: random, locally administered).
    #[arg(long, value_parser = net::parse_mac)]
    mac: Option<[u8; 6]>,
    /// MTU reported to the driver.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..=9000))]
    mtu: u16,
    /// Busy-poll rings and backend (the worker owns a core).
    #[arg(long)]
    poll: bool,
    /// Where packets go: loopback | tap[,ifname=NAME] |
    /// af-xdp,ifname=NAME[,queue=Q][,mode=copy|zerocopy|auto] |
    /// vf,pf=NAME,index=N[,vlan=ID]
    #[arg(long, default_value = "tap,ifname=vfr0", value_parser = parse_backend)]
    backend: BackendSpec,
}

#[derive(Args, Debug)]
struct VhostUserArgs {
    /// vhost-user socket path.
    #[arg(long)]
    socket: PathBuf,
    /// Connect to a front end that listens, instead of listening.
    #[arg(long)]
    client: bool,
    /// Queue pairs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Largest ring size the front end may use (power of two).
    #[arg(long, default_value_t = 1024, value_parser = parse_queue_size)]
    queue_size: u16,
    #[command(flatten)]
    socket_access: SocketArgs,
    #[command(flatten)]
    dev: DeviceArgs,
}

#[derive(Args, Debug)]
struct VduseArgs {
    /// VDUSE device name (/dev/vduse/NAME, vdpa device NAME).
    #[arg(long)]
    name: String,
    /// vDPA bus driver to attach to: a kernel netdev (virtio-vdpa), a
    /// /dev/vhost-vdpa-N for QEMU (vhost-vdpa), or none (attach yourself).
    #[arg(long, value_enum, default_value = "virtio-vdpa")]
    attach: vfrelay::Attach,
    /// Ring size offered to the driver (power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,
    #[command(flatten)]
    dev: DeviceArgs,
}

/// A port name from a socket or device name (names must be plain).
fn port_name(from: &str) -> String {
    let n: String = from
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if n.is_empty() {
        "port".into()
    } else {
        n
    }
}

impl VhostUserArgs {
    fn spec(&self) -> PortSpec {
        let file = self
            .socket
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        PortSpec {
            name: port_name(&file),
            kind: Kind::VhostUser {
                path: self.socket.clone(),
                client: self.client,
            },
            queues: self.queues,
            queue_size: self.queue_size,
            mac: self.dev.mac,
            mtu: self.dev.mtu,
            backend: self.dev.backend.clone(),
            socket_access: self.socket_access.access(),
        }
    }
}

impl VduseArgs {
    fn spec(&self) -> PortSpec {
        PortSpec {
            name: port_name(&self.name),
            kind: Kind::Vduse {
                device: self.name.clone(),
                attach: self.attach,
            },
            queues: 1,
            queue_size: self.queue_size,
            mac: self.dev.mac,
            mtu: self.dev.mtu,
            backend: self.dev.backend.clone(),
            socket_access: Default::default(),
        }
    }
}

impl PortAddArgs {
    fn spec(&self) -> PortSpec {
        let kind = match (&self.vhost_user, &self.vduse) {
            (Some(path), _) => Kind::VhostUser {
                path: path.clone(),
                client: self.client,
            },
            (None, device) => Kind::Vduse {
                device: device.clone().unwrap_or_default(),
                attach: self.attach.unwrap_or(vfrelay::Attach::VirtioVdpa),
            },
        };
        let queue_size = self.queue_size.unwrap_or(match kind {
            Kind::VhostUser { .. } => ports::DEFAULT_VHOST_USER_QUEUE_SIZE,
            Kind::Vduse { .. } => ports::DEFAULT_VDUSE_QUEUE_SIZE,
        });
        PortSpec {
            name: self.name.clone(),
            kind,
            queues: self.queues.unwrap_or(1),
            queue_size,
            mac: self.mac,
            mtu: self.mtu.unwrap_or(ports::DEFAULT_MTU),
            backend: self.backend.clone().unwrap_or_default(),
            socket_access: self.socket.access(),
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One line, as the usage text would bury the reason: clap's
            // message up to the usage block, folded.
            let msg = e.render().to_string();
            let line: Vec<&str> = msg
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("vfrelay: {}", line.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    init_logging(cli.verbose);
    // One-shot commands: Ctrl-C may simply end them.
    if matches!(
        cli.cmd,
        Command::Daemon(_) | Command::VhostUser(_) | Command::Vduse(_)
    ) {
        shutdown::install();
    }
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfrelay: {e}");
            ExitCode::from(1)
        }
    }
}

/// The one-port commands: this daemon with one port, no control socket.
fn run_one_port(spec: PortSpec, poll: bool) -> Result<(), Box<dyn std::error::Error>> {
    let mut d = Daemon::new(&Options {
        control: None,
        workers: vec![None],
        poll,
        state: None,
        metrics: None,
    })?;
    d.add_port(spec)?;
    let r = d.run(true);
    info!("stopped");
    Ok(r?)
}

fn client(control: &ControlArg, method: &str, params: Value) -> Result<Value, rpc::ClientError> {
    rpc::call(
        &rpc::default_control_path(control.control.as_deref()),
        method,
        params,
    )
}

impl ListArgs {
    /// Ask the daemon, print its answer as `table` or as JSON.
    fn show(
        &self,
        method: &str,
        params: Value,
        table: fn(&Value),
    ) -> Result<(), Box<dyn std::error::Error>> {
        let v = client(&self.control, method, params)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            table(&v);
        }
        Ok(())
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn print_ports(ports: &Value) {
    println!(
        "{:<16} {:<10} {:<40} {:>6} {:<17} {:<32} {:<9} WORKERS",
        "NAME", "KIND", "PATH", "QUEUES", "MAC", "BACKEND", "CONNECTED"
    );
    for p in ports.as_array().into_iter().flatten() {
        let workers: Vec<String> = p["queue_pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|q| s(&q["worker"]))
            .collect();
        println!(
            "{:<16} {:<10} {:<40} {:>6} {:<17} {:<32} {:<9} {}",
            s(&p["name"]),
            s(&p["kind"]),
            s(&p["path"]),
            s(&p["queues"]),
            s(&p["mac"]),
            s(&p["backend"]),
            if p["connected"] == json!(true) {
                "yes"
            } else {
                "no"
            },
            workers.join(",")
        );
    }
}

/// The columns of `vfrelay stats`; every counter is in `--json`.
const STAT_FIELDS: &[&str] = &[
    "rx_frames",
    "rx_bytes",
    "rx_dropped",
    "rx_no_buffer",
    "tx_frames",
    "tx_bytes",
    "tx_errors",
    "chain_errors",
    "kicks",
    "interrupts",
];

fn print_stats(v: &Value) {
    print!("{:<16} {:>3} {:>6}", "PORT", "QP", "WORKER");
    for f in STAT_FIELDS {
        print!(" {:>13}", f.to_uppercase());
    }
    println!();
    for p in v["ports"].as_array().into_iter().flatten() {
        for q in p["queue_pairs"].as_array().into_iter().flatten() {
            print!(
                "{:<16} {:>3} {:>6}",
                s(&p["name"]),
                s(&q["index"]),
                s(&q["worker"])
            );
            for f in STAT_FIELDS {
                print!(" {:>13}", s(&q[*f]));
            }
            println!();
        }
    }
}

fn print_workers(v: &Value) {
    println!(
        "{:>3} {:>4} {:<6} {:>6}  QUEUE PAIRS",
        "ID", "CPU", "MODE", "BUSY"
    );
    for w in v.as_array().into_iter().flatten() {
        let qps: Vec<String> = w["queue_pairs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|q| format!("{}/{}", s(&q["port"]), s(&q["index"])))
            .collect();
        println!(
            "{:>3} {:>4} {:<6} {:>5.1}%  {}",
            s(&w["id"]),
            s(&w["cpu"]),
            s(&w["mode"]),
            w["busy"].as_f64().unwrap_or(0.0) * 100.0,
            qps.join(" ")
        );
    }
}

fn print_switches(v: &Value) {
    for sw in v.as_array().into_iter().flatten() {
        println!(
            "switch {}  uplink {}",
            s(&sw["name"]),
            s(&sw["uplink_spec"])
        );
        println!(
            "  {:<16} {:>5} {:>12} {:>12} {:>12}",
            "PORT", "VLAN", "UNICAST", "FLOODED", "DROPPED"
        );
        for p in sw["ports"].as_array().into_iter().flatten() {
            println!(
                "  {:<16} {:>5} {:>12} {:>12} {:>12}",
                s(&p["name"]),
                s(&p["vlan"]),
                s(&p["unicast"]),
                s(&p["flooded"]),
                s(&p["dropped"])
            );
        }
        if sw["uplink"].is_object() {
            let u = &sw["uplink"];
            println!(
                "  {:<16} {:>5} {:>12} {:>12} {:>12}",
                "(uplink)",
                "-",
                s(&u["unicast"]),
                s(&u["rx_frames"]),
                s(&u["dropped"])
            );
        }
        println!("  {:<17} {:>5} {:<16} AGE", "MAC", "VLAN", "PORT");
        for m in sw["macs"].as_array().into_iter().flatten() {
            println!(
                "  {:<17} {:>5} {:<16} {}",
                s(&m["mac"]),
                s(&m["vlan"]),
                s(&m["port"]),
                s(&m["age"])
            );
        }
    }
}

fn run(cmd: Command) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        Command::Daemon(a) => {
            let workers = match a.workers {
                Some(CpuList(cpus)) => cpus.into_iter().map(Some).collect(),
                None => vec![None],
            };
            let control = rpc::default_control_path(a.control.control.as_deref());
            let mut d = Daemon::new(&Options {
                control: Some(control),
                workers,
                poll: a.poll,
                state: a.state.clone(),
                metrics: a.metrics.clone(),
            })?;
            d.notify_ready();
            let r = d.run(false);
            info!("stopped");
            Ok(r?)
        }
        Command::Port(PortArgs { cmd }) => match cmd {
            PortCmd::Add(a) => {
                client(&a.control, "port_add", a.spec().to_params())?;
                println!("port {} added", a.name);
                Ok(())
            }
            PortCmd::Del { name, control } => {
                client(&control, "port_del", json!({ "name": name }))?;
                println!("port {name} deleted");
                Ok(())
            }
            PortCmd::List(a) => a.show("port_list", json!({}), print_ports),
        },
        Command::Stats(a) => {
            let params = match &a.name {
                Some(n) => json!({ "name": n }),
                None => json!({}),
            };
            a.list.show("stats", params, print_stats)
        }
        Command::Worker(WorkerArgs {
            cmd: WorkerCmd::List(a),
        }) => a.show("worker_list", json!({}), print_workers),
        Command::Switch(SwitchArgs { cmd }) => match cmd {
            SwitchCmd::Add {
                name,
                uplink,
                control,
            } => {
                let mut params = json!({ "name": name });
                if let Some(u) = &uplink {
                    params["uplink"] = json!(u.to_string());
                }
                client(&control, "switch_add", params)?;
                println!("switch {name} added");
                Ok(())
            }
            SwitchCmd::Del { name, control } => {
                client(&control, "switch_del", json!({ "name": name }))?;
                println!("switch {name} deleted");
                Ok(())
            }
            SwitchCmd::List(a) => a.show("switch_list", json!({}), print_switches),
        },
        Command::VhostUser(a) => run_one_port(a.spec(), a.dev.poll),
        Command::Vduse(a) => run_one_port(a.spec(), a.dev.poll),
        Command::Vf(a) => vf_cmd::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vfrelay").chain(args.iter().copied()))
    }

    #[test]
    fn cli_spellings() {
        let c = parse(&[
            "vhost-user",
            "--socket",
            "/tmp/s",
            "--client",
            "--queues",
            "2",
            "--queue-size",
            "256",
            "--mac",
            "52:54:00:00:00:01",
            "--mtu",
            "9000",
            "--poll",
            "--backend",
            "af-xdp,ifname=v0,queue=1,mode=copy",
        ])
        .unwrap();
        let Command::VhostUser(a) = c.cmd else {
            panic!("not vhost-user")
        };
        assert!(a.client && a.dev.poll);
        assert_eq!((a.queues, a.queue_size, a.dev.mtu), (2, 256, 9000));
        assert_eq!(
            a.dev.backend.to_string(),
            "af-xdp,ifname=v0,queue=1,mode=copy"
        );
        let Command::VhostUser(a) = parse(&["vhost-user", "--socket", "/tmp/s"]).unwrap().cmd
        else {
            panic!("not vhost-user")
        };
        assert_eq!(a.dev.backend, BackendSpec::default());
        assert_eq!(a.queues, 1);
    }

    #[test]
    fn vduse_cli() {
        let c = parse(&[
            "vduse",
            "--name",
            "vd0",
            "--attach",
            "vhost-vdpa",
            "--mac",
            "52:54:00:00:00:02",
            "--mtu",
            "1400",
            "--backend",
            "af-xdp,ifname=v0",
        ])
        .unwrap();
        let Command::Vduse(a) = c.cmd else {
            panic!("not vduse")
        };
        assert_eq!(a.name, "vd0");
        assert_eq!(a.attach, vfrelay::Attach::VhostVdpa);
        assert_eq!((a.dev.mtu, a.queue_size), (1400, 256));
        let Command::Vduse(a) = parse(&["vduse", "--name", "x"]).unwrap().cmd else {
            panic!("not vduse")
        };
        assert_eq!(a.attach, vfrelay::Attach::VirtioVdpa);
        for bad in [
            &["vduse"][..],
            &["vduse", "--name", "x", "--attach", "vfio"],
            &["vduse", "--name", "x", "--queues", "2"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let c = parse(&["vduse", "--name", "x", "--attach", "none"]).unwrap();
        let Command::Vduse(a) = c.cmd else {
            panic!("not vduse")
        };
        assert_eq!(a.attach, vfrelay::Attach::None);
    }

    #[test]
    fn vf_cli() {
        let vf = |args: &[&str]| {
            let Command::Vf(a) = parse(args).unwrap().cmd else {
                panic!("not vf")
            };
            format!("{:?}", a.cmd)
        };
        assert_eq!(
            vf(&["vf", "list"]),
            "List(ListArgs { pf: None, json: false })"
        );
        assert_eq!(
            vf(&["vf", "list", "--pf", "eth0", "--json"]),
            "List(ListArgs { pf: Some(\"eth0\"), json: true })"
        );
        assert_eq!(
            vf(&["vf", "create", "--pf", "eth0", "--count", "7"]),
            "Create(CreateArgs { pf: \"eth0\", count: 7 })"
        );
        let c = vf(&[
            "vf",
            "config",
            "--pf",
            "eth0",
            "--index",
            "1",
            "--mac",
            "52:54:00:6d:90:02",
            "--vlan",
            "42,qos=3",
            "--spoofchk",
            "off",
            "--trust",
            "on",
            "--link",
            "disable",
        ]);
        assert_eq!(
            c,
            "Config(ConfigArgs { pf: \"eth0\", index: 1, mac: Some([82, 84, 0, 109, 144, 2]), \
             vlan: Some(Vlan { id: 42, qos: 3 }), spoofchk: Some(false), trust: Some(true), \
             link: Some(Disable) })"
        );
        // One setting is enough.
        assert!(parse(&["vf", "config", "--pf", "e", "--index", "0", "--link", "auto"]).is_ok());
    }

    #[test]
    fn cli_rejects_bad_input() {
        for args in [
            &["vhost-user"][..],
            &["vhost-user", "--socket", "/s", "--queues", "0"],
            &["vhost-user", "--socket", "/s", "--queues", "x"],
            &["vhost-user", "--socket", "/s", "--queue-size", "1000"],
            &["vhost-user", "--socket", "/s", "--queue-size", "65536"],
            &["vhost-user", "--socket", "/s", "--mac", "01:00:5e:00:00:01"],
            &["vhost-user", "--socket", "/s", "--mtu", "20"],
            &["vhost-user", "--socket", "/s", "--backend", "nope"],
            &["vhost-user", "--socket", "/s", "--backend", "tap,ifname="],
            &["frobnicate"],
            &["vf"],
            &["vf", "list", "--pf"],
            &["vf", "create", "--pf", "eth0"],
            &["vf", "create", "--count", "2"],
            &["vf", "create", "--pf", "eth0", "--count", "-1"],
            &["vf", "config", "--pf", "eth0", "--index", "0"],
            &["vf", "config", "--pf", "eth0", "--mac", "52:54:00:00:00:01"],
            &[
                "vf", "config", "--pf", "eth0", "--index", "0", "--vlan", "4096",
            ],
            &[
                "vf", "config", "--pf", "eth0", "--index", "0", "--vlan", "1,qos=8",
            ],
            &[
                "vf", "config", "--pf", "eth0", "--index", "0", "--trust", "yes",
            ],
            &[
                "vf", "config", "--pf", "eth0", "--index", "0", "--link", "up",
            ],
            &[
                "vf",
                "config",
                "--pf",
                "eth0",
                "--index",
                "0",
                "--mac",
                "01:00:5e:00:00:01",
            ],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }
}
