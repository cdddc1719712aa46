#!/bin/bash
# Build the test guest (tier 3) from Debian packages, into target/guest/:
#
#   vmlinuz              bookworm-backports 6.12 kernel (unsigned image package)
#   initramfs.cpio.gz    busybox-static + the kernel modules the tests need + /init
#   kernel.version       the kernel release (uname -r) inside the guest
#
# The initramfs also carries the guest-side test tools from tests/guest-tools/
# (built here with `gcc -static -O2`): /bin/udpcheck, /bin/vdpa_probe,
# /bin/vdpa_drive, /bin/udpburst.
#
# Nothing is installed on the host: the kernel package is fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` under target/guest/.
# Re-running is cheap: when the inputs (this script, the kernel package, the
# busybox binary) are unchanged the script exits at once.
#
# Environment:
#   VFRELAY_GUEST_DIR     output directory (default: <repo>/target/guest)
#   VFRELAY_GUEST_KPKG    kernel package to use, as NAME or NAME=VERSION
#                         (default: newest linux-image-6.12.*-amd64-unsigned
#                         in bookworm-backports)
#
# Guest kernel command line understood by /init (all optional):
#   vfx.modules=a,b,c     extra modules to modprobe at boot (always loaded:
#                         virtio_pci, virtio_net)
#   vfx.ip=ADDR/PREFIX    address for vfx.if once it appears, link set up
#   vfx.if=NAME           interface for vfx.ip / vfx.mtu (default eth0)
#   vfx.mtu=N             MTU for vfx.if
#
# /init prints "VFX-GUEST-READY" on the console right before it starts an
# interactive shell on it (prompt empty, terminal echo off); a test drives the
# shell by writing `CMD` and then `echo "@@VFX""<n> $?"`, reading up to the
# line "@@VFX<n> <status>" (see tests/common/guest.rs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${VFRELAY_GUEST_DIR:-$ROOT/target/guest}
SELF="$ROOT/scripts/build-guest.sh"

# Modules the guest loads or may load (their dependencies are added from
# modules.dep; modules built into the kernel are skipped).
MODULES=(
    virtio_pci virtio_net net_failover failover
    vdpa vduse virtio_vdpa vhost_vdpa vhost vhost_iotlb
    igb igbvf 8021q
    vfio vfio_pci vfio_iommu_type1
    veth 9p 9pnet_virtio
)
BOOT_MODULES="virtio_pci,virtio_net"

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-get apt-cache dpkg-deb cpio gzip xz sha256sum gcc; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup-host.sh)"
done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (apt-get install busybox-static)"
file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || die "$BUSYBOX is not static (install busybox-static)"

mkdir -p "$OUT/cache"

# Guest tools: C sources compiled statically (the initramfs has no libc).
TOOLS_SRC=("$ROOT/tests/guest-tools/udpcheck.c"
    "$ROOT/tests/guest-tools/vdpa_probe.c" "$ROOT/tests/guest-tools/vdpa_drive.c"
    "$ROOT/tests/guest-tools/udpburst.c")
for src in "${TOOLS_SRC[@]}"; do [ -f "$src" ] || die "$src missing"; done
# Inputs that decide whether the guest must be rebuilt.
stamp_of() { { echo "$1"; sha256sum "$SELF" "$BUSYBOX" "${TOOLS_SRC[@]}"; } | sha256sum | cut -d' ' -f1; }

# --- 1. choose the kernel package -------------------------------------------
pick_kernel_pkg() {
    if [ -n "${VFRELAY_GUEST_KPKG:-}" ]; then
        echo "$VFRELAY_GUEST_KPKG"
        return
    fi
    # Newest 6.12 version of the linux-image-amd64 metapackage (backports);
    # its dependency names the ABI package, whose -unsigned twin we take.
    local ver dep
    ver=$(apt-cache madison linux-image-amd64 2>/dev/null |
        awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep '^6\.12\.' |
        sort -V | tail -n1 || true)
    [ -n "$ver" ] || return 1
    dep=$(apt-cache show "linux-image-amd64=$ver" |
        sed -n 's/^Depends: *\(linux-image-6\.12[^ ,]*\).*/\1/p' | head -n1)
    [ -n "$dep" ] || return 1
    echo "${dep%-unsigned}-unsigned=$ver"
}

KPKG=$(pick_kernel_pkg || true)
if [ -z "$KPKG" ]; then
    log "no 6.12 kernel in the apt cache; running apt-get update"
    apt-get update -q >&2
    KPKG=$(pick_kernel_pkg) || die "no linux-image 6.12 in bookworm-backports (did setup-host.sh add it?)"
fi

# --- 2. up to date? ---------------------------------------------------------
STAMP=$(stamp_of "$KPKG")
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$STAMP" ] &&
    [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.cpio.gz" ]; then
    log "up to date ($KPKG) in $OUT"
    exit 0
fi
log "building guest from $KPKG into $OUT"

# --- 3. download + unpack the kernel package --------------------------------
KNAME=${KPKG%%=*}
DEB=$(ls "$OUT"/cache/"${KNAME}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)
if [[ "$KPKG" == *=* ]]; then
    KVER_DEB=${KPKG#*=}
    # apt-get download names files NAME_VERSION_ARCH.deb with ':' as %3a.
    want="$OUT/cache/${KNAME}_${KVER_DEB//:/%3a}_amd64.deb"
    if [ ! -s "$want" ]; then DEB=""; fi
fi
download() {
    log "downloading $KPKG"
    # apt-get download writes into the current directory. As root it
    # warns that the download is unsandboxed; that is harmless here.
    (cd "$OUT/cache" && apt-get download -q "$KPKG" 2>&1 | grep -v unsandboxed >&2 || true)
    DEB=$(ls "$OUT"/cache/"${KNAME}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$DEB" ] && [ -s "$DEB" ]
}
if [ -z "$DEB" ] || [ ! -s "$DEB" ]; then
    if ! download; then
        # Stale package lists name a version the mirror no longer has.
        [ -z "${VFRELAY_GUEST_KPKG:-}" ] || die "apt-get download $KPKG failed"
        log "download failed; refreshing package lists"
        apt-get update -q >&2
        KPKG=$(pick_kernel_pkg) || die "no linux-image 6.12 in bookworm-backports"
        KNAME=${KPKG%%=*}
        STAMP=$(stamp_of "$KPKG")
        download || die "apt-get download $KPKG failed"
    fi
    # Keep only the package in use.
    find "$OUT/cache" -name '*.deb' ! -name "$(basename "$DEB")" -delete
fi

KROOT="$OUT/kernel-pkg"
if [ ! -f "$KROOT/.from" ] || [ "$(cat "$KROOT/.from")" != "$(basename "$DEB")" ]; then
    log "unpacking $(basename "$DEB")"
    rm -rf "$KROOT"
    mkdir -p "$KROOT"
    dpkg-deb -x "$DEB" "$KROOT"
    basename "$DEB" > "$KROOT/.from"
fi

KREL=$(ls "$KROOT/lib/modules" | head -n1)
[ -n "$KREL" ] || die "no lib/modules in $DEB"
MODDIR="$KROOT/lib/modules/$KREL"

# --- 4. resolve modules ------------------------------------------------------
# The package ships no modules.dep (depmod runs at install time, and the host
# need not have kmod), so read each module's own "depends=" modinfo field.
# Module names treat '-' and '_' alike.
declare -A MODPATH=()
while IFS= read -r path; do
    base=${path##*/}
    name=${base%%.ko*}
    MODPATH[${name//-/_}]=$path
done < <(cd "$MODDIR" && find kernel -name '*.ko*')

is_builtin() {
    local n=${1//-/_}
    [ -f "$MODDIR/modules.builtin" ] &&
        sed 's#.*/##; s/\.ko$//; s/-/_/g' "$MODDIR/modules.builtin" | grep -qx "$n"
}

module_cat() { # decompressed module on stdout
    case "$1" in
        *.ko.xz) xz -dc "$MODDIR/$1" ;;
        *.ko.zst) zstd -qdc "$MODDIR/$1" ;;
        *.ko.gz) gzip -dc "$MODDIR/$1" ;;
        *) cat "$MODDIR/$1" ;;
    esac
}
module_deps() { # dependency names of a module path
    module_cat "$1" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

declare -A WANT=()   # module path -> space-separated dependency paths
add_module() {
    local n=${1//-/_} path d deps=""
    path=${MODPATH[$n]:-}
    if [ -z "$path" ]; then
        is_builtin "$n" && { log "module $1 is built into $KREL"; return 0; }
        die "module $1 not found in $KREL"
    fi
    if [ -n "${WANT[$path]+x}" ]; then return 0; fi
    WANT[$path]=""
    for d in $(module_deps "$path"); do
        add_module "$d"
        d=${d//-/_}
        if [ -n "${MODPATH[$d]:-}" ]; then deps+=" ${MODPATH[$d]}"; fi
    done
    WANT[$path]=$deps
}
for m in "${MODULES[@]}"; do add_module "$m"; done

# --- 5. assemble the initramfs ----------------------------------------------
STAGE="$OUT/initramfs-root"
rm -rf "$STAGE"
mkdir -p "$STAGE"/{bin,sbin,dev,proc,sys,tmp,run,etc,root,mnt,usr/bin,usr/sbin}
mkdir -p "$STAGE/lib/modules/$KREL"
cp "$BUSYBOX" "$STAGE/bin/busybox"
# Symlinks for every applet so scripts and tests can use plain names.
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] && continue
    ln -sf busybox "$STAGE/bin/$applet"
done

# Test tools. A static libc is in libc6-dev; a build failure stops here,
# before a half-made initramfs could be stamped as current.
for src in "${TOOLS_SRC[@]}"; do
    name=$(basename "$src" .c)
    gcc -static -O2 -Wall -Wextra -o "$STAGE/bin/$name" "$src" ||
        die "cannot build $src (gcc -static needs libc6-dev)"
    strip "$STAGE/bin/$name" 2>/dev/null || true
done

# Copy wanted modules, decompressed (busybox modprobe then needs no xz/zstd
# support), and write a modules.dep for busybox modprobe. Its format lists
# every dependency, transitively.
plain() { local p=$1; p=${p%.xz}; p=${p%.zst}; p=${p%.gz}; echo "$p"; }
all_deps() { # transitive dependency paths of a module path, deepest last
    local d
    for d in ${WANT[$1]}; do echo "$d"; all_deps "$d"; done
}
DEPOUT="$STAGE/lib/modules/$KREL/modules.dep"
: > "$DEPOUT"
for path in "${!WANT[@]}"; do
    dst="$STAGE/lib/modules/$KREL/$(plain "$path")"
    mkdir -p "$(dirname "$dst")"
    module_cat "$path" > "$dst"
    line="$(plain "$path"):"
    for d in $(all_deps "$path" | awk '!seen[$0]++'); do line+=" $(plain "$d")"; done
    echo "$line" >> "$DEPOUT"
done
sort -o "$DEPOUT" "$DEPOUT"
for f in modules.builtin modules.builtin.modinfo modules.order; do
    if [ -f "$MODDIR/$f" ]; then cp "$MODDIR/$f" "$STAGE/lib/modules/$KREL/"; fi
done

cat > "$STAGE/init" <<EOF
#!/bin/sh
# vfrelay test guest init (generated by scripts/build-guest.sh)
KREL=$KREL
BOOT_MODULES=$BOOT_MODULES
EOF
cat >> "$STAGE/init" <<'EOF'
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# Keep kernel messages off the console: a test parses it.
echo 1 > /proc/sys/kernel/printk

ip= ; ifn=eth0 ; mtu= ; mods=$BOOT_MODULES
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vfx.ip=*) ip=${arg#vfx.ip=} ;;
        vfx.if=*) ifn=${arg#vfx.if=} ;;
        vfx.mtu=*) mtu=${arg#vfx.mtu=} ;;
        vfx.modules=*) mods="$mods,${arg#vfx.modules=}" ;;
    esac
done
for m in $(echo "$mods" | tr ',' ' '); do
    modprobe "$m" || echo "init: modprobe $m failed"
done
ip link set lo up

if [ -n "$ip$mtu" ]; then
    i=0
    while [ ! -e "/sys/class/net/$ifn" ] && [ $i -lt 100 ]; do
        sleep 0.1; i=$((i + 1))
    done
    [ -n "$mtu" ] && ip link set "$ifn" mtu "$mtu"
    [ -n "$ip" ] && ip addr add "$ip" dev "$ifn"
    ip link set "$ifn" up || echo "init: no $ifn"
fi

stty -echo < /dev/console
export HOME=/root TERM=dumb
cd /root
echo "VFX-GUEST-READY"
# PID 1 must not exit: restart the shell if it does. The shell reads its
# commands through a pipe, not from the tty: busybox 1.35 ash, interactive
# on a tty with echo off, reads a line with fgets and takes the EINTR from
# a background job's SIGCHLD for end of input, so it exited whenever a job
# ended while it waited for the next command. A non-interactive shell also
# prints no prompt and no job notices. dd, not cat: with busybox cat (which
# copies with sendfile) the first command sent after boot came out only
# when the next one arrived.
while true; do
    setsid cttyhack sh -c 'dd bs=4096 2>/dev/null | sh'
    echo "init: shell exited, restarting"
done
EOF
chmod 755 "$STAGE/init"

log "modules: $(cd "$STAGE/lib/modules/$KREL" && find . -name '*.ko' | sed 's#.*/##; s/\.ko$//' | sort | tr '\n' ' ')"
(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 > "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"

VMLINUZ="$KROOT/boot/vmlinuz-$KREL"
[ -s "$VMLINUZ" ] || die "no boot/vmlinuz-$KREL in $DEB"
cp "$VMLINUZ" "$OUT/vmlinuz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
echo "$KREL" > "$OUT/kernel.version"
echo "$STAMP" > "$OUT/.stamp"
log "done: $OUT/vmlinuz ($KREL), $OUT/initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1))"
