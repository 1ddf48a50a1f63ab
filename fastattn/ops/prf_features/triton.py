"""Triton backend of ``prf_features``: the host launcher of ``triton_kernels.py`` (forward only; autograd calls
go to the torch reference, see interface.py).

The "seq" shift (a detached max over a whole sequence and head) needs every tile before any output: a STATS
launch writes each tile's max, torch takes the max over tiles, and the feature launch subtracts it (SHIFT 2).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..linear_attn.layout import empty_output
from ..triton_gate import import_kernels, triton_gate

triton, _k, _IMPORT_ERROR = import_kernels(__package__)

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
BT = 64
MAX_BM = 128                  # features per slice: up to 128 in one slice (one pass for the row shift), else a loop
_SHIFT = {"none": 0, "row": 1}
# fp32-accurate dots: three TF32 tensor-core products on a GPU; the interpreter has only IEEE fp32
PRECISION = "ieee" if os.environ.get("TRITON_INTERPRET") == "1" else "tf32x3"


def supports(x: Tensor, weight: Tensor) -> tuple[bool, str]:
    """Whether this backend can serve a call with these inputs, and why not."""
    ok, why = triton_gate(x, _IMPORT_ERROR)
    if ok and x.dtype not in _SUPPORTED:
        return False, f"dtype {x.dtype} is not supported (fp16/bf16/fp32); fp64 is served by the torch backend"
    if ok and x.shape[-1] > MAX_HEAD_DIM:
        return False, f"head dim {x.shape[-1]} > {MAX_HEAD_DIM} (one x tile per program)"
    return ok, why


def _launch(x: Tensor, weight: Tensor, log_scale: Tensor, out: Tensor | None, shift_mode: int,
            shift: Tensor | None, stats: Tensor | None) -> None:
    B, Hx, T, d = x.shape
    H, M = weight.shape[0], weight.shape[1]
    BM = min(MAX_BM, max(16, triton.next_power_of_2(M)))
    grid = (triton.cdiv(T, BT), B * H)
    dummy = x if out is None else out
    s_sb, s_sh = (shift.stride(0), shift.stride(1)) if shift is not None else (0, 0)
    _k.prf_features_kernel[grid](
        x, weight, log_scale, shift if shift is not None else log_scale, dummy, stats if stats is not None else
        log_scale, *x.stride(), *weight.stride(), *log_scale.stride(), s_sb, s_sh, *dummy.stride(),
        T, M, H, H // Hx, d ** -0.25, 0.5 * d ** -0.5,
        D=d, BD=max(16, triton.next_power_of_2(d)), BT=BT, BM=BM, SHIFT=shift_mode, STATS=stats is not None,
        ONE_SLICE=M <= BM, PREC=PRECISION, num_warps=4 if BM <= 64 else 8)


def forward(x: Tensor, weight: Tensor, log_scale: Tensor, shift: str | Tensor) -> Tensor:
    """x [B, H or H / G, T, d] (any strides), weight [H, M, d], log_scale [H, M] -> Phi [B, H, T, M] in x.dtype,
    laid out like x (HF's transposed [B, T, H, .] projections give [B, T, H, M] memory, so the linear attention
    output that follows Phi's layout needs no transposing copy)."""
    B, T = x.shape[0], x.shape[2]
    H, M = weight.shape[0], weight.shape[1]
    out = empty_output(x, M, heads=H)
    if T == 0:
        return out
    # weight and log_scale are read in their own dtype and strides (converted to fp32 in the kernel): no copies
    if isinstance(shift, Tensor):            # one constant per head: [H] -> strides (0, 1) over (b, h)
        _launch(x, weight, log_scale, out, 2, shift.float().expand(B, H), None)
    elif shift == "seq":
        stats = torch.empty(B * H, triton.cdiv(T, BT), dtype=torch.float32, device=x.device)
        _launch(x, weight, log_scale, None, 0, None, stats)
        _launch(x, weight, log_scale, out, 2, stats.amax(1).view(B, H), None)
    else:
        _launch(x, weight, log_scale, out, _SHIFT[shift], None, None)
    return out
