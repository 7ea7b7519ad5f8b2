#!/usr/bin/env python3
"""Softmax attention, forward and backward, through real mpirun against float64 NumPy.

For one rank count (--np), both methods (ring, allgather), every partition, causal and
not, and several awkward shapes (N divisible by neither P nor 2P, odd head dims, GQA and
MQA), this writes random inputs as .npy files, runs `spar run` on them, and compares o,
lse, dq, dk and dv with a NumPy float64 computation of the same attention and its
gradient. Each tensor must have relative L2 error <= 1e-5 and every element within
atol + rtol*|ref|. It also checks that ring and allgather agree with each other, that the
bytes each rank sent equal the formulas of DESIGN.md 3.2-3.3, the random-input path with
run.verify=true, and the local method (the kernel on the whole sequence).

Environment: SPAR (the binary), MPIEXEC (mpirun). Exits 77 when numpy is missing.
"""
import argparse
import json
import os
import tempfile

from harness import (REL_L2_TOL, awkward_length, check_close, np, rel_l2,
                     require_environment, run_spar)


def reference(q, k, v, dout, causal, scale):
    """o, lse, dq, dk, dv in float64, written without any blocking or merging: the
    textbook softmax attention and its gradient for loss = sum(o * dout)."""
    n, h, d = q.shape
    g = k.shape[1]
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    o, dq = np.empty((n, h, d)), np.empty((n, h, d))
    lse = np.empty((n, h))
    dk, dv = np.zeros((n, g, d)), np.zeros((n, g, d))
    mask = np.tril(np.ones((n, n), dtype=bool)) if causal else np.ones((n, n), dtype=bool)
    for head in range(h):
        kv = head // (h // g)
        s = np.where(mask, scale * q64[:, head, :] @ k64[:, kv, :].T, -np.inf)
        m = s.max(axis=1, keepdims=True)
        e = np.exp(s - m)
        denom = e.sum(axis=1, keepdims=True)
        p = e / denom
        o[:, head, :] = p @ v64[:, kv, :]
        lse[:, head] = (m + np.log(denom))[:, 0]
        dp = do64[:, head, :] @ v64[:, kv, :].T
        ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
        dq[:, head, :] = scale * ds @ k64[:, kv, :]
        dk[:, kv, :] += scale * ds.T @ q64[:, head, :]
        dv[:, kv, :] += p.T @ do64[:, head, :]
    return {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def chunk_lengths(n, parts):
    return [n // parts + (c < n % parts) for c in range(parts)]


def local_lengths(n, p, partition):
    if partition == "zigzag":
        c = chunk_lengths(n, 2 * p)
        return [c[r] + c[2 * p - 1 - r] for r in range(p)]
    return chunk_lengths(n, p)  # contiguous and stripe hold the same counts


def expected_bytes(method, n, p, g, d, partition):
    """Bytes each rank sends per pass (DESIGN.md 3.2-3.3), fp32, K and V together."""
    lengths = local_lengths(n, p, partition)
    per_token = 2 * g * d * 4
    if p == 1:
        return [0], [0]
    if method == "ring":  # every block but rank+1's goes on; gradients make one more hop
        fwd = [per_token * (n - lengths[(r + 1) % p]) for r in range(p)]
        return fwd, [f + per_token * n for f in fwd]
    fwd = [per_token * (p - 1) * lengths[r] for r in range(p)]  # allgather
    return fwd, [f + per_token * (n - lengths[r]) for r, f in enumerate(fwd)]


def file_case(np_ranks, tmp, rng, n, h, g, d, partition, causal, method="ring", scale=None,
              backward=True):
    q = rng.standard_normal((n, h, d)).astype(np.float32)
    k = rng.standard_normal((n, g, d)).astype(np.float32)
    v = rng.standard_normal((n, g, d)).astype(np.float32)
    dout = rng.standard_normal((n, h, d)).astype(np.float32)
    for name, arr in (("q", q), ("k", k), ("v", v), ("do", dout)):
        np.save(os.path.join(tmp, f"{name}.npy"), arr)
    outputs = ["o", "lse"] + (["dq", "dk", "dv"] if backward else [])
    sets = {
        "attention.heads": h, "attention.kv_heads": g, "attention.head_dim": d,
        "attention.causal": str(causal).lower(), "sequence.length": n,
        "sequence.partition": partition, "parallel.method": method,
        "data.q": "q.npy", "data.k": "k.npy", "data.v": "v.npy",
        "run.query_block": 7, "run.backward": str(backward).lower(),
        "output.results": "case.jsonl",
    }
    if backward:
        sets["data.do"] = "do.npy"
    sets.update({f"output.{name}": f"{name}.npy" for name in outputs})
    if scale is not None:
        sets["attention.scale"] = scale
    if os.path.exists(os.path.join(tmp, "case.jsonl")):
        os.remove(os.path.join(tmp, "case.jsonl"))
    run_spar(np_ranks, sets, tmp)
    ref = reference(q, k, v, dout, causal, scale if scale is not None else 1 / np.sqrt(d))
    label = (f"np={np_ranks} {method} {partition} causal={causal} N={n} H={h} G={g} d={d}"
             f"{'' if scale is None else f' scale={scale}'}")
    got, errors = {}, []
    for name in outputs:
        got[name] = np.load(os.path.join(tmp, f"{name}.npy"))
        assert got[name].dtype == np.float32 and got[name].shape == ref[name].shape, \
            (name, got[name].dtype, got[name].shape)
        errors.append(check_close(name, got[name], ref[name], label))
    if method != "local":
        with open(os.path.join(tmp, "case.jsonl")) as f:
            record = json.loads(f.read())
        fwd, bwd = expected_bytes(method, n, np_ranks, g, d, partition)
        assert record["forward"]["bytes_sent_per_rank"] == fwd, (record["forward"], fwd)
        if backward:
            assert record["backward"]["bytes_sent_per_rank"] == bwd, (record["backward"], bwd)
    print(f"ok - {label}: rel L2 " + " ".join(f"{n} {e:.1e}" for n, e in zip(outputs, errors)))
    return max(errors), got


def verify_case(np_ranks, tmp):
    """Random inputs generated on each rank, checked by the built-in verification."""
    n = awkward_length(np_ranks, 301)
    results = os.path.join(tmp, "results.jsonl")
    worst = 0.0
    for method in ("ring", "allgather"):
        run_spar(np_ranks, {"sequence.length": n, "attention.heads": 4,
                            "attention.kv_heads": 2, "attention.head_dim": 40,
                            "run.verify": "true", "run.backward": "true",
                            "parallel.method": method, "output.results": results}, tmp)
        with open(results) as f:
            record = json.loads(f.readlines()[-1])
        err = max(record["rel_err"].values())
        assert record["verified"] and err <= REL_L2_TOL, record
        print(f"ok - np={np_ranks} {method} random inputs with run.verify (forward and "
              f"backward): rel L2 {err:.2e}")
        worst = max(worst, err)
    return worst


def memory_case(np_ranks, tmp):
    """No rank holds an N_local x N score matrix: at N=12288 one would take 288 MiB at two
    ranks, while the whole process (MPI included) must stay under 96 MiB. (Not under the
    sanitizers, whose shadow memory and quarantine make resident memory say nothing.)"""
    if os.environ.get("SPAR_SANITIZED"):
        print("skip - peak memory under AddressSanitizer measures the sanitizer")
        return
    n = 12288
    results = os.path.join(tmp, "memory.jsonl")
    for method in ("ring", "allgather"):
        run_spar(np_ranks, {"sequence.length": n, "attention.heads": 1,
                            "attention.head_dim": 4, "run.backward": "true",
                            "parallel.method": method, "output.results": results}, tmp)
        with open(results) as f:
            peak = max(json.loads(f.readlines()[-1])["peak_mib_per_rank"])
        score_mib = (n // np_ranks) * n * 4 / 2**20
        assert peak < 96, f"{method}: peak {peak:.1f} MiB per rank"
        print(f"ok - np={np_ranks} {method} N={n}: peak {peak:.1f} MiB per rank, "
              f"an N_local x N score matrix alone would be {score_mib:.0f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, required=True, help="MPI ranks")
    parser.add_argument("--seed", type=int, default=20261125)
    args = parser.parse_args()
    require_environment()
    rng = np.random.default_rng(args.seed + args.np)
    shapes = [(4, 2, 24), (3, 1, 40), (2, 2, 80), (6, 3, 33)]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, partition in enumerate(("contiguous", "zigzag", "stripe")):
            for causal in (True, False):
                h, g, d = shapes[(2 * i + causal) % len(shapes)]
                n = awkward_length(args.np, 37 + 29 * i + 11 * args.np)
                results = {}
                for method in ("ring", "allgather"):  # the same inputs for both
                    case_rng = np.random.default_rng(args.seed + 1000 * args.np + 10 * i + causal)
                    err, results[method] = file_case(args.np, tmp, case_rng, n, h, g, d,
                                                     partition, causal, method=method)
                    worst = max(worst, err)
                for name, a in results["ring"].items():
                    b = results["allgather"][name]
                    err = rel_l2(a.astype(np.float64), b.astype(np.float64))
                    assert err <= REL_L2_TOL, (name, err)
                print(f"ok - ring and allgather agree ({partition}, causal={causal})")
        err, _ = file_case(args.np, tmp, rng, awkward_length(args.np, 53), 2, 1, 1, "zigzag",
                           True, scale=0.7)
        worst = max(worst, err)
        # The smallest legal sequences: one token per rank, and N < 2P for zigzag.
        for n, h, g, d, part, method in ((args.np, 2, 1, 5, "zigzag", "ring"),
                                         (args.np + 1, 2, 2, 3, "stripe", "allgather")):
            err, _ = file_case(args.np, tmp, rng, n, h, g, d, part, True, method=method)
            worst = max(worst, err)
        if args.np == 1:
            for causal in (True, False):
                err, _ = file_case(1, tmp, rng, 45, 4, 2, 24, "contiguous", causal,
                                   method="local")
                worst = max(worst, err)
        worst = max(worst, verify_case(args.np, tmp))
        if args.np == 2:
            memory_case(args.np, tmp)
    print(f"largest relative L2 error at np={args.np}: {worst:.3e}")


if __name__ == "__main__":
    main()
