#!/bin/bash
# Idempotent install of OVS-DPDK 3.1 (Debian bookworm's
# openvswitch-switch-dpdk, ~6 MB to download), the second peer of the
# packet-rate harness's vm2vm scenario. The harness runs ovsdb-server and
# ovs-vswitchd-dpdk itself with a private database in a temp dir, so no
# system service may start here: the packages would start openvswitch-switch
# (and dpdk) through invoke-rc.d, which a policy-rc.d that says no prevents,
# unless the machine already has one.
set -euo pipefail

BIN=/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk
if [ -x "$BIN" ] && command -v ovsdb-server >/dev/null && command -v ovs-vsctl >/dev/null &&
    [ -f /usr/share/openvswitch/vswitch.ovsschema ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup-ovs: run as root" >&2
    exit 1
fi

made_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
fi
rc=0
install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        openvswitch-switch-dpdk
}
# A stale package list (a machine that has not run apt-get update lately)
# fails the download: update once and retry.
install || { apt-get update -q && install; } || rc=$?
if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
[ "$rc" = 0 ] || exit "$rc"
[ -x "$BIN" ] || { echo "setup-ovs: $BIN missing after install" >&2; exit 1; }
echo "setup-ovs: ok ($($BIN --version | head -1))"
