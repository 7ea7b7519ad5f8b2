#!/usr/bin/env bash
# test_hosts.sh: spar across 4 "hosts" on one machine (network namespaces joined by a
# bridge, made by hosts.sh), one rank per host, so every message crosses a veth.
#
# Checks that the 4 ranks run in 4 namespaces, then for each method (ring, allgather:
# causal softmax; lasp2, lasp1: linear attention, decay 0.9; all with the backward pass,
# N=301, H=4, G=2, d=16, random inputs, run.verify=true):
#   - every rank exits 0 and the run prints '# verify: passed';
#   - spar's record names hosts spar-h1..spar-h4, and each host's veth carried at least
#     the bytes spar counted for the rank on it (the traffic did not bypass the network);
#   - o (and lse, dq, dk, dv) are bit-identical (cmp) to a plain `mpirun -np 4` on one host.
# Plus ring over the ob1 PML (btl tcp) against the same single-host result.
#
# Needs root. Exits 77 with the reason where it cannot run (not root, no `ip netns`, no
# veth/bridge support, no mpirun). Environment (ctest sets them): SPAR, MPIEXEC;
# SPAR_NETNS_TEST_RATE (default 10gbit where tc exists, else none) shapes the links.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOSTS="$HERE/hosts.sh"
NP=4
LIMIT=60 # seconds per mpirun

# shellcheck source=lib.sh
. "$HERE/lib.sh" # skip(); exits 77 where this machine cannot run it; sets MPIEXEC, SPAR
RATE=${SPAR_NETNS_TEST_RATE:-}
if [ -z "$RATE" ]; then
    if command -v tc >/dev/null 2>&1; then RATE=10gbit; else RATE=none; fi
fi

# The namespace names are fixed and this machine may have other users (another ctest,
# someone's hosts.sh): hold hosts.sh's lock from up to down. Descriptor 9 is closed for
# every MPI job, or a lingering daemon would keep the lock.
LOCK=${SPAR_NETNS_LOCK:-/run/spar-netns.lock}
if command -v flock >/dev/null 2>&1; then
    exec 9>>"$LOCK"
    if ! flock -w 200 9; then
        skip "the test hosts are in use: $LOCK has been held by another process for 200 s"
    fi
    export SPAR_NETNS_LOCK_HELD=1
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/spar-netns.XXXXXX")
cleanup() {
    local rc=$?
    trap - EXIT
    bash "$HOSTS" down >/dev/null 2>&1 || echo "# warning: '$HOSTS down' failed; run it by hand"
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

FAILED=0
RUN=0
ok() { echo "ok - $*"; }
not_ok() {
    echo "not ok - $1"
    shift
    local line
    for line in "$@"; do echo "#   $line"; done
    FAILED=$((FAILED + 1))
}
show() { # last lines of a log without spar's settings block, indented
    echo "#   --- $1 (last 25 lines, settings left out)"
    grep -v '^#   [a-z_]*\.[a-z_]* *= ' "$1" | tail -n 25 | sed 's/^/#   | /' || true
}

# ---------------------------------------------------------------------------- hosts
rc=0
bash "$HOSTS" up "$NP" --rate "$RATE" >"$TMP/up.log" 2>&1 || rc=$?
if [ "$rc" -eq 77 ]; then
    skip "$(grep -m1 'cannot run here' "$TMP/up.log" || tail -n 1 "$TMP/up.log")"
elif [ "$rc" -ne 0 ]; then
    echo "not ok - hosts.sh up $NP (exit $rc)"
    show "$TMP/up.log"
    exit 1
fi
ok "hosts.sh up $NP --rate $RATE: $(grep -o 'spar-h1\.\.spar-h[0-9]* on [^ ]*' "$TMP/up.log")"
HOSTNAMES=$(sed -n 's/^hostnames=//p' "${SPAR_NETNS_STATE:-/run/spar-netns}/config")

# ---------------------------------------------------------------------------- placement
RUN=$((RUN + 1))
# shellcheck disable=SC2016 # expanded by each rank's shell
if timeout -k 5 "$LIMIT" bash "$HOSTS" run "$NP" -- bash -c \
    'echo "rank=$OMPI_COMM_WORLD_RANK ns=$(ip netns identify) addr=$(ip -o -4 addr show dev spar0 | awk "{print \$4}")"' \
    >"$TMP/where.log" 2>&1 9>&-; then
    bad=()
    for ((r = 0; r < NP; r++)); do
        want="rank=$r ns=spar-h$((r + 1)) addr=10.77.0.$((11 + r))/24"
        grep -qx "$want" "$TMP/where.log" || bad+=("no line '$want'")
    done
    if [ ${#bad[@]} -eq 0 ]; then
        ok "$NP ranks run in $NP namespaces, rank r on spar-h(r+1) (--map-by node)"
    else
        not_ok "ranks in their namespaces" "${bad[@]}"
        show "$TMP/where.log"
    fi
else
    not_ok "ranks in their namespaces: '$HOSTS run' failed"
    show "$TMP/where.log"
fi

# ---------------------------------------------------------------------------- methods
SHAPE=(--set sequence.length=301 --set attention.heads=4 --set attention.kv_heads=2
    --set attention.head_dim=16 --set attention.causal=true --set run.backward=true
    --set run.verify=true --set data.seed=7)

method_args() { # METHOD -> the spar settings of that case
    case $1 in
    ring | allgather) echo "--set attention.type=softmax --set parallel.method=$1" ;;
    lasp2 | lasp1) echo "--set attention.type=linear --set attention.decay=0.9 --set parallel.method=$1" ;;
    esac
}
outputs_of() { # METHOD -> the outputs it writes
    case $1 in
    ring | allgather) echo "o lse dq dk dv" ;;
    *) echo "o dq dk dv" ;;
    esac
}
output_args() { # DIR PREFIX OUTPUTS... -> --set output.X=DIR/PREFIX-X.npy ...
    local dir=$1 prefix=$2 x
    shift 2
    for x in "$@"; do printf -- '--set output.%s=%s/%s-%s.npy ' "$x" "$dir" "$prefix" "$x"; done
}
veth_bytes() { # bytes each host has sent into the bridge so far, one number a host
    local i
    for ((i = 1; i <= NP; i++)); do cat "/sys/class/net/spar-v$i/statistics/rx_bytes"; done
}
# The bytes spar counted per rank (forward + backward) from its JSON record.
spar_bytes() {
    local f b r
    f=$(grep -o '"forward":{[^}]*"bytes_sent_per_rank":\[[0-9,]*\]' "$1" | sed 's/.*\[//; s/\]//')
    b=$(grep -o '"backward":{[^}]*"bytes_sent_per_rank":\[[0-9,]*\]' "$1" | sed 's/.*\[//; s/\]//')
    [ -n "$f" ] && [ -n "$b" ] || return 1
    IFS=, read -r -a fa <<<"$f"
    IFS=, read -r -a ba <<<"$b"
    for ((r = 0; r < NP; r++)); do echo $((fa[r] + ba[r])); done
}

# Runs spar on the hosts: run_hosts LOG SPAR-ARGS...
run_hosts() {
    local log=$1
    shift
    timeout -k 5 "$LIMIT" bash "$HOSTS" run "$NP" -- "$SPAR" run "$@" >"$log" 2>&1 9>&-
}
# Runs spar on this host alone: run_local LOG SPAR-ARGS...
run_local() {
    local log=$1
    shift
    timeout -k 5 "$LIMIT" "$MPIEXEC" -np "$NP" --oversubscribe "$SPAR" run "$@" >"$log" 2>&1 9>&-
}

# check_run NAME LOG RC: exit 0, verify passed. Prints nothing; returns 1 with reasons
# in the array WHY.
check_run() {
    local log=$2 rc=$3
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        WHY+=("$1: did not finish within $LIMIT s")
    elif [ "$rc" -ne 0 ]; then
        WHY+=("$1: exit $rc, expected 0")
    fi
    grep -q '^# verify: passed' "$log" || WHY+=("$1: no '# verify: passed' line")
}

compare_outputs() { # DIR A B OUTPUTS... -> cmp each pair, reasons into WHY
    local dir=$1 a=$2 b=$3 x
    shift 3
    for x in "$@"; do
        if [ ! -s "$dir/$a-$x.npy" ] || [ ! -s "$dir/$b-$x.npy" ]; then
            WHY+=("$x: $a-$x.npy or $b-$x.npy missing")
        elif ! cmp -s "$dir/$a-$x.npy" "$dir/$b-$x.npy"; then
            WHY+=("$x: $a and $b differ ($(cmp "$dir/$a-$x.npy" "$dir/$b-$x.npy" 2>&1 | head -n 1 || true))")
        fi
    done
}

case_method() {
    local m=$1 extra=() outs before after sent transport rc i hosts
    read -r -a extra <<<"$(method_args "$m")"
    read -r -a outs <<<"$(outputs_of "$m")"
    local out_hosts out_local
    read -r -a out_hosts <<<"$(output_args "$TMP" "hosts-$m" "${outs[@]}")"
    read -r -a out_local <<<"$(output_args "$TMP" "local-$m" "${outs[@]}")"
    WHY=()

    mapfile -t before < <(veth_bytes)
    rc=0
    run_hosts "$TMP/hosts-$m.log" "${SHAPE[@]}" "${extra[@]}" "${out_hosts[@]}" \
        --set output.results="$TMP/hosts-$m.jsonl" --set run.name="netns-$m" || rc=$?
    mapfile -t after < <(veth_bytes)
    check_run "$NP hosts" "$TMP/hosts-$m.log" "$rc"
    transport=$(sed -n 's/^# spar .*transport=//p' "$TMP/hosts-$m.log" | head -n 1)
    if [ "$rc" -eq 0 ]; then
        if [ "$HOSTNAMES" = 1 ]; then
            hosts=$(grep -o '"hosts":\[[^]]*\]' "$TMP/hosts-$m.jsonl" || true)
            [ "$hosts" = '"hosts":["spar-h1","spar-h2","spar-h3","spar-h4"]' ] ||
                WHY+=("record names hosts '${hosts:-none}', expected spar-h1..spar-h4")
        fi
        if mapfile -t sent < <(spar_bytes "$TMP/hosts-$m.jsonl") && [ ${#sent[@]} -eq "$NP" ]; then
            for ((i = 0; i < NP; i++)); do
                if [ $((after[i] - before[i])) -lt "${sent[i]}" ]; then
                    WHY+=("spar-h$((i + 1)) sent $((after[i] - before[i])) bytes over its veth," \
                        "less than the ${sent[i]} spar counted for rank $i: traffic bypassed the network")
                fi
            done
        else
            WHY+=("no bytes_sent_per_rank in the record")
        fi
    fi

    rc=0
    run_local "$TMP/local-$m.log" "${SHAPE[@]}" "${extra[@]}" "${out_local[@]}" || rc=$?
    check_run "one host" "$TMP/local-$m.log" "$rc"
    compare_outputs "$TMP" "hosts-$m" "local-$m" "${outs[@]}"

    if [ ${#WHY[@]} -eq 0 ]; then
        ok "$m on $NP hosts (${transport%% *}): verify passed, veths carried every rank's bytes," \
            "${outs[*]} bit-identical to one host"
    else
        not_ok "$m on $NP hosts" "${WHY[@]}"
        show "$TMP/hosts-$m.log"
        show "$TMP/local-$m.log"
    fi
}

for m in ring allgather lasp2 lasp1; do
    RUN=$((RUN + 1))
    case_method "$m"
done

# ---------------------------------------------------------------------------- ob1
# The same ring run with Open MPI's ob1 PML (btl tcp over the veths) must give the same
# bits as the single-host run above.
RUN=$((RUN + 1))
WHY=()
read -r -a extra <<<"$(method_args ring)"
read -r -a outs <<<"$(outputs_of ring)"
read -r -a out_ob1 <<<"$(output_args "$TMP" "ob1-ring" "${outs[@]}")"
rc=0
run_hosts "$TMP/ob1-ring.log" "${SHAPE[@]}" "${extra[@]}" "${out_ob1[@]}" --set comm.transport=ob1 || rc=$?
check_run "$NP hosts, ob1" "$TMP/ob1-ring.log" "$rc"
grep -q '^# spar .*transport=ob1' "$TMP/ob1-ring.log" || WHY+=("the run did not use ob1")
compare_outputs "$TMP" "ob1-ring" "local-ring" "${outs[@]}"
if [ ${#WHY[@]} -eq 0 ]; then
    ok "ring on $NP hosts over ob1 (btl tcp): verify passed, ${outs[*]} bit-identical to one host"
else
    not_ok "ring on $NP hosts over ob1" "${WHY[@]}"
    show "$TMP/ob1-ring.log"
fi

echo "# $((RUN - FAILED)) of $RUN cases passed in ${SECONDS} s"
[ "$FAILED" -eq 0 ]
