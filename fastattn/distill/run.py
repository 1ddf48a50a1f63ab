"""The distillation experiment: DoF of the teacher, allocations at one budget, layerwise training per
(rule, seed), evaluation, and the report. Every (rule, seed) run is saved as it finishes, so a rerun resumes.

Under ``torchrun --nproc_per_node=N`` (see fastattn.distributed) every rank loads the teacher; rank 0 measures the
DoF and broadcasts it (so every rank allocates the same dims); each rank captures the teacher on its part of every
global batch of cfg.batch_size sequences (which must be a multiple of N) and training averages gradients over
ranks; evaluation, logs and files are rank 0's, and every rank returns rank 0's metrics.

Causal LMs are evaluated by held-out next-token loss, generated text and generate throughput. Encoders (BERT
family, non-causal attention: ``--model minilm`` or a local BERT directory) read ``[CLS] text [SEP]`` sequences
(the held-out ones partly right-padded, so padding masks are exercised) and are evaluated by their fidelity to the
teacher's final hidden states (``heldout["loss"]`` = 1 - cosine of the mean-pooled states, plus the cosine and the
relative L2 error of the hidden states; see evaluate.encoder_fidelity) and encoder-forward throughput; the
next-token objectives ("direct" loss, any stage 2) and the causal sliding-window hybrid are rejected with a
ValueError before any work (an end-to-end encoder objective would need train.train_direct to take a loss)."""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from .. import distributed, dof
from ..hf import (add_lora, adapters, attention_modules, head_counts, linearize, linearized_layers,
                  save_linearized, softmax_attention)
from ..hf.decode import graph_capturable
from . import data
from .capture import capture_batch, sample_qk
from .config import DistillConfig
from .evaluate import (attention_kl, encoder_fidelity, encoder_hidden, generate_text, generate_throughput,
                       heldout_loss, prefill_throughput)
from .report import heldout_label
from .train import train_direct, train_layerwise

ALLOCATION_RULES = {  # our rule names -> fastattn.dof.allocate_feature_dims arguments
    "uniform": dict(rule="uniform"),
    "dof": dict(rule="proportional"),
    "dof_clip": dict(rule="clip"),
    "sqrt": dict(rule="sqrt"),
}


def resolve_device(cfg: DistillConfig) -> tuple[torch.device, torch.dtype]:
    """cfg.device "auto" -> cuda:LOCAL_RANK if available else cpu ("cuda" means this rank's GPU too)."""
    device = distributed.default_device() if cfg.device in ("auto", "cuda") else torch.device(cfg.device)
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if cfg.dtype == "auto" else names[cfg.dtype]
    return device, dtype


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[s:s + batch_size] for s in range(0, ids.shape[0], batch_size)]


def teacher_dof(model, calib: list[torch.Tensor], cfg: DistillConfig) -> dict:
    """Per-head DoF [S, H] of every layer's post-RoPE q/k at cfg.lam, and the layer values (max over heads)."""
    res = sample_qk(model, calib, max_per_head=cfg.dof_samples, seed=0)
    device = next(model.parameters()).device   # the fp64 Grams and eigendecompositions: on the GPU when there is one
    per_head = []
    for layer in range(len(attention_modules(model))):
        q, k = (t.to(device) for t in res.get(layer))
        per_head.append(dof.degrees_of_freedom(q, k, cfg.lam, num_samples=cfg.dof_samples, seed=layer).tolist())
    per_layer = [max(h) for h in per_head]
    return {"lam": cfg.lam, "per_head": per_head, "per_layer": per_layer, "samples_per_head": cfg.dof_samples}


def allocations(dof_per_layer: list[float], cfg: DistillConfig, head_dim: int) -> dict[str, list[int]]:
    out = {}
    for rule in cfg.rules:
        kw = dict(ALLOCATION_RULES[rule])
        if rule == "dof_clip":
            kw["max_dim"] = head_dim  # the paper's DoF+Clip: cap at the head dim, no redistribution
        out[rule] = dof.allocate_feature_dims(dof_per_layer, cfg.budget, min_dim=cfg.min_dim,
                                              multiple_of=cfg.dim_multiple, **kw)
    return out


def calibrate_key_shifts(model, calib_batch: list[dict]) -> None:
    """Fix each PRF key shift on calibration keys so prefill and decode steps share one key scale."""
    for i, adapter in adapters(model).items():
        fm = adapter.feature_map
        if hasattr(fm, "calibrate_key_shift"):
            fm.calibrate_key_shift(calib_batch[i]["k"].float())   # GQA keys in place


def model_kind(model, cfg: DistillConfig) -> str:
    """"causal_lm" or "encoder" (non-causal attention); a ValueError for what the kind cannot run."""
    causal = getattr(attention_modules(model)[0], "is_causal", True)
    if causal and not hasattr(model, "generate"):
        raise ValueError(f"fastattn distill needs a causal LM (with generate) or a non-causal encoder; "
                         f"{cfg.model!r} ({type(model).__name__}) is causal without an LM head")
    if causal:
        return "causal_lm"
    problems = []
    if cfg.window:
        problems.append(f"window={cfg.window}: the sliding-window hybrid is causal-only (use --window 0)")
    if cfg.loss == "direct":
        problems.append("loss 'direct' trains next-token loss end to end (use a layerwise loss)")
    if cfg.stage2 != "none" and cfg.stage2_steps:
        problems.append(f"stage 2 {cfg.stage2!r} is end-to-end next-token training of causal LMs (use --stage2 none)")
    if problems:
        raise ValueError(f"{cfg.model!r} is an encoder ({type(model).__name__}, non-causal attention): "
                         + "; ".join(problems))
    return "encoder"


def inputs(tok, model, cfg: DistillConfig, encoder: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{split: (ids [N, T], attention mask [N, T] or None)} for calib, train and heldout. Encoders: [CLS] text
    [SEP] rows within max_position_embeddings; every second held-out row is right-padded (the others are not)."""
    counts = {"calib": cfg.calib_sequences, "train": cfg.train_sequences, "heldout": cfg.eval_sequences}
    if not encoder:
        return {split: (data.sequences(tok, split, cfg.context, n), None) for split, n in counts.items()}
    limit = getattr(model.config, "max_position_embeddings", None)
    return {split: data.encoder_sequences(tok, split, cfg.context, n, limit, pad_every=2 if split == "heldout" else 0)
            for split, n in counts.items()}


def _throughput(model, tok, cfg: DistillConfig, device, encoder: bool = False) -> dict:
    vocab = len(tok)
    if encoder:   # no decoding; absolute positions bound the length
        limit = getattr(model.config, "max_position_embeddings", None) or max(cfg.throughput_lengths)
        return {"prefill": [prefill_throughput(model, vocab, T, device, encoder=True)
                            for T in cfg.throughput_lengths if T <= limit],
                "skipped_lengths": [T for T in cfg.throughput_lengths if T > limit]}
    new_tokens = 32 if device.type == "cpu" else 128
    out = {"prefill": [prefill_throughput(model, vocab, T, device) for T in cfg.throughput_lengths],
           "generate": generate_throughput(model, vocab, cfg.throughput_gen_context, new_tokens, device)}
    if linearized_layers(model)[0]:   # the student: also fixed-shape steps (CUDA graphs on a GPU)
        out["fixed_steps"] = generate_throughput(model, vocab, cfg.throughput_gen_context, new_tokens, device,
                                                 fixed_steps=True)
        out["fixed_steps"]["cuda_graph"] = device.type == "cuda" and graph_capturable(model)
    return out


def run(cfg: DistillConfig, progress: bool = True, log=print) -> dict:
    distributed.init()
    main = distributed.is_main()
    progress, log = progress and main, log if main else (lambda *args, **kwargs: None)
    out = Path(cfg.out)
    if main:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_device(cfg)
    from .. import models
    t0 = time.time()
    with distributed.main_first():   # rank 0 fills the model cache, the others read it
        model, tok = models.load(cfg.model, dtype=dtype, device=device)
    kind = model_kind(model, cfg)
    encoder = kind == "encoder"
    for p in model.parameters():
        p.requires_grad_(False)
    heads, kv_heads, head_dim = head_counts(model)
    S = len(attention_modules(model))
    log(f"loaded {cfg.model} ({S} layers, {heads} heads, {kv_heads} kv heads, head dim {head_dim}) on {device} "
        f"{dtype} in {time.time() - t0:.1f}s ({kind})" + (f" on each of {distributed.world_size()} processes"
                                                          if distributed.world_size() > 1 else ""))

    seqs = inputs(tok, model, cfg, encoder)
    calib_ids, train_ids = seqs["calib"][0].to(device), seqs["train"][0].to(device)
    held_ids, held_mask = (None if t is None else t.to(device) for t in seqs["heldout"])
    kl_mask = None if held_mask is None else held_mask[:cfg.batch_size]
    metrics = {"config": cfg.to_dict(), "device": str(device), "dtype": str(dtype), "provenance": data.provenance(),
               "world_size": distributed.world_size(), "kind": kind,
               "model": {"name": cfg.model, "layers": S, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim},
               "tokens": {"calib": calib_ids.numel(), "train": train_ids.numel() * cfg.epochs,
                          "heldout": held_ids.numel() if held_mask is None else int(held_mask.sum())}}
    metrics["heldout_metric"] = heldout_label(metrics)
    label = metrics["heldout_metric"]
    teacher_hidden = None

    def heldout(model) -> dict:
        if encoder:
            return encoder_fidelity(model, held_ids, held_mask, teacher_hidden, cfg.batch_size)
        return heldout_loss(model, held_ids, cfg.batch_size)

    # ---- teacher: DoF, allocations, held-out loss, captured q/k for training ----
    with softmax_attention(model):
        t0 = time.time()
        # one DoF for all ranks: rank 0's, broadcast (the allocations follow from it deterministically)
        metrics["dof"] = distributed.broadcast_object(
            teacher_dof(model, _batches(calib_ids, cfg.batch_size), cfg) if main else None)
        log(f"DoF per layer (lambda={cfg.lam:g}): {[round(x, 1) for x in metrics['dof']['per_layer']]} "
            f"({time.time() - t0:.1f}s)")
        metrics["allocations"] = allocations(metrics["dof"]["per_layer"], cfg, head_dim)
        for rule, dims in metrics["allocations"].items():
            log(f"  {rule:>9}: {dims} (total {sum(dims)})")
        if main:
            if encoder:   # the reference of the fidelity metric (the teacher against itself: 1 - cosine = 0)
                teacher_hidden = encoder_hidden(model, held_ids, held_mask, cfg.batch_size)
            metrics["teacher"] = {"heldout": heldout(model)}
            log(f"teacher {label} {metrics['teacher']['heldout']['loss']:.4f}")
            if cfg.throughput:
                metrics["teacher"]["throughput"] = _throughput(model, tok, cfg, device, encoder)
            if not encoder:
                metrics["teacher"]["text"] = generate_text(model, tok, cfg.prompts, cfg.gen_tokens, device)
            held_capture = capture_batch(model, held_ids[:cfg.batch_size], attention_mask=kl_mask)
        keep_vo = cfg.loss == "output_mse"
        teacher_batches = [capture_batch(model, ids[distributed.shard(len(ids), f"a batch of {len(ids)} training "
                                                                                 f"sequences")], keep_vo)
                           for ids in _batches(train_ids, cfg.batch_size)] if cfg.loss != "direct" else []
        calib_capture = capture_batch(model, calib_ids[:cfg.batch_size])

    # ---- students: one per (rule, seed) ----
    metrics["runs"] = {}
    stage2 = cfg.stage2 != "none" and cfg.stage2_steps
    for rule, dims in metrics["allocations"].items():
        for seed in cfg.seeds:
            key = f"{rule}_s{seed}"
            run_dir = out / "runs" / key
            done = run_dir / "metrics.json"
            distributed.barrier()   # rank 0 has written the previous run's files
            if cfg.resume and done.exists():
                metrics["runs"][key] = json.loads(done.read_text())
                log(f"{key}: resumed from {done}")
                continue
            if main:
                run_dir.mkdir(parents=True, exist_ok=True)
            distributed.barrier()
            torch.manual_seed(seed)
            linearize(model, dims, feature_map=cfg.feature_map, softmax_layers=cfg.softmax_layers, window=cfg.window,
                      seed=1000 * seed)
            t0 = time.time()
            if cfg.loss == "direct":
                steps = cfg.epochs * -(-train_ids.shape[0] // cfg.batch_size)
                history = train_direct(model, train_ids, cfg, steps, progress=progress, ckpt=run_dir / "ckpt.pt")
            else:
                history = train_layerwise(model, teacher_batches, cfg, ckpt=run_dir / "ckpt.pt", progress=progress,
                                          seed=seed)
            calibrate_key_shifts(model, calib_capture)
            distributed.broadcast_tensors(t for a in adapters(model).values() for t in a.state_dict().values())
            result = {"rule": rule, "seed": seed, "dims": dims, "train_seconds": time.time() - t0,
                      "history": history}
            if main:
                result.update(heldout=heldout(model), kl_per_layer=attention_kl(model, held_capture, kl_mask))
                if cfg.window:   # the hybrid's linear-only ablation: the same feature maps without the window
                    with _window_off(model):
                        result["linear_only_heldout"] = heldout(model)
                if stage2:   # in the log before the (longer) second stage
                    log(f"{key}: after layerwise training, {label} {result['heldout']['loss']:.4f}, "
                        f"{result['train_seconds']:.0f}s")
            if stage2:
                if cfg.stage2 == "lora":
                    add_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=1000 * seed)
                result["stage2_history"] = train_direct(model, train_ids, cfg, cfg.stage2_steps,
                                                        lr_scale=cfg.stage2_lr / cfg.lr_z, progress=progress,
                                                        desc=f"stage 2 ({cfg.stage2})", ckpt=run_dir / "stage2.pt")
                if main:
                    result["stage2_heldout"] = heldout(model)
                    if cfg.window:
                        with _window_off(model):
                            result["stage2_linear_only_heldout"] = heldout(model)
            if not main:
                continue
            save_linearized(model, run_dir / "adapters")
            done.write_text(json.dumps(result, indent=1))
            for name in ("ckpt.pt", "stage2.pt"):
                (run_dir / name).unlink(missing_ok=True)
            metrics["runs"][key] = result
            extra = (f", cosine {result['heldout']['cosine']:.4f}, hidden rel. error "
                     f"{result['heldout']['hidden_rel_err']:.4f}" if encoder else "")
            log(f"{key}: {label} {result['heldout']['loss']:.4f} (teacher "
                f"{metrics['teacher']['heldout']['loss']:.4f}){extra}, mean KL {_mean(result['kl_per_layer']):.4f}, "
                f"{result['train_seconds']:.0f}s" + (f", after stage 2 {result['stage2_heldout']['loss']:.4f}"
                                                     if "stage2_heldout" in result else ""))

    # ---- the student of the first DoF-sized rule: text (causal LMs) and throughput ----
    if main:
        show = "dof" if "dof" in metrics["allocations"] else next(iter(metrics["allocations"]))
        from ..hf import load_linearized
        load_linearized(model, out / "runs" / f"{show}_s{cfg.seeds[0]}" / "adapters")
        metrics["student"] = {"rule": show}
        if not encoder:
            metrics["student"]["text"] = generate_text(model, tok, cfg.prompts, cfg.gen_tokens, device)
        if cfg.throughput:
            metrics["student"]["throughput"] = _throughput(model, tok, cfg, device, encoder)
            if cfg.window:   # the same student without its window: plain linear layers (CUDA-graph decoding)
                with _window_off(model):
                    metrics["student"]["throughput_linear_only"] = _throughput(model, tok, cfg, device, encoder)
        metrics["summary"] = summarize(metrics)
    return distributed.broadcast_object(metrics if main else None)


@contextlib.contextmanager
def _window_off(model):
    """Run a sliding-window hybrid as plain linear attention inside the block (same feature maps)."""
    ads = adapters(model).values()
    windows = [a.window for a in ads]
    for a in ads:
        a.window = 0
    try:
        yield model
    finally:
        for a, w in zip(ads, windows):
            a.window = w


def _mean(xs) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(metrics: dict) -> dict:
    """Per rule: held-out loss (encoders: 1 - cosine) mean and std over seeds, gap to the teacher, mean KL per
    layer; encoders also the mean cosine and relative hidden-state error."""
    teacher = metrics["teacher"]["heldout"]["loss"]
    out = {}
    for rule in metrics["allocations"]:
        runs = [r for r in metrics["runs"].values() if r["rule"] == rule]
        losses = [r["heldout"]["loss"] for r in runs]
        row = {"n": len(runs), "loss_mean": statistics.fmean(losses),
               "loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
               "kl_per_layer": [statistics.fmean(v) for v in zip(*(r["kl_per_layer"] for r in runs))],
               "total_dim": sum(metrics["allocations"][rule])}
        row["gap"] = row["loss_mean"] - teacher
        row["kl_mean"] = _mean(row["kl_per_layer"])
        if runs and "cosine" in runs[0]["heldout"]:
            row["cosine_mean"] = statistics.fmean(r["heldout"]["cosine"] for r in runs)
            row["hidden_rel_err_mean"] = statistics.fmean(r["heldout"]["hidden_rel_err"] for r in runs)
        for name in ("stage2", "linear_only", "stage2_linear_only"):   # optional stages and ablations
            if runs and f"{name}_heldout" in runs[0]:
                stage = [r[f"{name}_heldout"]["loss"] for r in runs]
                row[f"{name}_loss_mean"] = statistics.fmean(stage)
                row[f"{name}_loss_std"] = statistics.stdev(stage) if len(stage) > 1 else 0.0
                row[f"{name}_gap"] = row[f"{name}_loss_mean"] - teacher
        out[rule] = row
    return out
