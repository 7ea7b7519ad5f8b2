#!/usr/bin/env bash
# shellcheck disable=SC2317 # the case functions are called through case_run
# test_errors.sh: every input error makes every rank exit 2 with one message that names
# the key, the value and what is allowed, before anything is computed.
set -u
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

# Small problem so that each case takes well under a second: N=64, H=4, G=2, d=16.
SMALL=(--set sequence.length=64 --set attention.heads=4 --set attention.kv_heads=2
       --set attention.head_dim=16)
Q_OK="$TMP/q.npy"
KV_OK="$TMP/kv.npy"
make_npy "$Q_OK" 64,4,16 1
make_npy "$KV_OK" 64,2,16 2

# Bad input must stop the job before the run starts: no progress, no result table.
expect_bad_input() {
    expect_exit 2 "$@"
    expect_no_match '^# progress:|^# method'
}

t_unknown_key_set() {
    expect_bad_input 2 "unknown key 'attention\.head'.*did you mean 'attention\.heads'" -- \
        run "${SMALL[@]}" --set attention.head=4
}

t_bf16_on_cpu() {
    expect_bad_input 2 "key run\.dtype: 'bf16' with run\.device=cpu \(allowed: fp32" -- \
        run "${SMALL[@]}" --set run.dtype=bf16
}

t_unknown_key_yaml() {
    local f="$TMP/typo.yaml"
    printf 'sequence:\n  length: 64\nattention:\n  hedas: 4\n' >"$f"
    expect_bad_input 2 "$f:4: unknown key 'attention\.hedas'.*did you mean 'attention\.heads'" -- \
        run "$f"
}

t_unknown_key_far() {
    # Nothing close: no suggestion, but still a pointer to the list of keys.
    expect_bad_input 1 "unknown key 'zzz\.qqq'.*spar --help" -- run --set zzz.qqq=1
}

t_heads_not_integer() {
    expect_bad_input 2 "key attention\.heads: 'abc' is not an integer.*allowed: integer >= 1" -- \
        run "${SMALL[@]}" --set attention.heads=abc
}

t_causal_not_bool() {
    expect_bad_input 2 "key attention\.causal: 'maybe' is not a boolean.*allowed: true\|false" -- \
        run "${SMALL[@]}" --set attention.causal=maybe
}

t_heads_out_of_range() {
    expect_bad_input 3 "key attention\.heads: '0' is out of range.*allowed: integer >= 1" -- \
        run "${SMALL[@]}" --set attention.heads=0
}

t_bad_enum() {
    expect_bad_input 2 "key sequence\.partition: 'diagonal' is not one of the allowed values.*allowed: auto\|contiguous\|zigzag\|stripe" -- \
        run "${SMALL[@]}" --set sequence.partition=diagonal
}

t_set_without_equals() {
    expect_bad_input 2 "--set 'attention\.heads': expected KEY=VALUE" -- \
        run "${SMALL[@]}" --set attention.heads
}

t_kv_heads_not_divisor() {
    expect_bad_input 2 "key attention\.kv_heads: 3 does not divide attention\.heads=8.*allowed: a divisor of the heads" -- \
        run --set sequence.length=64 --set attention.heads=8 --set attention.kv_heads=3
}

t_length_below_ranks() {
    expect_bad_input 2 "key sequence\.length: 1 is smaller than the number of ranks \(2\)" -- \
        run "${SMALL[@]}" --set sequence.length=1
}

t_length_below_ranks_np3() {
    expect_bad_input 3 "key sequence\.length: 2 is smaller than the number of ranks \(3\)" -- \
        run "${SMALL[@]}" --set sequence.length=2
}

t_lasp2_for_softmax() {
    expect_bad_input 2 "key parallel\.method: 'lasp2' does not compute softmax attention.*allowed: ring\|allgather\|local" -- \
        run "${SMALL[@]}" --set parallel.method=lasp2
}

t_ring_for_linear() {
    expect_bad_input 2 "key parallel\.method: 'ring' does not compute linear attention.*allowed: lasp2\|lasp1\|local" -- \
        run "${SMALL[@]}" --set attention.type=linear --set parallel.method=ring
}

t_linear_zigzag() {
    expect_bad_input 3 "key sequence\.partition: 'zigzag' with linear attention.*allowed: contiguous" -- \
        run "${SMALL[@]}" --set attention.type=linear --set sequence.partition=zigzag
}

t_linear_lse() {
    expect_bad_input 2 "key output\.lse: '.*lse\.npy' with attention\.type=linear.*no log-sum-exp" -- \
        run "${SMALL[@]}" --set attention.type=linear --set output.lse="$TMP/lse.npy"
}

t_linear_scale() {
    expect_bad_input 2 "key attention\.scale: 0\.5 with attention\.type=linear.*allowed: auto" -- \
        run "${SMALL[@]}" --set attention.type=linear --set attention.scale=0.5
}

t_softmax_decay() {
    expect_bad_input 2 "key attention\.decay: 'alibi' with attention\.type=softmax.*allowed: 1" -- \
        run "${SMALL[@]}" --set attention.decay=alibi
}

t_decay_out_of_range() {
    expect_bad_input 2 "key attention\.decay: '1\.5' is out of range.*allowed: alibi or a number in \(0, 1\]" -- \
        run "${SMALL[@]}" --set attention.type=linear --set attention.decay=1.5
}

t_missing_npy() {
    local p="$TMP/no-such-file.npy"
    expect_bad_input 2 "key data\.q: cannot open '$p': No such file or directory" -- \
        run "${SMALL[@]}" --set data.q="$p" --set data.k="$KV_OK" --set data.v="$KV_OK"
}

t_npy_is_directory() {
    # chmod 000 does not stop root; a directory cannot be read as a file by anyone.
    local p="$TMP/a-directory.npy"
    mkdir -p "$p"
    expect_bad_input 2 "key data\.k: .*'$p'" -- \
        run "${SMALL[@]}" --set data.q="$Q_OK" --set data.k="$p" --set data.v="$KV_OK"
}

t_npy_bad_magic() {
    local p="$TMP/not-numpy.npy"
    printf 'this is plain text, not a numpy file\n' >"$p"
    expect_bad_input 2 "key data\.v: '$p' is not a \.npy file \(bad magic\)" -- \
        run "${SMALL[@]}" --set data.q="$Q_OK" --set data.k="$KV_OK" --set data.v="$p"
}

t_npy_float64() {
    local p="$TMP/q64.npy"
    make_npy "$p" 64,4,16 3 'a = a.astype(np.float64)'
    expect_bad_input 2 "key data\.q: '$p' has dtype '<f8' but float32 \('<f4'\) is required" -- \
        run "${SMALL[@]}" --set data.q="$p" --set data.k="$KV_OK" --set data.v="$KV_OK"
}

t_npy_wrong_shape() {
    local p="$TMP/kshape.npy"
    make_npy "$p" 64,4,16 4
    expect_bad_input 2 "key data\.k: '$p' has shape \(64, 4, 16\) but \(64, 2, 16\) is required" -- \
        run "${SMALL[@]}" --set data.q="$Q_OK" --set data.k="$p" --set data.v="$KV_OK"
}

t_npy_wrong_ndim() {
    local p="$TMP/q2d.npy"
    make_npy "$p" 64,64 5
    expect_bad_input 1 "key data\.q: '$p' has shape \(64, 64\) but \(64, 4, 16\) is required" -- \
        run "${SMALL[@]}" --set data.q="$p" --set data.k="$KV_OK" --set data.v="$KV_OK"
}

t_npy_fortran() {
    local p="$TMP/qf.npy"
    make_npy "$p" 64,4,16 6 'a = np.asfortranarray(a)'
    grep -aq "'fortran_order': True" "$p" || fail "numpy did not write a Fortran-order file"
    expect_bad_input 2 "key data\.q: '$p' is in Fortran order but C order is required" -- \
        run "${SMALL[@]}" --set data.q="$p" --set data.k="$KV_OK" --set data.v="$KV_OK"
}

t_npy_truncated() {
    local p="$TMP/vtrunc.npy"
    make_npy "$p" 64,2,16 7
    truncate -s -100 "$p"
    expect_bad_input 2 "key data\.v: '$p' is truncated: shape \(64, 2, 16\) needs 8192 data bytes" -- \
        run "${SMALL[@]}" --set data.q="$Q_OK" --set data.k="$KV_OK" --set data.v="$p"
}

t_npy_truncated_header() {
    local p="$TMP/htrunc.npy"
    make_npy "$p" 64,2,16 8
    truncate -s 40 "$p"
    expect_bad_input 1 "key data\.k: '$p': truncated \.npy header" -- \
        run "${SMALL[@]}" --set data.q="$Q_OK" --set data.k="$p" --set data.v="$KV_OK"
}

t_output_dir_missing() {
    local p="$TMP/no-such-dir/o.npy"
    expect_bad_input 2 "key output\.o: cannot write '$p': directory '$TMP/no-such-dir': No such file or directory" -- \
        run "${SMALL[@]}" --set output.o="$p"
}

t_results_dir_missing() {
    local p="$TMP/no-such-dir/r.jsonl"
    expect_bad_input 3 "key output\.results: cannot write '$p'" -- \
        run "${SMALL[@]}" --set output.results="$p"
}

t_output_is_directory() {
    local p="$TMP/an-output-dir"
    mkdir -p "$p"
    expect_bad_input 2 "key output\.o: '$p' is a directory" -- \
        run "${SMALL[@]}" --set output.o="$p"
    [ -z "$(ls -A "$p")" ] || fail "files were written into $p: $(ls -A "$p")"
}

t_bad_transport() {
    # comm.transport is read before MPI starts; the error still comes once, from rank 0.
    expect_bad_input 2 "key comm\.transport: 'tcp' is not one of the allowed values.*allowed: auto\|ucx\|ob1" -- \
        run "${SMALL[@]}" --set comm.transport=tcp
    local n
    n=$(grep -c "comm\.transport" "$OUT")
    [ "$n" -eq 1 ] || { show_output; fail "the error was printed $n times, expected once"; }
}

t_yaml_key_twice() {
    local f="$TMP/twice.yaml"
    printf 'attention.heads: 4\nattention:\n  heads: 8\n' >"$f"
    expect_bad_input 2 "key attention\.heads is given twice in $f \(lines 1 and 3\)" -- run "$f"
}

t_yaml_scalar_document() {
    local f="$TMP/scalar.yaml"
    echo "just some text" >"$f"
    expect_bad_input 1 "$f: expected a mapping of keys to values" -- run "$f"
}

t_ranks_mismatch() {
    expect_bad_input 2 "key parallel\.ranks: the plan needs 3 ranks but the job has 2.*-np 3" -- \
        run "${SMALL[@]}" --set parallel.ranks=3
}

t_yaml_syntax() {
    local f="$TMP/syntax.yaml"
    printf 'attention:\n  heads: 4\n  causal: true: false\nsequence:\n  length: 64\n' >"$f"
    expect_bad_input 2 "$f:[0-9]+:[0-9]+: YAML syntax error" -- run "$f"
}

t_yaml_list() {
    local f="$TMP/list.yaml"
    printf 'sequence:\n  length: 64\nattention:\n  heads:\n    - 4\n    - 8\n' >"$f"
    expect_bad_input 2 "$f:5: key attention\.heads: expected a single value, got a list" -- \
        run "$f"
}

t_yaml_bad_value() {
    local f="$TMP/badvalue.yaml"
    printf 'sequence:\n  length: 64\n  partition: diagonal\n' >"$f"
    expect_bad_input 3 "$f:3: key sequence\.partition: 'diagonal' is not one of the allowed values" -- \
        run "$f"
}

t_yaml_missing_file() {
    local f="$TMP/absent.yaml"
    expect_bad_input 2 "cannot open experiment file '$f': No such file or directory" -- run "$f"
}

t_unknown_option() {
    expect_bad_input 2 "unknown option '--bogus'" -- run "${SMALL[@]}" --bogus
}

t_unknown_option_once() {
    # Usage errors come before MPI starts; only rank 0 prints them.
    expect_bad_input 3 "unknown option '--bogus'" -- run --bogus
    local n
    n=$(grep -c "unknown option" "$OUT")
    [ "$n" -eq 1 ] || { show_output; fail "the usage error was printed $n times, expected once"; }
}

t_no_arguments() {
    expect_exit 2 0 "usage:" --
}

t_unknown_command() {
    expect_exit 2 0 "unknown command 'frobnicate' \(allowed: run, bench, submit, report, config\)" -- frobnicate
}

t_config_check_kv() {
    local f="$TMP/check-bad.yaml"
    printf 'attention:\n  heads: 8\n  kv_heads: 3\nsequence:\n  length: 64\n' >"$f"
    expect_exit 2 0 "key attention\.kv_heads: 3 does not divide attention\.heads=8" -- \
        config check "$f"
}

t_config_check_bad_value() {
    local f="$TMP/check-bad2.yaml"
    printf 'attention:\n  heads: 4\n  kv_heads: x\n' >"$f"
    expect_exit 2 0 "$f:3: key attention\.kv_heads: 'x' is not an integer" -- config check "$f"
}

t_config_check_good() {
    local f="$TMP/check-good.yaml"
    printf 'attention:\n  heads: 8\n  kv_heads: 2\n  head_dim: 32\nsequence:\n  length: 1K\n' >"$f"
    expect_exit 0 0 "^$f: ok$" -- config check "$f"
}

t_config_needs_file() {
    expect_exit 2 0 "an experiment FILE is required" -- config check
}

t_gradient_output_without_backward() {
    expect_bad_input 2 "key output\.dq: '.*dq\.npy' is given but run\.backward is false.*allowed: set run\.backward=true" -- \
        run "${SMALL[@]}" --set output.dq="$TMP/dq.npy"
}

t_do_wrong_shape() {
    # data.do must be [N,H,d]: a [N,G,d] file is refused with both shapes.
    expect_bad_input 2 "key data\.do: '.*kv\.npy' has shape \(64, 2, 16\) but \(64, 4, 16\) is required" -- \
        run "${SMALL[@]}" --set run.backward=true --set data.do="$KV_OK"
}

t_head_groups_negative() {
    expect_bad_input 3 "key parallel\.head_groups: '-1' is out of range" -- \
        run "${SMALL[@]}" --set parallel.method=allgather --set parallel.head_groups=-1
}

case_run "output.dq without run.backward, np 2" t_gradient_output_without_backward
case_run "data.do with the shape of k, np 2" t_do_wrong_shape
case_run "parallel.head_groups=-1 is out of range, np 3" t_head_groups_negative
case_run "unknown key via --set (with suggestion), np 2" t_unknown_key_set
case_run "run.dtype=bf16 on the CPU, np 2" t_bf16_on_cpu
case_run "unknown key in a YAML file (file:line, suggestion), np 2" t_unknown_key_yaml
case_run "unknown key with nothing close, np 1" t_unknown_key_far
case_run "attention.heads=abc is not an integer, np 2" t_heads_not_integer
case_run "attention.causal=maybe is not a boolean, np 2" t_causal_not_bool
case_run "attention.heads=0 is out of range, np 3" t_heads_out_of_range
case_run "sequence.partition=diagonal is not allowed, np 2" t_bad_enum
case_run "--set without '=', np 2" t_set_without_equals
case_run "heads=8 kv_heads=3: kv_heads must divide heads, np 2" t_kv_heads_not_divisor
case_run "sequence.length=1 < 2 ranks, np 2" t_length_below_ranks
case_run "sequence.length=2 < 3 ranks, np 3" t_length_below_ranks_np3
case_run "parallel.method=lasp2 with softmax attention, np 2" t_lasp2_for_softmax
case_run "parallel.method=ring with linear attention, np 2" t_ring_for_linear
case_run "linear attention with the zigzag partition, np 3" t_linear_zigzag
case_run "output.lse with linear attention, np 2" t_linear_lse
case_run "attention.scale with linear attention, np 2" t_linear_scale
case_run "attention.decay with softmax attention, np 2" t_softmax_decay
case_run "attention.decay=1.5 is out of range, np 2" t_decay_out_of_range
case_run "data.q names a missing file, np 2" t_missing_npy
case_run "data.k names a directory (unreadable as a file), np 2" t_npy_is_directory
case_run "data.v has bad magic, np 2" t_npy_bad_magic
case_run "data.q is float64, np 2" t_npy_float64
case_run "data.k has the wrong shape, np 2" t_npy_wrong_shape
case_run "data.q has the wrong number of dimensions, np 1" t_npy_wrong_ndim
case_run "data.q is in Fortran order, np 2" t_npy_fortran
case_run "data.v is truncated, np 2" t_npy_truncated
case_run "data.k has a truncated header, np 1" t_npy_truncated_header
case_run "output.o in a missing directory, np 2" t_output_dir_missing
case_run "output.results in a missing directory, np 3" t_results_dir_missing
case_run "parallel.ranks=3 with -np 2, np 2" t_ranks_mismatch
case_run "output.o names an existing directory, np 2" t_output_is_directory
case_run "comm.transport=tcp is not allowed (reported once), np 2" t_bad_transport
case_run "a key given twice in a YAML file, np 2" t_yaml_key_twice
case_run "a YAML file that is a single value, np 1" t_yaml_scalar_document
case_run "YAML syntax error names file:line:column, np 2" t_yaml_syntax
case_run "YAML list value is refused with file:line, np 2" t_yaml_list
case_run "YAML bad enum value names file:line, np 3" t_yaml_bad_value
case_run "missing experiment file, np 2" t_yaml_missing_file
case_run "unknown command-line option, np 2" t_unknown_option
case_run "unknown option is reported once, np 3" t_unknown_option_once
case_run "spar with no arguments exits 2" t_no_arguments
case_run "spar with an unknown command exits 2" t_unknown_command
case_run "config check on a bad file exits 2 (no mpirun)" t_config_check_bad_value
case_run "config check: kv_heads not dividing heads exits 2" t_config_check_kv
case_run "config check on a good file exits 0 and prints ok" t_config_check_good
case_run "config check without a file exits 2" t_config_needs_file

GEN=(run --set run.mode=generate --set attention.heads=2 --set attention.head_dim=8
     --set model.layers=1 --set model.vocab=20 --set workload.batch=2)
t_generate_bad_prompts() {
    "$PYTHON3" -c "import numpy as np; np.save('$TMP/p.npy', np.array([[1, 99, -1], [3, 4, 5]], dtype=np.int32))" ||
        fail "numpy could not write the prompts"
    expect_exit 2 2 'key workload\.prompts: request 0, position 1: token 99 \(allowed: 0 \.\. model\.vocab-1 = 19' -- \
        "${GEN[@]}" --set workload.prompts="$TMP/p.npy"
    "$PYTHON3" -c "import numpy as np; np.save('$TMP/f.npy', np.zeros((2, 3), dtype=np.float32))"
    expect_exit 2 2 "key workload\.prompts: '.*f\.npy' is <f4 .* \(allowed: int32 <i4" -- \
        "${GEN[@]}" --set workload.prompts="$TMP/f.npy"
}
t_generate_bad_keys() {
    expect_exit 2 0 'key attention\.head_dim: 7 with run\.mode=generate \(allowed: an even number' -- \
        "${GEN[@]}" --set attention.head_dim=7
    expect_exit 2 2 'key parallel\.attention_ranks: 2 in a job of 2 ranks \(allowed: 1 to 1' -- \
        "${GEN[@]}" --set parallel.attention_ranks=2
    expect_exit 2 0 "key workload\.prompt_lengths: '3,x' \(allowed: up to 256 comma-separated" -- \
        "${GEN[@]}" --set workload.prompt_lengths=3,x
    expect_exit 2 0 "key parallel\.method: 'offload' with run\.mode=attention" -- \
        run --set parallel.method=offload
    expect_exit 2 0 'a rank would hold .* GiB \(weights .* GiB, KV cache .* GiB\) but this host has .* GiB of memory' -- \
        "${GEN[@]}" --set model.vocab=16777216 --set attention.head_dim=4096 --set attention.heads=16
    printf 'sweep:\n  sequence.length: []\n' >"$TMP/empty-sweep.yaml"
    expect_exit 2 0 'sweep: key sequence\.length: an empty list \(allowed: one or more values\)' -- \
        config check "$TMP/empty-sweep.yaml"
}
case_run "generate: bad prompt files exit 2 on every rank, naming request and token" \
    t_generate_bad_prompts
case_run "generate: bad model and workload keys exit 2" t_generate_bad_keys
finish
