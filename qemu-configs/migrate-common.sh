#!/bin/bash
# The machine both migration sides run: identical on source and
# destination, as QEMU requires. Usage: migrate-common.sh DISK|guest SOCKET [QEMU ARGS...]
set -euo pipefail
DISK=$1
SOCK=$2
shift 2
MEM=${MEM:-512M}
ACCEL=${ACCEL:-kvm}   # tcg where /dev/kvm is unusable
if [ "$DISK" = guest ]; then
    G="$(cd "$(dirname "$0")/.." && pwd)/target/guest"
    BOOT=(-kernel "$G/vmlinuz" -initrd "$G/initramfs.cpio.gz" -append "console=ttyS0 quiet")
else
    BOOT=(-drive file="$DISK",if=virtio)
fi
exec qemu-system-x86_64 \
    -machine q35,accel="$ACCEL" -cpu max -smp 1 -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on \
    -numa node,memdev=mem \
    "${BOOT[@]}" \
    -chardev socket,id=vfr0,path="$SOCK" \
    -netdev vhost-user,id=net0,chardev=vfr0 \
    -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56 \
    -nographic "$@"
