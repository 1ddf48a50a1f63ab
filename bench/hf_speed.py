"""Teacher (softmax, SDPA) against its linearized student on one model: prefill, generate, peak memory, profile.

Throughput does not depend on trained feature maps, so the student here is ``linearize(model, dims, "prf")``
untrained (keys calibrated on the prompt as in generate). Measured, in one process, on the GPU:
  - prefill (B=1, no cache, logits of the last token) at each T, median of 3, with each linear-attention backend
    the student can use (auto, triton, cuda);
  - HF ``generate`` (teacher: KV cache; student: the recurrent cache) and ``fastattn.hf.greedy_decode`` (student:
    one CUDA graph replay per token) at B=1 after a prompt of --gen-context tokens, tokens/s and peak memory;
  - a torch.profiler table of one student and one teacher prefill at the first T (host time against device
    time; the top ops by self CPU time), to show where a host-bound forward spends its time;
  - the same prefill under ``torch.compile(fullgraph=True)`` for both models at --compile-lengths (inductor fuses
    the norms, RoPE, MLP activations and residuals that teacher and student share; the student's feature maps
    and linear attention stay our fused kernels, opaque ops), eager-timed and captured as a CUDA graph.

    python bench/hf_speed.py --model path/to/model.gguf --out bench/results    # hf_speed_<device>.{json,md}
    python bench/hf_speed.py --model bench/configs/smollm2-135m-instruct.json  # same architecture, random weights

A ``.json`` model is an HF config built with random weights (speed does not depend on the weights' values), so
no weights have to travel to the GPU machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastattn import models  # noqa: E402
from fastattn.distill.evaluate import generate_throughput, prefill_inputs, prefill_throughput  # noqa: E402
from fastattn.distill.train import adapter_parameters, lm_loss  # noqa: E402
from fastattn.hf import adapters, add_lora, greedy_decode, linearize, softmax_attention  # noqa: E402
from linear_attn import device_tag, environment  # noqa: E402  (bench/ is on sys.path when run as a script)


def _profiled(fn, cuda: bool, rows: int) -> dict:
    """Run fn once under torch.profiler: op calls, self CPU and CUDA ms, the top ops by self CPU time and the
    top kernels by self CUDA time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    # an op's self device time is that of the kernels it launched, which are events of their own: device totals
    # and the kernel table count the kernel events only (summing both counted every kernel twice)
    kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]

    def dev(e) -> float:
        return e.self_device_time_total / 1e3

    def table(evs, key):
        return [{"name": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3, "self_cuda_ms": dev(e)}
                for e in sorted(evs, key=key, reverse=True)[:rows]]
    return {"ops": sum(e.count for e in events if not e.key.startswith(("cuda", "Activity"))),
            "self_cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "self_cuda_ms": sum(dev(e) for e in kernels),
            "top": table(events, lambda e: e.self_cpu_time_total), "top_cuda": table(kernels, dev)}


@torch.no_grad()
def profile_prefill(model, vocab: int, T: int, device, rows: int = 12) -> dict:
    """The profile (``_profiled``) of one B=1 prefill over T tokens, after one unprofiled warm-up."""
    ids, kw = prefill_inputs(vocab, T, device)
    model(ids, **kw)
    return {"T": T, **_profiled(lambda: model(ids, **kw), torch.device(device).type == "cuda", rows)}


@torch.no_grad()
def graphed_prefill(model, vocab: int, T: int, device, reps: int = 10) -> dict:
    """Median ms of one B=1 prefill over T tokens captured once as a CUDA graph and replayed: device time without
    the eager forward's host work (the same for teacher and student). {"error": ...} where capture fails."""
    ids, kw = prefill_inputs(vocab, T, device)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):    # warm-up off the capture stream (compilation, workspaces)
            for _ in range(2):
                model(ids, **kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(ids, **kw)
    except Exception as e:  # noqa: BLE001 - a forward that cannot be captured is a result
        torch.cuda.synchronize()
        return {"T": T, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return {"T": T, "ms": sorted(times)[reps // 2]}


def compiled_prefill(model, vocab: int, lengths: list[int], device) -> list[dict]:
    """``torch.compile(model, fullgraph=True)`` prefill per T: compile seconds (the first call), the relative error
    of its last-token logits against the eager forward's, the eager-timed compiled forward
    (``prefill_throughput``), its CUDA-graph replay (``graphed_prefill``) and its top kernels by device time
    (GPU); {"error": ...} where compilation fails."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    rows = []
    for T in lengths:
        ids, kw = prefill_inputs(vocab, T, device)
        try:
            with torch.no_grad():
                eager = model(ids, **kw).logits.float()
                t0 = time.perf_counter()
                got = compiled(ids, **kw).logits.float()
            if device.type == "cuda":
                torch.cuda.synchronize()
            row = {"T": T, "compile_s": time.perf_counter() - t0,
                   # the compiled forward checked against the eager one first (last-token logits)
                   "rel_err_vs_eager": ((got - eager).norm() / eager.norm()).item(),
                   "ms": prefill_throughput(compiled, vocab, T, device)["ms"]}
            if device.type == "cuda":
                row["graph_ms"] = graphed_prefill(compiled, vocab, T, device).get("ms")
                with torch.no_grad():   # where the compiled forward's device time goes (kernels only)
                    prof = _profiled(lambda: compiled(ids, **kw), True, 14)
                row["profile"] = {k: prof[k] for k in ("self_cuda_ms", "top_cuda")}
        except Exception as e:  # noqa: BLE001 - a model that cannot be compiled is a result
            row = {"T": T, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
    torch._dynamo.reset()
    return rows


def mask_free_sdpa() -> str:
    """The name of an attention implementation registered here: transformers' SDPA with fastattn's mask function,
    which passes no mask when nothing is padded. transformers' own mask function builds an explicit [T, T] causal
    mask while dynamo compiles or a CUDA graph captures (its ``_ignore_causal_mask_sdpa`` does not skip the mask
    while tracing, for torch < 2.14), which keeps SDPA off its flash/cuDNN kernels; without a mask SDPA runs
    ``is_causal`` in every mode. Same kernels as "sdpa" in eager prefill (no padding, no cache)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fastattn.hf.attention import padding_mask, register_attention
    return register_attention("sdpa_mask_free", sdpa_attention_forward, padding_mask)


def load_model(name: str, device):
    """(model, vocab size): bf16 on a GPU. ``name``: anything ``fastattn.models.load`` takes, or an HF config
    ``.json`` built with random weights and SDPA attention."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    if not name.endswith(".json"):
        model, tok = models.load(name, dtype=dtype, device=device)
        return model, len(tok)
    import transformers
    cfg = transformers.AutoConfig.for_model(**json.loads(Path(name).read_text()))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                                          dtype=dtype or torch.float32)
    return model.to(device).eval(), cfg.vocab_size


def train_step(model, vocab: int, batch: int, T: int, device, reps: int = 3) -> dict:
    """Median seconds of one end-to-end training step of the adapters (``lm_loss`` forward + backward, base
    weights frozen: the distill driver's second stage) on [batch, T] tokens, and its profile."""
    ids = torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(3)).to(device)
    params = adapter_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def step():
        lm_loss(model, ids).backward()
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "T": T, "seconds": sorted(times)[reps // 2], **_profiled(step, device.type == "cuda", 8)}


def _set_backend(model, backend: str) -> None:
    for a in adapters(model).values():
        a.backend = backend


def run(args) -> dict:
    device = torch.device(args.device)
    model, vocab = load_model(args.model, device)
    res = {"model": args.model, "compile_lengths": args.compile_lengths, "lengths": args.lengths,
           "gen_context": args.gen_context, "new_tokens": args.new_tokens, "feature_dims": args.dims,
           "teacher": {}, "student": {}}
    t, s = res["teacher"], res["student"]
    linearize(model, args.dims, feature_map="prf", seed=0)

    def measure(who: str, d: dict, backends: list[str]) -> None:
        """Eager prefill per linear-attention backend (the teacher: one run), graphed prefill, profiles, generate."""
        for backend in backends:
            _set_backend(model, backend)
            try:
                d.setdefault("prefill", {})[backend] = [prefill_throughput(model, vocab, T, device)
                                                        for T in args.lengths]
            except RuntimeError as e:   # a backend this machine lacks: say so
                d["prefill"][backend] = str(e)
            print(who, "prefill", backend, d["prefill"][backend], flush=True)
        _set_backend(model, "auto")
        if device.type == "cuda":
            d["prefill_graph"] = [graphed_prefill(model, vocab, T, device) for T in args.lengths]
            print(who, "prefill, CUDA graph", d["prefill_graph"], flush=True)
        if args.compile_lengths:
            d["prefill_compiled"] = compiled_prefill(model, vocab, args.compile_lengths, device)
            print(who, "prefill, torch.compile", d["prefill_compiled"], flush=True)
        d["profile"] = [profile_prefill(model, vocab, T, device) for T in args.lengths]
        d["generate"] = generate_throughput(model, vocab, args.gen_context, args.new_tokens, device)
        print(who, "generate", d["generate"], flush=True)

    with softmax_attention(model):
        measure("teacher", t, ["auto"])
    t["prefill"] = t["prefill"]["auto"]
    if args.compile_lengths:   # the teacher's graph and compiled prefill once more, SDPA kept on is_causal
        m = res["teacher_mask_free"] = {}
        with softmax_attention(model, mask_free_sdpa()):
            if device.type == "cuda":
                m["prefill_graph"] = [graphed_prefill(model, vocab, T, device) for T in args.compile_lengths]
            m["prefill_compiled"] = compiled_prefill(model, vocab, args.compile_lengths, device)
        print("teacher, mask-free SDPA: graph", m.get("prefill_graph"), "compiled", m["prefill_compiled"], flush=True)
    # fix every layer's key shift on a prompt, as a trained student has it (calibrate_key_shifts in the driver)
    greedy_decode(model, torch.randint(0, vocab, (1, 512), generator=torch.Generator().manual_seed(2)).to(device), 1)
    measure("student", s, args.backends)
    s["greedy_decode"] = generate_throughput(model, vocab, args.gen_context, args.new_tokens, device,
                                             fixed_steps=True)
    print("student greedy_decode", s["greedy_decode"], flush=True)
    if args.train_batch:   # the second stage's step: linear attention, then the window hybrid, LoRA on both
        s["train_step"] = {}
        for window in (0, args.train_window):
            linearize(model, args.dims, feature_map="prf", window=window, seed=0)
            add_lora(model, 8, 16.0, seed=0)
            s["train_step"][f"window {window} + lora"] = train_step(model, vocab, args.train_batch, args.train_T,
                                                                     device)
            print("student train step, window", window, s["train_step"][f"window {window} + lora"], flush=True)
    return res


def _ms(row: dict) -> str:
    return f"{row['ms']:.1f}" if "ms" in row else "n/a"


def _at(rows, T: int, key: str = "ms"):
    """rows[i][key] for the row of length T (None where absent or failed)."""
    return next((r.get(key) for r in rows if isinstance(r, dict) and r.get("T") == T), None) \
        if isinstance(rows, list) else None


def compiled_table(res: dict) -> list[str]:
    """Markdown lines: each model's prefill eager / CUDA graph / compiled / compiled + graph at the compiled
    lengths (the teacher also with ``mask_free_sdpa``), and the ratio of the best of each (the same modes open to
    both models)."""
    t, s = res["teacher"], res["student"]
    if not t.get("prefill_compiled") and not s.get("prefill_compiled"):
        return []
    models = tuple((who, d) for who, d in (("teacher", t), ("teacher, mask-free SDPA", res.get("teacher_mask_free")),
                                            ("student", s)) if d)
    lines = ["", "Prefill under torch.compile(fullgraph=True, inductor), B=1, ms (eager: the student's fastest "
             "backend; best: the fastest of the four for each model):", "",
             "| T | model | eager | CUDA graph | compiled | compiled, CUDA graph | compile s | compiled vs eager, "
             "rel. err | best |", "|---" * 9 + "|"]
    for T in res.get("compile_lengths") or []:
        best = {}
        for who, d in models:
            runs = d.get("prefill", [])
            eager = min((v for v in (_at(r, T) for r in (runs.values() if isinstance(runs, dict) else [runs])) if v),
                        default=None)
            comp = d.get("prefill_compiled", [])
            vals = [eager, _at(d.get("prefill_graph", []), T), _at(comp, T), _at(comp, T, "graph_ms")]
            best[who] = min((v for v in vals if v), default=None)
            err = _at(comp, T, "rel_err_vs_eager")
            cells = [f"{v:.2f}" if v else "n/a" for v in vals + [_at(comp, T, "compile_s")]] \
                + [f"{err:.1e}" if err is not None else "n/a", f"{best[who]:.2f}" if best[who] else "n/a"]
            lines.append(f"| {T} | {who} | " + " | ".join(cells) + " |")
        teacher = min((v for k, v in best.items() if k != "student" and v), default=None)
        if teacher and best["student"]:
            lines += ["", f"T={T}: best teacher {teacher:.2f} ms / best student {best['student']:.2f} ms = "
                          f"**{teacher / best['student']:.2f}x**", ""]
        errs = [f"{who}: {e}" for who, d in models
                for e in [_at(d.get("prefill_compiled", []), T, "error")] if e]
        if errs:
            lines += ["", f"T={T} compile failed: " + "; ".join(errs)]
        for who, d in models:
            prof = _at(d.get("prefill_compiled", []), T, "profile")
            if prof:
                lines += ["", f"{who}, compiled, T={T}: kernels {prof['self_cuda_ms']:.2f} ms of device time; top "
                          "kernels", "", "| kernel | calls | ms |", "|---|---|---|"]
                lines += [f"| `{e['name'][:90]}` | {e['count']} | {e['self_cuda_ms']:.2f} |" for e in prof["top_cuda"]]
    return lines


def markdown(res: dict, env: dict) -> str:
    t, s = res["teacher"], res["student"]
    graphs = "prefill_graph" in t
    lines = [f"# Teacher vs linearized student: {Path(res['model']).name}", "",
             f"GPU {env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, commit {env['commit']}; "
             f"bf16, B=1, student: untrained prf, {res['feature_dims']} features per head in every layer, key shifts "
             "calibrated on a 512-token prompt. Eager forward, median of 3; CUDA graph: the same forward captured "
             "once and replayed (device time), median of 10.", "",
             "| prefill T | teacher (SDPA) ms | " + " | ".join(f"student {b} ms" for b in s["prefill"])
             + " | teacher / student (auto) |" + (" teacher, graph ms | student, graph ms | ratio, graphs |"
                                                  if graphs else ""),
             "|---" * (len(s["prefill"]) + 3 + 3 * graphs) + "|"]
    for i, p in enumerate(t["prefill"]):
        cells = [f"{v[i]['ms']:.1f}" if isinstance(v, list) else "n/a" for v in s["prefill"].values()]
        auto = s["prefill"].get("auto")
        ratio = f"{p['ms'] / auto[i]['ms']:.2f}x" if isinstance(auto, list) else "n/a"
        row = f"| {p['T']} | {p['ms']:.1f} | " + " | ".join(cells) + f" | {ratio} |"
        if graphs:
            tg, sg = t["prefill_graph"][i], s["prefill_graph"][i]
            gratio = f"{tg['ms'] / sg['ms']:.2f}x" if "ms" in tg and "ms" in sg else "n/a"
            row += f" {_ms(tg)} | {_ms(sg)} | {gratio} |"
        lines.append(row)
    errors = [f"{who} T={g['T']}: {g['error']}" for who, d in (("teacher", t), ("student", s))
              for g in d.get("prefill_graph", []) if "error" in g]
    if errors:
        lines += ["", "CUDA graph capture failed: " + "; ".join(errors)]
    lines += compiled_table(res)
    lines += ["", f"| generate, context {res['gen_context']}, {res['new_tokens']} new tokens | tokens/s | peak GB | "
              "vs teacher |", "|---|---|---|---|"]
    base = t["generate"]["tokens_per_s"]
    for name, row in (("teacher, HF generate (KV cache)", t["generate"]),
                      ("student, HF generate (recurrent cache)", s["generate"]),
                      ("student, greedy_decode (CUDA graph)", s["greedy_decode"])):
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row.get('peak_mem_gb', float('nan')):.2f} | "
                     f"{row['tokens_per_s'] / base:.2f}x |")
    for name, row in s.get("train_step", {}).items():
        lines += ["", f"Training step of the adapters ({name}, lm_loss forward + backward, [{row['batch']}, "
                      f"{row['T']}] tokens): {row['seconds'] * 1e3:.0f} ms, {row['ops']} op calls, self CUDA "
                      f"{row['self_cuda_ms']:.0f} ms. Top ops by self CPU: "
                      + ", ".join(f"`{e['name'][:60]}` {e['count']}x {e['self_cpu_ms']:.1f} ms" for e in row["top"])]
    for who, d in (("teacher", t), ("student", s)):
        lines += [""] + [f"Profile of one {who} prefill at T={p['T']}: {p['ops']} op calls, self CPU "
                         f"{p['self_cpu_ms']:.1f} ms, self CUDA {p['self_cuda_ms']:.1f} ms." for p in d["profile"]]
        p = d["profile"][-1]
        for title, key in (("ops by self CPU", "top"), ("kernels by self CUDA", "top_cuda")):
            lines += ["", f"{who}, T={p['T']}: top {title}", "", "| op | calls | self CPU ms | self CUDA ms |",
                      "|---|---|---|---|"]
            lines += [f"| `{e['name'][:90]}` | {e['count']} | {e['self_cpu_ms']:.2f} | {e['self_cuda_ms']:.2f} |"
                      for e in p[key]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a name, HF directory or .gguf (fastattn.models.load)")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 16384])
    ap.add_argument("--gen-context", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--compile-lengths", type=lambda s: [int(x) for x in s.split(",") if x], default=[16384],
                    help="prefill lengths timed under torch.compile for both models ('' : none)")
    ap.add_argument("--dims", type=int, default=64, help="feature dim of every layer")
    ap.add_argument("--backends", type=lambda s: s.split(","), default=["auto", "triton", "cuda"])
    ap.add_argument("--train-batch", type=int, default=8, help="batch of the training-step timing (0: skip)")
    ap.add_argument("--train-T", type=int, default=1024)
    ap.add_argument("--train-window", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of this script")
    ap.add_argument("--out", default=None, help="folder for hf_speed_<device>.json and .md")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("hf_speed.py measures GPU throughput; no CUDA device here")
    t0 = time.time()
    res = run(args)
    env = environment(torch.device(args.device))
    res["env"], res["seconds"] = env, time.time() - t0
    md = markdown(res, env)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = device_tag(env)
        (out / f"hf_speed_{name}.json").write_text(json.dumps(res, indent=1))
        (out / f"hf_speed_{name}.md").write_text(md)
    return res


if __name__ == "__main__":
    main()
