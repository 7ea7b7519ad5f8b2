# lib.sh: helpers shared by the spar command-line tests (sourced, not run).
#
# Environment (set by ctest, see tests/CMakeLists.txt): SPAR (the program), MPIEXEC
# (mpirun), PYTHON3 (with numpy), SPAR_SOURCE_DIR (the source tree).
#
#   case_run NAME FUNCTION [ARGS...]   run one case in a subshell; prints "ok - NAME" or
#                                      "not ok - NAME" with the reason
#   fail MESSAGE...                    inside a case: print what failed, exit 1
#   expect_exit CODE NP REGEX -- ARGS...
#                                      run `spar ARGS...` on NP ranks (NP=0: no mpirun);
#                                      every rank must exit CODE, within the time limit,
#                                      and the output (stdout+stderr) must match REGEX
#                                      (grep -E). The output stays in $OUT.
#   finish                             exit 0 when every case passed, else 1
#
# Set SPAR_TEST_TIMEOUT (seconds, default 60) before expect_exit for another limit.
set -u

if [ -z "${MPIEXEC:-}" ]; then
    echo "skip: MPIEXEC is not set (run these tests through ctest -L cli)" >&2
    exit 77
fi
if [ -z "${SPAR:-}" ] || [ ! -x "$SPAR" ]; then
    echo "error: SPAR must name the spar program (got '${SPAR:-}')" >&2
    exit 1
fi
PYTHON3=${PYTHON3:-python3}
SPAR_TEST_TIMEOUT=${SPAR_TEST_TIMEOUT:-60}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/spar-cli.XXXXXX") || exit 1
trap 'rm -rf "$TMP"' EXIT
OUT="$TMP/output.txt"
CASES_FAILED=0
CASES_RUN=0

fail() {
    echo "FAILED: $*" >&2
    exit 1
}

# The last command run by expect_exit, as text, for failure messages.
LAST_COMMAND=""

show_output() {
    echo "--- command: $LAST_COMMAND" >&2
    echo "--- output (last 40 lines):" >&2
    tail -n 40 "$OUT" >&2
    echo "---" >&2
}

# Runs spar on NP ranks (0 = directly); output to $OUT; returns the launcher's status.
# Each rank prints "spar-exit rank=R code=C", then waits until every rank has printed its
# line before it exits with spar's own code: mpirun stops the job at the first non-zero
# exit, and would otherwise kill ranks before they report. odls_base_sigkill_timeout=0
# only shortens mpirun's wait before it kills the remaining processes (1-2 s a case).
run_spar() {
    local np=$1 sync
    shift
    if [ "$np" -eq 0 ]; then
        LAST_COMMAND="$SPAR $*"
        timeout -k 5 "$SPAR_TEST_TIMEOUT" "$SPAR" "$@" >"$OUT" 2>&1 </dev/null
        return
    fi
    LAST_COMMAND="$MPIEXEC -np $np --oversubscribe $SPAR $*"
    sync=$(mktemp -d "$TMP/sync.XXXXXX")
    # shellcheck disable=SC2016 # expanded by the inner sh
    OMPI_MCA_odls_base_sigkill_timeout=0 \
    timeout -k 5 "$SPAR_TEST_TIMEOUT" "$MPIEXEC" -np "$np" --oversubscribe sh -c '
        sync=$1 np=$2 bin=$3; shift 3
        "$bin" "$@"; c=$?
        r=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-x}}
        echo "spar-exit rank=$r code=$c"
        : >"$sync/rank.$r"
        i=0
        while [ "$(ls "$sync" | wc -l)" -lt "$np" ] && [ $i -lt 200 ]; do
            sleep 0.05; i=$((i + 1))
        done
        exit $c' sh "$sync" "$np" "$SPAR" "$@" >"$OUT" 2>&1 </dev/null
}

expect_exit() {
    [ $# -ge 3 ] || fail "expect_exit needs CODE NP REGEX -- ARGS"
    local code=$1 np=$2 regex=$3 rc
    shift 3
    [ "${1:-}" = "--" ] && shift
    run_spar "$np" "$@"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        show_output
        fail "did not finish within ${SPAR_TEST_TIMEOUT} s (a hang)"
    fi
    if [ "$np" -eq 0 ]; then
        if [ "$rc" -ne "$code" ]; then
            show_output
            fail "exit code $rc, expected $code"
        fi
    else
        local r seen
        for ((r = 0; r < np; r++)); do
            seen=$(grep -Eo "spar-exit rank=$r code=[0-9]+" "$OUT" | sed 's/.*code=//')
            if [ -z "$seen" ]; then
                show_output
                fail "rank $r did not report an exit code (killed?), expected $code"
            fi
            if [ "$seen" != "$code" ]; then
                show_output
                fail "rank $r exited with $seen, expected $code on every rank"
            fi
        done
        if [ "$rc" -ne "$code" ]; then
            show_output
            fail "every rank exited $code but $MPIEXEC exited $rc"
        fi
    fi
    if ! grep -Eq -- "$regex" "$OUT"; then
        show_output
        fail "output does not match /$regex/"
    fi
    return 0
}

# The output of the last expect_exit must not match REGEX.
expect_no_match() {
    if grep -Eq -- "$1" "$OUT"; then
        show_output
        fail "output unexpectedly matches /$1/"
    fi
}

case_run() {
    local name=$1
    shift
    CASES_RUN=$((CASES_RUN + 1))
    if ("$@"); then
        echo "ok - $name"
    else
        echo "not ok - $name"
        CASES_FAILED=$((CASES_FAILED + 1))
    fi
}

finish() {
    if [ "$CASES_FAILED" -ne 0 ]; then
        echo "# $CASES_FAILED of $CASES_RUN cases failed"
        exit 1
    fi
    echo "# all $CASES_RUN cases passed"
    exit 0
}

# Writes a float32 C-order .npy of SHAPE (comma-separated) with random normal values:
#   make_npy PATH 64,4,16 [SEED] [EXTRA PYTHON applied to array a before saving]
make_npy() {
    local path=$1 shape=$2 seed=${3:-0} extra=${4:-}
    "$PYTHON3" - "$path" "$shape" "$seed" "$extra" <<'EOF' || fail "numpy could not write $1"
import sys
import numpy as np
path, shape, seed, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
shape = tuple(int(x) for x in shape.split(","))
a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
if extra:
    exec(extra)
np.save(path, a)
EOF
}
