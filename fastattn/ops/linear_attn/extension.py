"""Calls into the compiled ``torch.ops.fastattn.linear_attn_*`` ops, shared by the cpu and cuda backends (the
extension registers one kernel per dispatch key under the same schemas). Arguments and outputs follow README.md
of this package; zero-element z / den / dz0 of the ops stand for None (decided by ``normalize``: with T = 0 a
normalized den is empty too)."""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _ext


def ops():
    if not _ext.available():
        raise RuntimeError(f"fastattn: the C++ extension fastattn._C is not built: {_ext.load_error()}")
    return torch.ops.fastattn


def kernels_serve(device_type: str, dispatch_key: str, *tensors: Tensor) -> tuple[bool, str]:
    """(True, "") when the extension is loaded with ``dispatch_key`` kernels and every tensor is on
    ``device_type``; else (False, reason). The per-backend shape/dtype limits come on top."""
    if not _ext.available():
        return False, f"extension fastattn._C not built: {_ext.load_error()}"
    if not _ext.has_kernel("linear_attn_fwd", dispatch_key):
        return False, f"fastattn._C was built without {dispatch_key} kernels"
    devices = {t.device.type for t in tensors}
    if devices != {device_type}:
        return False, f"tensors are on {sorted(devices)}, the {device_type} backend needs {dispatch_key} tensors"
    return True, ""


def forward(q: Tensor, k: Tensor, v: Tensor, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None,
            causal: bool, normalize: bool, eps: float):
    """q, k [B, H, T, D]; v [B, Hv, T, Dv] -> (o [B, H, T, Dv], S [B, H, D, Dv], z [B, H, D] | None,
    den [B, H, T] | None)."""
    o, S, z, den = ops().linear_attn_fwd(q, k, v, S0, z0, key_mask, bool(causal), bool(normalize), float(eps))
    if not normalize:
        z = den = None
    return o, S, z, den


def backward(do: Tensor, dS: Tensor | None, dz: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
             den: Tensor | None, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None, causal: bool,
             normalize: bool, eps: float):
    """-> (dq [B, H, T, D], dk [B, H, T, D], dv [B, Hv, T, Dv] summed over each GQA group, dS0 [B, H, D, Dv],
    dz0 [B, H, D] | None)."""
    dq, dk, dv, dS0, dz0 = ops().linear_attn_bwd(do, dS, dz, q, k, v, den, S0, z0, key_mask, bool(causal),
                                                 bool(normalize), float(eps))
    return dq, dk, dv, dS0, (dz0 if normalize else None)


def step(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor | None, normalize: bool, eps: float) -> Tensor:
    """One decode token: q, k [B, H, D]; v [B, Hv, Dv]; updates S [B, H, D, Dv] (and z [B, H, D]) in place;
    returns o [B, H, Dv]. One kernel launch, no host synchronisation (CUDA-graph capturable on CUDA)."""
    return ops().linear_attn_step(q, k, v, S, z if normalize else None, bool(normalize), float(eps))
