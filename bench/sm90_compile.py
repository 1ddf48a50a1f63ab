"""Compile the Triton linear-attention kernels for sm_90 on a machine without a GPU, and report what the compiler
made of each launch: registers, spills and shared memory (ptxas -v), and the widths of the global loads, stores
and async copies in the PTX. A static look at vectorisation and register pressure between GPU calls; it does not
time anything.

    python bench/sm90_compile.py --D 9,64,182 --direction fwd      # B=16, H=8, T=4096, Dv=64, bf16, "bthd"

Caveat: the numbers are those of this machine's Triton and ptxas for an sm_90a target; a GPU's own compile took
different paths for some options (e.g. load stages) in earlier sessions, so confirm what matters with a timing.
Needs ptxas (CUDA toolkit; --ptxas, default /usr/local/cuda/bin/ptxas) and TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sm90_compile: unset TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from fastattn.ops.linear_attn import triton as tri  # noqa: E402

TARGET = GPUTarget("cuda", 90, 128)


def launches(direction: str, B: int, H: int, T: int, D: int, Dv: int, layout: str) -> list[tuple]:
    """Every kernel launch of one forward (or backward) call, captured instead of run: (name, kernel, args,
    meta)."""
    seen = []

    class Capture:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append((self.name, self.kernel, args, meta))
            return launch

    names = [n for n in dir(tri._k) if n.endswith("_kernel")]
    saved = {n: getattr(tri._k, n) for n in names}
    try:
        for n in names:
            setattr(tri._k, n, Capture(n, saved[n]))

        def make(d):
            shape = (B, T, H, d) if layout == "bthd" else (B, H, T, d)
            x = torch.zeros(shape, dtype=torch.bfloat16)
            return x.transpose(1, 2) if layout == "bthd" else x
        q, k, v = make(D), make(D), make(Dv)
        if direction == "fwd":
            tri.forward(q, k, v, None, None, None, True, True, 1e-6)
        else:
            den = torch.ones(B, H, T)
            tri.backward(make(Dv), None, None, q, k, v, den, None, None, None, True, True, 1e-6)
    finally:
        for n, kern in saved.items():
            setattr(tri._k, n, kern)
    return seen


def compile_one(kernel, args, meta, ptxas: str) -> dict:
    """Specialise as a launch on an sm_90 GPU would (16-byte pointer alignment, ints divisible by 16) and compile."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, spec, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    ops = collections.Counter()
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:@%p\d+\s+)?(ld\.global[\w.]*|st\.global[\w.]*|cp\.async[\w.]*)\s", line)
        if m:
            op = m.group(1)
            if op.startswith("cp.async.c"):   # cp.async.{ca,cg}.shared.global [dst], [src], bytes, src-size
                size = re.search(r"\],\s*(0x[0-9a-f]+|\d+)\s*,", line)
                op += f" {int(size.group(1), 0)}B" if size else ""
            ops[op] += 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    info = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "shared_bytes": compiled.metadata.shared, "ops": dict(sorted(ops.items())),
            "ptxas": None if regs else info.strip()[-300:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--D", default="9,64,182", help="comma-separated feature dims")
    p.add_argument("--Dv", type=int, default=64)
    p.add_argument("--direction", choices=("fwd", "bwd"), default="fwd")
    p.add_argument("--shape", default="16,8,4096", help="B,H,T")
    p.add_argument("--layout", choices=("bthd", "bhtd"), default="bthd")
    p.add_argument("--ptxas", default="/usr/local/cuda/bin/ptxas")
    a = p.parse_args()
    B, H, T = (int(x) for x in a.shape.split(","))
    tri._num_sms = lambda device: 132   # plan the grid as for an H100 / H200
    for D in (int(d) for d in a.D.split(",")):
        for name, kernel, args, meta in launches(a.direction, B, H, T, D, a.Dv, a.layout):
            keys = ("BK", "BV", "EXACT", "AK", "AV", "MODE", "num_warps", "num_stages")
            flags = {k: meta[k] for k in keys if k in meta}
            r = compile_one(kernel, args, meta, a.ptxas)
            print(f"D={D} {name} {flags}: {r['registers']} regs, spills {r['spill_store_bytes']}/"
                  f"{r['spill_load_bytes']} B, shared {r['shared_bytes']} B", flush=True)
            print("    " + ", ".join(f"{k} x{v}" for k, v in r["ops"].items()) + (f"\n    {r['ptxas']}" if r["ptxas"]
                                                                                   else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
