#!/usr/bin/env bash
#
# down.sh -- stop both default brokers and every named broker instance found
# in the state dir ($VMC_BROKER_STATE, default /var/tmp/vmc-brokers), in
# parallel, then epmd if no Erlang node is left. Data dirs are kept (a later
# start finds its persistent messages again). Exits non-zero if a stop failed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${VMC_BROKER_STATE:-/var/tmp/vmc-brokers}

pids=()
stop() { # BROKER INSTANCE
    "$here/$1.sh" stop --instance "$2" &
    pids+=($!)
}

stop rabbitmq main
stop activemq main
shopt -s nullglob
for dir in "$state"/rabbitmq-* "$state"/activemq-*; do
    [[ -f $dir/port ]] || continue # not an instance dir
    name=${dir##*/}
    broker=${name%%-*}
    instance=${name#*-}
    [[ $instance == main ]] || stop "$broker" "$instance"
done

rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done

# epmd (shared by all RabbitMQ nodes) refuses to die while a node is registered.
if command -v epmd >/dev/null && ERL_EPMD_ADDRESS=127.0.0.1 epmd -names >/dev/null 2>&1; then
    ERL_EPMD_ADDRESS=127.0.0.1 epmd -kill >/dev/null 2>&1 || true
fi

((rc == 0)) || { echo "down.sh: some broker failed to stop" >&2; exit 1; }
echo "down.sh: all brokers stopped"
