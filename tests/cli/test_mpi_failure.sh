#!/usr/bin/env bash
# shellcheck disable=SC2317 # the case functions are called through case_run
# test_mpi_failure.sh: a failure inside MPI on one rank stops the whole job promptly,
# with a non-zero status and a message naming the failing rank and MPI call.
# SPAR_TEST_FAULT=ring:R makes rank R's ring send go to an invalid peer.
set -u
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

# Long enough (a second or more of ring steps) that the other ranks are mid-run.
ARGS=(run --set sequence.length=3000)
LIMIT=30

# Runs the job with the fault on rank $1 and checks how it ends.
fault_on_rank() {
    local bad=$1 np=$2 rc start elapsed
    LAST_COMMAND="SPAR_TEST_FAULT=ring:$bad $MPIEXEC -np $np --oversubscribe $SPAR ${ARGS[*]}"
    start=$(date +%s)
    SPAR_TEST_FAULT=ring:$bad timeout -k 5 "$LIMIT" "$MPIEXEC" -np "$np" --oversubscribe \
        "$SPAR" "${ARGS[@]}" >"$OUT" 2>&1 </dev/null
    rc=$?
    elapsed=$(($(date +%s) - start))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        show_output
        fail "the job did not end within $LIMIT s after rank $bad failed (a hang)"
    fi
    [ "$rc" -ne 0 ] || { show_output; fail "$MPIEXEC exited 0 although rank $bad failed"; }
    grep -q "rank $bad\b" "$OUT" || { show_output; fail "the output does not name rank $bad"; }
    grep -q "MPI_Isend" "$OUT" || { show_output; fail "the output does not name MPI_Isend"; }
    grep -Eq "rank $bad\b.*MPI_Isend" "$OUT" ||
        { show_output; fail "no line says that rank $bad failed in MPI_Isend"; }
    if grep -E "rank [0-9]+\b.*MPI_Isend" "$OUT" | grep -Evq "rank $bad\b"; then
        show_output
        fail "another rank than $bad is blamed for MPI_Isend"
    fi
    expect_no_match '^# method'
    echo "# rank $bad fault: $MPIEXEC exited $rc after ${elapsed} s" >&2
}

t_fault_rank1() { fault_on_rank 1 3; }
t_fault_rank0() { fault_on_rank 0 3; }
t_fault_rank1_np2() { fault_on_rank 1 2; }

t_no_fault() {
    unset SPAR_TEST_FAULT
    SPAR_TEST_TIMEOUT=$LIMIT
    expect_exit 0 3 '^# method' -- "${ARGS[@]}"
    expect_no_match 'MPI_Isend|(^|\] )error: '
}

t_fault_other_rank_absent() {
    # A fault on a rank the job does not have changes nothing.
    export SPAR_TEST_FAULT=ring:7
    SPAR_TEST_TIMEOUT=$LIMIT
    expect_exit 0 3 '^# method' -- "${ARGS[@]}"
}

# A disk that fills while outputs are written: the first file fails, the job still ends
# promptly on every rank (rank 0 drains the later files), exit 1, and nothing half-written
# is left under any name. Needs root for a small tmpfs.
t_disk_full_outputs() {
    local small="$TMP/small"
    mkdir -p "$small"
    if [ "$(id -u)" -ne 0 ] || ! mount -t tmpfs -o size=64k tmpfs "$small" 2>/dev/null; then
        echo "# skipped: mounting a small tmpfs needs root" >&2
        return 0
    fi
    SPAR_TEST_TIMEOUT=$LIMIT
    expect_exit 1 3 "writing '$small/o\.npy'.*No space left on device" -- \
        run --set sequence.length=3000 --set attention.heads=4 --set attention.head_dim=8 \
        --set run.backward=true --set output.o="$small/o.npy" --set output.dq="$TMP/dq.npy"
    local left
    left=$(ls -A "$small")
    umount "$small"
    [ -z "$left" ] || fail "files left in the full directory: $left"
}

case_run "disk full while writing outputs: prompt exit 1 on every rank, nothing half-written" t_disk_full_outputs
case_run "SPAR_TEST_FAULT=ring:1 at -np 3: job ends within ${LIMIT} s, non-zero, names rank 1 and MPI_Isend" t_fault_rank1
case_run "SPAR_TEST_FAULT=ring:0 at -np 3: names rank 0" t_fault_rank0
case_run "SPAR_TEST_FAULT=ring:1 at -np 2: names rank 1" t_fault_rank1_np2
case_run "the same command without the fault passes (exit 0 on every rank)" t_no_fault
case_run "SPAR_TEST_FAULT naming a rank outside the job: passes" t_fault_other_rank_absent
finish
