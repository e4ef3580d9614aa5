#!/usr/bin/env bash
#
# run.sh -- the API tests: Python's standard xmlrpc.client against the XML-RPC
# API (test_xmlrpc.py), and urllib/http.client and the `vmc` CLI against the JSON
# API, its event stream, /healthz and /metrics (test_json.py), all against a real
# vmc-host and real vmc-guest processes on a real broker.
#
#   tests/python/run.sh [unittest arguments, e.g. -k Transfers]
#
# Starts the RabbitMQ broker if it is not running (deploy/brokers/rabbitmq.sh,
# STOMP on 127.0.0.1:61613), then one vmc-host with the unmanaged backend on a
# free loopback port and three vmc-guest processes, all under a destination prefix
# of their own; waits until the host lists the guests; runs both test modules;
# stops everything on any exit. The exit code is the tests'. Build first:
#   cargo build -p vmc-host -p vmc-guest
# VMC_HOST_BIN / VMC_GUEST_BIN / VMC_CLI_BIN override the binaries (default
# target/debug/),
# VMC_TEST_BROKER the broker (then it is not started), VMC_HOST_LOG / VMC_GUEST_LOG
# the agents' RUST_LOG (default warn). On failure the agents' logs are printed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
host_bin=${VMC_HOST_BIN:-$root/target/debug/vmc-host}
guest_bin=${VMC_GUEST_BIN:-$root/target/debug/vmc-guest}
cli_bin=${VMC_CLI_BIN:-$root/target/debug/vmc}
for bin in "$host_bin" "$guest_bin" "$cli_bin"; do
    if [[ ! -x $bin ]]; then
        echo "run.sh: $bin is missing: cargo build -p vmc-host -p vmc-guest" >&2
        exit 2
    fi
done

if [[ -n ${VMC_TEST_BROKER:-} ]]; then
    broker=$VMC_TEST_BROKER
else
    broker=stomp://127.0.0.1:61613
    bash "$root/deploy/brokers/rabbitmq.sh" start >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vmc-pytest.XXXXXX")
pids=()
cleanup() {
    local rc=$?
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $rc -ne 0 ]]; then
        for log in "$work"/*.log; do
            [[ -s $log ]] || continue
            echo "----- $(basename "$log") (last 40 lines)" >&2
            tail -n 40 "$log" >&2
        done
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tag="py$$-$RANDOM"
vms=("$tag-box-1" "$tag-box-2" "$tag-box-3")
mkdir -p "$work/host" "$work/files" "$work/host-files"

env -i PATH="$PATH" RUST_LOG="${VMC_HOST_LOG:-warn}" \
    VMC_BACKEND=unmanaged VMC_STATE_DIR="$work/host" VMC_LISTEN="127.0.0.1:$port" \
    VMC_PREFIX="$tag" VMC_BROKER="$broker" VMC_LOGIN=guest VMC_PASSCODE=guest \
    VMC_HOST_ID="$tag-host" VMC_BEACON_INTERVAL=1 \
    "$host_bin" >"$work/vmc-host.log" 2>&1 &
pids+=($!)

for vm in "${vms[@]}"; do
    mkdir -p "$work/$vm"
    env -i PATH="$PATH" RUST_LOG="${VMC_GUEST_LOG:-warn}" \
        VMC_BROKER="$broker" VMC_LOGIN=guest VMC_PASSCODE=guest VMC_PREFIX="$tag" \
        VMC_ID="$vm" VMC_STATE_DIR="$work/$vm" VMC_ALLOWED_ROOTS="$work/files" \
        VMC_BEACON_INTERVAL=1 \
        "$guest_bin" >"$work/$vm.log" 2>&1 &
    pids+=($!)
done

export VMC_XMLRPC_URL="http://127.0.0.1:$port"
export VMC_TEST_VMS="${vms[*]}"
export VMC_TEST_FILES="$work/files"
export VMC_TEST_HOST_FILES="$work/host-files"
export VMC_TEST_HOST_STATE="$work/host"
export VMC_CLI_BIN="$cli_bin"

# The host answers and every guest is alive, or the tests cannot start.
python3 - <<'EOF'
import os, sys, time, xmlrpc.client
url, vms = os.environ["VMC_XMLRPC_URL"], os.environ["VMC_TEST_VMS"].split()
deadline, last = time.monotonic() + 60, None
while time.monotonic() < deadline:
    try:
        vmc = xmlrpc.client.ServerProxy(url)
        if all(vmc.getPresence(vm)["presence"] == "alive"
               for vm in vms if vm in vmc.listVMs()) and set(vms) <= set(vmc.listVMs()):
            sys.exit(0)
        last = f"listed: {vmc.listVMs()}"
    except (OSError, xmlrpc.client.Error) as e:
        last = repr(e)
    time.sleep(0.2)
sys.exit(f"run.sh: the host did not list the guests {vms} alive within 60 s ({last})")
EOF

cd "$here"
python3 -m unittest -v test_xmlrpc test_json "$@"
