#!/usr/bin/env bash
#
# run.sh -- the end-to-end tests on real VMs: Python's standard xmlrpc.client
# against a real vmc-host driving real QEMU VMs that boot the guest image
# (deploy/guest-image/) and run a real vmc-guest, all on a real broker.
#
#   tests/vm/run.sh [unittest arguments, e.g. -k test_05]
#
# Installs QEMU if missing (deploy/qemu/install.sh), builds the guest image or
# finds it cached (deploy/guest-image/build.sh, in <target>/tmp/guest-image),
# starts the RabbitMQ broker if it is not running (deploy/brokers/rabbitmq.sh,
# STOMP on 127.0.0.1:61613), then one vmc-host with the QEMU backend on a free
# loopback port, a state directory and a destination prefix of its own, and a
# beacon interval of 1 s (the VMs learn the prefix and the interval through
# fw_cfg); runs test_vms.py; stops everything on any exit: vmc-host, and every QEMU
# it launched (they are daemons and would outlive it). The exit code is the tests'.
# On failure the host's log and each VM's serial console and QEMU log are printed.
# Build first:
#   cargo build -p vmc-host --bin vmc-host
# VMC_HOST_BIN overrides the binary (default target/debug/vmc-host), VMC_TEST_BROKER
# the broker (then it is not started), VMC_HOST_LOG the host's RUST_LOG (default
# info), VMC_TEST_KEEP=1 keeps the work directory.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
host_bin=${VMC_HOST_BIN:-$target/debug/vmc-host}
if [[ ! -x $host_bin ]]; then
    echo "run.sh: $host_bin is missing: cargo build -p vmc-host --bin vmc-host" >&2
    exit 2
fi

t0=$(date +%s%3N)
bash "$root/deploy/qemu/install.sh"
image="$target/tmp/guest-image"
bash "$root/deploy/guest-image/build.sh" "$image"
image_secs=$((($(date +%s%3N) - t0) / 1000))

if [[ -n ${VMC_TEST_BROKER:-} ]]; then
    broker=$VMC_TEST_BROKER
else
    broker=stomp://127.0.0.1:61613
    bash "$root/deploy/brokers/rabbitmq.sh" start >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vmc-vmtest.XXXXXX")
host_pid=
cleanup() {
    local rc=$?
    if [[ -n $host_pid ]]; then
        kill "$host_pid" 2>/dev/null || true
        wait "$host_pid" 2>/dev/null || true
    fi
    # Every QEMU of this run: its pid file is in our state directory, and its
    # command line names it (a reused pid is never taken for ours).
    local pidfile pid
    for pidfile in "$work"/host/qemu/vms/*/qemu.pid; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if [[ $pid =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$work/"; then
            echo "run.sh: stopping QEMU $pid ($(dirname "$pidfile"))" >&2
            kill "$pid" 2>/dev/null || true
        fi
    done
    if [[ $rc -ne 0 ]]; then
        echo "----- vmc-host.log (last 80 lines)" >&2
        tail -n 80 "$work/vmc-host.log" >&2 || true
        local vm
        for vm in "$work"/host/qemu/vms/*; do
            [[ -d $vm ]] || continue
            for log in serial.log qemu.log; do
                [[ -s $vm/$log ]] || continue
                echo "----- $(basename "$vm")/$log (last 40 lines)" >&2
                tail -n 40 "$vm/$log" >&2
            done
        done
    fi
    if [[ ${VMC_TEST_KEEP:-} == 1 ]]; then
        echo "run.sh: kept $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tag="vm$$-$RANDOM"
mkdir -p "$work/host" "$work/files"

env -i PATH="$PATH" RUST_LOG="${VMC_HOST_LOG:-info}" \
    VMC_BACKEND=qemu VMC_STATE_DIR="$work/host" VMC_LISTEN="127.0.0.1:$port" \
    VMC_PREFIX="$tag" VMC_BROKER="$broker" VMC_LOGIN=guest VMC_PASSCODE=guest \
    VMC_HOST_ID="$tag-host" VMC_BEACON_INTERVAL=1 \
    "$host_bin" >"$work/vmc-host.log" 2>&1 &
host_pid=$!

export VMC_XMLRPC_URL="http://127.0.0.1:$port"
export VMC_TEST_IMAGE="$image"
export VMC_TEST_TAG="$tag"
export VMC_TEST_STATE_DIR="$work/host"
export VMC_TEST_FILES="$work/files"
export VMC_TEST_BEACON_INTERVAL=1

python3 - <<'EOF'
import os, sys, time, xmlrpc.client
url, deadline, last = os.environ["VMC_XMLRPC_URL"], time.monotonic() + 60, None
while time.monotonic() < deadline:
    try:
        xmlrpc.client.ServerProxy(url).version()
        sys.exit(0)
    except (OSError, xmlrpc.client.Error) as e:
        last = repr(e)
    time.sleep(0.2)
sys.exit(f"run.sh: vmc-host did not answer within 60 s ({last})")
EOF

echo "run.sh: guest image ready in ${image_secs} s ($image); vmc-host on 127.0.0.1:$port, prefix $tag"
cd "$here"
python3 -m unittest -v test_vms "$@"
