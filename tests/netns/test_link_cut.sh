#!/usr/bin/env bash
# test_link_cut.sh: a host's network link cut mid-run stops the job within about
# comm.timeout, with a message naming the peer that was waited for, instead of a hang.
#
# Three hosts made by hosts.sh (network namespaces on a bridge), one rank each (rank r
# on spar-h(r+1)); a ring run with the backward pass and comm.timeout=3. When rank 0
# reports the first backward step, spar-h2's veth goes down (ip link set ... down). Then:
#   - every spar rank, on every host, is gone within comm.timeout + 7 s of the cut;
#   - the output names rank 1 and its host spar-h2 as the peer that did not answer;
#   - mpirun ends non-zero. Open MPI's mpirun waits for its daemon on the cut host to
#     confirm the end, which it cannot do while the link is down: the link is healed
#     once the ranks are gone, and mpirun must then end within 90 s;
#   - no process of the job is left (ranks, daemons) in any host.
# Measured times are printed as "# ..." lines. Needs root; exits 77 with the reason where
# it cannot run. Environment (ctest sets them): SPAR, MPIEXEC.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOSTS="$HERE/hosts.sh"
NP=3
TIMEOUT=3
CUT_INDEX=2 # spar-h2, where rank 1 runs
STATE=${SPAR_NETNS_STATE:-/run/spar-netns}

# shellcheck source=lib.sh
. "$HERE/lib.sh" # skip(); exits 77 where this machine cannot run it; sets MPIEXEC, SPAR

# The hosts' names are fixed and this machine may have other users: hold hosts.sh's lock
# from up to down, on a descriptor the MPI job does not inherit (see test_hosts.sh).
LOCK=${SPAR_NETNS_LOCK:-/run/spar-netns.lock}
if command -v flock >/dev/null 2>&1; then
    exec 9>>"$LOCK"
    flock -w 200 9 || skip "the test hosts are in use: $LOCK has been held for 200 s"
    export SPAR_NETNS_LOCK_HELD=1
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/spar-linkcut.XXXXXX")
LOG="$TMP/job.log"
JOB_PID=""
cleanup() {
    local rc=$? left
    trap - EXIT
    ip link set "spar-v$CUT_INDEX" up 2>/dev/null
    left=$(pgrep -f -- "$TMP/" || true)
    # shellcheck disable=SC2086 # one pid a word
    [ -z "$left" ] || kill -KILL $left 2>/dev/null
    bash "$HOSTS" down >/dev/null 2>&1 || echo "# warning: '$HOSTS down' failed; run it by hand"
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

FAILED=0
ok() { echo "ok - $*"; }
not_ok() {
    echo "not ok - $*"
    FAILED=$((FAILED + 1))
}
show_log() {
    echo "#   --- $LOG (last 30 lines, settings left out)"
    grep -v '^#   [a-z_]*\.[a-z_]* *= ' "$LOG" | tail -n 30 | sed 's/^/#   | /'
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# spar ranks still alive in any of the hosts (pids, one a line).
ranks_alive() {
    local i p
    for ((i = 1; i <= NP; i++)); do
        for p in $(ip netns pids "spar-h$i" 2>/dev/null); do
            [ "$(cat "/proc/$p/comm" 2>/dev/null)" = spar ] && echo "$p"
        done
    done
    return 0
}

# Waits up to $1 seconds for CONDITION (a command) to succeed; returns its status.
wait_until() {
    local limit=$1 i
    shift
    for ((i = 0; i < limit * 10; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    "$@"
}
no_ranks() { [ -z "$(ranks_alive)" ]; }
job_ended() { ! kill -0 "$JOB_PID" 2>/dev/null; }
mid_backward() { grep -q 'progress: .*ring backward step 1/' "$LOG"; }
hosts_empty() {
    local i
    for ((i = 1; i <= NP; i++)); do
        [ -z "$(ip netns pids "spar-h$i" 2>/dev/null)" ] || return 1
    done
}

# ---------------------------------------------------------------------------- hosts
rc=0
bash "$HOSTS" up "$NP" --rate none >"$TMP/up.log" 2>&1 || rc=$?
if [ "$rc" -eq 77 ]; then
    skip "$(grep -m1 'cannot run here' "$TMP/up.log" || tail -n 1 "$TMP/up.log")"
elif [ "$rc" -ne 0 ]; then
    echo "not ok - hosts.sh up $NP (exit $rc)"
    sed 's/^/#   | /' "$TMP/up.log"
    exit 1
fi
PEER_HOST=spar-h$CUT_INDEX
[ "$(sed -n 's/^hostnames=//p' "$STATE/config")" = 1 ] || PEER_HOST=$(hostname)
echo "# hosts.sh up $NP: spar-h1..spar-h$NP; rank r on spar-h(r+1); cutting $PEER_HOST (rank 1)"

# ---------------------------------------------------------------------------- the job
bash "$HOSTS" run "$NP" -- "$SPAR" run --set parallel.method=ring \
    --set sequence.length=12000 --set run.backward=true --set run.progress=lines \
    --set comm.timeout=$TIMEOUT --set output.results="$TMP/results.jsonl" \
    >"$LOG" 2>&1 </dev/null 9>&- &
JOB_PID=$!
if ! wait_until 90 mid_backward; then
    not_ok "the job reached its backward pass within 90 s"
    show_log
    exit 1
fi

CUT_AT=$(now)
ip link set "spar-v$CUT_INDEX" down
if wait_until $((TIMEOUT + 7)) no_ranks; then
    RANKS_GONE=$(since "$CUT_AT")
    ok "every rank on every host ended ${RANKS_GONE} s after the cut (comm.timeout=$TIMEOUT)"
else
    not_ok "ranks still alive $((TIMEOUT + 7)) s after the cut: $(ranks_alive | tr '\n' ' ')"
    show_log
fi

WANT="no answer from rank 1 for $TIMEOUT.0 s \(comm.timeout\).*\(host $PEER_HOST\)"
if grep -Eq "$WANT" "$LOG"; then
    ok "the output names the peer waited for: $(grep -Eo 'rank [0-9]+/[^]]*\] error: no answer from rank 1 for' "$LOG" | head -n 1) ... (host $PEER_HOST)"
else
    not_ok "no error names rank 1 on $PEER_HOST (wanted /$WANT/)"
    show_log
fi

# mpirun waits for the daemon on the cut host: heal the link and let it finish.
WAITING=no
job_ended || WAITING=yes
HEALED_AT=$(now)
ip link set "spar-v$CUT_INDEX" up
if wait_until 90 job_ended; then
    wait "$JOB_PID"
    JOB_RC=$?
    AFTER_HEAL=$(since "$HEALED_AT")
    if [ "$JOB_RC" -ne 0 ]; then
        ok "mpirun exited $JOB_RC (still waiting for the cut host's daemon at the heal:" \
            "$WAITING; ended ${AFTER_HEAL} s after it)"
    else
        not_ok "mpirun exited 0 after a cut link"
        show_log
    fi
else
    not_ok "mpirun did not end within 90 s of healing the link"
    show_log
fi

if wait_until 10 hosts_empty && [ -z "$(pgrep -f -- "$TMP/results.jsonl" || true)" ]; then
    ok "no process of the job is left on any host"
else
    for ((i = 1; i <= NP; i++)); do
        for p in $(ip netns pids "spar-h$i" 2>/dev/null); do
            echo "#   left in spar-h$i: $(ps -o pid=,args= -p "$p" | cut -c1-100)"
        done
    done
    not_ok "processes of the job were left behind"
fi

echo "# measured: ranks gone ${RANKS_GONE:-never} s after the cut (comm.timeout=$TIMEOUT);" \
    "mpirun ended ${AFTER_HEAL:-never} s after the heal; total ${SECONDS} s"
[ "$FAILED" -eq 0 ]
