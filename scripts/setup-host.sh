#!/bin/bash
# Idempotent host setup for the vfrelay test suite (run as root on Debian
# bookworm). Installs QEMU 10 and the 6.12 guest kernel from
# bookworm-backports, DPDK testpmd, busybox, systemd-analyze, and reserves
# hugepages.
set -euo pipefail

BPO=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$BPO" ]; then
    cat > "$BPO" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    rm -f /var/lib/vfrelay-apt-updated
fi

need=()
bpo=()
# QEMU 10 and its firmware/data packages must all come from backports.
qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10' || bpo+=(qemu-system-x86)
command -v dpdk-testpmd >/dev/null || need+=(dpdk-dev)
[ -x /bin/busybox ] && busybox --list 2>/dev/null | grep -qx udhcpc || need+=(busybox-static)
command -v ip >/dev/null || need+=(iproute2)
command -v ethtool >/dev/null || need+=(ethtool)
command -v cpio >/dev/null || need+=(cpio)
command -v python3 >/dev/null || need+=(python3)
# tests/systemd_unit.rs checks contrib/systemd/vfrelay.service with it
# (containers often lack systemd).
command -v systemd-analyze >/dev/null || need+=(systemd)
# build-guest.sh compiles the guest test tools with `gcc -static`.
command -v gcc >/dev/null || need+=(gcc)
[ -f "/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)/libc.a" ] || need+=(libc6-dev)

if [ ${#need[@]} -gt 0 ] || [ ${#bpo[@]} -gt 0 ] || [ ! -f /var/lib/vfrelay-apt-updated ]; then
    apt-get update -q
    touch /var/lib/vfrelay-apt-updated
fi
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if [ ${#bpo[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -t bookworm-backports "${bpo[@]}"
fi

# Hugepages for DPDK (testpmd and virtio-user need them).
want=${VFRELAY_HUGEPAGES:-1024}
have=$(cat /proc/sys/vm/nr_hugepages)
if [ "$have" -lt "$want" ]; then echo "$want" > /proc/sys/vm/nr_hugepages; fi
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
echo "setup-host: ok (hugepages $(cat /proc/sys/vm/nr_hugepages))"
