//! Tier 3 under libvirt: the domain in qemu-configs/libvirt-vhostuser.xml,
//! its placeholders filled in, defined and started by a real libvirtd (a
//! private one the test runs, see `common::libvirt`). Its NIC is a port of
//! a `vfrelay daemon` whose socket belongs to libvirt-qemu, the user QEMU
//! runs as under libvirt; the port relays to an AF_XDP socket on a veth
//! whose peer sits in a test network namespace. The guest and the peer ping
//! each other; then vfrelay's port is deleted and added again, QEMU
//! reconnects by itself (`<reconnect>`), and they ping again.
//!
//! Domain type `qemu` (TCG): /dev/kvm refuses guests on the test machines.
//!
//! Needs root, libvirt (scripts/setup-host.sh), QEMU and the guest from
//! scripts/build-guest.sh. Traffic stays inside namespaces and links this
//! test creates.
//!
//!     cargo nextest run --test libvirt --run-ignored only

mod common;

use common::guest::{guest_images, ping_both_ways, Guest};
use common::libvirt::Libvirtd;
use common::netns::{Netns, Veth};
use common::vfrelay::Vfrelay;
use common::{repo_root, run_ok, secs, unique_name, wait_until, TempDir};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The user (and group) libvirt's QEMU runs as: the packaged qemu.conf
/// default, which the test's libvirtd keeps.
const QEMU_USER: &str = "libvirt-qemu";

/// qemu-configs/libvirt-vhostuser.xml with every `@KEY@` replaced; panics
/// if the file has a placeholder the test does not know.
fn domain_xml(fill: &[(&str, &str)]) -> String {
    let path = repo_root().join("qemu-configs/libvirt-vhostuser.xml");
    let mut xml =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (key, value) in fill {
        let placeholder = format!("@{key}@");
        assert!(xml.contains(&placeholder), "{placeholder} not in the file");
        xml = xml.replace(&placeholder, value);
    }
    // Any @WORD@ left (WORD in capitals) is one nobody filled.
    let left: Vec<&str> = xml
        .match_indices('@')
        .filter_map(|(at, _)| {
            let rest = &xml[at + 1..];
            let word = &rest[..rest.find('@')?];
            let caps = word.chars().all(|c| c.is_ascii_uppercase() || c == '_');
            (!word.is_empty() && caps).then_some(word)
        })
        .collect();
    assert!(left.is_empty(), "unfilled placeholders: {left:?}");
    xml
}

/// Uid of `/proc/<pid>` (the real uid, first field of `Uid:`).
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no Uid in /proc/{pid}/status"))
}

/// Adds port vm0 on `sock`, relayed to `ifname`, its socket handed to QEMU_USER.
fn add_port(d: &Vfrelay, sock: &Path, ifname: &str) {
    let owner = format!("{QEMU_USER}:{QEMU_USER}");
    d.ctl_ok(&[
        "port",
        "add",
        "vm0",
        "--vhost-user",
        sock.to_str().unwrap(),
        "--backend",
        &format!("af-xdp,ifname={ifname}"),
        "--socket-owner",
        &owner,
        "--socket-mode",
        "0660",
    ]);
}

#[test]
#[ignore = "needs root, libvirt and QEMU"]
fn libvirt_domain_on_a_vfrelay_port_pings_both_ways() {
    assert!(
        common::is_root(),
        "needs root (libvirtd, namespaces, AF_XDP)"
    );
    let qemu_uid: u32 = run_ok("id", &["-u", QEMU_USER]).trim().parse().unwrap();

    let ns = Netns::new();
    let veth = Veth::new();
    let (guest_ip, peer_ip) = ("10.77.40.2", "10.77.40.1");
    veth.peer_for_af_xdp(&ns, &format!("{peer_ip}/24"));

    // QEMU (libvirt-qemu) must reach the vhost-user socket and read the
    // kernel: a directory others may search, and copies of the guest images
    // (libvirt hands them to libvirt-qemu while the domain runs).
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (kernel, initrd) = guest_images();
    let (kcopy, icopy) = (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"));
    std::fs::copy(&kernel, &kcopy).unwrap();
    std::fs::copy(&initrd, &icopy).unwrap();
    let sock = dir.join("vm0.sock");
    let console = dir.join("console.sock");

    let mut d = Vfrelay::daemon(&dir.join("control.sock"), &["--workers", "0"]);
    add_port(&d, &sock, &veth.host);
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (qemu_uid, 0o660), "vm0.sock");

    let name = unique_name("l");
    let append = format!("vfx.ip={guest_ip}/24");
    let xml = domain_xml(&[
        ("NAME", &name),
        ("TYPE", "qemu"),
        ("KERNEL", kcopy.to_str().unwrap()),
        ("INITRD", icopy.to_str().unwrap()),
        ("APPEND", &append),
        ("CONSOLE", console.to_str().unwrap()),
        ("SOCKET", sock.to_str().unwrap()),
    ]);
    let xml_path = dir.join("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();

    let lv = Libvirtd::start();
    lv.virsh_ok(&["define", xml_path.to_str().unwrap()]);
    // Paused until the console is connected: QEMU drops what the serial
    // port prints while nobody listens on the socket.
    lv.virsh_ok(&["start", "--paused", &name]);
    let pid = lv
        .qemu_pid(&name)
        .unwrap_or_else(|| panic!("no pid file for {name}\n{}", lv.qemu_log(&name)));
    assert_eq!(uid_of(pid), qemu_uid, "QEMU {pid} runs as {QEMU_USER}");
    let con = UnixStream::connect(&console)
        .unwrap_or_else(|e| panic!("connect {}: {e}\n{}", console.display(), lv.qemu_log(&name)));
    lv.virsh_ok(&["resume", &name]);
    let mut guest = Guest::attach(&name, con, secs(180));

    let connected = |d: &Vfrelay| {
        d.ctl_list(&["port", "list", "--json"], "ports")
            .first()
            .is_some_and(|p| p["connected"] == true)
    };
    assert!(connected(&d), "vm0 not connected\n{}", lv.qemu_log(&name));
    ping_both_ways(&mut guest, &ns, guest_ip, peer_ip);

    eprintln!("--- port vm0 deleted and added again ---");
    d.ctl_ok(&["port", "del", "vm0"]);
    add_port(&d, &sock, &veth.host);
    assert!(
        wait_until(secs(30), || connected(&d)),
        "QEMU did not reconnect to vm0\n{}\n{}",
        lv.qemu_log(&name),
        d.log_text()
    );
    ping_both_ways(&mut guest, &ns, guest_ip, peer_ip);

    drop(guest);
    lv.stop();
    assert!(
        d.is_running(),
        "daemon exited after its guest went away\n{}",
        d.log_text()
    );
    let (st, log) = d.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "vfrelay exit on SIGTERM: {st:?}\n{log}"
    );
}
