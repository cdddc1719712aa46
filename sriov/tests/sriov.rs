//! SR-IOV library and `vf` backend on this host, which has no SR-IOV NIC:
//! the exact errors for a missing PF and a netdev that is not a PF, and
//! rtnetlink against a real kernel on a veth. Needs root (CAP_NET_ADMIN):
//! `cargo nextest run -p vfrelay-sriov --test sriov --run-ignored all`.
//! Real VFs are exercised inside a QEMU guest with an emulated igb.
//!
//! Each test makes its own veth pair `vfsr<pid><tag>a`/`...b` in the root
//! namespace; a guard deletes it even when an assertion fails.

use std::process::Command;

use vfrelay_backends::BackendSpec;
use vfrelay_sriov::{self as sriov, LinkState, Rtnl, Sysfs, VfSettings};

/// A veth pair, deleted on drop (also on panic).
struct Veth {
    a: String,
    b: String,
}

impl Veth {
    fn new(tag: &str) -> Veth {
        let base = format!("vfsr{}{tag}", std::process::id());
        let v = Veth {
            a: format!("{base}a"),
            b: format!("{base}b"),
        };
        let _ = Command::new("ip").args(["link", "del", &v.a]).output();
        let out = Command::new("ip")
            .args(["link", "add", &v.a, "type", "veth", "peer", "name", &v.b])
            .output()
            .expect("spawn ip");
        assert!(
            out.status.success(),
            "ip link add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        v
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes the pair.
        let _ = Command::new("ip").args(["link", "del", &self.a]).output();
    }
}

fn open_err(spec: &str) -> String {
    let spec: BackendSpec = spec.parse().unwrap();
    spec.open_with_mac(1, [0x02, 0, 0, 0, 0, 0x42])
        .err()
        .expect("open must fail")
        .to_string()
}

#[test]
#[ignore = "needs root: run with --run-ignored all"]
fn vf_backend_names_what_is_missing() {
    let v = Veth::new("e");
    let missing = format!("vfsr{}zz", std::process::id());
    assert_eq!(
        open_err(&format!("vf,pf={missing},index=0")),
        format!("vf backend: no such PF '{missing}'")
    );
    assert_eq!(
        open_err(&format!("vf,pf={},index=0,vlan=42", v.a)),
        format!(
            "vf backend: '{}' is not an SR-IOV PF (no sriov_totalvfs)",
            v.a
        )
    );
    let sys = Sysfs::default();
    assert_eq!(
        sriov::list(&sys, Some(&v.a)).unwrap_err().to_string(),
        format!("'{}' is not an SR-IOV PF (no sriov_totalvfs)", v.a)
    );
    assert_eq!(
        sriov::set_num_vfs(&sys, &missing, 1)
            .unwrap_err()
            .to_string(),
        format!("no such PF '{missing}'")
    );
    assert!(!sys.pf_names().unwrap().contains(&v.a));
    // The whole listing works on a host without PFs (or with some).
    sriov::list(&sys, None).unwrap();
}

#[test]
#[ignore = "needs root: run with --run-ignored all"]
fn rtnetlink_on_a_veth() {
    let v = Veth::new("n");
    let sys = Sysfs::default();
    let mut nl = Rtnl::open().unwrap();
    // Not a PF: the kernel answers without VF info.
    assert_eq!(nl.vf_configs(&v.a).unwrap(), vec![]);

    let mac = [0x02, 0x5f, 0x52, 0x00, 0x00, 0x07];
    nl.set_mac(&v.a, mac).unwrap();
    assert_eq!(sys.netdev_mac(&v.a).unwrap(), mac);
    assert!(!sys.netdev_is_up(&v.a).unwrap());
    nl.set_up(&v.a).unwrap();
    assert!(sys.netdev_is_up(&v.a).unwrap());

    // A veth has no VFs: the kernel's errno comes back as the error.
    let err = nl
        .set_vf(
            &v.a,
            0,
            &VfSettings {
                mac: Some(mac),
                link_state: Some(LinkState::Enable),
                ..Default::default()
            },
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("setting the MAC address of VF 0 of {}: ", v.a)),
        "{msg}"
    );
    let sriov::Error::Netlink { source, .. } = &err else {
        panic!("not a netlink error: {err:?}")
    };
    assert_eq!(source.raw_os_error(), Some(libc::EOPNOTSUPP), "{msg}");

    // A name the kernel does not know is reported before any request.
    let gone = format!("vfsr{}zz", std::process::id());
    assert_eq!(
        nl.set_up(&gone).unwrap_err().to_string(),
        format!("no such netdev '{gone}'")
    );
    // The socket still works after errors (replies matched by sequence).
    assert_eq!(nl.vf_configs(&v.b).unwrap(), vec![]);
}
