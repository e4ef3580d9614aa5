#!/usr/bin/env bash
# deploy/qemu/install.sh -- install QEMU for the vmc-host QEMU backend and its tests.
#
# Idempotent: when `qemu-system-x86_64 --version` and `qemu-img` already work, it
# does nothing. Otherwise it adds Debian's bookworm-backports suite to apt's
# sources (QEMU 10 comes from there: the preinstalled qemu-utils is the backports
# build and conflicts with bookworm's own QEMU 7.2), then installs, without
# recommends: qemu-system-x86 (the emulator), qemu-system-data (its ROMs and
# keymaps), seabios + ipxe-qemu (the PC firmware and the virtio-net option ROM),
# and qemu-utils (qemu-img, qemu-io). The guest's forward to the broker is run by
# QEMU as `vmc-host relay`: nothing else is needed for it.
# Needs root and the Debian mirrors; concurrent runs are serialised with a lock.
set -euo pipefail

log() { printf '[qemu-install] %s\n' "$*"; }
die() {
    printf '[qemu-install] error: %s\n' "$*" >&2
    exit 1
}

works() {
    qemu-system-x86_64 --version >/dev/null 2>&1 &&
        qemu-img --version >/dev/null 2>&1
}

if works; then
    log "already installed: $(qemu-system-x86_64 --version | head -n1)"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "QEMU is missing and installing it needs root"

LOCK=/var/lock/vmc-qemu-install.lock
exec 9>"$LOCK"
flock 9
if works; then # another run installed it while we waited for the lock
    log "already installed: $(qemu-system-x86_64 --version | head -n1)"
    exit 0
fi

SOURCES=/etc/apt/sources.list.d/vmc-bookworm-backports.sources
if ! cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
    2>/dev/null | grep -v '^ *#' | grep -q 'bookworm-backports'; then
    log "adding bookworm-backports to apt's sources ($SOURCES)"
    cat >"$SOURCES" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

start=$(date +%s)
log "apt-get update"
# Some other source failing to update must not stop us; a missing package will.
apt-get update -qq || log "warning: apt-get update reported errors"
log "installing qemu-system-x86 from bookworm-backports"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports \
    qemu-system-x86 qemu-system-data qemu-utils seabios ipxe-qemu
works || die "qemu-system-x86_64 still does not run after the install"
log "installed $(qemu-system-x86_64 --version | head -n1) in $(($(date +%s) - start)) s"
