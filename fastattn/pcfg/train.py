"""The training loop: next-token loss on terminals and EOS, fresh seeded samples per step, checkpoints, resume,
and the metadata-free cooldown branch.

Under ``torchrun --nproc_per_node=N`` (``fastattn.distributed``) each rank takes rows ``rank::N`` of the step's
global batch (the same documents whatever N: ``training_batch``). The loss is the sum of the rank's token losses
divided by the *global* token count (all-reduced), so the sum over ranks is the one-process loss; every rank
backpropagates N times its part and gradients are averaged over ranks (``average_gradients``, or FSDP's
reduce-scatter with ``cfg.fsdp``), which gives exactly the one-process gradient. Checkpoints hold only global state
(full model and optimizer state, step, history) and are written by rank 0, so a run resumes with any number of
processes."""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from .config import PCFGRunConfig
from .data import DocumentSource, training_batch
from .grammar import LeveledPCFG
from .model import build_model


def lr_at(step: int, cfg: PCFGRunConfig) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def autocast(device: torch.device, cfg: PCFGRunConfig):
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def token_losses(model: nn.Module, tokens: Tensor) -> Tensor:
    """-log p(tokens[:, t] | tokens[:, :t]) [B, L-1] in fp32 (entry t-1 scores token t)."""
    logits = model(input_ids=tokens, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A host batch on ``device``; to a GPU through pinned memory without blocking, so the host samples the next
    batch while the GPU still works on this one (a plain copy would wait for the GPU at every step)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def make_optimizer(model: nn.Module, cfg: PCFGRunConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _full_state(model: nn.Module, opt: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) of the whole model on CPU; with FSDP gathered from the shards
    (a collective: every rank calls it) in the optimizer's FQN-keyed form."""
    if not fsdp:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)


def _load_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load a checkpoint written by ``_save`` into this run's model and optimizer: a plain one without FSDP, an
    FSDP one (FQN-keyed optimizer state) with or without FSDP."""
    fqn_keyed = state.get("opt_format") == "fqn"
    if not fqn_keyed:
        if fsdp:
            raise ValueError("this checkpoint was written without --fsdp: resume it without --fsdp")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, opt, state["opt"], options=options)


def _save(path: Path, step: int, model, opt, history, fsdp: bool = False) -> None:
    """Rank 0 writes (atomically) the global training state; every rank takes part in gathering it (FSDP) and
    waits until it is on disk."""
    model_state, opt_state = _full_state(model, opt, fsdp)
    if distributed.is_main():
        tmp = path.with_suffix(".tmp")
        torch.save({"step": step, "model": model_state, "opt": opt_state, "history": history,
                    "opt_format": "fqn" if fsdp else "torch"}, tmp)
        tmp.replace(path)
    distributed.barrier()


def backward(model: nn.Module, batch: dict, device, cfg: PCFGRunConfig, fsdp: bool = False) -> Tensor:
    """Forward and backward of this rank's rows of one global batch; returns this rank's share of the global
    masked-mean loss (the shares sum over ranks to the one-process loss) and leaves in every ``.grad`` the
    gradient of the global loss (each rank backpropagates world x its share; ranks average: DDP or FSDP)."""
    with autocast(device, cfg):
        losses = token_losses(model, batch["tokens"])
    mask = batch["loss_mask"][:, 1:].float()
    loss = (losses * mask).sum() / distributed.all_reduce(mask.sum(), "sum").clamp(min=1)
    (loss * distributed.world_size()).backward()
    if not fsdp:   # FSDP averages in its reduce-scatter
        distributed.average_gradients(model.parameters())
    return loss.detach()


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 (``fully_shard``): every decoder layer its own unit, the rest (tied embeddings, norm) the root."""
    return distributed.fully_shard_layers(model, model.model.layers)


def load_trained(cfg: PCFGRunConfig, pcfg: LeveledPCFG, seed: int, run_dir: Path, device) -> nn.Module:
    model = build_model(cfg, pcfg, seed)
    model.load_state_dict(torch.load(Path(run_dir) / "model.pt", map_location="cpu"))
    return model.to(device).eval()


def train_run(cfg: PCFGRunConfig, pcfg: LeveledPCFG, meta_depth: int, seed: int, run_dir: Path,
              device: torch.device, branch_from: Path | None = None, progress: bool = True,
              log=print) -> tuple[nn.Module, dict]:
    """Train one model; returns (model in eval mode, {"history", "train_seconds", ...}).

    A finished run (``train.json`` + ``model.pt``) is loaded instead of retrained; an interrupted one resumes from
    ``ckpt.pt``. A D_M > 0 run with ``cfg.cooldown_steps`` writes ``branch.pt`` when it reaches step
    ``steps - cooldown_steps``; ``branch_from=<that file>`` trains the metadata-free cooldown from there.
    Under torchrun every rank calls this (see the module docstring); files are written by rank 0 and every rank
    returns the same model and result. ``cfg.fsdp`` (more than one process): the model is fully sharded (FSDP2).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "train.json"
    if cfg.resume and done.exists() and (run_dir / "model.pt").exists():
        return load_trained(cfg, pcfg, seed, run_dir, device), json.loads(done.read_text())
    fsdp = bool(cfg.fsdp) and distributed.world_size() > 1
    rank, world = distributed.rank(), distributed.world_size()
    distributed.shard(cfg.batch_size, f"batch_size={cfg.batch_size}")   # equal parts: raises otherwise
    model = build_model(cfg, pcfg, seed).to(device)
    if fsdp:
        model = shard_model(model)
    opt = make_optimizer(model, cfg)
    ckpt, start, history = run_dir / "ckpt.pt", 0, []
    resume_from = ckpt if cfg.resume and ckpt.exists() else branch_from
    if resume_from is not None:
        state = torch.load(resume_from, map_location=device)
        _load_state(model, opt, state, fsdp)
        start, history = state["step"], list(state["history"])
        log(f"{run_dir.name}: resumed at step {start} from {resume_from}")
    branch_step = cfg.steps - cfg.cooldown_steps
    source = DocumentSource(pcfg, seed, cfg.dataset_size)
    model.train()
    t0, window = time.time(), []
    steps = range(start, cfg.steps)
    if progress and distributed.is_main():
        try:
            from tqdm import tqdm
            steps = tqdm(steps, desc=run_dir.name, leave=False, mininterval=5)
        except ImportError:
            pass
    for step in steps:
        if step == branch_step and cfg.cooldown_steps and meta_depth > 0 and branch_from is None:
            _save(run_dir / "branch.pt", step, model, opt, history, fsdp)
        p_meta = 0.0 if branch_from is not None and step >= branch_step else cfg.p_meta
        batch = to_device(training_batch(source, cfg.batch_size, step, meta_depth, p_meta, rank, world), device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss = backward(model, batch, device, cfg, fsdp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        window.append(loss)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean = distributed.all_reduce(torch.stack(window).mean(), "sum")
            row = {"step": step + 1, "loss": float(mean), "lr": lr_at(step, cfg),
                   "p_meta": p_meta, "seconds": time.time() - t0}
            history.append(row)
            window = []
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            _save(ckpt, step + 1, model, opt, history, fsdp)
    seconds = time.time() - t0
    model_state, _ = _full_state(model, opt, fsdp)
    result = {"meta_depth": meta_depth, "seed": seed, "cooldown": branch_from is not None, "history": history,
              "train_seconds": seconds, "steps_run": cfg.steps - start,
              "final_loss": history[-1]["loss"] if history else float("nan"), "world_size": world,
              "fsdp": fsdp}
    if distributed.is_main():
        torch.save(model_state, run_dir / "model.pt")
        done.write_text(json.dumps(result, indent=1))
        ckpt.unlink(missing_ok=True)
        if history:
            log(f"{run_dir.name}: {cfg.steps - start} steps in {seconds:.0f}s, final train loss "
                f"{history[-1]['loss']:.4f}")
    distributed.barrier()
    if fsdp:   # evaluation runs on rank 0 alone: hand back an unsharded copy
        return load_trained(cfg, pcfg, seed, run_dir, device), result
    return model.eval(), result
