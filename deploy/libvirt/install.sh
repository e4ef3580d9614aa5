#!/usr/bin/env bash
# deploy/libvirt/install.sh -- install and start libvirt for the vmc-host libvirt
# backend and its tests, on this machine only.
#
# Idempotent: installs what is missing, writes the settings the backend needs, starts
# virtlogd and libvirtd if they are not running, and waits until
# `virsh -c qemu:///system version` answers. Expects QEMU from deploy/qemu/install.sh.
#
# Packages, without recommends: libvirt-daemon (libvirtd, virtlogd),
# libvirt-daemon-driver-qemu and libvirt-clients (virsh), Debian 12's libvirt 9.0.
# Not libvirt-daemon-system: it pulls systemd units, an upgrade of systemd, iptables
# and libvirt-daemon-config-network (the default NAT network, autostarted); none of
# the three pulls Debian 12's own QEMU, which would conflict with the backports QEMU.
# Without libvirt-daemon-system this script does what its postinst would: the
# `libvirt-qemu` system user (libvirtd refuses to start without the user it was
# built for, even when qemu.conf names another), and /var/log/libvirt.
#
# /etc/libvirt/qemu.conf (written when its content differs; libvirtd is then
# restarted, running domains survive it): user and group root (no KVM group games:
# QEMU runs TCG), dynamic_ownership = 0 (libvirt never chowns the caller's images),
# seccomp_sandbox = 0 (libvirt's QEMU sandbox forbids the fork with which a guest's
# only connection, the guestfwd to the broker, runs `vmc-host relay`).
#
# Networking: nothing here defines or starts a libvirt network; an autostart link of
# libvirt's `default` NAT network, if another package made one, is removed before
# libvirtd starts. libvirtd listens on its unix sockets only. No systemd needed.
# Needs root and the Debian mirrors; concurrent runs are serialised with a lock.
set -euo pipefail

log() { printf '[libvirt-install] %s\n' "$*"; }
die() {
    printf '[libvirt-install] error: %s\n' "$*" >&2
    exit 1
}

URI=qemu:///system
PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
QEMU_CONF=/etc/libvirt/qemu.conf
WAIT_SECS=${VMC_LIBVIRT_START_TIMEOUT:-60}

answers() { timeout 20 virsh -q -c "$URI" version >/dev/null 2>&1; }

installed() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 1
    done
}

qemu_conf() {
    cat <<'CONF'
# Written by deploy/libvirt/install.sh (vmcontroller's libvirt backend).
user = "root"
group = "root"
dynamic_ownership = 0
seccomp_sandbox = 0
CONF
}

# running PIDFILE: whether the daemon of that pid file runs.
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" -eq 0 ] || die "installing and starting libvirtd needs root"
command -v qemu-system-x86_64 >/dev/null 2>&1 || die "QEMU is missing: run deploy/qemu/install.sh first"

LOCK=/var/lock/vmc-libvirt-install.lock
exec 9>"$LOCK"
flock 9

start=$(date +%s)
if ! installed; then
    log "apt-get update"
    # Some other source failing to update must not stop us; a missing package will.
    apt-get update -qq || log "warning: apt-get update reported errors"
    if apt-get -s install --no-install-recommends "${PACKAGES[@]}" 2>/dev/null |
        grep -E '^Inst (qemu-system|qemu-utils|libvirt-daemon-config-network)' >&2; then
        die "installing ${PACKAGES[*]} would replace QEMU or add libvirt's default network (above)"
    fi
    log "installing ${PACKAGES[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${PACKAGES[@]}" >/dev/null
fi

getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid libvirt-qemu --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin libvirt-qemu
mkdir -p /etc/libvirt /var/log/libvirt/qemu /var/lib/libvirt/qemu /run/libvirt

conf_changed=0
if [ "$(cat "$QEMU_CONF" 2>/dev/null)" != "$(qemu_conf)" ]; then
    [ -f "$QEMU_CONF" ] && cp "$QEMU_CONF" "$QEMU_CONF.vmc-old"
    qemu_conf >"$QEMU_CONF"
    log "wrote $QEMU_CONF"
    conf_changed=1
fi
rm -f /etc/libvirt/qemu/networks/autostart/default.xml

if ! running /run/virtlogd.pid; then
    log "starting virtlogd"
    virtlogd -d 9>&-
fi
if running /run/libvirtd.pid && [ "$conf_changed" -eq 1 ]; then
    pid=$(cat /run/libvirtd.pid)
    log "restarting libvirtd (pid $pid) for the new qemu.conf"
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && die "libvirtd (pid $pid) did not stop within 10 s"
fi
if ! running /run/libvirtd.pid; then
    log "starting libvirtd"
    libvirtd -d 9>&-
fi

deadline=$(($(date +%s) + WAIT_SECS))
until answers; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        tail -n 20 /var/log/libvirt/libvirtd.log >&2 2>/dev/null || true
        die "virsh -c $URI does not answer after ${WAIT_SECS} s (libvirtd log above)"
    fi
    sleep 0.5
done
log "ready in $(($(date +%s) - start)) s: $(virsh -q -c "$URI" version | grep -i 'running hypervisor' | sed 's/^ *//')"
