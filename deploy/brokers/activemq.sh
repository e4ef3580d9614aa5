#!/usr/bin/env bash
#
# activemq.sh -- install, start, stop, check and crash an ActiveMQ 5 broker
# (Debian package) with a STOMP connector, for vmcontroller's tests and CI.
# Loopback only.
#
#   activemq.sh {install|start|stop|restart|status|kill|purge} [--instance NAME] [--port PORT]
#
# (`--help` explains the commands; exit codes: 0 ok, 1 failure; `status`
# exits 0 running, 1 starting/unresponsive, 3 stopped.)
#
# Instance "main" (default) is Debian's instance "main": config in
# /etc/activemq/instances-available/main (linked into instances-enabled),
# data (KahaDB) in /var/lib/activemq/main/data, pid in /run/activemq/main.pid,
# so /etc/init.d/activemq status|stop understand it too. STOMP on
# 127.0.0.1:61614, OpenWire on 127.0.0.1:61616, nothing else.
#
# A named instance is its own JVM with conf, data and logs under
# $VMC_BROKER_STATE/activemq-NAME/ (default /var/tmp/vmc-brokers): STOMP on
# 127.0.0.1:PORT and no other listener. Its data survives stop/restart/kill.
#
# No authentication plugin is configured: any login/passcode is accepted
# (guest/guest included). JMX and the web console are off. Brokers run as the
# "activemq" user and are stopped with SIGTERM (the JVM shutdown hook stops the
# broker cleanly). Heap: VMC_ACTIVEMQ_HEAP (default 512m main, 256m named).
set -euo pipefail

BROKER=activemq
SERVER_TAG=ActiveMQ
DEFAULT_PORT=61614
PACKAGES=(activemq)

AMQ_USER=activemq
AMQ_HOME=/usr/share/activemq
AMQ_DEBIAN_CONF=/etc/activemq/instances-available/main

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Where everything of $INSTANCE lives.
amq_layout() {
    if [[ $INSTANCE == main ]]; then
        CONF_DIR=$AMQ_DEBIAN_CONF
        BASE=/var/lib/activemq/main
        PID_FILE=/run/activemq/main.pid
        BROKER_NAME=localhost
        HEAP=${VMC_ACTIVEMQ_HEAP:-512m}
    else
        CONF_DIR=$STATE_DIR/conf
        BASE=$STATE_DIR
        PID_FILE=$STATE_DIR/activemq.pid
        BROKER_NAME=vmc-$INSTANCE
        HEAP=${VMC_ACTIVEMQ_HEAP:-256m}
    fi
    DATA=$BASE/data
    TMP=$BASE/tmp
}

b_installed() {
    [[ -r $AMQ_HOME/bin/activemq.jar && -d $AMQ_DEBIAN_CONF ]] &&
        command -v java >/dev/null && pkg_installed activemq
}

# activemq.xml for $INSTANCE on $PORT.
amq_xml() {
    local openwire=
    if [[ $INSTANCE == main ]]; then
        openwire='<transportConnector name="openwire" uri="tcp://127.0.0.1:61616"/>'
    fi
    cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Managed by vmcontroller deploy/brokers/activemq.sh (instance $INSTANCE);
     rewritten on every start. Loopback only. -->
<beans
  xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
  http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">

    <!-- Allows \${activemq.data} etc. below. -->
    <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>

    <broker xmlns="http://activemq.apache.org/schema/core"
            brokerName="$BROKER_NAME"
            useJmx="false"
            persistent="true"
            useShutdownHook="true"
            dataDirectory="\${activemq.data}">

        <!-- Persistent messages (STOMP header persistent:true) are journalled
             to KahaDB, synced to disk, and survive stop, restart and SIGKILL. -->
        <persistenceAdapter>
            <kahaDB directory="\${activemq.data}/kahadb" journalDiskSyncStrategy="always"/>
        </persistenceAdapter>

        <systemUsage>
            <systemUsage>
                <memoryUsage><memoryUsage percentOfJvmHeap="70"/></memoryUsage>
                <storeUsage><storeUsage limit="8 gb"/></storeUsage>
                <tempUsage><tempUsage limit="2 gb"/></tempUsage>
            </systemUsage>
        </systemUsage>

        <!-- Without tcpNoDelay every STOMP exchange stalls ~45 ms (Nagle). ActiveMQ's
             default fixed 64 KiB socket buffers (no kernel autotuning) stalled a host
             agent's connection for 30-120 s in about one fan-out to 1,000 guests of
             three: a full buffer blocks a dispatch write, which holds the connection's
             lock, so the broker stops reading that connection; 1 MiB absorbs the burst
             (4 MiB did too, but slowed downloads through ActiveMQ by about a third). -->
        <transportConnectors>
            <transportConnector name="stomp" uri="stomp://127.0.0.1:$PORT?transport.tcpNoDelay=true&amp;transport.socketBufferSize=1048576"/>
            $openwire
        </transportConnectors>
    </broker>
</beans>
EOF
}

# Debian's ActiveMQ logs through log4j 1.2 (slf4j-log4j12), which ignores the
# shipped log4j2.properties: give it a log4j.properties (found on the conf
# classpath) writing ${activemq.data}/activemq.log.
amq_log4j() {
    cat <<'EOF'
# Managed by vmcontroller deploy/brokers/activemq.sh; rewritten on every start.
log4j.rootLogger=INFO, console, logfile
log4j.logger.org.apache.activemq.spring=WARN
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=%5p | %m%n
log4j.appender.logfile=org.apache.log4j.RollingFileAppender
log4j.appender.logfile.file=${activemq.data}/activemq.log
log4j.appender.logfile.maxFileSize=1024KB
log4j.appender.logfile.maxBackupIndex=5
log4j.appender.logfile.append=true
log4j.appender.logfile.layout=org.apache.log4j.PatternLayout
log4j.appender.logfile.layout.ConversionPattern=%d | %-5p | %m | %c | %t%n
EOF
}

b_configure() {
    amq_layout
    mkdir -p "$CONF_DIR" "$DATA" "$TMP"
    if [[ $INSTANCE == main ]]; then
        # Keep Debian's original next to ours, once.
        [[ -e $CONF_DIR/activemq.xml.debian || ! -e $CONF_DIR/activemq.xml ]] ||
            cp -p "$CONF_DIR/activemq.xml" "$CONF_DIR/activemq.xml.debian"
        mkdir -p /etc/activemq/instances-enabled
        ln -sfn ../instances-available/main /etc/activemq/instances-enabled/main
        mkdir -p "$(dirname "$PID_FILE")"
    fi
    amq_xml >"$CONF_DIR/activemq.xml.new"
    mv "$CONF_DIR/activemq.xml.new" "$CONF_DIR/activemq.xml"
    amq_log4j >"$CONF_DIR/log4j.properties"
    chmod 644 "$CONF_DIR/activemq.xml" "$CONF_DIR/log4j.properties"
    if [[ $EUID -eq 0 ]]; then
        chown "$AMQ_USER:$AMQ_USER" "$BASE" "$DATA" "$TMP"
        [[ $INSTANCE == main ]] && chown "$AMQ_USER" "$(dirname "$PID_FILE")"
    fi
    return 0
}

b_launch() {
    amq_layout
    rm -f "$PID_FILE"
    # The JVM arguments /usr/bin/activemq uses on Java > 8, plus a small heap
    # and options that make the JVM start faster.
    local jvm=(
        -Xms64m "-Xmx$HEAP" -XX:+UseSerialGC -XX:TieredStopAtLevel=1
        -XX:-UsePerfData -Xshare:auto
        -Djava.net.preferIPv4Stack=true # plain 127.0.0.1 sockets, no IPv6
        -Djava.awt.headless=true "-Djava.io.tmpdir=$TMP"
        --add-reads=java.xml=java.logging
        --add-opens java.base/java.security=ALL-UNNAMED
        --add-opens java.base/java.net=ALL-UNNAMED
        --add-opens java.base/java.lang=ALL-UNNAMED
        --add-opens java.base/java.util=ALL-UNNAMED
        --add-opens java.naming/javax.naming.spi=ALL-UNNAMED
        --add-opens java.rmi/sun.rmi.transport.tcp=ALL-UNNAMED
        --add-opens java.base/java.util.concurrent=ALL-UNNAMED
        --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED
        --add-exports=java.base/sun.net.www.protocol.http=ALL-UNNAMED
        --add-exports=java.base/sun.net.www.protocol.https=ALL-UNNAMED
        --add-exports=java.base/sun.net.www.protocol.jar=ALL-UNNAMED
        --add-exports=jdk.xml.dom/org.w3c.dom.html=ALL-UNNAMED
        --add-exports=jdk.naming.rmi/com.sun.jndi.url.rmi=ALL-UNNAMED
        "-Dactivemq.classpath=$CONF_DIR"
        "-Dactivemq.home=$AMQ_HOME"
        "-Dactivemq.base=$BASE"
        "-Dactivemq.conf=$CONF_DIR"
        "-Dactivemq.data=$DATA"
        -jar "$AMQ_HOME/bin/activemq.jar" start "xbean:file:$CONF_DIR/activemq.xml"
    )
    as_user "$AMQ_USER"
    local pid
    pid=$(spawn "$BASE" "$CONSOLE_LOG" "${AS_USER[@]}" env -i "${CLEAN_ENV[@]}" HOME="$BASE" java "${jvm[@]}")
    echo "$pid" >"$PID_FILE"
    echo "$pid"
}

# The broker's JVM (from the pid file, checked against its command line).
b_pid() {
    amq_layout
    local pid=
    [[ -r $PID_FILE ]] && pid=$(<"$PID_FILE")
    if pid_matches "$pid" "-Dactivemq.base=$BASE "; then echo "$pid"; fi
}

b_ports() {
    if [[ $INSTANCE == main ]]; then echo "61616 OpenWire"; fi
}

b_logs() {
    amq_layout
    printf '%s\n' "$CONSOLE_LOG" "$DATA/activemq.log"
}

# KahaDB (queues, messages) and the broker's scratch files.
b_data_dirs() {
    amq_layout
    printf '%s\n' "$DATA/kahadb" "$TMP"
}

broker_main "$@"
