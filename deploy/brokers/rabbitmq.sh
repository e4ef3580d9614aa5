#!/usr/bin/env bash
#
# rabbitmq.sh -- install, start, stop, check and crash a RabbitMQ broker with
# the STOMP plugin, for vmcontroller's tests and CI. Loopback only.
#
#   rabbitmq.sh {install|start|stop|restart|status|kill|purge} [--instance NAME] [--port PORT]
#
# (`--help` explains the commands; exit codes: 0 ok, 1 failure; `status`
# exits 0 running, 1 starting/unresponsive, 3 stopped.)
#
# Instance "main" (default) is the system node rabbit@localhost: STOMP on
# 127.0.0.1:61613, STOMP over TLS on 127.0.0.1:61615 (a test CA and server
# certificate are made with openssl in $VMC_BROKER_STATE/tls/: clients trust
# tls/ca.pem), AMQP 127.0.0.1:5672, distribution 127.0.0.1:25672, config in
# /etc/rabbitmq, data in /var/lib/rabbitmq/mnesia, logs in /var/log/rabbitmq.
#
# A named instance is a separate Erlang node vmc-NAME@localhost with all its
# files under $VMC_BROKER_STATE/rabbitmq-NAME/ (default /var/tmp/vmc-brokers):
# STOMP on 127.0.0.1:PORT, AMQP on PORT+1000, distribution on PORT+2000 (or
# PORT-1000 / PORT-2000 when PORT > 63535). Its data survives stop/restart/kill.
#
# Brokers run as the "rabbitmq" user and are stopped with SIGTERM (graceful).
# epmd is shared by all nodes and listens on 127.0.0.1:4369 (and [::1]:4369:
# epmd always adds the IPv6 loopback). STOMP login guest/guest (loopback only),
# and the `host` header must be "/" (it names the vhost).
set -euo pipefail

BROKER=rabbitmq
SERVER_TAG=RabbitMQ
DEFAULT_PORT=61613
PACKAGES=(rabbitmq-server openssl)

RMQ_USER=rabbitmq
RMQ_HOME=/var/lib/rabbitmq # the user's HOME: shared .erlang.cookie
RMQ_SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Where everything of $INSTANCE lives.
rmq_layout() {
    if [[ $INSTANCE == main ]]; then
        NODENAME=rabbit@localhost
        AMQP_PORT=5672
        DIST_PORT=25672
        CONF_DIR=/etc/rabbitmq
        MNESIA_BASE=$RMQ_HOME/mnesia
        LOG_BASE=/var/log/rabbitmq
        PID_FILE=$MNESIA_BASE/$NODENAME.pid
        TLS_PORT=61615
    else
        TLS_PORT=
        NODENAME=vmc-$INSTANCE@localhost
        if ((PORT + 2000 <= 65535)); then
            AMQP_PORT=$((PORT + 1000)) DIST_PORT=$((PORT + 2000))
        else
            AMQP_PORT=$((PORT - 1000)) DIST_PORT=$((PORT - 2000))
        fi
        CONF_DIR=$STATE_DIR
        MNESIA_BASE=$STATE_DIR/mnesia
        LOG_BASE=$STATE_DIR/log
        PID_FILE=$STATE_DIR/rabbitmq.pid
    fi
    ENV_FILE=$CONF_DIR/rabbitmq-env.conf
    CONFIG_FILE=$CONF_DIR/rabbitmq.conf
    PLUGINS_FILE=$CONF_DIR/enabled_plugins
}

# Applications a STOMP-only node loads. The package ships 71 plugin dirs, all
# on the code path, and module loading scans every one of them: a node run
# from a "slim" home (copies of the three start scripts and links to just
# these apps) boots ~1.5 s faster. VMC_RABBITMQ_SLIM=0 uses the stock scripts.
RMQ_APPS=(rabbit rabbit_common rabbitmq_prelaunch rabbitmq_stomp amqp_client
    amqp10_common aten credentials_obfuscation cuttlefish enough gen_batch_server
    jsx observer_cli osiris ra ranch recon seshat stdout_formatter syslog
    sysmon_handler systemd)

# rmq_slim_home: (re)build $VMC_BROKER_STATE/.rabbitmq-slim-home for the installed
# RabbitMQ if needed and print its path; fails if an app is missing.
rmq_slim_home() {
    local dist home=$VMC_BROKER_STATE/.rabbitmq-slim-home tmp app dirs
    dist=$(readlink -f "$RMQ_SERVER")
    dist=${dist%/sbin/rabbitmq-server}
    mkdir -p "$VMC_BROKER_STATE"
    (
        exec 8>"$home.lock"
        flock 8
        [[ $(cat "$home/.source" 2>/dev/null) != "$dist" ]] || exit 0
        tmp=$(mktemp -d "$home.XXXXXX")
        mkdir "$tmp/sbin" "$tmp/plugins"
        cp "$dist"/sbin/{rabbitmq-server,rabbitmq-env,rabbitmq-defaults} "$tmp/sbin/"
        ln -s "$dist/escript" "$tmp/escript"
        for app in "${RMQ_APPS[@]}"; do
            dirs=("$dist/plugins/$app"-[0-9]*)
            [[ -d ${dirs[0]} ]] || { rm -rf "$tmp"; exit 1; }
            ln -s "${dirs[0]}" "$tmp/plugins/"
        done
        echo "$dist" >"$tmp/.source"
        chmod 755 "$tmp"
        rm -rf "$home"
        mv "$tmp" "$home"
    ) 9>&- || return 1
    echo "$home"
}

b_installed() { [[ -x $RMQ_SERVER ]] && pkg_installed rabbitmq-server; }

# The node's environment, as NAME=VALUE words (also the rabbitmq-env.conf).
rmq_env() {
    local loopback_only='-kernel inet_dist_use_interface {127,0,0,1}'
    printf '%s\n' \
        "RABBITMQ_NODENAME=$NODENAME" \
        "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1" \
        "RABBITMQ_NODE_PORT=$AMQP_PORT" \
        "RABBITMQ_DIST_PORT=$DIST_PORT" \
        "RABBITMQ_CONFIG_FILE=$CONFIG_FILE" \
        "RABBITMQ_ENABLED_PLUGINS_FILE=$PLUGINS_FILE" \
        "RABBITMQ_MNESIA_BASE=$MNESIA_BASE" \
        "RABBITMQ_LOG_BASE=$LOG_BASE" \
        "RABBITMQ_PID_FILE=$PID_FILE" \
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=$loopback_only" \
        "RABBITMQ_CTL_ERL_ARGS=$loopback_only" \
        "ERL_AFLAGS=$loopback_only" \
        "ERL_EPMD_ADDRESS=127.0.0.1"
}

# rmq_tls_files: make (once) a CA and a server certificate for 127.0.0.1 and
# localhost, valid ten years, under $VMC_BROKER_STATE/tls, readable by the broker.
rmq_tls_files() {
    TLS_DIR=$VMC_BROKER_STATE/tls
    [[ -s $TLS_DIR/server.pem ]] && return 0
    mkdir -p "$VMC_BROKER_STATE"
    local tmp
    tmp=$(mktemp -d "$TLS_DIR.XXXXXX")
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vmcontroller test CA" \
        -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$tmp/ext.cnf"
    openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
        -CAcreateserial -days 3650 -extfile "$tmp/ext.cnf" -out "$tmp/server.pem" 2>/dev/null
    chmod 644 "$tmp"/*.pem "$tmp/server.key"
    chmod 755 "$tmp"
    rm -rf "$TLS_DIR"
    mv "$tmp" "$TLS_DIR"
}

# The STOMP-over-TLS lines of rabbitmq.conf (main instance only).
rmq_tls_config() {
    if [[ -z $TLS_PORT ]]; then
        echo "stomp.listeners.ssl = none"
        return
    fi
    rmq_tls_files
    printf '%s\n' \
        "stomp.listeners.ssl.1 = 127.0.0.1:$TLS_PORT" \
        "ssl_options.cacertfile = $TLS_DIR/ca.pem" \
        "ssl_options.certfile = $TLS_DIR/server.pem" \
        "ssl_options.keyfile = $TLS_DIR/server.key" \
        "ssl_options.verify = verify_none" \
        "ssl_options.fail_if_no_peer_cert = false"
}

b_configure() {
    rmq_layout
    mkdir -p "$CONF_DIR" "$MNESIA_BASE" "$LOG_BASE"
    if [[ $INSTANCE != main && $EUID -eq 0 ]]; then
        chown "$RMQ_USER:$RMQ_USER" "$STATE_DIR" "$MNESIA_BASE" "$LOG_BASE"
    fi

    {
        echo "# Managed by vmcontroller deploy/brokers/rabbitmq.sh (instance $INSTANCE); rewritten on start."
        rmq_env | sed -E 's/^([A-Z_]+)=(.*)$/\1="\2"/'
    } >"$ENV_FILE"

    cat >"$CONFIG_FILE" <<EOF
# Managed by vmcontroller deploy/brokers/rabbitmq.sh (instance $INSTANCE); rewritten on start.
# Everything listens on 127.0.0.1 only.
listeners.tcp.1 = 127.0.0.1:$AMQP_PORT
listeners.ssl = none
stomp.listeners.tcp.1 = 127.0.0.1:$PORT
$(rmq_tls_config)
stomp.tcp_listen_options.nodelay = true
stomp.default_vhost = /
distribution.listener.interface = 127.0.0.1
distribution.listener.port_range.min = $DIST_PORT
distribution.listener.port_range.max = $DIST_PORT

# guest/guest is allowed, from loopback only (RabbitMQ's default, made explicit).
loopback_users.guest = true

# Largest message accepted (STOMP frames are bounded by this only): 128 MiB.
max_message_size = 134217728

log.file.level = info
log.console = false
EOF

    # STOMP only: management, prometheus etc. stay off. Same effect as
    # `rabbitmq-plugins enable --offline rabbitmq_stomp`, without booting a VM.
    echo '[rabbitmq_stomp].' >"$PLUGINS_FILE"
    if [[ $EUID -eq 0 ]]; then
        chown "$RMQ_USER:$RMQ_USER" "$PLUGINS_FILE"
        chmod 644 "$ENV_FILE" "$CONFIG_FILE" "$PLUGINS_FILE"
    fi
}

b_launch() {
    rmq_layout
    rm -f "$PID_FILE"
    local server=$RMQ_SERVER home env_words
    if [[ ${VMC_RABBITMQ_SLIM:-1} == 1 ]]; then
        if home=$(rmq_slim_home); then
            server=$home/sbin/rabbitmq-server
        else
            warn "could not build the slim RabbitMQ home; using the stock scripts"
        fi
    fi
    mapfile -t env_words < <(rmq_env)
    as_user "$RMQ_USER"
    spawn "$RMQ_HOME" "$CONSOLE_LOG" "${AS_USER[@]}" env -i "${CLEAN_ENV[@]}" \
        HOME="$RMQ_HOME" RABBITMQ_CONF_ENV_FILE="$ENV_FILE" "${env_words[@]}" "$server"
}

# The beam.smp process of the node (from its pid file, checked in /proc).
b_pid() {
    rmq_layout
    local pid=
    [[ -r $PID_FILE ]] && pid=$(<"$PID_FILE")
    # (The main node may also have been started by hand or by the init script.)
    if pid_has_env "$pid" "RABBITMQ_NODENAME=$NODENAME" ||
        { [[ $INSTANCE == main ]] && pid_matches "$pid" beam.smp; }; then
        echo "$pid"
    fi
}

b_ports() {
    rmq_layout
    printf '%s\n' "$AMQP_PORT AMQP" "$DIST_PORT Erlang distribution"
    [[ -z $TLS_PORT ]] || printf '%s\n' "$TLS_PORT STOMP over TLS"
}

b_logs() {
    rmq_layout
    printf '%s\n' "$CONSOLE_LOG" "$LOG_BASE/$NODENAME.log"
}

# Mnesia (queue definitions, users, vhosts) and the message stores.
b_data_dirs() {
    rmq_layout
    printf '%s\n' "$MNESIA_BASE"
}

broker_main "$@"
