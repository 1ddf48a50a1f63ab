"""Torch reference of ``prf_features`` (any device, any float dtype, differentiable): the definition."""
from __future__ import annotations

import torch
from torch import Tensor

# Dims over which the "row" / "seq" shifts take their max: per token over features, per (sequence, head).
SHIFT_DIMS = {"row": (-1,), "seq": (-2, -1)}


def supports(x: Tensor, weight: Tensor) -> tuple[bool, str]:
    return True, ""


def log_features(x: Tensor, weight: Tensor, log_scale: Tensor) -> Tensor:
    """x [B, H, T, d] (or [B, H / G, T, d]: head h reads x head h // G), weight [H, M, d], log_scale [H, M] ->
    log Phi [B, H, T, M] in fp32 (fp64 for fp64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    groups = weight.shape[0] // x.shape[1]
    x = (x.repeat_interleave(groups, 1) if groups > 1 else x).to(acc)
    d = x.shape[-1]
    proj = (x @ weight.to(acc).transpose(-1, -2)) * d ** -0.25
    half_sq_norm = x.square().sum(-1, keepdim=True) * (0.5 * d ** -0.5)
    return proj - half_sq_norm + log_scale.to(acc)[:, None, :]


def features(x: Tensor, weight: Tensor, log_scale: Tensor, shift: str | Tensor) -> Tensor:
    """Phi = exp(log Phi - s) in fp32 (fp64 for fp64 x), s by ``shift``: "none" (0), "row" (detached max per
    token), "seq" (detached max per (sequence, head)) or a tensor [H] (one constant per head)."""
    logf = log_features(x, weight, log_scale)
    if isinstance(shift, Tensor):
        return (logf - shift.to(logf.dtype)[:, None, None]).exp()
    if shift == "none":
        return logf.exp()
    return (logf - logf.detach().amax(dim=SHIFT_DIMS[shift], keepdim=True)).exp()


def forward(x: Tensor, weight: Tensor, log_scale: Tensor, shift: str | Tensor) -> Tensor:
    return features(x, weight, log_scale, shift).to(x.dtype)
