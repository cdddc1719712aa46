#!/usr/bin/env python3
"""A userspace 802.1Q demultiplexer: the far end of a trunk for tests on a
host without the 8021q module (so no VLAN interfaces).

    vlan_demux.py --wire IF --vlan VID:NETNS:TAP [--vlan ...]

It listens on interface IF (an AF_PACKET socket, in the namespace it was
started in) and, for each --vlan, creates tap TAP inside namespace NETNS
(/run/netns/NETNS; the tap is created after setns(2) into it, so it lives
there). It then bridges:

  wire -> tap: a frame tagged VID is written, untagged, into VID's tap;
  tap -> wire: a frame the tap's namespace sends gets the tag VID inserted
               after the MAC addresses and goes out on IF;
  everything else from the wire (untagged, other VIDs) is dropped.

Reading the tag: the kernel moves a received 802.1Q tag out of the frame
into skb metadata (skb_vlan_untag in __netif_receive_skb_core) before
AF_PACKET sees it, so the frame arrives untagged and the tag comes with it
as PACKET_AUXDATA (struct tpacket_auxdata: tp_status & TP_STATUS_VLAN_VALID,
tp_vlan_tci). A tag still inline (TPID 0x8100 at offset 12) is handled too.
Sending a tagged frame needs nothing special: AF_PACKET sends the bytes.

The taps have no offloads, so what their namespaces send carries complete
checksums (an AF_XDP peer copies frames without checksum metadata).

It counts what it saw; on SIGTERM/SIGINT it prints one JSON object to
stdout and exits 0:
  {"wire_rx": [{"src": MAC, "vid": VID or null, "frames": N}, ...],
   "to_tap": {VID: N}, "from_tap": {VID: N}, "dropped": N}
("vid": null: untagged; "dropped": frames of no VLAN of ours, or that
could not be written). The taps disappear when it exits.
"""
import argparse
import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import sys

ETH_P_ALL = 0x0003
ETH_P_8021Q = 0x8100
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
AUXDATA = struct.Struct("IIIHHHH")  # struct tpacket_auxdata
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_FRAME = 65536


def mac(b):
    return ":".join(f"{x:02x}" for x in b)


def open_tap(netns, name):
    """Creates tap `name` in namespace `netns` (Python 3.11 has no
    os.setns, hence libc). The fd stays valid after we leave; this process
    does not need to return to its own namespace, its socket is bound."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)
    tap = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    return tap


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wire", required=True)
    ap.add_argument("--vlan", action="append", required=True, metavar="VID:NETNS:TAP")
    args = ap.parse_args()

    # The wire first, while still in the namespace we were started in.
    wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    wire.bind((args.wire, ETH_P_ALL))
    wire.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    # Frames for other MACs too (a veth accepts them anyway; a NIC would not).
    ifindex = socket.if_nametoindex(args.wire)
    wire.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                    struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b""))

    tap_of_vid, vid_of_fd = {}, {}
    for spec in args.vlan:
        vid, netns, name = spec.split(":")
        vid = int(vid)
        assert 1 <= vid <= 4094, spec
        tap = open_tap(netns, name)
        tap_of_vid[vid] = tap
        vid_of_fd[tap] = vid

    wire_rx, to_tap, from_tap = {}, {v: 0 for v in tap_of_vid}, {v: 0 for v in tap_of_vid}
    dropped = 0

    # SIGTERM/SIGINT: the handler only notes it; the wakeup fd makes
    # select() return (it would otherwise be restarted after the handler).
    stop = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.append(1))

    cmsg_space = socket.CMSG_SPACE(AUXDATA.size)
    fds = [wire.fileno(), wake_r] + list(vid_of_fd)
    while not stop:
        ready, _, _ = select.select(fds, [], [])
        for fd in ready:
            if fd == wake_r:
                os.read(wake_r, 64)
            elif fd == wire.fileno():
                try:
                    frame, anc, _, addr = wire.recvmsg(MAX_FRAME, cmsg_space)
                except OSError as e:
                    # A link going down is reported once (ENETDOWN);
                    # the socket keeps working when it comes back up.
                    if e.errno != errno.ENETDOWN:
                        raise
                    continue
                if addr[2] == PACKET_OUTGOING or len(frame) < 14:
                    continue  # our own sends, seen on the way out
                vid = None
                for level, kind, data in anc:
                    if level == SOL_PACKET and kind == PACKET_AUXDATA:
                        status, _, _, _, _, tci, tpid = AUXDATA.unpack(data[:AUXDATA.size])
                        if status & TP_STATUS_VLAN_VALID and (
                                not status & TP_STATUS_VLAN_TPID_VALID or tpid == ETH_P_8021Q):
                            vid = tci & 0x0FFF
                if vid is None and struct.unpack_from("!H", frame, 12)[0] == ETH_P_8021Q:
                    vid = struct.unpack_from("!H", frame, 14)[0] & 0x0FFF
                    frame = frame[:12] + frame[16:]
                key = (mac(frame[6:12]), vid)
                wire_rx[key] = wire_rx.get(key, 0) + 1
                try:
                    os.write(tap_of_vid[vid], frame)  # KeyError: not ours
                    to_tap[vid] += 1
                except (KeyError, OSError):  # OSError: EIO while the tap is down
                    dropped += 1
            else:
                vid = vid_of_fd[fd]
                frame = os.read(fd, MAX_FRAME)
                if len(frame) < 14:
                    continue
                tag = struct.pack("!HH", ETH_P_8021Q, vid)
                try:
                    wire.send(frame[:12] + tag + frame[12:])
                    from_tap[vid] += 1
                except OSError:  # e.g. ENETDOWN while the wire is down
                    dropped += 1

    json.dump({
        "wire_rx": [{"src": s, "vid": v, "frames": n} for (s, v), n in sorted(
            wire_rx.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))],
        "to_tap": to_tap,
        "from_tap": from_tap,
        "dropped": dropped,
    }, sys.stdout)
    print()


if __name__ == "__main__":
    main()
