//! SR-IOV VF management, shared by the `vfrelay vf` commands and the `vf`
//! backend: sysfs for PFs, VF counts and where each VF sits ([`sysfs`]),
//! rtnetlink for the per-VF settings the PF driver holds ([`netlink`]).
//!
//! This is control plane, not a backend: it moves no packets. It creates
//! VFs, sets what the PF driver holds for each (MAC, VLAN, spoof check,
//! trust, link state) and finds a VF's netdev; the `vf` backend in
//! `vfrelay-backends` then runs AF_XDP on that netdev.

pub mod netlink;
pub mod sysfs;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

pub use netlink::{if_index, Rtnl};
pub use sysfs::{PfSysfs, Sysfs, VfSysfs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such PF '{0}'")]
    NoSuchPf(String),
    #[error("'{0}' is not an SR-IOV PF (no sriov_totalvfs)")]
    NotSriov(String),
    #[error("no such netdev '{0}'")]
    NoSuchNetdev(String),
    #[error("{pf} supports at most {total} VFs, not {requested}")]
    TooManyVfs {
        pf: String,
        requested: u32,
        total: u32,
    },
    #[error(
        "VF {index} of {pf} is not enabled ({pf} has {}; run 'vfrelay vf create --pf {pf} --count {}')",
        count_vfs(*enabled),
        u64::from(*index) + 1
    )]
    NotEnabled {
        pf: String,
        index: u32,
        enabled: u32,
    },
    #[error(
        "VF {index} of {pf} does not exist ({pf} supports {} VFs: 0 to {})",
        total,
        total.saturating_sub(1)
    )]
    NoSuchVf { pf: String, index: u32, total: u32 },
    #[error("VF {index} of {pf} ({pci}) has no driver bound; bind it to its VF driver")]
    NoDriver { pf: String, index: u32, pci: String },
    #[error(
        "VF {index} of {pf} ({pci}) is bound to {driver}, not a network driver; \
         bind it to its VF driver"
    )]
    NotNetdev {
        pf: String,
        index: u32,
        pci: String,
        driver: String,
    },
    #[error(
        "VF {index} of {pf} ({pci}): no netdev appeared within {secs} s of binding it to {driver}"
    )]
    RebindTimeout {
        pf: String,
        index: u32,
        pci: String,
        driver: String,
        secs: f32,
    },
    #[error("{}: {source}", path.display())]
    Sysfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: unexpected content '{content}'", path.display())]
    Parse { path: PathBuf, content: String },
    /// A failed rtnetlink request; `source` carries the kernel's errno.
    #[error("{what}: {source}{}", extack.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Netlink {
        what: String,
        #[source]
        source: io::Error,
        extack: Option<String>,
    },
}

impl Error {
    pub(crate) fn netlink(
        what: impl Into<String>,
        source: io::Error,
        extack: Option<String>,
    ) -> Self {
        Error::Netlink {
            what: what.into(),
            source,
            extack,
        }
    }
}

fn count_vfs(n: u32) -> String {
    if n == 1 {
        "1 VF".into()
    } else {
        format!("{n} VFs")
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A VF's link state as its PF driver reports it (IFLA_VF_LINK_STATE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Follows the PF's link.
    Auto,
    Enable,
    Disable,
    /// A value this version does not know.
    Other(u32),
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkState::Auto => f.write_str("auto"),
            LinkState::Enable => f.write_str("enable"),
            LinkState::Disable => f.write_str("disable"),
            LinkState::Other(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for LinkState {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(LinkState::Auto),
            "enable" => Ok(LinkState::Enable),
            "disable" => Ok(LinkState::Disable),
            _ => Err(format!(
                "'{s}' is not a link state (expected auto, enable or disable)"
            )),
        }
    }
}

/// What the PF driver reports for one VF; None where it said nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VfConfig {
    pub index: u32,
    pub mac: Option<[u8; 6]>,
    pub vlan: Option<u32>,
    pub qos: Option<u32>,
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    pub link_state: Option<LinkState>,
}

/// Settings to apply to one VF; None leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VfSettings {
    pub mac: Option<[u8; 6]>,
    /// VLAN id (0 = untagged) and 802.1p priority.
    pub vlan: Option<(u16, u8)>,
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    pub link_state: Option<LinkState>,
}

impl VfSettings {
    pub fn is_empty(&self) -> bool {
        *self == VfSettings::default()
    }
}

/// One PF with everything known about its VFs (what `vfrelay vf list`
/// shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfReport {
    pub name: String,
    pub pci: Option<String>,
    pub total_vfs: u32,
    pub num_vfs: u32,
    pub vfs: Vec<VfReport>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfReport {
    pub index: u32,
    pub pci: Option<String>,
    pub netdev: Option<String>,
    pub driver: Option<String>,
    /// None when the PF driver reported nothing for this VF.
    pub config: Option<VfConfig>,
}

/// Merges sysfs and rtnetlink views of one PF: every VF either knows of.
pub fn merge(pf: PfSysfs, configs: Vec<VfConfig>) -> PfReport {
    let mut indices: Vec<u32> = pf
        .vfs
        .iter()
        .map(|v| v.index)
        .chain(configs.iter().map(|c| c.index))
        .collect();
    indices.sort_unstable();
    indices.dedup();
    let vfs = indices
        .into_iter()
        .map(|i| {
            let s = pf.vfs.iter().find(|v| v.index == i);
            VfReport {
                index: i,
                pci: s.map(|v| v.pci.clone()),
                netdev: s.and_then(|v| v.netdev.clone()),
                driver: s.and_then(|v| v.driver.clone()),
                config: configs.iter().find(|c| c.index == i).cloned(),
            }
        })
        .collect();
    PfReport {
        name: pf.name,
        pci: pf.pci,
        total_vfs: pf.total_vfs,
        num_vfs: pf.num_vfs,
        vfs,
    }
}

/// Every SR-IOV PF (or just `only`), with its VFs.
pub fn list(sys: &Sysfs, only: Option<&str>) -> Result<Vec<PfReport>> {
    let names = match only {
        Some(n) => vec![n.to_string()],
        None => sys.pf_names()?,
    };
    let mut out = Vec::with_capacity(names.len());
    let mut rtnl: Option<Rtnl> = None;
    for name in names {
        let pf = sys.pf(&name)?;
        let nl = match &mut rtnl {
            Some(r) => r,
            None => rtnl.insert(Rtnl::open()?),
        };
        let configs = nl.vf_configs(&name)?;
        out.push(merge(pf, configs));
    }
    Ok(out)
}

/// Enables `n` VFs on `pf` (0 disables them all).
///
/// The kernel refuses to change a non-zero VF count to another non-zero
/// one, so the count goes through 0 first. The PF is brought up first: VF
/// drivers (igbvf) fail to start on a PF that is still down.
pub fn set_num_vfs(sys: &Sysfs, pf: &str, n: u32) -> Result<()> {
    let (total, current) = sys.vf_counts(pf)?;
    if n > total {
        return Err(Error::TooManyVfs {
            pf: pf.to_string(),
            requested: n,
            total,
        });
    }
    let writes = num_vfs_writes(current, n);
    if n > 0 && !writes.is_empty() && !sys.netdev_is_up(pf)? {
        Rtnl::open()?.set_up(pf)?;
    }
    for w in writes {
        sys.write_num_vfs(pf, w)?;
    }
    Ok(())
}

/// What to write to `sriov_numvfs` to go from `current` to `n` VFs.
fn num_vfs_writes(current: u32, n: u32) -> Vec<u32> {
    match (current, n) {
        (c, n) if c == n => vec![],
        (0, n) => vec![n],
        (_, 0) => vec![0],
        (_, n) => vec![0, n],
    }
}

/// VF `index` of `pf` and the name of its netdev; fails with what is
/// missing (PF, SR-IOV, the VF itself, a network driver).
pub fn vf_netdev(sys: &Sysfs, pf: &str, index: u32) -> Result<(VfSysfs, String)> {
    check_vf_index(sys, pf, index)?;
    let vf = sys.vf(pf, index)?;
    match (&vf.netdev, &vf.driver) {
        (Some(n), _) => {
            let n = n.clone();
            Ok((vf, n))
        }
        (None, Some(d)) => Err(Error::NotNetdev {
            pf: pf.to_string(),
            index,
            pci: vf.pci.clone(),
            driver: d.clone(),
        }),
        (None, None) => Err(Error::NoDriver {
            pf: pf.to_string(),
            index,
            pci: vf.pci.clone(),
        }),
    }
}

/// Checks that VF `index` of `pf` exists and is enabled.
pub fn check_vf_index(sys: &Sysfs, pf: &str, index: u32) -> Result<()> {
    let (total, enabled) = sys.vf_counts(pf)?;
    if index >= total {
        // Suggesting `vf create --count index+1` would only fail again.
        return Err(Error::NoSuchVf {
            pf: pf.to_string(),
            index,
            total,
        });
    }
    if index >= enabled {
        return Err(Error::NotEnabled {
            pf: pf.to_string(),
            index,
            enabled,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::sysfs::tests::sample;
    use super::*;

    #[test]
    fn link_state_parses_and_prints() {
        for (s, l) in [
            ("auto", LinkState::Auto),
            ("enable", LinkState::Enable),
            ("disable", LinkState::Disable),
        ] {
            assert_eq!(s.parse::<LinkState>().unwrap(), l);
            assert_eq!(l.to_string(), s);
        }
        assert_eq!(
            "on".parse::<LinkState>().unwrap_err(),
            "'on' is not a link state (expected auto, enable or disable)"
        );
        assert_eq!(LinkState::Other(7).to_string(), "7");
    }

    #[test]
    fn vf_netdev_says_what_is_missing() {
        let f = sample();
        let s = &f.sys;
        let (vf, name) = vf_netdev(s, "eth0", 0).unwrap();
        assert_eq!((vf.pci.as_str(), name.as_str()), ("0000:01:10.0", "eth1"));
        let e = |pf: &str, i: u32| vf_netdev(s, pf, i).unwrap_err().to_string();
        assert_eq!(
            e("eth0", 1),
            "VF 1 of eth0 (0000:01:10.2) is bound to vfio-pci, not a network driver; \
             bind it to its VF driver"
        );
        assert_eq!(
            e("eth0", 2),
            "VF 2 of eth0 (0000:01:10.4) has no driver bound; bind it to its VF driver"
        );
        assert_eq!(
            e("eth0", 3),
            "VF 3 of eth0 is not enabled (eth0 has 3 VFs; run 'vfrelay vf create --pf eth0 --count 4')"
        );
        // Beyond sriov_totalvfs (7): creating more VFs cannot help.
        assert_eq!(
            e("eth0", 7),
            "VF 7 of eth0 does not exist (eth0 supports 7 VFs: 0 to 6)"
        );
        assert_eq!(
            e("eth0", u32::MAX),
            format!(
                "VF {} of eth0 does not exist (eth0 supports 7 VFs: 0 to 6)",
                u32::MAX
            )
        );
        f.set("0000:00:03.0", "sriov_numvfs", "1\n");
        assert_eq!(
            e("eth0", 1),
            "VF 1 of eth0 is not enabled (eth0 has 1 VF; run 'vfrelay vf create --pf eth0 --count 2')"
        );
        assert_eq!(e("eth9", 0), "no such PF 'eth9'");
        assert_eq!(
            e("veth0", 0),
            "'veth0' is not an SR-IOV PF (no sriov_totalvfs)"
        );
        assert!(check_vf_index(s, "eth0", 0).is_ok());
        assert!(check_vf_index(s, "eth0", 1).is_err());
    }

    #[test]
    fn vf_count_changes_go_through_zero() {
        assert_eq!(num_vfs_writes(0, 0), Vec::<u32>::new());
        assert_eq!(num_vfs_writes(3, 3), Vec::<u32>::new());
        assert_eq!(num_vfs_writes(0, 4), vec![4]);
        assert_eq!(num_vfs_writes(4, 0), vec![0]);
        assert_eq!(num_vfs_writes(2, 4), vec![0, 4]);
        assert_eq!(num_vfs_writes(4, 2), vec![0, 2]);
    }

    #[test]
    fn set_num_vfs_writes_sysfs() {
        let f = sample();
        let s = &f.sys;
        let pci = "0000:00:03.0";
        // 3 -> 5 (through 0): the fake file keeps the last write.
        set_num_vfs(s, "eth0", 5).unwrap();
        assert_eq!(f.get(pci, "sriov_numvfs"), "5");
        // Unchanged count: nothing written.
        f.set(pci, "sriov_numvfs", "5\n");
        set_num_vfs(s, "eth0", 5).unwrap();
        assert_eq!(f.get(pci, "sriov_numvfs"), "5\n");
        set_num_vfs(s, "eth0", 0).unwrap();
        assert_eq!(f.get(pci, "sriov_numvfs"), "0");
        assert_eq!(
            set_num_vfs(s, "eth0", 8).unwrap_err().to_string(),
            "eth0 supports at most 7 VFs, not 8"
        );
        assert_eq!(
            set_num_vfs(s, "veth0", 1).unwrap_err().to_string(),
            "'veth0' is not an SR-IOV PF (no sriov_totalvfs)"
        );
    }

    #[test]
    fn merge_keeps_every_vf() {
        let f = sample();
        let pf = f.sys.pf("eth0").unwrap();
        let cfg = VfConfig {
            index: 0,
            mac: Some([2, 0, 0, 0, 0, 1]),
            ..Default::default()
        };
        let extra = VfConfig {
            index: 5,
            ..Default::default()
        };
        let r = merge(pf, vec![extra.clone(), cfg.clone()]);
        assert_eq!(r.vfs.len(), 4);
        assert_eq!(r.vfs[0].config.as_ref(), Some(&cfg));
        assert_eq!(r.vfs[1].config, None);
        assert_eq!(r.vfs[3].index, 5);
        assert_eq!(r.vfs[3].pci, None);
        assert_eq!(r.vfs[3].config.as_ref(), Some(&extra));
    }
}
