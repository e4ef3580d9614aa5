#!/usr/bin/env bash
# deploy/qemu/tiny-guest.sh -- build the tiny Linux guest the QEMU backend's tests boot.
#
# usage: tiny-guest.sh OUTDIR
#
# Builds, from Debian packages only (`apt-get download` + `dpkg-deb -x`: nothing is
# installed on the host but the build tools cpio and lz4/xz when missing), into OUTDIR:
#   vmlinux            the kernel of Debian's linux-image-cloud-amd64, decompressed
#                      from its bzImage into an ELF with a PVH entry (QEMU boots it
#                      directly, without the slow in-guest decompression under TCG);
#                      `kernel` is a link to it (to vmlinuz if extraction failed)
#   initramfs.cpio.gz  busybox-static, the virtio/ACPI-button/evdev/fw_cfg modules
#                      the kernel builds as modules (in load order), and /init
#   cmdline            the kernel command line to boot it with
#   BUILD-ID           the inputs of the build: the script's hash and the package
#                      versions; when they match, the script does nothing ("cached")
#
# The guest's /init, on the serial console (ttyS0):
#   VMC-GUEST BOOT <uptime>     once per boot (a reset boots again: a second line)
#   MAC <mac>                   the first NIC's MAC address, if any
#   BROKER <host:port>          the fw_cfg string opt/vmc/broker, if QEMU passes one
#   REACH <host:port> connected|failed
#                               for each target of `vmc.reach=HOST:PORT,...` on the
#                               kernel command line: whether a TCP connection that
#                               sends "PROBE <mac>" got through (eth0 is 10.0.2.15/24)
#   DISK <hex>                  the first 64 bytes of /dev/vda in hex, if a disk exists
#   TICK <n> <uptime>           every 100 ms, n counting up from 1 since boot
#   POWERDOWN                   when the ACPI power button is pressed; then the
#                               guest powers itself off (`poweroff -f`). The button
#                               is watched from before the BOOT line on, so it
#                               surely works once the first TICK is out (a press
#                               before that may be lost, as on any real guest).
#
# Environment: VMC_TINY_KERNEL_FLAVOUR (default cloud-amd64).
set -euo pipefail

log() { printf '[tiny-guest] %s\n' "$*"; }
die() {
    printf '[tiny-guest] error: %s\n' "$*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $(basename "$0") OUTDIR"
OUT=$1
FLAVOUR=${VMC_TINY_KERNEL_FLAVOUR:-cloud-amd64}
SCRIPT_HASH=$(sha256sum "$0" | cut -d' ' -f1)
start=$(date +%s%3N)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec 9>"$OUT/.lock"
flock 9

need_tool() { # COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing the build tool $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null ||
        die "cannot install $2"
}

# One apt-cache call (each costs about a second here): the meta package names the
# current kernel package and its version in its Depends.
packages() {
    apt-cache show --no-all-versions "linux-image-$FLAVOUR" busybox-static 2>/dev/null |
        grep -E '^(Package|Version|Depends):' || true
}
info=$(packages)
if [ -z "$info" ]; then
    log "apt-get update (apt has no package lists)"
    apt-get update -qq
    info=$(packages)
fi
kernel_pkg=$(sed -n 's/^Depends: \(linux-image-[0-9][^ ]*\) (= .*$/\1/p' <<<"$info" | head -n1)
kernel_ver=$(sed -n 's/^Depends: linux-image-[0-9][^ ]* (= \(.*\))$/\1/p' <<<"$info" | head -n1)
busybox_ver=$(sed -n '/^Package: busybox-static$/,/^Package:/s/^Version: //p' <<<"$info" | head -n1)
if [ -z "$kernel_pkg" ] || [ -z "$kernel_ver" ]; then
    die "apt knows no package linux-image-$FLAVOUR"
fi
[ -n "$busybox_ver" ] || die "apt knows no package busybox-static"

build_id=$(printf 'script %s\n%s %s\nbusybox-static %s\n' \
    "$SCRIPT_HASH" "$kernel_pkg" "$kernel_ver" "$busybox_ver")
if [ -f "$OUT/BUILD-ID" ] && [ "$(cat "$OUT/BUILD-ID")" = "$build_id" ] &&
    [ -e "$OUT/kernel" ] && [ -f "$OUT/initramfs.cpio.gz" ] && [ -f "$OUT/cmdline" ]; then
    log "cached in $OUT ($kernel_pkg $kernel_ver, busybox-static $busybox_ver)"
    exit 0
fi

need_tool cpio cpio
need_tool dpkg-deb dpkg

WORK="$OUT/.work"
rm -rf "$WORK"
mkdir -p "$WORK/deb" "$WORK/root"
trap 'rm -rf "$WORK"' EXIT

log "downloading $kernel_pkg $kernel_ver and busybox-static $busybox_ver"
(cd "$WORK/deb" && apt-get download -q -o APT::Sandbox::User=root \
    "$kernel_pkg=$kernel_ver" "busybox-static=$busybox_ver" >/dev/null) ||
    die "apt-get download failed"
for deb in "$WORK"/deb/*.deb; do dpkg-deb -x "$deb" "$WORK/pkg"; done

kver=${kernel_pkg#linux-image-}
vmlinuz="$WORK/pkg/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || die "$kernel_pkg has no /boot/vmlinuz-$kver"
moddir="$WORK/pkg/lib/modules/$kver"

# --- the kernel: extract the ELF vmlinux from the bzImage (like the kernel's
# scripts/extract-vmlinux: find each compression's magic, decompress from there,
# keep the first result that is an ELF file).
try_extract() { # MAGIC(grep -P) TOOL... : decompress from each offset of MAGIC
    local magic=$1
    shift
    command -v "$1" >/dev/null 2>&1 || return 1
    local pos
    while read -r pos; do
        tail -c "+$((pos + 1))" "$vmlinuz" | "$@" >"$WORK/vmlinux" 2>/dev/null || true
        if [ "$(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
            return 0
        fi
    done < <(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" | cut -d: -f1)
    return 1
}
config="$WORK/pkg/boot/config-$kver"
case $(sed -n 's/^CONFIG_KERNEL_\(GZIP\|XZ\|LZ4\|ZSTD\|LZMA\|BZIP2\|LZO\)=y$/\1/p' "$config") in
LZ4) need_tool lz4 lz4 && try_extract '\x02\x21\x4c\x18' lz4 -dc ;;
XZ) need_tool xz xz-utils && try_extract '\xfd\x37\x7a\x58\x5a\x00' xz -dc ;;
ZSTD) need_tool zstd zstd && try_extract '\x28\xb5\x2f\xfd' zstd -dc ;;
GZIP) try_extract '\x1f\x8b\x08' gzip -dc ;;
*) false ;;
esac && extracted=1 || extracted=0

rm -f "$OUT/vmlinux" "$OUT/vmlinuz" "$OUT/kernel"
if [ "$extracted" = 1 ]; then
    mv "$WORK/vmlinux" "$OUT/vmlinux"
    ln -s vmlinux "$OUT/kernel"
else
    log "warning: could not extract vmlinux, using the compressed vmlinuz (slower boot)"
    cp "$vmlinuz" "$OUT/vmlinuz"
    ln -s vmlinuz "$OUT/kernel"
fi

# --- the initramfs
root="$WORK/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,lib/modules}
cp "$WORK/pkg/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
if [ "$(id -u)" -eq 0 ]; then
    mknod -m 600 "$root/dev/console" c 5 1
fi

# Modules: the wanted ones that this kernel builds as modules, with their
# dependencies first (read from each module's own `depends=` modinfo string).
wanted="virtio_pci virtio_blk virtio_net button evdev qemu_fw_cfg"
declare -A loaded=()
order=()
add_module() { # NAME
    local name=$1 file dep
    [ -n "${loaded[$name]:-}" ] && return 0
    loaded[$name]=1
    file=$(find "$moddir/kernel" -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" | head -n1)
    if [ -z "$file" ]; then
        grep -q "/$name.ko\$" "$moddir/modules.builtin" ||
            die "module $name is neither built in nor shipped by $kernel_pkg"
        return 0
    fi
    case $file in
    *.xz) xz -dc "$file" >"$root/lib/modules/$name.ko" ;;
    *.zst) zstd -qdc "$file" >"$root/lib/modules/$name.ko" ;;
    *) cp "$file" "$root/lib/modules/$name.ko" ;;
    esac
    for dep in $(LC_ALL=C grep -aoP 'depends=[a-z0-9_,-]*' "$root/lib/modules/$name.ko" |
        head -n1 | cut -d= -f2 | tr ',' ' '); do
        add_module "$dep"
    done
    order+=("$name")
}
for m in $wanted; do add_module "$m"; done
printf '%s\n' "${order[@]}" >"$root/etc/modules"

cat >"$root/init" <<'INIT'
#!/bin/sh
# /init of the vmcontroller tiny test guest (built by deploy/qemu/tiny-guest.sh).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/modules); do insmod "/lib/modules/$m.ko" || echo "insmod $m failed"; done
# The ACPI power button: any event from it powers the guest off cleanly.
for ev in /sys/class/input/event*; do
    [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ] || continue
    (dev=/dev/input/${ev##*/}
        # Wait for devtmpfs to create the node, then for one event (a press).
        while [ "$(dd if="$dev" bs=24 count=1 2>/dev/null | wc -c)" != 24 ]; do sleep 1; done
        echo POWERDOWN
        sync
        poweroff -f) &
done
read -r up idle </proc/uptime
echo "VMC-GUEST BOOT $up"
for nic in /sys/class/net/*; do
    [ "${nic##*/}" = lo ] && continue
    echo "MAC $(cat "$nic/address")"
    break
done
broker=/sys/firmware/qemu_fw_cfg/by_name/opt/vmc/broker/raw
[ -r "$broker" ] && echo "BROKER $(cat "$broker")"
# vmc.reach=HOST:PORT,...: try to connect to each (QEMU user networking's fixed
# addresses) and send "PROBE <mac>"; tests use it to check what the guest can reach.
for arg in $(cat /proc/cmdline); do
    case $arg in vmc.reach=*) targets=$(echo "${arg#vmc.reach=}" | tr ',' ' ') ;; esac
done
if [ -n "${targets:-}" ] && [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
    for target in $targets; do
        (if echo "PROBE $(cat /sys/class/net/eth0/address)" |
            timeout 5 nc -w 2 "${target%:*}" "${target##*:}" >/dev/null 2>&1; then
            echo "REACH $target connected"
        else
            echo "REACH $target failed"
        fi) &
    done
fi
i=0
while [ ! -b /dev/vda ] && [ $i -lt 20 ]; do usleep 50000; i=$((i + 1)); done
if [ -b /dev/vda ]; then
    echo "DISK $(dd if=/dev/vda bs=64 count=1 2>/dev/null | od -An -v -tx1 | tr -d ' \n')"
fi
n=0
while :; do
    n=$((n + 1))
    read -r up idle </proc/uptime
    echo "TICK $n $up"
    usleep 100000
done
INIT
chmod 755 "$root/init"

(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) >"$OUT/initramfs.cpio.gz"
echo "console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable no_timer_check i8042.nokbd i8042.noaux" \
    >"$OUT/cmdline"
printf '%s\n' "$build_id" >"$OUT/BUILD-ID"

log "built in $OUT in $((($(date +%s%3N) - start) / 1000)) s: kernel $(du -h "$OUT/kernel" -L | cut -f1)" \
    "($(readlink "$OUT/kernel")), initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1)," \
    "modules: ${order[*]}"
