//! The sysfs side of SR-IOV: which netdevs are PFs, how many VFs they have,
//! and where each VF sits (PCI address, bound driver, netdev).
//!
//! Everything goes through [`Sysfs`], whose root is `/sys` in real use and a
//! temporary directory in tests.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A sysfs tree: `/sys` unless a test points it elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    pub root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
        }
    }
}

/// One PF as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfSysfs {
    pub name: String,
    /// PCI address of the PF (basename of `device`), if sysfs links one.
    pub pci: Option<String>,
    pub total_vfs: u32,
    pub num_vfs: u32,
    /// The VFs that have a `virtfnN` link, by index.
    pub vfs: Vec<VfSysfs>,
}

/// One VF as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfSysfs {
    pub index: u32,
    /// PCI address (basename of the `virtfnN` link target).
    pub pci: String,
    /// Bound driver, if any.
    pub driver: Option<String>,
    /// Netdev, if the bound driver made one.
    pub netdev: Option<String>,
}

/// A name that can be used as one path component under `class/net`:
/// anything else cannot be an interface and must not walk the tree.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.contains(['/', '\0'])
        && name != "."
        && name != ".."
}

fn sysfs_err(path: &Path, source: io::Error) -> Error {
    Error::Sysfs {
        path: path.to_path_buf(),
        source,
    }
}

/// A small sysfs attribute, trimmed.
fn read_attr(path: &Path) -> Result<String> {
    let s = fs::read_to_string(path).map_err(|e| sysfs_err(path, e))?;
    Ok(s.trim().to_string())
}

fn read_u32(path: &Path) -> Result<u32> {
    let s = read_attr(path)?;
    s.parse().map_err(|_| Error::Parse {
        path: path.to_path_buf(),
        content: s.chars().take(40).collect(),
    })
}

/// Basename of a symlink's target, e.g. `../0000:01:10.0` -> `0000:01:10.0`.
/// None when `path` does not exist or is not a symlink.
fn link_basename(path: &Path) -> Result<Option<String>> {
    match fs::read_link(path) {
        Ok(t) => match t.file_name().and_then(|n| n.to_str()) {
            Some(n) => Ok(Some(n.to_string())),
            None => Err(Error::Parse {
                path: path.to_path_buf(),
                content: t.to_string_lossy().chars().take(80).collect(),
            }),
        },
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::InvalidInput
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(sysfs_err(path, e)),
    }
}

/// Parses `virtfn12` -> 12.
fn virtfn_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("virtfn")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Parses a MAC as sysfs prints it (`aa:bb:cc:dd:ee:ff`).
pub(crate) fn parse_sysfs_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for m in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    fn net(&self, name: &str) -> PathBuf {
        self.root.join("class/net").join(name)
    }

    /// True if a netdev `name` exists in this network namespace.
    pub fn netdev_exists(&self, name: &str) -> bool {
        plain_name(name) && self.net(name).exists()
    }

    /// `device/` of netdev `name` if it is an SR-IOV PF.
    fn pf_device(&self, name: &str) -> Result<PathBuf> {
        if !self.netdev_exists(name) {
            return Err(Error::NoSuchPf(name.to_string()));
        }
        let dev = self.net(name).join("device");
        if !dev.join("sriov_totalvfs").exists() {
            return Err(Error::NotSriov(name.to_string()));
        }
        Ok(dev)
    }

    /// Names of every netdev that is an SR-IOV PF, sorted.
    pub fn pf_names(&self) -> Result<Vec<String>> {
        let dir = self.root.join("class/net");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            // A tree without network class (a bare container) has no PF.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(sysfs_err(&dir, e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| plain_name(n) && self.net(n).join("device/sriov_totalvfs").exists())
            .collect();
        names.sort();
        Ok(names)
    }

    /// `sriov_totalvfs` and `sriov_numvfs` of PF `name`.
    pub fn vf_counts(&self, name: &str) -> Result<(u32, u32)> {
        let dev = self.pf_device(name)?;
        Ok((
            read_u32(&dev.join("sriov_totalvfs"))?,
            read_u32(&dev.join("sriov_numvfs"))?,
        ))
    }

    /// PF `name` with its counts and every VF that sysfs links.
    pub fn pf(&self, name: &str) -> Result<PfSysfs> {
        let dev = self.pf_device(name)?;
        let (total_vfs, num_vfs) = self.vf_counts(name)?;
        let mut indices: Vec<u32> = match fs::read_dir(&dev) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(virtfn_index))
                .collect(),
            Err(e) => return Err(sysfs_err(&dev, e)),
        };
        indices.sort_unstable();
        let vfs = indices
            .into_iter()
            .map(|i| self.vf(name, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(PfSysfs {
            name: name.to_string(),
            pci: link_basename(&dev)?,
            total_vfs,
            num_vfs,
            vfs,
        })
    }

    /// VF `index` of PF `pf`: checks that it is enabled, then reads where
    /// it sits.
    pub fn vf(&self, pf: &str, index: u32) -> Result<VfSysfs> {
        let dev = self.pf_device(pf)?;
        let link = dev.join(format!("virtfn{index}"));
        let pci = match link_basename(&link)? {
            Some(p) => p,
            None => {
                let enabled = read_u32(&dev.join("sriov_numvfs"))?;
                return Err(if index >= enabled {
                    Error::NotEnabled {
                        pf: pf.to_string(),
                        index,
                        enabled,
                    }
                } else {
                    // Enabled but not (yet) linked: VFs being created.
                    sysfs_err(&link, io::ErrorKind::NotFound.into())
                });
            }
        };
        Ok(VfSysfs {
            index,
            driver: link_basename(&link.join("driver"))?,
            netdev: first_entry(&link.join("net"))?,
            pci,
        })
    }

    /// The MAC address of netdev `name` (its `address` attribute).
    pub fn netdev_mac(&self, name: &str) -> Result<[u8; 6]> {
        if !self.netdev_exists(name) {
            return Err(Error::NoSuchNetdev(name.to_string()));
        }
        let path = self.net(name).join("address");
        let s = read_attr(&path)?;
        parse_sysfs_mac(&s).ok_or_else(|| Error::Parse {
            path,
            content: s.chars().take(40).collect(),
        })
    }

    /// True if netdev `name` is administratively up (IFF_UP in `flags`).
    pub fn netdev_is_up(&self, name: &str) -> Result<bool> {
        if !self.netdev_exists(name) {
            return Err(Error::NoSuchNetdev(name.to_string()));
        }
        let path = self.net(name).join("flags");
        let s = read_attr(&path)?;
        let flags = s
            .strip_prefix("0x")
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| Error::Parse {
                path,
                content: s.chars().take(40).collect(),
            })?;
        Ok(flags & libc::IFF_UP as u32 != 0)
    }

    /// Writes `n` to the PF's `sriov_numvfs`.
    pub(crate) fn write_num_vfs(&self, pf: &str, n: u32) -> Result<()> {
        let path = self.pf_device(pf)?.join("sriov_numvfs");
        fs::write(&path, n.to_string()).map_err(|e| sysfs_err(&path, e))
    }

    /// Unbinds VF `index` of `pf` from its driver and binds it again, then
    /// waits up to `timeout` for its netdev; returns the netdev's name (it
    /// may differ from the one before).
    pub fn rebind_vf(&self, pf: &str, index: u32, timeout: Duration) -> Result<String> {
        let vf = self.vf(pf, index)?;
        let Some(driver) = vf.driver.clone() else {
            return Err(Error::NoDriver {
                pf: pf.to_string(),
                index,
                pci: vf.pci,
            });
        };
        let drv = self.root.join("bus/pci/drivers").join(&driver);
        for op in ["unbind", "bind"] {
            let path = drv.join(op);
            fs::write(&path, &vf.pci).map_err(|e| sysfs_err(&path, e))?;
        }
        let net = self
            .net(pf)
            .join("device")
            .join(format!("virtfn{index}/net"));
        let end = Instant::now() + timeout;
        loop {
            if let Some(n) = first_entry(&net)? {
                return Ok(n);
            }
            if Instant::now() >= end {
                return Err(Error::RebindTimeout {
                    pf: pf.to_string(),
                    index,
                    pci: vf.pci,
                    driver,
                    secs: timeout.as_secs_f32(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The alphabetically first entry of `dir`, None if it is absent or empty.
fn first_entry(dir: &Path) -> Result<Option<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(sysfs_err(dir, e)),
    };
    Ok(entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .min())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake sysfs tree in a temporary directory, removed on drop.
    pub(crate) struct FakeSysfs {
        pub sys: Sysfs,
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.sys.root);
        }
    }

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    impl FakeSysfs {
        pub(crate) fn new() -> FakeSysfs {
            static N: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "vfrelay-sysfs-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("class/net")).unwrap();
            FakeSysfs {
                sys: Sysfs::new(root),
            }
        }

        fn pci_dir(&self, pci: &str) -> PathBuf {
            self.sys.root.join("devices/pci0000:00").join(pci)
        }

        /// A netdev with a PCI device (an SR-IOV PF when `total` is Some).
        pub(crate) fn netdev(&self, name: &str, pci: &str, total: Option<u32>) {
            let dev = self.pci_dir(pci);
            fs::create_dir_all(&dev).unwrap();
            let net = self.sys.root.join("class/net").join(name);
            fs::create_dir_all(&net).unwrap();
            write(&net.join("address"), "52:54:00:12:34:56\n");
            write(&net.join("flags"), "0x1003\n");
            symlink(
                format!("../../../devices/pci0000:00/{pci}"),
                net.join("device"),
            )
            .unwrap();
            if let Some(t) = total {
                write(&dev.join("sriov_totalvfs"), &format!("{t}\n"));
                write(&dev.join("sriov_numvfs"), "0\n");
            }
        }

        /// VF `index` of the PF at `pf_pci`, optionally bound and with a netdev.
        pub(crate) fn vf(
            &self,
            pf_pci: &str,
            index: u32,
            pci: &str,
            driver: Option<&str>,
            netdev: Option<&str>,
        ) {
            let dev = self.pci_dir(pci);
            fs::create_dir_all(&dev).unwrap();
            symlink(
                format!("../{pci}"),
                self.pci_dir(pf_pci).join(format!("virtfn{index}")),
            )
            .unwrap();
            if let Some(d) = driver {
                let drv = self.sys.root.join("bus/pci/drivers").join(d);
                fs::create_dir_all(&drv).unwrap();
                symlink(&drv, dev.join("driver")).unwrap();
            }
            if let Some(n) = netdev {
                fs::create_dir_all(dev.join("net").join(n)).unwrap();
                self.netdev_only(n, "02:00:00:00:00:01");
            }
        }

        pub(crate) fn netdev_only(&self, name: &str, mac: &str) {
            let net = self.sys.root.join("class/net").join(name);
            write(&net.join("address"), &format!("{mac}\n"));
            write(&net.join("flags"), "0x1002\n");
        }

        pub(crate) fn set(&self, pci: &str, attr: &str, value: &str) {
            write(&self.pci_dir(pci).join(attr), value);
        }

        pub(crate) fn get(&self, pci: &str, attr: &str) -> String {
            fs::read_to_string(self.pci_dir(pci).join(attr)).unwrap()
        }
    }

    /// eth0 (PF, 7 VFs possible, 3 enabled): VF0 on igbvf as eth1, VF1 on
    /// vfio-pci, VF2 with no driver; lo-like veth0 without SR-IOV.
    pub(crate) fn sample() -> FakeSysfs {
        let f = FakeSysfs::new();
        f.netdev("eth0", "0000:00:03.0", Some(7));
        f.set("0000:00:03.0", "sriov_numvfs", "3\n");
        f.vf(
            "0000:00:03.0",
            0,
            "0000:01:10.0",
            Some("igbvf"),
            Some("eth1"),
        );
        f.vf("0000:00:03.0", 1, "0000:01:10.2", Some("vfio-pci"), None);
        f.vf("0000:00:03.0", 2, "0000:01:10.4", None, None);
        f.netdev("veth0", "0000:00:04.0", None);
        f
    }

    #[test]
    fn enumerates_pfs_and_vfs() {
        let f = sample();
        let s = &f.sys;
        assert_eq!(s.pf_names().unwrap(), vec!["eth0".to_string()]);
        let pf = s.pf("eth0").unwrap();
        assert_eq!(pf.pci.as_deref(), Some("0000:00:03.0"));
        assert_eq!((pf.total_vfs, pf.num_vfs), (7, 3));
        assert_eq!(
            pf.vfs,
            vec![
                VfSysfs {
                    index: 0,
                    pci: "0000:01:10.0".into(),
                    driver: Some("igbvf".into()),
                    netdev: Some("eth1".into()),
                },
                VfSysfs {
                    index: 1,
                    pci: "0000:01:10.2".into(),
                    driver: Some("vfio-pci".into()),
                    netdev: None,
                },
                VfSysfs {
                    index: 2,
                    pci: "0000:01:10.4".into(),
                    driver: None,
                    netdev: None,
                },
            ]
        );
        assert_eq!(s.netdev_mac("eth1").unwrap(), [2, 0, 0, 0, 0, 1]);
        assert!(s.netdev_is_up("eth0").unwrap());
        assert!(!s.netdev_is_up("eth1").unwrap());
    }

    #[test]
    fn errors_name_what_is_missing() {
        let f = sample();
        let s = &f.sys;
        let e = |r: Result<PfSysfs>| r.unwrap_err().to_string();
        assert_eq!(e(s.pf("eth9")), "no such PF 'eth9'");
        assert_eq!(
            e(s.pf("veth0")),
            "'veth0' is not an SR-IOV PF (no sriov_totalvfs)"
        );
        for bad in ["", ".", "..", "../x", "a/b", "waytoolonginterfacename"] {
            assert_eq!(e(s.pf(bad)), format!("no such PF '{bad}'"));
        }
        assert_eq!(
            s.vf("eth0", 3).unwrap_err().to_string(),
            "VF 3 of eth0 is not enabled (eth0 has 3 VFs; \
             run 'vfrelay vf create --pf eth0 --count 4')"
        );
        f.set("0000:00:03.0", "sriov_numvfs", "garbage\n");
        let msg = s.vf_counts("eth0").unwrap_err().to_string();
        assert!(
            msg.ends_with("sriov_numvfs: unexpected content 'garbage'"),
            "{msg}"
        );
        assert!(s.netdev_mac("nope").is_err());
        f.netdev_only("bad", "zz:00");
        assert!(s.netdev_mac("bad").is_err());
    }

    #[test]
    fn empty_tree_has_no_pf() {
        let s = Sysfs::new(std::env::temp_dir().join("vfrelay-no-such-sysfs"));
        assert!(s.pf_names().unwrap().is_empty());
    }

    #[test]
    fn parses_names_and_macs() {
        assert_eq!(virtfn_index("virtfn0"), Some(0));
        assert_eq!(virtfn_index("virtfn63"), Some(63));
        for bad in [
            "virtfn",
            "virtfn-1",
            "virtfn+1",
            "virtfnx",
            "physfn",
            "virtfn99999999999",
        ] {
            assert_eq!(virtfn_index(bad), None, "{bad}");
        }
        assert_eq!(
            parse_sysfs_mac("52:54:00:6d:90:02"),
            Some([0x52, 0x54, 0, 0x6d, 0x90, 2])
        );
        for bad in [
            "",
            "52:54:00:6d:90",
            "52:54:00:6d:90:02:03",
            "5:54:00:6d:90:02",
            "zz:54:00:6d:90:02",
        ] {
            assert_eq!(parse_sysfs_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn rebind_writes_unbind_then_bind() {
        let f = sample();
        let name = f
            .sys
            .rebind_vf("eth0", 0, Duration::from_millis(100))
            .unwrap();
        assert_eq!(name, "eth1");
        let drv = f.sys.root.join("bus/pci/drivers/igbvf");
        assert_eq!(
            fs::read_to_string(drv.join("unbind")).unwrap(),
            "0000:01:10.0"
        );
        assert_eq!(
            fs::read_to_string(drv.join("bind")).unwrap(),
            "0000:01:10.0"
        );
        assert_eq!(
            f.sys
                .rebind_vf("eth0", 2, Duration::from_millis(10))
                .unwrap_err()
                .to_string(),
            "VF 2 of eth0 (0000:01:10.4) has no driver bound; bind it to its VF driver"
        );
        let e = f
            .sys
            .rebind_vf("eth0", 1, Duration::from_millis(10))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "VF 1 of eth0 (0000:01:10.2): no netdev appeared within 0.01 s of binding it to vfio-pci"
        );
    }
}
