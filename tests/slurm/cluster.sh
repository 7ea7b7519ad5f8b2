#!/usr/bin/env bash
# cluster.sh: a real one-node Slurm cluster on this machine, for spar's tests and for
# trying `spar submit` (DESIGN.md 5). Needs root, munge and slurm-wlm.
#
#   cluster.sh up [--cpus N]   writes $SPAR_SLURM_STATE/slurm.conf (default state
#                              /run/spar-slurm), starts munged (unless one runs),
#                              slurmctld and slurmd, and waits until the node is idle.
#                              The node offers N CPUs (default 8, more than this
#                              machine's cores: partitions `debug`, the default, and
#                              `memory` (the same node, for heterogeneous jobs) oversubscribe).
#                              Clients find the cluster through SLURM_CONF:
#                                export SLURM_CONF=/run/spar-slurm/slurm.conf
#   cluster.sh down            stops what `up` started and removes the state
#   cluster.sh status          sinfo of the cluster, or "down"
#
# Exit codes: 0 ok, 1 failure, 2 bad usage, 77 this machine cannot do it (not root, no
# Slurm or munge, or the daemons do not come up); the reason is printed.
set -euo pipefail

state="${SPAR_SLURM_STATE:-/run/spar-slurm}"
conf="$state/slurm.conf"
node="$(hostname -s)"

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

write_conf() {
    local cpus="$1"
    mkdir -p "$state/ctld" "$state/d"
    cat >"$conf" <<EOF
# one-node test cluster written by tests/slurm/cluster.sh
ClusterName=spar-test
SlurmctldHost=$node
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
MinJobAge=300
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
PartitionName=memory Nodes=ALL Default=NO MaxTime=INFINITE State=UP OverSubscribe=FORCE
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

wait_idle() {
    for _ in $(seq 1 60); do
        local st
        st="$(SLURM_CONF="$conf" sinfo -h -n "$node" -o %T 2>/dev/null || true)"
        case "$st" in idle*|mixed*|allocated*) return 0 ;; esac
        sleep 0.5
    done
    say "the node did not become idle; last state '${st:-none}'. Logs:"
    tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 2>/dev/null || true
    return 1
}

up() {
    local cpus=8
    while [ $# -gt 0 ]; do
        case "$1" in
        --cpus) cpus="$2"; shift 2 ;;
        *) say "unknown option '$1' (allowed: --cpus N)"; exit 2 ;;
        esac
    done
    need_tools
    down >/dev/null 2>&1 || true
    mkdir -p "$state"
    write_conf "$cpus"
    start_munge
    timeout 30 slurmctld -f "$conf" || cannot "slurmctld did not start (see $state/slurmctld.log)"
    timeout 30 slurmd -f "$conf" || cannot "slurmd did not start (see $state/slurmd.log)"
    wait_idle || { down >/dev/null 2>&1 || true; exit 77; }
    say "up: node $node, $cpus CPUs, partition debug; export SLURM_CONF=$conf"
}

down() {
    [ -d "$state" ] || { say "down: nothing to do"; return 0; }
    for d in slurmd slurmctld; do
        if [ -s "$state/$d.pid" ]; then
            kill "$(cat "$state/$d.pid")" 2>/dev/null || true
        fi
    done
    for _ in $(seq 1 20); do
        pgrep -f "slurm(ctld|d) -f $conf" >/dev/null || break
        sleep 0.25
    done
    pkill -9 -f "slurm(ctld|d) -f $conf" 2>/dev/null || true
    pkill -9 -f slurmstepd 2>/dev/null || true
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
*) say "usage: cluster.sh up [--cpus N] | down | status"; exit 2 ;;
esac
