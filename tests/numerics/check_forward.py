#!/usr/bin/env python3
"""Softmax attention forward through real mpirun against an independent float64 reference.

For one rank count (--np), every partition, causal and not, and several awkward shapes
(N divisible by neither P nor 2P, odd head dims, GQA and MQA), this writes random inputs
as .npy files, runs `spar run` on them, and compares o and lse with a NumPy float64
computation of the same attention. Each case must have relative L2 error <= 1e-5 and
every element within atol + rtol*|ref|. Also runs the random-input path with
run.verify=true and the local method (the kernel on the whole sequence).

Environment: SPAR (the binary), MPIEXEC (mpirun). Exits 77 when numpy is missing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
except ImportError:
    print("SKIP: numpy is not installed (Debian: apt-get install python3-numpy)")
    sys.exit(77)

REL_L2_TOL = 1e-5
ATOL, RTOL = 1e-5, 1e-4


def reference(q, k, v, causal, scale):
    """o [N,H,d], lse [N,H] in float64, written without any blocking or merging."""
    n, h, d = q.shape
    g = k.shape[1]
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    o = np.empty((n, h, d))
    lse = np.empty((n, h))
    mask = np.tril(np.ones((n, n), dtype=bool)) if causal else np.ones((n, n), dtype=bool)
    for head in range(h):
        kv = head // (h // g)
        s = scale * q64[:, head, :] @ k64[:, kv, :].T
        s = np.where(mask, s, -np.inf)
        m = s.max(axis=1, keepdims=True)
        p = np.exp(s - m)
        denom = p.sum(axis=1, keepdims=True)
        o[:, head, :] = (p / denom) @ v64[:, kv, :]
        lse[:, head] = (m + np.log(denom))[:, 0]
    return o, lse


def rel_l2(got, ref):
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300))


def check_close(name, got, ref, label):
    err = rel_l2(got.astype(np.float64), ref)
    bad = np.abs(got - ref) > ATOL + RTOL * np.abs(ref)
    if err > REL_L2_TOL or bad.any():
        worst = np.argsort(-np.abs(got - ref).ravel())[:5]
        for i in worst:
            idx = np.unravel_index(i, ref.shape)
            print(f"  worst {name}{list(idx)}: got {got[idx]!r} ref {ref[idx]!r}")
        raise AssertionError(f"{label}: {name} relative L2 error {err:.3e} "
                             f"(tolerance {REL_L2_TOL}), {int(bad.sum())} elements out of bounds")
    return err


def awkward_length(np_ranks, base):
    """A length >= base that neither P nor 2P divides (for P > 1)."""
    n = base
    while np_ranks > 1 and (n % np_ranks == 0 or n % (2 * np_ranks) == 0):
        n += 1
    return n


def run_spar(np_ranks, sets, tmp):
    cmd = [os.environ["MPIEXEC"], "-np", str(np_ranks), "--oversubscribe", os.environ["SPAR"],
           "run"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
        raise AssertionError(f"spar exited {proc.returncode}: {' '.join(cmd)}")
    return proc


def file_case(np_ranks, tmp, rng, n, h, g, d, partition, causal, method="ring", scale=None):
    q = rng.standard_normal((n, h, d)).astype(np.float32)
    k = rng.standard_normal((n, g, d)).astype(np.float32)
    v = rng.standard_normal((n, g, d)).astype(np.float32)
    for name, arr in (("q", q), ("k", k), ("v", v)):
        np.save(os.path.join(tmp, f"{name}.npy"), arr)
    sets = {
        "attention.heads": h, "attention.kv_heads": g, "attention.head_dim": d,
        "attention.causal": str(causal).lower(), "sequence.length": n,
        "sequence.partition": partition, "parallel.method": method,
        "data.q": "q.npy", "data.k": "k.npy", "data.v": "v.npy",
        "output.o": "o.npy", "output.lse": "lse.npy", "run.query_block": 7,
    }
    if scale is not None:
        sets["attention.scale"] = scale
    run_spar(np_ranks, sets, tmp)
    o = np.load(os.path.join(tmp, "o.npy"))
    lse = np.load(os.path.join(tmp, "lse.npy"))
    assert o.dtype == np.float32 and o.shape == (n, h, d), (o.dtype, o.shape)
    assert lse.dtype == np.float32 and lse.shape == (n, h), (lse.dtype, lse.shape)
    ref_o, ref_lse = reference(q, k, v, causal, scale if scale is not None else 1 / np.sqrt(d))
    label = (f"np={np_ranks} {method} {partition} causal={causal} N={n} H={h} G={g} d={d}"
             f"{'' if scale is None else f' scale={scale}'}")
    e1 = check_close("o", o, ref_o, label)
    e2 = check_close("lse", lse, ref_lse, label)
    print(f"ok - {label}: rel L2 o {e1:.2e} lse {e2:.2e}")
    return max(e1, e2)


def verify_case(np_ranks, tmp):
    """Random inputs generated on each rank, checked by the built-in verification."""
    n = awkward_length(np_ranks, 301)
    results = os.path.join(tmp, "results.jsonl")
    run_spar(np_ranks, {"sequence.length": n, "attention.heads": 4, "attention.kv_heads": 2,
                        "attention.head_dim": 40, "run.verify": "true",
                        "output.results": results}, tmp)
    with open(results) as f:
        record = json.loads(f.readlines()[-1])
    err = max(record["rel_err_o"], record["rel_err_lse"])
    assert record["verified"] and err <= REL_L2_TOL, record
    # Ring traffic: each rank forwards every block except the one of rank+1, as K and V
    # (G=2, d=40, fp32). Zigzag lengths: chunks r and 2P-1-r of 2P near-equal chunks.
    chunks = [n // (2 * np_ranks) + (c < n % (2 * np_ranks)) for c in range(2 * np_ranks)]
    lengths = [chunks[r] + chunks[2 * np_ranks - 1 - r] for r in range(np_ranks)]
    expected = [0 if np_ranks == 1 else 2 * 2 * 40 * 4 * (n - lengths[(r + 1) % np_ranks])
                for r in range(np_ranks)]
    assert record["bytes_sent_per_rank"] == expected, (record["bytes_sent_per_rank"], expected)
    print(f"ok - np={np_ranks} random inputs with run.verify: rel L2 {err:.2e}, "
          f"ring bytes per rank {expected}")
    return err


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, required=True, help="MPI ranks")
    parser.add_argument("--seed", type=int, default=20261125)
    args = parser.parse_args()
    for var in ("SPAR", "MPIEXEC"):
        if not os.environ.get(var):
            print(f"SKIP: {var} is not set (run through ctest)")
            sys.exit(77)
    rng = np.random.default_rng(args.seed + args.np)
    shapes = [(4, 2, 24), (3, 1, 40), (2, 2, 80), (6, 3, 33)]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, partition in enumerate(("contiguous", "zigzag", "stripe")):
            for causal in (True, False):
                h, g, d = shapes[(2 * i + causal) % len(shapes)]
                n = awkward_length(args.np, 37 + 29 * i + 11 * args.np)
                worst = max(worst, file_case(args.np, tmp, rng, n, h, g, d, partition, causal))
        worst = max(worst, file_case(args.np, tmp, rng, awkward_length(args.np, 53), 2, 1, 1,
                                     "zigzag", True, scale=0.7))
        # The smallest legal sequences: one token per rank, and N < 2P for zigzag.
        worst = max(worst, file_case(args.np, tmp, rng, args.np, 2, 1, 5, "zigzag", True))
        worst = max(worst, file_case(args.np, tmp, rng, args.np + 1, 2, 2, 3, "stripe", True))
        if args.np == 1:
            for causal in (True, False):
                worst = max(worst, file_case(1, tmp, rng, 45, 4, 2, 24, "contiguous", causal,
                                             method="local"))
        worst = max(worst, verify_case(args.np, tmp))
    print(f"largest relative L2 error at np={args.np}: {worst:.3e}")


if __name__ == "__main__":
    main()
