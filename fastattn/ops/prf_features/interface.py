"""Public ``prf_features``: input checks and dispatch.

Forward only in the fast backends: a call that autograd must record (x or a parameter requires grad, grad mode
on) runs the differentiable torch reference, whatever backend was asked for, so that training sees the exact
same function and inference (prefill, decode) gets one fused kernel instead of ~12 elementwise ones per role.
Under torch.compile an inference call is the torch.library op ``fastattn::prf_features`` (opaque, with a fake
implementation), so a compiled prefill runs the same fused kernel as an eager one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import backends
from ..linear_attn.layout import as_output, empty_output
from . import reference

OP = "prf_features"
SHIFTS = ("none", "row", "seq")


def prf_features(x: Tensor, weight: Tensor, log_scale: Tensor, shift: str | Tensor = "row",
                 backend: str = "auto") -> Tensor:
    """Positive random features Phi_m(x) = exp(w_m.x / d^(1/4) - |x|^2 / (2 sqrt d) + log c_m - s), per head.

    Args:
        x: [B, H, T, d] (any strides, fp16/bf16/fp32/fp64; computed in fp32, fp64 for fp64), or [B, H / G, T, d]
            for grouped-query keys: feature head h reads x head h // G, without copying x per query head.
        weight: [H, M, d] the projections w; log_scale: [H, M] log c.
        shift: the log-space stabiliser s (detached): "none" (0), "row" (max over the M features of each token),
            "seq" (max over all tokens and features of each sequence and head) or a tensor [H] (a fixed
            constant per head, e.g. a calibrated key shift).
        backend: "auto", "torch" or "triton".
    Returns: Phi [B, H, T, M] in x.dtype.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [B, H, T, d], got {getattr(x, 'shape', type(x).__name__)}")
    d = x.shape[3]
    if not isinstance(weight, Tensor) or weight.dim() != 3 or weight.shape[2] != d:
        raise ValueError(f"weight must be [H, M, d] with d = {d}, got {getattr(weight, 'shape', weight)}")
    H, M = weight.shape[0], weight.shape[1]
    if x.shape[1] == 0 or H % x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} heads; weight's H = {H} must be a multiple of it (GQA)")
    if not isinstance(log_scale, Tensor) or tuple(log_scale.shape) != (H, M):
        raise ValueError(f"log_scale must be [H, M] = {(H, M)}, got {getattr(log_scale, 'shape', log_scale)}")
    if isinstance(shift, Tensor):
        if tuple(shift.shape) != (H,):
            raise ValueError(f"a shift tensor must be [H] = [{H}], got {tuple(shift.shape)}")
    elif shift not in SHIFTS:
        raise ValueError(f"shift must be one of {SHIFTS} or a tensor [H], got {shift!r}")
    for name, t in (("weight", weight), ("log_scale", log_scale)) + ((("shift", shift),)
                                                                    if isinstance(shift, Tensor) else ()):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, log_scale)):
        return reference.forward(x, weight, log_scale, shift)   # traceable, differentiable (compile fuses it)
    if torch.compiler.is_compiling():
        fixed = isinstance(shift, Tensor)
        return _op(x, weight, log_scale, "fixed" if fixed else shift, shift if fixed else None, backend)
    return _forward(x, weight, log_scale, shift, backend)


def _forward(x: Tensor, weight: Tensor, log_scale: Tensor, shift: str | Tensor, backend: str) -> Tensor:
    name = backends.resolve(OP, backend, x, weight)
    return backends.get(OP, name).forward(x, weight, log_scale, shift)


@torch.library.custom_op("fastattn::prf_features", mutates_args=())
def _op(x: Tensor, weight: Tensor, log_scale: Tensor, shift_mode: str, shift: Tensor | None,
        backend: str) -> Tensor:
    """The inference call as a registered op; shift_mode "fixed" takes the tensor ``shift`` [H]. Returns Phi
    laid out as its fake (``empty_output``): compiled code reads the result by the fake's strides."""
    return as_output(_forward(x, weight, log_scale, shift if shift_mode == "fixed" else shift_mode, backend), x)


@_op.register_fake
def _(x, weight, log_scale, shift_mode, shift, backend):
    return empty_output(x, weight.shape[1], heads=weight.shape[0])
