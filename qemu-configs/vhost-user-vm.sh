#!/bin/bash
# Boot a VM whose virtio-net NIC is served by vfrelay over vhost-user.
#
#   vfrelay vhost-user --socket /run/vfrelay/vm0.sock --queues 2 \
#       --backend af-xdp,ifname=eth1          # or tap,ifname=vfr0 / loopback
#   qemu-configs/vhost-user-vm.sh disk.qcow2 /run/vfrelay/vm0.sock
#
# DISK may be "guest" to boot the small test guest that
# scripts/build-guest.sh builds (kernel + busybox initramfs, serial shell).
#
# What matters for vhost-user:
# - guest RAM must be shared with vfrelay: a memfd (or hugetlbfs) memory
#   backend with share=on, attached as the NUMA node's memory;
# - queues= on -netdev must not exceed vfrelay's --queues, and mq=on plus
#   vectors=2*queues+2 on the device let the guest use them all;
# - add reconnect-ms=1000 to -chardev if QEMU should ride out a vfrelay
#   restart (vfrelay in server mode, the default).
set -euo pipefail
DISK=${1:?usage: $0 DISK SOCKET [QUEUES]}
SOCK=${2:?usage: $0 DISK SOCKET [QUEUES]}
QUEUES=${3:-1}
MEM=${MEM:-2G}
ACCEL=${ACCEL:-kvm}   # tcg where /dev/kvm is unusable

if [ "$DISK" = guest ]; then
    G="$(cd "$(dirname "$0")/.." && pwd)/target/guest"
    BOOT=(-kernel "$G/vmlinuz" -initrd "$G/initramfs.cpio.gz" -append "console=ttyS0 quiet")
else
    BOOT=(-drive file="$DISK",if=virtio)
fi

exec qemu-system-x86_64 \
    -machine q35,accel="$ACCEL" -cpu max -smp 2 -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on \
    -numa node,memdev=mem \
    "${BOOT[@]}" \
    -chardev socket,id=vfr0,path="$SOCK" \
    -netdev vhost-user,id=net0,chardev=vfr0,queues="$QUEUES" \
    -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,mq=on,vectors=$((2 * QUEUES + 2)) \
    -nographic
