//! `vfrelay vf list|create|config`: SR-IOV VF management on a PF, with no
//! tool but this binary (it runs in a busybox guest as well).

use std::fmt::Write as _;

use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;
use vfrelay_sriov::{self as sriov, LinkState, PfReport, Sysfs, VfSettings};

use vfrelay::net;

#[derive(Args, Debug)]
pub struct VfArgs {
    #[command(subcommand)]
    pub cmd: VfCommand,
}

#[derive(Subcommand, Debug)]
pub enum VfCommand {
    /// Show every SR-IOV PF (or one) with its VFs and their settings.
    List(ListArgs),
    /// Enable N VFs on a PF (0 removes them).
    Create(CreateArgs),
    /// Change settings of one VF (held by its PF driver).
    Config(ConfigArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this PF.
    #[arg(long, value_name = "NAME")]
    pf: Option<String>,
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The PF netdev.
    #[arg(long, value_name = "NAME")]
    pf: String,
    /// VFs to enable (at most the PF's sriov_totalvfs).
    #[arg(long, value_name = "N")]
    count: u32,
}

#[derive(Args, Debug)]
#[command(group(
    ArgGroup::new("setting")
        .required(true)
        .multiple(true)
        .args(["mac", "vlan", "spoofchk", "trust", "link"])
))]
pub struct ConfigArgs {
    /// The PF netdev.
    #[arg(long, value_name = "NAME")]
    pf: String,
    /// VF index (below the PF's enabled VF count).
    #[arg(long, value_name = "N")]
    index: u32,
    /// VF MAC address.
    #[arg(long, value_parser = net::parse_mac)]
    mac: Option<[u8; 6]>,
    /// Port VLAN 0..4095 (0: untagged), optionally with 802.1p priority 0..7.
    #[arg(long, value_name = "ID[,qos=Q]", value_parser = parse_vlan)]
    vlan: Option<Vlan>,
    /// Source MAC spoof check.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    spoofchk: Option<bool>,
    /// Trusted VF (may change its MAC, go promiscuous).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    trust: Option<bool>,
    /// VF link: follow the PF (auto), always up, always down.
    #[arg(long, value_name = "auto|enable|disable", value_parser = parse_link)]
    link: Option<LinkState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vlan {
    id: u16,
    qos: u8,
}

fn parse_vlan(s: &str) -> Result<Vlan, String> {
    let bad = || format!("'{s}' is not a VLAN (ID 0..4095, optionally ',qos=Q' with Q 0..7)");
    let (id, qos) = match s.split_once(',') {
        None => (s, None),
        Some((id, rest)) => (id, Some(rest.strip_prefix("qos=").ok_or_else(bad)?)),
    };
    let id: u16 = id.parse().ok().filter(|&n| n <= 4095).ok_or_else(bad)?;
    let qos: u8 = match qos {
        None => 0,
        Some(q) => q.parse().ok().filter(|&n| n <= 7).ok_or_else(bad)?,
    };
    Ok(Vlan { id, qos })
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}' is not on or off")),
    }
}

fn parse_link(s: &str) -> Result<LinkState, String> {
    s.parse()
}

pub fn run(a: VfArgs) -> Result<(), Box<dyn std::error::Error>> {
    let sys = Sysfs::default();
    match a.cmd {
        VfCommand::List(l) => {
            let pfs = sriov::list(&sys, l.pf.as_deref())?;
            if l.json {
                println!("{}", to_json(&pfs)?);
            } else {
                print!("{}", table(&pfs));
            }
        }
        VfCommand::Create(c) => {
            sriov::set_num_vfs(&sys, &c.pf, c.count)?;
            let (_, n) = sys.vf_counts(&c.pf)?;
            let vfs = if n == 1 { "VF" } else { "VFs" };
            println!("{}: {n} {vfs} enabled", c.pf);
        }
        VfCommand::Config(c) => {
            sriov::check_vf_index(&sys, &c.pf, c.index)?;
            let s = VfSettings {
                mac: c.mac,
                vlan: c.vlan.map(|v| (v.id, v.qos)),
                spoofchk: c.spoofchk,
                trust: c.trust,
                link_state: c.link,
            };
            sriov::Rtnl::open()?.set_vf(&c.pf, c.index, &s)?;
        }
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// The `--json` document, fields in this order; null where nothing is
/// known.
#[derive(Serialize)]
struct JsonDoc {
    pfs: Vec<JsonPf>,
}

#[derive(Serialize)]
struct JsonPf {
    name: String,
    pci: Option<String>,
    total_vfs: u32,
    num_vfs: u32,
    vfs: Vec<JsonVf>,
}

#[derive(Serialize)]
struct JsonVf {
    index: u32,
    pci: Option<String>,
    netdev: Option<String>,
    driver: Option<String>,
    mac: Option<String>,
    vlan: Option<u32>,
    qos: Option<u32>,
    spoofchk: Option<bool>,
    trust: Option<bool>,
    link_state: Option<String>,
}

/// `{"pfs":[...]}` for `vfrelay vf list --json`.
pub fn to_json(pfs: &[PfReport]) -> serde_json::Result<String> {
    let doc = JsonDoc {
        pfs: pfs
            .iter()
            .map(|pf| JsonPf {
                name: pf.name.clone(),
                pci: pf.pci.clone(),
                total_vfs: pf.total_vfs,
                num_vfs: pf.num_vfs,
                vfs: pf
                    .vfs
                    .iter()
                    .map(|vf| {
                        let c = vf.config.clone().unwrap_or_default();
                        JsonVf {
                            index: vf.index,
                            pci: vf.pci.clone(),
                            netdev: vf.netdev.clone(),
                            driver: vf.driver.clone(),
                            mac: c.mac.map(|m| net::format_mac(&m)),
                            vlan: c.vlan,
                            qos: c.qos,
                            spoofchk: c.spoofchk,
                            trust: c.trust,
                            link_state: c.link_state.map(|l| l.to_string()),
                        }
                    })
                    .collect(),
            })
            .collect(),
    };
    serde_json::to_string(&doc)
}

/// The human listing: one header line per PF, then a VF table.
pub fn table(pfs: &[PfReport]) -> String {
    let mut out = String::new();
    if pfs.is_empty() {
        out.push_str("no SR-IOV PF found\n");
        return out;
    }
    let dash = || "-".to_string();
    for (i, pf) in pfs.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "{} ({}): {} of {} VFs enabled",
            pf.name,
            pf.pci.as_deref().unwrap_or("no PCI address"),
            pf.num_vfs,
            pf.total_vfs
        );
        if pf.vfs.is_empty() {
            continue;
        }
        let mut rows: Vec<[String; 9]> = vec![[
            "VF", "PCI", "NETDEV", "DRIVER", "MAC", "VLAN", "SPOOFCHK", "TRUST", "LINK",
        ]
        .map(str::to_string)];
        for vf in &pf.vfs {
            let c = vf.config.clone().unwrap_or_default();
            let vlan = match (c.vlan, c.qos) {
                (None, _) | (Some(0), None | Some(0)) => dash(),
                (Some(v), None | Some(0)) => v.to_string(),
                (Some(v), Some(q)) => format!("{v},qos={q}"),
            };
            rows.push([
                vf.index.to_string(),
                vf.pci.clone().unwrap_or_else(dash),
                vf.netdev.clone().unwrap_or_else(dash),
                vf.driver.clone().unwrap_or_else(dash),
                c.mac.map(|m| net::format_mac(&m)).unwrap_or_else(dash),
                vlan,
                c.spoofchk.map(on_off).map_or_else(dash, str::to_string),
                c.trust.map(on_off).map_or_else(dash, str::to_string),
                c.link_state.map_or_else(dash, |l| l.to_string()),
            ]);
        }
        let mut widths = [0usize; 9];
        for r in &rows {
            for (w, cell) in widths.iter_mut().zip(r) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for r in &rows {
            let mut line = String::from("  ");
            for (k, (cell, w)) in r.iter().zip(widths).enumerate() {
                if k + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use vfrelay_sriov::{VfConfig, VfReport};

    fn sample() -> Vec<PfReport> {
        vec![
            PfReport {
                name: "eth0".into(),
                pci: Some("0000:00:03.0".into()),
                total_vfs: 7,
                num_vfs: 2,
                vfs: vec![
                    VfReport {
                        index: 0,
                        pci: Some("0000:01:10.0".into()),
                        netdev: Some("eth1".into()),
                        driver: Some("igbvf".into()),
                        config: Some(VfConfig {
                            index: 0,
                            mac: Some([0x52, 0x54, 0, 0x6d, 0x90, 2]),
                            vlan: Some(42),
                            qos: Some(3),
                            spoofchk: Some(true),
                            trust: Some(false),
                            link_state: Some(LinkState::Auto),
                        }),
                    },
                    VfReport {
                        index: 1,
                        pci: Some("0000:01:10.2".into()),
                        netdev: None,
                        driver: Some("vfio-pci".into()),
                        config: Some(VfConfig {
                            index: 1,
                            mac: Some([0; 6]),
                            vlan: Some(0),
                            qos: Some(0),
                            spoofchk: Some(false),
                            trust: Some(true),
                            link_state: Some(LinkState::Disable),
                        }),
                    },
                ],
            },
            PfReport {
                name: "eth2".into(),
                pci: None,
                total_vfs: 4,
                num_vfs: 0,
                vfs: vec![],
            },
        ]
    }

    #[test]
    fn json_shape() {
        let v: Value = serde_json::from_str(&to_json(&sample()).unwrap()).unwrap();
        let want: Value = serde_json::from_str(
            r#"{"pfs":[
              {"name":"eth0","pci":"0000:00:03.0","total_vfs":7,"num_vfs":2,"vfs":[
                {"index":0,"pci":"0000:01:10.0","netdev":"eth1","driver":"igbvf",
                 "mac":"52:54:00:6d:90:02","vlan":42,"qos":3,"spoofchk":true,
                 "trust":false,"link_state":"auto"},
                {"index":1,"pci":"0000:01:10.2","netdev":null,"driver":"vfio-pci",
                 "mac":"00:00:00:00:00:00","vlan":0,"qos":0,"spoofchk":false,
                 "trust":true,"link_state":"disable"}]},
              {"name":"eth2","pci":null,"total_vfs":4,"num_vfs":0,"vfs":[]}]}"#,
        )
        .unwrap();
        assert_eq!(v, want);
        assert_eq!(to_json(&[]).unwrap(), r#"{"pfs":[]}"#);
        // Field order as documented (Value comparison ignores it).
        assert!(to_json(&sample()).unwrap().starts_with(
            r#"{"pfs":[{"name":"eth0","pci":"0000:00:03.0","total_vfs":7,"num_vfs":2,"vfs":[{"index":0,"pci":"0000:01:10.0","netdev":"eth1","driver":"igbvf","mac":"52:54:00:6d:90:02","vlan":42,"qos":3,"spoofchk":true,"trust":false,"link_state":"auto"}"#
        ));
        // A VF the PF driver said nothing about: settings are null.
        let mut pfs = sample();
        pfs[0].vfs[0].config = None;
        let v: Value = serde_json::from_str(&to_json(&pfs).unwrap()).unwrap();
        let vf = &v["pfs"][0]["vfs"][0];
        for k in ["mac", "vlan", "qos", "spoofchk", "trust", "link_state"] {
            assert!(vf[k].is_null(), "{k}");
        }
        assert_eq!(vf["netdev"], "eth1");
    }

    #[test]
    fn table_format() {
        assert_eq!(
            table(&sample()),
            "\
eth0 (0000:00:03.0): 2 of 7 VFs enabled
  VF  PCI           NETDEV  DRIVER    MAC                VLAN      SPOOFCHK  TRUST  LINK
  0   0000:01:10.0  eth1    igbvf     52:54:00:6d:90:02  42,qos=3  on        off    auto
  1   0000:01:10.2  -       vfio-pci  00:00:00:00:00:00  -         off       on     disable

eth2 (no PCI address): 0 of 4 VFs enabled
"
        );
        assert_eq!(table(&[]), "no SR-IOV PF found\n");
    }

    #[test]
    fn vlan_and_switches_parse() {
        assert_eq!(parse_vlan("42").unwrap(), Vlan { id: 42, qos: 0 });
        assert_eq!(parse_vlan("42,qos=3").unwrap(), Vlan { id: 42, qos: 3 });
        assert_eq!(parse_vlan("0").unwrap(), Vlan { id: 0, qos: 0 });
        assert_eq!(parse_vlan("4095,qos=7").unwrap(), Vlan { id: 4095, qos: 7 });
        for bad in [
            "",
            "4096",
            "-1",
            "x",
            "42,",
            "42,qos=",
            "42,qos=8",
            "42,prio=3",
            "42,qos=3,x",
            "42 ",
            ",qos=1",
        ] {
            assert!(parse_vlan(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_vlan("42,qos=8").unwrap_err(),
            "'42,qos=8' is not a VLAN (ID 0..4095, optionally ',qos=Q' with Q 0..7)"
        );
        assert_eq!(parse_on_off("on"), Ok(true));
        assert_eq!(parse_on_off("off"), Ok(false));
        assert!(parse_on_off("yes").is_err());
        assert_eq!(parse_link("enable"), Ok(LinkState::Enable));
        assert!(parse_link("up").is_err());
    }
}
