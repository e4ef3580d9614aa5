#!/usr/bin/env bash
# deploy/guest-image/build.sh -- build the vmcontroller guest image: a minimal Linux
# guest that boots to a running vmc-guest agent (README.md beside this script).
#
# usage: build.sh OUTDIR
#
# From Debian's packages (`apt-get download` + `dpkg-deb -x`, never installed on the
# host: deploy/qemu/lib.sh) and our own vmc-guest, statically linked, it writes:
#   OUTDIR/kernel         Debian's linux-image-cloud-amd64 kernel as an ELF vmlinux
#                         (QEMU boots it through its PVH entry: no in-guest
#                         decompression, seconds saved under TCG)
#   OUTDIR/initramfs      busybox-static, the virtio/ACPI-button/evdev/fw_cfg modules,
#                         /sbin/vmc-guest, /init and the busybox init's configuration
#   OUTDIR/cmdline        the kernel command line to boot it with
#   OUTDIR/disk.qcow2     a blank ext4 data disk (mounted at /data in the guest)
#   OUTDIR/manifest.json  names those files: the QEMU backend's createVM(name, OUTDIR)
#                         boots the kernel directly and overlays the disk
#   OUTDIR/BUILD-ID       the inputs: this script, lib.sh and the guest's files
#                         (init, inittab, agent, stop, settings.awk), the package versions,
#                         the vmc-guest binary; when they match nothing is rebuilt
# With VMC_IMAGE_WITH_QGA=1 the initramfs also holds Debian's qemu-guest-agent
# (/usr/sbin/qemu-ga, dynamically linked: the shared libraries it needs, found by
# their ELF NEEDED entries in its unpacked dependencies, and the loader), which /init
# starts on the virtio-serial port org.qemu.guest_agent.0 when the VM has one; its
# package versions are then part of BUILD-ID. Without it nothing of it is fetched.
# The disk is kept across rebuilds while its own recipe (DISK-ID) is unchanged:
# existing VMs' overlays name it as their backing file.
#
# Environment:
#   VMC_GUEST_STATIC_BIN  a statically linked vmc-guest to use instead of building one
#   VMC_GUEST_TARGET_DIR  cargo's target dir for that build
#                         (default: ${CARGO_TARGET_DIR:-<repo>/target}/guest-static)
#   VMC_IMAGE_KERNEL_FLAVOUR  Debian kernel flavour (default cloud-amd64)
#   VMC_IMAGE_DISK_MIB    size of the data disk (default 256)
#   VMC_IMAGE_WITH_QGA    1: add qemu-guest-agent (default: without it)
set -euo pipefail

LIB_TAG=guest-image
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=SCRIPTDIR/../qemu/lib.sh
. "$repo/deploy/qemu/lib.sh"

[ $# -eq 1 ] || die "usage: $(basename "$0") OUTDIR"
OUT=$1
FLAVOUR=${VMC_IMAGE_KERNEL_FLAVOUR:-cloud-amd64}
DISK_MIB=${VMC_IMAGE_DISK_MIB:-256}
if ! [[ $DISK_MIB =~ ^[0-9]+$ ]] || [ "$DISK_MIB" -lt 16 ]; then
    die "VMC_IMAGE_DISK_MIB must be a number of MiB, at least 16"
fi
start=$(date +%s%3N)
WITH_QGA=${VMC_IMAGE_WITH_QGA:-0}
case $WITH_QGA in 0 | 1) ;; *) die "VMC_IMAGE_WITH_QGA must be 0 or 1" ;; esac
elapsed() { echo "$((($(date +%s%3N) - start) / 1000)).$(((($(date +%s%3N) - start) % 1000) / 100)) s"; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec 9>"$OUT/.lock"
flock 9

# --- vmc-guest, statically linked: the guest has no libc. musl when its target is
# installed; otherwise glibc with crt-static (fine for an agent that resolves no
# host names through NSS: the broker is an address).
static_guest() {
    if [ -n "${VMC_GUEST_STATIC_BIN:-}" ]; then
        GUEST_BIN=$VMC_GUEST_STATIC_BIN
        [ -x "$GUEST_BIN" ] || die "VMC_GUEST_STATIC_BIN=$GUEST_BIN is not an executable"
        return
    fi
    local target=x86_64-unknown-linux-gnu
    if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        target=x86_64-unknown-linux-musl
    fi
    local target_dir=${VMC_GUEST_TARGET_DIR:-${CARGO_TARGET_DIR:-$repo/target}/guest-static}
    log "cargo build --release -p vmc-guest --target $target (static, in $target_dir)"
    (cd "$repo" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
        --locked -p vmc-guest --target "$target" --target-dir "$target_dir") ||
        die "building the static vmc-guest failed"
    GUEST_BIN="$target_dir/$target/release/vmc-guest"
}
static_guest
need_tool file file
case $(file -b "$GUEST_BIN") in
*"statically linked"* | *"static-pie linked"*) ;;
*) die "$GUEST_BIN is not statically linked: $(file -b "$GUEST_BIN")" ;;
esac
guest_sha=$(sha256sum "$GUEST_BIN" | cut -d' ' -f1)
guest_version=$("$GUEST_BIN" --version)

guest_packages "$FLAVOUR"

# --- qemu-guest-agent (VMC_IMAGE_WITH_QGA=1): the package and its dependencies,
# recursively (Depends only), with their versions: one line of the build id.
qga_line=
if [ "$WITH_QGA" = 1 ]; then
    QGA_PKGS=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances --no-pre-depends qemu-guest-agent 2>/dev/null |
        grep -E '^[a-z0-9]' | LC_ALL=C sort -u | tr '\n' ' ')
    case " $QGA_PKGS " in *" qemu-guest-agent "*) ;; *) die "apt knows no package qemu-guest-agent" ;; esac
    # shellcheck disable=SC2086 # one word per package
    QGA_PINNED=$(apt-cache show --no-all-versions $QGA_PKGS |
        awk '/^Package:/ { p = $2 } /^Version:/ { print p "=" $2 }' | LC_ALL=C sort | tr '\n' ' ')
    QGA_VER=$(sed -n 's/.*qemu-guest-agent=\([^ ]*\).*/\1/p' <<<"$QGA_PINNED")
    qga_line="qemu-guest-agent ${QGA_PINNED% }"$'\n'
fi
script_hash=$(cat "$0" "$repo/deploy/qemu/lib.sh" "$here/init" "$here/inittab" "$here/agent" \
    "$here/stop" "$here/settings.awk" | sha256sum | cut -d' ' -f1)
build_id=$(printf 'script %s\n%s %s\nbusybox-static %s\nvmc-guest %s\n%s' \
    "$script_hash" "$KERNEL_PKG" "$KERNEL_VER" "$BUSYBOX_VER" "$guest_sha" "$qga_line")
disk_id=$(printf 'ext4 %s MiB, label vmc-data, no lazy init\n' "$DISK_MIB")
if [ -f "$OUT/BUILD-ID" ] && [ "$(cat "$OUT/BUILD-ID")" = "$build_id" ] &&
    [ -f "$OUT/DISK-ID" ] && [ "$(cat "$OUT/DISK-ID")" = "$disk_id" ] &&
    [ -f "$OUT/manifest.json" ] && [ -f "$OUT/kernel" ] && [ -f "$OUT/initramfs" ] &&
    [ -f "$OUT/cmdline" ] && [ -f "$OUT/disk.qcow2" ]; then
    log "cached in $OUT ($KERNEL_PKG $KERNEL_VER, busybox-static $BUSYBOX_VER, $guest_version) ($(elapsed))"
    exit 0
fi

WORK="$OUT/.work"
rm -rf "$WORK"
mkdir -p "$WORK/root"
trap 'rm -rf "$WORK"' EXIT
guest_fetch "$WORK"

# --- the kernel
kernel_kind=vmlinux
if ! guest_extract_vmlinux "$WORK/kernel"; then
    log "warning: could not extract vmlinux, using the compressed vmlinuz (slower boot)"
    cp "$VMLINUZ" "$WORK/kernel"
    kernel_kind=vmlinuz
fi

# --- the initramfs
root="$WORK/root"
guest_busybox_root "$root"
guest_add_modules "$root" virtio_pci virtio_blk virtio_net virtio_console virtio-rng button evdev \
    qemu_fw_cfg
mkdir -p "$root"/{data,run,var/lib,var/log,etc/vmc,etc/acpi/PWRF,root}
cp "$GUEST_BIN" "$root/sbin/vmc-guest"
strip "$root/sbin/vmc-guest" 2>/dev/null || true
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
cp "$here/init" "$root/init"
cp "$here/inittab" "$root/etc/inittab"
cp "$here/agent" "$root/etc/vmc/agent"
cp "$here/stop" "$root/etc/vmc/stop"
cp "$here/settings.awk" "$root/etc/vmc/settings.awk"
# busybox acpid runs /etc/acpi/<ACTION>/<PARAMETER> for an event: the power button.
printf '#!/bin/sh\n# The ACPI power button (busybox acpid): a clean shutdown through init.\nexec poweroff\n' \
    >"$root/etc/acpi/PWRF/00000080"
chmod 755 "$root/init" "$root/etc/vmc/agent" "$root/etc/vmc/stop" "$root/etc/acpi/PWRF/00000080"

# --- qemu-guest-agent: /usr/sbin/qemu-ga, then every shared library it needs,
# transitively, by ELF NEEDED from the unpacked packages (no ldconfig cache in the
# guest: all of them in /lib/x86_64-linux-gnu, the loader's default directory), and
# the loader its PT_INTERP names.
if [ "$WITH_QGA" = 1 ]; then
    need_tool readelf binutils
    mkdir -p "$WORK/qga-deb"
    log "downloading qemu-guest-agent $QGA_VER and its libraries"
    # shellcheck disable=SC2086 # one word per package
    (cd "$WORK/qga-deb" && apt-get download -q -o APT::Sandbox::User=root $QGA_PINNED >/dev/null) ||
        die "apt-get download of qemu-guest-agent failed"
    for deb in "$WORK"/qga-deb/*.deb; do dpkg-deb -x "$deb" "$WORK/qga-pkg"; done
    [ -x "$WORK/qga-pkg/usr/sbin/qemu-ga" ] || die "qemu-guest-agent has no /usr/sbin/qemu-ga"
    mkdir -p "$root/usr/sbin" "$root/lib/x86_64-linux-gnu" "$root/lib64"
    cp "$WORK/qga-pkg/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
    interp=$(readelf -l "$root/usr/sbin/qemu-ga" | sed -n 's/.*Requesting program interpreter: \(.*\)]$/\1/p')
    [ "$interp" = /lib64/ld-linux-x86-64.so.2 ] || die "qemu-ga asks for the loader ${interp:-(none)}"
    cp -L "$WORK/qga-pkg$interp" "$root$interp"
    pending=("$root/usr/sbin/qemu-ga")
    QGA_LIBS=()
    while [ ${#pending[@]} -gt 0 ]; do
        elf=${pending[0]}
        pending=("${pending[@]:1}")
        for soname in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
            [ -e "$root/lib/x86_64-linux-gnu/$soname" ] && continue
            lib=
            for dir in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
                [ -e "$WORK/qga-pkg/$dir/$soname" ] && lib="$WORK/qga-pkg/$dir/$soname" && break
            done
            [ -n "$lib" ] || die "no package of qemu-guest-agent's dependencies has $soname"
            cp -L "$lib" "$root/lib/x86_64-linux-gnu/$soname"
            QGA_LIBS+=("$soname")
            pending+=("$root/lib/x86_64-linux-gnu/$soname")
        done
    done
fi

# Uncompressed: QEMU hands it over in one fw_cfg DMA and the kernel only copies it,
# where inflating a gzip of it costs about a second under TCG.
guest_cpio "$root" "$WORK/initramfs" none

# --- the data disk: ext4 made here (mke2fs on a file needs no root), so a fresh VM
# mounts it at once; inode tables and journal written now, not by the guest.
if [ ! -f "$OUT/disk.qcow2" ] || [ ! -f "$OUT/DISK-ID" ] || [ "$(cat "$OUT/DISK-ID")" != "$disk_id" ]; then
    need_tool mke2fs e2fsprogs
    command -v qemu-img >/dev/null 2>&1 || die "qemu-img is missing: run deploy/qemu/install.sh"
    truncate -s "${DISK_MIB}M" "$WORK/disk.raw"
    mke2fs -q -F -t ext4 -L vmc-data -m 0 -E lazy_itable_init=0,lazy_journal_init=0 \
        "$WORK/disk.raw" || die "mke2fs failed"
    qemu-img convert -q -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2" || die "qemu-img convert failed"
    rm -f "$WORK/disk.raw"
    mv "$WORK/disk.qcow2" "$OUT/disk.qcow2"
    printf '%s' "$disk_id" >"$OUT/DISK-ID"
fi

# Quiet: under TCG every console byte costs; `panic=-1` reboots rather than hangs.
cmdline="console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable no_timer_check i8042.nokbd i8042.noaux"
printf '%s\n' "$cmdline" >"$WORK/cmdline"
cat >"$WORK/manifest.json" <<JSON
{
  "format": "vmc-guest-image/1",
  "kernel": "kernel",
  "initramfs": "initramfs",
  "cmdline": "cmdline",
  "disk": "disk.qcow2",
  "build": {
    "kernel": "$KERNEL_PKG $KERNEL_VER ($kernel_kind)",
    "busybox": "busybox-static $BUSYBOX_VER",
    "vmc_guest": "$guest_version",
    "vmc_guest_sha256": "$guest_sha",
    "modules": "${MODULES_LOADED[*]}",
    "disk": "$disk_id"${QGA_VER:+,
    \"qemu_guest_agent\": \"qemu-guest-agent $QGA_VER, ${QGA_LIBS[*]}\"}
  }
}
JSON
# Each file replaced by a rename: a VM created from the previous build keeps the
# files it linked to.
for f in kernel initramfs cmdline manifest.json; do mv "$WORK/$f" "$OUT/$f"; done
printf '%s\n' "$build_id" >"$OUT/BUILD-ID"

qga_built=${QGA_VER:+, qemu-guest-agent $QGA_VER with ${#QGA_LIBS[@]} libraries}
log "built in $OUT in $(elapsed): kernel $(du -h "$OUT/kernel" | cut -f1) ($kernel_kind)," \
    "initramfs $(du -h "$OUT/initramfs" | cut -f1), disk $(du -h "$OUT/disk.qcow2" | cut -f1)" \
    "of ${DISK_MIB} MiB, $guest_version, modules: ${MODULES_LOADED[*]}$qga_built"
