#!/usr/bin/env bash
# run.sh: builds the libFuzzer harnesses (CMake preset "fuzz", build-fuzz/) and runs each
# for SECONDS (default 20), one after another, on a fresh copy of its seed corpus, so that
# tests/ is never written. Prints one line per harness: executions, coverage, corpus size.
# Fails when any harness crashes, leaks, hangs or breaks a property; the input that did
# it is kept under build-fuzz/fuzz-run/TARGET/ and the command to replay it is printed.
#
#   tests/fuzz/run.sh [SECONDS] [TARGET...]     # targets: yaml keys npy plan offload_header jsonl
#   FUZZ_JOBS=1 nice -n 19 tests/fuzz/run.sh 600  # the long run (tests/fuzz/README.md)
#
# Needs clang and libclang-rt-14-dev (Debian 12).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
seconds=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(yaml keys npy plan offload_header jsonl)

cmake --preset fuzz >/dev/null
cmake --build build-fuzz --target fuzz -j2 >/dev/null

export UBSAN_OPTIONS=print_stacktrace=1
failed=0
printf '# %-15s %8s %12s %10s %8s %8s %10s  %s\n' target seconds executions exec/s cov ft corpus \
    result
for t in "${targets[@]}"; do
    bin=build-fuzz/fuzz_$t
    work=build-fuzz/fuzz-run/$t
    rm -rf "$work"
    mkdir -p "$work/corpus" "$work/artifacts"
    cp tests/fuzz/corpus/"$t"/* "$work/corpus/"
    args=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1
          -artifact_prefix="$root/$work/artifacts/")
    [ -f tests/fuzz/"$t".dict ] && args+=(-dict="$root/tests/fuzz/$t.dict")
    # the control-message decoder names each refusal on stderr; libFuzzer's reports stay
    [ "$t" = offload_header ] && args+=(-close_fd_mask=2)
    [ -n "${FUZZ_JOBS:-}" ] && args+=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
    rc=0
    (cd "$work" && "$root/$bin" "${args[@]}" corpus >run.log 2>&1) || rc=$?
    log=$(cat "$work"/run.log) # with -jobs, libFuzzer copies each job's log into its own
    runs=$( (grep -o 'stat::number_of_executed_units: [0-9]*' <<<"$log" || true) |
        awk '{s += $2} END {print s + 0}')
    last=$(grep -E '(DONE|pulse|NEW|REDUCE) +cov:' <<<"$log" | tail -1 || true)
    cov=$(grep -o 'cov: [0-9]*' <<<"$last" | awk '{print $2}' || true)
    ft=$(grep -o 'ft: [0-9]*' <<<"$last" | awk '{print $2}' || true)
    found=$(find "$work/artifacts" -type f | wc -l)
    result=ok
    if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
        result="FAILED (exit $rc, $found input(s) in $work/artifacts)"
        failed=1
    fi
    printf '  %-15s %8s %12s %10s %8s %8s %10s  %s\n' "$t" "$seconds" "$runs" \
        "$((runs / (seconds > 0 ? seconds : 1)))" "${cov:-?}" "${ft:-?}" \
        "$(find "$work/corpus" -type f | wc -l)" "$result"
    if [ "$result" != ok ]; then
        (grep -E 'ERROR|fuzz: property|SUMMARY|deadly signal' <<<"$log" || true) | head -5 |
            sed 's/^/    /'
        for a in "$work"/artifacts/*; do
            [ -f "$a" ] && echo "    replay: $bin $a"
        done
    fi
done
exit "$failed"
