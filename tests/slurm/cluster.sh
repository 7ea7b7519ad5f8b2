#!/usr/bin/env bash
# cluster.sh: a real Slurm cluster on this machine, one node or several, for spar's tests
# and for trying `spar submit` (DESIGN.md 5). Needs root, munge and slurm-wlm.
#
#   cluster.sh up [--cpus N] [--nodes M]
#       writes $SPAR_SLURM_STATE/slurm.conf (default state /run/spar-slurm), starts
#       munged (unless one runs), slurmctld and one slurmd per node, and waits until
#       every node is idle. Each node offers N CPUs (default 8, more than this machine's
#       cores: the partitions oversubscribe). Clients find the cluster through SLURM_CONF:
#         export SLURM_CONF=/run/spar-slurm/slurm.conf
#       --nodes 1 (the default): node `hostname -s`, partitions `debug` (the default)
#       and `memory` both on it.
#       --nodes M (2 to 8): nodes spar-n1..spar-nM. Node spar-n1 is this host (its
#       slurmd, `slurmd -N spar-n1`, in this network namespace, reached at 10.78.0.1 on
#       the bridge spar-sbr0, where slurmctld listens too); node spar-nI (I >= 2) is a
#       slurmd in the network namespace spar-slurm-nI at 10.78.0.(10+I), joined to the
#       bridge by a veth, with its own UTS namespace whose hostname is spar-nI where
#       `unshare` exists. Partition `debug` is spar-n1 alone, `memory` spar-n2..spar-nM,
#       so the two components of a heterogeneous job land on different nodes. Munge is
#       shared through its unix socket; each slurmd has its own spool, pid, log and
#       TmpFS ($state/slurmd-NODE*, $state/tmp-NODE).
#       Node 1 is named spar-n1, not after the host, because Slurm 22.05's mpi/pmix takes
#       a node's name as the Nth name of the step's sorted node list, N being the node's
#       index in the step, and a heterogeneous step numbers its nodes component by
#       component: component 0's nodes must sort first, or the PMIx servers address
#       each other wrongly ("Cannot establish direct connection to ...").
#   cluster.sh down     stops what `up` started (the slurmds, their job steps,
#                       slurmctld, munged if `up` started it, the namespaces, veths and
#                       bridge) and removes the state
#   cluster.sh status   sinfo of the cluster, or "down"
#
# Exit codes: 0 ok, 1 failure, 2 bad usage, 77 this machine cannot do it (not root, no
# Slurm or munge, no network namespaces for --nodes 2+, or the daemons do not come up);
# the reason is printed.
set -euo pipefail

state="${SPAR_SLURM_STATE:-/run/spar-slurm}"
conf="$state/slurm.conf"
node="$(hostname -s)"
nnodes=1 # set by `up --nodes`

# The names and addresses of the extra nodes (distinct from tests/netns/hosts.sh's, so
# both can be up at once).
readonly NS_PREFIX=spar-slurm-n
readonly HOST_PREFIX=spar-n
readonly BRIDGE=spar-sbr0
readonly NET=10.78.0
readonly ROOT_DEV_PREFIX=spar-sv
readonly NS_DEV=spar0
readonly MAX_NODES=8

say() { echo "cluster.sh: $*" >&2; }
cannot() {
    say "cannot: $*"
    exit 77
}

need_tools() {
    [ "$(id -u)" = 0 ] || cannot "needs root (it starts slurmctld, slurmd and munged)"
    for t in slurmctld slurmd munged munge unmunge sinfo sbatch srun; do
        command -v "$t" >/dev/null || cannot "'$t' not found (apt-get install slurm-wlm munge)"
    done
}

# Node I's Slurm name, host name, namespace (I >= 2) and address.
node_name() { if [ "$nnodes" -eq 1 ]; then echo "$node"; else echo "$HOST_PREFIX$1"; fi; }
node_host() { if [ "$1" -eq 1 ]; then echo "$node"; else node_name "$1"; fi; }
node_ns() { echo "$NS_PREFIX$1"; }
node_addr() { if [ "$1" -eq 1 ]; then echo "$NET.1"; else echo "$NET.$((10 + $1))"; fi; }

# The lines of slurm.conf that name the controller, the nodes and the partitions.
conf_nodes() {
    local cpus=$1 nodes=$2 i others=""
    if [ "$nodes" -eq 1 ]; then
        cat <<EOF
SlurmctldHost=$node
NodeName=$node CPUs=$cpus RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
PartitionName=memory Nodes=ALL Default=NO MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
        return
    fi
    echo "SlurmctldHost=$node($NET.1)"
    for ((i = 1; i <= nodes; i++)); do
        echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") NodeHostname=$(node_host "$i")" \
            "CPUs=$cpus RealMemory=1024 State=UNKNOWN"
        [ "$i" -eq 1 ] || others="$others${others:+,}$(node_name "$i")"
    done
    cat <<EOF
PartitionName=debug Nodes=$(node_name 1) Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
PartitionName=memory Nodes=$others Default=NO MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
}

write_conf() {
    local cpus="$1" nodes="$2"
    mkdir -p "$state/ctld"
    cat >"$conf" <<EOF
# test cluster ($nodes node(s)) written by tests/slurm/cluster.sh
ClusterName=spar-test
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
# only the backfill scheduler starts heterogeneous jobs: every second, not every 30 s
SchedulerParameters=bf_interval=1
MinJobAge=300
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd-%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd-%n.log
# also where srun's PMIx plugin makes each step's client directory, whose name has the
# job and step but not the node: nodes that share /tmp must not share it
TmpFS=$state/tmp-%n
$(conf_nodes "$cpus" "$nodes")
EOF
}

munge_answers() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_answers; then return; fi
    pkill -x munged 2>/dev/null && sleep 0.5 # one that is stopping, or broken
    [ -s /etc/munge/munge.key ] || cannot "no /etc/munge/munge.key (munge not set up)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- munged || cannot "munged did not start"
    else
        munged --force || cannot "munged did not start"
    fi
    touch "$state/munged.ours"
    for _ in $(seq 1 40); do
        munge_answers && return
        sleep 0.25
    done
    cannot "munged started but does not answer"
}

# The bridge, and for nodes 2..M a namespace with a veth into it. The namespaces get a
# default route through the bridge, so that every address of this host (where srun may
# listen) is reachable from them. A failure here leaves cleaning to `down`.
make_network() {
    local nodes=$1 i ns dev err
    command -v ip >/dev/null || cannot "--nodes $nodes needs the ip command (iproute2)"
    err=$(ip netns list 2>&1 >/dev/null) || cannot "'ip netns' is not available: $err"
    err=$(ip link add "$BRIDGE" type bridge 2>&1) || cannot "no bridge $BRIDGE: $err"
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((i = 2; i <= nodes; i++)); do
        ns=$(node_ns "$i") dev=$ROOT_DEV_PREFIX$i
        err=$(ip netns add "$ns" 2>&1) || cannot "no network namespace $ns: $err"
        err=$(ip link add "$dev" type veth peer name "$NS_DEV" netns "$ns" 2>&1) ||
            cannot "no veth pair into $ns: $err"
        ip link set "$dev" master "$BRIDGE"
        ip link set "$dev" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev "$NS_DEV"
        ip -n "$ns" link set "$NS_DEV" up
        ip -n "$ns" route add default via "$NET.1"
    done
    # slurmctld must be reachable from every namespace: a TCP connect to a closed port
    # of the bridge answers "refused" when the path works.
    for ((i = 2; i <= nodes; i++)); do
        err=$(ip netns exec "$(node_ns "$i")" timeout 3 bash -c "exec 3<>/dev/tcp/$NET.1/9" 2>&1) ||
            case $err in *refused*) ;; *) cannot "$(node_ns "$i") cannot reach $NET.1: $err" ;; esac
    done
}

# Starts the slurmd of node I: node 1 here, the others inside their namespaces (with
# their own hostname where `unshare` exists, so that jobs see the node's name).
# `ip netns exec` mounts the namespace's own /sys (UCX finds the node's network devices
# there), which lacks the cgroup file systems: slurmd does not start without a file
# system on /sys/fs/cgroup, and with cgroup v1 it wants the hierarchies it finds here
# (a bind of this host's /sys/fs/cgroup is refused across mount namespaces, so a tmpfs
# and the same cgroup hierarchies are mounted again; the kernel shares them).
start_slurmd() {
    local i=$1 name uts=()
    name=$(node_name "$i")
    mkdir -p "$state/slurmd-$name" "$state/tmp-$name"
    if [ "$i" -eq 1 ]; then
        timeout 30 slurmd -f "$conf" -N "$name" && return
    else
        command -v unshare >/dev/null && uts=(unshare --uts)
        # shellcheck disable=SC2016 # expanded by the inner bash
        timeout 30 ip netns exec "$(node_ns "$i")" "${uts[@]}" bash -c '
            mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup || exit 1
            while read -r _ dir type opts _; do
                mkdir -p "$dir" && mount -t "$type" -o "$opts" "$type" "$dir" || exit 1
            done <"$4"
            [ -z "$3" ] || hostname "$1" || exit 1
            exec slurmd -f "$2" -N "$1"' slurmd "$name" "$conf" "${uts[*]}" "$state/cgroups" && return
    fi
    cannot "slurmd of $name did not start (see $state/slurmd-$name.log)"
}

wait_idle() {
    local nodes=$1 st=""
    for _ in $(seq 1 60); do
        st="$(SLURM_CONF="$conf" sinfo -h -N -o '%N %T' 2>/dev/null || true)"
        # one line per node and partition
        if [ "$(echo "$st" | awk '$2 ~ /^(idle|mixed|allocated)/ {print $1}' | sort -u | wc -l)" -ge "$nodes" ]; then
            return 0
        fi
        sleep 0.5
    done
    say "not every node became idle; last states: $(echo "${st:-none}" | tr '\n' ' '). Logs:"
    tail -n 20 "$state"/*.log >&2 2>/dev/null || true
    return 1
}

# EXIT trap of `up`: on failure stop what was started (the exit status is kept).
undo_up() {
    local rc=$?
    [ "$rc" -eq 0 ] || down >/dev/null 2>&1 || true
    exit "$rc"
}

up() {
    local cpus=8 i
    while [ $# -gt 0 ]; do
        case "$1" in
        --cpus | --nodes) [ $# -ge 2 ] || { say "$1 needs a value"; exit 2; } ;;&
        --cpus) cpus="$2"; shift 2 ;;
        --nodes) nnodes="$2"; shift 2 ;;
        *) say "unknown option '$1' (allowed: --cpus N, --nodes M)"; exit 2 ;;
        esac
    done
    [[ $cpus =~ ^[1-9][0-9]*$ ]] || { say "--cpus '$cpus' is not a positive number"; exit 2; }
    if ! [[ $nnodes =~ ^[1-9][0-9]*$ ]] || [ "$nnodes" -gt "$MAX_NODES" ]; then
        say "--nodes '$nnodes' is not a number from 1 to $MAX_NODES"
        exit 2
    fi
    need_tools
    down >/dev/null 2>&1 || true
    # From here a failure (or a `cannot`) removes whatever was started.
    trap undo_up EXIT
    mkdir -p "$state"
    write_conf "$cpus" "$nnodes"
    start_munge
    if [ "$nnodes" -gt 1 ]; then
        make_network "$nnodes"
        awk '$2 ~ "^/sys/fs/cgroup/" && ($3 == "cgroup" || $3 == "cgroup2")' /proc/self/mounts >"$state/cgroups"
    fi
    timeout 30 slurmctld -f "$conf" || cannot "slurmctld did not start (see $state/slurmctld.log)"
    for ((i = 1; i <= nnodes; i++)); do start_slurmd "$i"; done
    wait_idle "$nnodes" || exit 77
    trap - EXIT
    say "up: $nnodes node(s) from $node, $cpus CPUs each, partitions debug and memory;" \
        "export SLURM_CONF=$conf"
}

# The slurmstepd processes of this cluster's slurmds (not those of another Slurm on the
# machine: each keeps its node's log file, under $state, open), and every process under
# them (batch scripts, sruns, tasks), one a line.
our_steps() {
    local p fd
    for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
        for fd in "/proc/$p/fd"/*; do
            case $(readlink "$fd" 2>/dev/null) in "$state"/*) descendants "$p"; break ;; esac
        done
    done
}
descendants() {
    local p
    for p in "$@"; do
        echo "$p"
        # shellcheck disable=SC2046 # one pid a word
        descendants $(pgrep -P "$p" 2>/dev/null || true)
    done
}

# Ends the processes left in the namespaces, then removes them, the veths and the bridge.
remove_network() {
    local ns pids dev
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS_PREFIX}[0-9]+\$" || true); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        # shellcheck disable=SC2086 # one pid a word
        [ -z "$pids" ] || { kill -KILL $pids 2>/dev/null || true; sleep 0.2; }
        ip netns del "$ns" 2>/dev/null || say "warning: could not delete namespace $ns"
    done
    for dev in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' |
        grep -E "^${ROOT_DEV_PREFIX}[0-9]+\$" || true); do
        ip link del "$dev" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE" 2>/dev/null || say "warning: could not delete bridge $BRIDGE"
    fi
}

down() {
    [ -d "$state" ] || { say "down: nothing to do"; return 0; }
    local f steps
    # Job steps outlive their slurmd: they and their tasks are ended first (a parent
    # before its children are listed would leave them to init).
    steps=$(our_steps)
    # shellcheck disable=SC2086 # one pid a word
    [ -z "$steps" ] || kill -KILL $steps 2>/dev/null || true
    for f in "$state"/slurmd-*.pid "$state/slurmctld.pid"; do
        if [ -s "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; fi
    done
    for _ in $(seq 1 20); do
        pgrep -f "slurm(ctld|d) -f $conf" >/dev/null || break
        sleep 0.25
    done
    pkill -9 -f "slurm(ctld|d) -f $conf" 2>/dev/null || true
    steps=$(our_steps) # any a slurmd started meanwhile
    # shellcheck disable=SC2086
    [ -z "$steps" ] || kill -KILL $steps 2>/dev/null || true
    if command -v ip >/dev/null; then remove_network; fi
    if [ -e "$state/munged.ours" ]; then pkill -x munged 2>/dev/null || true; fi
    rm -rf "$state"
    say "down: stopped"
}

status() {
    if [ -f "$conf" ]; then SLURM_CONF="$conf" sinfo; else echo down; fi
}

case "${1:-}" in
up) shift; up "$@" ;;
down) down ;;
status) status ;;
*) say "usage: cluster.sh up [--cpus N] [--nodes M] | down | status"; exit 2 ;;
esac
