"""Output allocation that follows the memory order of the inputs (no copies for HF's or fla's layouts)."""
from __future__ import annotations

import os

import torch
from torch import Tensor

# Tests set FASTATTN_POISON=1 so that a tile a kernel forgets to write shows up as NaN.
_POISON = os.environ.get("FASTATTN_POISON") == "1"


def empty_output(q: Tensor, last_dim: int, dtype: torch.dtype | None = None, heads: int | None = None) -> Tensor:
    """Uninitialised [B, H, T, last_dim] tensor laid out like ``q``: physically [B, T, H, .] when q is a
    transposed "bthd" view (q.stride(1) < q.stride(2)), else [B, H, T, .]. heads: H if not q's (GQA inputs)."""
    B, Hq, T, _ = q.shape
    H = Hq if heads is None else heads
    dtype = q.dtype if dtype is None else dtype
    if q.stride(1) < q.stride(2):
        out = torch.empty(B, T, H, last_dim, dtype=dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty(B, H, T, last_dim, dtype=dtype, device=q.device)
    if _POISON:
        out.fill_(float("nan"))
    return out
