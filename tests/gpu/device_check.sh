#!/usr/bin/env bash
# device_check.sh: everything spar's GPU path still needs a GPU for, as one script for one
# short slot (about 15 minutes) on a GPU host that has nvcc, CMake and a C compiler but no
# MPI. Every phase has its own timeout, so a hang costs that phase and not the slot; the
# phases run most valuable first and the script goes on after a failed one.
#
#   here (Debian 12, apt, nvcc):
#     bash tests/gpu/carry-runtime.sh                  # .runtime/: Open MPI etc. to carry
#     bash tests/gpu/device_check.sh --prepare         # .runtime/gpu-bin/: the GPU tests and
#                                                      # bench, built for sm_90 without MPI
#   on the GPU host, in the source tree with .runtime/ carried along (about 45 MiB of
#   runtime and 10-20 MiB of binaries):
#     OUT=/some/folder bash tests/gpu/device_check.sh
#
# Phases, each logged to $OUT/<phase>.log, the summary in $OUT/summary.txt:
#   gpu      nvidia-smi: name, driver, clocks, memory (before anything runs)          30 s
#   kernels  the prepared test_cuda_kernels and test_cuda_linear: every kernel, fp32
#            and bf16, against the scalar oracle                                    2 x 90 s
#   bench    bench_gpu.py: spar vs PyTorch flash SDPA, linear time per token; JSON
#            lines in $OUT/bench.jsonl                                                 200 s
#   mpi      spar run with run.device=cuda and run.verify=true at 1-4 ranks sharing the
#            GPU: ring and allgather, causal and not; lasp2 and lasp1 with decay;
#            forward and backward                                  20 s each, 180 s in all
# Without prepared binaries built from these very sources (checked by sha256), two more:
#   build    the carried runtime's env.sh, then CMake with CUDA (sm_90 only) and the
#            whole tree: spar, the tests                                               300 s
#   ctest    ctest -L gpu in that build (the same tests, built there)                   90 s
# The timeouts are for hangs; a healthy run with prepared binaries takes about 5 minutes.
# Exit 0 when every phase passed, 1 otherwise; 77 when no GPU is visible.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
top="$(cd "$here/../.." && pwd)"
bin="$top/.runtime/gpu-bin"
arch="${SPAR_CUDA_ARCH:-90}"
# What the prepared binaries are built from: they are used only while these are unchanged.
sources="CMakeLists.txt */CMakeLists.txt kernels/kernels.c kernels/kernels.h kernels/cuda/*
    kernels/cpu/*.c kernels/cpu/*.h tests/gpu/*.c tests/gpu/*.h common/* comm/* engine/*
    launcher/*.c launcher/*.h partition/*"

if [ "${1:-}" = "--prepare" ]; then # build the GPU binaries here, without MPI or BLAS
    b="$(mktemp -d "${TMPDIR:-/tmp}/spar-gpu-build.XXXXXX")"
    cmake -S "$top" -B "$b" -DSPAR_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
        -DOPENBLAS_LIB=OPENBLAS_LIB-NOTFOUND -DCMAKE_CUDA_FLAGS=--threads=0 >"$b/configure.log" ||
        { tail -20 "$b/configure.log"; exit 1; }
    cmake --build "$b" -j"$(nproc)" --target test_cuda_kernels test_cuda_linear bench_cuda spar_exe ||
        exit 1
    mkdir -p "$bin"
    cp "$b/tests/test_cuda_kernels" "$b/tests/test_cuda_linear" "$b/tests/bench_cuda" "$b/spar" \
        "$bin/"
    strip "$bin"/test_cuda_* "$bin"/bench_cuda "$bin"/spar # debug info would double the load
    (cd "$top" && sha256sum $sources >"$bin/sources.sha256")
    rm -rf "$b"
    echo "device_check.sh: prepared $(ls "$bin" | tr '\n' ' ')in $bin; .runtime is $(du -sh "$top/.runtime" | cut -f1)"
    exit 0
fi

OUT="${OUT:?set OUT to the folder for logs and results}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
failed=0

# phase NAME SECONDS COMMAND...: runs the command under its own timeout, logs it, notes it.
phase() {
    local name="$1" secs="$2" start rc
    shift 2
    start=$(date +%s)
    timeout -k 10 "$secs" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local verdict=passed
    case $rc in
        0) ;;
        77) verdict=skipped ;;
        124 | 137) verdict="timed out after ${secs}s" failed=1 ;;
        *) verdict="failed (exit $rc)" failed=1 ;;
    esac
    printf '%-22s %-28s %4ss\n' "$name" "$verdict" "$(($(date +%s) - start))" | tee -a "$summary"
    return $rc
}

phase gpu 30 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total,compute_cap --format=csv
nvidia-smi -L >/dev/null 2>&1 || { echo "no GPU visible (nvidia-smi -L failed)" | tee -a "$summary"; exit 77; }

build="$OUT/build"
configure_and_build() {
    [ -f "$top/.runtime/env.sh" ] && . "$top/.runtime/env.sh"
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    cmake -S "$top" -B "$build" -DSPAR_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
        -DCMAKE_CUDA_FLAGS=--threads=0 -DOPENBLAS_LIB=OPENBLAS_LIB-NOTFOUND &&
        cmake --build "$build" -j"$(nproc)"
}

spar="$build/spar"
if [ -x "$bin/test_cuda_kernels" ] && (cd "$top" && sha256sum --quiet -c "$bin/sources.sha256"); then
    phase kernels_softmax 90 "$bin/test_cuda_kernels"
    phase kernels_linear 90 "$bin/test_cuda_linear"
    phase bench 200 python3 "$here/bench_gpu.py" --bench "$bin/bench_cuda" --out "$OUT/bench.jsonl"
    spar="$bin/spar" # built here from the same sources: no build phase needed
else
    echo "no prepared binaries in $bin, or built from other sources: building first" |
        tee -a "$summary"
    phase build 300 bash -c "$(declare -f configure_and_build); top='$top' build='$build' arch='$arch' configure_and_build"
    phase kernels_softmax 90 "$build/tests/test_cuda_kernels"
    phase kernels_linear 90 "$build/tests/test_cuda_linear"
    phase bench 200 python3 "$here/bench_gpu.py" --bench "$build/tests/bench_cuda" --out "$OUT/bench.jsonl"
    phase ctest 90 ctest --test-dir "$build" -L gpu --output-on-failure
fi

# The methods on the GPU at 1-4 ranks sharing it, each verified against the float64
# reference by spar itself.
mpi_runs() {
    [ -f "$top/.runtime/env.sh" ] && . "$top/.runtime/env.sh"
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    local bad=0 np method causal backward
    one() { # one verified run; its first line names it
        echo "== np=$np $*"
        timeout -k 5 20 mpirun -np "$np" --oversubscribe "$spar" run --set run.device=cuda \
            --set run.verify=true --set bench.repeats=1 --set sequence.length=1001 "$@" || bad=1
    }
    for np in 1 2 3 4; do
        for backward in false true; do
            for method in ring allgather; do
                for causal in true false; do
                    one --set parallel.method=$method --set attention.causal=$causal \
                        --set run.backward=$backward --set attention.heads=8 \
                        --set attention.kv_heads=2 --set attention.head_dim=64
                done
            done
            for method in lasp2 lasp1; do
                one --set attention.type=linear --set parallel.method=$method \
                    --set attention.decay=0.99 --set run.backward=$backward \
                    --set attention.heads=4 --set attention.kv_heads=4 --set attention.head_dim=64
            done
        done
    done
    echo "mpi runs: $([ $bad = 0 ] && echo all verified || echo SOME FAILED)"
    return $bad
}
[ -x "$spar" ] && phase mpi 180 bash -c "$(declare -f mpi_runs); top='$top' spar='$spar' mpi_runs"

echo "logs and results in $OUT" | tee -a "$summary"
exit $failed
