//! Tier 3: a real guest (QEMU, TCG) with a virtio-net NIC served by vfrelay
//! over vhost-user, relayed to a tap or an AF_XDP socket on a veth. Each test
//! pings the guest's peer in a test network namespace both ways (small and
//! 1500-byte packets), kills QEMU, boots a new QEMU against the same vfrelay
//! process and pings again.
//!
//! Needs root, QEMU and the guest from scripts/build-guest.sh (run on demand).
//! Traffic stays inside namespaces and links these tests create.
//!
//!     cargo nextest run --test guest --run-ignored only

mod common;

use common::guest::{ping_both_ways, Guest, GuestConfig};
use common::netns::{wait_for_link, Netns, Veth};
use common::vfrelay::Vfrelay;
use common::{secs, unique_name, wait_until, TempDir};

fn require_root() {
    assert!(
        common::is_root(),
        "guest tests need root (network namespaces, QEMU, taps)"
    );
}

/// Baseline without vfrelay: QEMU's own tap backend. Proves the guest image
/// (kernel, modules, init, console driving) and the harness.
#[test]
#[ignore = "needs root and QEMU"]
fn qemu_tap_baseline() {
    require_root();
    let ns = Netns::new();
    let tap = unique_name("t");
    let (guest_ip, peer_ip) = ("10.77.0.2", "10.77.0.1");
    let mut guest = Guest::boot(&GuestConfig::qemu_tap(&tap).ip(&format!("{guest_ip}/24")));
    assert!(
        wait_for_link(&tap, secs(10)),
        "QEMU did not create tap {tap}"
    );
    ns.adopt(&tap, &format!("{peer_ip}/24"));
    let out = guest.ok("cat /sys/class/net/eth0/address; uname -r");
    assert!(out.contains(common::guest::DEFAULT_MAC), "{out}");
    ping_both_ways(&mut guest, &ns, guest_ip, peer_ip);
}

/// Boots a guest on `sock`, pings, kills QEMU, boots again on the same
/// vfrelay process, pings again. `attach` runs after the first boot (for a
/// host-side device vfrelay may create only once QEMU connects).
fn two_boots(
    vf: &mut Vfrelay,
    sock: &std::path::Path,
    ns: &Netns,
    guest_ip: &str,
    peer_ip: &str,
    mut attach: impl FnMut(&mut Vfrelay),
) {
    let cfg = GuestConfig::vhost_user(sock, 1).ip(&format!("{guest_ip}/24"));
    for round in 1..=2 {
        eprintln!("--- boot {round} ---");
        let mut guest = Guest::boot(&cfg);
        attach(vf);
        ping_both_ways(&mut guest, ns, guest_ip, peer_ip);
        guest.kill();
        assert!(
            vf.is_running(),
            "vfrelay exited after QEMU went away (round {round})\n{}",
            vf.log_text()
        );
        // Back to listening: the socket must be there for the next QEMU.
        vf.wait_for_socket(sock, secs(10));
    }
}

#[test]
#[ignore = "needs root and QEMU"]
fn tap_backend_ping_and_reconnect() {
    require_root();
    let ns = Netns::new();
    let dir = TempDir::new();
    let sock = dir.join("vhost.sock");
    let tap = unique_name("t");
    let (guest_ip, peer_ip) = ("10.77.1.2", "10.77.1.1");
    // vfrelay runs inside the namespace, so the tap it creates is born there.
    let mut vf = Vfrelay::vhost_user(Some(&ns), &sock, &format!("tap,ifname={tap}"), &[]);
    let mut configured = false;
    two_boots(&mut vf, &sock, &ns, guest_ip, peer_ip, |vf| {
        if configured {
            return;
        }
        let found = wait_until(secs(10), || ns.has_link(&tap));
        assert!(
            found,
            "vfrelay did not create tap {tap} in {}\n{}",
            ns.name(),
            vf.log_text()
        );
        ns.configure(&tap, &format!("{peer_ip}/24"));
        configured = true;
    });
    let (st, log) = vf.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "vfrelay exit on SIGTERM: {st:?}\n{log}"
    );
    assert!(
        !ns.has_link(&tap),
        "vfrelay left its tap {tap} behind\n{log}"
    );
}

#[test]
#[ignore = "needs root and QEMU"]
fn af_xdp_backend_ping_and_reconnect() {
    require_root();
    let ns = Netns::new();
    let veth = Veth::new();
    let (guest_ip, peer_ip) = ("10.77.2.2", "10.77.2.1");
    veth.peer_for_af_xdp(&ns, &format!("{peer_ip}/24"));
    let dir = TempDir::new();
    let sock = dir.join("vhost.sock");
    let mut vf = Vfrelay::vhost_user(None, &sock, &format!("af-xdp,ifname={}", veth.host), &[]);
    two_boots(&mut vf, &sock, &ns, guest_ip, peer_ip, |_| {});
    let (st, log) = vf.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "vfrelay exit on SIGTERM: {st:?}\n{log}"
    );
}
