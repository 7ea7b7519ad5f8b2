#!/usr/bin/env python3
"""bench_gpu.py: spar's CUDA kernels beside PyTorch's flash attention, in one run.

    python3 tests/gpu/bench_gpu.py --bench BUILD/tests/bench_cuda [--out results.jsonl]

Runs bench_cuda for softmax forward and backward (bf16, N=16384, H=16, d=128, causal and
not) and for the linear-attention forward with decay (bf16, H=16, d=128, N = 8K..64K);
when torch with CUDA is importable, times torch.nn.functional.scaled_dot_product_attention
on the flash backend with the same shapes (layout [1, H, N, d]). Writes JSON lines: one
"gpu" record (name, driver, clocks seen before and after, from nvidia-smi), one per
figure, and one "targets" record with the ratios spar/torch (targets: forward >= 0.5,
backward >= 0.4) and the linear forward's time per token at 64K over 8K (flat: <= 1.25).
Exit 0 when every figure was measured (targets are reported, not enforced), 77 without
a GPU, 1 when a measurement failed.
"""
import argparse
import json
import subprocess
import sys

N, H, D = 16384, 16, 128
LINEAR_N = [8192, 16384, 32768, 65536]


def nvidia_smi():
    """What nvidia-smi says of GPU 0: name, driver, current and maximum clocks."""
    fields = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=" + fields, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia_smi": "unavailable: %s" % e}
    if not out:
        return {"nvidia_smi": "no output"}
    values = [v.strip() for v in out[0].split(",")]
    return dict(zip(fields.split(","), values))


def run_bench(bench, args):
    res = subprocess.run([bench] + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    if res.returncode == 77:
        print(res.stdout.strip())
        sys.exit(77)
    if res.returncode != 0:
        raise RuntimeError("%s %s: exit %d: %s" % (bench, args, res.returncode, res.stderr.strip()))
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def torch_flash(causal, reps=10):
    """Forward and backward TFLOP/s of PyTorch SDPA on the flash backend, or a reason."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        return {"skipped": "torch not importable: %s" % e}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    torch.manual_seed(0)
    mk = lambda: torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(), mk(), mk()
    grad = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
    f = torch.nn.functional.scaled_dot_product_attention

    def timed(fn):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[reps // 2]

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fwd = timed(lambda: f(q, k, v, is_causal=causal))
        out = f(q, k, v, is_causal=causal)
        bwd = timed(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
    flops = 4.0 * N * N * H * D * (0.5 if causal else 1.0)
    return {"torch": torch.__version__, "fwd_ms": fwd, "bwd_ms": bwd,
            "fwd_tflops": flops / fwd / 1e9, "bwd_tflops": 2.5 * flops / bwd / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", required=True, help="path of the bench_cuda program")
    ap.add_argument("--out", help="append the JSON lines to this file too")
    ap.add_argument("--reps", type=int, default=10)
    opts = ap.parse_args()
    records = [dict({"record": "gpu", "when": "before"}, **nvidia_smi())]
    figures = {}
    for causal in (0, 1):
        for r in run_bench(opts.bench, ["softmax", N, H, D, causal, "bf16", opts.reps]):
            records.append(r)
            figures[(r["kind"], bool(causal))] = r
        t = torch_flash(bool(causal), opts.reps)
        records.append(dict({"bench": "torch_sdpa_flash", "n": N, "heads": H, "head_dim": D,
                             "dtype": "bf16", "causal": bool(causal)}, **t))
        figures[("torch", bool(causal))] = t
    linear = {}
    for n in LINEAR_N:
        for r in run_bench(opts.bench, ["linear", n, H, D, "bf16", opts.reps]):
            records.append(r)
            linear[n] = r["ns_per_token"]
    targets = {"record": "targets"}
    for causal in (False, True):
        t = figures.get(("torch", causal), {})
        tag = "causal" if causal else "full"
        for kind, key, goal in (("softmax_fwd", "fwd_tflops", 0.5), ("softmax_bwd", "bwd_tflops", 0.4)):
            mine = figures[(kind, causal)]["tflops"]
            if key in t:
                ratio = mine / t[key]
                targets["%s_%s_ratio" % (kind, tag)] = round(ratio, 3)
                targets["%s_%s_met" % (kind, tag)] = ratio >= goal
    flat = linear[LINEAR_N[-1]] / linear[LINEAR_N[0]]
    targets["linear_ns_per_token_64k_over_8k"] = round(flat, 3)
    targets["linear_flat_met"] = flat <= 1.25
    records.append(targets)
    records.append(dict({"record": "gpu", "when": "after"}, **nvidia_smi()))
    lines = [json.dumps(r) for r in records]
    print("\n".join(lines))
    if opts.out:
        with open(opts.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, KeyError, subprocess.SubprocessError) as e:
        print("bench_gpu.py: %s" % e, file=sys.stderr)
        sys.exit(1)
