# /etc/vmc/settings.awk: turns `key=value` lines (fw_cfg opt/vmc/<key>, then the
# kernel command line's vmc.<key>=<value>) into the agent's environment,
# `export VMC_<KEY>='<value>'`, a later line winning. A broker given as host:port
# gets the stomp:// scheme. One awk for all keys: forks are slow under TCG.
{
    eq = index($0, "=")
    if (eq < 2) next
    key = substr($0, 1, eq - 1)
    value = substr($0, eq + 1)
    if (key !~ /^[a-z_]+$/) next
    if (key == "broker" && value !~ /:\/\//) value = "stomp://" value
    gsub(/'/, "'\\''", value)
    print "export VMC_" toupper(key) "='" value "'"
}
