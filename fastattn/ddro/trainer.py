"""DDRO / RDRO trainer (and the DPO, KTO, BCO baselines) for HF causal language models.

- data: TRL's unpaired (prompt/completion/label) or paired (prompt/chosen/rejected) formats (``data.py``);
- sequence log-probs: ``fastattn.seq_logps`` on the decoder's final hidden states and the lm-head weight (no
  [B, T, vocab] logits);
- reference log-probs: computed once, before the first step, from ``ref_model`` (default: the policy as given),
  cached in ``output_dir/ref_logps.pt`` under a fingerprint of the tokenized data;
- mu / alpha "auto": the preferred fraction of the whole dataset;
- DDRO/RDRO class weights over the *global* batch (all processes and accumulation steps): each row's weight is
  ``w_class / n_class`` with counts known from the deterministic sample order, so the gradient equals that of one
  big balanced batch under any world size;
- metrics (loss metrics of ``losses.py``, grad norm, lr, tokens/s) as JSONL; checkpoints (model, optimizer,
  step) every ``save_steps``, resumed when ``resume`` is set; runs unchanged under ``torchrun`` (DDP, or FSDP2
  with ``fsdp``).

Under ``torchrun --nproc_per_node=N`` (``fastattn.distributed``): the policy is wrapped in DDP (gradients averaged
over ranks; accumulation micro-batches skip the all-reduce but the last); the global batch of a step is
``per_device_train_batch_size * N * gradient_accumulation_steps`` units in one seeded order shared by all ranks;
the reference log-probs are computed on a strided share of the rows per rank and all-reduced; logged metrics are
global (sums or means over ranks); rank 0 writes the cache, metrics and checkpoints. A checkpoint resumes with any
number of processes that gives the same global batch. With ``fsdp`` (more than one process) the policy is fully
sharded instead (FSDP2 ``fully_shard``, one unit per decoder layer; the reference log-probs are computed before
sharding, so a separate ``ref_model`` must fit on one device): ``self.model`` is then sharded after ``train()``
(``distributed.full_state_dict(trainer.model)`` gathers it, on every rank); checkpoints hold the whole model and
optimizer state, so FSDP and non-FSDP runs resume each other's checkpoints. KTO and BCO take their reference point (z0, delta) from
each micro-batch, as in TRL, so their results depend on the micro-batch size; DDRO, RDRO and DPO do not.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import distributed, seq_logps
from . import losses
from .config import DDROConfig, from_trl
from .data import Row, collate, tokenize


# ------------------------------------------------------------------------------------------------------ losses
def _ddro(policy, ref, labels, cfg, frac):
    return losses.ddro_loss(policy, ref, labels, mu=frac, reduction="none", guard=cfg.guard, eps=cfg.guard_eps)


def _rdro(policy, ref, labels, cfg, frac):
    return losses.rdro_loss(policy, ref, labels, alpha=frac, reduction="none")


def _dpo(policy, ref, labels, cfg, frac):
    # rows come as (chosen, rejected) pairs: even rows chosen, odd rows rejected
    return losses.dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta=cfg.beta)


def _kto(policy, ref, labels, cfg, frac):
    return losses.kto_loss(policy, ref, labels, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                           undesirable_weight=cfg.undesirable_weight)


def _bco(policy, ref, labels, cfg, frac):
    return losses.bco_loss(policy, ref, labels, beta=cfg.beta)


# name -> (loss fn, per-row losses that the trainer reduces with global class weights?)
LOSS_FNS: dict[str, tuple[Callable, bool]] = {
    "ddro": (_ddro, True), "rdro": (_rdro, True), "dpo": (_dpo, False), "kto": (_kto, False),
    "bco": (_bco, False),
}
CLASS_WEIGHTS = {"ddro": lambda frac: (frac, 1.0 - frac), "rdro": lambda frac: (0.5, 0.5)}


# ------------------------------------------------------------------------------------------------ log-probs
class SequenceLogps(nn.Module):
    """Wraps a HF causal LM: forward(input_ids, attention_mask, targets, response) -> [R] summed response-token
    log-probs through ``fastattn.seq_logps`` (DDP wraps this module, so its forward is what runs)."""

    def __init__(self, model: nn.Module, backend: str = "auto"):
        super().__init__()
        self.model = model
        self.backend = backend
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError("seq_logps needs an lm head without bias")

    def forward(self, input_ids: Tensor, attention_mask: Tensor, targets: Tensor, response: Tensor) -> Tensor:
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weight = self.model.get_output_embeddings().weight
        return seq_logps(hidden[:, :-1], weight, targets, response, backend=self.backend)


def batch_logps(module: nn.Module, rows: list[Row], pad_id: int, device, batch_size: int = 16) -> Tensor:
    """[len(rows)] fp32 sequence log-probs under no_grad (eval / reference), in batches."""
    out = []
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            b = collate(rows[s:s + batch_size], pad_id)
            out.append(module(*(b[k].to(device) for k in ("input_ids", "attention_mask", "targets", "response")))
                       .float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def fingerprint(rows: list[Row], extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    for r in rows:
        h.update(json.dumps((r.prompt, r.completion, r.label)).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ device
def resolve_device(cfg: DDROConfig) -> tuple[torch.device, torch.dtype]:
    """cfg.device "auto" -> cuda:LOCAL_RANK if available else cpu ("cuda" means this rank's GPU too)."""
    dev = distributed.default_device() if cfg.device in ("auto", "cuda") else torch.device(cfg.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if cfg.dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if cfg.dtype not in dtypes:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(dtypes)}, got {cfg.dtype!r}")
    return dev, dtypes[cfg.dtype]


def _as_config(config) -> DDROConfig:
    if isinstance(config, DDROConfig):
        return config
    if config is None:
        return DDROConfig()
    return from_trl(config)[0]


# ------------------------------------------------------------------------------------------------------ trainer
class DDROTrainer:
    """Aligns ``model`` (a HF causal LM) on a TRL-format preference dataset with ``config.loss_type``.

    Args:
        model: the policy, initialised from the reference model.
        tokenizer: HF tokenizer (``__call__`` -> input_ids; eos/bos/pad ids used when present).
        train_dataset: list of dicts or a ``datasets.Dataset`` in TRL's paired or unpaired format.
        config: DDROConfig, a TRL config object or a dict of TRL/DDRO field names.
        ref_model: the reference model (default: the policy before training, i.e. ``model`` as given).
    """

    def __init__(self, model: nn.Module, tokenizer, train_dataset, config=None, ref_model: nn.Module | None = None):
        self.cfg = _as_config(config)
        self.rank, self.world = distributed.init()
        self.device, self.dtype = resolve_device(self.cfg)
        self.tokenizer = tokenizer
        self.rows = tokenize(train_dataset, tokenizer, self.cfg.max_prompt_length, self.cfg.max_length)
        self.paired = all(r.pair >= 0 for r in self.rows)
        if self.cfg.loss_type == "dpo" and not self.paired:
            raise ValueError("loss_type 'dpo' needs a paired (prompt/chosen/rejected) dataset")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
        self.labels = torch.tensor([r.label for r in self.rows], dtype=torch.bool)
        n_pos = int(self.labels.sum())
        if not 0 < n_pos < len(self.rows) and self.cfg.loss_type in CLASS_WEIGHTS:
            raise ValueError(f"{self.cfg.loss_type} needs preferred and unpreferred rows, got {n_pos} of "
                             f"{len(self.rows)} preferred")
        self.frac = {"ddro": self.cfg.mu, "rdro": self.cfg.alpha}.get(self.cfg.loss_type)
        if self.frac == "auto":
            self.frac = n_pos / len(self.rows)
        self.model = model.to(self.device, self.dtype)
        self.fsdp = bool(self.cfg.fsdp) and self.world > 1
        self.out = Path(self.cfg.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.ref_logps = self._reference_logps(ref_model)

    # ---- reference log-probs, once ------------------------------------------------------------------------
    def _reference_logps(self, ref_model: nn.Module | None) -> Tensor:
        """[len(rows)] fp32 reference log-probs: rank 0's cache when its fingerprint matches (broadcast, so every
        rank takes the same branch), else computed on a strided share of the rows per rank and all-reduced."""
        key = fingerprint(self.rows, f"{self.cfg.max_length}/{self.cfg.max_prompt_length}")
        path = self.out / "ref_logps.pt"
        cached = None
        if self.rank == 0 and path.exists():
            saved = torch.load(path, weights_only=True)
            cached = saved["ref_logps"] if saved.get("fingerprint") == key else None
        cached = distributed.broadcast_object(cached)
        if cached is not None:
            return cached
        ref = ref_model.to(self.device, self.dtype) if ref_model is not None else self.model
        was_training = ref.training
        ref.eval()
        mine = list(range(self.rank, len(self.rows), self.world))
        values = batch_logps(SequenceLogps(ref, self.cfg.seq_logps_backend), [self.rows[i] for i in mine],
                             self.pad_id, self.device, self.cfg.per_device_train_batch_size)
        full = torch.zeros(len(self.rows), dtype=torch.float32)
        full[mine] = values
        full = distributed.all_reduce(full, "sum")   # one nonzero term per row: exact
        ref.train(was_training)
        if self.rank == 0:
            torch.save({"fingerprint": key, "ref_logps": full}, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        return full

    # ---- sample order -------------------------------------------------------------------------------------
    def _units(self) -> list[list[int]]:
        """Sampling units (row-index lists): pairs for DPO, single rows otherwise."""
        if self.cfg.loss_type == "dpo":
            by_pair: dict[int, list[int]] = {}
            for i, r in enumerate(self.rows):
                by_pair.setdefault(r.pair, []).append(i)
            return list(by_pair.values())   # [chosen, rejected]: tokenize() appends them in that order
        return [[i] for i in range(len(self.rows))]

    def global_batch(self) -> int:
        """Units (rows, or pairs for DPO) per optimizer step over all processes and accumulation steps."""
        return self.cfg.per_device_train_batch_size * self.world * self.cfg.gradient_accumulation_steps

    def total_steps(self) -> int:
        per_step = self.global_batch()
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.num_train_epochs * len(self._units()) / per_step))

    def _order(self, steps: int) -> list[list[int]]:
        """Units in sample order, epoch after epoch (one seeded permutation each): the same on every rank."""
        units = self._units()
        need = steps * self.global_batch()
        order, epoch = [], 0
        while len(order) < need:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            order += [units[i] for i in torch.randperm(len(units), generator=g).tolist()]
            epoch += 1
        return order[:need]

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _save(self, step: int, opt) -> None:
        """Rank 0 writes the checkpoint atomically (whole model and optimizer state: every rank gathers its shards
        with FSDP); every rank waits until it is on disk."""
        model_state = distributed.full_state_dict(self.model) if self.fsdp else self.model.state_dict()
        opt_state = distributed.full_optimizer_state(opt) if self.fsdp else opt.state_dict()
        if self.rank == 0:
            tmp = self.out / "checkpoint.pt.tmp"
            torch.save({"step": step, "model": model_state, "optimizer": opt_state,
                        "config": self.cfg.to_dict(), "global_batch": self.global_batch()}, tmp)
            os.replace(tmp, self.out / "checkpoint.pt")
        distributed.barrier()

    def _restore(self, opt) -> int:
        path = self.out / "checkpoint.pt"
        if not (self.cfg.resume and path.exists()):
            return 0
        ck = torch.load(path, map_location=self.device, weights_only=False)
        saved = ck.get("global_batch", self.global_batch())
        if saved != self.global_batch():
            cfg = self.cfg
            raise ValueError(f"{path} was written with a global batch of {saved} units per step, this run has "
                             f"{self.global_batch()} (per_device_train_batch_size {cfg.per_device_train_batch_size} "
                             f"x {self.world} processes x {cfg.gradient_accumulation_steps} accumulation steps): "
                             f"choose them so the product is {saved} to resume")
        if self.fsdp:
            distributed.load_full_state_dict(self.model, ck["model"])
            distributed.load_optimizer_state(opt, ck["optimizer"])
        else:
            self.model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        return int(ck["step"])

    # ---- training -----------------------------------------------------------------------------------------
    def _row_weights(self, labels: Tensor) -> Tensor:
        """Weights that turn per-row losses into the global-batch reduction (balanced or pooled)."""
        if self.cfg.reduction == "pooled":
            return torch.full(labels.shape, 1.0 / labels.numel())
        w_pos, w_neg = CLASS_WEIGHTS[self.cfg.loss_type](self.frac)
        n_pos, n_neg = int(labels.sum()), int((~labels).sum())
        return torch.where(labels, w_pos / max(n_pos, 1), w_neg / max(n_neg, 1))

    def train(self, log: Callable[[str], None] = print) -> list[dict]:
        """Runs to ``total_steps()`` (resuming from the checkpoint); returns the logged metric records."""
        cfg = self.cfg
        module: nn.Module = SequenceLogps(self.model, cfg.seq_logps_backend)
        if self.fsdp:   # decoder layers one unit each, the root (SequenceLogps) the embeddings, norm and lm head
            if getattr(self, "_sharded", None) is None:   # once: a second train() reuses the sharded module
                self._sharded = distributed.fully_shard_layers(module, self.model.get_decoder().layers)
            module = self._sharded
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            module = DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None)
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        start = self._restore(opt)
        steps = self.total_steps()
        order = self._order(steps)
        fn, per_row = LOSS_FNS[cfg.loss_type]
        metrics_path = self.out / "metrics.jsonl"
        history = []
        if self.rank == 0 and metrics_path.exists():   # keep the records up to the restored step
            history = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["step"] <= start]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        history = distributed.broadcast_object(history)
        bs, acc = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        self.model.train()
        t0, tokens = time.perf_counter(), 0
        for step in range(start, steps):
            glob = order[step * self.global_batch():(step + 1) * self.global_batch()]
            glob_rows = [i for u in glob for i in u]
            weights = dict(zip(glob_rows, self._row_weights(self.labels[glob_rows]).tolist())) if per_row else None
            stats: list[dict] = []
            loss_sum = 0.0
            for a in range(acc):
                lo = (a * self.world + self.rank) * bs
                idx = [i for u in glob[lo:lo + bs] for i in u]
                batch = collate([self.rows[i] for i in idx], self.pad_id)
                tokens += int(batch["attention_mask"].sum())
                if self.fsdp:   # accumulate unsharded gradients; reduce-scatter at the last micro-batch
                    module.set_requires_gradient_sync(a == acc - 1)
                policy = module(*(batch[k].to(self.device) for k in
                                  ("input_ids", "attention_mask", "targets", "response")))
                labels = batch["labels"].to(self.device)
                ref = self.ref_logps[idx].to(self.device)
                out, m = fn(policy, ref, labels, cfg, self.frac)
                if per_row:   # global-batch reduction; DDP averages over ranks, hence the world factor
                    loss = (out * torch.tensor([weights[i] for i in idx], device=self.device)).sum() * self.world
                else:
                    loss = out / acc
                # DDP all-reduces (FSDP reduce-scatters) the gradients at the last micro-batch's backward only
                sync = a == acc - 1 or not hasattr(module, "no_sync")
                with contextlib.nullcontext() if sync else module.no_sync():
                    loss.backward()
                loss_sum += loss.item() / (self.world if per_row else 1)
                stats.append(m)
            # global metrics: this rank's share of the weighted loss (sum over ranks) or its mean (mean over ranks)
            loss_sum = float(distributed.all_reduce(torch.tensor(loss_sum), "sum" if per_row else "mean"))
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                       cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            logged = done % cfg.logging_steps == 0 or done == steps
            if logged:   # every rank takes part in the all-reduces; rank 0 writes
                rec = {"step": done, "epoch": done * self.global_batch() / len(self._units()), "loss": loss_sum,
                       "grad_norm": float(distributed.full_tensor(grad_norm)), "lr": cfg.learning_rate,
                       "tokens_per_s": float(distributed.all_reduce(torch.tensor(float(tokens)), "sum"))
                       / max(time.perf_counter() - t0, 1e-9)}
                rec.update(_global_nanmean(stats))
                history.append(rec)
            if logged and self.rank == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                log(f"step {done}/{steps} loss {loss_sum:.4f} grad_norm {rec['grad_norm']:.3f}")
            if done % cfg.save_steps == 0 or done == steps:
                self._save(done, opt)
        return history


def _global_nanmean(stats: list[dict]) -> dict[str, float]:
    """Per metric key: the mean over every rank's micro-batches of the values that are not NaN (NaN if none)."""
    keys = sorted({k for s in stats for k in s})
    values = torch.tensor([[float(s.get(k, math.nan)) for k in keys] for s in stats],
                          dtype=torch.float64).reshape(len(stats), len(keys))
    good = ~values.isnan()
    sums = distributed.all_reduce(values.nan_to_num().sum(0), "sum")
    counts = distributed.all_reduce(good.sum(0).double(), "sum")
    return {k: float(s / c) if c else math.nan for k, s, c in zip(keys, sums.tolist(), counts.tolist())}
