"""Subspace-Hessian microbenchmark: (P g, P H P^T) of a GLM (sigmoid-MSE + nonconvex regulariser), fp32.

Paths, each checked against an fp64 reference (relative Frobenius error <= 1e-5) before it is timed:
  fused-triton        fastattn backend "triton" at its default precision (fp16x3: A P^T as three fp16 tensor-core
                      products of hi/lo parts, 22 bits; with P given and s <= 256 through glm_tma_kernel, TMA
                      descriptors and the products added one by one ("seq"); else glm_gram_kernel at tf32x3)
  fused-triton-seed   the same with P generated in the kernel from a seed (no P read)
  fused-cuda          fastattn backend "cuda" (SIMT fp32 kernel, B tile in shared memory)
  fused-cuda-seed     the same with P generated in the kernel
  vmap-autodiff       torch.func.vmap over jvp(grad f) (forward-over-reverse), then P (H P^T)
  unfused-torch       B = A @ P.T (fp32 cuBLAS, TF32 off), B^T diag(w) B, B^T l' + regulariser terms
  fused-triton-tf32x3 glm_gram_kernel at tf32x3 (three TF32 products; the default before fp16x3)
  fused-triton-bf16x3 bf16 hi/lo parts (~2^-18; held to 1e-5 like the rest), through glm_tma_kernel
  fused-triton-bf16x3-gram  the same through glm_gram_kernel (pointer loads, 128-wide tiles), in the same process
  fused-triton-{fp16x3,bf16x3}-chained  glm_tma_kernel without seq (the three products chained through one
                      accumulator: both warpgroups compute two of them whole)
  fused-triton-fp16x3-split  A split into its fp16 parts inside the k-loop every call (parts off, seq)
  fused-triton-fp16x3-zacc  the same with z = A x reduced once after the k-loop (option zacc)
  fused-triton-fp16x3-parts  A's fp16 parts made once per A and kept (option parts, A_PARTS), 128-row blocks
  fused-triton-fp16x3-parts64[-chained]  the same at 64-row blocks, products added one by one (or chained)
  fused-triton-fp16x3-parts-cold  parts made anew in every call (what the first call on an A pays)
  unfused-cublas-fp16x3  unfused-torch with A P^T as three cuBLAS fp16 products of the same kept parts (the
                      unfused path at the fused kernel's precision and preparation; two where P's lo parts are 0)
  fused-triton-fp16x3[-parts]-plo  the three products a k-step even where P's lo parts are all zero (--sketch
                      rademacher: what skipping the a_hi p_lo product gains, PLO)
  fused-triton-tf32   informational: plain TF32 dots (faster, ~1e-3 error; not held to 1e-5)
Shapes: m = n = 16384, s = 256 and m = 4096, n = 65536, s = 128 (shared/anchors.md); P Gaussian (make_sketch, unit
scale), or Rademacher with --sketch rademacher (every path the same P). Timing:
triton.testing.do_bench median (L2 flushed). CPU runs use small shapes and the cpu/torch backends.

    python bench/subspace_hvp.py --out bench/results        # writes subspace_hvp_<device>.json and .md
    python bench/subspace_hvp.py --sweep                    # + Triton block/warp/stage configurations
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import fastattn  # noqa: E402
from fastattn import backends  # noqa: E402
from fastattn.ops.subspace_hvp import GLM, make_sketch  # noqa: E402
from fastattn.ops.subspace_hvp import reference  # noqa: E402
from linear_attn import device_tag, environment, time_cpu, time_gpu  # noqa: E402

GPU_SHAPES = [(16384, 16384, 256), (4096, 65536, 128)]
CPU_SHAPES = [(2048, 2048, 64), (512, 8192, 32)]
TOL = 1e-5


SKETCH = "gaussian"   # --sketch: P's kind for every path (make_sketch's "unit" scale; "rademacher": +-1/sqrt(n))


def problem(m: int, n: int, s: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = (torch.randn(m, n, generator=g) / n ** 0.5).to(device)
    y = torch.rand(m, generator=g).to(device)
    x = torch.randn(n, generator=g).to(device)
    glm = GLM(A, y, "sigmoid_mse", "nonconvex", lam=1e-3)
    sketch = make_sketch(SKETCH, s, n, seed=seed + 1)
    P = sketch.materialize(n, torch.float32, device)
    return glm, x, sketch, P


def rel_err(got, ref) -> float:
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _at_precision(prec: str, glm, x, P, tma: bool = True, **cfg):
    """fastattn.subspace_hvp on the triton backend with its INPUT_PRECISION set to ``prec`` for this call (and
    glm_tma_kernel allowed or not, and ``cfg`` added to CONFIG_OVERRIDE)."""
    from fastattn.ops.subspace_hvp import triton as tri
    saved = tri.CONFIG_OVERRIDE
    tri.CONFIG_OVERRIDE = {**saved, "tma": tma, **cfg}
    try:
        with tri.input_precision(prec):
            return fastattn.subspace_hvp(glm, x, P, backend="triton")
    finally:
        tri.CONFIG_OVERRIDE = saved


def _cold(glm, x, P):
    """fp16x3 with A's parts made anew in the call (the first call on an A)."""
    from fastattn.ops.subspace_hvp import triton as tri
    tri._parts_cache.clear()
    return _at_precision("fp16x3", glm, x, P, parts=True)


def _unfused_fp16x3(glm, x, P):
    """unfused-torch with A P^T as three cuBLAS fp16 products (fp32 out) of A's kept parts and P's parts (fp16x3's
    22 bits, B written to memory), scaled back by the rows' factors; two products where P's lo parts are all zero
    (a Rademacher P), as the fused kernel does."""
    from fastattn.ops.subspace_hvp import triton as tri
    AH, AL, ainv = tri.a_parts(glm.A)
    PH, PL, pinv = tri._hi_lo(P, fp16=True, flat_rows=True)
    B = torch.mm(AL, PH.T, out_dtype=torch.float32)
    if PL.any():
        B += torch.mm(AH, PL.T, out_dtype=torch.float32)
    B += torch.mm(AH, PH.T, out_dtype=torch.float32)
    return reference.glm_explicit(glm, x, P, AP=B.mul_(ainv[:, None]).mul_(pinv[None, :]))


def paths(glm, x, sketch, P, device, only=None):
    """name -> (callable, held to TOL); ``only``: the names to keep (None: all)."""
    out = {}
    names = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for b in names:
        if backends.availability(b)[0]:
            out[f"fused-{b}"] = (lambda b=b: fastattn.subspace_hvp(glm, x, P, backend=b), True)
            out[f"fused-{b}-seed"] = (lambda b=b: fastattn.subspace_hvp(glm, x, sketch, backend=b), True)
    out["vmap-autodiff"] = (lambda: fastattn.subspace_hvp(lambda v: glm(v), x, P), True)
    out["unfused-torch"] = (lambda: reference.glm_explicit(glm, x, P, row_chunk=glm.m), True)
    if device.type == "cuda" and backends.availability("triton")[0]:
        for prec, strict in (("tf32x3", True), ("bf16x3", True), ("tf32", False)):
            out[f"fused-triton-{prec}"] = (lambda prec=prec: _at_precision(prec, glm, x, P), strict)
        out["fused-triton-bf16x3-seed"] = (lambda: _at_precision("bf16x3", glm, x, sketch), True)
        out["fused-triton-bf16x3-gram"] = (lambda: _at_precision("bf16x3", glm, x, P, tma=False), True)
        for prec in ("fp16x3", "bf16x3"):
            out[f"fused-triton-{prec}-chained"] = (
                lambda prec=prec: _at_precision(prec, glm, x, P, seq=False, parts=False), True)
        out["fused-triton-fp16x3-zacc"] = (lambda: _at_precision("fp16x3", glm, x, P, zacc=True, parts=False), True)
        out["fused-triton-fp16x3-split"] = (lambda: _at_precision("fp16x3", glm, x, P, parts=False), True)
        out["fused-triton-fp16x3-parts"] = (lambda: _at_precision("fp16x3", glm, x, P, parts=True), True)
        out["fused-triton-fp16x3-parts64"] = (
            lambda: _at_precision("fp16x3", glm, x, P, parts=True, BM=64, seq=True), True)
        out["fused-triton-fp16x3-parts64-chained"] = (
            lambda: _at_precision("fp16x3", glm, x, P, parts=True, BM=64), True)
        out["fused-triton-fp16x3-parts-cold"] = (lambda: _cold(glm, x, P), True)
        out["fused-triton-fp16x3-plo"] = (lambda: _at_precision("fp16x3", glm, x, P, plo=True), True)
        # 3 load stages: with P's lo parts zero (not loaded) they fit in shared memory (local sm_90 compile: 148 KB
        # at 64 rows, 203 KB with A's parts at 128 rows; 250 KB with lo parts)
        out["fused-triton-fp16x3-s3"] = (lambda: _at_precision("fp16x3", glm, x, P, stages=3), True)
        out["fused-triton-fp16x3-parts-s3"] = (lambda: _at_precision("fp16x3", glm, x, P, parts=True, stages=3),
                                               True)
        out["fused-triton-fp16x3-parts-plo"] = (lambda: _at_precision("fp16x3", glm, x, P, parts=True, plo=True),
                                                True)
        out["unfused-cublas-fp16x3"] = (lambda: _unfused_fp16x3(glm, x, P), True)
    if only is not None:
        unknown = set(only) - set(out)
        if unknown:
            raise SystemExit(f"--paths: unknown {sorted(unknown)}; known here: {sorted(out)}")
        out = {k: out[k] for k in only}   # in the order asked for: a run cut short keeps the first
    return out


def bench_shape(m, n, s, device, only=None) -> dict:
    glm, x, sketch, P = problem(m, n, s, device)
    glm64 = glm.to(torch.float64)
    ref_P = reference.glm_explicit(glm64, x.double(), P.double(), row_chunk=4096)
    ref_S = reference.glm_explicit(glm64, x.double(), sketch.materialize(n, torch.float64, device), row_chunk=4096)
    del glm64
    rows = {}
    timer = time_gpu if device.type == "cuda" else time_cpu
    for name, (fn, strict) in paths(glm, x, sketch, P, device, only).items():
        row = {"strict": strict}
        try:
            t0 = time.perf_counter()
            Pg, H = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            ref = ref_S if name.endswith("-seed") else ref_P
            row["rel_err_PHPt"] = rel_err(H, ref[1])
            row["rel_err_Pg"] = rel_err(Pg, ref[0])
            row["correct"] = max(row["rel_err_PHPt"], row["rel_err_Pg"]) <= TOL
            if row["correct"] or not strict:
                row["ms"] = timer(fn)
        except Exception as e:  # noqa: BLE001 - a failing path is reported, the others still run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows[name] = row
        print(f"m={m} n={n} s={s} {name:>18}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in row.items()), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flops = 2 * m * n * s
    for row in rows.values():
        if "ms" in row:
            row["AP_tflops"] = flops / row["ms"] / 1e9
    base = {k: rows.get(k, {}).get("ms") for k in ("vmap-autodiff", "unfused-torch")}
    for name, row in rows.items():
        if name.startswith("fused") and "ms" in row:
            row["speedup_vs_vmap"] = base["vmap-autodiff"] / row["ms"] if base["vmap-autodiff"] else None
            row["speedup_vs_unfused"] = base["unfused-torch"] / row["ms"] if base["unfused-torch"] else None
    return {"m": m, "n": n, "s": s, "paths": rows}


SWEEP = [dict(BM=bm, BK=bk, warps=w, stages=st, zpre=z) for bm, bk, w, st, z in (
    (64, 32, 8, 3, False), (64, 32, 8, 3, True), (64, 64, 8, 2, True), (64, 64, 8, 3, True), (64, 32, 4, 3, True),
    (64, 32, 8, 4, True), (128, 32, 8, 2, True), (128, 64, 8, 2, True), (32, 64, 4, 3, True), (64, 64, 4, 2, True),
    # 128-row blocks: each of two warpgroups owns 64 rows, the smallest Hopper wgmma tile (64-row blocks with 8
    # warps may fall back to the Ampere mma), and P is re-read half as often
    (128, 32, 8, 3, True), (128, 32, 8, 3, False), (128, 16, 8, 4, True), (128, 32, 4, 3, True),
    (128, 64, 8, 3, True), (128, 64, 8, 3, False), (128, 128, 8, 2, True))]
# glm_tma_kernel (bf16x3 / fp16x3, P given, s <= 256); its default first. Local sm_90 compile
# (bench/sm90_compile.py --op glm --precision bf16x3 --override ...), a 64-wide k-step: 64-row blocks with 8 warps
# keep the k-loop free of spill stores; 4 warps or 128 rows hold A in registers (no shared-memory round trip, no
# barriers) but spill 50-110 stores; wide (one accumulator for all tiles) issues 558 instructions against 952 with
# a dot per tile; seq (each product from a constant zero, added by inline PTX) 12 wgmma instead of 20 (a dot per
# tile: 48 instead of 80), 573 instructions, no spill stores.
# zacc: z = A x reduced after the k-loop, not every step (582 -> 546 instructions a step at fp16x3, seq); 16 warps:
# four warpgroups of 64 x 64 (400 instructions a step, but ptxas serializes the wgmma for want of registers).
TMA_SWEEP = [dict(BM=bm, BK=bk, warps=w, stages=st, zpre=False, wide=wd, seq=q, zacc=za, parts=False)
             for bm, bk, w, st, wd, q, za in (
    (64, 64, 8, 2, True, True, False), (64, 64, 8, 2, True, True, True), (64, 64, 16, 2, True, True, False),
    (64, 64, 8, 2, True, False, False), (64, 64, 8, 2, False, True, False), (64, 64, 8, 2, False, False, False),
    (64, 32, 8, 3, True, True, False), (64, 32, 8, 4, True, True, False), (64, 32, 8, 3, True, False, False),
    (128, 32, 8, 3, True, False, False), (64, 64, 4, 2, True, False, False), (64, 32, 4, 3, True, False, False),
    (128, 32, 8, 2, False, False, False), (32, 64, 4, 3, True, False, False))]
# glm_tma_kernel with A's fp16 parts made ahead (option parts, fp16x3 only); its default first. Local sm_90 compile
# (--override parts=1,...): 128 rows, BK 64, chained: the k-loop 271 instructions, 20 wgmma, no spills; BK 32 at 3
# or 4 stages 227, 10 wgmma; seq at 128 rows spills 95 a step; 64 rows spill-free, seq or chained (494).
PARTS_SWEEP = [dict(BM=bm, BK=bk, warps=8, stages=st, zpre=z, seq=q, parts=True)
               for bm, bk, st, q, z in ((128, 64, 2, False, False), (128, 32, 3, False, False),
                                        (128, 32, 4, False, False), (128, 64, 2, False, True),
                                        (64, 64, 2, True, False), (64, 64, 2, False, False),
                                        (64, 32, 3, True, False))]


def sweep(m, n, s, device, bm=None, precision="tf32x3") -> list[dict]:
    """fused-triton over the configs (fastattn.ops.subspace_hvp.triton.CONFIG_OVERRIDE) with BM = ``bm`` (None:
    all) at INPUT_PRECISION ``precision``, correctness first: bf16x3 and fp16x3 sweep TMA_SWEEP (glm_tma_kernel,
    s <= 256; fp16x3 PARTS_SWEEP first), bf16x3 then SWEEP through glm_gram_kernel (fp16x3 has no other kernel);
    other precisions SWEEP."""
    from fastattn.ops.subspace_hvp import triton as tri
    glm, x, sketch, P = problem(m, n, s, device)
    ref = reference.glm_explicit(glm.to(torch.float64), x.double(), P.double(), row_chunk=4096)
    rows = []
    tma = precision in ("bf16x3", "fp16x3") and s <= 4 * tri.TMA_BS
    configs = [{**c, "tma": True} for c in (PARTS_SWEEP if precision == "fp16x3" else []) + TMA_SWEEP] if tma else []
    configs += [{**c, "tma": False} for c in SWEEP] if precision != "fp16x3" else []
    for cfg in (c for c in configs if bm is None or c["BM"] == bm):
        tri.CONFIG_OVERRIDE = cfg
        row = {"m": m, "n": n, "s": s, "precision": precision, **cfg}
        try:
            def fn():
                return _at_precision(precision, glm, x, P, tma=cfg["tma"])
            Pg, H = fn()
            row["rel_err_PHPt"], row["rel_err_Pg"] = rel_err(H, ref[1]), rel_err(Pg, ref[0])
            row["ms"] = time_gpu(fn)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory / registers for a config
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            tri.CONFIG_OVERRIDE = {}
        rows.append(row)
        print("sweep", row, flush=True)
    return rows


def markdown(result: dict) -> str:
    env = result["env"]
    lines = ["# Subspace Hessian of a GLM (sigmoid-MSE + nonconvex regulariser), fp32", "",
             f"Device: {env.get('gpu') or env.get('cpu')}; torch {env['torch']}, triton {env.get('triton')}, "
             f"commit {env['commit']}. Median of triton.testing.do_bench (L2 flushed) on GPU. P: "
             f"{result.get('sketch', 'gaussian')}.", "",
             f"Correctness first: relative Frobenius error of P H P^T and P g against an fp64 reference must be "
             f"<= {TOL:g} (paths marked informational are timed regardless).", "",
             "| m | n | s | path | rel err PHPt | rel err Pg | correct | ms | A P^T TFLOP/s | x vs vmap | "
             "x vs unfused |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for sh in result["shapes"]:
        for name, r in sh["paths"].items():
            def f(key, spec=".3g"):
                v = r.get(key)
                return "-" if v is None else format(v, spec)
            note = "" if r.get("strict", True) else " (informational)"
            err = f" ({r['error'][:80]})" if "error" in r else ""
            lines.append(f"| {sh['m']} | {sh['n']} | {sh['s']} | {name}{note}{err} | {f('rel_err_PHPt', '.2e')} | "
                         f"{f('rel_err_Pg', '.2e')} | {r.get('correct', '-')} | {f('ms')} | {f('AP_tflops')} | "
                         f"{f('speedup_vs_vmap', '.2f')} | {f('speedup_vs_unfused', '.2f')} |")
    if result.get("sweep"):
        lines += ["", "Triton configurations (fused-triton):", "",
                  "| m | n | s | precision | kernel | BM | BK | warps | stages | z by GEMV | rel err PHPt | ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["sweep"]:
            ms = f"{r['ms']:.3g}" if "ms" in r else r.get("error", "-")[:60]
            err = f"{r['rel_err_PHPt']:.2e}" if "rel_err_PHPt" in r else "-"
            kernel = "gram" if not r.get("tma") else "tma" + (", a dot per tile" if r.get("wide") is False else "") \
                + (", seq" if r.get("seq") else "") + (", z after the loop" if r.get("zacc") else "") \
                + (", A's parts" if r.get("parts") else "")
            lines.append(f"| {r['m']} | {r['n']} | {r['s']} | {r.get('precision', 'tf32x3')} | {kernel} | {r['BM']} "
                         f"| {r['BK']} | {r['warps']} | {r['stages']} | {r['zpre']} | {err} | {ms} |")
    lines += ["", "Targets (issue 5): fused >= 10x faster than vmap-autodiff and >= 1.5x faster than unfused-torch at "
              "m = n = 16384, s = 256, same numbers to 1e-5 relative."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results"), help="directory for the JSON and markdown")
    ap.add_argument("--quick", action="store_true", help="the first shape only")
    ap.add_argument("--sweep", action="store_true", help="also time fused-triton over the SWEEP configs (GPU)")
    ap.add_argument("--sweep-bm", type=int, default=None, help="--sweep: only the configs with this BM")
    ap.add_argument("--sweep-precision", default="tf32x3", help="--sweep: the triton INPUT_PRECISION (e.g. bf16x3)")
    ap.add_argument("--sketch", choices=("gaussian", "rademacher"), default="gaussian",
                    help="P's kind for every path (rademacher: P's fp16 lo parts are zero, two products a k-step)")
    ap.add_argument("--paths", default=None, type=lambda v: v.split(","),
                    help="comma-separated paths to run, in this order (default: all; the ratios need vmap-autodiff "
                         "and unfused-torch)")
    args = ap.parse_args()
    global SKETCH
    SKETCH = args.sketch
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = shapes[:1]
    result = {"env": environment(device), "sketch": SKETCH,
              "shapes": [bench_shape(*sh, device, args.paths) for sh in shapes]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(result["env"]) + ("" if SKETCH == "gaussian" else f"_{SKETCH}")

    def save():   # before the sweep too, so that a run cut short in the sweep keeps the paths' table
        (out / f"subspace_hvp_{tag}.json").write_text(json.dumps(result, indent=1))
        (out / f"subspace_hvp_{tag}.md").write_text(markdown(result))
        print(f"wrote {out / f'subspace_hvp_{tag}.md'}", flush=True)
    save()
    if args.sweep and device.type == "cuda":
        result["sweep"] = [row for sh in shapes for row in sweep(*sh, device, args.sweep_bm, args.sweep_precision)]
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
