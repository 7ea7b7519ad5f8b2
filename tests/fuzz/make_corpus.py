#!/usr/bin/python3
"""make_corpus.py: writes the seed corpus and dictionaries of tests/fuzz.

    /usr/bin/python3 tests/fuzz/make_corpus.py      # from the repository root

Seeds are small valid inputs and near misses (one thing wrong) for each harness:
  corpus/yaml            configs/*.yaml and hand-written experiment files
  corpus/keys            lines of KEY=VALUE as --set takes them
  corpus/npy             .npy files written by numpy, one per dtype and shape kind the
                         reader meets, and hand-made headers (versions 2.0 and 3.0, bad ones)
  corpus/plan            RunPlan messages (launcher/plan.proto) packed here by hand
  corpus/offload_header  StepHeader messages (engine/offload.proto) packed here by hand
Protobuf messages are encoded here (varints, length-delimited fields) so that nothing
beyond numpy and PyYAML is needed; the key table is read from launcher/launcher.h.
Inputs that once broke a parser are kept beside the seeds as regression-*: this script
never removes them. Rerun it after a change to the key table or the .proto files.
"""
import io
import os
import re
import struct
import sys

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "fuzz")
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def key_table():
    """(name, type, default) of every key of SPAR_KEY_LIST, in table order."""
    text = open(os.path.join(ROOT, "launcher", "launcher.h")).read()
    rows = re.findall(r'X\(\w+,\s*"([^"]+)",\s*(BOOL|INT|FLOAT|ENUM|STRING),\s*"([^"]*)"', text)
    if len(rows) < 40:
        sys.exit("make_corpus.py: cannot read the key table from launcher/launcher.h")
    return rows


# --- protobuf, by hand --------------------------------------------------------------------
def varint(x):
    x &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = x & 0x7F
        x >>= 7
        out.append(b | (0x80 if x else 0))
        if not x:
            return bytes(out)


def field_varint(n, x):
    return varint(n << 3) + varint(x)


def field_bytes(n, b):
    b = b.encode() if isinstance(b, str) else b
    return varint(n << 3 | 2) + varint(len(b)) + b


def field_double(n, x):
    return varint(n << 3 | 1) + struct.pack("<d", x)


def packed(n, values):
    return field_bytes(n, b"".join(varint(v) for v in values))


def int_value(text):
    shift = {"K": 10, "M": 20, "G": 30}.get(text[-1:].upper(), 0)
    return int(text[:-1] if shift else text) << shift


def setting(name, ktype, value):
    """One Setting of the value (text as a file would give it) for its key type."""
    body = field_bytes(1, name)
    if ktype == "BOOL":
        return body + field_varint(2, 1 if str(value).lower() in ("true", "1", "yes", "on") else 0)
    if ktype == "INT":
        return body + field_varint(3, int_value(str(value)))
    if ktype == "FLOAT":
        word = str(value) in ("auto", "alibi")
        return body + field_double(4, float("nan") if word else float(value))
    return body + field_bytes(5, str(value))


def plan(values, keys, schema=1, world=4, config="configs/x.yaml", drop=None, extra=b""):
    out = field_varint(1, schema) + field_varint(2, world) + field_bytes(3, config)
    for name, ktype, default in keys:
        if name != drop:
            out += field_bytes(4, setting(name, ktype, values.get(name, default)))
    return out + extra


def flatten(tree, prefix=""):
    flat = {}
    for k, v in tree.items():
        key = prefix + str(k)
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        elif not isinstance(v, list) and key != "include":
            flat[key] = "true" if v is True else "false" if v is False else v
    return flat


def step_header(version=1, step=0, mb=0, rank=0, ids=(), pos=(), stop=False):
    out = field_varint(1, version) if version else b""
    out += field_varint(2, step) if step else b""
    out += field_varint(3, mb) if mb else b""
    out += field_varint(4, rank) if rank else b""
    out += packed(5, ids) if ids else b""
    out += packed(6, pos) if pos else b""
    return out + (field_varint(7, 1) if stop else b"")


# --- the seeds of each harness --------------------------------------------------------------
YAML_BY_HAND = {
    "flat-keys.yaml": "attention.heads: 4\nsequence.length: 32K\nrun.verify: true\n",
    "sweep.yaml": "attention:\n  heads: 4\nsweep:\n  sequence.length: [1K, 2K, 4K]\n"
                  "  parallel.method: ring\n",
    "flow-style.yaml": "{attention: {heads: 2, kv_heads: 1}, run: {name: 'a b'}}\n",
    "include.yaml": "include: base.yaml\nattention.heads: 2\n",
    "documents.yaml": "---\nattention.heads: 2\n...\n",
    "near-list-value.yaml": "attention:\n  heads: [1, 2]\n",
    "near-anchor.yaml": "a: &x 1\nattention.heads: *x\n",
    "near-twice.yaml": "attention.heads: 2\nattention:\n  heads: 3\n",
    "near-unknown-key.yaml": "attention.haeds: 2\n",
    "near-bad-value.yaml": "attention.scale: -1\nattention.decay: 2\n",
    "near-deep.yaml": "a:\n b:\n  c:\n   d:\n    e:\n     f:\n      g:\n       h:\n        i: 1\n",
    "near-scalar.yaml": "just a value\n",
    "near-syntax.yaml": "attention: {heads: 2\n",
    "near-empty-sweep.yaml": "sweep:\n  attention.heads: []\n",
    "near-include-late.yaml": "attention.heads: 2\ninclude: base.yaml\n",
}

KEYS_BY_HAND = {
    "ints.txt": "attention.heads=16\nsequence.length=64K\nparallel.ranks=0\n",
    "floats.txt": "attention.scale=auto\nattention.decay=alibi\nrun.verify_tol=1e-6\n",
    "enums.txt": "parallel.method=allgather\nrun.kernel=scalar\nrun.progress=lines\n",
    "strings.txt": "run.name=a b=c\ndata.q=/tmp/q.npy\nworkload.prompt_lengths=1,2,3\n",
    "bools.txt": "run.backward=yes\nrun.verify=OFF\nattention.causal=0\n",
    "near.txt": "attention.heads=0\nsequence.length=1T\n=x\nnokey\nattention.scale=nan\n"
                "model.rope_base=1\nattention.heads=9223372036854775807K\n",
}


def npy_bytes(arr, fortran=False):
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(arr) if fortran else arr)
    return buf.getvalue()


def npy_by_hand(major, dict_text, data=b""):
    prefix = 10 if major == 1 else 12
    n = len(dict_text) + 1
    pad = (64 - (prefix + n) % 64) % 64
    head = (dict_text + " " * pad + "\n").encode()
    size = struct.pack("<H" if major == 1 else "<I", len(head))
    return b"\x93NUMPY" + bytes([major, 0]) + size + head + data


def npy_seeds():
    rng = np.random.default_rng(1)
    seeds = {
        "f4-3d.npy": npy_bytes(rng.standard_normal((4, 2, 3)).astype("<f4")),
        "f4-2d.npy": npy_bytes(rng.standard_normal((3, 5)).astype("<f4")),
        "f4-1d.npy": npy_bytes(np.arange(6, dtype="<f4")),
        "f4-scalar.npy": npy_bytes(np.float32(1.5)),
        "f4-empty.npy": npy_bytes(np.zeros((0, 4), dtype="<f4")),
        "f4-fortran.npy": npy_bytes(rng.standard_normal((3, 4)).astype("<f4"), fortran=True),
        "i4-prompts.npy": npy_bytes(np.array([[1, 2, 3], [4, -1, -1]], dtype="<i4")),
        "f8-2d.npy": npy_bytes(np.ones((2, 2), dtype="<f8")),
        "big-endian-f4.npy": npy_bytes(np.ones((2, 2), dtype=">f4")),
        "v2-f4.npy": npy_by_hand(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }",
                                 b"\0" * 8),
        "v3-f4.npy": npy_by_hand(3, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                                 b"\0" * 4),
        "near-9d.npy": npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" %
                                   ", ".join(["1"] * 9)),
        "near-no-shape.npy": npy_by_hand(1, "{'descr': '<f4', 'fortran_order': False, }"),
        "near-long-descr.npy": npy_by_hand(
            1, "{'descr': '<f4xxxxxxxxxxxxxxxx', 'fortran_order': False, 'shape': (1,), }"),
        "near-version-0.npy": b"\x93NUMPY\x00\x00\x10\x00{'descr'",
        "near-truncated.npy": npy_bytes(np.ones((2, 2), dtype="<f4"))[:40],
        "near-bad-magic.npy": b"\x93NUMPZ\x01\x00\x00\x00",
    }
    for name, data in seeds.items():
        write("npy", name, data)


def main():
    for target in ("yaml", "keys", "npy", "plan", "offload_header"):
        d = os.path.join(CORPUS, target)
        if os.path.isdir(d):  # seeds are rewritten; regression inputs stay
            for name in os.listdir(d):
                if not name.startswith("regression-"):
                    os.remove(os.path.join(d, name))
    keys = key_table()
    configs = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(configs)):
        if name.endswith(".yaml"):
            write("yaml", name, open(os.path.join(configs, name), "rb").read())
            flat = flatten(yaml.safe_load(open(os.path.join(configs, name))) or {})
            flat = {k: v for k, v in flat.items() if any(k == n for n, _, _ in keys)}
            write("plan", name.replace(".yaml", ".bin"), plan(flat, keys))
    for name, text in YAML_BY_HAND.items():
        write("yaml", name, text)
    for name, text in KEYS_BY_HAND.items():
        write("keys", name, text)
    npy_seeds()
    write("plan", "defaults.bin", plan({}, keys))
    write("plan", "near-schema-2.bin", plan({}, keys, schema=2))
    write("plan", "near-missing-key.bin", plan({}, keys, drop="attention.heads"))
    write("plan", "near-repeated-key.bin",
          plan({}, keys, extra=field_bytes(4, setting("attention.heads", "INT", "2"))))
    write("plan", "near-wrong-type.bin",
          plan({}, keys, drop="run.name", extra=field_bytes(4, setting("run.name", "INT", "2"))))
    write("plan", "near-truncated.bin", plan({}, keys)[:100])
    write("offload_header", "admit.bin", step_header(ids=[0, 4, 8], pos=[200, 350, 120]))
    write("offload_header", "decode.bin",
          step_header(step=3, mb=1, rank=2, ids=[1, 5], pos=[352, 122]))
    write("offload_header", "stop.bin", step_header(step=32, rank=1, stop=True))
    write("offload_header", "near-version-2.bin", step_header(version=2, ids=[0], pos=[5]))
    write("offload_header", "near-counts-differ.bin", step_header(ids=[0, 1], pos=[5]))
    write("offload_header", "near-too-many.bin",
          step_header(ids=list(range(65)), pos=[1] * 65))
    with open(os.path.join(HERE, "keys.dict"), "w") as f:
        f.write("# the key table's names (make_corpus.py)\n")
        for name, _, _ in keys:
            f.write('"%s="\n' % name)
        for word in ("true", "false", "auto", "alibi", "K", "M", "G", "1e-300", "nan", "inf"):
            f.write('"%s"\n' % word)
    with open(os.path.join(HERE, "yaml.dict"), "w") as f:
        f.write("# the key table's names and YAML punctuation (make_corpus.py)\n")
        for name, _, _ in keys:
            f.write('"%s: "\n' % name)
        for part in sorted({n.split(".")[0] for n, _, _ in keys} | {"sweep", "include"}):
            f.write('"%s:"\n' % part)
        for tok in ("\\x0a  ", "- ", "[", "]", "{", "}", "&a ", "*a", "!!str ", "---", "...",
                    "? ", "'", "\\x22", "#"):
            f.write('"%s"\n' % tok)


if __name__ == "__main__":
    main()
