#!/usr/bin/env python3
"""Host-side sender for the migration tests: UDP datagrams whose payloads
udpcheck (tests/guest-tools/udpcheck.c) validates in the guest.

Payload (little endian): u32 magic "VFXU" | u32 len | u64 seq |
body[len - 20] = pattern[(seq * 131 + i) & 0xffff] | u32 CRC-32 over the rest.
len = 64 .. 1400, a function of seq.

Paced at --rate datagrams/s (sent in small bursts every 5 ms) for at most
--duration seconds or --count datagrams; SIGTERM/SIGINT stop it. On exit it
prints one line: "udpsend: sent N next_seq S elapsed T".

Modes:
  udpsend.py --dst IP [--port P] ...       a UDP socket (kernel routing)
  udpsend.py --raw-iface IF --dst IP --dst-mac MAC [--src IP] [--src-mac MAC]
                                           hand-built Ethernet/IPv4/UDP frames
                                           on one interface (AF_PACKET), to
                                           aim at one bridge port only
"""
import argparse
import signal
import socket
import struct
import sys
import time
import zlib

MAGIC = 0x55584656
MIN_LEN, MAX_LEN = 64, 1400
PATTERN_SIZE = 65536


def pattern():
    """xorshift32 from a fixed seed, the same bytes as udpcheck.c."""
    out = bytearray(PATTERN_SIZE)
    x = 0x9E3779B9
    for i in range(PATTERN_SIZE):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x >> 24
    # Doubled, so any body is one slice without wrapping.
    return bytes(out + out)


def expect_len(seq):
    h = (seq * 2654435761) & 0xFFFFFFFF
    return MIN_LEN + (h >> 8) % (MAX_LEN - MIN_LEN + 1)


def payload(pat, seq):
    n = expect_len(seq)
    off = (seq * 131) & (PATTERN_SIZE - 1)
    head = struct.pack("<IIQ", MAGIC, n, seq) + pat[off : off + n - 20]
    return head + struct.pack("<I", zlib.crc32(head))


def csum16(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac_bytes(mac):
    return bytes(int(b, 16) for b in mac.split(":"))


def frame(args, src_mac, data, ident):
    src, dst = socket.inet_aton(args.src), socket.inet_aton(args.dst)
    udp_len = 8 + len(data)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", args.sport, args.port, udp_len, 0) + data
    c = csum16(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, ident & 0xFFFF, 0x4000,
                     64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", csum16(ip)) + ip[12:]
    return mac_bytes(args.dst_mac) + src_mac + b"\x08\x00" + ip + udp


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dst", required=True)
    ap.add_argument("--port", type=int, default=5555)
    ap.add_argument("--sport", type=int, default=5556)
    ap.add_argument("--rate", type=float, default=1000.0, help="datagrams per second")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds, at most")
    ap.add_argument("--count", type=int, default=0, help="datagrams, at most (0: no limit)")
    ap.add_argument("--start-seq", type=int, default=0)
    ap.add_argument("--raw-iface")
    ap.add_argument("--dst-mac")
    ap.add_argument("--src", default="0.0.0.0")
    ap.add_argument("--src-mac")
    args = ap.parse_args()

    stop = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.append(1))

    pat = pattern()
    if args.raw_iface:
        if not args.dst_mac:
            ap.error("--raw-iface needs --dst-mac")
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sock.bind((args.raw_iface, 0))
        src_mac = mac_bytes(args.src_mac) if args.src_mac else sock.getsockname()[4][:6]

        def send(seq, data):
            sock.send(frame(args, src_mac, data, seq))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((args.src, args.sport))
        dst = (args.dst, args.port)

        def send(seq, data):
            sock.sendto(data, dst)

    seq, sent, errors = args.start_seq, 0, 0
    start = time.monotonic()
    tick = 0.005
    while not stop:
        now = time.monotonic()
        elapsed = now - start
        if elapsed >= args.duration or (args.count and sent >= args.count):
            break
        # Catch up to the schedule, but never burst more than 50 ms worth
        # after a stall (the receiver must not be flooded).
        due = int(elapsed * args.rate) - sent
        due = min(due, max(1, int(args.rate * 0.05)))
        if args.count:
            due = min(due, args.count - sent)
        for _ in range(max(due, 0)):
            try:
                send(seq, payload(pat, seq))
            except OSError:
                # ARP not resolved yet, or a full queue: the datagram is lost
                # and counts as a gap at the receiver, like a wire drop.
                errors += 1
            seq += 1
            sent += 1
        time.sleep(tick)
    print("udpsend: sent %d next_seq %d errors %d elapsed %.1f"
          % (sent, seq, errors, time.monotonic() - start), flush=True)


if __name__ == "__main__":
    sys.exit(main())
