"""Linear-attention microbenchmark: every available fastattn backend and the baselines, in one process.

CPU:  compares the C++ `cpu` backend with the `torch` chunked fallback (fwd and fwd+bwd, fp32).
GPU:  `cuda` and `triton` backends (and `cuda-mma`: the cuda backend with FASTATTN_CUDA_MMA=1, its bf16 passes
      on tensor cores), fla `chunk_linear_attn` (normalize True/False, when importable) and torch SDPA
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
import unittest.mock
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import fastattn  # noqa: E402
from fastattn import backends  # noqa: E402
from fastattn.ops.linear_attn.reference import linear_attention_chunked  # noqa: E402


def commit() -> str:
    """The source commit: git's, or FASTATTN_COMMIT where the tree was shipped without .git (git archive)."""
    if os.environ.get("FASTATTN_COMMIT"):
        return os.environ["FASTATTN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def device_tag(env: dict) -> str:
    """The results' file-name tag of the machine in ``env``: h200, h100, another GPU's "gpu", or "cpu"."""
    gpu = env.get("gpu") or ""
    return next((t.lower() for t in ("H200", "H100") if t in gpu), "gpu" if gpu else "cpu")


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


TIMER = os.environ.get("FASTATTN_BENCH_TIMER", "events")   # "events" | "cudagraph" (--timer)


def time_gpu(fn) -> float:
    """Median ms of fn. "events": do_bench (L2 flushed), which includes the host time of each call whenever the
    host is slower than the GPU; "cudagraph": do_bench_cudagraph replays fn captured in a CUDA graph, so it
    measures device time only (decode steps and small calls are host-bound otherwise)."""
    import triton.testing
    if TIMER == "cudagraph":
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
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


def _cuda_mma(on: bool):
    """FASTATTN_CUDA_MMA=1 inside when ``on`` (the cuda backend's bf16 passes on tensor cores, read at every call):
    the pseudo-backend "cuda-mma" of the grid."""
    return unittest.mock.patch.dict(os.environ, {"FASTATTN_CUDA_MMA": "1"} if on else {})


def bench_gpu_one(B, H, T, D, Dv, ours, fla_fn, bw, dtype, check: bool, probes: dict | None = None) -> list[dict]:
    """Correctness (against fp64) then timing of our backends and fla at one shape; bf16, "bthd" memory."""
    q, k, v, do = _inputs(B, H, T, D, Dv, dtype)
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
        backend = "cuda" if name == "cuda-mma" else name
        with _cuda_mma(name == "cuda-mma"):
            err = None
            if check:
                err = _rel_err(fastattn.linear_attention(q, k, v, layout="bthd", backend=backend)[0], ref)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            record(name, True, lambda: fastattn.linear_attention(q, k, v, layout="bthd", backend=backend),
                   (leaves, lambda: fastattn.linear_attention(*leaves, layout="bthd", backend=backend)[0]), err)
    if fla_fn is not None:
        for normalize in (True, False):
            # no probe file (no --prepare run): everything is tried; with one, what it did not pass is skipped
            probe = probes.get((D, T, normalize), {"fwd": "not probed", "bwd": "not probed"}) if probes \
                else {"fwd": "ok", "bwd": "ok"}
            if probe.get("fwd") != "ok":
                rows.append({"impl": "fla", "normalize": normalize, "B": B, "H": H, "T": T, "D": D, "Dv": Dv,
                             "fwd_ms": None, "fwd_bwd_ms": None, "note": f"probe: forward {probe['fwd']}"})
                continue
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            err = _rel_err(fla_fn(q, k, v, scale=1.0, normalize=True)[0], ref) if check and normalize else None
            bwd_ok = probe.get("bwd") == "ok"
            record("fla", normalize, lambda: fla_fn(q, k, v, scale=1.0, normalize=normalize),
                   (leaves, lambda: fla_fn(*leaves, scale=1.0, normalize=normalize)[0]) if bwd_ok else None, err,
                   note="" if bwd_ok else f"backward skipped, probe: {probe.get('bwd')}")
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
        S, z = torch.zeros(B, H, D, Dv, device=dev), torch.zeros(B, H, D, device=dev)
        ms = time_gpu(lambda: fused_recurrent_linear_attn(qf, kf, vf, scale=1.0, initial_state=(S, z),
                                                          output_final_state=True, normalize=True))
        rows.append({"impl": "fla_fused_recurrent", "B": B, "H": H, "D": D, "Dv": Dv, "us_per_step": ms * 1e3})
    except Exception as e:  # noqa: BLE001
        rows.append({"impl": "fla_fused_recurrent", "B": B, "H": H, "D": D, "Dv": Dv, "us_per_step": None,
                     "note": f"{type(e).__name__}: {str(e)[:120]}"})
    return rows


def _inputs(B, H, T, D, Dv, dtype, seed=0):
    """q, k (positive), v, do in "bthd" memory, as fla takes them."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.rand(B, T, H, D, device=dev, generator=g, dtype=dtype)
    k = torch.rand(B, T, H, D, device=dev, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, Dv, device=dev, generator=g, dtype=dtype)
    do = torch.randn(B, T, H, Dv, device=dev, generator=g, dtype=dtype)
    return q, k, v, do


def _grid(args) -> tuple[list[int], list[int]]:
    Ts = [4096, 65536] if args.quick else [1024, 4096, 16384, 65536]
    Ts = [int(t) for t in args.Ts.split(",")] if args.Ts else Ts
    Ds = [int(d) for d in args.D.split(",")] if args.D else [9, 32, 48, 64, 96, 128, 182, 256]
    return Ts, Ds


def warm(args) -> None:
    """Compile (no timing) every triton kernel the GPU grid launches for the feature dims in --D, at both forward
    tile widths. Whether T is split depends on the grid alone, and the sweep's PROGRAMS_PER_SM only sets how many
    segments (same kernels). Fills Triton's disk cache, so one such process per D can run in parallel before the
    timed run, which then compiles nothing of ours (fla: see probe_fla)."""
    from fastattn.ops.linear_attn import triton as tri
    if not backends.availability("triton")[0]:
        return
    Ts, Ds = _grid(args)
    t0 = time.time()
    for D in Ds:
        shapes = [(65536 // T, 8, T) for T in Ts] + ([(1, 9, 65536)] if D == 64 else [])
        for B, H, T in shapes:
            q, k, v, do = _inputs(B, H, T, D, 64, torch.bfloat16)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            fastattn.linear_attention(*leaves, layout="bthd", backend="triton")[0].backward(do)
            for bk in BK_VALUES if D > 64 else ():   # the forward's wider tile (sweep_fwd_bk)
                tri.FWD_MAX_BK = bk
                fastattn.linear_attention(q, k, v, layout="bthd", backend="triton")
            torch.cuda.synchronize()
        print(f"warm: D={D} compiled ({time.time() - t0:.0f}s)", flush=True)


SWEEP_VALUES = (1, 2, 4, 8)
BK_VALUES = (64, 128, 256)


def _scores(times: dict) -> tuple[dict, object]:
    """times {value: [ms per shape]} -> ({value: geometric mean of time / best time per shape}, best value)."""
    import math
    best_per_shape = [min(col) for col in zip(*times.values())]
    score = {val: math.exp(statistics.fmean(math.log(t / b) for t, b in zip(ts, best_per_shape)))
             for val, ts in times.items()}
    return score, min(score, key=score.get)


def sweep_split(dtype) -> dict:
    """Triton's split-T target (PROGRAMS_PER_SM), forward first (timed forward), then backward (timed
    forward+backward with the chosen forward value), over T in {4k, 16k, 64k} at D = 64 and D in {32, 128} at
    16k, plus B=1, H=9, T=64k. The value with the lowest geometric mean of (time / best time per shape) wins
    and is used for the rest of the run; every timing is returned."""
    import triton.testing
    from fastattn.ops.linear_attn import triton as tri
    shapes = [(65536 // T, 8, T, 64) for T in (4096, 16384, 65536)] + [(4, 8, 16384, 32), (4, 8, 16384, 128),
                                                                      (1, 9, 65536, 64)]
    out = {"values": list(SWEEP_VALUES), "shapes": [list(s) for s in shapes]}
    for direction in ("fwd", "bwd"):
        times = {val: [] for val in SWEEP_VALUES}
        for B, H, T, D in shapes:
            q, k, v, do = _inputs(B, H, T, D, 64, dtype)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]

            def fb():
                for t in leaves:
                    t.grad = None
                fastattn.linear_attention(*leaves, layout="bthd", backend="triton")[0].backward(do)

            def f():
                fastattn.linear_attention(q, k, v, layout="bthd", backend="triton")
            for val in SWEEP_VALUES:
                tri.PROGRAMS_PER_SM[direction] = val
                times[val].append(triton.testing.do_bench(f if direction == "fwd" else fb, warmup=10, rep=40,
                                                          return_mode="median"))
        score, best = _scores(times)
        tri.PROGRAMS_PER_SM[direction] = best
        out[direction] = {"ms": {str(k): v for k, v in times.items()}, "score": {str(k): v for k, v in score.items()},
                          "chosen": best}
        print(f"sweep {direction}: scores {({k: round(v, 3) for k, v in score.items()})} -> {best}", flush=True)
    return out


def sweep_fwd_bk(dtype) -> dict:
    """Triton's widest forward feature tile (FWD_MAX_BK: 64, 128 = one K tile for D <= 128, or 256 = one for
    D <= 256; no partials within one tile), timed forward at D in {96, 128, 182, 256}, T in {16k, 64k}; the value
    with the lowest geometric mean of (time / best time per shape) is used for the rest of the run."""
    from fastattn.ops.linear_attn import triton as tri
    shapes = [(65536 // T, 8, T, D) for T in (16384, 65536) for D in (96, 128, 182, 256)]
    times = {val: [] for val in BK_VALUES}
    for B, H, T, D in shapes:
        q, k, v, _ = _inputs(B, H, T, D, 64, dtype)
        for val in BK_VALUES:
            tri.FWD_MAX_BK = val
            times[val].append(time_gpu(lambda: fastattn.linear_attention(q, k, v, layout="bthd", backend="triton")))
    score, tri.FWD_MAX_BK = _scores(times)
    print(f"sweep FWD_MAX_BK: scores {({k: round(v, 3) for k, v in score.items()})} -> {tri.FWD_MAX_BK}", flush=True)
    return {"values": list(BK_VALUES), "shapes": [list(x) for x in shapes],
            "ms": {str(k): v for k, v in times.items()}, "score": {str(k): v for k, v in score.items()},
            "chosen": tri.FWD_MAX_BK}


def _partial(args, rows: list[dict]) -> None:
    """Print and append rows as they are measured, so a run cut short still leaves its numbers."""
    path = Path(args.out) / "linear_attn_partial.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            line = json.dumps(row)
            print(line, flush=True)
            f.write(line + "\n")


def _autotune_shard(i: int, n: int) -> None:
    """Make every Triton autotuner created from now on keep only its configs i, i + n, i + 2n, ... (at least one).
    n such processes compile all of a kernel's configs in parallel into Triton's disk cache; an unrestricted
    process then autotunes over every config without compiling any (fla 0.6.0's chunk kernels have up to 48
    configs each, which take minutes to compile one after another)."""
    from triton.runtime import autotuner
    init = autotuner.Autotuner.__init__

    def sharded(self, fn, arg_names, configs, *rest, **kw):
        configs = list(configs)
        init(self, fn, arg_names, configs[i::n] or configs[i % len(configs):][:1], *rest, **kw)
    autotuner.Autotuner.__init__ = sharded


def probe_fla(D: int, Ts: list[int], shard: str | None = None) -> None:
    """fla chunk_linear_attn at feature dim D: every (T, normalize) forward first, then every forward+backward,
    one JSON line per check. fla 0.6.0's backward makes illegal memory accesses at some D, which poison the
    CUDA context: the first failure ends this process, and the timed run skips what failed or went unchecked
    instead of dying. Also compiles and autotunes fla's kernels for this D; with shard "i/n", only the i-th of n
    slices of every autotuner's configs (see _autotune_shard)."""
    if shard:
        _autotune_shard(*(int(x) for x in shard.split("/")))
    fla_fn = _fla()
    t0 = time.time()
    for phase in ("fwd", "bwd"):
        for T in Ts:
            q, k, v, do = _inputs(65536 // T, 8, T, D, 64, torch.bfloat16)
            for normalize in (True, False):
                row = {"D": D, "T": T, "normalize": normalize, "phase": phase}
                if fla_fn is None:
                    print(json.dumps({**row, "result": "fla unavailable"}), flush=True)
                    return
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                try:
                    o = fla_fn(*leaves, scale=1.0, normalize=normalize)[0]
                    if phase == "bwd":
                        o.backward(do)
                    torch.cuda.synchronize()
                    ok = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(t.grad).all()) for t in leaves
                                                               if phase == "bwd")
                    print(json.dumps({**row, "result": "ok" if ok else "non-finite output",
                                      "seconds": round(time.time() - t0, 1)}), flush=True)
                except Exception as e:  # noqa: BLE001 - the failure is the result
                    print(json.dumps({**row, "result": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}),
                          flush=True)
                    os._exit(3)


def prepare(args) -> None:
    """The fla probes (one worker process per fla feature dim) and the compile-only warm-up of our kernels
    (one per D), all in parallel (one CUDA context each); writes the probe results to --probe-file."""
    import concurrent.futures
    Ts, Ds = _grid(args)
    fla_dims = [] if args.no_fla else (Ds if args.fla_dims is None else [d for d in Ds if d in args.fla_dims])
    if not args.no_fla and 64 not in fla_dims:
        fla_dims = fla_dims + [64]   # the B=1, H=9 row
    me = [sys.executable, str(Path(__file__).resolve())]
    grid = (["--quick"] if args.quick else []) + (["--Ts", args.Ts] if args.Ts else [])   # the workers' grid
    nshard = args.fla_shards
    # first our compile-only warm-ups next to nshard processes per fla dim that compile slices of fla's autotune
    # configs; then the full fla probes, which find every config compiled
    shards = [me + ["--probe-fla", str(D), "--fla-shard", f"{i}/{nshard}"] + grid
              for D in fla_dims for i in range(nshard)]
    first = [me + ["--warm", "--D", str(D)] + grid for D in Ds] + (shards if nshard > 1 else [])
    jobs = [me + ["--probe-fla", str(D)] + grid for D in fla_dims]

    t0 = time.time()
    deadline = t0 + args.prepare_timeout

    def run(cmd):   # every worker ends by the deadline, so that the probe file is always written
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, deadline - time.time()))
            rc, stdout, stderr = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc = f"timeout at {time.time() - t0:.0f}s of prepare"
            stdout, stderr = (x.decode() if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        return cmd, rc, stdout, stderr

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for cmd, rc, stdout, stderr in pool.map(run, first):
            if "--warm" in cmd and rc != 0:
                print(f"prepare: warm-up {cmd[-1]} failed (rc {rc}): {(stdout + stderr)[-300:]}")
        print(f"prepare: {len(first)} warm-up and fla compile jobs in {time.time() - t0:.0f}s", flush=True)
        results = list(pool.map(run, jobs))
    probes = {}
    for cmd, rc, stdout, stderr in results:
        D = int(cmd[cmd.index("--probe-fla") + 1])
        for line in stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                entry = probes.setdefault((D, r["T"], r["normalize"]), {})
                entry[r["phase"]] = r["result"]
                if "seconds" in r:   # into the probe process: how long compiling and autotuning took
                    entry[r["phase"] + "_s"] = r["seconds"]
        for T in Ts:
            for n in (True, False):
                entry = probes.setdefault((D, T, n), {})
                for phase in ("fwd", "bwd"):
                    entry.setdefault(phase, f"not probed: the probe process stopped first (rc {rc})")
    rows = [{"D": D, "T": T, "normalize": n, **v} for (D, T, n), v in sorted(probes.items())]
    bad = [r for r in rows if r["fwd"] != "ok" or r["bwd"] != "ok"]
    print(f"prepare: {len(jobs)} jobs in {time.time() - t0:.0f}s; fla not ok: {bad}", flush=True)
    path = Path(args.probe_file or Path(args.out) / "fla_probe.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")


def _fla_probe(args) -> dict:
    path = Path(args.probe_file or Path(args.out) / "fla_probe.json")
    if not path.exists():
        return {}
    return {(r["D"], r["T"], r["normalize"]): r for r in json.loads(path.read_text())}


def add_ratios(result: dict) -> None:
    """Speedups of every row over fla (normalize=True, same shape) and over SDPA (same T, H=8)."""
    rows, by_T = result["rows"], {r["T"]: r for r in result["sdpa"]}
    for r in rows:
        fla_row = next((x for x in rows if x["impl"] == "fla" and x["normalize"] and x["T"] == r["T"]
                        and x["D"] == r["D"] and x["B"] == r["B"] and x["H"] == r["H"]), None)
        for key in ("fwd_ms", "fwd_bwd_ms"):
            if r.get(key) and fla_row and fla_row.get(key):
                r[f"{key}_speedup_vs_fla"] = fla_row[key] / r[key]
            s = by_T.get(r["T"]) if r["H"] == 8 else None
            if r.get(key) and s:
                r[f"{key}_speedup_vs_sdpa"] = s[key] / r[key]


def bench_gpu(args, save) -> dict:
    """The GPU grid; calls save(result) after every T so that a run cut short keeps its table."""
    dtype = torch.bfloat16
    every = [n for n in ("cuda", "triton") if backends.availability(n)[0] and backends.has_backend("linear_attn", n)]
    # decode: every one; sequences also "cuda-mma" (the cuda backend with FASTATTN_CUDA_MMA=1)
    ours = [n for n in every + (["cuda-mma"] if "cuda" in every else [])
            if args.backends is None or n in args.backends.split(",")]
    bw = hbm_bandwidth("cuda")
    result = {"hbm_bytes_per_s": bw, "dtype": "bf16", "rows": [], "sdpa": [], "decode": []}
    if "triton" in ours and args.sweep:
        result["split_sweep"] = sweep_split(dtype)
        result["fwd_bk_sweep"] = sweep_fwd_bk(dtype)
        save(result)
    from fastattn.ops.linear_attn import triton as tri
    if "triton" in ours:
        result["triton_programs_per_sm"] = dict(tri.PROGRAMS_PER_SM)
    fla_fn = None if args.no_fla else _fla()
    probes = _fla_probe(args)
    Ts, Ds = _grid(args)
    # the cheap rows first (SDPA per T, decode steps), so that a call cut short still has them
    for T in Ts:
        result["sdpa"].append(bench_sdpa(65536 // T, 8, T, dtype))
    _partial(args, result["sdpa"])
    result["decode"] = bench_decode(1, 9, 64, 64, every) + bench_decode(64, 9, 64, 64, every)
    _partial(args, result["decode"])
    save(result)
    shapes = [(65536 // T, 8, T, D) for T in Ts for D in Ds] + [(1, 9, 65536, 64)]
    for i, (B, H, T, D) in enumerate(shapes):
        fla_here = fla_fn if (args.fla_dims is None or D in args.fla_dims or H == 9) else None
        new = bench_gpu_one(B, H, T, D, 64, ours, fla_here, bw, dtype, check=not args.no_check,
                            probes=probes)
        _partial(args, new)
        result["rows"] += new
        if i + 1 == len(shapes) or shapes[i + 1][2] != T:
            add_ratios(result)
            save(result)
    add_ratios(result)
    return result


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def markdown_gpu(result: dict, env: dict) -> str:
    lines = [f"# linear_attention on {env.get('gpu')}", "",
             f"torch {env['torch']}, triton {env.get('triton')}, fla {env.get('fla')}, commit {env['commit']}; "
             f"bf16, causal; copy bandwidth measured {result['hbm_bytes_per_s'] / 1e12:.2f} TB/s; "
             f"triton.testing.{'do_bench_cudagraph' if env.get('timer') == 'cudagraph' else 'do_bench'} median.", "",
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
    sweep = result.get("split_sweep")
    if sweep:
        lines += ["", f"Triton split-T target (programs per SM) swept first over {sweep['shapes']} ([B, H, T, D]); "
                  "geometric mean of time / best time per shape:", "",
                  "| direction | " + " | ".join(str(v) for v in sweep["values"]) + " | chosen |",
                  "|---|" + "---|" * (len(sweep["values"]) + 1)]
        for d in ("fwd", "bwd"):
            if d in sweep:
                lines.append(f"| {d} | " + " | ".join(f"{sweep[d]['score'][str(v)]:.3f}" for v in sweep["values"])
                             + f" | {sweep[d]['chosen']} |")
    bk = result.get("fwd_bk_sweep")
    if bk:
        lines += ["", "Triton forward's widest feature tile (FWD_MAX_BK), forward ms per [B, H, T, D]:", "",
                  "| FWD_MAX_BK | " + " | ".join(str(x) for x in bk["shapes"]) + " | score |",
                  "|---|" + "---|" * (len(bk["shapes"]) + 1)]
        lines += [f"| {v}{' (chosen)' if v == bk['chosen'] else ''} | " + " | ".join(f"{t:.3f}" for t in bk["ms"][str(v)])
                  + f" | {bk['score'][str(v)]:.3f} |" for v in bk["values"]]
    lines += ["", "SDPA causal (flash), head dim 64:", "", "| B | H | T | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|"]
    for r in result["sdpa"]:
        lines.append(f"| {r['B']} | {r['H']} | {r['T']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} |")
    lines += ["", "Decode step (bf16 q/k/v, fp32 state):", "", "| impl | B | H | D | us/step | floor us |",
              "|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['impl']} | {r['B']} | {r['H']} | {r['D']} | {_f(r.get('us_per_step'), '{:.1f}')} "
                     f"| {_f(r.get('floor_us'), '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--T", type=int, default=None, help="CPU: sequence length (default 4096)")
    p.add_argument("--repeat", type=int, default=5, help="CPU: measurement rounds (backends interleaved)")
    p.add_argument("--D", default=None, help="GPU: comma-separated feature dims")
    p.add_argument("--Ts", default=None, help="GPU: comma-separated sequence lengths, in the order run "
                                              "(default 1024,4096,16384,65536)")
    p.add_argument("--backends", default=None, help="GPU: comma-separated backends of ours to time "
                                                    "(default: every available one)")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--fla-dims", default=None, type=lambda s: [int(x) for x in s.split(",")],
                   help="GPU: run fla only at these feature dims (each new D costs fla a compile + autotune)")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: sweep triton's split-T target first and use the best value")
    p.add_argument("--prepare", action="store_true",
                   help="GPU: probe fla for crashes and compile every kernel in parallel processes, then exit")
    p.add_argument("--jobs", type=int, default=12, help="--prepare: worker processes at a time")
    p.add_argument("--prepare-timeout", type=int, default=240,
                   help="--prepare: seconds for all of it (its workers are stopped by then)")
    p.add_argument("--fla-shards", type=int, default=4,
                   help="--prepare: processes per fla feature dim that compile slices of fla's autotune configs")
    p.add_argument("--probe-file", default=None, help="fla probe results (default: <out>/fla_probe.json)")
    p.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe-fla", default=None, help=argparse.SUPPRESS)
    p.add_argument("--fla-shard", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timer", choices=("events", "cudagraph"), default=None,
                   help="GPU: do_bench (host time included when host-bound; default) or do_bench_cudagraph")
    p.add_argument("--cpu", action="store_true", help="run the CPU benchmark even when CUDA is present")
    p.add_argument("--out", default=str(ROOT / "results"), help="directory for the JSON and markdown results")
    args = p.parse_args(argv)
    global TIMER
    TIMER = args.timer or TIMER
    if args.probe_fla:
        return probe_fla(int(args.probe_fla), _grid(args)[0], args.fla_shard)
    if args.warm:
        return warm(args)
    if args.prepare:
        return prepare(args)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    env = environment(device)
    env["timer"] = TIMER
    tag = device_tag(env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> str:
        result["env"] = env
        md = markdown_gpu(result, env) if gpu else markdown_cpu(result, env)
        (out / f"linear_attn_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"linear_attn_{tag}.md").write_text(md)
        return md

    result = bench_gpu(args, save) if gpu else bench_cpu(args)
    print(save(result))
    return result


if __name__ == "__main__":
    main()
