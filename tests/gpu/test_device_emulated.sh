#!/usr/bin/env bash
# test_device_emulated.sh SPAR_EMU NP: `spar run --set run.device=cuda` at NP ranks on the
# emulated GPU (spar_emu: the .cu files compiled for the CPU, tests/gpu/emu). The ring
# keeps its tensors in device memory (ring_device.c: pinned staging, uploads on the copy
# stream), allgather stages each kernel call. Every run is checked by spar itself against
# the CPU kernels (run.verify, relative L2 <= 1e-5; bf16 <= 2e-2) on awkward sizes:
# N = 203 (divisible by none of 2, 3, 4), GQA (6 heads, 2 kv heads), head_dim 20 (bf16:
# 24), causal and not, forward and backward. Exit 0 when all pass.
set -u
spar=$1 np=$2
MPIEXEC=${MPIEXEC:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 SPAR_LOG=debug
tmp=$(mktemp -d "${TMPDIR:-/tmp}/spar-emu.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
failed=0

# case NAME DEVICE_RING(yes|no) ARGS...: one verified run.
case_run() {
    local name=$1 resident=$2
    shift 2
    if ! timeout -k 5 240 "$MPIEXEC" -np "$np" --oversubscribe "$spar" run \
        --set run.device=cuda --set run.verify=true --set run.verify_tol=1e-5 \
        --set bench.warmup=0 --set bench.repeats=1 --set run.backward=true \
        --set sequence.length=203 --set attention.heads=6 --set attention.kv_heads=2 \
        --set attention.head_dim=20 "$@" >"$tmp/out" 2>&1; then
        echo "not ok - $name: spar failed"; tail -30 "$tmp/out"; failed=1; return
    fi
    if ! grep -q "verify: passed" "$tmp/out"; then
        echo "not ok - $name: no passed verification"; tail -30 "$tmp/out"; failed=1; return
    fi
    local seen=no
    grep -q "ring backward: tensors in cuda device memory" "$tmp/out" && seen=yes
    if [ "$seen" != "$resident" ]; then
        echo "not ok - $name: device-resident ring used: $seen, expected $resident"
        failed=1; return
    fi
    echo "ok - $name ($(grep -o 'largest relative L2 error [0-9.e+-]*' "$tmp/out"))"
}

case_run "ring, causal, zigzag, np $np" yes --set parallel.method=ring --set attention.causal=true
case_run "ring, not causal, contiguous, np $np" yes --set parallel.method=ring \
    --set attention.causal=false --set sequence.partition=contiguous
case_run "allgather (staged), causal, np $np" no --set parallel.method=allgather \
    --set attention.causal=true
# bf16 storage: the tensor-core kernels (head_dim a multiple of 8) and half the bytes on
# the ring; the inputs' rounding costs about 5e-3 against the fp32 reference.
case_run "ring, bf16, causal, np $np" yes --set parallel.method=ring --set run.dtype=bf16 \
    --set attention.causal=true --set attention.head_dim=24 --set run.verify_tol=2e-2
exit $failed
