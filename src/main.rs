//! vfrelay: a software vDPA dataplane. Serves virtio-net rings to a guest
//! and relays every packet to a host-side backend.

mod daemon;
mod dataplane;
mod device;
mod frontend;
mod shutdown;
mod stats;
mod vf_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use log::info;
use vfrelay_backends::BackendSpec;

use device::NetConfig;

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
    /// Serve a virtio-net device over a vhost-user socket.
    VhostUser(VhostUserArgs),
    /// Serve a virtio-net device as a VDUSE (vDPA) device in this kernel.
    Vduse(VduseArgs),
    /// SR-IOV: list VFs, enable them, set a VF's MAC/VLAN/trust/link.
    Vf(vf_cmd::VfArgs),
}

#[derive(Args, Debug)]
struct DeviceArgs {
    /// Guest MAC address (default: random, locally administered).
    #[arg(long, value_parser = device::parse_mac)]
    mac: Option<[u8; 6]>,
    /// MTU reported to the driver.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..=9000))]
    mtu: u16,
    /// Busy-poll rings and backend on dedicated threads.
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
    attach: frontend::vduse::Attach,
    /// Ring size offered to the driver (power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,
    #[command(flatten)]
    dev: DeviceArgs,
}

impl DeviceArgs {
    /// The device both frontends present, from the options they share.
    fn net_config(&self, queue_pairs: usize, queue_size: u16) -> NetConfig {
        NetConfig {
            mac: self.mac.unwrap_or_else(device::random_mac),
            mtu: self.mtu,
            queue_pairs,
            queue_size,
            poll: self.poll,
        }
    }
}

fn parse_backend(s: &str) -> Result<BackendSpec, String> {
    s.parse()
        .map_err(|e: vfrelay_backends::Error| e.to_string())
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(64..=32768).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two between 64 and 32768"));
    }
    Ok(n as u16)
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
    // The vf commands are one-shot: Ctrl-C may simply end them.
    if !matches!(cli.cmd, Command::Vf(_)) {
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

fn run(cmd: Command) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        Command::VhostUser(a) => {
            let cfg = a.dev.net_config(a.queues as usize, a.queue_size);
            let backends = a.dev.backend.open_with_mac(cfg.queue_pairs, cfg.mac)?;
            info!(
                "vhost-user virtio-net: mac {} mtu {} queue pairs {} backend {}{}",
                device::format_mac(&cfg.mac),
                cfg.mtu,
                cfg.queue_pairs,
                a.dev.backend,
                if cfg.poll { " (polling)" } else { "" }
            );
            let net = frontend::vhost_user::VhostUserNet::new(
                cfg,
                a.dev.backend.offload_features(),
                backends,
            );
            frontend::vhost_user::run(net, &a.socket, a.client)?;
            info!("stopped");
            Ok(())
        }
        Command::Vduse(a) => {
            // VDUSE serves one queue pair: the kernel refuses CTRL_VQ, so MQ.
            let cfg = a.dev.net_config(1, a.queue_size);
            let backends = a.dev.backend.open_with_mac(1, cfg.mac)?;
            info!(
                "VDUSE virtio-net {}: mac {} mtu {} backend {}{}",
                a.name,
                device::format_mac(&cfg.mac),
                cfg.mtu,
                a.dev.backend,
                if cfg.poll { " (polling)" } else { "" }
            );
            let net = frontend::vduse::VduseNet {
                name: a.name,
                attach: a.attach,
                cfg,
                offloads: a.dev.backend.offload_features(),
            };
            frontend::vduse::run(net, backends)?;
            info!("stopped");
            Ok(())
        }
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
        assert_eq!(a.attach, frontend::vduse::Attach::VhostVdpa);
        assert_eq!((a.dev.mtu, a.queue_size), (1400, 256));
        let Command::Vduse(a) = parse(&["vduse", "--name", "x"]).unwrap().cmd else {
            panic!("not vduse")
        };
        assert_eq!(a.attach, frontend::vduse::Attach::VirtioVdpa);
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
        assert_eq!(a.attach, frontend::vduse::Attach::None);
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
