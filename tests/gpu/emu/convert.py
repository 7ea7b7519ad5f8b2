#!/usr/bin/env python3
"""convert.py: rewrites a kernels/cuda .cu file as C++ for the CPU emulation (include/):
dynamic shared memory becomes a pointer to the block's buffer, and each launch
kernel<<<grid, block, smem, stream>>>(args) becomes emu::launch(kernel, {...})(args).

    python3 convert.py IN.cu OUT.cpp
"""
import os
import re
import sys

src = open(sys.argv[1]).read()
src = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];",
             r"\1 *\2 = (\1 *)emu_dyn_smem;", src)
src = re.sub(r"(\w+(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\(", r"emu::launch(\1, emu::Cfg{\2})(", src)
os.makedirs(os.path.dirname(os.path.abspath(sys.argv[2])), exist_ok=True)
with open(sys.argv[2], "w") as out:
    out.write("// generated from %s by tests/gpu/emu/convert.py: do not edit\n" % sys.argv[1])
    out.write(src)
