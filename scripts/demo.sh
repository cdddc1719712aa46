#!/bin/bash
# vfrelay demo: a QEMU guest whose virtio-net NIC is served by vfrelay over
# vhost-user, relayed to the host through AF_XDP on a veth (or a tap), and
# ping both ways between the guest and a network namespace.
#
#   sudo scripts/demo.sh [af-xdp|tap]      (default af-xdp)
#
# Run as root on Debian bookworm after scripts/setup-host.sh. Builds vfrelay
# (release) and the guest (scripts/build-guest.sh), then:
#
#   guest eth0 10.99.0.2 --virtio/vhost-user--> vfrelay --AF_XDP--> veth
#        veth peer 10.99.0.1 in netns "vfxdemo<pid>"
#
# (tap mode: vfrelay runs inside the namespace and its tap gets 10.99.0.1.)
# Everything it creates is removed on exit, also on failure or Ctrl-C.
set -euo pipefail

MODE=${1:-af-xdp}
case "$MODE" in af-xdp | tap) ;; *) echo "usage: $0 [af-xdp|tap]" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "demo: run as root (namespaces, AF_XDP, taps)" >&2; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST_IP=10.99.0.2
PEER_IP=10.99.0.1
NS=vfxdemo$$
HOST_END=vfxd$$h        # veth end vfrelay attaches AF_XDP to (host namespace)
PEER_END=vfxd$$p        # veth end in $NS
TAP=vfxd$$t             # tap mode: created by vfrelay inside $NS
WORK=$(mktemp -d /tmp/vfxdemo.XXXXXX)
SOCK=$WORK/vhost.sock
VF_PID=
GUEST_PID=

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
    local rc=$?
    set +e
    if [ -n "$GUEST_PID" ]; then kill "$GUEST_PID" 2>/dev/null; wait "$GUEST_PID" 2>/dev/null; fi
    if [ -n "$VF_PID" ]; then
        kill -TERM "$VF_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$VF_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$VF_PID" 2>/dev/null
        wait "$VF_PID" 2>/dev/null
    fi
    if [ $rc -ne 0 ]; then
        echo "demo: failed (exit $rc); last vfrelay log lines:" >&2
        tail -n 30 "$WORK/vfrelay.log" >&2 2>/dev/null
        echo "demo: qemu stderr:" >&2
        cat "$WORK/qemu.err" >&2 2>/dev/null
    fi
    ip link del "$HOST_END" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
    echo "demo: cleaned up"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ping_cmd() { if command -v ping >/dev/null; then echo ping; else echo "busybox ping"; fi; }

say "build vfrelay (release) and the guest"
(cd "$ROOT" && cargo build --release --quiet)
VFRELAY=$ROOT/target/release/vfrelay
"$ROOT/scripts/build-guest.sh"

say "network namespace $NS with the peer $PEER_IP"
ip netns add "$NS"
ip -n "$NS" link set lo up
if [ "$MODE" = af-xdp ]; then
    ip link add "$HOST_END" type veth peer name "$PEER_END"
    ip link set "$PEER_END" netns "$NS"
    ip -n "$NS" addr add "$PEER_IP/24" dev "$PEER_END"
    ip -n "$NS" link set "$PEER_END" up
    ip link set "$HOST_END" up
    # AF_XDP copies carry no CHECKSUM_PARTIAL: the peer sends full checksums.
    ip netns exec "$NS" ethtool -K "$PEER_END" tx off >/dev/null
    BACKEND="af-xdp,ifname=$HOST_END"
    RUN_IN=()
else
    BACKEND="tap,ifname=$TAP"
    RUN_IN=(ip netns exec "$NS")   # the tap is created inside the namespace
fi

say "start vfrelay vhost-user --backend $BACKEND"
RUST_LOG=${RUST_LOG:-info} "${RUN_IN[@]}" "$VFRELAY" vhost-user --socket "$SOCK" \
    --backend "$BACKEND" > "$WORK/vfrelay.log" 2>&1 &
VF_PID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; kill -0 "$VF_PID" || exit 1; sleep 0.1; done
[ -S "$SOCK" ] || { echo "demo: vfrelay did not create $SOCK" >&2; exit 1; }
echo "vfrelay pid $VF_PID listening on $SOCK"

say "boot the guest (QEMU, TCG: ~10-20 s)"
coproc QEMU {
    exec qemu-system-x86_64 -machine q35 -accel tcg -cpu max -m 512 -smp 1 \
        -nographic -nodefaults -no-reboot \
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
        -kernel "$ROOT/target/guest/vmlinuz" -initrd "$ROOT/target/guest/initramfs.cpio.gz" \
        -append "console=ttyS0 quiet loglevel=1 panic=-1 vfx.ip=$GUEST_IP/24" \
        -serial stdio \
        -chardev socket,id=chr0,path="$SOCK" \
        -netdev vhost-user,id=net0,chardev=chr0,queues=1 \
        -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,romfile= \
        2> "$WORK/qemu.err"
}
GUEST_PID=$QEMU_PID
exec {G_IN}>&"${QEMU[1]}" {G_OUT}<&"${QEMU[0]}"

# Reads the console until a line starting with $1; prints lines before it.
# Sets LINE to the matching line.
until_line() {
    local deadline=$((SECONDS + $2))
    while [ $SECONDS -lt $deadline ]; do
        IFS= read -r -t 5 LINE <&"$G_OUT" || { kill -0 "$GUEST_PID" 2>/dev/null || return 1; continue; }
        LINE=${LINE%$'\r'}
        [[ $LINE == "$1"* ]] && return 0
        [ -n "$3" ] && printf '  guest| %s\n' "$LINE"
    done
    return 1
}
until_line VFX-GUEST-READY 180 "" || { echo "demo: guest did not boot" >&2; exit 1; }

SEQ=0
# Runs a shell command in the guest, shows its output, returns its status.
guest() {
    SEQ=$((SEQ + 1))
    echo "guest# $1"
    printf '%s\necho "@@VFX""%d $?"\n' "$1" "$SEQ" >&"$G_IN"
    until_line "@@VFX$SEQ " 60 show || { echo "demo: guest command timed out" >&2; return 1; }
    return "${LINE##* }"
}

say "guest is up"
guest "uname -r; ip -4 addr show dev eth0"

say "ping: guest -> $PEER_IP"
if [ "$MODE" = tap ]; then
    for _ in $(seq 100); do ip -n "$NS" link show "$TAP" >/dev/null 2>&1 && break; sleep 0.1; done
    ip -n "$NS" addr add "$PEER_IP/24" dev "$TAP"
    ip -n "$NS" link set "$TAP" up
fi
for _ in $(seq 10); do guest "ping -c 1 -W 2 $PEER_IP >/dev/null" && break; sleep 1; done
guest "ping -c 4 $PEER_IP"
guest "ping -c 2 -s 1472 $PEER_IP"

say "ping: $NS -> guest $GUEST_IP"
ip netns exec "$NS" $(ping_cmd) -c 4 "$GUEST_IP"
ip netns exec "$NS" $(ping_cmd) -c 2 -s 1472 "$GUEST_IP"

say "vfrelay log (tail)"
tail -n 10 "$WORK/vfrelay.log"

say "demo ok ($MODE)"
