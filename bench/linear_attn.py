"""Linear-attention microbenchmark: every available fastattn backend and the baselines, in one process.

CPU:  compares the C++ `cpu` backend with the `torch` chunked fallback (fwd and fwd+bwd, fp32).
GPU:  `cuda` and `triton` backends, fla `chunk_linear_attn` (normalize True/False, when importable) and torch SDPA
      causal (head dim 64) over the shapes of the H200 issue, plus the decode step. Correctness against an fp64
      reference is checked before anything is timed.

    python bench/linear_attn.py                 # CPU table (or the GPU grid when CUDA is present)
    python bench/linear_attn.py --quick         # a smaller grid
Results: bench/results/linear_attn_<device>.json and .md (GPU, versions, commit, shapes, ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import fastattn  # noqa: E402
from fastattn import backends  # noqa: E402
from fastattn.ops.linear_attn.reference import linear_attention_chunked  # noqa: E402


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "commit": commit(),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
        try:
            import fla
            env["fla"] = getattr(fla, "__version__", "unknown")
        except ImportError:
            env["fla"] = None
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cores"] = os.cpu_count()
    return env


# ---- timing ------------------------------------------------------------------------------------------------

def time_cpu(fn, warmup: int = 2, reps: int = 7) -> float:
    """Median wall time in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_gpu(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


# ---- CPU ---------------------------------------------------------------------------------------------------

def bench_cpu(args) -> dict:
    """cpu vs torch backends at B=1, H=8, T=4096, D=Dv=64, fp32: args.repeat rounds, backends interleaved within each
    round so that machine noise hits both alike; reports the median over rounds and the spread of the ratio."""
    B, H, T, D, Dv = 1, 8, args.T or 4096, 64, 64
    g = torch.Generator().manual_seed(0)
    q, k = torch.rand(2, B, H, T, D, generator=g)
    v = torch.randn(B, H, T, Dv, generator=g)
    do = torch.randn(B, H, T, Dv, generator=g)
    names = ["torch"] + (["cpu"] if backends.availability("cpu")[0] else [])
    ref = fastattn.linear_attention(q.double(), k.double(), v.double(), backend="torch")[0]
    errs, runs = {}, {}
    for name in names:
        o = fastattn.linear_attention(q, k, v, backend=name)[0]
        errs[name] = ((o.double() - ref).abs().max() / ref.abs().max()).item()
        assert errs[name] < 1e-4, f"{name}: relative error {errs[name]:.2e} against the fp64 reference"
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def fwd(name=name):
            with torch.no_grad():
                fastattn.linear_attention(q, k, v, backend=name)

        def fwd_bwd(name=name, leaves=leaves):
            o = fastattn.linear_attention(*leaves, backend=name)[0]
            torch.autograd.backward(o, do)

        runs[name] = (fwd, fwd_bwd)
    times = {name: ([], []) for name in names}
    for _ in range(args.repeat):
        for name in names:
            for i, fn in enumerate(runs[name]):
                times[name][i].append(time_cpu(fn))
    med = {name: tuple(statistics.median(t) for t in times[name]) for name in names}
    rows = []
    for name in names:
        row = {"backend": name, "B": B, "H": H, "T": T, "D": D, "Dv": Dv, "dtype": "fp32", "fwd_ms": med[name][0],
               "fwd_bwd_ms": med[name][1], "max_rel_err": errs[name], "rounds_fwd_ms": times[name][0],
               "rounds_fwd_bwd_ms": times[name][1]}
        if "cpu" in med:
            ratios = [[t / c for t, c in zip(times["torch"][i], times[name][i])] for i in range(2)]
            row["fwd_speedup_vs_torch"] = statistics.median(ratios[0])
            row["fwd_bwd_speedup_vs_torch"] = statistics.median(ratios[1])
            row["speedup_range"] = [[min(r), max(r)] for r in ratios]
        rows.append(row)
    return {"rows": rows, "rounds": args.repeat}


def _speedup(row: dict, i: int) -> str:
    key = ("fwd_speedup_vs_torch", "fwd_bwd_speedup_vs_torch")[i]
    if key not in row:
        return "-"
    lo, hi = row["speedup_range"][i]
    return f"{row[key]:.2f}x ({lo:.2f}-{hi:.2f})"


def markdown_cpu(result: dict, env: dict) -> str:
    lines = [f"# linear_attention on CPU ({env.get('cpu')}, {env.get('cores')} cores, {env['threads']} threads)", "",
             f"torch {env['torch']}, commit {env['commit']}; fp32, normalized causal; {result['rounds']} rounds of "
             "7 runs each, backends interleaved; medians, and the ratio's range over rounds.", "",
             "| backend | B | H | T | D | Dv | fwd ms | fwd+bwd ms | fwd speedup vs torch (range) "
             "| fwd+bwd speedup vs torch (range) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['B']} | {r['H']} | {r['T']} | {r['D']} | {r['Dv']} | {r['fwd_ms']:.2f} "
                     f"| {r['fwd_bwd_ms']:.2f} | {_speedup(r, 0)} | {_speedup(r, 1)} |")
    return "\n".join(lines) + "\n"


# ---- GPU ---------------------------------------------------------------------------------------------------

def hbm_bandwidth(device) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + written)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = time_gpu(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def _fla():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        return chunk_linear_attn
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        print(f"fla not available: {e}", file=sys.stderr)
        return None


def _rel_err(got, ref) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def bench_gpu_one(B, H, T, D, Dv, ours, fla_fn, bw, dtype, check: bool) -> list[dict]:
    """Correctness (against fp64) then timing of our backends and fla at one shape; bf16, "bthd" memory."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    # "bthd" memory as fla takes it; positive features for the normalized form
    q = torch.rand(B, T, H, D, device=dev, generator=g, dtype=dtype)
    k = torch.rand(B, T, H, D, device=dev, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, Dv, device=dev, generator=g, dtype=dtype)
    do = torch.randn(B, T, H, Dv, device=dev, generator=g, dtype=dtype)
    bytes_fwd = q.element_size() * B * T * H * (2 * D + 2 * Dv)
    bytes_bwd = q.element_size() * B * T * H * (4 * D + 3 * Dv)  # read q,k,v,do; write dq,dk,dv
    rows = []
    ref = None
    if check:
        ref = linear_attention_chunked(*(t.double().transpose(1, 2) for t in (q, k, v)), chunk_size=256)[0]
        ref = ref.transpose(1, 2)

    def record(name, normalize, fwd, bwd_inputs=None, err=None, note=""):
        row = {"impl": name, "normalize": normalize, "B": B, "H": H, "T": T, "D": D, "Dv": Dv, "note": note,
               "max_rel_err": err}
        try:
            row["fwd_ms"] = time_gpu(fwd)
            row["fwd_GBps"] = bytes_fwd / (row["fwd_ms"] * 1e-3) / 1e9
            row["fwd_floor_frac"] = (bytes_fwd / bw * 1e3) / row["fwd_ms"]
        except Exception as e:  # noqa: BLE001 - a crashing baseline is a result, not a bench failure
            row["fwd_ms"] = None
            row["note"] += f" fwd failed: {type(e).__name__}: {str(e)[:120]}"
        if bwd_inputs is not None:
            leaves, run = bwd_inputs

            def fb():
                for t in leaves:
                    t.grad = None
                run().backward(do)
            try:
                row["fwd_bwd_ms"] = time_gpu(fb)
                row["fwd_bwd_floor_frac"] = ((bytes_fwd + bytes_bwd) / bw * 1e3) / row["fwd_bwd_ms"]
            except Exception as e:  # noqa: BLE001
                row["fwd_bwd_ms"] = None
                row["note"] += f" bwd failed: {type(e).__name__}: {str(e)[:120]}"
                torch.cuda.synchronize()
        rows.append(row)

    for name in ours:
        err = None
        if check:
            err = _rel_err(fastattn.linear_attention(q, k, v, layout="bthd", backend=name)[0], ref)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        record(name, True, lambda: fastattn.linear_attention(q, k, v, layout="bthd", backend=name),
               (leaves, lambda: fastattn.linear_attention(*leaves, layout="bthd", backend=name)[0]), err)
    if fla_fn is not None:
        for normalize in (True, False):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            err = None
            try:
                if check and normalize:
                    err = _rel_err(fla_fn(q, k, v, scale=1.0, normalize=True)[0], ref)
                record("fla", normalize, lambda: fla_fn(q, k, v, scale=1.0, normalize=normalize),
                       (leaves, lambda: fla_fn(*leaves, scale=1.0, normalize=normalize)[0]), err)
            except Exception as e:  # noqa: BLE001
                rows.append({"impl": "fla", "normalize": normalize, "B": B, "H": H, "T": T, "D": D, "Dv": Dv,
                             "fwd_ms": None, "note": f"failed: {type(e).__name__}: {str(e)[:120]}"})
                torch.cuda.synchronize()
    return rows


def bench_sdpa(B, H, T, dtype) -> dict:
    dev = torch.device("cuda")
    q, k, v = (torch.randn(B, H, T, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, T, 64, device=dev, dtype=dtype)
    f = torch.nn.functional.scaled_dot_product_attention
    fwd = time_gpu(lambda: f(q, k, v, is_causal=True))

    def fb():
        f(q, k, v, is_causal=True).backward(do)
    return {"impl": "sdpa", "B": B, "H": H, "T": T, "D": 64, "Dv": 64, "fwd_ms": fwd, "fwd_bwd_ms": time_gpu(fb)}


def bench_decode(B, H, D, Dv, ours) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    q, k = torch.rand(2, B, H, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, H, Dv, device=dev, dtype=torch.bfloat16)
    for name in ours:
        S = torch.zeros(B, H, D, Dv, device=dev)
        z = torch.zeros(B, H, D, device=dev)
        ms = time_gpu(lambda: fastattn.linear_attention_step(q, k, v, (S, z), backend=name))
        rows.append({"impl": name, "B": B, "H": H, "D": D, "Dv": Dv, "us_per_step": ms * 1e3,
                     "floor_us": 8 * B * H * D * Dv / 4.22e12 * 1e6})
    try:
        from fla.ops.linear_attn import fused_recurrent_linear_attn
        qf, kf, vf = q[:, None], k[:, None], v[:, None]
        S = torch.zeros(B, H, D, Dv, device=dev)
        ms = time_gpu(lambda: fused_recurrent_linear_attn(qf, kf, vf, scale=1.0, initial_state=S,
                                                          output_final_state=True, normalize=True))
        rows.append({"impl": "fla_fused_recurrent", "B": B, "H": H, "D": D, "Dv": Dv, "us_per_step": ms * 1e3})
    except Exception as e:  # noqa: BLE001
        rows.append({"impl": "fla_fused_recurrent", "B": B, "H": H, "D": D, "Dv": Dv, "us_per_step": None,
                     "note": f"{type(e).__name__}: {str(e)[:120]}"})
    return rows


def _partial(args, rows: list[dict]) -> None:
    """Print and append rows as they are measured, so a run cut short still leaves its numbers."""
    path = Path(args.out) / "linear_attn_partial.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            line = json.dumps(row)
            print(line, flush=True)
            f.write(line + "\n")


def bench_gpu(args) -> dict:
    dtype = torch.bfloat16
    ours = [n for n in ("cuda", "triton") if backends.availability(n)[0] and backends.has_backend("linear_attn", n)]
    bw = hbm_bandwidth("cuda")
    fla_fn = None if args.no_fla else _fla()
    Ts = [1024, 4096, 16384, 65536] if not args.quick else [4096, 65536]
    Ds = [int(d) for d in args.D.split(",")] if args.D else [9, 32, 48, 64, 96, 128, 182, 256]
    rows, sdpa = [], []
    for T in Ts:
        sdpa.append(bench_sdpa(65536 // T, 8, T, dtype))
        _partial(args, sdpa[-1:])
        for D in Ds:
            fla_here = fla_fn if (args.fla_dims is None or D in args.fla_dims) else None
            new = bench_gpu_one(65536 // T, 8, T, D, 64, ours, fla_here, bw, dtype, check=not args.no_check)
            _partial(args, new)
            rows += new
    new = bench_gpu_one(1, 9, 65536, 64, 64, ours, fla_fn, bw, dtype, check=not args.no_check)
    _partial(args, new)
    rows += new
    decode = bench_decode(1, 9, 64, 64, ours) + bench_decode(64, 9, 64, 64, ours)
    _partial(args, decode)
    by_T = {r["T"]: r for r in sdpa}
    for r in rows:
        fla_row = next((x for x in rows if x["impl"] == "fla" and x["normalize"] and x["T"] == r["T"]
                        and x["D"] == r["D"] and x["B"] == r["B"] and x["H"] == r["H"]), None)
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if r.get(key) and fla_row and fla_row.get(key):
                r[f"{key}_speedup_vs_fla"] = fla_row[key] / r[key]
            s = by_T.get(r["T"]) if r["H"] == 8 else None
            if r.get(key) and s:
                r[f"{key}_speedup_vs_sdpa"] = s[key] / r[key]
    return {"hbm_bytes_per_s": bw, "dtype": "bf16", "rows": rows, "sdpa": sdpa, "decode": decode}


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def markdown_gpu(result: dict, env: dict) -> str:
    lines = [f"# linear_attention on {env.get('gpu')}", "",
             f"torch {env['torch']}, triton {env.get('triton')}, fla {env.get('fla')}, commit {env['commit']}; "
             f"bf16, causal; copy bandwidth measured {result['hbm_bytes_per_s'] / 1e12:.2f} TB/s; "
             "triton.testing.do_bench median.", "",
             "| impl | norm | B | H | T | D | fwd ms | fwd+bwd ms | fwd GB/s | fwd floor frac | fwd x fla | "
             "fwd+bwd x fla | fwd x sdpa | fwd+bwd x sdpa | rel err | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['impl']} | {r['normalize']} | {r['B']} | {r['H']} | {r['T']} | {r['D']} | {_f(r.get('fwd_ms'))} "
            f"| {_f(r.get('fwd_bwd_ms'))} | {_f(r.get('fwd_GBps'), '{:.0f}')} | {_f(r.get('fwd_floor_frac'), '{:.2f}')} "
            f"| {_f(r.get('fwd_ms_speedup_vs_fla'), '{:.2f}')} | {_f(r.get('fwd_bwd_ms_speedup_vs_fla'), '{:.2f}')} "
            f"| {_f(r.get('fwd_ms_speedup_vs_sdpa'), '{:.2f}')} | {_f(r.get('fwd_bwd_ms_speedup_vs_sdpa'), '{:.2f}')} "
            f"| {_f(r.get('max_rel_err'), '{:.1e}')} | {r.get('note', '')} |")
    lines += ["", "SDPA causal (flash), head dim 64:", "", "| B | H | T | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|"]
    for r in result["sdpa"]:
        lines.append(f"| {r['B']} | {r['H']} | {r['T']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} |")
    lines += ["", "Decode step (bf16 q/k/v, fp32 state):", "", "| impl | B | H | D | us/step | floor us |",
              "|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['impl']} | {r['B']} | {r['H']} | {r['D']} | {_f(r.get('us_per_step'), '{:.1f}')} "
                     f"| {_f(r.get('floor_us'), '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--T", type=int, default=None, help="CPU: sequence length (default 4096)")
    p.add_argument("--repeat", type=int, default=5, help="CPU: measurement rounds (backends interleaved)")
    p.add_argument("--D", default=None, help="GPU: comma-separated feature dims")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--fla-dims", default=None, type=lambda s: [int(x) for x in s.split(",")],
                   help="GPU: run fla only at these feature dims (each new D costs fla a compile + autotune)")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--cpu", action="store_true", help="run the CPU benchmark even when CUDA is present")
    p.add_argument("--out", default=str(ROOT / "results"), help="directory for the JSON and markdown results")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    env = environment(device)
    result = bench_gpu(args) if gpu else bench_cpu(args)
    result["env"] = env
    md = markdown_gpu(result, env) if gpu else markdown_cpu(result, env)
    tag = "h200" if gpu and "H200" in env.get("gpu", "") else ("gpu" if gpu else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"linear_attn_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"linear_attn_{tag}.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
