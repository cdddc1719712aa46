//! `vf,pf=NAME,index=N[,vlan=ID]`: AF_XDP on VF N of SR-IOV PF NAME.
//!
//! Opening it finds the VF's netdev, sets the VF's admin MAC (held by the
//! PF driver) to the virtio device's MAC and the port VLAN if one is given
//! (priority 0; without `vlan=` the VF's VLAN is left as it is),
//! makes the VF netdev carry that MAC (a driver rebind if needed: igb only
//! hands an admin MAC to a VF at probe), brings the netdev up and opens the
//! [`af_xdp`](crate::af_xdp) backend on it, queues 0.. .
//!
//! Errors, one line each; these strings are stable (tests match them):
//!
//! - `vf backend: no such PF 'PF'`
//! - `vf backend: 'PF' is not an SR-IOV PF (no sriov_totalvfs)`
//! - `vf backend: VF I of PF is not enabled (PF has N VFs; run 'vfrelay vf create --pf PF --count I+1')`
//!   (`has 1 VF` when N is 1; the count is I+1 written out)
//! - `vf backend: VF I of PF does not exist (PF supports T VFs: 0 to T-1)`
//!   (I at or beyond sriov_totalvfs)
//! - `vf backend: VF I of PF (PCI) is bound to DRIVER, not a network driver; bind it to its VF driver`
//! - `vf backend: VF I of PF (PCI) has no driver bound; bind it to its VF driver`
//! - `vf backend: VF I of PF (NETDEV) has no XDP support: REASON`
//!   (attaching the XDP program failed in native and generic mode)
//! - `vf backend: VF I of PF (NETDEV): af-xdp: ...` (any other AF_XDP
//!   failure, e.g. an XDP program already attached, a queue missing)
//! - `vf backend: VF I of PF (PCI): no netdev appeared within 10 s of binding it to DRIVER`
//!   (after the rebind)
//! - `vf backend: setting the MAC address of VF I of PF: ERRNO TEXT (os error N)[ (KERNEL EXTACK)]`
//!   (`the VLAN` likewise)
//! - `vf backend: setting NETDEV up: ERRNO TEXT (os error N)[ (KERNEL EXTACK)]`
//! - `vf backend: SYSFS PATH: ERRNO TEXT` / `vf backend: SYSFS PATH: unexpected content '...'`
//!
//! A VF netdev whose MAC still differs from the guest's after the rebind
//! and a direct MAC change only gets a warning: the port may still work
//! (promiscuous or trusted VFs), and the log says why it may not.

use std::time::Duration;

use log::{info, warn};

use crate::{af_xdp, Backend, Error, Result, XdpMode};
use vfrelay_sriov::{self as sriov, Rtnl, Sysfs, VfSettings};

/// How long a rebound VF driver gets to bring its netdev back (igbvf in a
/// TCG guest took about 2 s).
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn vf_err(e: sriov::Error) -> Error {
    Error::Other(format!("vf backend: {e}"))
}

/// Opens VF `index` of `pf` as `queue_pairs` AF_XDP queue pairs. With
/// `mac`, the VF is given that MAC first; with `vlan`, that port VLAN.
pub fn open(
    pf: &str,
    index: u32,
    vlan: Option<u16>,
    mac: Option<[u8; 6]>,
    queue_pairs: usize,
) -> Result<Vec<Box<dyn Backend>>> {
    let sys = Sysfs::default();
    let (vf, mut netdev) = sriov::vf_netdev(&sys, pf, index).map_err(vf_err)?;
    let mut nl = Rtnl::open().map_err(vf_err)?;
    let settings = VfSettings {
        mac,
        vlan: vlan.map(|v| (v, 0)),
        ..Default::default()
    };
    if !settings.is_empty() {
        nl.set_vf(pf, index, &settings).map_err(vf_err)?;
    }
    if let Some(mac) = mac {
        let have = sys.netdev_mac(&netdev).map_err(vf_err)?;
        if have != mac {
            // The PF driver passes an admin MAC to the VF driver only when
            // it (re)initialises the VF (igb: "Reload the VF driver").
            info!(
                "vf backend: VF {index} of {pf}: {netdev} has {}, not {}; rebinding {} ({})",
                fmt_mac(&have),
                fmt_mac(&mac),
                vf.driver.as_deref().unwrap_or("?"),
                vf.pci
            );
            netdev = sys.rebind_vf(pf, index, REBIND_TIMEOUT).map_err(vf_err)?;
            let have = sys.netdev_mac(&netdev).map_err(vf_err)?;
            if have != mac {
                if let Err(e) = nl.set_mac(&netdev, mac) {
                    warn!("vf backend: VF {index} of {pf}: {e}");
                }
                let have = sys.netdev_mac(&netdev).map_err(vf_err)?;
                if have != mac {
                    warn!(
                        "vf backend: VF {index} of {pf}: {netdev} still has {}, not the guest's {}; \
                         the NIC may drop frames sent to the guest",
                        fmt_mac(&have),
                        fmt_mac(&mac)
                    );
                }
            }
        }
    }
    nl.set_up(&netdev).map_err(vf_err)?;
    info!(
        "vf backend: VF {index} of {pf} ({}) is {netdev}{}",
        vf.pci,
        vlan.map(|v| format!(", VLAN {v}")).unwrap_or_default()
    );
    af_xdp::open(&netdev, 0, XdpMode::Auto, queue_pairs).map_err(|e| xdp_err(pf, index, &netdev, e))
}

/// Words an af-xdp failure for a VF: a failed program attach means the VF
/// netdev cannot do XDP at all; anything else keeps af-xdp's own message.
fn xdp_err(pf: &str, index: u32, netdev: &str, e: Error) -> Error {
    let msg = e.to_string();
    // af_xdp::XdpProgram::attach words this failure (both modes tried).
    let attach = format!("af-xdp: attaching XDP program to {netdev}: ");
    match msg.strip_prefix(&attach) {
        Some(reason) => Error::Other(format!(
            "vf backend: VF {index} of {pf} ({netdev}) has no XDP support: {reason}"
        )),
        None => Error::Other(format!("vf backend: VF {index} of {pf} ({netdev}): {msg}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_errors_are_worded_for_the_vf() {
        let e = xdp_err(
            "eth0",
            0,
            "eth1",
            Error::Other(
                "af-xdp: attaching XDP program to eth1: Operation not supported (os error 95) \
                 (native mode: Invalid argument (os error 22))"
                    .into(),
            ),
        );
        assert_eq!(
            e.to_string(),
            "vf backend: VF 0 of eth0 (eth1) has no XDP support: Operation not supported \
             (os error 95) (native mode: Invalid argument (os error 22))"
        );
        let e = xdp_err(
            "eth0",
            2,
            "eth3",
            Error::Other("af-xdp: eth3 has 1 queues, queue 1 does not exist".into()),
        );
        assert_eq!(
            e.to_string(),
            "vf backend: VF 2 of eth0 (eth3): af-xdp: eth3 has 1 queues, queue 1 does not exist"
        );
    }

    #[test]
    fn missing_pf_is_named() {
        let e = open("vfxno-such-pf", 0, None, None, 1).err().unwrap();
        assert_eq!(e.to_string(), "vf backend: no such PF 'vfxno-such-pf'");
    }
}
