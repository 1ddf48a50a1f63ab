"""Compile Triton kernels for sm_90 on a machine without a GPU, and report what the compiler made of each launch:
registers, spills and shared memory (ptxas -v), and the widths of the global loads, stores and async copies in the
PTX. A static look at vectorisation and register pressure between GPU calls; it does not time anything.

    python bench/sm90_compile.py --D 9,64,182 --direction fwd      # linear attention, B=16, H=8, T=4096, Dv=64
    python bench/sm90_compile.py --D 9,182 --windows --tma         # q/k windows for ragged D, TMA loads
    python bench/sm90_compile.py --op glm --precision bf16x3       # subspace-HVP GLM kernel, m = n = 16384, s = 256

Launches are captured from the real host code (the grid planned for 132 SMs), then compiled as a launch on an
sm_90 GPU would specialise them, with Triton's own ptxas (the one a GPU run uses). The spill bytes are ptxas'
static counts; the per-loop lines show the local-memory stores / loads (STL / LDL) and wgmma instructions inside
each loop of the SASS that holds wgmma (nvdisasm), i.e. what a hot loop pays per iteration. Caveat: a GPU's own
compile took different paths for some options (e.g. load stages) in earlier sessions, so confirm what matters with
a timing.
Needs TRITON_INTERPRET unset.
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

TARGET = GPUTarget("cuda", 90, 32)   # (backend, compute capability, warp size)
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"   # Triton's bundled ptxas and nvdisasm


def _captured(module, call) -> list[tuple]:
    """Run ``call()`` with every ``*_kernel`` of ``module`` replaced by a recorder: (name, kernel, args, meta) of
    each launch, in order; nothing runs."""
    seen = []

    class Capture:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append((self.name, self.kernel, args, meta))
            return launch

    names = [n for n in dir(module) if n.endswith("_kernel")]
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, Capture(n, saved[n]))
        call()
    finally:
        for n, kern in saved.items():
            setattr(module, n, kern)
    return seen


def launches(direction: str, B: int, H: int, T: int, D: int, Dv: int, layout: str) -> list[tuple]:
    """Every kernel launch of one linear-attention forward (or backward) call."""
    def make(d):
        shape = (B, T, H, d) if layout == "bthd" else (B, H, T, d)
        x = torch.zeros(shape, dtype=torch.bfloat16)
        return x.transpose(1, 2) if layout == "bthd" else x
    q, k, v = make(D), make(D), make(Dv)

    def call():
        if direction == "fwd":
            tri.forward(q, k, v, None, None, None, True, True, 1e-6)
        else:
            tri.backward(make(Dv), None, None, q, k, v, torch.ones(B, H, T), None, None, None, True, True, 1e-6)
    return _captured(tri._k, call)


def glm_launches(m: int, n: int, s: int, precision: str, generated: bool, sketch: str = "gaussian") -> list[tuple]:
    """The GLM kernel's launch for one subspace-HVP call (sigmoid-MSE + nonconvex regulariser; P given [s, n] or
    generated from a seed), as glm() plans it; only its first stage depth is captured (glm() tries fewer on
    OutOfResources). A given P is Gaussian or Rademacher (``sketch``: fp16x3 then skips the a_hi p_lo product)."""
    from fastattn.ops.subspace_hvp import LOSSES, REGULARISERS, make_sketch
    from fastattn.ops.subspace_hvp import triton as hvp
    A, x, y = torch.zeros(m, n), torch.zeros(n), torch.zeros(m)
    P = None if generated else make_sketch(sketch, s, n, seed=0).materialize(n)
    with hvp.input_precision(precision):
        return _captured(hvp._k, lambda: hvp.glm(A, x, y, P, s, 1 if generated else 0, 0, 1.0,
                                                LOSSES["sigmoid_mse"].code, REGULARISERS["nonconvex"].code, 1e-3,
                                                1.0))


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
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(cubin)], capture_output=True, text=True)
        sass = subprocess.run([str(_TOOLS / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout \
            if cubin.exists() else ""
    info = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "shared_bytes": compiled.metadata.shared, "ops": dict(sorted(ops.items())), "loops": sass_loops(sass),
            "ptxas": None if regs else info.strip()[-300:],
            # e.g. C7512 "wgmma.mma_async instructions are serialized due to insufficient register resources"
            "warnings": sorted({m.group(1) for m in re.finditer(r"Potential Performance Loss: (.*?) for the", info)})}


def sass_loops(sass: str) -> list[dict]:
    """Each loop of the SASS (a label with a branch back to it): its instructions and the STL / LDL (register
    spills to local memory) and HGMMA (wgmma) among them, outermost last."""
    lines = sass.splitlines()
    starts = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.?(L_x_\d+):", line))}
    out = []
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*?`?\(?\.?(L_x_\d+)", line)
        if m and starts.get(m.group(1), i) < i:
            body = [x for x in lines[starts[m.group(1)]:i + 1] if re.match(r"\s*/\*[0-9a-f]+\*/", x)]
            ops = collections.Counter(m.group(1) for x in body if (m := re.match(
                r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", x)))
            out.append({"instructions": len(body), "STL": ops["STL"], "LDL": ops["LDL"], "HGMMA": ops["HGMMA"],
                        "opcodes": dict(ops.most_common())})
    return sorted(out, key=lambda r: r["instructions"])


def _report(label: str, kernel, args, meta, ptxas: str, keys: tuple[str, ...], histogram: int = 0) -> None:
    flags = {k: meta[k] for k in keys if k in meta}
    r = compile_one(kernel, args, meta, ptxas)
    print(f"{label} {flags}: {r['registers']} regs, spills {r['spill_store_bytes']}/{r['spill_load_bytes']} B, "
          f"shared {r['shared_bytes']} B", flush=True)
    print("    " + ", ".join(f"{k} x{v}" for k, v in r["ops"].items()) + (f"\n    {r['ptxas']}" if r["ptxas"]
                                                                           else ""), flush=True)
    for w in r["warnings"]:
        print(f"    ptxas: {w}", flush=True)
    for lp in (lp for lp in r["loops"] if lp["HGMMA"]):   # the matrix loops (not e.g. the sketch hash's)
        print(f"    loop of {lp['instructions']} instructions: STL {lp['STL']}, LDL {lp['LDL']}, HGMMA {lp['HGMMA']}",
              flush=True)
        if histogram:
            print("      " + " ".join(f"{k} {v}" for k, v in list(lp["opcodes"].items())[:histogram]), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=("linear_attn", "glm"), default="linear_attn")
    p.add_argument("--D", default="9,64,182", help="linear_attn: comma-separated feature dims")
    p.add_argument("--Dv", type=int, default=64)
    p.add_argument("--direction", choices=("fwd", "bwd"), default="fwd")
    p.add_argument("--shape", default=None, help="linear_attn: B,H,T (default 16,8,4096); glm: m,n,s "
                   "(default 16384,16384,256)")
    p.add_argument("--layout", choices=("bthd", "bhtd"), default="bthd")
    p.add_argument("--precision", default="tf32x3", help="glm: the triton INPUT_PRECISION")
    p.add_argument("--stages", default=None, help="comma-separated stage depths to compile instead of the planned")
    p.add_argument("--warps", type=int, default=None, help="warps per program instead of the planned")
    p.add_argument("--widest", type=int, default=None, help="linear_attn: the forward's FWD_MAX_BK (64, 128, 256)")
    p.add_argument("--tma", action="store_true", help="linear_attn: loads through TMA descriptors (FWD_TMA, BWD_TMA)")
    p.add_argument("--windows", action="store_true", help="linear_attn: q/k windows for ragged D (WINDOWS)")
    p.add_argument("--override", default=None,
                   help="glm: CONFIG_OVERRIDE entries, e.g. BM=64,BK=32,warps=8,gram=bf16x3,tma=0")
    p.add_argument("--sketch", choices=("gaussian", "rademacher"), default="gaussian",
                   help="glm: the kind of the given P (rademacher: P's fp16 lo parts are zero, PLO off)")
    p.add_argument("--histogram", type=int, default=0, help="print the N most frequent SASS opcodes of each loop")
    p.add_argument("--ptxas", default=str(_TOOLS / "ptxas"))
    a = p.parse_args()
    tri._num_sms = lambda device: 132   # plan the grid as for an H100 / H200
    if a.widest:
        tri.FWD_MAX_BK = a.widest
    tri.FWD_TMA = tri.BWD_TMA = a.tma
    tri.WINDOWS = a.windows
    warps = {"num_warps": a.warps} if a.warps else {}
    if a.op == "glm":
        from fastattn.ops.subspace_hvp import triton as hvp
        hvp._num_sms = tri._num_sms
        if a.override:
            hvp.CONFIG_OVERRIDE = {k: int(v) if v.lstrip("-").isdigit() else v
                                   for k, v in (kv.split("=") for kv in a.override.split(","))}
        m, n, s = (int(x) for x in (a.shape or "16384,16384,256").split(","))
        for generated in (False, True):
            for name, kernel, args, meta in glm_launches(m, n, s, a.precision, generated, a.sketch):
                for st in [int(x) for x in a.stages.split(",")] if a.stages else [meta["num_stages"]]:
                    _report(f"{a.precision} P {'generated' if generated else 'given'} {name}", kernel, args,
                            {**meta, **warps, "num_stages": st}, a.ptxas,
                            ("BM", "BK", "BS", "ZPRE", "PLO", "num_warps", "num_stages"), a.histogram)
        return 0
    B, H, T = (int(x) for x in (a.shape or "16,8,4096").split(","))
    for D in (int(d) for d in a.D.split(",")):
        for name, kernel, args, meta in launches(a.direction, B, H, T, D, a.Dv, a.layout):
            metas = [{**meta, **warps, "num_stages": int(x)} for x in a.stages.split(",")] if a.stages else \
                [{**meta, **warps}]
            for mt in metas:
                _report(f"D={D} {name}", kernel, args, mt, a.ptxas,
                        ("BK", "BV", "EXACT", "AK", "AV", "WIN", "MODE", "TMA", "num_warps", "num_stages"),
                        a.histogram)
    return 0


if __name__ == "__main__":
    sys.exit(main())
