#!/usr/bin/env bash
# hosts.sh: several test hosts on one machine, for running spar (or any MPI program)
# across real network links without a cluster (DESIGN.md 5). Needs root.
#
#   hosts.sh up N [--rate 1gbit|10gbit|RATE|none] [--delay 1ms|none]
#       N network namespaces spar-h1..spar-hN. Each has loopback up and one veth, named
#       spar0 inside the namespace and spar-vI in the root namespace, where it is a port
#       of the bridge spar-br0 (10.77.0.1/24). Host I has 10.77.0.(10+I)/24 on spar0.
#       --rate shapes what each host sends (tc tbf on its spar0); --delay adds a one-way
#       delay to it (tc netem: needs a kernel with CONFIG_NET_SCH_NETEM). Leftovers of an
#       earlier `up` are removed first. Writes, under $SPAR_NETNS_STATE (default
#       /run/spar-netns):
#         hostfile    one address per host, for mpirun --hostfile (addresses, not names:
#                     /etc/hosts is never touched)
#         hosts       /etc/hosts-style lines "ADDRESS NAMESPACE SHORTNAME"
#         rsh-agent   Open MPI's launch agent: rsh-agent HOST CMD... runs CMD with
#                     `ip netns exec NAMESPACE bash -c` (and, where `unshare` exists, in
#                     its own UTS namespace whose hostname is the namespace name, so MPI
#                     and spar's records see hosts spar-h1..spar-hN)
#   hosts.sh run NP -- [MPIRUN-OPTIONS...] PROGRAM [ARGS...]
#       mpirun (MPIEXEC, else mpirun on PATH) from the root namespace, NP ranks
#       round-robin over the hosts (--map-by node), every rank inside its host's
#       namespace, all MPI traffic over the veths. Exits with mpirun's status.
#       SPAR_NETNS_VERBOSE=1 prints the command line on stderr first.
#   hosts.sh exec HOST CMD [ARGS...]   run one command inside a host (h2, spar-h2, 10.77.0.12)
#   hosts.sh cut HOST | heal HOST      take a host's link down (its veth in the root
#                                      namespace) / bring it up again. Traffic to a cut
#                                      host stops: a job using it hangs, and mpirun
#                                      waits for ever for a daemon on a cut host.
#   hosts.sh status                    what is up
#   hosts.sh down                      remove everything (idempotent)
#
# up, down, cut and heal take an exclusive lock (flock on $SPAR_NETNS_LOCK, default
# /run/spar-netns.lock; they wait up to 120 s) because the names are fixed and one
# machine may have several users. A caller that needs the hosts for longer (a test: up,
# runs, down) takes the same lock itself, on a descriptor its MPI jobs do not inherit,
# and sets SPAR_NETNS_LOCK_HELD=1.
#
# Exit codes: 0 ok, 1 failure, 2 bad usage, 77 this machine cannot do it (not root, no
# `ip netns`, no veth/bridge/tc support, no mpirun); the reason is printed.
#
# How `run` keeps the MPI traffic on the veths. The namespaces share one kernel, one
# /dev/shm, one PID space and one boot id; newer UCX versions decide "same host" from
# the boot id and IPC namespace and may use shared memory (or cma, or 127.0.0.1)
# between "hosts". UCX 1.13 tells them apart by MAC address (checked: with UCX's
# defaults the traffic still crossed the veths), but nothing is left to that:
#   UCX_TLS=tcp,self UCX_NET_DEVICES=spar0                  the UCX PML (spar's default)
#   --mca btl tcp,self --mca btl_tcp_if_include 10.77.0.0/24 the ob1 PML
#   --mca oob_tcp_if_include 10.77.0.0/24                    mpirun <-> daemons, over the bridge
#   --mca plm_rsh_agent STATE/rsh-agent --mca plm_rsh_no_tree_spawn 1
#   --bind-to none                       each daemon would otherwise bind its ranks from core 0
# SPAR_NETNS_UCX_TLS, SPAR_NETNS_UCX_DEVICES and SPAR_NETNS_BTL replace these values
# (rather than a second --mca btl among MPIRUN-OPTIONS).
# Open MPI may print "plm:rsh: Warning: setpgid(...) failed in parent with
# errno=Permission denied(13)": a harmless race in mpirun (the agent had already exec'd).
set -euo pipefail

readonly NS_PREFIX=spar-h
readonly BRIDGE=spar-br0
readonly NET=10.77.0
readonly CIDR=10.77.0.0/24
readonly NS_DEV=spar0
readonly ROOT_DEV_PREFIX=spar-v
readonly MAX_HOSTS=200
STATE=${SPAR_NETNS_STATE:-/run/spar-netns}
LOCK=${SPAR_NETNS_LOCK:-/run/spar-netns.lock}

PROG=$(basename "$0")
say() { echo "$PROG: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}
skip() {
    say "cannot run here: $*"
    exit 77
}
help_text() { sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; }
usage() {
    cat >&2 <<EOF
usage: $PROG up N [--rate RATE|none] [--delay TIME|none]
       $PROG run NP -- [MPIRUN-OPTIONS...] PROGRAM [ARGS...]
       $PROG exec HOST CMD... | cut HOST | heal HOST | status | down | --help
EOF
    exit 2
}

need_root_and_netns() {
    [ "$(id -u)" -eq 0 ] || skip "needs root (network namespaces, veths and a bridge); uid is $(id -u)"
    command -v ip >/dev/null 2>&1 || skip "the ip command (iproute2) is not installed"
    local err
    err=$(ip netns list 2>&1 >/dev/null) || skip "'ip netns' is not available: ${err:-ip netns list failed}"
}

# Serialises the commands that change the hosts (see the top). The lock goes with the
# process: it ends when hosts.sh exits.
take_lock() {
    [ "${SPAR_NETNS_LOCK_HELD:-0}" != 1 ] || return 0
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>>"$LOCK"
    if ! flock -w 120 9; then
        die "another user of these hosts has held $LOCK for 120 s (a test running, or a hung hosts.sh?)"
    fi
}

ns_of_index() { echo "$NS_PREFIX$1"; }
addr_of_index() { echo "$NET.$((10 + $1))"; }

# The spar namespaces that exist now, one a line, in order.
existing_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS_PREFIX}[0-9]+\$" | sort -V || true
}

# The root-namespace ends of our veths, one a line.
existing_root_devs() {
    ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' |
        grep -E "^${ROOT_DEV_PREFIX}[0-9]+\$" || true
}

# HOST as h2, spar-h2, 2 or 10.77.0.12 -> the index 2 (of a host that exists).
host_index() {
    local h=$1 i=""
    case $h in
    "$NS_PREFIX"[0-9]*) i=${h#"$NS_PREFIX"} ;;
    h[0-9]*) i=${h#h} ;;
    "$NET".[0-9]*) i=${h#"$NET".} && [[ $i =~ ^[0-9]+$ ]] && i=$((i - 10)) ;;
    [0-9]*) i=$h ;;
    esac
    if ! [[ $i =~ ^[0-9]+$ ]] || [ "$i" -lt 1 ]; then
        die "unknown host '$h' (use h2, spar-h2 or $NET.12)"
    fi
    existing_namespaces | grep -qx "$(ns_of_index "$i")" ||
        die "host '$h' ($(ns_of_index "$i")) does not exist; run '$PROG up N' first"
    echo "$i"
}

# ---------------------------------------------------------------------------- down
# Removes every namespace, veth and bridge of ours (whatever N made them) and the state
# folder. Processes still inside a namespace (daemons and ranks of an interrupted
# mpirun) are ended first: they would keep the namespace and its veth alive.
cmd_down() {
    local quiet=${1:-} ns dev pids removed=0 i
    for ns in $(existing_namespaces); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            [ -n "$quiet" ] || say "ending processes left in $ns: $(echo "$pids" | tr '\n' ' ')"
            # shellcheck disable=SC2086 # one pid a word
            kill -TERM $pids 2>/dev/null || true
            for ((i = 0; i < 20; i++)); do
                pids=$(ip netns pids "$ns" 2>/dev/null || true)
                [ -z "$pids" ] && break
                sleep 0.1
            done
            # shellcheck disable=SC2086
            [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$ns" 2>/dev/null || say "warning: could not delete namespace $ns"
        removed=$((removed + 1))
    done
    for dev in $(existing_root_devs); do
        ip link del "$dev" 2>/dev/null || true
        removed=$((removed + 1))
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE" 2>/dev/null || say "warning: could not delete bridge $BRIDGE"
        removed=$((removed + 1))
    fi
    if [ -d "$STATE" ]; then
        rm -rf "$STATE"
        removed=$((removed + 1))
    fi
    if [ -z "$quiet" ]; then
        if [ "$removed" -eq 0 ]; then say "down: nothing to remove"; else say "down: removed everything"; fi
    fi
}

# ---------------------------------------------------------------------------- up
# tc rate text -> bytes per second (for the tbf burst): 100mbit, 1gbit, 10gbit, 500kbit,
# 1000000bit, 125mbps (tc's units; bps = bytes per second).
rate_bytes_per_s() {
    local r=${1,,} num unit
    [[ $r =~ ^([0-9]+)([a-z]*)$ ]] || return 1
    num=${BASH_REMATCH[1]} unit=${BASH_REMATCH[2]}
    case $unit in
    bit | "") echo $((num / 8)) ;;
    kbit) echo $((num * 1000 / 8)) ;;
    mbit) echo $((num * 1000000 / 8)) ;;
    gbit) echo $((num * 1000000000 / 8)) ;;
    bps) echo "$num" ;;
    kbps) echo $((num * 1000)) ;;
    mbps) echo $((num * 1000000)) ;;
    gbps) echo $((num * 1000000000)) ;;
    *) return 1 ;;
    esac
}

# Shapes what host I sends: netem delay (root qdisc) and/or tbf rate (under it).
shape_host() {
    local i=$1 rate=$2 delay=$3 ns bps burst err
    local parent=(root)
    ns=$(ns_of_index "$i")
    if [ "$delay" != none ]; then
        if ! err=$(ip netns exec "$ns" tc qdisc add dev "$NS_DEV" root handle 1: netem delay "$delay" 2>&1); then
            skip "tc netem (for --delay $delay) does not work here: $err (a kernel without CONFIG_NET_SCH_NETEM?)"
        fi
        parent=(parent 1:1)
    fi
    if [ "$rate" != none ]; then
        bps=$(rate_bytes_per_s "$rate")
        # A burst of 1 ms of traffic, at least 64 KiB (veths hand tbf 64 KiB GSO packets).
        burst=$((bps / 1000))
        [ "$burst" -ge 65536 ] || burst=65536
        if ! err=$(ip netns exec "$ns" tc qdisc add dev "$NS_DEV" "${parent[@]}" handle 10: \
            tbf rate "$rate" burst "$burst" latency 50ms 2>&1); then
            skip "tc tbf (for --rate $rate) does not work here: $err (a kernel without CONFIG_NET_SCH_TBF?)"
        fi
    fi
}

# Can host I reach ADDRESS? A TCP connect to a closed port: "refused" means the packet
# got there and an answer came back; a timeout or "no route" means it did not.
reachable() {
    local i=$1 addr=$2 out
    out=$(ip netns exec "$(ns_of_index "$i")" timeout 3 bash -c "exec 3<>/dev/tcp/$addr/9" 2>&1) && return 0
    case $out in *"refused"*) return 0 ;; esac
    return 1
}

# The launch agent Open MPI calls as: rsh-agent [OPTIONS] HOST COMMAND... (COMMAND is
# one shell command line in pieces, as for ssh). HOST is an address or a name of the
# hosts file.
write_agent() {
    local hostnames=$1 run_line
    if [ "$hostnames" = 1 ]; then
        # shellcheck disable=SC2016 # expanded by the agent
        run_line='exec ip netns exec "$ns" unshare --uts bash -c '\''hostname "$1" && exec bash -c "$2"'\'' rsh-agent "$ns" "$*"'
    else
        # shellcheck disable=SC2016
        run_line='exec ip netns exec "$ns" bash -c "$*"'
    fi
    cat >"$STATE/rsh-agent" <<EOF
#!/usr/bin/env bash
# Open MPI launch agent written by $PROG up: rsh-agent [OPTIONS] HOST COMMAND...
# runs COMMAND (one shell line, as ssh would) inside HOST's network namespace.
set -euo pipefail
while [ \$# -gt 0 ] && [ "\${1#-}" != "\$1" ]; do shift; done
[ \$# -ge 2 ] || { echo "rsh-agent: usage: rsh-agent HOST COMMAND..." >&2; exit 255; }
host=\$1
shift
ns=\$(awk -v h="\$host" '(\$1 == h || \$2 == h || \$3 == h) && \$2 != "$BRIDGE" { print \$2; exit }' "$STATE/hosts")
[ -n "\$ns" ] || { echo "rsh-agent: unknown host '\$host' (not in $STATE/hosts)" >&2; exit 255; }
$run_line
EOF
    chmod 755 "$STATE/rsh-agent"
}

# EXIT trap of `up`: on failure remove what was made (the exit status is kept).
undo_up() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        say "up: failed (exit $rc), removing what was made"
        cmd_down quiet
    fi
}

cmd_up() {
    local n=${1:-} rate=none delay=none hostnames=1 i ns dev addr err
    if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt "$MAX_HOSTS" ]; then
        say "up: N must be a number from 1 to $MAX_HOSTS (got '$n')"
        usage
    fi
    shift
    while [ $# -gt 0 ]; do
        case $1 in
        --rate) [ $# -ge 2 ] || die "up: --rate needs a value"; rate=$2; shift 2 ;;
        --rate=*) rate=${1#*=}; shift ;;
        --delay) [ $# -ge 2 ] || die "up: --delay needs a value"; delay=$2; shift 2 ;;
        --delay=*) delay=${1#*=}; shift ;;
        *) say "up: unknown option '$1'"; usage ;;
        esac
    done
    [ "$rate" = none ] || rate_bytes_per_s "$rate" >/dev/null ||
        die "up: --rate '$rate' is not a rate (1gbit, 10gbit, 100mbit or none)"
    [ "$delay" = none ] || [[ $delay =~ ^[0-9]+(\.[0-9]+)?(us|usec|ms|msec|s|sec)$ ]] ||
        die "up: --delay '$delay' is not a time (1ms, 100us or none)"
    need_root_and_netns
    if [ "$rate" != none ] || [ "$delay" != none ]; then
        command -v tc >/dev/null 2>&1 || skip "tc (iproute2) is not installed; it is needed for --rate/--delay"
    fi
    command -v unshare >/dev/null 2>&1 || hostnames=0

    take_lock
    cmd_down quiet
    # From here a failure (or a skip) removes whatever was made.
    trap undo_up EXIT

    err=$(ip link add "$BRIDGE" type bridge 2>&1) || skip "cannot create a bridge: $err"
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up

    for ((i = 1; i <= n; i++)); do
        ns=$(ns_of_index "$i") dev=$ROOT_DEV_PREFIX$i addr=$(addr_of_index "$i")
        err=$(ip netns add "$ns" 2>&1) || skip "cannot create network namespace $ns: $err"
        err=$(ip link add "$dev" type veth peer name "$NS_DEV" netns "$ns" 2>&1) ||
            skip "cannot create a veth pair: $err"
        ip link set "$dev" master "$BRIDGE"
        ip link set "$dev" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$addr/24" dev "$NS_DEV"
        ip -n "$ns" link set "$NS_DEV" up
        shape_host "$i" "$rate" "$delay"
    done

    mkdir -p "$STATE"
    : >"$STATE/hostfile"
    : >"$STATE/hosts"
    for ((i = 1; i <= n; i++)); do
        addr=$(addr_of_index "$i")
        echo "$addr slots=1" >>"$STATE/hostfile"
        echo "$addr $(ns_of_index "$i") h$i" >>"$STATE/hosts"
    done
    echo "$NET.1 $BRIDGE" >>"$STATE/hosts"
    printf 'hosts=%s\nrate=%s\ndelay=%s\nhostnames=%s\n' "$n" "$rate" "$delay" "$hostnames" >"$STATE/config"
    write_agent "$hostnames"

    # Every host must reach the bridge address (where mpirun listens) and host 1 every
    # other host.
    local bad=()
    for ((i = 1; i <= n; i++)); do
        reachable "$i" "$NET.1" || bad+=("$(ns_of_index "$i") -> $NET.1")
        [ "$i" -eq 1 ] || reachable 1 "$(addr_of_index "$i")" ||
            bad+=("$(ns_of_index 1) -> $(addr_of_index "$i")")
    done
    if [ ${#bad[@]} -gt 0 ]; then
        say "no connectivity: ${bad[*]}"
        if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo 0)" = 1 ]; then
            say "bridged traffic passes the host firewall (net.bridge.bridge-nf-call-iptables=1):" \
                "a FORWARD rule or policy (docker sets DROP) may drop it"
        fi
        die "up: the hosts cannot reach each other"
    fi
    trap - EXIT
    say "up: $n hosts ${NS_PREFIX}1..$NS_PREFIX$n on $CIDR (bridge $BRIDGE $NET.1)," \
        "rate $rate, delay $delay$([ "$hostnames" = 1 ] || echo ", one hostname (no unshare)"); state in $STATE"
}

# ---------------------------------------------------------------------------- run
cmd_run() {
    local np=${1:-} mpirun n i
    if ! [[ $np =~ ^[0-9]+$ ]] || [ "$np" -lt 1 ]; then
        say "run: NP must be a number >= 1 (got '$np')"
        usage
    fi
    shift
    [ "${1:-}" != "--" ] || shift
    [ $# -ge 1 ] || { say "run: nothing to run"; usage; }
    need_root_and_netns
    if [ ! -f "$STATE/hostfile" ] || [ ! -x "$STATE/rsh-agent" ]; then
        die "run: no hosts are up; run '$PROG up N' first"
    fi
    mpirun=${MPIEXEC:-mpirun}
    command -v "$mpirun" >/dev/null 2>&1 || skip "mpirun ('$mpirun') not found; set MPIEXEC"

    # A cut host that gets ranks never starts its daemon: mpirun would wait for ever.
    n=$(wc -l <"$STATE/hostfile")
    for ((i = 1; i <= n && i <= np; i++)); do
        if ! ip -o link show "$ROOT_DEV_PREFIX$i" 2>/dev/null | grep -q 'state UP'; then
            say "warning: $(ns_of_index "$i") is cut ($ROOT_DEV_PREFIX$i is down): mpirun will wait for its daemon"
        fi
    done

    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    export UCX_TLS=${SPAR_NETNS_UCX_TLS:-tcp,self}
    export UCX_NET_DEVICES=${SPAR_NETNS_UCX_DEVICES:-$NS_DEV}
    local args=(
        -np "$np" --hostfile "$STATE/hostfile" --map-by node --oversubscribe --bind-to none
        --mca plm_rsh_agent "$STATE/rsh-agent" --mca plm_rsh_no_tree_spawn 1
        --mca oob_tcp_if_include "$CIDR" --mca btl_tcp_if_include "$CIDR"
        --mca btl "${SPAR_NETNS_BTL:-tcp,self}"
        -x UCX_TLS -x UCX_NET_DEVICES
    )
    if [ "${SPAR_NETNS_VERBOSE:-0}" = 1 ]; then
        say "UCX_TLS=$UCX_TLS UCX_NET_DEVICES=$UCX_NET_DEVICES $mpirun ${args[*]} $*"
    fi
    exec "$mpirun" "${args[@]}" "$@"
}

# ---------------------------------------------------------------------------- others
cmd_exec() {
    [ $# -ge 2 ] || { say "exec: needs HOST COMMAND [ARGS...]"; usage; }
    need_root_and_netns
    local i ns
    i=$(host_index "$1")
    ns=$(ns_of_index "$i")
    shift
    if [ "$(sed -n 's/^hostnames=//p' "$STATE/config" 2>/dev/null)" = 1 ]; then
        # shellcheck disable=SC2016 # expanded by the inner bash
        exec ip netns exec "$ns" unshare --uts bash -c 'hostname "$1" && shift && exec "$@"' exec "$ns" "$@"
    fi
    exec ip netns exec "$ns" "$@"
}

cmd_link() {
    local state=$1 what i
    what=$([ "$state" = down ] && echo cut || echo heal)
    [ $# -eq 2 ] || { say "$what: needs HOST"; usage; }
    need_root_and_netns
    take_lock
    i=$(host_index "$2")
    ip link set "$ROOT_DEV_PREFIX$i" "$state"
    if [ "$state" = down ]; then
        say "cut: $(ns_of_index "$i") ($(addr_of_index "$i")) is off the bridge ($ROOT_DEV_PREFIX$i down)"
    else
        say "heal: $(ns_of_index "$i") ($(addr_of_index "$i")) is back on the bridge"
    fi
}

cmd_status() {
    need_root_and_netns
    local ns i link
    if [ -f "$STATE/config" ]; then
        echo "# $STATE: $(tr '\n' ' ' <"$STATE/config")"
    else
        echo "# no state folder ($STATE)"
    fi
    for ns in $(existing_namespaces); do
        i=${ns#"$NS_PREFIX"}
        link="cut"
        ip -o link show "$ROOT_DEV_PREFIX$i" 2>/dev/null | grep -q 'state UP' && link=up
        printf '%-10s %-16s link %-4s %s\n' "$ns" \
            "$(ip -n "$ns" -o -4 addr show dev "$NS_DEV" 2>/dev/null | awk '{print $4}')" "$link" \
            "$(ip netns exec "$ns" tc qdisc show dev "$NS_DEV" 2>/dev/null | tr '\n' ';')"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        echo "$BRIDGE $(ip -o -4 addr show dev "$BRIDGE" | awk '{print $4}')"
    fi
}

case ${1:-} in
up) shift; cmd_up "$@" ;;
down)
    [ $# -eq 1 ] || usage
    need_root_and_netns
    take_lock
    cmd_down
    ;;
run) shift; cmd_run "$@" ;;
exec) shift; cmd_exec "$@" ;;
cut) shift; cmd_link down "$@" ;;
heal) shift; cmd_link up "$@" ;;
status) cmd_status ;;
-h | --help | help) help_text ;;
*) usage ;;
esac
