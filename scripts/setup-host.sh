#!/bin/bash
# Idempotent host setup for the vfrelay test suite (run as root on Debian
# bookworm). Installs QEMU 10, libvirt 11 and the 6.12 guest kernel from
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
# Only these packages from backports, their dependencies from bookworm where
# it has them (`-t bookworm-backports` would also move systemd and udev).
bpo_only=()
# QEMU 10 and its firmware/data packages must all come from backports.
qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10' || bpo+=(qemu-system-x86)
command -v dpdk-testpmd >/dev/null || need+=(dpdk-dev)
# libvirt 11 (tests/libvirt.rs starts its own libvirtd; it drives the
# QEMU 10 above, so no QEMU comes with it).
if [ ! -x /usr/sbin/libvirtd ] || [ ! -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] ||
    ! virsh --version 2>/dev/null | grep -q '^11\.'; then
    bpo_only+=(libvirt-daemon/bookworm-backports libvirt-daemon-driver-qemu/bookworm-backports
        libvirt-clients/bookworm-backports)
fi
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

if [ ${#need[@]} -gt 0 ] || [ ${#bpo[@]} -gt 0 ] || [ ${#bpo_only[@]} -gt 0 ] ||
    [ ! -f /var/lib/vfrelay-apt-updated ]; then
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

if [ ${#bpo_only[@]} -gt 0 ]; then
    # The packages would start libvirtd and virtlogd (invoke-rc.d); the
    # tests start their own, and without systemd a start may fail the
    # install. A policy-rc.d that says no, unless the machine has one.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${bpo_only[@]}" || rc=$?
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    [ "$rc" = 0 ] || exit "$rc"
fi

# Hugepages for DPDK (testpmd and virtio-user need them).
want=${VFRELAY_HUGEPAGES:-1024}
have=$(cat /proc/sys/vm/nr_hugepages)
if [ "$have" -lt "$want" ]; then echo "$want" > /proc/sys/vm/nr_hugepages; fi
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages
echo "setup-host: ok (hugepages $(cat /proc/sys/vm/nr_hugepages))"
