#!/bin/bash
# Live migration of a VM whose NIC is served by vfrelay: the SOURCE side.
# Pair with migrate-destination.sh. Each side has its own vfrelay process
# (on the same or another host), on the same network segment:
#
#   src host: vfrelay vhost-user --socket /run/vfrelay/src.sock --backend tap,ifname=vfr-src
#   dst host: vfrelay vhost-user --socket /run/vfrelay/dst.sock --backend tap,ifname=vfr-dst
#   dst host: qemu-configs/migrate-destination.sh guest /run/vfrelay/dst.sock tcp:0.0.0.0:4444
#   src host: qemu-configs/migrate-source.sh guest /run/vfrelay/src.sock
#             then, on its QMP socket (/tmp/vfrelay-src.qmp):
#   {"execute":"qmp_capabilities"}
#   {"execute":"migrate-set-parameters","arguments":{"max-bandwidth":67108864}}
#   {"execute":"migrate","arguments":{"uri":"tcp:DST-HOST:4444"}}
#   {"execute":"query-migrate"}            (until "status": "completed")
#
# What makes it work: vfrelay offers VHOST_F_LOG_ALL and LOG_SHMFD, so QEMU
# hands it a dirty log and vfrelay marks every guest page it writes while
# migration runs. After the switch-over the guest announces itself
# (GUEST_ANNOUNCE), or QEMU asks the destination vfrelay to send a RARP for
# the guest MAC (SEND_RARP), so switches learn where the MAC went. The
# source vfrelay unmaps the guest when its QEMU goes and can serve another.
#
# Both sides need identical machine and device options (migrate-common.sh);
# the memory backend must be shared (vhost-user needs it anyway). Between
# different hosts, replace -cpu max with a named CPU model both support.
#
# Checked here: ACCEL=tcg MEM=256M, both sides on one machine with
# INCOMING=unix:/tmp/mig.sock, migration completed and the guest ran on.
set -euo pipefail
exec "$(dirname "$0")/migrate-common.sh" "$@" -qmp unix:/tmp/vfrelay-src.qmp,server=on,wait=off
