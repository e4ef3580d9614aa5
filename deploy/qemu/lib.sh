# shellcheck shell=bash
# deploy/qemu/lib.sh -- code shared by the builders of Linux guests from Debian's
# packages (sourced by deploy/qemu/tiny-guest.sh and deploy/guest-image/build.sh).
#
# Nothing here installs a package on the host but build tools (cpio, lz4, ...):
# the kernel and busybox are fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into a work directory. The caller sets LIB_TAG (its log prefix)
# before sourcing, and calls, in this order:
#   guest_packages FLAVOUR        -> KERNEL_PKG KERNEL_VER BUSYBOX_VER (one apt-cache call)
#   guest_fetch WORK              -> WORK/pkg unpacked; KVER MODDIR VMLINUZ
#   guest_extract_vmlinux OUT     -> OUT/vmlinux (the ELF with a PVH entry), or fails
#   guest_busybox_root ROOT       -> ROOT with busybox, its applet links, /dev/console
#   guest_add_modules ROOT NAMES  -> ROOT/lib/modules/*.ko and ROOT/etc/modules (load order)
#   guest_cpio ROOT OUT [gzip|none] -> the initramfs
# What it does not do: write any /init (each builder has its own guest), or cache
# (each builder knows its inputs and writes its own build id).

log() { printf '[%s] %s\n' "$LIB_TAG" "$*"; }
die() {
    printf '[%s] error: %s\n' "$LIB_TAG" "$*" >&2
    exit 1
}

# need_tool COMMAND PACKAGE: installs PACKAGE when COMMAND is missing.
need_tool() {
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing the build tool $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null ||
        die "cannot install $2"
}

# guest_packages FLAVOUR: the current kernel package of linux-image-FLAVOUR and
# busybox-static, with their versions. One apt-cache call (each costs about a second
# here): the meta package names the current kernel package and its version in its
# Depends.
guest_packages() {
    local flavour=$1 info
    _guest_apt_info() {
        apt-cache show --no-all-versions "linux-image-$flavour" busybox-static 2>/dev/null |
            grep -E '^(Package|Version|Depends):' || true
    }
    info=$(_guest_apt_info)
    if [ -z "$info" ]; then
        log "apt-get update (apt has no package lists)"
        apt-get update -qq
        info=$(_guest_apt_info)
    fi
    KERNEL_PKG=$(sed -n 's/^Depends: \(linux-image-[0-9][^ ]*\) (= .*$/\1/p' <<<"$info" | head -n1)
    KERNEL_VER=$(sed -n 's/^Depends: linux-image-[0-9][^ ]* (= \(.*\))$/\1/p' <<<"$info" | head -n1)
    BUSYBOX_VER=$(sed -n '/^Package: busybox-static$/,/^Package:/s/^Version: //p' <<<"$info" | head -n1)
    if [ -z "$KERNEL_PKG" ] || [ -z "$KERNEL_VER" ]; then
        die "apt knows no package linux-image-$flavour"
    fi
    [ -n "$BUSYBOX_VER" ] || die "apt knows no package busybox-static"
}

# guest_fetch WORK: downloads and unpacks the packages guest_packages chose.
guest_fetch() {
    local work=$1 deb
    need_tool dpkg-deb dpkg
    mkdir -p "$work/deb"
    log "downloading $KERNEL_PKG $KERNEL_VER and busybox-static $BUSYBOX_VER"
    (cd "$work/deb" && apt-get download -q -o APT::Sandbox::User=root \
        "$KERNEL_PKG=$KERNEL_VER" "busybox-static=$BUSYBOX_VER" >/dev/null) ||
        die "apt-get download failed"
    for deb in "$work"/deb/*.deb; do dpkg-deb -x "$deb" "$work/pkg"; done
    KVER=${KERNEL_PKG#linux-image-}
    VMLINUZ="$work/pkg/boot/vmlinuz-$KVER"
    MODDIR="$work/pkg/lib/modules/$KVER"
    BUSYBOX="$work/pkg/bin/busybox"
    [ -f "$VMLINUZ" ] || die "$KERNEL_PKG has no /boot/vmlinuz-$KVER"
    [ -x "$BUSYBOX" ] || die "busybox-static has no /bin/busybox"
}

# guest_extract_vmlinux OUT: extracts the ELF vmlinux from the bzImage (like the
# kernel's scripts/extract-vmlinux: find each compression's magic, decompress from
# there, keep the first result that is an ELF file). QEMU boots it through its PVH
# entry, which skips the in-guest decompression (seconds under TCG). Fails (status
# 1) when no decompressor finds it; the caller decides whether vmlinuz will do.
guest_extract_vmlinux() {
    local out=$1 config
    config="$(dirname "$VMLINUZ")/config-$KVER"
    _guest_try_extract() { # MAGIC(grep -P) TOOL...
        local magic=$1 pos
        shift
        command -v "$1" >/dev/null 2>&1 || return 1
        while read -r pos; do
            tail -c "+$((pos + 1))" "$VMLINUZ" | "$@" >"$out" 2>/dev/null || true
            if [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                return 0
            fi
        done < <(LC_ALL=C grep -obUaP "$magic" "$VMLINUZ" | cut -d: -f1)
        rm -f "$out"
        return 1
    }
    case $(sed -n 's/^CONFIG_KERNEL_\(GZIP\|XZ\|LZ4\|ZSTD\|LZMA\|BZIP2\|LZO\)=y$/\1/p' "$config") in
    LZ4) need_tool lz4 lz4 && _guest_try_extract '\x02\x21\x4c\x18' lz4 -dc ;;
    XZ) need_tool xz xz-utils && _guest_try_extract '\xfd\x37\x7a\x58\x5a\x00' xz -dc ;;
    ZSTD) need_tool zstd zstd && _guest_try_extract '\x28\xb5\x2f\xfd' zstd -dc ;;
    GZIP) _guest_try_extract '\x1f\x8b\x08' gzip -dc ;;
    *) return 1 ;;
    esac
}

# guest_busybox_root ROOT: the skeleton of an initramfs: busybox-static with a link
# per applet, the usual directories, and /dev/console (the kernel opens it before
# /init runs; creating it needs root, without it /init's early output is lost).
guest_busybox_root() {
    local root=$1 applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,lib/modules}
    cp "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list-full); do
        [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
    done
    if [ "$(id -u)" -eq 0 ]; then
        mknod -m 600 "$root/dev/console" c 5 1
    fi
}

# guest_add_modules ROOT NAME...: the named modules that this kernel builds as
# modules, with their dependencies first (read from each module's own `depends=`
# modinfo string), into ROOT/lib/modules, and their load order into ROOT/etc/modules.
# A built-in module needs nothing; one neither built in nor shipped is an error.
# Sets MODULES_LOADED (the order).
guest_add_modules() {
    local root=$1
    shift
    declare -gA _guest_loaded=()
    MODULES_LOADED=()
    _guest_add_module() {
        local name=$1 file dep
        [ -n "${_guest_loaded[$name]:-}" ] && return 0
        _guest_loaded[$name]=1
        file=$(find "$MODDIR/kernel" -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" | head -n1)
        if [ -z "$file" ]; then
            grep -q "/$name.ko\$" "$MODDIR/modules.builtin" ||
                die "module $name is neither built in nor shipped by $KERNEL_PKG"
            return 0
        fi
        case $file in
        *.xz) need_tool xz xz-utils && xz -dc "$file" >"$root/lib/modules/$name.ko" ;;
        *.zst) need_tool zstd zstd && zstd -qdc "$file" >"$root/lib/modules/$name.ko" ;;
        *) cp "$file" "$root/lib/modules/$name.ko" ;;
        esac
        for dep in $(LC_ALL=C grep -aoP 'depends=[a-z0-9_,-]*' "$root/lib/modules/$name.ko" |
            head -n1 | cut -d= -f2 | tr ',' ' '); do
            _guest_add_module "$dep"
        done
        MODULES_LOADED+=("$name")
    }
    local m
    for m in "$@"; do _guest_add_module "$m"; done
    printf '%s\n' "${MODULES_LOADED[@]}" >"$root/etc/modules"
}

# guest_cpio ROOT OUT [gzip|none]: packs ROOT as a newc cpio archive, in a stable
# order. `none` leaves it uncompressed: bigger, but under TCG the kernel unpacks it
# faster than it inflates a gzip of it.
guest_cpio() {
    local root=$1 out=$2 compression=${3:-gzip}
    need_tool cpio cpio
    case $compression in
    gzip) (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) >"$out" ;;
    none) (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$out" ;;
    *) die "unknown initramfs compression $compression" ;;
    esac
}
