//! Tap backend against the real kernel. Needs root (CAP_NET_ADMIN):
//! `cargo test -p vfrelay-backends --test tap -- --ignored`.
//!
//! Every interface is named `vfxb<pid><suffix>` and removed by a guard even
//! when an assertion fails; nothing else on the host is touched.

use std::process::Command;
use std::time::{Duration, Instant};

use vfrelay_backends::{features, tap, Backend, Segs, VNET_HDR_LEN};

mod common;
use common::{if_index, poll_in, PacketSock, ETH_P_ALL};

/// IEEE local experimental ethertypes: nothing else on the link uses them.
const TYPE_TO_HOST: u16 = 0x88b5;
const TYPE_FROM_HOST: u16 = 0x88b6;

fn ifname(suffix: &str) -> String {
    format!("vfxb{}{suffix}", std::process::id())
}

fn exists(name: &str) -> bool {
    if_index(name) != 0
}

fn if_flags(name: &str) -> u32 {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap()
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed: {st}");
}

/// Deletes the interface on drop if it (still) exists.
struct LinkGuard(String);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if exists(&self.0) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn frame(ethertype: u16, seq: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0x00, 0x00, 0x00, 0x00, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0x00, 0x00, 0x00, 0x00, 0x02]);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(seq);
    }
    f
}

/// Read frames of `ethertype` from the tap queue (skipping host noise such
/// as IPv6 router solicitations) until `want` arrived or 2 s passed.
fn rx_type(q: &mut dyn Backend, ethertype: u16, want: usize) -> Vec<Vec<u8>> {
    let fd = q.poll_fd().expect("tap has a poll fd");
    let end = Instant::now() + Duration::from_secs(2);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < end {
        poll_in(fd, 100);
        q.rx_burst(64, &mut |f| {
            if f.len() >= VNET_HDR_LEN + 14
                && u16::from_be_bytes([f[VNET_HDR_LEN + 12], f[VNET_HDR_LEN + 13]]) == ethertype
            {
                got.push(f.to_vec());
            }
            true
        })
        .unwrap();
    }
    got
}

#[test]
#[ignore = "needs root"]
fn frames_both_ways_exact() {
    let name = ifname("a");
    let _guard = LinkGuard(name.clone());
    let mut qs = tap::open(&name, 1).expect("open tap");
    assert_eq!(qs.len(), 1);
    let q = qs[0].as_mut();
    assert!(q.vnet_hdr());
    assert!(q.describe().contains(&name));
    assert!(exists(&name));
    assert_ne!(
        if_flags(&name) & libc::IFF_UP as u32,
        0,
        "created tap is up"
    );
    let ps = PacketSock::bind(&name, ETH_P_ALL);

    // Guest -> host: header + frame split over three segments.
    let f = frame(TYPE_TO_HOST, 1, 200);
    let hdr = [0u8; VNET_HDR_LEN];
    assert!(Segs::of(&[&hdr, &f[..20], &f[20..]], |s| q.tx_frame(s)).unwrap());
    assert_eq!(ps.recv_type(TYPE_TO_HOST), f);
    let s = q.stats();
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 200, 0));

    // A malformed frame is dropped and counted, and the queue keeps going.
    assert!(Segs::of(&[&hdr[..5]], |s| q.tx_frame(s)).unwrap());
    let mut bad_hdr = [0u8; VNET_HDR_LEN];
    bad_hdr[1] = 0x55; // no such gso_type
    assert!(Segs::of(&[&bad_hdr, &f], |s| q.tx_frame(s)).unwrap());
    assert_eq!(q.stats().tx_dropped, 2);
    let f2 = frame(TYPE_TO_HOST, 2, 1514);
    assert!(Segs::of(&[&hdr, &f2], |s| q.tx_frame(s)).unwrap());
    assert_eq!(ps.recv_type(TYPE_TO_HOST), f2);

    // Host -> guest.
    let g = frame(TYPE_FROM_HOST, 3, 300);
    ps.send(&g);
    let got = rx_type(q, TYPE_FROM_HOST, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
    assert_eq!(&got[0][VNET_HDR_LEN..], &g[..]);

    // A refused frame stays and comes first next time, in order.
    let g1 = frame(TYPE_FROM_HOST, 4, 100);
    let g2 = frame(TYPE_FROM_HOST, 5, 100);
    ps.send(&g1);
    ps.send(&g2);
    poll_in(q.poll_fd().unwrap(), 1000);
    std::thread::sleep(Duration::from_millis(50));
    let mut offered = 0;
    assert_eq!(
        q.rx_burst(64, &mut |_| {
            offered += 1;
            false
        })
        .unwrap(),
        0
    );
    assert_eq!(offered, 1);
    let got = rx_type(q, TYPE_FROM_HOST, 2);
    assert_eq!(got.len(), 2);
    assert_eq!(&got[0][VNET_HDR_LEN..], &g1[..]);
    assert_eq!(&got[1][VNET_HDR_LEN..], &g2[..]);
    assert!(q.stats().rx_frames >= 3);

    // Created, non-persistent: gone once the last queue is dropped.
    drop(qs);
    wait_until("created tap to disappear", Duration::from_secs(2), || {
        !exists(&name)
    });
}

#[test]
#[ignore = "needs root"]
fn multiqueue_created_tap_goes_with_last_queue() {
    let name = ifname("m");
    let _guard = LinkGuard(name.clone());
    let mut qs = tap::open(&name, 4).expect("open 4-queue tap");
    assert_eq!(qs.len(), 4);
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_ne!(flags & 0x0100, 0, "IFF_MULTI_QUEUE: {flags:#x}");
    assert_ne!(flags & 0x4000, 0, "IFF_VNET_HDR: {flags:#x}");
    let fds: Vec<_> = qs.iter().map(|q| q.poll_fd().unwrap()).collect();
    let mut uniq = fds.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 4);
    // Opening it again attaches (it exists now) and does not own it.
    let again = tap::open(&name, 1).expect("attach to multi-queue tap with 1 queue");
    drop(again);
    assert!(exists(&name));
    qs.truncate(1);
    assert!(exists(&name), "one queue still open");
    drop(qs);
    wait_until("created tap to disappear", Duration::from_secs(2), || {
        !exists(&name)
    });
}

#[test]
#[ignore = "needs root"]
fn persistent_tap_survives_and_is_left_alone() {
    let name = ifname("p");
    let _guard = LinkGuard(name.clone());
    ip(&[
        "tuntap",
        "add",
        "mode",
        "tap",
        "name",
        &name,
        "multi_queue",
        "vnet_hdr",
    ]);
    for pairs in [2, 1] {
        let mut qs = tap::open(&name, pairs).expect("attach to persistent tap");
        assert_eq!(qs.len(), pairs);
        assert_eq!(
            if_flags(&name) & libc::IFF_UP as u32,
            0,
            "admin state untouched"
        );
        // Offloads apply to the device: check what the kernel reports.
        qs[0]
            .set_offloads(features::GUEST_CSUM | features::GUEST_TSO4 | features::GUEST_TSO6)
            .unwrap();
        if let Ok(out) = Command::new("ethtool").args(["-k", &name]).output() {
            let out = String::from_utf8_lossy(&out.stdout);
            if !out.is_empty() {
                assert!(out.contains("tcp-segmentation-offload: on"), "{out}");
            }
        }
        qs[0].set_offloads(0).unwrap();
        drop(qs);
        assert!(exists(&name), "persistent tap must survive");
    }
    // Kept after drop, and ours to delete (the guard would do it too).
    ip(&["link", "del", &name]);

    // A single-queue persistent tap cannot serve two queue pairs: clear error.
    let name1 = ifname("s");
    let _guard1 = LinkGuard(name1.clone());
    ip(&["tuntap", "add", "mode", "tap", "name", &name1, "vnet_hdr"]);
    let err = match tap::open(&name1, 2) {
        Ok(_) => panic!("2 queues on a single-queue tap must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("multi_queue"), "{err}");
    assert!(exists(&name1));
    let qs = tap::open(&name1, 1).expect("1 queue on single-queue tap");
    drop(qs);
    assert!(exists(&name1));
}
