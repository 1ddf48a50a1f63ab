"""Benchmark of fastattn.seq_logps against logits + log_softmax + gather (V = 49,152, hidden 576: SmolLM2).

GPU (default when CUDA is present): the triton backend (both strategies: "fused" Triton GEMM tiles and "gemm",
cuBLAS logits chunks + row kernels) vs the full-logits path, bf16 inputs, fp32 softmax, at
B=8, T=1024 and B=4, T=4096 (every token a response token): correctness first (values and both gradients against
the full-logits path in fp32 on the same bf16 inputs, the bf16 rule of tests/tolerances.py), then time
(triton.testing.do_bench median) and peak extra memory of the forward and of forward + backward.
CPU (--device cpu): the cpu (C++) and torch (chunked) backends, fp32, interleaved rounds.

    python bench/seq_logps.py --out bench/results          # writes seq_logps_<device>.json and .md
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastattn  # noqa: E402
from linear_attn import commit as _commit  # noqa: E402  (bench/ is on sys.path when run as a script)

V, D = 49152, 576


def logits_path(h, w, labels, mask):
    """The baseline: [B, T, V] logits in the input dtype, fp32 log_softmax, gather, masked sum."""
    logp = torch.log_softmax((h @ w.T).float(), -1)
    tok = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return (tok * mask).sum(-1)


def inputs(B, T, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, device=device, dtype=torch.float32).to(dtype)
    w = (torch.randn(V, D, generator=g, device=device, dtype=torch.float32) / D ** 0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    return h, w, labels, mask


def _grads(fn, h, w, labels, mask, grad):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(h, w, labels, mask)
    dh, dw = torch.autograd.grad(out, (h, w), grad)
    return out.detach().double(), dh.double(), dw.double()


def ours(strategy: str):
    """fastattn.seq_logps on the triton backend under one STRATEGY (set at every call, so also for its backward)."""
    from fastattn.ops.seq_logps import triton as tr

    def fn(*a):
        tr.STRATEGY = strategy
        return fastattn.seq_logps(*a, backend="triton")
    return fn


def correctness(B, T, device, strategy: str = "fused") -> dict:
    """Max errors against the fp32 full-logits path on the same bf16 inputs (first 1024 tokens of each row
    for the big shape), and the bf16 full-logits path's own errors (the rule: ours <= 2x theirs + atol)."""
    h, w, labels, mask = inputs(B, min(T, 1024), torch.bfloat16, device, seed=1)
    grad = torch.randn(B, device=device)
    ref = _grads(lambda *a: logits_path(a[0].float(), a[1].float(), a[2], a[3]), h, w, labels, mask, grad)
    same = _grads(logits_path, h, w, labels, mask, grad)
    got = _grads(ours(strategy), h, w, labels, mask, grad)
    res = {}
    ok = True
    for name, r, s, o in zip(("logps", "dhidden", "dweight"), ref, same, got):
        scale = max(1.0, r.abs().max().item())
        e_ours, e_same = (o - r).abs().max().item(), (s - r).abs().max().item()
        bound = 2 * e_same + 1e-2 * scale
        res[name] = {"err_triton": e_ours, "err_bf16_logits": e_same, "bound": bound}
        ok &= e_ours <= bound
    res["ok"] = bool(ok)
    return res


def _peak(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


# (BM, BN, BK, warps, stages, flat) tried by --sweep; the first is the built-in bf16 default. flat: the forward's
# (vocab tile, K slice) loop nest flattened into one software-pipelined loop (tl.range(flatten=True))
SWEEP = [(128, 256, 64, 8, 3, False), (128, 128, 64, 8, 3, False), (256, 128, 64, 8, 3, False),
         (128, 128, 64, 4, 4, False), (64, 256, 64, 4, 3, False), (128, 256, 64, 8, 3, True),
         (128, 128, 64, 8, 3, True)]
_TILE_KEYS = ("BM", "BN", "BK", "warps", "stages", "flat")


def sweep(dev) -> dict:
    """Triton tile configs at B=8, T=1024 (bf16): each checked for correctness (the bf16 rule), then timed
    forward and forward + backward; the correct one with the fastest forward + backward is kept for the run."""
    from triton.testing import do_bench

    from fastattn.ops.seq_logps import triton as tr
    B, T = 8, 1024
    h, w, labels, mask = inputs(B, T, torch.bfloat16, dev)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    grad = torch.ones(B, device=dev)
    rows = []
    for values in SWEEP:
        row = dict(zip(_TILE_KEYS, values))
        tr.CONFIG_OVERRIDE.clear()
        tr.CONFIG_OVERRIDE.update(row)
        try:
            row["correct"] = correctness(B, T, dev)["ok"]
            fused = ours("fused")   # the tiles are the fused strategy's
            row["fwd_ms"] = do_bench(lambda: fused(h, w, labels, mask))
            row["fwd_bwd_ms"] = do_bench(lambda: torch.autograd.grad(fused(hg, wg, labels, mask), (hg, wg), grad))
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: a result of the sweep
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        print("sweep", row, flush=True)
    ok = [r for r in rows if r.get("correct") and "fwd_bwd_ms" in r]
    best = min(ok, key=lambda r: r["fwd_bwd_ms"]) if ok else None
    tr.CONFIG_OVERRIDE.clear()
    if best:
        tr.CONFIG_OVERRIDE.update({k: best[k] for k in _TILE_KEYS})
    return {"B": B, "T": T, "rows": rows, "chosen": best}


def gpu(out: Path, do_sweep: bool = False) -> dict:
    from triton.testing import do_bench
    dev = torch.device("cuda")
    tiles = sweep(dev) if do_sweep else None
    rows = []
    strategies = ("fused", "gemm")
    for B, T in ((8, 1024), (4, 4096)):
        checks = {f"seq_logps triton {s}": correctness(B, T, dev, s) for s in strategies}
        h, w, labels, mask = inputs(B, T, torch.bfloat16, dev)
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        grad = torch.ones(B, device=dev)
        impls = {"logits+log_softmax": logits_path, **{f"seq_logps triton {s}": ours(s) for s in strategies}}
        for name, fn in impls.items():
            def fwd():
                with torch.no_grad():
                    fn(h, w, labels, mask)

            def fwd_bwd():
                torch.autograd.grad(fn(hg, wg, labels, mask), (hg, wg), grad)

            row = {"B": B, "T": T, "impl": name, "fwd_ms": do_bench(fwd), "fwd_bwd_ms": do_bench(fwd_bwd),
                   "fwd_peak_gib": _peak(fwd), "fwd_bwd_peak_gib": _peak(fwd_bwd), "correct": checks.get(name)}
            rows.append(row)
            print(f"B={B} T={T} {name:>20}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms, "
                  f"peak extra {row['fwd_peak_gib']:.2f} / {row['fwd_bwd_peak_gib']:.2f} GiB", flush=True)
        print(f"  correctness (bf16 rule): {checks}", flush=True)
    return {"device": torch.cuda.get_device_name(), "rows": rows, "sweep": tiles}


def cpu(out: Path, N: int = 1024, rounds: int = 5) -> dict:
    from fastattn.ops.seq_logps import cpu as C, reference as R
    if not C.supports(torch.empty(1, 1, 1), torch.empty(1, 1))[0]:
        raise SystemExit("the cpu backend is not built (fastattn._C without the seq_logps kernels)")
    h, w, labels, mask = inputs(1, N, torch.float32, torch.device("cpu"))
    g = torch.ones(1)
    _, lse = R.forward(h, w, labels, mask)
    fs = {("torch", "fwd"): lambda: R.forward(h, w, labels, mask), ("cpu", "fwd"): lambda: C.forward(h, w, labels, mask),
          ("torch", "bwd"): lambda: R.backward(g, h, w, labels, mask, lse),
          ("cpu", "bwd"): lambda: C.backward(g, h, w, labels, mask, lse)}
    for f in fs.values():
        f()
    times = {k: [] for k in fs}
    for _ in range(rounds):
        for k, f in fs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    rows = [{"impl": b, "pass": p, "N": N, "median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
            for (b, p), v in times.items()]
    for r in rows:
        print(f"{r['impl']:>5} {r['pass']}: median {r['median_s']:.3f} s (min {r['min_s']:.3f}, max {r['max_s']:.3f})")
    return {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "rows": rows}


def _markdown(res: dict) -> str:
    head = [f"# seq_logps benchmark ({res['device']})", "",
            f"commit {res['commit']}, torch {res['torch']}, triton {res.get('triton')}, V={V}, hidden={D}", ""]
    if res["mode"] == "gpu":
        head += ["| B | T | impl | fwd ms | fwd+bwd ms | fwd peak extra GiB | fwd+bwd peak extra GiB |",
                 "|---|---|---|---|---|---|---|"]
        head += [f"| {r['B']} | {r['T']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                 f"{r['fwd_peak_gib']:.2f} | {r['fwd_bwd_peak_gib']:.2f} |" for r in res["rows"]]
        head += ["", "Correctness (triton vs fp32 full logits, same bf16 inputs; bound = 2 x bf16-logits error + "
                 "1e-2 x scale): " + ", ".join(f"B={r['B']} T={r['T']} {r['impl']}: "
                                               f"{'ok' if r['correct']['ok'] else 'FAIL'}"
                                               for r in res["rows"] if r["correct"])]
        if res.get("sweep"):
            sw = res["sweep"]
            head += ["", f"Triton tile sweep at B={sw['B']}, T={sw['T']} (the timed rows above use the chosen one: "
                     f"{sw['chosen'] and {k: sw['chosen'].get(k) for k in _TILE_KEYS}}):", "",
                     "| BM | BN | BK | warps | stages | flat | correct | fwd ms | fwd+bwd ms |",
                     "|---|---|---|---|---|---|---|---|---|"]
            head += [f"| {r['BM']} | {r['BN']} | {r['BK']} | {r['warps']} | {r['stages']} | {r.get('flat', False)} | "
                     f"{r.get('correct', '-')} | "
                     f"{r.get('fwd_ms', float('nan')):.3f} | {r.get('fwd_bwd_ms', float('nan')):.3f} |"
                     + (f" {r['error']}" if "error" in r else "") for r in sw["rows"]]
    else:
        head += [f"{res['threads']} threads, fp32, interleaved rounds", "",
                 "| backend | pass | N | median s | min s | max s |", "|---|---|---|---|---|---|"]
        head += [f"| {r['impl']} | {r['pass']} | {r['N']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} |"
                 for r in res["rows"]]
    return "\n".join(head) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--cpu-tokens", type=int, default=1024)
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: sweep the Triton tile configs first and time the best one")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "gpu" if args.device == "cuda" else "cpu"
    res = gpu(out, args.sweep) if mode == "gpu" else cpu(out, args.cpu_tokens)
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    res.update(mode=mode, commit=_commit(), torch=torch.__version__, triton=tv)
    stem = out / f"seq_logps_{mode}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(_markdown(res))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
