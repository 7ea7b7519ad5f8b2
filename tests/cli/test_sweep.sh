#!/usr/bin/env bash
# shellcheck disable=SC2317 # the case functions are called through case_run
# test_sweep.sh: experiment files as users keep them: `include:` of a base file with
# overrides, `sweep:` grids under `spar run` (one record per point), a restarted sweep
# that skips the points already recorded, SIGTERM leaving whole records and an
# "interrupted" one, and SPAR_LOG.
set -u
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

BASE="$TMP/base.yaml"
cat >"$BASE" <<'EOF'
attention:
  heads: 4
  kv_heads: 2
  head_dim: 16
sequence:
  length: 64
run:
  name: from-base
sweep:
  sequence.length: [40, 48]
EOF

t_include_overrides() {
    cat >"$TMP/top.yaml" <<'EOF'
include: base.yaml
attention:
  head_dim: 24
EOF
    expect_exit 0 0 '^attention\.head_dim +24 +# file$' -- config show "$TMP/top.yaml"
    grep -Eq '^attention\.heads +4 +# included file$' "$OUT" || { show_output; fail "included key lost"; }
    grep -Eq '^run\.name +"from-base" +# included file' "$OUT" ||
        { show_output; fail "included run.name lost"; }
    # --set wins over both files
    expect_exit 0 0 '^attention\.heads +8 +# --set' -- config show "$TMP/top.yaml" --set attention.heads=8
}

t_include_must_be_first() {
    cat >"$TMP/late.yaml" <<'EOF'
attention:
  heads: 2
include: base.yaml
EOF
    expect_exit 2 0 'late\.yaml:3: include: must be the first key' -- config check "$TMP/late.yaml"
}

t_include_cycle_and_missing() {
    echo 'include: self.yaml' >"$TMP/self.yaml"
    expect_exit 2 0 'include: files nested deeper than 8 \(a cycle\?\)' -- \
        config check "$TMP/self.yaml"
    echo 'include: nowhere.yaml' >"$TMP/missing.yaml"
    expect_exit 2 0 "cannot open experiment file '.*nowhere\.yaml'.*included from .*missing\.yaml:1" -- \
        config check "$TMP/missing.yaml"
}

t_sweep_replaces_included_list() {
    cat >"$TMP/grid.yaml" <<'EOF'
include: base.yaml
sweep:
  sequence.length: [56]
  attention.causal: [true, false]
EOF
    local res="$TMP/grid.jsonl"
    expect_exit 0 2 '# point 2/2' -- run "$TMP/grid.yaml" --set output.results="$res"
    [ "$(wc -l <"$res")" -eq 2 ] || fail "expected 2 records, got $(wc -l <"$res")"
    "$PYTHON3" - "$res" <<'EOF' || fail "records of the grid are wrong"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
got = sorted((r["settings"]["sequence.length"], r["settings"]["attention.causal"]) for r in recs)
assert got == [(56, False), (56, True)], got
assert all(r["record"] == "run" and r["points"] == 2 and len(r["point_id"]) == 16 for r in recs)
assert len({r["point_id"] for r in recs}) == 2
EOF
}

t_sweep_restart_skips_done() {
    local res="$TMP/restart.jsonl"
    expect_exit 0 2 '# point 2/2' -- run "$BASE" --set output.results="$res"
    [ "$(wc -l <"$res")" -eq 2 ] || fail "first run: expected 2 records"
    # drop the last record, as if the job had been stopped during point 2
    head -n 1 "$res" >"$res.tmp" && mv "$res.tmp" "$res"
    expect_exit 0 2 '# point 1/2: already in .*restart\.jsonl \(point_id [0-9a-f]{16}\); skipped' -- \
        run "$BASE" --set output.results="$res"
    [ "$(grep -c '"record":"run"' "$res")" -eq 2 ] || fail "restart: expected 2 records in all"
    grep -q '# point 2/2: already' "$OUT" && fail "point 2 was skipped but had no record"
    # a changed setting is a different point: it runs again
    expect_exit 0 2 '^ring +fwd' -- run "$BASE" --set output.results="$res" --set data.seed=7
    [ "$(grep -c '"record":"run"' "$res")" -eq 4 ] || fail "a changed seed did not run again"
    # run.resume=false runs every point again
    expect_exit 0 2 '# point 2/2: sequence' -- run "$BASE" --set output.results="$res" --set run.resume=false
    [ "$(grep -c '"record":"run"' "$res")" -eq 6 ] || fail "run.resume=false skipped points"
}

t_single_run_always_runs() {
    local res="$TMP/single.jsonl"
    printf 'sequence:\n  length: 40\nattention:\n  heads: 2\n  head_dim: 8\n' >"$TMP/one.yaml"
    expect_exit 0 2 '^ring +fwd' -- run "$TMP/one.yaml" --set output.results="$res"
    expect_exit 0 2 '^ring +fwd' -- run "$TMP/one.yaml" --set output.results="$res"
    [ "$(grep -c '"record":"run"' "$res")" -eq 2 ] || fail "a repeated single run was skipped"
}

t_sigterm_leaves_whole_records() {
    local res="$TMP/term.jsonl"
    # a single run of several seconds (2 ranks, the scalar kernels), stopped in its second
    # ring step
    LAST_COMMAND="mpirun -np 2 spar run (killed with SIGTERM)"
    : >"$OUT" # emptied now: the loop below must not see an earlier case's progress lines
    # SIGTERM goes to mpirun itself, as from a shell or a batch system (under `timeout`,
    # which signals its whole process group, mpirun may kill the ranks first)
    "$MPIEXEC" -np 2 --oversubscribe \
        "$SPAR" run --set sequence.length=6144 --set run.kernel=scalar --set attention.heads=8 \
        --set output.results="$res" >"$OUT" 2>&1 &
    local pid=$! i=0
    (sleep 90 && kill -9 "$pid") >/dev/null 2>&1 &
    local watchdog=$!
    while ! grep -q '^# progress' "$OUT" 2>/dev/null && [ $i -lt 600 ]; do
        sleep 0.1; i=$((i + 1))
    done
    kill -TERM "$pid"
    wait "$pid"
    local rc=$?
    kill "$watchdog" 2>/dev/null
    [ "$rc" -ne 0 ] || { show_output; fail "a terminated job exited 0"; }
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || { show_output; fail "SIGTERM did not stop the job (rc $rc)"; }
    # (the message on stderr may be lost as mpirun exits; the Slurm test checks it in a log)
    "$PYTHON3" - "$res" <<'EOF' || { show_output; fail "results after SIGTERM are not whole records"; }
import json, sys
lines = open(sys.argv[1]).read().splitlines(keepends=True)
assert lines and all(l.endswith("\n") for l in lines), lines
recs = [json.loads(l) for l in lines]
assert recs[-1]["record"] == "interrupted" and recs[-1]["signal"] == "SIGTERM", recs[-1]
assert recs[-1]["settings"]["sequence.length"] == 6144
EOF
}

t_log_levels() {
    SPAR_LOG=loud expect_exit 2 0 "SPAR_LOG='loud' \(allowed: error\|warn\|info\|debug\)" -- --version
    SPAR_LOG=error expect_exit 0 0 'spar ' -- --version
}

case_run "include: base file, overrides, --set on top" t_include_overrides
case_run "include: must be the first key" t_include_must_be_first
case_run "include: cycles and missing files named" t_include_cycle_and_missing
case_run "sweep under run: one record per point; a file's list replaces the base's" \
    t_sweep_replaces_included_list
case_run "sweep restart skips the recorded points; run.resume=false does not" \
    t_sweep_restart_skips_done
case_run "a single experiment runs again whatever the results hold" t_single_run_always_runs
case_run "SIGTERM: whole records and an interrupted record" t_sigterm_leaves_whole_records
case_run "SPAR_LOG levels" t_log_levels
finish
