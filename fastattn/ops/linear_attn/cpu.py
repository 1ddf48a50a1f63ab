"""CPU backend of linear attention: thin wrappers over ``torch.ops.fastattn.*`` of the C++ extension
(csrc/cpu/linear_attn.cpp). Arguments, shapes and outputs follow README.md of this package; the kernels read
q, k, v, do through their strides (no copies) and allocate o, dq, dk, dv in the memory order of their inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _ext


def _ops():
    if not _ext.available():
        raise RuntimeError(f"fastattn: the C++ extension fastattn._C is not built: {_ext.load_error()}")
    return torch.ops.fastattn


def supports(q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, str]:
    """(True, "") when the compiled CPU kernels can run on these tensors, else (False, reason)."""
    if not _ext.available():
        return False, f"extension fastattn._C not built: {_ext.load_error()}"
    if not _ext.has_kernel("linear_attn_fwd", "CPU"):
        return False, "fastattn._C has no CPU kernels"
    devices = {t.device.type for t in (q, k, v)}
    if devices != {"cpu"}:
        return False, f"tensors are on {sorted(devices)}, the cpu backend needs CPU tensors"
    return True, ""


def forward(q: Tensor, k: Tensor, v: Tensor, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None,
            causal: bool, normalize: bool, eps: float):
    """q, k [B, H, T, D]; v [B, Hv, T, Dv] -> (o [B, H, T, Dv], S [B, H, D, Dv], z [B, H, D] | None,
    den [B, H, T] | None)."""
    o, S, z, den = _ops().linear_attn_fwd(q, k, v, S0, z0, key_mask, bool(causal), bool(normalize), float(eps))
    if not normalize:
        z = den = None
    return o, S, z, den


def backward(do: Tensor, dS: Tensor | None, dz: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
             den: Tensor | None, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None, causal: bool,
             normalize: bool, eps: float):
    """-> (dq [B, H, T, D], dk [B, H, T, D], dv [B, Hv, T, Dv], dS0 [B, H, D, Dv], dz0 [B, H, D] | None)."""
    dq, dk, dv, dS0, dz0 = _ops().linear_attn_bwd(do, dS, dz, q, k, v, den, S0, z0, key_mask, bool(causal),
                                                  bool(normalize), float(eps))
    return dq, dk, dv, dS0, (dz0 if normalize else None)


def step(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor | None, normalize: bool, eps: float) -> Tensor:
    """One decode token: q, k [B, H, D]; v [B, Hv, Dv]; updates S [B, H, D, Dv] (and z [B, H, D]) in place;
    returns o [B, H, Dv]."""
    return _ops().linear_attn_step(q, k, v, S, z, bool(normalize), float(eps))
