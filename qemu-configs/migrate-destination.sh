#!/bin/bash
# Live migration, DESTINATION side: see migrate-source.sh.
#   qemu-configs/migrate-destination.sh DISK|guest SOCKET INCOMING
# INCOMING is a QEMU -incoming URI, e.g. tcp:0.0.0.0:4444 or unix:/tmp/mig.sock
set -euo pipefail
DISK=${1:?usage: $0 DISK|guest SOCKET INCOMING}
SOCK=${2:?usage: $0 DISK|guest SOCKET INCOMING}
INCOMING=${3:?usage: $0 DISK|guest SOCKET INCOMING}
exec "$(dirname "$0")/migrate-common.sh" "$DISK" "$SOCK" \
    -qmp unix:/tmp/vfrelay-dst.qmp,server=on,wait=off -incoming "$INCOMING"
