//! AF_XDP backend against real veth pairs. Needs root (CAP_NET_ADMIN,
//! CAP_BPF): `cargo test -p vfrelay-backends --test af_xdp -- --ignored`.
//!
//! Each test makes its own namespace `vfxa<pid><tag>` holding the peer end
//! `vfxa<pid><tag>p` of a veth whose host end `vfxa<pid><tag>h` carries the
//! backend. A guard deletes both even when an assertion fails. Frames use
//! local experimental ethertypes and raw payloads, so the checksum caveat of
//! veth TX offload does not apply.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use vfrelay_backends::{af_xdp, Backend, Segs, XdpMode};

mod common;
use common::{poll_in, PacketSock};

/// Frames the backend transmits (host -> namespace).
const TYPE_FROM_HOST: u16 = 0x88b6;
/// Frames the namespace sends to the backend.
const TYPE_TO_HOST: u16 = 0x88b5;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn quiet(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd).args(args).output();
}

/// A namespace plus a veth pair; removed on drop (also on panic).
struct Net {
    ns: String,
    host: String,
    peer: String,
}

impl Net {
    fn new(tag: &str, queues: u32) -> Net {
        let base = format!("vfxa{}{tag}", std::process::id());
        let net = Net {
            ns: base.clone(),
            host: format!("{base}h"),
            peer: format!("{base}p"),
        };
        let q = queues.to_string();
        run("ip", &["netns", "add", &net.ns]);
        // No IPv6 in the namespace: fewer stray frames (DAD, RS) to skip.
        quiet(
            "ip",
            &[
                "netns",
                "exec",
                &net.ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        );
        run(
            "ip",
            &[
                "link",
                "add",
                &net.host,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
                "type",
                "veth",
                "peer",
                "name",
                &net.peer,
                "netns",
                &net.ns,
                "numtxqueues",
                &q,
                "numrxqueues",
                &q,
            ],
        );
        quiet(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", net.host)],
        );
        run("ip", &["link", "set", &net.host, "up"]);
        run("ip", &["-n", &net.ns, "link", "set", &net.peer, "up"]);
        net
    }

    fn xdp_attached(&self) -> bool {
        let out = Command::new("ip")
            .args(["link", "show", "dev", &self.host])
            .output()
            .expect("ip link show");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    }

    /// The program must go once the backend is dropped. Not necessarily at
    /// that instant: a child that a parallel test forks holds copies of our
    /// (close-on-exec) fds until it execs, delaying the last close a little.
    fn assert_detached(&self, what: &str) {
        let end = Instant::now() + Duration::from_secs(3);
        while self.xdp_attached() {
            assert!(Instant::now() < end, "XDP program still attached: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// AF_PACKET socket on the peer, inside the namespace.
    fn peer_socket(&self, ethertype: u16) -> PacketSock {
        let (ns, peer) = (self.ns.clone(), self.peer.clone());
        // A socket stays in the namespace it was made in: enter it on a
        // throwaway thread, so the test thread never changes namespace.
        std::thread::spawn(move || {
            let f = File::open(format!("/run/netns/{ns}")).expect("netns file");
            // SAFETY: setns on this thread only, with a valid fd.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            PacketSock::bind(&peer, ethertype)
        })
        .join()
        .expect("socket thread")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting the namespace deletes the peer, and with it the host end.
        quiet("ip", &["netns", "del", &self.ns]);
        quiet("ip", &["link", "del", &self.host]);
    }
}

/// A frame whose every byte depends on `seq`, so any mix-up shows.
fn frame(ethertype: u16, seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(7).wrapping_add(seq) as u8;
    }
    f
}

fn len_for(seq: u32) -> usize {
    60 + (seq as usize * 37) % 1455 // 60 ..= 1514
}

fn ethertype(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[12], f[13]])
}

/// Sends one frame split in three segments; retries while the backend is full.
fn tx(b: &mut dyn Backend, f: &[u8]) {
    let (a, rest) = f.split_at(10);
    let (m, z) = rest.split_at(rest.len() / 2);
    let end = Instant::now() + Duration::from_secs(2);
    while !Segs::of(&[a, m, z], |s| b.tx_frame(s)).unwrap() {
        assert!(Instant::now() < end, "backend stayed full");
        b.tx_flush().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Frames of `TYPE_TO_HOST` from any of `qs` until `want` arrived, or none
/// came for `idle`; other traffic is consumed and skipped.
fn rx(qs: &mut [Box<dyn Backend>], want: usize, idle: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut last = Instant::now();
    while got.len() < want && last.elapsed() < idle {
        for q in qs.iter_mut() {
            poll_in(q.poll_fd().expect("af-xdp has a poll fd"), 5);
            loop {
                let n = q
                    .rx_burst(64, &mut |f| {
                        if f.len() >= 14 && ethertype(f) == TYPE_TO_HOST {
                            got.push(f.to_vec());
                        }
                        true
                    })
                    .unwrap();
                if n == 0 {
                    break;
                }
                last = Instant::now();
            }
        }
    }
    got
}

fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes(f[14..18].try_into().unwrap())
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn frames_both_ways_exact_and_program_detached_on_drop() {
    let net = Net::new("a", 1);
    let mut qs = af_xdp::open(&net.host, 0, XdpMode::Copy, 1).expect("open");
    assert_eq!(qs.len(), 1);
    assert!(net.xdp_attached(), "program attached while open");
    let d = qs[0].describe();
    assert!(
        d.contains(&net.host) && d.contains("q0") && d.contains("copy"),
        "{d}"
    );
    assert!(!qs[0].vnet_hdr());

    // Host -> namespace: 300 frames, one flush (copy mode sends 32 per kick).
    let peer_rx = net.peer_socket(TYPE_FROM_HOST);
    let sent: Vec<Vec<u8>> = (0..300)
        .map(|s| frame(TYPE_FROM_HOST, s, len_for(s)))
        .collect();
    for f in &sent {
        tx(qs[0].as_mut(), f);
    }
    // Oversized for a UMEM frame: taken, dropped and counted, never sent.
    let big = frame(TYPE_FROM_HOST, 9999, 5000);
    assert!(Segs::of(&[&big], |s| qs[0].tx_frame(s)).unwrap());
    qs[0].tx_flush().unwrap();
    let got = peer_rx.recv(sent.len() + 1, Duration::from_millis(500));
    assert_eq!(got.len(), sent.len(), "frames received in the namespace");
    for (g, s) in got.iter().zip(&sent) {
        assert_eq!(g, s, "frame {} differs", seq_of(s));
    }
    let st = qs[0].stats();
    assert_eq!(st.tx_frames, 300);
    assert_eq!(
        st.tx_bytes,
        sent.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert_eq!(st.tx_dropped, 1);

    // Namespace -> host: 400 frames, in bursts well below veth's ring.
    let peer_tx = net.peer_socket(TYPE_TO_HOST);
    let sent: Vec<Vec<u8>> = (0..400)
        .map(|s| frame(TYPE_TO_HOST, s, len_for(s)))
        .collect();
    let mut got = Vec::new();
    for chunk in sent.chunks(100) {
        for f in chunk {
            peer_tx.send(f);
        }
        got.extend(rx(&mut qs, chunk.len(), Duration::from_secs(2)));
    }
    got.extend(rx(&mut qs, 1, Duration::from_millis(300))); // nothing extra
    assert_eq!(got.len(), sent.len(), "frames received by rx_burst");
    for (g, s) in got.iter().zip(&sent) {
        assert_eq!(g, s, "frame {} differs", seq_of(s));
    }
    let st = qs[0].stats();
    assert!(st.rx_frames >= 400, "{st:?}");
    assert_eq!(st.rx_dropped, 0, "{st:?}");

    // A sink without room: the refused frame stays and comes first next time.
    for s in 1000..1005 {
        peer_tx.send(&frame(TYPE_TO_HOST, s, 100));
    }
    let fd = qs[0].poll_fd().unwrap();
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(2);
    while seen.len() < 2 && Instant::now() < end {
        poll_in(fd, 10);
        qs[0]
            .rx_burst(64, &mut |f| {
                if ethertype(f) != TYPE_TO_HOST {
                    return true;
                }
                if seen.len() == 2 {
                    return false;
                }
                seen.push(seq_of(f));
                true
            })
            .unwrap();
    }
    assert_eq!(seen, [1000, 1001]);
    std::thread::sleep(Duration::from_millis(100)); // let the rest arrive
    let mut next = Vec::new();
    let n = qs[0]
        .rx_burst(1, &mut |f| {
            next.push(seq_of(f));
            true
        })
        .unwrap();
    assert_eq!((n, next.as_slice()), (1, [1002].as_slice()));
    let rest: Vec<u32> = rx(&mut qs, 2, Duration::from_secs(1))
        .iter()
        .map(|f| seq_of(f))
        .collect();
    assert_eq!(rest, [1003, 1004]);

    drop(qs);
    net.assert_detached("program detached after drop");
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn zerocopy_is_refused_on_veth_and_auto_falls_back_to_copy() {
    let net = Net::new("b", 1);
    let e = af_xdp::open(&net.host, 0, XdpMode::ZeroCopy, 1)
        .err()
        .expect("zero-copy on veth");
    let e = e.to_string();
    assert!(e.starts_with("af-xdp: ") && e.contains("zero-copy"), "{e}");
    assert!(!e.contains('\n'), "one-line error: {e}");
    net.assert_detached("failed open leaves no program behind");

    let mut qs = af_xdp::open(&net.host, 0, XdpMode::Auto, 1).expect("auto");
    let d = qs[0].describe();
    assert!(d.contains("copy") && !d.contains("zero-copy"), "{d}");
    // And it moves frames.
    let peer_rx = net.peer_socket(TYPE_FROM_HOST);
    let f = frame(TYPE_FROM_HOST, 7, 200);
    tx(qs[0].as_mut(), &f);
    qs[0].tx_flush().unwrap();
    assert_eq!(peer_rx.recv(1, Duration::from_secs(2)), [f]);
    drop(qs);
    net.assert_detached("after drop");
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn an_attached_program_is_not_replaced() {
    let net = Net::new("c", 1);
    let mut first = af_xdp::open(&net.host, 0, XdpMode::Copy, 1).expect("first open");
    let e = af_xdp::open(&net.host, 0, XdpMode::Copy, 1)
        .err()
        .expect("second open must fail");
    let e = e.to_string();
    assert!(e.contains("already has an XDP program"), "{e}");

    // The first one is untouched and still works.
    assert!(net.xdp_attached());
    let peer_tx = net.peer_socket(TYPE_TO_HOST);
    let f = frame(TYPE_TO_HOST, 1, 64);
    peer_tx.send(&f);
    assert_eq!(rx(&mut first, 1, Duration::from_secs(2)), [f]);

    drop(first);
    net.assert_detached("after drop");
    // Once released, the interface can be taken again.
    let again = af_xdp::open(&net.host, 0, XdpMode::Copy, 1).expect("reopen");
    drop(again);
    net.assert_detached("after drop");
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn two_queue_pairs_on_a_two_queue_veth() {
    let net = Net::new("d", 2);
    let e = af_xdp::open(&net.host, 1, XdpMode::Copy, 2)
        .err()
        .expect("queue 2 missing");
    assert_eq!(
        e.to_string(),
        format!(
            "af-xdp: {} has 2 queues, queue 2 does not exist \
             (2 queue pairs from queue 1 need queues 1..2)",
            net.host
        )
    );
    net.assert_detached("after drop");

    let mut qs = af_xdp::open(&net.host, 0, XdpMode::Copy, 2).expect("open 2 queue pairs");
    assert_eq!(qs.len(), 2);
    assert!(qs[0].describe().contains("q0") && qs[1].describe().contains("q1"));
    assert_ne!(qs[0].poll_fd(), qs[1].poll_fd());

    // Both queue pairs transmit.
    let peer_rx = net.peer_socket(TYPE_FROM_HOST);
    let mut sent = Vec::new();
    for s in 0..100 {
        let f = frame(TYPE_FROM_HOST, s, len_for(s));
        tx(qs[s as usize % 2].as_mut(), &f);
        sent.push(f);
    }
    qs[0].tx_flush().unwrap();
    qs[1].tx_flush().unwrap();
    let mut got = peer_rx.recv(101, Duration::from_millis(500));
    got.sort_by_key(|f| seq_of(f));
    assert_eq!(got, sent);

    // Whatever queue veth picks, every frame reaches one of the sockets.
    let peer_tx = net.peer_socket(TYPE_TO_HOST);
    let sent: Vec<Vec<u8>> = (0..100)
        .map(|s| frame(TYPE_TO_HOST, s, len_for(s)))
        .collect();
    for f in &sent {
        peer_tx.send(f);
    }
    let mut got = rx(&mut qs, 101, Duration::from_millis(500));
    got.sort_by_key(|f| seq_of(f));
    assert_eq!(got, sent);
    let total: u64 = qs.iter().map(|q| q.stats().tx_frames).sum();
    assert_eq!(total, 100);

    drop(qs);
    net.assert_detached("after drop");
}

/// Argument errors come before anything needs privileges.
#[test]
fn bad_arguments_give_one_line_errors() {
    let e = af_xdp::open("vfxa-nonexist", 0, XdpMode::Auto, 1)
        .err()
        .unwrap();
    assert_eq!(e.to_string(), "af-xdp: no interface named vfxa-nonexist");
    let e = af_xdp::open("lo", 5, XdpMode::Auto, 1).err().unwrap();
    assert_eq!(
        e.to_string(),
        "af-xdp: lo has 1 queues, queue 5 does not exist"
    );
    let e = af_xdp::open("lo", 0, XdpMode::Auto, 0).err().unwrap();
    assert_eq!(e.to_string(), "af-xdp: need at least one queue pair");
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn generic_mode_when_native_refuses_jumbo_peer_mtu() {
    let net = Net::new("e", 1);
    // veth refuses native XDP when the peer MTU is too large for one page.
    run("ip", &["link", "set", &net.host, "mtu", "9000"]);
    run(
        "ip",
        &["-n", &net.ns, "link", "set", &net.peer, "mtu", "9000"],
    );
    let mut qs = af_xdp::open(&net.host, 0, XdpMode::Copy, 1).expect("open");
    let d = qs[0].describe();
    assert!(d.contains("generic XDP"), "{d}");
    assert!(net.xdp_attached());

    let peer_rx = net.peer_socket(TYPE_FROM_HOST);
    let f = frame(TYPE_FROM_HOST, 3, 3000);
    tx(qs[0].as_mut(), &f);
    qs[0].tx_flush().unwrap();
    assert_eq!(peer_rx.recv(1, Duration::from_secs(2)), [f]);

    // A jumbo frame cannot fit a UMEM frame: the kernel drops it and says
    // so; the frames around it arrive.
    let peer_tx = net.peer_socket(TYPE_TO_HOST);
    let sent = [
        frame(TYPE_TO_HOST, 1, 1000),
        frame(TYPE_TO_HOST, 2, 8000),
        frame(TYPE_TO_HOST, 3, 3800),
    ];
    for f in &sent {
        peer_tx.send(f);
    }
    let got = rx(&mut qs, 3, Duration::from_millis(500));
    assert_eq!(got, [sent[0].clone(), sent[2].clone()]);
    assert_eq!(qs[0].stats().rx_dropped, 1, "{:?}", qs[0].stats());

    drop(qs);
    net.assert_detached("after drop");
}

/// The dataplane may call tx_frame many times before tx_flush, and waits
/// for POLLOUT when it gets Ok(false): neither may wedge the queue. (On veth
/// completions are immediate, so a full socket recovers inside tx_frame and
/// the POLLOUT branch is for drivers that complete later.)
#[test]
#[ignore = "needs root: run with --ignored"]
fn tx_without_flush_makes_progress_and_full_means_pollout() {
    let net = Net::new("f", 1);
    let mut qs = af_xdp::open(&net.host, 0, XdpMode::Copy, 1).expect("open");
    let peer_rx = net.peer_socket(TYPE_FROM_HOST);
    let fd = qs[0].poll_fd().unwrap();
    let n = 5000; // more than the socket's TX frames
    let (mut full, mut received) = (0, 0);
    for s in 0..n {
        let f = frame(TYPE_FROM_HOST, s, 60);
        while !Segs::of(&[&f], |s| qs[0].tx_frame(s)).unwrap() {
            full += 1;
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, 2000) };
            assert_eq!(r, 1, "full backend never became writable");
        }
        if s % 1000 == 999 {
            // Keep the namespace's socket buffer drained.
            received += peer_rx.recv(usize::MAX, Duration::from_millis(50)).len();
        }
    }
    qs[0].tx_flush().unwrap();
    received += peer_rx.recv(usize::MAX, Duration::from_millis(300)).len();
    assert_eq!(qs[0].stats().tx_frames, n as u64);
    assert_eq!(received, n as usize, "({full} times full)");
}
