"""Output allocation that follows the memory order of the inputs (no copies for HF's or fla's layouts)."""
from __future__ import annotations

import os

import torch
from torch import Tensor

# Tests set FASTATTN_POISON=1 so that a tile a kernel forgets to write shows up as NaN.
_POISON = os.environ.get("FASTATTN_POISON") == "1"


def _bthd(q: Tensor) -> bool:
    """Whether q [B, H, T, .] is a transposed view of [B, T, H, .] memory."""
    return q.stride(1) < q.stride(2)


def empty_output(q: Tensor, last_dim: int, dtype: torch.dtype | None = None, heads: int | None = None) -> Tensor:
    """Uninitialised [B, H, T, last_dim] tensor laid out like ``q``: physically [B, T, H, .] when q is a
    transposed "bthd" view (q.stride(1) < q.stride(2)), else [B, H, T, .]. heads: H if not q's (GQA inputs)."""
    B, Hq, T, _ = q.shape
    H = Hq if heads is None else heads
    dtype = q.dtype if dtype is None else dtype
    if _bthd(q):
        out = torch.empty(B, T, H, last_dim, dtype=dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty(B, H, T, last_dim, dtype=dtype, device=q.device)
    if _POISON:
        out.fill_(float("nan"))
    return out


def as_output(t: Tensor, q: Tensor) -> Tensor:
    """t [B, H, T, .] itself when its memory is ordered as ``empty_output(q, ...)`` orders a new tensor, else a copy
    so ordered (e.g. for a custom op whose fake is ``empty_output``: compiled code reads it by those strides)."""
    if (t.transpose(1, 2) if _bthd(q) else t).is_contiguous():
        return t
    return empty_output(q, t.shape[-1], t.dtype, heads=t.shape[1]).copy_(t)
