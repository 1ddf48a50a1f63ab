"""CUDA backend of linear attention: thin wrappers over ``torch.ops.fastattn.*`` of the C++/CUDA extension.

The kernels live in csrc/cuda/linear_attn.cu (chunked split-T forward and backward, decode step) and are registered
for the CUDA dispatch key by csrc/cuda/linear_attn_glue.cpp. Arguments, shapes and outputs follow README.md of this
package: q, k, v, do are read through their strides (no copies); o, dq, dk, dv are allocated in the memory order of
their inputs; S, z, den and the state gradients are fp32. FASTATTN_CUDA_MMA=1 (read at every call) runs the bf16
chunk passes on tensor cores (csrc/cuda/linear_attn_mma.cuh, sm_80+; off until tested and timed on a GPU).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .extension import backward, forward, kernels_serve, step  # noqa: F401  (the backend's op functions)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_DV = 256


@functools.lru_cache(maxsize=None)
def _max_feature_dim() -> int:
    """Largest feature dim D the kernels serve: the last tile of csrc/cuda/feature_tiles.h."""
    return max(torch.ops.fastattn.cuda_feature_tiles())


def supports(q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, str]:
    """(True, "") when the compiled CUDA kernels can serve these tensors, else (False, reason).

    Takes the sequence shapes (q, k [B, H, T, D], v [B, Hv, T, Dv]) and the decode-step shapes ([B, H, D], [B, Hv, Dv]).
    """
    ok, why = kernels_serve("cuda", "CUDA", q, k, v)
    if not ok:
        return ok, why
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype} is not supported by the CUDA kernels (float16, bfloat16, float32)"
    D, Dv, max_d = q.shape[-1], v.shape[-1], _max_feature_dim()
    if not 1 <= D <= max_d:
        return False, f"feature dim D={D} is outside the CUDA kernels' 1..{max_d}"
    if not 1 <= Dv <= _MAX_DV:
        return False, f"value dim Dv={Dv} is outside the CUDA kernels' 1..{_MAX_DV}"
    return True, ""
