"""Layerwise distillation losses: one registry, each loss(adapter, teacher entry, scaling) -> (loss, metrics).

Metrics are detached tensors (no host sync per layer).

- "softmax" (default): KL(teacher causal attention row || linear-attention row), which has the gradient of the
  paper's cross-entropy (the teacher's entropy is a constant).
- "l2": squared error of log kernel values, log(phi(q).phi(k)) against q.k * scaling, on sampled causal pairs
  (log space: a relative error of the kernel).
- "output_mse": mean squared error of the per-head attention outputs (LoLCATs style).
"direct" (next-token loss through the whole model) is not layerwise: see train.train_direct.

Every loss takes ``rows``: the query positions [R] it is evaluated on (None: all T). The softmax loss costs
O(R T) per head, so sampling R << T rows per step is an unbiased, R/T-times cheaper estimate of the same loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

_TINY = 1e-30


def _qk(adapter, entry) -> tuple[Tensor, Tensor]:
    q, k = entry["q"].float(), entry["k"].float()
    groups = adapter.num_heads // adapter.num_kv_heads
    return q, (k.repeat_interleave(groups, 1) if groups > 1 else k)


def attention_rows(adapter, entry, scaling: float, causal: bool = True,
                   rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(teacher log-probabilities, student probabilities) of the attention rows at query positions ``rows``
    [R] (None: all T): [B, H, R, T] fp32."""
    q, k = _qk(adapter, entry)
    pos = torch.arange(k.shape[2], device=q.device)
    if rows is not None:
        q, qpos = q[:, :, rows], rows.to(q.device)
    else:
        qpos = pos
    logits = (q @ k.transpose(-1, -2)) * scaling
    mask = qpos[:, None] >= pos[None, :] if causal else None
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    teacher = torch.log_softmax(logits, dim=-1)
    if getattr(adapter, "window", 0):
        if not causal:
            raise ValueError("the sliding-window hybrid is causal")
        from ..hf.window import window_rows
        return teacher, window_rows(adapter, entry["q"].float(), k, scaling, rows)
    fm = adapter.feature_map
    A = fm(q, "q") @ fm(k, "k").transpose(-1, -2)   # stabilised features: per-row/per-head scales cancel below
    if mask is not None:
        A = A * mask
    student = A / (A.sum(-1, keepdim=True) + _TINY)
    return teacher, student


def softmax_loss(adapter, entry, scaling: float, causal: bool = True, rows: Tensor | None = None
                 ) -> tuple[Tensor, dict]:
    log_p, a = attention_rows(adapter, entry, scaling, causal, rows)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - torch.log(a + _TINY)), 0.0).sum(-1)   # 0 log 0 = 0 (masked entries)
    loss = kl.mean()
    return loss, {"kl": loss.detach()}


def l2_loss(adapter, entry, scaling: float, causal: bool = True, rows: Tensor | None = None,
            pairs: int = 4096) -> tuple[Tensor, dict]:
    q, k = _qk(adapter, entry)
    B, H, T, d = q.shape
    g = torch.Generator(device="cpu").manual_seed(0)
    i = torch.randint(0, T, (pairs,), generator=g)
    if rows is not None:   # query positions drawn from the given rows
        i = rows.cpu()[torch.randint(0, rows.numel(), (pairs,), generator=g)]
    j = (torch.rand(pairs, generator=g) * (i + 1)).long() if causal else torch.randint(0, T, (pairs,), generator=g)
    b = torch.randint(0, B, (pairs,), generator=g)
    qi, kj = q[b, :, i], k[b, :, j]                           # [P, H, d]
    fm = adapter.feature_map
    if not hasattr(fm, "log_features"):
        raise ValueError(f"the l2 loss needs log-features (feature maps prf, performer), not {fm.name!r}")
    lq = fm.log_features(qi.transpose(0, 1)[None], "q")[0]    # [H, P, M] exact (unshifted) log-features
    lk = fm.log_features(kj.transpose(0, 1)[None], "k")[0]
    log_kernel = torch.logsumexp(lq + lk, dim=-1)             # log phi(q).phi(k)
    target = (qi * kj).sum(-1).transpose(0, 1) * scaling
    loss = (log_kernel - target).square().mean()
    return loss, {"l2_log_kernel": loss.detach()}


def output_mse_loss(adapter, entry, scaling: float, causal: bool = True, rows: Tensor | None = None
                    ) -> tuple[Tensor, dict]:
    o = adapter(entry["q"].float(), entry["k"].float(), entry["v"].float(), scaling, causal)
    target = entry["o"].float().transpose(1, 2)              # HF attention outputs are [B, T, H, d]
    if rows is not None:
        o, target = o[:, :, rows], target[:, :, rows]
    loss = (o - target).square().mean()
    return loss, {"output_mse": loss.detach()}


LOSSES = {"softmax": softmax_loss, "l2": l2_loss, "output_mse": output_mse_loss}
