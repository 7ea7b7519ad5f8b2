#!/usr/bin/env python3
"""Greedy generation (run.mode=generate): spar's local decode against a float64 NumPy
decoder on the same weights, then offloaded decode against local decode.

Weights and prompts are written by NumPy (model.weights, workload.prompts), so the
loaders are checked too. The reference is teacher-forced on spar's own tokens: every
logit row spar produced must match the float64 row (relative L2 <= 1e-5), and each
generated token must be the float64 argmax up to a rounding-sized margin. Offloaded
decode (K = 1, 2, 3 attention ranks; head and position splits; MHA and GQA; 1 and 2
micro-batches; 1 and 2 compute ranks; prompts of different lengths) must give the same
tokens as local decode over 64 steps and logits within 1e-5; its bytes per token per
layer must equal the formula. A control message that lies about a position must be
rejected with an error naming the sender and the field, and an attention rank that stops
answering must end the job after comm.timeout with an error naming it.

  check_decode.py --np P    runs the offload cases that fit P ranks (P = 1: reference)
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import REL_L2_TOL, last_record, rel_l2, require_environment, run_spar  # noqa: E402

import numpy as np  # noqa: E402

STEPS = 64


def make_model(d, rng, layers, H, G, hd, D, F, V):
    """Writes the weights as .npy files; returns them as float64 arrays."""
    w = {"embed": rng.standard_normal((V, D)), "final_norm": 1 + 0.1 * rng.standard_normal(D),
         "lm_head": rng.standard_normal((D, V)) / np.sqrt(D)}
    shapes = {"attn_norm": (D,), "wq": (D, H * hd), "wk": (D, G * hd), "wv": (D, G * hd),
              "wo": (H * hd, D), "ffn_norm": (D,), "w_gate": (D, F), "w_up": (D, F),
              "w_down": (F, D)}
    for l in range(layers):
        for name, shape in shapes.items():
            if len(shape) == 1:
                x = 1 + 0.1 * rng.standard_normal(shape)
            else:
                x = rng.standard_normal(shape) / np.sqrt(shape[0])
            w[f"layers.{l}.{name}"] = x
    for name, x in w.items():
        x32 = x.astype(np.float32)
        np.save(os.path.join(d, name + ".npy"), x32)
        w[name] = x32.astype(np.float64)
    return w


def rms(x, g, eps=1e-5):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def rope(x, pos, base=10000.0):
    """x [n, heads, d]: rotate halves (e, e + d/2) by pos * base^(-2e/d)."""
    d = x.shape[-1]
    half = d // 2
    ang = pos[:, None] * base ** (-2.0 * np.arange(half) / d)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def reference_logits(w, tokens, layers, H, G, hd):
    """float64 logits [n, V] of a whole token sequence (causal, teacher-forced)."""
    n = len(tokens)
    pos = np.arange(n, dtype=np.float64)
    x = w["embed"][tokens]
    mask = np.tril(np.ones((n, n), dtype=bool))
    for l in range(layers):
        p = f"layers.{l}."
        h = rms(x, w[p + "attn_norm"])
        q = rope((h @ w[p + "wq"]).reshape(n, H, hd), pos)
        k = rope((h @ w[p + "wk"]).reshape(n, G, hd), pos)
        v = (h @ w[p + "wv"]).reshape(n, G, hd)
        k, v = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)
        s = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(hd)
        s = np.where(mask[None], s, -np.inf)
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        o = np.einsum("hij,jhd->ihd", s, v).reshape(n, H * hd)
        x = x + o @ w[p + "wo"]
        h = rms(x, w[p + "ffn_norm"])
        g = h @ w[p + "w_gate"]
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "w_up"])) @ w[p + "w_down"]
    return rms(x, w["final_norm"]) @ w["lm_head"]


def problem(tmp, name, H, G, hd, lengths, layers=2, V=61, seed=0):
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    D, F = H * hd, 40
    w = make_model(d, rng, layers, H, G, hd, D, F, V)
    B, L = len(lengths), max(lengths)
    prompts = np.full((B, L), -1, dtype=np.int32)
    for b, n in enumerate(lengths):
        prompts[b, :n] = rng.integers(0, V, n)
    np.save(os.path.join(d, "prompts.npy"), prompts)
    sets = {"run.mode": "generate", "attention.heads": H, "attention.kv_heads": G,
            "attention.head_dim": hd, "model.layers": layers, "model.hidden": D,
            "model.ffn": F, "model.vocab": V, "model.weights": d,
            "workload.batch": B, "workload.prompts": os.path.join(d, "prompts.npy"),
            "workload.generate": STEPS}
    return {"dir": d, "w": w, "sets": sets, "prompts": prompts, "lengths": lengths,
            "shape": (layers, H, G, hd)}


def run(pb, np_ranks, tag, extra):
    sets = dict(pb["sets"])
    sets.update(extra)
    tok, lg = os.path.join(pb["dir"], f"tok-{tag}.npy"), os.path.join(pb["dir"], f"lg-{tag}.npy")
    res = os.path.join(pb["dir"], "results.jsonl")
    sets.update({"output.tokens": tok, "output.logits": lg, "output.results": res})
    run_spar(np_ranks, sets, pb["dir"])
    return np.load(tok), np.load(lg), last_record(res)


def check_reference(pb):
    tokens, logits, _ = run(pb, 1, "local", {"parallel.method": "local"})
    layers, H, G, hd = pb["shape"]
    worst, margin = 0.0, np.inf
    for b, n in enumerate(pb["lengths"]):
        seq = np.concatenate([pb["prompts"][b, :n], tokens[b]])
        ref = reference_logits(pb["w"], seq[:-1], layers, H, G, hd)[n - 1:]  # one row per token
        for i in range(STEPS):
            top = ref[i].max()
            gap = top - ref[i][tokens[b, i]]
            assert gap <= 1e-4 * max(1.0, abs(top)), \
                f"request {b} step {i}: spar chose {tokens[b, i]}, float64 argmax " \
                f"{ref[i].argmax()} is better by {gap:.3e}"
            second = np.partition(ref[i], -2)[-2]
            margin = min(margin, top - second)
        worst = max(worst, rel_l2(logits[b].astype(np.float64), ref[-1]))
    assert worst <= REL_L2_TOL, f"final logits: relative L2 error {worst:.3e} against float64"
    print(f"ok - local decode vs float64 reference, H={H} G={G} d={hd}: logits rel L2 "
          f"{worst:.2e}, smallest top-2 logit gap {margin:.2e}")
    return tokens, logits


def check_offload(pb, local, np_ranks, k, micro, extra=None):
    extra = extra or {}
    tag = f"off{np_ranks}-{k}-{micro}" + "".join(f"-{v}" for v in extra.values())
    sets = {"parallel.method": "offload", "parallel.attention_ranks": k,
            "parallel.micro_batches": micro}
    sets.update(extra)
    tokens, logits, rec = run(pb, np_ranks, tag, sets)
    label = f"offload np={np_ranks} K={k} split={rec['split']} micro={micro}" + \
        "".join(f" {key}={v}" for key, v in extra.items())
    same = tokens == local[0]
    assert same.all(), f"{label}: tokens differ from local decode at {np.argwhere(~same)[:5]}"
    err = rel_l2(logits.astype(np.float64), local[1].astype(np.float64))
    assert err <= REL_L2_TOL, f"{label}: logits relative L2 {err:.3e} against local decode"
    got, want = rec["bytes_per_token_layer"], rec["bytes_per_token_layer_formula"]
    assert abs(got - want) < 1e-6 * want, f"{label}: {got} bytes per token per layer, formula {want}"
    print(f"ok - {label}: {STEPS} tokens identical, logits rel L2 {err:.2e}, "
          f"{got:.0f} B/token/layer = formula, headers {rec['header_bytes_per_step']:.0f} B/step")


def check_corrupt_header(pb, np_ranks):
    sets = dict(pb["sets"])
    sets.update({"parallel.method": "offload", "parallel.attention_ranks": 1,
                 "workload.generate": 8})
    os.environ["SPAR_TEST_FAULT"] = "header:3"
    try:  # a message that fails its checks is malformed input: exit 2, like a bad file
        proc = run_spar(np_ranks, sets, pb["dir"], expect_rc=2)
    finally:
        del os.environ["SPAR_TEST_FAULT"]
    text = proc.stdout + proc.stderr
    want = "rejects the control message from compute rank 0 (step 3, micro-batch 0): position"
    assert want in text, f"no clear rejection in the output:\n{text[-2000:]}"
    print("ok - a control message with a wrong position is rejected, naming sender and field")


def check_stalled_attention_rank(pb, np_ranks):
    """An attention rank that stops answering (SIGSTOP at step 3): the compute rank gives up
    after comm.timeout, naming it, and the job ends."""
    sets = dict(pb["sets"])
    sets.update({"parallel.method": "offload", "parallel.attention_ranks": 1,
                 "workload.generate": 8, "comm.timeout": 2})
    os.environ["SPAR_TEST_FAULT"] = "stall:3"
    start = time.monotonic()
    try:
        proc = run_spar(np_ranks, sets, pb["dir"], expect_rc=1)
    finally:
        del os.environ["SPAR_TEST_FAULT"]
    took = time.monotonic() - start
    text = proc.stdout + proc.stderr
    want = f"no answer from rank {np_ranks - 1} for 2.0 s (comm.timeout)"
    assert want in text, f"no timeout naming the attention rank:\n{text[-2000:]}"
    assert took < 30, f"the job took {took:.1f} s to stop"
    print(f"ok - a stopped attention rank: the job stops after comm.timeout ({took:.1f} s), "
          f"naming rank {np_ranks - 1}")


def check_killed_attention_rank(pb, np_ranks):
    """An attention rank killed (SIGKILL at step 3): the job ends at once, non-zero, with a
    message naming the lost rank and its host, and leaves no spar process behind."""
    sets = dict(pb["sets"])
    sets.update({"parallel.method": "offload", "parallel.attention_ranks": 1,
                 "workload.generate": 8})
    os.environ["SPAR_TEST_FAULT"] = "die:3"
    start = time.monotonic()
    try:
        cmd = [os.environ["MPIEXEC"], "-np", str(np_ranks), "--oversubscribe", os.environ["SPAR"],
               "run"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        proc = subprocess.run(cmd, cwd=pb["dir"], capture_output=True, text=True, timeout=60)
    finally:
        del os.environ["SPAR_TEST_FAULT"]
    took = time.monotonic() - start
    text = proc.stdout + proc.stderr
    lost = np_ranks - 1
    assert proc.returncode != 0, "a job that lost a rank exited 0"
    assert f"process rank {lost} with PID" in text and "signal 9" in text, text[-2000:]
    assert took < 10, f"the job took {took:.1f} s to stop"
    left = subprocess.run(["pgrep", "-f", pb["dir"]], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left behind: {left}"
    print(f"ok - a killed attention rank: the job stops in {took:.1f} s, naming rank {lost}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--np", type=int, required=True)
    args = ap.parse_args()
    require_environment()
    with tempfile.TemporaryDirectory() as tmp:
        mha = problem(tmp, "mha", H=4, G=4, hd=8, lengths=[5, 13, 1, 9, 7])
        gqa = problem(tmp, "gqa", H=6, G=2, hd=10, lengths=[11, 3, 17, 6], seed=1)
        local = {"mha": check_reference(mha), "gqa": check_reference(gqa)}
        if args.np >= 2:
            check_offload(mha, local["mha"], 2, 1, 1)
            check_offload(gqa, local["gqa"], 2, 1, 2)
            check_corrupt_header(mha, 2)
            check_stalled_attention_rank(mha, 2)
            check_killed_attention_rank(mha, 2)
        if args.np >= 3:
            check_offload(mha, local["mha"], 3, 2, 2)   # heads: 2 kv heads each
            check_offload(gqa, local["gqa"], 3, 2, 1)   # heads: 1 kv head each
            # prompts prefilled by both compute ranks together (the 3-token one alone)
            check_offload(gqa, local["gqa"], 3, 1, 2, {"parallel.prefill": "ring"})
        if args.np >= 4:
            check_offload(mha, local["mha"], 4, 3, 2)   # positions: 3 does not divide 4
            check_offload(gqa, local["gqa"], 4, 3, 2)   # positions, GQA
            check_offload(mha, local["mha"], 4, 2, 2)   # two compute ranks, heads
            check_offload(gqa, local["gqa"], 4, 1, 1)   # three compute ranks
            check_offload(mha, local["mha"], 4, 1, 2, {"parallel.prefill": "allgather"})
            check_offload(gqa, local["gqa"], 4, 2, 1, {"parallel.prefill": "ring",
                                                       "sequence.partition": "contiguous"})


if __name__ == "__main__":
    main()
