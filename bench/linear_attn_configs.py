"""Probe of the Triton forward/backward launch configs: load stages, the widest forward feature tile, the T split
rule and forced splits, each against the default at the same shape, in one process (cudagraph timer, bf16, "bthd").

    python bench/linear_attn_configs.py --out DIR      # compiles every variant in parallel processes first
    python bench/linear_attn_configs.py --variants a16,w8 --dims 56,182 --out DIR   # a subset

Every variant's output (and, for fwd+bwd variants, gradients) is compared with the default's before timing.
Writes DIR/linear_attn_configs.json and .md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import fastattn  # noqa: E402
from fastattn.ops.linear_attn import triton as tri  # noqa: E402
from linear_attn import _inputs, environment  # noqa: E402

FWD_SHAPES = [(16, 8, 4096, 64), (4, 8, 16384, 64), (1, 8, 65536, 64), (1, 9, 65536, 64), (16, 8, 4096, 9),
              (16, 8, 4096, 32), (16, 8, 4096, 128), (4, 8, 16384, 128), (1, 8, 65536, 128), (16, 8, 4096, 256),
              (16, 8, 4096, 182), (16, 8, 4096, 56), (16, 8, 4096, 96), (16, 8, 4096, 37), (1, 8, 65536, 9),
              (1, 8, 65536, 182)]
BWD_SHAPES = [(16, 8, 4096, 64), (4, 8, 16384, 64), (1, 9, 65536, 64), (16, 8, 4096, 128), (16, 8, 4096, 9),
              (16, 8, 4096, 56), (16, 8, 4096, 182), (16, 8, 4096, 37)]
# name -> overrides: "fwd" / "bwd" config fields, "cps" forced chunks per segment, "ceil" the earlier split rule
# (segments rounded up: a partial last wave), "pps" PROGRAMS_PER_SM entries, "a16" the alignment rule of 76938f0
# (per side, 16 elements or nothing: D = 56 or 182 loaded q and k rows element by element)
VARIANTS = {
    "default": {},
    "s2": {"fwd": dict(stages=2)},
    "s3": {"fwd": dict(stages=3)},
    "bk64": {"fwd": dict(BK=64)},
    "ceil": {"ceil": True},
    "before": {"fwd": dict(stages=2, BK=64), "ceil": True, "pps": {"bwd": 1}},   # the defaults of be36837
    "bwd_ceil": {"ceil": True},
    "bwd_pps1": {"pps": {"bwd": 1}},
    "bwd_cps16": {"cps": 16},
    "cps32": {"cps": 32},   # forward: 2 segments at T = 4k, i.e. 2 programs per SM where B x H fills the GPU once
    "a16": {"a16": True},
    # 8 warps on 64-row chunks: Triton 3.6 lays the chained dots (q k^T -> a -> a v) out with all warps along the
    # rows, so both warpgroups compute them whole (sm_90 TTGIR, D = 128: 4 of 6 dots); fewer spills against that
    "w8": {"fwd": dict(warps=8)},
    # sm_90 compile (bench/sm90_compile.py --D 128 [--warps 8 --stages 2,3]): spills 372 B a thread with 4 warps,
    # 108 with 8, 32 with 8 and 3 stages
    "w8s3": {"fwd": dict(warps=8, stages=3)},
    # the forward with pointer loads instead of TMA descriptors (FWD_TMA off: the default before the H100 run of
    # bench/results/linear_attn_h100_tma.md). sm_90 compile (bench/sm90_compile.py --D 128 [--tma] [--warps 8]):
    # hot loop 0 STL / 46 LDL a chunk with pointer loads, 4 / 27 with TMA at 4 warps; 0 / 20 and 0 / 7 at 8 warps
    "pointers": {"tma": False},
    "pointers_w8": {"tma": False, "fwd": dict(warps=8)},
    # the backward's dq and dk/dv kernels with pointer loads (BWD_TMA off). sm_90 compile (bench/sm90_compile.py
    # --direction bwd --D 64 [--tma]): dk/dv hot loop 25 STL / 79 LDL a chunk with pointer loads, 10 / 25 with TMA
    "bwd_pointers": {"bwd_tma": False},
    # 32-wide value tiles: two programs per (b, h) re-read q and k (adjacent in the grid, so mostly from L2) but
    # hold half the state. sm_90 compile (16 x 8 x 4k, TMA): D = 128, 4 warps: no spills, 954-1,558 instructions a
    # chunk against 148 / 140 B and 1,143-1,865 with 64; D = 182 / 256 in one 256-wide tile (no fp32 partials) at
    # 8 warps: 80 / 64 B (D = 182, windows) and 468 / 524 B against 320 / 268 and 260 / 216 with two 128-wide tiles
    "bv32": {"fwd": dict(BV=32)},
    "bk256bv32w8": {"fwd": dict(BK=256, BV=32, warps=8)},
    # q/k windows for ragged D in "bthd" memory (WINDOWS, off by default until timed): 16-byte aligned loads where
    # a head's rows start off a 16-byte boundary (D = 9, 37, 182). sm_90 compile (bench/sm90_compile.py
    # --D 9,37,182 [--windows] [--tma]), forward: D = 9 q/k by 16-byte async copies instead of 2-byte loads, spills
    # 0 instead of 44 / 24 B, 919 instructions a chunk instead of 1,017; D = 182 16-byte copies instead of 4-byte
    # ones, spills 204 / 168 B instead of 704 / 664, 1,787 instructions instead of 2,500; with TMA, bulk copies
    "windows": {"windows": True},
    "windows_pointers": {"windows": True, "tma": False, "bwd_tma": False},
}
FWD_VARIANTS = ("default", "s2", "s3", "bk64", "ceil", "before", "a16", "w8", "w8s3", "cps32", "pointers",
                "pointers_w8", "windows", "windows_pointers", "bv32", "bk256bv32w8")
BWD_VARIANTS = ("default", "bwd_ceil", "bwd_pps1", "bwd_cps16", "before", "a16", "bwd_pointers", "windows",
                "windows_pointers")

_base_fwd, _base_cfg, _base_segments = tri._fwd_config, tri._config, tri._segments
_base_pps = dict(tri.PROGRAMS_PER_SM)
_base_alignment = tri._alignment
_base_tma = (tri.FWD_TMA, tri.BWD_TMA)
_base_windows = tri.WINDOWS


def _alignment_a16(ts, dim):
    return 16 if _base_alignment(ts, dim) == 16 else 1


def _segments_ceil(NT, programs_per_segment, device, direction):
    """The split rule of be36837: segments = ceil(PROGRAMS_PER_SM * SMs / programs)."""
    sms = tri._num_sms(device)
    if 2 * programs_per_segment >= sms:
        return NT, 1
    ns = -(-tri.PROGRAMS_PER_SM[direction] * sms // programs_per_segment)
    cps = min(NT, max(tri.MIN_SEGMENT_CHUNKS, -(-NT // ns)))
    return cps, -(-NT // cps)


def use(name: str) -> None:
    var = VARIANTS[name]

    def fwd_config(D, Dv, widest):
        cfg = _base_fwd(D, Dv, widest)
        over = dict(var.get("fwd", {}))
        if "BK" in over:
            over["BK"] = tri._tile(D, over["BK"])
        return tri._Config(**{**cfg.__dict__, **over})

    def config(D, Dv):
        return tri._Config(**{**_base_cfg(D, Dv).__dict__, **var.get("bwd", {})})
    tri._fwd_config, tri._config, tri.SEGMENT_CHUNKS = fwd_config, config, var.get("cps")
    tri._segments = _segments_ceil if var.get("ceil") else _base_segments
    tri._alignment = _alignment_a16 if var.get("a16") else _base_alignment
    tri.PROGRAMS_PER_SM.update({**_base_pps, **var.get("pps", {})})
    tri.FWD_TMA, tri.BWD_TMA = var.get("tma", _base_tma[0]), var.get("bwd_tma", _base_tma[1])
    tri.WINDOWS = var.get("windows", _base_windows)


def jobs(only=None, dims=None):
    """(kind, variant, shape) of every probe; ``only``: the variants to run, ``dims``: the feature dims (None: all)."""
    for kind, names, shapes in (("fwd", FWD_VARIANTS, FWD_SHAPES), ("bwd", BWD_VARIANTS, BWD_SHAPES)):
        for name in names:
            if only is None or name in only or name == "default":
                for s in shapes:
                    if dims is None or s[3] in dims:
                        yield kind, name, s


def run_one(kind, name, shape, timed: bool, ref=None):
    import triton.testing
    B, H, T, D = shape
    q, k, v, do = _inputs(B, H, T, D, 64, torch.bfloat16)
    use(name)
    try:
        if kind == "fwd":
            def f():
                return fastattn.linear_attention(q, k, v, layout="bthd", backend="triton")[0]
            out = [f()]
        else:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]

            def f():   # keeps no autograd graph alive (a live one breaks the CUDA-graph capture of backward)
                for t in leaves:
                    t.grad = None
                o = fastattn.linear_attention(*leaves, layout="bthd", backend="triton")[0]
                o.backward(do)
                return o.detach()
            out = [f()] + [t.grad.clone() for t in leaves]
        torch.cuda.synchronize()
        if not timed:
            return None, out
        err = None if ref is None else max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                                           for a, b in zip(out, ref))
        ms = triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median")
        return {"kind": kind, "variant": name, "shape": list(shape), "ms": ms, "rel_diff_vs_default": err}, out
    finally:
        use("default")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)   # "i/n": compile only
    p.add_argument("--jobs", type=int, default=14)
    p.add_argument("--variants", default=None, type=lambda v: v.split(","),
                   help="comma-separated variants to probe (default: all; the default config always runs)")
    p.add_argument("--dims", default=None, type=lambda v: [int(d) for d in v.split(",")],
                   help="comma-separated feature dims: only the shapes with these (default: all)")
    a = p.parse_args()
    unknown = set(a.variants or ()) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    all_jobs = list(jobs(a.variants, a.dims))
    if a.shard:
        i, n = (int(x) for x in a.shard.split("/"))
        for j, (kind, name, shape) in enumerate(all_jobs):
            if j % n == i:
                try:
                    run_one(kind, name, shape, timed=False)
                except Exception as e:  # noqa: BLE001 - reported by the timed pass
                    print(f"{kind} {name} {shape}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return
    t0 = time.time()
    only = (["--variants", ",".join(a.variants)] if a.variants else []) + \
        (["--dims", ",".join(map(str, a.dims))] if a.dims else [])
    procs = [subprocess.Popen([sys.executable, __file__, "--shard", f"{i}/{a.jobs}"] + only) for i in range(a.jobs)]
    for pr in procs:
        pr.wait()
    print(f"compiled in {time.time() - t0:.0f}s", flush=True)
    rows, refs = [], {}
    for kind, name, shape in sorted(all_jobs, key=lambda j: j[1] != "default"):
        try:
            row, out = run_one(kind, name, shape, timed=True, ref=refs.get((kind, shape)))
            if name == "default":
                refs[(kind, shape)] = out
        except Exception as e:  # noqa: BLE001
            row = {"kind": kind, "variant": name, "shape": list(shape), "ms": None,
                   "error": f"{type(e).__name__}: {str(e)[:200]}"}
            torch.cuda.synchronize()
        rows.append(row)
        print(json.dumps(row), flush=True)
    env = environment(torch.device("cuda"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_attn_configs.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    lines = [f"# Triton linear-attention launch configs on {env.get('gpu')}", "",
             f"torch {env['torch']}, triton {env.get('triton')}, commit {env['commit']}; bf16, causal, normalized, "
             "Dv = 64; do_bench_cudagraph median ms (fwd: forward; bwd: forward + backward); x = default / variant.",
             ""]
    for kind in ("fwd", "bwd"):
        shapes = [s for s in (FWD_SHAPES if kind == "fwd" else BWD_SHAPES) if not a.dims or s[3] in a.dims]
        names = [n for n in (FWD_VARIANTS if kind == "fwd" else BWD_VARIANTS) if not a.variants or n in a.variants
                 or n == "default"]
        lines += [f"{kind}:", "", "| variant | " + " | ".join(str(list(s)) for s in shapes) + " |",
                  "|---|" + "---|" * len(shapes)]
        get = {(r["variant"], tuple(r["shape"])): r for r in rows if r["kind"] == kind}
        for name in names:
            cells = []
            for s in shapes:
                r, d = get.get((name, s)), get.get(("default", s))
                if not r or r.get("ms") is None:
                    cells.append("fail" if r else "-")
                    continue
                x = f" ({d['ms'] / r['ms']:.2f}x)" if d and d.get("ms") and name != "default" else ""
                cells.append(f"{r['ms']:.3f}{x}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "linear_attn_configs.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
