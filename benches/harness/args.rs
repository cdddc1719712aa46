//! The packet-rate harness's command line. Here rather than in
//! benches/packet_rate.rs so that its tests run: `cargo test` never runs a
//! `harness = false` bench's tests, but tests/bench_smoke.rs includes this
//! module too.

use std::ffi::OsStr;
use std::path::PathBuf;

use clap::builder::RangedU64ValueParser;
use clap::{Parser, ValueEnum};

use super::Config;

#[derive(Parser, Debug)]
#[command(
    name = "packet_rate",
    about = "Packet rate of vfrelay against DPDK's vhost-user back end (and OVS-DPDK in vm2vm)",
    override_usage = "cargo bench --bench packet_rate -- [OPTIONS]",
    after_help = "Run as root. See benches/README.md.",
    // A repeated --reps, --sizes, ... takes its last value (--only and
    // --dir add up): what the harness did before it used clap.
    args_override_self = true
)]
pub struct Args {
    /// Every configuration briefly, one repetition (also VFRELAY_BENCH_SMOKE=1).
    #[arg(long)]
    pub smoke: bool,
    /// Run only this scenario (repeatable; default: all of them).
    #[arg(long, value_name = "SCENARIO")]
    pub only: Vec<Scenario>,
    /// Repetitions per point [default: 5, smoke 1].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub reps: Option<usize>,
    /// Measurement window per point, in seconds [default: 2, smoke 1].
    #[arg(long, value_name = "S", value_parser = positive_secs)]
    pub secs: Option<f64>,
    /// Frame sizes on the wire, FCS included [default: 64,256,512,1024,1518;
    /// vm2vm and smoke 64,1518].
    // 64..=1518: testpmd is given size - 4, and every link in the harness
    // has the default 1500-byte MTU.
    #[arg(
        long,
        value_name = "64,1518",
        value_delimiter = ',',
        action = clap::ArgAction::Set,
        value_parser = RangedU64ValueParser::<usize>::new().range(64..=1518)
    )]
    pub sizes: Option<Vec<usize>>,
    /// Queue pairs of the loopback scenario [default: 1,2].
    #[arg(long, value_name = "1,2", value_delimiter = ',', action = clap::ArgAction::Set, value_parser = at_least_one)]
    pub queues: Option<Vec<usize>>,
    /// Port counts of the ports scenario [default: 1,4,16,64; smoke 1,4].
    #[arg(long, value_name = "1,4,16,64", value_delimiter = ',', action = clap::ArgAction::Set, value_parser = at_least_one)]
    pub ports: Option<Vec<usize>>,
    /// Pair counts of the vm2vm scenario, 2 ports a pair [default: 1,4].
    // One front end holds them all: RTE_MAX_ETHPORTS=32 is 16 pairs.
    #[arg(
        long,
        value_name = "1,4",
        value_delimiter = ',',
        action = clap::ArgAction::Set,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=16)
    )]
    pub pairs: Option<Vec<usize>>,
    /// Only this direction of the af-xdp and tap scenarios (repeatable;
    /// default: both).
    #[arg(long = "dir", value_name = "DIR")]
    pub dirs: Vec<Direction>,
    /// The vfrelay binary to measure, e.g. another build to compare a change
    /// against its parent [default: this build's].
    #[arg(long, value_name = "PATH")]
    pub vfrelay: Option<PathBuf>,
    /// Where reports go [default: benches/results].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// cargo bench appends --bench for `harness = false` targets. Counted
    /// rather than a plain flag so that giving it twice is no error either.
    #[arg(long, hide = true, action = clap::ArgAction::Count)]
    bench: u8,
}

/// A scenario of the harness, spelled as `Config::only` holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Loopback,
    AfXdp,
    Tap,
    Idle,
    Ports,
    Vm2vm,
}

/// A direction of the af-xdp and tap scenarios, spelled as `Config::dirs`
/// holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Direction {
    GuestToWire,
    WireToGuest,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{s}' is not a count of 1 or more")),
    }
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// The name the command line and `Config` use for a value.
fn name_of(v: &impl ValueEnum) -> String {
    v.to_possible_value()
        .expect("no variant is skipped")
        .get_name()
        .to_string()
}

/// Whether `Config::wants` is asked about a scenario the command line knows:
/// catches a literal in the harness drifting from the spelling here.
pub fn is_scenario(name: &str) -> bool {
    Scenario::from_str(name, false).is_ok()
}

/// Likewise for the directions the harness loops over.
pub fn is_direction(name: &str) -> bool {
    Direction::from_str(name, false).is_ok()
}

impl Args {
    /// The configuration these arguments ask for. `smoke_env` is
    /// $VFRELAY_BENCH_SMOKE (smoke mode when it is "1"); `out` and `vfrelay`
    /// are used unless --out and --vfrelay say otherwise.
    pub fn config(self, smoke_env: Option<&OsStr>, out: PathBuf, vfrelay: PathBuf) -> Config {
        let smoke = self.smoke || smoke_env.is_some_and(|v| v == "1");
        let out = self.out.unwrap_or(out);
        let raw = out.join("raw");
        let mut cfg = Config::new(smoke, out, raw, self.vfrelay.unwrap_or(vfrelay));
        cfg.only = self.only.iter().map(name_of).collect();
        cfg.dirs = self.dirs.iter().map(name_of).collect();
        if let Some(r) = self.reps {
            cfg.reps = r;
        }
        if let Some(s) = self.secs {
            cfg.secs = s;
        }
        if let Some(s) = self.sizes {
            cfg.vm2vm_sizes = s.clone();
            cfg.sizes = s;
        }
        if let Some(q) = self.queues {
            cfg.loopback_queues = q;
        }
        if let Some(p) = self.ports {
            cfg.ports = p;
        }
        if let Some(p) = self.pairs {
            cfg.vm2vm_pairs = p;
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    // Cargo builds the bench target with cfg(test) but not as a test crate:
    // the #[test]s vanish there, and the helpers below would look unused.
    #![allow(unused)]

    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("packet_rate").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Config {
        parse(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .config(None, PathBuf::from("/o"), PathBuf::from("/bin/vfrelay"))
    }

    #[test]
    fn help_lists_every_option_but_the_hidden_one() {
        let e = parse(&["--help"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayHelp);
        let help = e.render().to_string();
        for opt in [
            "--smoke",
            "--only <SCENARIO>",
            "--reps <N>",
            "--secs <S>",
            "--sizes <64,1518>",
            "--queues <1,2>",
            "--ports <1,4,16,64>",
            "--pairs <1,4>",
            "--dir <DIR>",
            "--vfrelay <PATH>",
            "--out <DIR>",
            "loopback, af-xdp, tap, idle, ports, vm2vm",
            "guest-to-wire, wire-to-guest",
        ] {
            assert!(help.contains(opt), "--help does not show {opt:?}:\n{help}");
        }
        let shown = |o: &str| help.lines().any(|l| l.trim_start().starts_with(o));
        assert!(shown("--smoke") && !shown("--bench"), "{help}");
    }

    #[test]
    fn unknown_scenario_direction_or_option_is_an_error_naming_it() {
        for (args, bad) in [
            (&["--only", "nosuch"][..], "nosuch"),
            (&["--only", "loopback", "--only", "afxdp"], "afxdp"),
            (&["--dir", "both"], "both"),
            (&["--sizes", "64,huge"], "huge"),
            (&["--sizes", "32"], "32"),
            (&["--reps", "0"], "0"),
            (&["--secs", "-1"], "-1"),
            (&["--queues", "1,0"], "0"),
            (&["--pairs", "0"], "0"),
            (&["--pairs", "1,17"], "17"),
            (&["--only", "vm-to-vm"], "vm-to-vm"),
            (&["--frobnicate"], "--frobnicate"),
            (&["loopback"], "loopback"),
        ] {
            let e = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} parsed"));
            // Exit code 2, as Args::parse() exits with.
            assert_eq!(e.exit_code(), 2, "{args:?}");
            let msg = e.render().to_string();
            assert!(
                msg.contains(bad),
                "{args:?}: message does not name {bad:?}: {msg}"
            );
        }
    }

    #[test]
    fn every_spelling_reaches_the_config() {
        let c = config(&[
            "--only",
            "af-xdp",
            "--only",
            "ports",
            "--reps",
            "3",
            "--secs",
            "0.5",
            "--sizes",
            "64,1518",
            "--queues",
            "2",
            "--ports",
            "1,4,16",
            "--dir",
            "wire-to-guest",
            "--vfrelay",
            "/tmp/parent/vfrelay",
            "--out",
            "/tmp/res",
            // As cargo bench passes it.
            "--bench",
        ]);
        assert_eq!(c.only, ["af-xdp", "ports"]);
        assert_eq!(c.dirs, ["wire-to-guest"]);
        assert_eq!((c.reps, c.secs), (3, 0.5));
        assert_eq!(c.sizes, [64, 1518]);
        assert_eq!(c.vm2vm_sizes, [64, 1518]);
        assert_eq!(c.loopback_queues, [2]);
        assert_eq!(c.ports, [1, 4, 16]);
        assert_eq!(c.vfrelay, PathBuf::from("/tmp/parent/vfrelay"));
        assert_eq!(c.out, PathBuf::from("/tmp/res"));
        assert_eq!(c.raw, PathBuf::from("/tmp/res/raw"));
        assert!(!c.smoke);
    }

    #[test]
    fn vm2vm_takes_its_pairs_and_the_sizes_given() {
        let c = config(&["--only", "vm2vm", "--bench"]);
        assert_eq!(c.only, ["vm2vm"]);
        // Its own default sizes (three back ends, two pair counts) beside
        // the other scenarios' five.
        assert_eq!(
            (c.vm2vm_pairs.as_slice(), c.vm2vm_sizes.as_slice()),
            (&[1, 4][..], &[64, 1518][..])
        );
        assert_eq!(c.sizes, super::super::SIZES);
        let c = config(&["--only", "vm2vm", "--pairs", "1,2,16", "--sizes", "256"]);
        assert_eq!(c.vm2vm_pairs, [1, 2, 16]);
        assert_eq!(
            (c.vm2vm_sizes.as_slice(), c.sizes.as_slice()),
            (&[256][..], &[256][..])
        );
        let c = config(&["--pairs", "2", "--pairs", "4"]);
        assert_eq!(c.vm2vm_pairs, [4]);
        // Smoke mode runs it too, at the same sizes.
        let c = config(&["--smoke"]);
        assert_eq!(
            (c.vm2vm_pairs.as_slice(), c.vm2vm_sizes.as_slice()),
            (&[1, 4][..], &[64, 1518][..])
        );
    }

    #[test]
    fn defaults_are_the_full_run() {
        let c = config(&["--bench"]);
        let full = Config::new(false, "/o".into(), "/o/raw".into(), "/bin/vfrelay".into());
        assert_eq!(format!("{c:?}"), format!("{full:?}"));
    }

    #[test]
    fn smoke_from_the_flag_or_the_environment() {
        let with_env = |args: &[&str], env: Option<&str>| {
            parse(args)
                .unwrap()
                .config(env.map(OsStr::new), "/o".into(), "/v".into())
                .smoke
        };
        assert!(with_env(&["--smoke"], None));
        assert!(with_env(&[], Some("1")));
        assert!(!with_env(&[], Some("0")));
        assert!(!with_env(&[], None));
        // Explicit values still win over smoke mode's defaults.
        let c = parse(&["--smoke", "--reps", "2"])
            .unwrap()
            .config(None, "/o".into(), "/v".into());
        assert_eq!((c.smoke, c.reps, c.secs), (true, 2, 1.0));
    }

    #[test]
    fn a_repeated_option_takes_the_last_value_only_and_dir_add_up() {
        let c = config(&["--reps", "2", "--reps", "4", "--bench", "--bench"]);
        assert_eq!(c.reps, 4);
        let c = config(&["--sizes", "64,256", "--sizes", "1518"]);
        assert_eq!(c.sizes, [1518]);
        let c = config(&[
            "--ports", "1,4", "--ports", "16,64", "--queues", "1", "--queues", "2",
        ]);
        assert_eq!((c.ports, c.loopback_queues), (vec![16, 64], vec![2]));
        // The repeatable ones add up.
        let c = config(&["--only", "tap", "--dir", "guest-to-wire", "--only", "idle"]);
        assert_eq!(c.only, ["tap", "idle"]);
    }

    #[test]
    fn the_names_are_the_ones_the_harness_compares() {
        let names = |v: &[Scenario]| v.iter().map(name_of).collect::<Vec<_>>();
        assert_eq!(
            names(Scenario::value_variants()),
            ["loopback", "af-xdp", "tap", "idle", "ports", "vm2vm"]
        );
        let dirs = Direction::value_variants().iter().map(name_of);
        assert_eq!(dirs.collect::<Vec<_>>(), ["guest-to-wire", "wire-to-guest"]);
        assert!(is_scenario("af-xdp") && !is_scenario("af_xdp"));
        assert!(is_direction("wire-to-guest") && !is_direction("both"));
    }
}
