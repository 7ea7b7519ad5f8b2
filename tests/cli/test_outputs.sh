#!/usr/bin/env bash
# shellcheck disable=SC2317 # the case functions are called through case_run
# test_outputs.sh: what a successful `spar run` leaves behind: o and lse .npy files in
# global token order (the same whatever the partition), a JSON-lines record per run,
# the result table and progress lines; and the help/config texts built from the key table.
set -u
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

N=50 H=4 G=2 D=24
PARTITIONS=(contiguous zigzag stripe)
IN="$TMP/in"
RES="$TMP/res"
mkdir -p "$IN" "$RES"
make_npy "$IN/q.npy" "$N,$H,$D" 11
make_npy "$IN/k.npy" "$N,$G,$D" 12
make_npy "$IN/v.npy" "$N,$G,$D" 13
RESULTS="$RES/results.jsonl"

run_partition() {
    local part=$1
    expect_exit 0 3 '^# method' -- run \
        --set sequence.length="$N" --set attention.heads="$H" --set attention.kv_heads="$G" \
        --set attention.head_dim="$D" --set sequence.partition="$part" \
        --set data.q="$IN/q.npy" --set data.k="$IN/k.npy" --set data.v="$IN/v.npy" \
        --set output.o="$RES/o-$part.npy" --set output.lse="$RES/lse-$part.npy" \
        --set output.results="$RESULTS" --set run.name="cli-$part" --set run.verify=true
    cp "$OUT" "$RES/stdout-$part.txt"
    grep -q '^# progress: ' "$OUT" || { show_output; fail "no '# progress:' line"; }
    grep -Eq '^# method +pass +ranks +N ' "$OUT" || { show_output; fail "no result table header"; }
    grep -Eq "^ring +fwd +3 +$N +$H +$G +$D +$part " "$OUT" ||
        { show_output; fail "no result row for ring, 3 ranks, $part"; }
    grep -q '^# verify: passed' "$OUT" || { show_output; fail "no '# verify: passed' line"; }
    expect_no_match '(^|\] )(error|warning): '
}

t_verify_failure_exit3() {
    # No result can meet a tolerance of 1e-30: verification fails, every rank exits 3.
    expect_exit 3 2 'verification FAILED: relative L2 error .* exceeds run\.verify_tol=1e-30' -- \
        run --set sequence.length="$N" --set attention.heads="$H" --set attention.kv_heads="$G" \
        --set attention.head_dim="$D" --set run.verify=true --set run.verify_tol=1e-30
    grep -q '^# method' "$OUT" || { show_output; fail "no result table before the verdict"; }
}

t_shapes() {
    "$PYTHON3" - "$RES" "$N" "$H" "$D" "${PARTITIONS[@]}" <<'EOF' || fail "output files are wrong"
import sys
import numpy as np
res, n, h, d, parts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
bad = []
for p in parts:
    o = np.load(f"{res}/o-{p}.npy")
    lse = np.load(f"{res}/lse-{p}.npy")
    if o.shape != (n, h, d) or o.dtype != np.float32:
        bad.append(f"o-{p}.npy: shape {o.shape} dtype {o.dtype}, want {(n, h, d)} float32")
    if lse.shape != (n, h) or lse.dtype != np.float32:
        bad.append(f"lse-{p}.npy: shape {lse.shape} dtype {lse.dtype}, want {(n, h)} float32")
    if not (np.isfinite(o).all() and np.isfinite(lse).all()):
        bad.append(f"{p}: non-finite values in o or lse")
for b in bad:
    print(b, file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
}

t_partitions_agree() {
    "$PYTHON3" - "$RES" "${PARTITIONS[@]}" <<'EOF' || fail "partitions disagree"
import sys
import numpy as np
res, parts = sys.argv[1], sys.argv[2:]
o0, l0 = np.load(f"{res}/o-{parts[0]}.npy"), np.load(f"{res}/lse-{parts[0]}.npy")
ok = True
for p in parts[1:]:
    o, l = np.load(f"{res}/o-{p}.npy"), np.load(f"{res}/lse-{p}.npy")
    do, dl = float(np.max(np.abs(o - o0))), float(np.max(np.abs(l - l0)))
    if not (do <= 1e-6 and dl <= 1e-6):
        print(f"{p} vs {parts[0]}: max |o diff| {do:.3e}, max |lse diff| {dl:.3e} (> 1e-6)",
              file=sys.stderr)
        ok = False
sys.exit(0 if ok else 1)
EOF
}

# Causal softmax attention in float64, head h reading kv head h // (H/G).
t_reference() {
    "$PYTHON3" - "$IN" "$RES" "${PARTITIONS[@]}" <<'EOF' || fail "o/lse differ from numpy"
import sys
import numpy as np
ind, res, parts = sys.argv[1], sys.argv[2], sys.argv[3:]
q = np.load(f"{ind}/q.npy").astype(np.float64)
k = np.load(f"{ind}/k.npy").astype(np.float64)
v = np.load(f"{ind}/v.npy").astype(np.float64)
n, h, d = q.shape
g = k.shape[1]
kh = np.repeat(k, h // g, axis=1)
vh = np.repeat(v, h // g, axis=1)
s = np.einsum("ihc,jhc->hij", q, kh) / np.sqrt(d)
s = np.where(np.tril(np.ones((n, n), dtype=bool))[None], s, -np.inf)
m = s.max(axis=-1, keepdims=True)
p = np.exp(s - m)
l = p.sum(axis=-1, keepdims=True)
o_ref = np.einsum("hij,jhc->ihc", p / l, vh)
lse_ref = (m + np.log(l))[..., 0].T
ok = True
for part in parts:
    o, lse = np.load(f"{res}/o-{part}.npy"), np.load(f"{res}/lse-{part}.npy")
    eo = np.linalg.norm(o - o_ref) / np.linalg.norm(o_ref)
    el = np.linalg.norm(lse - lse_ref) / np.linalg.norm(lse_ref)
    if not (eo <= 1e-5 and el <= 1e-5):
        print(f"{part}: relative L2 error o {eo:.3e}, lse {el:.3e} (> 1e-5)", file=sys.stderr)
        ok = False
sys.exit(0 if ok else 1)
EOF
}

t_results_jsonl() {
    [ -f "$RESULTS" ] || fail "$RESULTS was not written"
    "$PYTHON3" - "$RESULTS" "${PARTITIONS[@]}" <<'EOF' || fail "bad records in $RESULTS"
import json
import sys
path, parts = sys.argv[1], sys.argv[2:]
lines = open(path).read().splitlines()
errors = []
if len(lines) != len(parts):
    errors.append(f"{len(lines)} lines, expected one per run ({len(parts)})")
need = ["settings", "ranks", "forward", "backward", "peak_mib_per_rank", "hosts", "rel_err",
        "git_commit", "mpi_library"]
for i, line in enumerate(lines):
    try:
        rec = json.loads(line)
    except ValueError as e:
        errors.append(f"line {i + 1} is not JSON: {e}")
        continue
    missing = [k for k in need if k not in rec]
    if missing:
        errors.append(f"line {i + 1} lacks {missing}")
        continue
    if rec["ranks"] != 3:
        errors.append(f"line {i + 1}: ranks {rec['ranks']}, expected 3")
    if rec["backward"] is not None:
        errors.append(f"line {i + 1}: backward = {rec['backward']!r}, expected null (no backward)")
    fwd = rec["forward"]
    for k, v in (("bytes_sent_per_rank", fwd.get("bytes_sent_per_rank")),
                 ("peak_mib_per_rank", rec["peak_mib_per_rank"]), ("hosts", rec["hosts"])):
        if not isinstance(v, list) or len(v) != 3:
            errors.append(f"line {i + 1}: {k} = {v!r}, expected 3 entries")
    err_o = rec["rel_err"].get("o")
    if not isinstance(err_o, (int, float)) or not err_o <= 1e-5:
        errors.append(f"line {i + 1}: rel_err.o = {err_o!r}, expected <= 1e-5")
    for k in ("seconds", "gflops_per_s"):
        if not isinstance(fwd.get(k), (int, float)) or fwd[k] < 0:
            errors.append(f"line {i + 1}: forward.{k} = {fwd.get(k)!r}, expected a number >= 0")
    for k in ("git_commit", "mpi_library"):
        if not isinstance(rec[k], str) or not rec[k]:
            errors.append(f"line {i + 1}: {k} = {rec[k]!r}, expected text")
    st = rec["settings"]
    if not isinstance(st, dict):
        errors.append(f"line {i + 1}: settings is not an object")
    elif i < len(parts) and st.get("sequence.partition") != parts[i]:
        errors.append(f"line {i + 1}: settings sequence.partition = "
                      f"{st.get('sequence.partition')!r}, expected {parts[i]!r}")
    elif st.get("sequence.length") != 50 or st.get("attention.kv_heads") != 2:
        errors.append(f"line {i + 1}: settings do not carry the run's values: {st}")
for e in errors:
    print(e, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
}

t_no_temporaries() {
    local left
    left=$(find "$RES" -name '*.tmp-*' -o -name '.spar-probe-*')
    [ -z "$left" ] || fail "temporary files left behind: $left"
    local n
    n=$(find "$RES" -name '*.npy' | wc -l)
    [ "$n" -eq $((2 * ${#PARTITIONS[@]})) ] || fail "$n .npy files in $RES, expected $((2 * ${#PARTITIONS[@]}))"
}

t_config_show() {
    local f="$TMP/show.yaml"
    printf 'attention:\n  heads: 8\n  kv_heads: 2\nsequence.length: 1K\n' >"$f"
    expect_exit 0 0 '^attention\.heads +16 +# --set$' -- config show "$f" --set attention.heads=16
    grep -Eq '^attention\.kv_heads +2 +# file$' "$OUT" || { show_output; fail "kv_heads not from file"; }
    grep -Eq '^sequence\.length +1024 +# file$' "$OUT" || { show_output; fail "sequence.length 1K not 1024 from file"; }
    grep -Eq '^attention\.head_dim +64 +# default$' "$OUT" || { show_output; fail "head_dim not default"; }
}

t_help_lists_schema_keys() {
    local schema help key missing="" count=0
    schema=$("$SPAR" config schema) || fail "spar config schema failed"
    help=$("$SPAR" --help) || fail "spar --help failed"
    # shellcheck disable=SC2016 # backquotes are Markdown here
    while IFS= read -r key; do
        count=$((count + 1))
        grep -Fq -- " $key " <<<"$help" || missing="$missing $key"
    done < <(sed -n 's/^| `\([^`]*\)` |.*/\1/p' <<<"$schema")
    [ "$count" -ge 10 ] || fail "only $count keys found in spar config schema"
    [ -z "$missing" ] || fail "keys in the schema but not in spar --help:$missing"
}

t_run_help_lists_keys() {
    expect_exit 0 1 'attention\.heads' -- run --help
    expect_no_match '^# progress:'
}

for part in "${PARTITIONS[@]}"; do
    case_run "mpirun -np 3 spar run, partition $part: exit 0, table, progress, verify" \
        run_partition "$part"
done
case_run "o.npy is (50,4,24) and lse.npy (50,4), float32, finite" t_shapes
case_run "o and lse identical within 1e-6 across contiguous/zigzag/stripe" t_partitions_agree
case_run "o and lse match a float64 numpy reference (rel. L2 <= 1e-5)" t_reference
case_run "results jsonl: one parseable record per run with the required keys" t_results_jsonl
case_run "no *.tmp-* files left in the output directory" t_no_temporaries
# spar bench: a 2 x 2 sweep grid in one job, one JSON line per point with the figures.
t_bench_sweep() {
    local f="$TMP/bench.yaml" jsonl="$TMP/bench.jsonl"
    cat >"$f" <<YAML
attention: {heads: 2, kv_heads: 1, head_dim: 8}
run: {backward: true}
bench: {warmup: 0, repeats: 2}
output: {results: $jsonl}
sweep:
  sequence.length: [64, 80]
  parallel.method: [ring, allgather]
YAML
    expect_exit 0 2 '^# method' -- bench "$f"
    grep -Eq '^  allgather +softmax +true +2 +80 .* bwd ' "$OUT" ||
        { show_output; fail "no bwd row for allgather at N=80"; }
    "$PYTHON3" - "$jsonl" <<'PY' || fail "bench records are incomplete"
import json, sys
lines = open(sys.argv[1]).read().splitlines()
assert len(lines) == 4, len(lines)
points = set()
for line in lines:
    r = json.loads(line)
    assert r["record"] == "bench" and r["ranks"] == 2 and len(r["hosts"]) == 2, r
    for p in ("forward", "backward"):
        f = r[p]
        assert 0 < f["seconds_min"] <= f["seconds_median"] <= f["seconds_max"], f
        assert f["ratio_to_sgemm"] >= 0 and 0 <= f["hidden_fraction"] <= 1, f
        assert f["bytes_sent_per_rank_max"] > 0, f
    points.add((r["settings"]["sequence.length"], r["settings"]["parallel.method"]))
assert points == {(64, "ring"), (80, "ring"), (64, "allgather"), (80, "allgather")}, points
PY
}

t_bench_sweep_conflict() {
    local f="$TMP/bench-conflict.yaml"
    printf 'sweep:\n  sequence.length: [64, 80]\n' >"$f"
    expect_exit 2 2 "key sequence\.length is swept in .* and set with --set" -- \
        bench "$f" --set sequence.length=96
}

t_run_sweep_conflict() {
    local f="$TMP/run-sweep.yaml"
    printf 'sweep:\n  sequence.length: [64, 80]\n' >"$f"
    expect_exit 2 2 "key sequence\.length is swept in .* and set with --set" -- \
        run "$f" --set sequence.length=96
}

case_run "spar bench runs a 2 x 2 sweep grid, one JSON record per point" t_bench_sweep
case_run "spar bench refuses --set of a swept key" t_bench_sweep_conflict
case_run "spar run refuses --set of a swept key" t_run_sweep_conflict
case_run "run.verify_tol=1e-30: verification fails, exit 3 on every rank" t_verify_failure_exit3
case_run "config show FILE --set attention.heads=16 shows 16 from --set" t_config_show
case_run "every key of spar config schema appears in spar --help" t_help_lists_schema_keys
case_run "spar run --help under mpirun lists the keys and runs nothing" t_run_help_lists_keys
finish
