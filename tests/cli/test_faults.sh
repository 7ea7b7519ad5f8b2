#!/usr/bin/env bash
# shellcheck disable=SC2317 # the case functions are called through case_run
# test_faults.sh: a job fails fast on faults from outside, with nothing left behind.
#
#   - one rank killed (SIGKILL) mid-run, ring and allgather at -np 3: every other rank is
#     gone within 10 s, mpirun exits non-zero, the output names the lost rank and host
#     (or, when UCX aborted a rank caught mid-transfer with it, that rank: see below);
#   - SIGINT or SIGTERM to mpirun mid-run (Ctrl-C, scancel): every rank stops within a
#     few seconds, non-zero exit (mpirun's 1 today), output.results still parses line by
#     line and holds the "interrupted" record;
#   - one rank stopped (SIGSTOP: a hung peer) with comm.timeout=2: the job ends within
#     about comm.timeout + 2 s, naming the stopped rank and its host.
# After each case no process of the job is left (found by the job's unique scratch path).
# Measured stop times are printed as "# ..." lines.
set -u
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

HOST=$(hostname)
# Long enough to be mid-run for seconds after the first ring step (N^2 work), short
# enough to keep the cases fast when nothing goes wrong.
SHAPE=(--set sequence.length=8000 --set run.backward=true --set run.progress=lines)
JOB_PID=""
MARK=""

# Starts `spar run` on NP ranks in the background (mpirun's pid in JOB_PID); the results
# path is unique to the case and marks its processes.
start_job() {
    local np=$1 name=$2
    shift 2
    MARK="$TMP/$name"
    mkdir -p "$MARK"
    LAST_COMMAND="$MPIEXEC -np $np --oversubscribe $SPAR run ${SHAPE[*]} $* (results in $MARK)"
    : >"$OUT" # now, not when the job starts: the last case's progress lines must not count
    "$MPIEXEC" -np "$np" --oversubscribe "$SPAR" run "${SHAPE[@]}" \
        --set output.results="$MARK/results.jsonl" "$@" >"$OUT" 2>&1 </dev/null &
    JOB_PID=$!
}

# Waits until rank 0 reports the first step of the pass (the job is mid-run).
wait_mid_run() {
    local i
    for ((i = 0; i < 300; i++)); do
        grep -Eq 'progress: .* (step|group) 1/' "$OUT" && return 0
        kill -0 "$JOB_PID" 2>/dev/null || { show_output; fail "the job ended before it was mid-run"; }
        sleep 0.1
    done
    show_output
    fail "no progress line within 30 s"
}

# The pid of rank R of the current job (its environment says which rank it is).
pid_of_rank() {
    local p r
    for p in $(pgrep -f -- "$MARK/results.jsonl"); do
        r=$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p')
        [ "$r" = "$1" ] && { echo "$p"; return 0; }
    done
    return 1
}

now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Waits for mpirun at most LIMIT seconds; sets JOB_RC (124 when it had to be killed).
wait_job() {
    local limit=$1 start i
    start=$(now)
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$JOB_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$JOB_PID" 2>/dev/null; then
        kill -KILL "$JOB_PID" 2>/dev/null
        wait "$JOB_PID" 2>/dev/null
        JOB_RC=124
        return
    fi
    wait "$JOB_PID"
    JOB_RC=$?
}

# No process of the job may be left once mpirun has returned (a second of grace for the
# kernel to reap them); leftovers are killed so that later cases are not disturbed.
expect_nothing_left() {
    local left="" i
    for ((i = 0; i < 10; i++)); do
        left=$(pgrep -f -- "$MARK/results.jsonl" || true)
        [ -z "$left" ] && return 0
        sleep 0.1
    done
    echo "--- left: $(ps -o pid=,stat=,args= -p "$(echo "$left" | paste -sd,)" 2>/dev/null)" >&2
    # shellcheck disable=SC2086 # one pid a word
    kill -CONT $left 2>/dev/null
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null
    fail "processes of the job were left behind"
}

# Kills rank R of a METHOD run mid-run and checks how the job ends.
killed_rank() {
    local method=$1 rank=$2 pid start took
    start_job 3 "kill-$method" --set parallel.method="$method"
    wait_mid_run
    pid=$(pid_of_rank "$rank") || { show_output; fail "no process for rank $rank"; }
    start=$(now)
    kill -KILL "$pid"
    wait_job 10
    took=$(seconds_since "$start")
    [ "$JOB_RC" -ne 124 ] || { show_output; fail "the job did not end within 10 s of the kill"; }
    [ "$JOB_RC" -ne 0 ] || { show_output; fail "$MPIEXEC exited 0 after losing rank $rank"; }
    # mpirun names the first process to end. When the killed rank was in a shared-memory
    # (CMA) transfer with another, UCX aborts that other rank at once (its CMA errors are
    # fatal), and mpirun may name the aborted rank instead: accepted, with the transport's
    # abort in the output to say why.
    grep -Eq "rank $rank\b.*\b(node|host) $HOST\b" "$OUT" ||
        { grep -q "uct_cma" "$OUT" &&
            grep -Eq "rank [0-9]+\b.*\bnode $HOST\b exited on signal 6" "$OUT"; } ||
        { show_output; fail "no line names the lost rank $rank and its host $HOST"; }
    expect_nothing_left
    echo "# $method: rank $rank killed; the job ended after $took s, $MPIEXEC exit $JOB_RC" >&2
}

t_kill_ring() { killed_rank ring 1; }
t_kill_allgather() { killed_rank allgather 2; }

# Every line of the results file is one JSON object; one of them says "interrupted".
check_results() {
    "$PYTHON3" - "$1" <<'EOF' || { show_output; fail "$1: not JSON lines with an interrupted record"; }
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
assert any(r.get("record") == "interrupted" for r in records), "no interrupted record"
EOF
}

# SIGNAL to mpirun mid-run: every rank stops within 5 s.
signalled() {
    local sig=$1 start took
    start_job 3 "sig-$sig" --set parallel.method=ring
    wait_mid_run
    start=$(now)
    kill -"$sig" "$JOB_PID"
    wait_job 5
    took=$(seconds_since "$start")
    [ "$JOB_RC" -ne 124 ] || { show_output; fail "the job did not stop within 5 s of SIG$sig"; }
    [ "$JOB_RC" -ne 0 ] || { show_output; fail "$MPIEXEC exited 0 after SIG$sig"; }
    # rank 0's "spar: terminated" line is not checked: mpirun, ending the job, may drop
    # it; the record its signal handler appends shows that it stopped on the signal.
    check_results "$MARK/results.jsonl"
    expect_nothing_left
    echo "# SIG$sig to $MPIEXEC: stopped after $took s, exit $JOB_RC" >&2
}

t_sigint() { signalled INT; }
t_sigterm() { signalled TERM; }

# Rank 1 stopped (not killed): Open MPI sees nothing wrong; comm.timeout must end it.
t_stalled_rank() {
    local pid start took timeout=2
    start_job 3 stall --set parallel.method=ring --set comm.timeout="$timeout"
    wait_mid_run
    pid=$(pid_of_rank 1) || { show_output; fail "no process for rank 1"; }
    start=$(now)
    kill -STOP "$pid"
    wait_job 20
    took=$(seconds_since "$start")
    kill -CONT "$pid" 2>/dev/null
    [ "$JOB_RC" -ne 124 ] || { show_output; fail "the job did not end within 20 s of the stop"; }
    [ "$JOB_RC" -ne 0 ] || { show_output; fail "$MPIEXEC exited 0 with a stopped rank"; }
    grep -q "no answer from rank 1 for $timeout.0 s (comm.timeout).*(host $HOST)" "$OUT" ||
        { show_output; fail "no error names the stopped rank 1 and its host"; }
    awk -v t="$took" -v lim=$((timeout + 3)) 'BEGIN { exit !(t <= lim) }' ||
        { show_output; fail "the job took $took s to end (comm.timeout=$timeout)"; }
    expect_nothing_left
    echo "# rank 1 stopped: the job ended after $took s (comm.timeout=$timeout), exit $JOB_RC" >&2
}

# A case that failed half-way may leave its job running: end whatever carries $TMP.
run_case() {
    local left
    case_run "$@"
    left=$(pgrep -f -- "$TMP/" || true)
    # shellcheck disable=SC2086 # one pid a word
    [ -z "$left" ] || { kill -CONT $left; kill -KILL $left; } 2>/dev/null
}

run_case "ring -np 3, rank 1 killed mid-run: ended within 10 s, non-zero, names rank and host" t_kill_ring
run_case "allgather -np 3, rank 2 killed mid-run: the same" t_kill_allgather
run_case "SIGINT to mpirun mid-run: every rank stops within 5 s, non-zero, results parse" t_sigint
run_case "SIGTERM to mpirun mid-run: the same" t_sigterm
run_case "rank 1 stopped (SIGSTOP), comm.timeout=2: ended within timeout+3 s, names rank 1" t_stalled_rank
finish
