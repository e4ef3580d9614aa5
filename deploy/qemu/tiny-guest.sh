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
# Environment: VMC_TINY_KERNEL_FLAVOUR (default cloud-amd64). The fetching and
# packing is deploy/qemu/lib.sh's, shared with deploy/guest-image/build.sh.
set -euo pipefail

LIB_TAG=tiny-guest
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

[ $# -eq 1 ] || die "usage: $(basename "$0") OUTDIR"
OUT=$1
FLAVOUR=${VMC_TINY_KERNEL_FLAVOUR:-cloud-amd64}
SCRIPT_HASH=$(cat "$0" "$here/lib.sh" | sha256sum | cut -d' ' -f1)
start=$(date +%s%3N)

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec 9>"$OUT/.lock"
flock 9

guest_packages "$FLAVOUR"
build_id=$(printf 'script %s\n%s %s\nbusybox-static %s\n' \
    "$SCRIPT_HASH" "$KERNEL_PKG" "$KERNEL_VER" "$BUSYBOX_VER")
if [ -f "$OUT/BUILD-ID" ] && [ "$(cat "$OUT/BUILD-ID")" = "$build_id" ] &&
    [ -e "$OUT/kernel" ] && [ -f "$OUT/initramfs.cpio.gz" ] && [ -f "$OUT/cmdline" ]; then
    log "cached in $OUT ($KERNEL_PKG $KERNEL_VER, busybox-static $BUSYBOX_VER)"
    exit 0
fi

WORK="$OUT/.work"
rm -rf "$WORK"
mkdir -p "$WORK/root"
trap 'rm -rf "$WORK"' EXIT
guest_fetch "$WORK"

# --- the kernel
rm -f "$OUT/vmlinux" "$OUT/vmlinuz" "$OUT/kernel"
if guest_extract_vmlinux "$WORK/vmlinux"; then
    mv "$WORK/vmlinux" "$OUT/vmlinux"
    ln -s vmlinux "$OUT/kernel"
else
    log "warning: could not extract vmlinux, using the compressed vmlinuz (slower boot)"
    cp "$VMLINUZ" "$OUT/vmlinuz"
    ln -s vmlinuz "$OUT/kernel"
fi

# --- the initramfs
root="$WORK/root"
guest_busybox_root "$root"
guest_add_modules "$root" virtio_pci virtio_blk virtio_net button evdev qemu_fw_cfg

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

guest_cpio "$root" "$OUT/initramfs.cpio.gz" gzip
echo "console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable no_timer_check i8042.nokbd i8042.noaux" \
    >"$OUT/cmdline"
printf '%s\n' "$build_id" >"$OUT/BUILD-ID"

log "built in $OUT in $((($(date +%s%3N) - start) / 1000)) s: kernel $(du -h "$OUT/kernel" -L | cut -f1)" \
    "($(readlink "$OUT/kernel")), initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1)," \
    "modules: ${MODULES_LOADED[*]}"
