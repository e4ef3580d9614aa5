#!/usr/bin/env bash
#
# up.sh -- install (when missing) and start both default brokers for
# vmcontroller's tests: RabbitMQ STOMP on 127.0.0.1:61613 and ActiveMQ STOMP on
# 127.0.0.1:61614. Idempotent: already running brokers are left alone.
# Packages are installed one after the other (dpkg has a single lock), then
# both brokers start in parallel. Exits non-zero if either broker fails.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

"$here/rabbitmq.sh" install
"$here/activemq.sh" install

"$here/rabbitmq.sh" start &
rabbit=$!
"$here/activemq.sh" start &
activemq=$!

rc=0
wait "$rabbit" || rc=1
wait "$activemq" || rc=1
if ((rc)); then
    echo "up.sh: at least one broker failed to start" >&2
    exit 1
fi
echo "up.sh: RabbitMQ STOMP 127.0.0.1:61613, ActiveMQ STOMP 127.0.0.1:61614 (login guest/guest, host /)"
