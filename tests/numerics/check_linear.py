#!/usr/bin/env python3
"""Linear attention, forward and backward, through real mpirun against float64 NumPy.

For one rank count (--np), the methods lasp2, lasp1 and local, causal and not, decays 0.9,
1 and alibi, and several awkward shapes (N divisible by neither P nor 2P, odd head dims,
GQA and MQA, H=6 with alibi, chunks spanning several 64-token blocks of the blocked
kernel), this writes random inputs as .npy files, runs `spar run` on them, and compares o,
dq, dk and dv with a NumPy float64 computation of the same attention and its gradient
(loss = sum(o * dout)). Each tensor must have relative L2 error <= 1e-5 and every element
within atol*rms(ref) + rtol*|ref|. It also checks that the three methods agree with each
other, that the bytes each rank sent match engine/spar.h (LASP-2: (P-1) Hs d^2 4 per pass
whatever N; LASP-1: one state along the chain, or P-1 hops of a rotation without the
mask), two regressions of the released LASP-2 code (the intra-chunk term is there; the
diagonal block is masked), and the random-input path with run.verify=true.

Environment: SPAR (the binary), MPIEXEC (mpirun). Exits 77 when numpy is missing.
"""
import argparse
import os
import tempfile

from harness import (REL_L2_TOL, awkward_length, check_close, last_record, np,
                     rel_l2, require_environment, run_spar)


OUTPUTS = ("o", "dq", "dk", "dv")


def alibi_decays(h):
    """lambda_h = exp(-slope_h) with the ALiBi slopes, written from the rule itself: for H a
    power of two 2^(-8(h+1)/H); else the slopes of the nearest lower power of two p,
    followed by every other slope of 2p."""
    p = 1
    while 2 * p <= h:
        p *= 2
    slopes = [2.0 ** (-8.0 * (i + 1) / p) for i in range(p)]
    slopes += [2.0 ** (-8.0 * (2 * t + 1) / (2 * p)) for t in range(h - p)]
    return np.exp(-np.array(slopes))


def decays_of(decay, h):
    return alibi_decays(h) if decay == "alibi" else np.full(h, float(decay))


def reference(q, k, v, dout, causal, lambdas):
    """o, dq, dk, dv in float64, written without chunks, blocks or states: per head the
    dense matrix A = (Q K^T) (.) D with D_ij = lambda_h^(i-j) for j <= i, else 0 (causal)
    or A = Q K^T (no mask, no decay); O = A V and its gradient for loss = sum(O * dout)."""
    n, h, d = q.shape
    g = k.shape[1]
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    o, dq = np.empty((n, h, d)), np.empty((n, h, d))
    dk, dv = np.zeros((n, g, d)), np.zeros((n, g, d))
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for head in range(h):
        kv = head // (h // g)
        if causal:
            dmat = np.where(j <= i, float(lambdas[head]) ** np.maximum(i - j, 0).astype(float),
                            0.0)
        else:
            dmat = np.ones((n, n))
        a = (q64[:, head, :] @ k64[:, kv, :].T) * dmat
        o[:, head, :] = a @ v64[:, kv, :]
        dv[:, kv, :] += a.T @ do64[:, head, :]
        da = (do64[:, head, :] @ v64[:, kv, :].T) * dmat
        dq[:, head, :] = da @ k64[:, kv, :]
        dk[:, kv, :] += da.T @ q64[:, head, :]
    return {"o": o, "dq": dq, "dk": dk, "dv": dv}


def chunk_bounds(n, p):
    """[start, end) of every rank's contiguous chunk (the first n % p get one more)."""
    lengths = [n // p + (c < n % p) for c in range(p)]
    starts = np.cumsum([0] + lengths)
    return [(int(starts[c]), int(starts[c + 1])) for c in range(p)]


def state_heads(h, g, lambdas, causal=True):
    """G when every head decays alike (or nothing decays: non-causal), else H."""
    return g if not causal or np.all(lambdas == lambdas[0]) else h


def expected_bytes(method, causal, p, h, g, d, lambdas):
    """Bytes each rank sends per pass (engine/spar.h): forward, backward."""
    state = state_heads(h, g, lambdas, causal) * d * d * 4
    if p == 1:
        return [0], [0]
    if method == "lasp2" or not causal:  # one all-gather, or P-1 hops of a rotation
        return [(p - 1) * state] * p, [(p - 1) * state] * p
    fwd = [state if r < p - 1 else 0 for r in range(p)]  # lasp1: the chain r -> r+1
    bwd = [state if r > 0 else 0 for r in range(p)]      # and back, r -> r-1
    return fwd, bwd


def make_inputs(rng, n, h, g, d):
    """Standard normal q, k, v, dout in float32 (q and k scaled by d^-1/4 so that q.k is
    of order one whatever d)."""
    s = float(d) ** -0.25
    return {"q": (s * rng.standard_normal((n, h, d))).astype(np.float32),
            "k": (s * rng.standard_normal((n, g, d))).astype(np.float32),
            "v": rng.standard_normal((n, g, d)).astype(np.float32),
            "do": rng.standard_normal((n, h, d)).astype(np.float32)}


def spar_file_run(np_ranks, tmp, inputs, causal, decay, method, backward=True, kernel=None):
    """Run spar on the given inputs; returns the outputs and the result record."""
    n, h, d = inputs["q"].shape
    g = inputs["k"].shape[1]
    for name, arr in inputs.items():
        np.save(os.path.join(tmp, f"{name}.npy"), arr)
    outputs = ["o"] + (["dq", "dk", "dv"] if backward else [])
    sets = {
        "attention.type": "linear", "attention.heads": h, "attention.kv_heads": g,
        "attention.head_dim": d, "attention.causal": str(causal).lower(),
        "attention.decay": decay, "sequence.length": n, "parallel.method": method,
        "data.q": "q.npy", "data.k": "k.npy", "data.v": "v.npy",
        "run.backward": str(backward).lower(), "output.results": "case.jsonl",
    }
    if backward:
        sets["data.do"] = "do.npy"
    if kernel is not None:
        sets["run.kernel"] = kernel
    sets.update({f"output.{name}": f"{name}_out.npy" for name in outputs})
    for name in outputs + ["case"]:
        path = os.path.join(tmp, f"{name}_out.npy" if name != "case" else "case.jsonl")
        if os.path.exists(path):
            os.remove(path)
    run_spar(np_ranks, sets, tmp)
    got = {}
    for name in outputs:
        got[name] = np.load(os.path.join(tmp, f"{name}_out.npy"))
        shape = inputs["q" if name in ("o", "dq") else "k"].shape
        assert got[name].dtype == np.float32 and got[name].shape == shape, \
            (name, got[name].dtype, got[name].shape)
    return got, last_record(os.path.join(tmp, "case.jsonl"))


def file_case(np_ranks, tmp, inputs, causal, decay, method, backward=True, kernel=None,
              ref=None, tag=""):
    """One run checked against the reference and, for lasp1/lasp2, the byte formulas."""
    n, h, d = inputs["q"].shape
    g = inputs["k"].shape[1]
    lambdas = decays_of(decay, h)
    got, record = spar_file_run(np_ranks, tmp, inputs, causal, decay, method, backward, kernel)
    if ref is None:
        ref = reference(inputs["q"], inputs["k"], inputs["v"], inputs["do"], causal, lambdas)
    label = (f"np={np_ranks} {method} causal={causal} decay={decay} N={n} H={h} G={g} d={d}"
             f"{'' if kernel is None else f' kernel={kernel}'}{tag}")
    errors = {name: check_close(name, got[name], ref[name], label) for name in got}
    assert record["rel_err"].get("lse") is None, record["rel_err"]
    if method != "local":
        fwd, bwd = expected_bytes(method, causal, np_ranks, h, g, d, lambdas)
        assert record["forward"]["bytes_sent_per_rank"] == fwd, \
            (label, record["forward"]["bytes_sent_per_rank"], fwd)
        if backward:
            assert record["backward"]["bytes_sent_per_rank"] == bwd, \
                (label, record["backward"]["bytes_sent_per_rank"], bwd)
    print(f"ok - {label}: rel L2 " + " ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    return max(errors.values()), got


def methods_case(np_ranks, tmp, inputs, causal, decay, kernel=None):
    """lasp2, lasp1 and local on the same inputs: each against the reference, then with
    each other."""
    lambdas = decays_of(decay, inputs["q"].shape[1])
    ref = reference(inputs["q"], inputs["k"], inputs["v"], inputs["do"], causal, lambdas)
    worst, results = 0.0, {}
    for method in ("lasp2", "lasp1", "local"):
        err, results[method] = file_case(np_ranks, tmp, inputs, causal, decay, method,
                                         kernel=kernel, ref=ref)
        worst = max(worst, err)
    for a, b in (("lasp2", "lasp1"), ("lasp2", "local"), ("lasp1", "local")):
        for name in OUTPUTS:
            err = rel_l2(results[a][name].astype(np.float64), results[b][name].astype(np.float64))
            assert err <= REL_L2_TOL, (a, b, name, err)
    print(f"ok - lasp2, lasp1 and local agree (causal={causal}, decay={decay})")
    return worst


def bytes_independent_of_n(np_ranks, tmp):
    """LASP-2 sends (P-1) Hs d^2 4 bytes per rank and pass at N and at 4N alike."""
    n = awkward_length(np_ranks, 50)
    h, g, d = 4, 2, 12
    results = os.path.join(tmp, "bytes.jsonl")
    for decay in ("alibi",):  # Hs = H here; the file cases check Hs = G at many N
        lambdas = decays_of(decay, h)
        fwd, bwd = expected_bytes("lasp2", True, np_ranks, h, g, d, lambdas)
        seen = []
        for length in (n, 4 * n):
            run_spar(np_ranks, {"attention.type": "linear", "attention.heads": h,
                                "attention.kv_heads": g, "attention.head_dim": d,
                                "attention.decay": decay, "sequence.length": length,
                                "parallel.method": "lasp2", "run.backward": "true",
                                "output.results": results}, tmp)
            record = last_record(results)
            seen.append((record["forward"]["bytes_sent_per_rank"],
                         record["backward"]["bytes_sent_per_rank"]))
        assert seen[0] == seen[1] == (fwd, bwd), (decay, seen, fwd, bwd)
        print(f"ok - np={np_ranks} lasp2 decay={decay}: {fwd[0]} bytes per rank and pass at "
              f"N={n} and N={4 * n} (Hs={state_heads(h, g, lambdas)})")


def intra_chunk_case(np_ranks, tmp, rng):
    """Regression: the released LASP-2 code left out the intra-chunk term. With decay 0.05
    and long chunks the contributions across chunks vanish and o is the intra-chunk term
    almost entirely; it must match the reference tightly."""
    n = awkward_length(np_ranks, min(400, 100 * np_ranks))
    h, g, d = 2, 1, 16
    inputs = make_inputs(rng, n, h, g, d)
    lambdas = decays_of(0.05, h)
    ref = reference(inputs["q"], inputs["k"], inputs["v"], inputs["do"], True, lambdas)
    # The case is what it says: o computed inside each chunk alone is o to within 1%
    # (only the first tokens of a chunk see the previous one, with weights 0.05^k); without
    # the intra-chunk term the error would be of order one.
    intra = np.concatenate([reference(*(inputs[x][a:b] for x in ("q", "k", "v", "do")), True,
                                      lambdas)["o"] for a, b in chunk_bounds(n, np_ranks)])
    assert rel_l2(intra, ref["o"]) < 1e-2 and np.linalg.norm(ref["o"]) > 1.0
    worst = 0.0
    for method in ("lasp2", "lasp1"):
        err, _ = file_case(np_ranks, tmp, inputs, True, 0.05, method, ref=ref,
                           tag=" (intra-chunk term dominates)")
        worst = max(worst, err)
    return worst


def diagonal_mask_case(np_ranks, tmp, rng):
    """Regression: the released LASP-2 code did not mask the diagonal block, so a token saw
    the values of later tokens of its own chunk. (a) v of the second half of every chunk is
    1e3 times larger: o of the first halves must still match the reference on its own
    (its scale is that of the small values); (b) changing v of one token t leaves o of every
    token before t bit-identical, and changes o_t."""
    n = awkward_length(np_ranks, min(400, 90 * np_ranks))
    h, g, d = 4, 2, 8
    bounds = chunk_bounds(n, np_ranks)
    inputs = make_inputs(rng, n, h, g, d)
    first_half = np.zeros(n, dtype=bool)
    for a, b in bounds:
        mid = (a + b) // 2
        inputs["v"][mid:b] *= 1e3
        first_half[a:mid] = True
    worst = 0.0
    for method, decay in (("lasp2", 0.9), ("lasp1", "alibi")):
        lambdas = decays_of(decay, h)
        ref = reference(inputs["q"], inputs["k"], inputs["v"], inputs["do"], True, lambdas)
        tag = " (v x1e3 in the second half of every chunk)"
        err, got = file_case(np_ranks, tmp, inputs, True, decay, method, ref=ref, tag=tag)
        err_first = check_close("o[first halves]", got["o"][first_half],
                                ref["o"][first_half], f"np={np_ranks} {method}{tag}")
        print(f"ok - np={np_ranks} {method} decay={decay}: o of the first halves of the "
              f"chunks alone: rel L2 {err_first:.1e}")
        worst = max(worst, err, err_first)
    # (b) perturbation: the last token of every chunk, and a token inside a 64-token block
    # of the first chunk (past its first block when the chunk has one). LASP-1 shares the
    # chunk's own work with LASP-2 (the kernel's linear_fwd_local), so LASP-2 alone.
    base_inputs = make_inputs(rng, n, h, g, d)
    targets = [b - 1 for a, b in bounds] + [min(bounds[0][0] + 70, bounds[0][1] - 2)]
    method = "lasp2"
    base, _ = spar_file_run(np_ranks, tmp, base_inputs, True, "alibi", method, False)
    for t in targets:
        perturbed = {k: v.copy() for k, v in base_inputs.items()}
        perturbed["v"][t] = perturbed["v"][t] * 7.0 + 100.0
        got, _ = spar_file_run(np_ranks, tmp, perturbed, True, "alibi", method, False)
        same = got["o"][:t].tobytes() == base["o"][:t].tobytes()
        assert same, (f"np={np_ranks} {method}: changing v of token {t} changed o of "
                      f"earlier tokens (first at token "
                      f"{int(np.argmax(np.any(got['o'][:t] != base['o'][:t], axis=(1, 2))))})")
        assert np.any(got["o"][t] != base["o"][t]), (method, t, "o_t did not change")
    print(f"ok - np={np_ranks} {method}: changing v of token t (t in {targets}) leaves o "
          f"of every earlier token bit-identical")
    return worst


def verify_case(np_ranks, tmp):
    """Random inputs generated on each rank, checked by the built-in verification."""
    n = awkward_length(np_ranks, 301)
    results = os.path.join(tmp, "results.jsonl")
    worst = 0.0
    for method in ("lasp1", "lasp2"):
        run_spar(np_ranks, {"attention.type": "linear", "sequence.length": n,
                            "attention.heads": 4, "attention.kv_heads": 2,
                            "attention.head_dim": 32, "attention.decay": "alibi",
                            "run.verify": "true", "run.verify_tol": REL_L2_TOL,
                            "run.backward": "true", "parallel.method": method,
                            "output.results": results}, tmp)
        record = last_record(results)
        errs = record["rel_err"]
        assert errs.get("lse") is None, errs
        err = max(errs[name] for name in OUTPUTS)
        assert record["verified"] and err <= REL_L2_TOL, record
        print(f"ok - np={np_ranks} {method} random inputs with run.verify (forward and "
              f"backward): rel L2 {err:.2e}")
        worst = max(worst, err)
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--np", type=int, required=True, help="MPI ranks")
    parser.add_argument("--seed", type=int, default=20261126)
    args = parser.parse_args()
    require_environment()
    p = args.np
    rng = np.random.default_rng(args.seed + p)
    # (H, G, d): GQA, MQA with an odd head dim, H=6 (alibi: not a power of two).
    shapes = {0.9: (4, 2, 24), 1: (3, 1, 5), "alibi": (6, 3, 33)}
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for causal in (True, False):
            for i, decay in enumerate((0.9, 1, "alibi")):
                h, g, d = shapes[decay] if causal else shapes[(1, "alibi", 0.9)[i]]
                n = awkward_length(p, 37 + 13 * i + 11 * p)
                inputs = make_inputs(rng, n, h, g, d)
                worst = max(worst, methods_case(p, tmp, inputs, causal, decay))
        # Chunks that span several 64-token blocks of the blocked kernel; and the scalar
        # kernel on them.
        n = awkward_length(p, min(400, max(300, 97 * p)))
        inputs = make_inputs(rng, n, 4, 2, 33)
        worst = max(worst, methods_case(p, tmp, inputs, True, "alibi"))
        err, _ = file_case(p, tmp, inputs, True, "alibi", "lasp2", kernel="scalar")
        worst = max(worst, err)
        inputs = make_inputs(rng, n, 3, 1, 24)
        worst = max(worst, methods_case(p, tmp, inputs, True, 0.9))
        # The smallest legal sequence, one token per rank; and a forward-only run.
        inputs = make_inputs(rng, p, 2, 1, 5)
        worst = max(worst, methods_case(p, tmp, inputs, True, 0.9))
        inputs = make_inputs(rng, awkward_length(p, 45), 2, 2, 7)
        for method in ("lasp2", "lasp1"):
            err, _ = file_case(p, tmp, inputs, True, "alibi", method, backward=False)
            worst = max(worst, err)
        bytes_independent_of_n(p, tmp)
        worst = max(worst, intra_chunk_case(p, tmp, rng))
        worst = max(worst, diagonal_mask_case(p, tmp, rng))
        worst = max(worst, verify_case(p, tmp))
        if p == 1:  # linear attention has no log-sum-exp: asking for it is bad input
            proc = run_spar(1, {"attention.type": "linear", "sequence.length": 8,
                                "output.lse": "lse.npy"}, tmp, expect_rc=2)
            assert "output.lse" in proc.stdout + proc.stderr
            print("ok - output.lse with attention.type=linear is refused (exit 2)")
    print(f"largest relative L2 error at np={p}: {worst:.3e}")


if __name__ == "__main__":
    main()
