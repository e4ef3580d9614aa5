# shellcheck shell=bash
#
# lib.sh -- code shared by rabbitmq.sh and activemq.sh (sourced, never run).
#
# A broker script sets a few variables and hook functions, then calls
# `broker_main "$@"`; this file does the command line, locking, install,
# waiting for a real STOMP handshake, stop/kill/status.
#
# Required from the broker script:
#   BROKER        short name, used in state dir names: "rabbitmq" / "activemq"
#   SERVER_TAG    what the broker puts in the STOMP `server:` header
#   DEFAULT_PORT  STOMP port of the default instance "main"
#   PACKAGES      array of Debian packages the broker needs
#   b_installed   hook: succeed when the broker software is installed
#   b_configure   hook: write the configuration of $INSTANCE for $PORT
#   b_launch      hook: start the broker in the background, print the PID of
#                 the launched process (may be a wrapper of the real broker)
#   b_pid         hook: print the PID of the running broker process, if any
#   b_logs        hook: print the log files worth showing on failure
#   b_ports       hook: print the other loopback ports the instance listens on,
#                 one "PORT WHAT" per line (checked free before starting, and
#                 listening before the broker counts as ready)
#   b_data_dirs   hook: print the directories holding the instance's queues and
#                 messages (emptied by `reset`)
#
# Variables set here for the hooks: INSTANCE, PORT, STATE_DIR, CONSOLE_LOG.

VMC_BROKER_STATE=${VMC_BROKER_STATE:-/var/tmp/vmc-brokers}
START_TIMEOUT=${VMC_BROKER_START_TIMEOUT:-90}
STOP_TIMEOUT=${VMC_BROKER_STOP_TIMEOUT:-60}

# Credentials used for the readiness handshake; both brokers accept them.
STOMP_LOGIN=${VMC_STOMP_LOGIN:-guest}
STOMP_PASSCODE=${VMC_STOMP_PASSCODE:-guest}
STOMP_HOST=${VMC_STOMP_HOST:-/}

# Every Erlang VM we start (server or CLI) must bind epmd to loopback only.
export ERL_EPMD_ADDRESS=127.0.0.1

# Brokers start with a clean environment (env -i) plus these.
# shellcheck disable=SC2034 # used by the broker scripts
CLEAN_ENV=(PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)

APT_LOCK=/var/lock/vmc-brokers-apt.lock

log() { printf '[%s:%s] %s\n' "$BROKER" "${INSTANCE:-?}" "$*"; }
warn() { printf '[%s:%s] warning: %s\n' "$BROKER" "${INSTANCE:-?}" "$*" >&2; }
die() {
    printf '[%s:%s] error: %s\n' "$BROKER" "${INSTANCE:-?}" "$*" >&2
    exit 1
}

now_ms() { date +%s%3N; }
elapsed() { # START_MS -> "1.234s"
    local ms=$(($(now_ms) - $1))
    printf '%d.%03ds' $((ms / 1000)) $((ms % 1000))
}

usage() {
    cat <<EOF
usage: $(basename "$0") COMMAND [--instance NAME] [--port PORT]

commands:
  install   install the Debian packages if missing and write the configuration
  start     start the broker (idempotent) and wait for a STOMP handshake
  stop      stop the broker gracefully and wait until its port is closed
  restart   stop, then start (persistent data is kept)
  status    print running/stopped and the PID (exit 0 running, 1 starting, 3 stopped)
  kill      SIGKILL the broker process (crash test) and wait until it is gone
  purge     stop a named instance and delete its state dir (all its data)
  reset     stop the broker and delete its queues and messages (any instance,
            main included); configuration and certificates are kept

options:
  --instance NAME  instance name, [A-Za-z0-9_-]+ (default: main)
  --port PORT      STOMP port on 127.0.0.1 (default: $DEFAULT_PORT for main;
                   remembered in the state dir for named instances)

state dir: $VMC_BROKER_STATE (override with VMC_BROKER_STATE)
EOF
}

# ---------------------------------------------------------------------------
# Small process / network helpers

# pid_matches PID PATTERN: PID is alive and its command line contains PATTERN.
pid_matches() {
    local pid=$1 pattern=$2 cmdline
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
    [[ $cmdline == *"$pattern"* ]]
}

# pid_has_env PID NAME=VALUE: PID is alive and was started with NAME=VALUE in
# its environment (robust against PID reuse after a stale pid file).
pid_has_env() {
    local pid=$1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF -- "$2"
}

# pid_alive PID: PID exists and is not a zombie (our PID 1 may reap late).
pid_alive() {
    local pid=${1:-} stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# _stomp_talk PORT HOST LOGIN PASSCODE: send a STOMP 1.2 CONNECT to
# 127.0.0.1:PORT, print the reply's command line and headers (one per line).
_stomp_talk() {
    local line got=
    exec 3<>"/dev/tcp/127.0.0.1/$1" || return 7
    printf 'CONNECT\naccept-version:1.2\nhost:%s\nlogin:%s\npasscode:%s\nheart-beat:0,0\n\n\0' \
        "$2" "$3" "$4" >&3
    while IFS= read -r -t 8 line <&3; do
        line=${line%$'\r'}
        [[ -z $line && -z $got ]] && continue # heart-beat EOLs before the frame
        [[ -z $line ]] && break
        got=1
        printf '%s\n' "$line"
    done
    [[ -n $got ]] || return 8
    printf 'DISCONNECT\n\n\0' >&3 || true
}

# stomp_connect PORT: _stomp_talk with our credentials, under a hard timeout.
stomp_connect() {
    timeout 10 bash -c "$(declare -f _stomp_talk)"'; _stomp_talk "$@"' \
        _ "$1" "$STOMP_HOST" "$STOMP_LOGIN" "$STOMP_PASSCODE" 2>/dev/null
}

# stomp_probe PORT: 0 = our broker answered CONNECTED; 1 = nothing answered;
# 2 = something else answered (PROBE_REPLY holds what it said).
PROBE_REPLY=
stomp_probe() {
    PROBE_REPLY=$(stomp_connect "$1") || {
        PROBE_REPLY=
        port_open "$1" && { PROBE_REPLY="(no STOMP reply)"; return 2; }
        return 1
    }
    if [[ $PROBE_REPLY == CONNECTED* && $PROBE_REPLY == *"server:$SERVER_TAG"* ]]; then
        return 0
    fi
    return 2
}

# Sizes of the log files when we launched the broker: on failure show only
# what this launch wrote.
declare -A LOG_OFFSETS=()
record_log_offsets() {
    local f
    while IFS= read -r f; do
        LOG_OFFSETS[$f]=$(stat -c %s "$f" 2>/dev/null || echo 0)
    done < <(b_logs)
}

show_logs() {
    local f
    while IFS= read -r f; do
        [[ -n $f && -s $f ]] || continue
        printf -- '----- %s (last 40 lines) -----\n' "$f" >&2
        tail -c +$((${LOG_OFFSETS[$f]:-0} + 1)) "$f" | tail -n 40 >&2 || true
    done < <(b_logs)
}

# spawn DIR LOGFILE CMD...: run CMD in DIR, detached (own session; no inherited
# stdio or lock fd), and print its PID. Neither setsid (we are not a process
# group leader) nor setpriv fork, so the PID is the one of CMD itself.
spawn() {
    local dir=$1 logfile=$2
    shift 2
    (cd "$dir" && exec setsid "$@") </dev/null >>"$logfile" 2>&1 9>&- &
    echo $!
}

# as_user USER: sets AS_USER to the command prefix that drops to USER when we
# are root (empty otherwise: run as ourselves).
as_user() {
    AS_USER=()
    if [[ $EUID -eq 0 ]]; then
        # shellcheck disable=SC2034 # used by the broker scripts
        AS_USER=(setpriv --reuid="$1" --regid="$1" --init-groups --)
    fi
}

# ---------------------------------------------------------------------------
# Installation

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# apt_install PKG...: install the missing ones, once, serialised machine-wide.
apt_install() {
    local missing=() p
    for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    [[ $EUID -eq 0 ]] || die "packages missing (${missing[*]}) and not root"
    (
        exec 8>"$APT_LOCK"
        flock 8
        missing=()
        for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
        ((${#missing[@]})) || exit 0
        # Never let the package's postinst start a broker with its default,
        # all-interfaces configuration: we start brokers ourselves.
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
        fi
        echo "[$BROKER] apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        status=0
        # `apt-get update` once (again only if the last one is > 6 hours old).
        stamp=$VMC_BROKER_STATE/.apt-updated
        if [[ -z $(find "$stamp" -mmin -360 2>/dev/null) ]]; then
            if apt-get update -q; then
                mkdir -p "$VMC_BROKER_STATE"
                touch "$stamp"
            else
                status=$?
            fi
        fi
        if ((status == 0)); then
            apt-get install -y -q --no-install-recommends \
                -o Dpkg::Options::=--force-confold "${missing[@]}" || status=$?
        fi
        exit "$status"
    ) 9>&- || die "apt-get install failed"
}

# ---------------------------------------------------------------------------
# Command line and state

parse_args() {
    CMD=${1:-}
    case $CMD in
    "") usage >&2; exit 2 ;;
    -h | --help | help) usage; exit 0 ;;
    esac
    shift
    INSTANCE=main
    PORT=
    while (($#)); do
        case $1 in
        --instance) INSTANCE=${2:?--instance needs a value}; shift 2 ;;
        --instance=*) INSTANCE=${1#*=}; shift ;;
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --port=*) PORT=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
        esac
    done
    [[ $INSTANCE =~ ^[A-Za-z0-9_-]+$ ]] || die "bad instance name: $INSTANCE"
    [[ -z $PORT || ($PORT =~ ^[0-9]+$ && PORT -ge 1024 && PORT -le 65535) ]] ||
        die "bad port: $PORT"

    STATE_DIR=$VMC_BROKER_STATE/$BROKER-$INSTANCE
    CONSOLE_LOG=$STATE_DIR/console.log
    local saved=
    [[ -r $STATE_DIR/port ]] && saved=$(<"$STATE_DIR/port")
    if [[ -z $PORT ]]; then
        if [[ -n $saved ]]; then
            PORT=$saved
        elif [[ $INSTANCE == main ]]; then
            PORT=$DEFAULT_PORT
        elif [[ $CMD == start || $CMD == install || $CMD == restart ]]; then
            die "new instance '$INSTANCE' needs --port"
        fi
    fi
}

# Serialise start/stop/kill/restart of one instance across processes (tests
# run in parallel). fd 9 is closed in every broker process we spawn.
lock_instance() {
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w $((START_TIMEOUT + STOP_TIMEOUT)) 9 || die "could not lock $STATE_DIR/lock"
}

save_port() {
    # A running instance keeps the port it was started with.
    local saved=
    [[ -r $STATE_DIR/port ]] && saved=$(<"$STATE_DIR/port")
    if [[ -n $saved && $saved != "$PORT" ]] && pid_alive "$(b_pid)"; then
        die "instance is running on port $saved; stop it before changing its port to $PORT"
    fi
    echo "$PORT" >"$STATE_DIR/port"
}

# ---------------------------------------------------------------------------
# Commands

cmd_install() {
    apt_install "${PACKAGES[@]}"
    b_installed || die "$BROKER not installed correctly"
    lock_instance
    save_port
    b_configure
    log "installed and configured (STOMP on 127.0.0.1:$PORT)"
}

# other_ports_open: every port of b_ports accepts connections.
other_ports_open() {
    local port what
    while read -r port what; do
        [[ -z $port ]] || port_open "$port" || return 1
    done < <(b_ports)
}

# check_ports_free: die if STOMP's or any other port of the instance is taken.
check_ports_free() {
    local port what
    while read -r port what; do
        [[ -z $port ]] || ! port_open "$port" ||
            die "127.0.0.1:$port ($what) is already in use: pick another --port"
    done < <(echo "$PORT STOMP"; b_ports)
}

# wait_ready PID START_MS: until STOMP answers, the process dies, or the deadline.
wait_ready() {
    local pid=$1 t0=$2 rc
    local deadline=$(($(date +%s) + START_TIMEOUT))
    while :; do
        rc=0
        stomp_probe "$PORT" || rc=$?
        if ((rc == 0)) && other_ports_open; then
            log "ready: STOMP on 127.0.0.1:$PORT answers CONNECTED (pid $(b_pid), took $(elapsed "$t0"))"
            return 0
        fi
        if ! pid_alive "$pid" && ! pid_alive "$(b_pid)"; then
            show_logs
            die "broker process exited during startup (see logs above)"
        fi
        if (($(date +%s) >= deadline)); then
            show_logs
            [[ -z $PROBE_REPLY ]] || warn "last reply on port $PORT: ${PROBE_REPLY//$'\n'/ | }"
            die "no STOMP CONNECTED on 127.0.0.1:$PORT after ${START_TIMEOUT}s (pid $pid still running)"
        fi
        sleep 0.1
    done
}

do_start() {
    local t0 rc pid
    t0=$(now_ms)
    rc=0
    stomp_probe "$PORT" || rc=$?
    if ((rc == 0)); then
        log "already running: STOMP on 127.0.0.1:$PORT answers (pid $(b_pid))"
        return 0
    fi
    pid=$(b_pid)
    if pid_alive "$pid"; then
        log "process $pid already starting; waiting for it"
        wait_ready "$pid" "$t0"
        return 0
    fi
    if ((rc == 2)); then
        die "127.0.0.1:$PORT is used by something that is not $SERVER_TAG: ${PROBE_REPLY//$'\n'/ | }"
    fi
    apt_install "${PACKAGES[@]}"
    b_installed || die "$BROKER not installed correctly"
    save_port
    check_ports_free
    b_configure
    : >"$CONSOLE_LOG"
    record_log_offsets
    pid=$(b_launch)
    log "launched (pid $pid), waiting up to ${START_TIMEOUT}s for STOMP on 127.0.0.1:$PORT"
    wait_ready "$pid" "$t0"
}

# wait_gone PID SECONDS: until PID is gone and the STOMP port is closed.
wait_gone() {
    local pid=$1 deadline=$(($(date +%s) + $2))
    while pid_alive "$pid" || port_open "$PORT"; do
        (($(date +%s) < deadline)) || return 1
        sleep 0.1
    done
}

do_stop() {
    local pid t0
    t0=$(now_ms)
    pid=$(b_pid)
    if ! pid_alive "$pid"; then
        if port_open "$PORT"; then
            die "127.0.0.1:$PORT is open but no $BROKER process of instance '$INSTANCE' is known"
        fi
        log "not running"
        return 0
    fi
    log "stopping pid $pid (SIGTERM)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$STOP_TIMEOUT"; then
        warn "still running after ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 20 || die "pid $pid / port $PORT still alive after SIGKILL"
    fi
    log "stopped (took $(elapsed "$t0"))"
}

cmd_start() {
    lock_instance
    do_start
}

cmd_stop() {
    [[ -n $PORT ]] || { log "unknown instance (no state in $STATE_DIR): not running"; return 0; }
    lock_instance
    do_stop
}

cmd_restart() {
    lock_instance
    do_stop
    do_start
}

cmd_kill() {
    [[ -n $PORT ]] || { log "unknown instance: not running"; return 0; }
    lock_instance
    local pid
    pid=$(b_pid)
    if ! pid_alive "$pid"; then
        log "not running"
        return 0
    fi
    kill -KILL "$pid"
    wait_gone "$pid" 20 || die "pid $pid / port $PORT still alive after SIGKILL"
    log "killed pid $pid (SIGKILL)"
}

cmd_purge() {
    [[ $INSTANCE != main ]] || die "refusing to purge the shared instance main"
    [[ -d $STATE_DIR ]] || { log "nothing to purge"; return 0; }
    if [[ -n $PORT ]]; then
        lock_instance
        do_stop
    fi
    rm -rf "$STATE_DIR"
    log "purged (all data in $STATE_DIR deleted)"
}

cmd_reset() {
    [[ -n $PORT ]] || { log "unknown instance: nothing to reset"; return 0; }
    lock_instance
    do_stop
    local dir
    while read -r dir; do
        # The directories stay (owned by the broker's user); their contents go.
        [[ -n $dir && -d $dir ]] && find "$dir" -mindepth 1 -delete
    done < <(b_data_dirs)
    log "reset (queues and messages deleted; start it again with: start)"
}

cmd_status() {
    local pid
    pid=$(b_pid)
    if [[ -z $PORT ]]; then
        log "stopped (unknown instance)"
        return 3
    fi
    if stomp_probe "$PORT"; then
        log "running (pid ${pid:-?}), STOMP on 127.0.0.1:$PORT answers"
        return 0
    fi
    if pid_alive "$pid"; then
        log "starting or unresponsive (pid $pid), STOMP on 127.0.0.1:$PORT does not answer"
        return 1
    fi
    log "stopped (STOMP port 127.0.0.1:$PORT)"
    return 3
}

broker_main() {
    parse_args "$@"
    case $CMD in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_restart ;;
    status) cmd_status ;;
    kill) cmd_kill ;;
    purge) cmd_purge ;;
    reset) cmd_reset ;;
    *) usage >&2; die "unknown command: $CMD" ;;
    esac
}
