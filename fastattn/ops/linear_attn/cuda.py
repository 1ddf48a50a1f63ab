"""CUDA backend of linear attention: thin wrappers over ``torch.ops.fastattn.*`` of the C++/CUDA extension.

The kernels live in csrc/cuda/linear_attn.cu (chunked split-T forward and backward, decode step) and are registered
for the CUDA dispatch key by csrc/cuda/linear_attn_glue.cpp. Arguments, shapes and outputs follow README.md of this
package: q, k, v, do are read through their strides (no copies); o, dq, dk, dv are allocated in the memory order of
their inputs; S, z, den and the state gradients are fp32.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from ... import _ext

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_DV = 256


def _ops():
    if not _ext.available():
        raise RuntimeError(f"fastattn: the C++ extension fastattn._C is not built: {_ext.load_error()}")
    return torch.ops.fastattn


@functools.lru_cache(maxsize=None)
def _max_feature_dim() -> int:
    """Largest feature dim D the kernels serve: the last tile of csrc/cuda/feature_tiles.h."""
    return max(torch.ops.fastattn.cuda_feature_tiles())


def supports(q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, str]:
    """(True, "") when the compiled CUDA kernels can serve these tensors, else (False, reason).

    Takes the sequence shapes (q, k [B, H, T, D], v [B, Hv, T, Dv]) and the decode-step shapes ([B, H, D], [B, Hv, Dv]).
    """
    if not _ext.available():
        return False, f"extension fastattn._C not built: {_ext.load_error()}"
    if not _ext.has_kernel("linear_attn_fwd", "CUDA"):
        return False, "fastattn._C was built without CUDA kernels (needs a CUDA torch and nvcc at build time)"
    devices = {t.device.type for t in (q, k, v)}
    if devices != {"cuda"}:
        return False, f"tensors are on {sorted(devices)}, the cuda backend needs CUDA tensors"
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype} is not supported by the CUDA kernels (float16, bfloat16, float32)"
    D, Dv, max_d = q.shape[-1], v.shape[-1], _max_feature_dim()
    if not 1 <= D <= max_d:
        return False, f"feature dim D={D} is outside the CUDA kernels' 1..{max_d}"
    if not 1 <= Dv <= _MAX_DV:
        return False, f"value dim Dv={Dv} is outside the CUDA kernels' 1..{_MAX_DV}"
    return True, ""


def forward(q: Tensor, k: Tensor, v: Tensor, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None,
            causal: bool, normalize: bool, eps: float):
    """q, k [B, H, T, D]; v [B, Hv, T, Dv] -> (o [B, H, T, Dv], S [B, H, D, Dv], z [B, H, D] | None,
    den [B, H, T] | None)."""
    o, S, z, den = _ops().linear_attn_fwd(q, k, v, S0, z0, key_mask, bool(causal), bool(normalize), float(eps))
    if not normalize:  # zero-element z, den stand for None (decided by the flag: T = 0 also gives an empty den)
        z = den = None
    return o, S, z, den


def backward(do: Tensor, dS: Tensor | None, dz: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
             den: Tensor | None, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None, causal: bool,
             normalize: bool, eps: float):
    """-> (dq [B, H, T, D], dk [B, H, T, D], dv [B, Hv, T, Dv] summed over each GQA group, dS0 [B, H, D, Dv],
    dz0 [B, H, D] | None)."""
    dq, dk, dv, dS0, dz0 = _ops().linear_attn_bwd(do, dS, dz, q, k, v, den, S0, z0, key_mask, bool(causal),
                                                  bool(normalize), float(eps))
    return dq, dk, dv, dS0, (dz0 if normalize else None)


def step(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor | None, normalize: bool, eps: float) -> Tensor:
    """One decode token: q, k [B, H, D]; v [B, Hv, Dv]; updates S [B, H, D, Dv] (and z [B, H, D]) in place;
    returns o [B, H, Dv]. A single kernel launch, no host synchronisation (CUDA-graph capturable)."""
    return _ops().linear_attn_step(q, k, v, S, z if normalize else None, bool(normalize), float(eps))
