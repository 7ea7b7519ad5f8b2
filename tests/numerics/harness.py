"""What the numerics checks share: running spar under mpirun, and comparing a tensor with
its float64 reference (relative L2 error <= 1e-5 and every element within bounds).

Importing it exits 77 (ctest's "skipped") when numpy is missing.
"""
import json
import os
import subprocess
import sys

try:
    import numpy as np
except ImportError:
    print("SKIP: numpy is not installed (Debian: apt-get install python3-numpy)")
    sys.exit(77)

REL_L2_TOL = 1e-5
# Element bounds: |got - ref| <= ATOL * max(rms(ref), 1) + RTOL * |ref|. The absolute part
# follows the tensor's size because linear-attention outputs grow with N (no softmax
# normalisation); for softmax outputs (rms <= 1) it is plain ATOL.
ATOL, RTOL = 1e-5, 1e-4


def require_environment():
    for var in ("SPAR", "MPIEXEC"):
        if not os.environ.get(var):
            print(f"SKIP: {var} is not set (run through ctest)")
            sys.exit(77)


def rel_l2(got, ref):
    """Relative L2 error; absolute where the reference is zero (dq of a one-token
    sequence is exactly zero)."""
    scale = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / (scale if scale > 1e-6 else 1.0))


def check_close(name, got, ref, label):
    got = got.astype(np.float64)
    err = rel_l2(got, ref)
    rms = float(np.sqrt(np.mean(ref * ref))) if ref.size else 0.0
    bad = np.abs(got - ref) > ATOL * max(rms, 1.0) + RTOL * np.abs(ref)
    if err > REL_L2_TOL or bad.any() or not np.isfinite(got).all():
        worst = np.argsort(-np.nan_to_num(np.abs(got - ref), nan=np.inf).ravel())[:5]
        for i in worst:
            idx = np.unravel_index(i, ref.shape)
            print(f"  worst {name}{list(idx)}: got {got[idx]!r} ref {ref[idx]!r}")
        raise AssertionError(f"{label}: {name} relative L2 error {err:.3e} "
                             f"(tolerance {REL_L2_TOL}), {int(bad.sum())} elements out of bounds")
    return err


def awkward_length(np_ranks, base):
    """A length >= base that neither P nor 2P divides (for P > 1), and for P >= 3 with
    N mod P >= 2: then a middle rank (rank 1) holds a longer chunk than N // P and passes
    on what arrived from rank 0, so code that assumes N // P everywhere shows."""
    n = base
    while np_ranks > 1 and (n % np_ranks == 0 or n % (2 * np_ranks) == 0 or
                            (np_ranks >= 3 and n % np_ranks < 2)):
        n += 1
    return n


def run_spar(np_ranks, sets, tmp, expect_rc=0):
    cmd = [os.environ["MPIEXEC"], "-np", str(np_ranks), "--oversubscribe", os.environ["SPAR"],
           "run"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=240)
    if proc.returncode != expect_rc:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
        raise AssertionError(f"spar exited {proc.returncode} (expected {expect_rc}): "
                             f"{' '.join(cmd)}")
    return proc


def last_record(path):
    with open(path) as f:
        return json.loads(f.readlines()[-1])
