#!/usr/bin/env bash
# shellcheck disable=SC2317 # the case functions are called through case_run
# test_hostile.sh: a catalogue of malformed inputs at every entry point (experiment files,
# .npy tensors, model weights, prompts, command lines, corrupted messages between ranks,
# sizes past the host's memory). Each one must make every rank exit 2 with a message that
# names the problem, within a few seconds, and write nothing: each case runs in an empty
# directory of its own, with its outputs pointed into another, and both must stay empty.
# The cases of test_errors.sh are not repeated here.
set -u
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

SPAR_TEST_TIMEOUT=20 # a hang guard; the limit each case is held to is below
LIMIT_S=${SPAR_HOSTILE_LIMIT_S:-8}
[ -n "${SPAR_SANITIZED:-}" ] && LIMIT_S=20
IN="$TMP/in"     # the malformed inputs
OUTD="$TMP/outd" # where every case's outputs point
mkdir -p "$IN" "$OUTD"

# Small problem: N=64, H=4, G=2, d=16; a tiny decoder for generation.
SMALL=(--set sequence.length=64 --set attention.heads=4 --set attention.kv_heads=2
       --set attention.head_dim=16)
GEN=(--set run.mode=generate --set attention.heads=2 --set attention.head_dim=8
     --set model.layers=1 --set model.vocab=20 --set workload.batch=2 --set workload.generate=4)

# Every input of the catalogue, written once. npy_raw writes a .npy whose header is given
# as text (so it can lie); the data is DATA_BYTES zero bytes.
"$PYTHON3" - "$IN" <<'EOF' || fail "numpy could not write the inputs"
import os, struct, sys
import numpy as np
d = sys.argv[1]
rng = np.random.default_rng(0)
np.save(f"{d}/q.npy", rng.standard_normal((64, 4, 16)).astype(np.float32))
np.save(f"{d}/kv.npy", rng.standard_normal((64, 2, 16)).astype(np.float32))

def npy_raw(name, header, data_bytes, version=1, hlen=None):
    h = header.encode()
    pre = 10 if version == 1 else 12
    h += b" " * ((64 - (pre + len(h) + 1) % 64) % 64) + b"\n"
    n = len(h) if hlen is None else hlen
    size = struct.pack("<H", n) if version == 1 else struct.pack("<I", n)
    with open(f"{d}/{name}", "wb") as f:
        f.write(b"\x93NUMPY" + bytes([version, 0]) + size + h + bytes(data_bytes))

def q_header(shape, descr="<f4", order="False"):
    return f"{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}"

npy_raw("version9.npy", q_header("(64, 4, 16)"), 16384, version=9)
npy_raw("big-endian.npy", q_header("(64, 4, 16)", ">f4"), 16384)
npy_raw("bool.npy", q_header("(64, 4, 16)", "|b1"), 4096)
npy_raw("lying-size.npy", q_header("(64, 2, 16)"), 100)
npy_raw("overflow-shape.npy", q_header("(4294967296, 4294967296, 4294967296)"), 64)
npy_raw("beyond-int64.npy", q_header("(99999999999999999999999, 4, 16)"), 64)
npy_raw("negative-dim.npy", q_header("(-64, 2, 16)"), 64)
npy_raw("not-a-dict.npy", "[64, 4, 16]", 64)
npy_raw("header-past-end.npy", q_header("(64, 4, 16)"), 0, hlen=60000)
npy_raw("header-4gib.npy", q_header("(64, 4, 16)"), 0, version=2, hlen=0xFFFFFFFF)
npy_raw("huge-declared.npy", q_header("(16777216, 1, 1)"), 64)
open(f"{d}/empty.npy", "wb").close()

# A decoder's weights (D=16, H=G=2, d=8, F=48, V=20, 1 layer), then broken copies.
def weights(dirname, skip=None, replace=None):
    os.makedirs(f"{d}/{dirname}")
    V, D, HD, F = 20, 16, 16, 48
    shapes = {"embed": (V, D), "final_norm": (D,), "lm_head": (D, V),
              "layers.0.attn_norm": (D,), "layers.0.wq": (D, HD), "layers.0.wk": (D, HD),
              "layers.0.wv": (D, HD), "layers.0.wo": (HD, D), "layers.0.ffn_norm": (D,),
              "layers.0.w_gate": (D, F), "layers.0.w_up": (D, F), "layers.0.w_down": (F, D)}
    for name, shape in shapes.items():
        if name == skip:
            continue
        a = rng.standard_normal(shape).astype(np.float32)
        if replace and name == replace[0]:
            a = replace[1]
        np.save(f"{d}/{dirname}/{name}.npy", a)

weights("w-missing", skip="layers.0.wk")
weights("w-shape", replace=("layers.0.wq", np.zeros((16, 8), np.float32)))
weights("w-dtype", replace=("lm_head", np.zeros((16, 20), np.float64)))
weights("w-truncated")
with open(f"{d}/w-truncated/layers.0.w_down.npy", "r+b") as f:
    f.truncate(300)

i32 = lambda rows: np.array(rows, dtype=np.int32)
np.save(f"{d}/p-negative.npy", i32([[1, 2, -7], [3, 4, 5]]))
np.save(f"{d}/p-int64.npy", np.array([[1, 2, 3], [3, 4, 5]], dtype=np.int64))
np.save(f"{d}/p-rows.npy", i32([[1, 2, 3]]))
np.save(f"{d}/p-empty-request.npy", i32([[-1, -1, -1], [3, 4, 5]]))
np.save(f"{d}/p-fortran.npy", np.asfortranarray(i32([[1, 2, 3], [3, 4, 5]])))
npy_raw("p-huge.npy", q_header("(2, 4611686018427387904)", "<i4"), 24)
EOF

# YAML files: "name" and its text (printf format).
yaml() {
    # shellcheck disable=SC2059 # the text is a format on purpose (\t, \n)
    printf -- "$2" >"$IN/$1"
}
yaml tab.yaml 'sequence:\n\tlength: 64\n'
yaml unterminated.yaml 'run:\n  name: "half a string\n'
yaml open-flow.yaml 'attention: {heads: 4\n'
yaml heads-bool.yaml 'attention:\n  heads: true\n'
yaml causal-int.yaml 'attention:\n  causal: 3\n'
yaml length-1e400.yaml 'sequence:\n  length: 1e400\n'
yaml scale-1e400.yaml 'attention:\n  scale: 1e400\n'
yaml length-20-digits.yaml 'sequence:\n  length: 99999999999999999999\n'
yaml length-negative.yaml 'sequence:\n  length: -64\n'
yaml head-dim-zero.yaml 'attention:\n  head_dim: 0\n'
yaml product-overflow.yaml 'sequence:\n  length: 1G\nattention:\n  heads: 65536\n  head_dim: 65536\n'
yaml unknown-nested.yaml 'attention:\n  heads: 4\n  colour: red\n'
yaml duplicate.yaml 'attention:\n  heads: 4\n  heads: 8\n'
yaml anchors.yaml 'attention:\n  heads: &h 4\n  kv_heads: *h\n'
yaml two-documents.yaml '---\nattention:\n  heads: 4\n---\nattention:\n  heads: x\n'
yaml complex-key.yaml '? [attention, heads]\n: 4\n'
yaml include-cycle.yaml 'include: include-cycle.yaml\n'
yaml include-dir.yaml 'include: .\n'
yaml include-late.yaml 'attention:\n  heads: 4\ninclude: tab.yaml\n'
yaml sweep-bad-value.yaml 'sweep:\n  sequence.length: [64, 128, lots]\n'
yaml sweep-nested.yaml 'sweep:\n  sequence.length: [[64, 128]]\n'
yaml sweep-memory.yaml 'sweep:\n  sequence.length: [64, 2G]\n'
: >"$IN/empty.yaml"
mkdir -p "$IN/a-directory.yaml"
head -c 4096 /dev/urandom >"$IN/garbage.yaml"
head -c 4096 /dev/urandom >"$IN/garbage.jsonl"
"$PYTHON3" - "$IN" <<'EOF' || fail "could not write the large YAML files"
import sys
d = sys.argv[1]
open(f"{d}/deep-maps.yaml", "w").write("a: " + "{a: " * 10000 + "1" + "}" * 10000 + "\n")
open(f"{d}/deep-lists.yaml", "w").write("attention.heads: " + "[" * 10000 + "]" * 10000 + "\n")
open(f"{d}/huge-list.yaml", "w").write("sweep:\n  data.seed: [" + ", ".join(["1"] * 100000) + "]\n")
open(f"{d}/long-key.yaml", "w").write("attention." + "h" * 300 + ": 4\n")
keys = ["data.seed", "run.name", "bench.repeats", "bench.warmup", "run.threads",
        "run.query_block", "comm.timeout", "attention.scale"]
values = "[" + ", ".join(str(i + 1) for i in range(32)) + "]"
open(f"{d}/huge-grid.yaml", "w").write("sweep:\n" + "".join(f"  {k}: {values}\n" for k in keys))
EOF

# One case: every rank exits 2, the output matches REGEX, in under LIMIT_S seconds, and
# neither the case's empty working directory nor the output directory gets a file.
#   hostile NP REGEX -- ARGS...    (NP 0: spar alone; run/bench get output paths added)
hostile() {
    local np=$1 regex=$2 scratch t0 took left
    shift 2
    [ "${1:-}" = "--" ] && shift
    local args=("$@") outs=()
    case "${args[0]:-}" in
    run | bench) outs+=(--set "output.results=$OUTD/r.jsonl") ;;
    esac
    if [ "${args[0]:-}" = run ] && [[ " ${args[*]} " != *" run.mode=generate "* ]]; then
        outs+=(--set "output.o=$OUTD/o.npy")
    elif [ "${args[0]:-}" = run ]; then
        outs+=(--set "output.tokens=$OUTD/t.npy" --set "output.logits=$OUTD/l.npy")
    fi
    args=("${args[@]:0:1}" "${outs[@]}" "${args[@]:1}") # first, so that a case's last word stays last
    scratch=$(mktemp -d "$TMP/cwd.XXXXXX")
    cd "$scratch" || fail "cannot enter $scratch"
    t0=$(date +%s%N)
    expect_exit 2 "$np" "$regex" -- "${args[@]}"
    took=$((($(date +%s%N) - t0) / 1000000))
    expect_no_match '^# progress:|^# method|^local |^offload '
    [ "$took" -le $((LIMIT_S * 1000)) ] || { show_output; fail "took $took ms (limit ${LIMIT_S} s)"; }
    left="$(ls -A "$scratch")$(ls -A "$OUTD")"
    [ -z "$left" ] || { show_output; fail "files were written: $(ls -A "$scratch" "$OUTD" | tr '\n' ' ')"; }
}

N=0
c() { # c NAME NP REGEX -- ARGS...
    local name=$1
    shift
    N=$((N + 1))
    case_run "$name" hostile "$@"
}

y="$IN" # YAML paths in regexes: the directory has no regex characters (mktemp)

echo "# experiment files"
c "yaml: tab indentation, np 2" 2 "$y/tab\.yaml:2:1: YAML syntax error: found character that cannot start any token" \
    -- run "$IN/tab.yaml"
c "yaml: unterminated quote" 0 "$y/unterminated\.yaml:[0-9]+:[0-9]+: YAML syntax error: found unexpected end of stream" \
    -- config check "$IN/unterminated.yaml"
c "yaml: unclosed flow mapping" 0 "$y/open-flow\.yaml:2:1: YAML syntax error: did not find expected ',' or '}'" \
    -- config check "$IN/open-flow.yaml"
c "yaml: heads: true (wrong type), np 2" 2 "$y/heads-bool\.yaml:2: key attention\.heads: 'true' is not an integer" \
    -- run "$IN/heads-bool.yaml"
c "yaml: causal: 3 (wrong type)" 0 "$y/causal-int\.yaml:2: key attention\.causal: '3' is not a boolean" \
    -- config check "$IN/causal-int.yaml"
c "yaml: length 1e400, np 3" 3 "$y/length-1e400\.yaml:2: key sequence\.length: '1e400' is not an integer" \
    -- run "$IN/length-1e400.yaml"
c "yaml: scale 1e400 (overflows a double)" 0 "key attention\.scale: '1e400' is not a number \(allowed: auto or a number > 0\)" \
    -- config check "$IN/scale-1e400.yaml"
c "yaml: length 99999999999999999999 (past int64), np 2" 2 "key sequence\.length: '99999999999999999999' is not an integer \(or is too large\)" \
    -- run "$IN/length-20-digits.yaml"
c "yaml: negative length, np 2" 2 "key sequence\.length: '-64' is out of range" \
    -- run "$IN/length-negative.yaml"
c "yaml: head_dim 0" 0 "key attention\.head_dim: '0' is out of range \(allowed: integer >= 1\)" \
    -- config check "$IN/head-dim-zero.yaml"
c "yaml: length x heads x head_dim overflows int64, np 2" 2 "sequence\.length x heads x head_dim = 4\.61e\+18 elements is too large to address" \
    -- run "$IN/product-overflow.yaml"
c "yaml: unknown nested key, np 2" 2 "$y/unknown-nested\.yaml:3: unknown key 'attention\.colour'" \
    -- run "$IN/unknown-nested.yaml"
c "yaml: a key twice in one mapping" 0 "key attention\.heads is given twice in .*duplicate\.yaml \(lines 2 and 3\)" \
    -- config check "$IN/duplicate.yaml"
c "yaml: anchors and aliases" 0 "$y/anchors\.yaml:2: key attention\.heads: anchors and aliases are not supported" \
    -- config check "$IN/anchors.yaml"
c "yaml: a second document, np 2" 2 "$y/two-documents\.yaml:4: a second YAML document" \
    -- run "$IN/two-documents.yaml"
c "yaml: a key that is a list" 0 "$y/complex-key\.yaml:1: a key must be plain text" \
    -- config check "$IN/complex-key.yaml"
c "yaml: 10000 nested mappings" 0 "deep-maps\.yaml: mappings nested deeper than 8 levels" \
    -- config check "$IN/deep-maps.yaml"
c "yaml: 10000 nested lists, np 2" 2 "$y/deep-lists\.yaml:1: key attention\.heads: expected a single value, got a list" \
    -- run "$IN/deep-lists.yaml"
c "yaml: a flow list of 100000 values" 0 "$y/huge-list\.yaml:2: sweep: key data\.seed: at most 32 values" \
    -- config check "$IN/huge-list.yaml"
c "yaml: a 300-character key" 0 "long-key\.yaml: key 'attention\.h+\.\.\.' is too long" \
    -- config check "$IN/long-key.yaml"
c "yaml: binary garbage, np 2" 2 "$y/garbage\.yaml:[0-9]+:[0-9]+: YAML syntax error" \
    -- run "$IN/garbage.yaml"
c "yaml: empty file, np 2" 2 "experiment file '$y/empty\.yaml' is empty" -- run "$IN/empty.yaml"
c "yaml: a directory" 0 "experiment file '$y/a-directory\.yaml' is a directory" \
    -- config check "$IN/a-directory.yaml"
c "yaml: include of itself (cycle)" 0 "include: files nested deeper than 8 \(a cycle\?\)" \
    -- config check "$IN/include-cycle.yaml"
c "yaml: include of a directory, np 2" 2 "experiment file '$y/\.' is a directory.*\(included from $y/include-dir\.yaml:1\)" \
    -- run "$IN/include-dir.yaml"
c "yaml: include after other keys" 0 "$y/include-late\.yaml:3: include: must be the first key" \
    -- config check "$IN/include-late.yaml"
c "sweep: a value of the wrong type, np 2" 2 "$y/sweep-bad-value\.yaml:2: sweep: key sequence\.length: 'lots' is not an integer" \
    -- bench "$IN/sweep-bad-value.yaml"
c "sweep: a list inside the list" 0 "sweep: key sequence\.length: values must be plain" \
    -- config check "$IN/sweep-nested.yaml"
c "sweep: 32^8 points (overflows int), np 2" 2 "sweep: 32 x 32 x 32 x 32 x 32 x 32 x 32 x 32 values make more than 65536 points" \
    -- bench "$IN/huge-grid.yaml"

echo "# .npy inputs"
c "npy: version 9, np 2" 2 "key data\.q: '$y/version9\.npy': unsupported \.npy version 9" \
    -- run "${SMALL[@]}" --set data.q="$IN/version9.npy"
c "npy: big-endian >f4, np 2" 2 "key data\.q: '$y/big-endian\.npy' has dtype '>f4' but float32 \('<f4'\) is required" \
    -- run "${SMALL[@]}" --set data.q="$IN/big-endian.npy"
c "npy: |b1 (bool), np 3" 3 "key data\.k: '$y/bool\.npy' has dtype '\|b1'" \
    -- run "${SMALL[@]}" --set data.k="$IN/bool.npy"
c "npy: header shape larger than the file, np 2" 2 "key data\.v: '$y/lying-size\.npy' is truncated: shape \(64, 2, 16\) needs 8192 data bytes" \
    -- run "${SMALL[@]}" --set data.v="$IN/lying-size.npy"
c "npy: shape whose product overflows int64, np 2" 2 "key data\.q: '$y/overflow-shape\.npy' has shape \(4294967296, 4294967296, 4294967296\) but \(64, 4, 16\) is required" \
    -- run "${SMALL[@]}" --set data.q="$IN/overflow-shape.npy"
c "npy: a dimension past int64" 0 "key data\.q: '$y/beyond-int64\.npy': malformed \.npy header" \
    -- run "${SMALL[@]}" --set data.q="$IN/beyond-int64.npy"
c "npy: a negative dimension, np 2" 2 "key data\.k: '$y/negative-dim\.npy': malformed \.npy header" \
    -- run "${SMALL[@]}" --set data.k="$IN/negative-dim.npy"
c "npy: a header that is not a dict, np 2" 2 "key data\.q: '$y/not-a-dict\.npy': malformed \.npy header: \[64, 4, 16\]" \
    -- run "${SMALL[@]}" --set data.q="$IN/not-a-dict.npy"
c "npy: header length past the end of the file, np 2" 2 "key data\.q: '$y/header-past-end\.npy': truncated \.npy header" \
    -- run "${SMALL[@]}" --set data.q="$IN/header-past-end.npy"
c "npy: version 2 header of 4 GiB, np 2" 2 "key data\.q: '$y/header-4gib\.npy': .*header.* 4294967295" \
    -- run "${SMALL[@]}" --set data.q="$IN/header-4gib.npy"
c "npy: empty file, np 2" 2 "key data\.v: '$y/empty\.npy' is not a \.npy file \(bad magic\)" \
    -- run "${SMALL[@]}" --set data.v="$IN/empty.npy"
c "npy: 16M tokens declared, 64 bytes present, np 2" 2 "key data\.q: '$y/huge-declared\.npy' is truncated: shape \(16777216, 1, 1\) needs 67108864 data bytes" \
    -- run --set sequence.length=16M --set attention.heads=1 --set attention.head_dim=1 --set parallel.method=allgather --set run.kernel=none --set data.q="$IN/huge-declared.npy"

echo "# model weights and prompts (run.mode=generate)"
c "weights: a tensor missing, np 2" 2 "key model\.weights: cannot open '$y/w-missing/layers\.0\.wk\.npy': No such file or directory" \
    -- run "${GEN[@]}" --set model.weights="$IN/w-missing"
c "weights: a tensor of the wrong shape, np 3" 3 "key model\.weights: '$y/w-shape/layers\.0\.wq\.npy' has shape \(16, 8\) but \(16, 16\) is required" \
    -- run "${GEN[@]}" --set model.weights="$IN/w-shape"
c "weights: a float64 tensor" 0 "key model\.weights: '$y/w-dtype/lm_head\.npy' has dtype '<f8'" \
    -- run "${GEN[@]}" --set model.weights="$IN/w-dtype"
c "weights: a truncated tensor, np 2" 2 "key model\.weights: '$y/w-truncated/layers\.0\.w_down\.npy' is truncated" \
    -- run "${GEN[@]}" --set model.weights="$IN/w-truncated"
c "weights: a file, not a directory" 0 "key model\.weights: '$y/q\.npy' is not a directory" \
    -- run "${GEN[@]}" --set model.weights="$IN/q.npy"
c "prompts: token -7 (only -1 pads), np 2" 2 "key workload\.prompts: request 0, position 2: token -7 \(allowed: 0 \.\. model\.vocab-1 = 19, -1 after the end\)" \
    -- run "${GEN[@]}" --set workload.prompts="$IN/p-negative.npy"
c "prompts: int64 ids, np 2" 2 "key workload\.prompts: '$y/p-int64\.npy' is <i8 with shape \(2, 3\) \(allowed: int32 <i4" \
    -- run "${GEN[@]}" --set workload.prompts="$IN/p-int64.npy"
c "prompts: fewer rows than workload.batch" 0 "key workload\.prompts: '$y/p-rows\.npy' is <i4 with shape \(1, 3\) \(allowed: .*workload\.batch=2" \
    -- run "${GEN[@]}" --set workload.prompts="$IN/p-rows.npy"
c "prompts: a request of padding only, np 2" 2 "key workload\.prompts: request 0 is empty" \
    -- run "${GEN[@]}" --set workload.prompts="$IN/p-empty-request.npy"
c "prompts: Fortran order" 0 "key workload\.prompts: '$y/p-fortran\.npy' is <i4 in Fortran order" \
    -- run "${GEN[@]}" --set workload.prompts="$IN/p-fortran.npy"
c "prompts: 2^62 ids declared (size overflows), np 2" 2 "key workload\.prompts: '$y/p-huge\.npy' is truncated: shape \(2, 4611686018427387904\)" \
    -- run "${GEN[@]}" --set workload.prompts="$IN/p-huge.npy"

echo "# command lines"
c "--set as the last word, np 2" 2 "--set needs KEY=VALUE" -- run "${SMALL[@]}" --set
c "--set with an empty key, np 2" 2 "--set '=5': expected KEY=VALUE" -- run "${SMALL[@]}" --set =5
c "--set attention.heads=0x10 (hex)" 0 "key attention\.heads: '0x10' is not an integer" \
    -- run "${SMALL[@]}" --set attention.heads=0x10
c "--set attention.heads=4.5, np 2" 2 "key attention\.heads: '4\.5' is not an integer" \
    -- run "${SMALL[@]}" --set attention.heads=4.5
c "--set comm.timeout=nan, np 2" 2 "key comm\.timeout: 'nan' is not a number" \
    -- run "${SMALL[@]}" --set comm.timeout=nan
c "--set attention.scale=inf" 0 "key attention\.scale: 'inf' is not a number" \
    -- run "${SMALL[@]}" --set attention.scale=inf
c "two experiment files, np 2" 2 "more than one experiment file \('$y/anchors\.yaml'\)" \
    -- run "$IN/tab.yaml" "$IN/anchors.yaml"
c "bench without a file, np 2" 2 "an experiment FILE is required" -- bench "${SMALL[@]}"
c "config with an unknown subcommand" 0 "unknown config command 'frob' \(allowed: show\|check\|schema\)" \
    -- config frob
c "submit with an unknown option" 0 "spar submit: unknown option '--bogus'" \
    -- submit "$IN/tab.yaml" --bogus
c "submit --nodes x" 0 "spar submit: --nodes 'x' \(allowed: an integer from 1 to 100000\)" \
    -- submit --nodes x "$IN/tab.yaml"
c "report --group-by without a value" 0 "spar report: unknown option or missing value '--group-by'" \
    -- report "$IN/garbage.jsonl" --group-by
c "report on a directory" 0 "spar report: '$y' is a directory" -- report "$IN"
c "report on binary garbage" 0 "spar report: '$y/garbage\.jsonl' holds no records" \
    -- report "$IN/garbage.jsonl"

echo "# sizes past the host's memory"
c "sequence.length=2000000000, np 2" 2 "sequence\.length=2000000000: each of the 2 rank\(s\) on this host would hold at least [0-9.e+]+ GiB .* but this host has [0-9.]+ GiB of memory" \
    -- run --set sequence.length=2000000000
# Under srun, Open MPI names no local size: Slurm's tasks per node count (node 2 of
# "3,2(x2)" runs 2 of the 7 ranks).
srun_node() {
    export SLURM_STEP_TASKS_PER_NODE='3,2(x2)' SLURM_NODEID=2
    hostile 0 "each of the 2 rank\(s\) on this host would hold" -- config check \
        "$SPAR_SOURCE_DIR/configs/quickstart.yaml" --set parallel.ranks=7 \
        --set sequence.length=2000000000
}
N=$((N + 1))
case_run "srun: the ranks of this node counted from SLURM_STEP_TASKS_PER_NODE" srun_node
c "bench: a sweep point past the host's memory, np 2" 2 "sequence\.length=2147483648: each of .* GiB of memory .*\(sweep point 2 of 2\)" \
    -- bench "$IN/sweep-memory.yaml"
c "generate: a KV cache past the host's memory" 0 "a rank would hold .* GiB \(weights .* GiB, KV cache .* GiB\) but this host has" \
    -- run "${GEN[@]}" --set workload.batch=1M --set workload.generate=1M

echo "# corrupted messages between ranks"
t_plan_corrupt() {
    SPAR_TEST_FAULT=plan:1 hostile 3 "\[rank 1/[^]]*\] error: run plan: message of [0-9]+ bytes does not decode" -- run "${SMALL[@]}"
}
N=$((N + 1))
case_run "run plan corrupted on rank 1 of 3: every rank exits 2" t_plan_corrupt

# The decode control message that lies (SPAR_TEST_FAULT=header:STEP): the attention rank
# rejects it and the job is stopped with exit 2 (MPI_Abort: ranks are ended, not exited).
t_header_corrupt() {
    local scratch t0 took rc
    scratch=$(mktemp -d "$TMP/cwd.XXXXXX")
    cd "$scratch" || fail "cannot enter $scratch"
    t0=$(date +%s%N)
    SPAR_TEST_FAULT=header:2 OMPI_MCA_odls_base_sigkill_timeout=0 timeout -k 5 20 \
        "$MPIEXEC" -np 2 --oversubscribe "$SPAR" run "${GEN[@]}" --set parallel.method=offload \
        --set output.tokens="$OUTD/t.npy" --set output.results="$OUTD/r.jsonl" >"$OUT" 2>&1 </dev/null
    rc=$?
    took=$((($(date +%s%N) - t0) / 1000000))
    LAST_COMMAND="SPAR_TEST_FAULT=header:2 $MPIEXEC -np 2 $SPAR run ... parallel.method=offload"
    [ "$rc" -eq 2 ] || { show_output; fail "exit code $rc, expected 2"; }
    grep -Eq "attention rank 1 rejects the control message from compute rank 0 \(step 2, micro-batch 0\): position" "$OUT" ||
        { show_output; fail "no message naming the rejected field"; }
    [ "$took" -le $((LIMIT_S * 1000)) ] || { show_output; fail "took $took ms"; }
    # Rank 0 may log the point as interrupted when mpirun ends it: that record is all that
    # output.results may hold; no tokens, no temporary files.
    if [ -f "$OUTD/r.jsonl" ] && grep -qv '^{"record":"interrupted"' "$OUTD/r.jsonl"; then
        fail "output.results holds more than an interrupted record: $(cut -c1-200 "$OUTD/r.jsonl")"
    fi
    rm -f "$OUTD/r.jsonl"
    [ -z "$(ls -A "$scratch")$(ls -A "$OUTD")" ] || fail "files were written: $(ls -A "$scratch" "$OUTD")"
}
N=$((N + 1))
case_run "decode control message corrupted at step 2: the job exits 2" t_header_corrupt

echo "# $N malformed inputs in the catalogue"
finish
