"""Layerwise training of the feature maps on cached teacher q/k (one teacher forward feeds all layers), the
"direct" next-token objective, and the optional end-to-end second stage.

Under torchrun (``fastattn.distributed``) every rank holds the whole model and the same feature maps; each step's
global batch is split over the ranks, gradients are averaged over ranks after backward (the feature maps are tiny:
one flat all-reduce per step), losses in the history are global means, and rank 0 writes the checkpoints. The
checkpoint holds global state only (step, feature maps, optimizer, history), so a run resumes with any number of
processes. With ``cfg.fsdp`` (more than one process) the end-to-end stages (``train_direct``) train a fully sharded
(FSDP2) copy of the model that shares its unsharded tensors with it (each rank holds the model once plus 1 / N of it;
the trained feature maps are gathered back into the model at the end), so the caller's model stays whole."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..hf import adapters
from .losses import LOSSES


def optimizer(model: nn.Module, cfg, lr_scale: float = 1.0, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam over the adapters: feature maps with the paper's learning rates z 0.02, log_alpha 0.2 (other
    feature-map parameters: lr_other), all times lr_scale; LoRA factors (stage 2) at cfg.lora_lr. capturable:
    Adam's state on the device, so that its step can live in a CUDA graph."""
    groups = {"z": [], "log_alpha": [], "other": [], "lora": []}
    for adapter in adapters(model).values():
        for name, p in adapter.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            groups["lora" if name.startswith("lora.") else leaf if leaf in groups else "other"].append(p)
    lrs = {"z": cfg.lr_z * lr_scale, "log_alpha": cfg.lr_alpha * lr_scale, "other": cfg.lr_other * lr_scale,
           "lora": getattr(cfg, "lora_lr", cfg.lr_other)}
    return torch.optim.Adam([{"params": ps, "lr": lrs[n], "name": n} for n, ps in groups.items() if ps],
                            capturable=capturable)


def _scaling(model) -> float:
    from ..hf import head_counts
    return head_counts(model)[2] ** -0.5


def feature_parameters(model) -> list[nn.Parameter]:
    """The trainable feature-map parameters of every linearized layer, in layer order."""
    return [p for a in adapters(model).values() for p in a.feature_map.parameters()]


def adapter_parameters(model) -> list[nn.Parameter]:
    """Every adapter parameter (feature maps and LoRA factors), in layer order."""
    return [p for a in adapters(model).values() for p in a.parameters()]


def _checkpoint(path: Path | None, step: int, model, opt, history) -> None:
    """Rank 0 writes (atomically) the global training state (every rank gathers its shards with FSDP); every
    rank waits until it is on disk."""
    if path is None:
        return
    state = {"step": step, "adapters": {i: distributed.full_state_dict(a) for i, a in adapters(model).items()},
             "optimizer": distributed.full_optimizer_state(opt), "history": history}
    if distributed.is_main():
        _write_checkpoint(path, state)
    distributed.barrier()


def _write_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _restore(path: Path | None, model, opt) -> tuple[int, list]:
    if path is None or not path.exists():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    for i, a in adapters(model).items():   # sharded (FSDP) or not
        distributed.load_full_state_dict(a, state["adapters"][i])
    distributed.load_optimizer_state(opt, state["optimizer"])
    return state["step"], state["history"]


def sample_rows(T: int, count: int, seed: int, step: int) -> torch.Tensor | None:
    """``count`` distinct query positions out of T for one step (None: all rows), a function of (seed, step)
    alone so that a resumed run draws the same rows."""
    if not count or count >= T:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(T, generator=g)[:count].sort().values


def train_layerwise(model, teacher_batches: list[list[dict]], cfg, ckpt: Path | None = None,
                    progress: bool = True, seed: int = 0) -> list[dict]:
    """Train every layer's feature map on its own teacher q/k; returns the per-step history
    [{"step", "loss" (mean over layers), "per_layer": [...]}]. cfg.loss_rows > 0 evaluates each step's loss on
    that many sampled query rows per sequence (see losses.py).

    teacher_batches: per step, this rank's equal part of the global batch (the whole batch for one process);
    per-layer captures as from capture.capture_batch. Gradients and logged losses are averaged over ranks, so
    N ranks with B / N sequences each train exactly as one process with B. ckpt: written by rank 0 every
    cfg.ckpt_every steps and at the end; restored (with any number of processes) when it exists."""
    from tqdm.auto import tqdm
    loss_fn = LOSSES[cfg.loss]
    ads = adapters(model)
    from ..hf import attention_modules
    causal = getattr(attention_modules(model)[0], "is_causal", True)
    first = teacher_batches[0][next(iter(ads))]["q"] if teacher_batches and ads else None
    # (the l2 loss draws its pairs with a host generator: not capturable)
    graphs = (bool(getattr(cfg, "cuda_graph", False)) and first is not None and first.is_cuda and cfg.loss != "l2"
              and distributed.world_size() == 1)
    opt = optimizer(model, cfg, capturable=graphs)
    start, history = _restore(ckpt, model, opt)
    total = cfg.epochs * len(teacher_batches)
    scaling = _scaling(model)

    def body(batch: list[dict], rows: torch.Tensor | None) -> torch.Tensor:
        losses = []
        for i, adapter in ads.items():
            loss, _ = loss_fn(adapter, batch[i], scaling, causal, rows)
            loss.backward()                    # layers share no parameters: one backward each bounds memory
            losses.append(loss.detach())
        distributed.average_gradients(feature_parameters(model))
        opt.step()
        return torch.stack(losses)

    stepper = _GraphedStep(body, opt) if graphs else None
    bar = tqdm(total=total, initial=start, desc=f"layerwise {cfg.loss}", disable=not progress, leave=False)
    for step in range(start, total):
        batch = teacher_batches[step % len(teacher_batches)]
        rows = sample_rows(batch[next(iter(ads))]["q"].shape[2], cfg.loss_rows, seed, step)
        if stepper is not None:
            losses = stepper.step(step - start, batch, None if rows is None else rows.to(first.device))
        else:
            losses = _eager_step(opt, body, batch, rows)
        per_layer = distributed.all_reduce(losses).tolist()   # one host sync per step
        history.append({"step": step + 1, "loss": sum(per_layer) / len(per_layer), "per_layer": per_layer})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        if cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == total):
            _checkpoint(ckpt, step + 1, model, opt, history)
    bar.close()
    opt.zero_grad(set_to_none=True)   # (a captured step's gradients live in its graph's memory pool)
    return history


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ids [B, T]."""
    logits = model(ids, use_cache=False).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_direct(model, train_ids: torch.Tensor, cfg, steps: int, lr_scale: float = 1.0,
                 progress: bool = True, desc: str = "direct", ckpt: Path | None = None) -> list[dict]:
    """End-to-end next-token training of the adapters (feature maps, and LoRA factors once ``add_lora`` made them;
    base weights frozen): the "direct" loss and the second stage. train_ids [N, T]: the whole training set on every rank; step s uses the global batch of
    rows s*B .. (s+1)*B - 1 (mod N), B = cfg.batch_size, of which each rank takes its contiguous B / world rows;
    gradients and the logged loss are averaged over ranks. ckpt: as in train_layerwise. cfg.fsdp (more than one
    process): trains a fully sharded copy (see the module docstring)."""
    from tqdm.auto import tqdm
    frozen = [p for p in model.parameters() if p.requires_grad]
    feature = {id(p) for p in adapter_parameters(model)}
    for p in frozen:
        p.requires_grad_(id(p) in feature)
    fsdp = bool(getattr(cfg, "fsdp", False)) and distributed.world_size() > 1
    whole, model = model, _sharded_copy(model) if fsdp else model
    graphs = bool(getattr(cfg, "cuda_graph", False)) and train_ids.is_cuda and distributed.world_size() == 1
    opt = optimizer(model, cfg, lr_scale, capturable=graphs)
    start, history = _restore(ckpt, model, opt)
    n = train_ids.shape[0]
    mine = distributed.shard(cfg.batch_size, f"batch_size={cfg.batch_size}")
    params = adapter_parameters(model)

    def body(ids: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(model, ids)
        loss.backward()
        if not fsdp:   # FSDP averages in its reduce-scatter
            distributed.average_gradients(params)
        opt.step()
        return loss

    stepper = _GraphedStep(body, opt) if graphs else None
    try:
        for step in tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress,
                         leave=False):
            ids = train_ids[(torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % n)[mine]]
            loss = stepper.step(step - start, ids) if stepper is not None else _eager_step(opt, body, ids)
            history.append({"step": step + 1, "loss": distributed.all_reduce(loss.detach()).item()})
            if not math.isfinite(history[-1]["loss"]):
                raise FloatingPointError(f"{desc} loss became {history[-1]['loss']} at step {step + 1}")
            if cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == steps):
                _checkpoint(ckpt, step + 1, model, opt, history)
        if fsdp:   # the trained feature maps back into the whole model (every rank gathers)
            sharded = adapters(model)
            for i, a in adapters(whole).items():
                a.load_state_dict(distributed.full_state_dict(sharded[i]))
    finally:
        opt.zero_grad(set_to_none=True)   # (a captured step's gradients live in its graph's memory pool)
        for p in frozen:
            p.requires_grad_(True)
    return history


def _tree(x, fn):
    """fn applied to every tensor of a nest of lists, tuples and dicts (other leaves, e.g. None, kept)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _tree(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_tree(v, fn) for v in x)
    return x


def _leaves(x) -> list:
    out = []
    _tree(x, out.append)
    return out


def _eager_step(opt: torch.optim.Optimizer, body, *inputs) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    return body(*inputs)


class _GraphedStep:
    """One training step ``body(*inputs)`` (forward, backward, optimizer step with capturable state; returns the
    loss tensor) captured once as a CUDA graph and replayed: every step has the same shapes, and the eager step's
    thousands of small ops cost far more host time than the GPU needs for them. The inputs (a nest of tensors) are
    copied into static buffers, the loss is a static tensor. The first WARMUP steps run eagerly on a side stream
    (the capture recipe: lazy initialisation off the capture stream); those are ordinary training steps. A step
    whose inputs differ in shape or structure from the captured ones runs eagerly."""

    WARMUP = 3

    def __init__(self, body, opt: torch.optim.Optimizer):
        self.body, self.opt, self.graph, self.side, self.failed = body, opt, None, torch.cuda.Stream(), False

    def eager(self, *inputs) -> torch.Tensor:
        return _eager_step(self.opt, self.body, *inputs)

    def warmup(self, *inputs) -> torch.Tensor:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            loss = self.eager(*inputs)
        torch.cuda.current_stream().wait_stream(self.side)
        return loss

    def _matches(self, inputs) -> bool:
        new, old = _leaves(inputs), _leaves(self.inputs)
        return len(new) == len(old) and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(new, old))

    def __call__(self, *inputs) -> torch.Tensor:
        if self.failed:
            return self.eager(*inputs)
        if self.graph is None:
            self.inputs = _tree(inputs, torch.clone)
            self.opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.loss = self.body(*self.inputs)
            except Exception as e:  # noqa: BLE001 - an uncapturable step trains eagerly
                import logging
                logging.getLogger("fastattn").warning("fastattn: CUDA graph capture of the training step failed "
                                                      "(%s: %s); eager steps instead", type(e).__name__, e)
                torch.cuda.synchronize()
                self.failed = True
                return self.eager(*inputs)
            self.graph = graph
        elif not self._matches(inputs):
            return self.eager(*inputs)
        else:
            for dst, src in zip(_leaves(self.inputs), _leaves(inputs)):
                dst.copy_(src)
        self.graph.replay()
        return self.loss

    def step(self, index: int, *inputs) -> torch.Tensor:
        """Training step number ``index`` (counted from this process's first): eager warm-up, then replays."""
        return self.warmup(*inputs) if index < self.WARMUP else self(*inputs)


def _sharded_copy(model: nn.Module) -> nn.Module:
    """FSDP2 copy of ``model`` (one unit per decoder layer, the root the rest): new modules that start from the
    model's own parameters and buffers (not duplicated), then shard them; the model itself is left unchanged."""
    import copy
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    student = copy.deepcopy(model, memo=shared)
    decoder = student.get_decoder() if hasattr(student, "get_decoder") else None
    if not hasattr(decoder, "layers"):
        raise ValueError(f"fsdp: no decoder layers found in {type(model).__name__} (get_decoder().layers)")
    return distributed.fully_shard_layers(student, decoder.layers)
