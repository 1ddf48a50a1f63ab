"""Triton backend of ``seq_logps``: host launchers for ``triton_kernels.py``.

Forward: one fused kernel per (row tile, vocab split) computes the logits tiles of the response tokens and
runs an online logsumexp over its vocabulary tiles (with the label logit picked out of the same tiles); the
splits (there are several only when the row tiles alone would leave SMs idle) are merged on [S, N] partials.
Nothing of size N x V is ever stored.

Backward: ``grad_kernel`` recomputes the logits from the saved lse and writes the scaled softmax gradient
``G = g (onehot - p)`` of a chunk of at most ``token_chunk`` rows into one reused [chunk, V] buffer (bf16 for
bf16 inputs, fp32 otherwise); two GEMMs (cuBLAS on a GPU) then give ``dh = G @ W`` and ``dW += G^T @ h``, both
accumulated in fp32. The default chunk keeps that buffer near ``G_BUFFER_BYTES`` however long the batch.

``STRATEGY = "gemm"`` moves the logits GEMM of both passes to cuBLAS too: each chunk of rows gets its fp32 logits
[chunk, V] from one GEMM (fp32 accumulation, fp32 output), which ``row_lse_kernel`` (forward: lse and label
logit) or ``softmax_grad_kernel`` (backward: G) then read once. It holds one [chunk, V] fp32 buffer (chunked to
``GEMM_BUFFER_BYTES`` with G) instead of none, and trades the fused kernels' tile loop for cuBLAS GEMMs plus one
extra pass over that buffer. It is the default: on the H200 (bench/results/seq_logps_gpu.md, B=8, T=1024, bf16)
forward 1.82 ms and forward + backward 5.46 ms against 3.19 / 8.76 for "fused" and 3.33 / 7.03 for the logits
path; bench/seq_logps.py times both strategies.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..triton_gate import import_kernels, triton_gate

triton, _k, _IMPORT_ERROR = import_kernels(__package__)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
G_BUFFER_BYTES = 256 * 2 ** 20      # default size of the backward's [chunk, V] gradient buffer
GEMM_BUFFER_BYTES = 512 * 2 ** 20   # "gemm": default size of a chunk's buffers (fp32 logits, + G in the backward)
VOCAB_SPLITS: int | None = None     # testing hook: force the number of vocab splits of the forward
STRATEGY = "gemm"                   # "gemm": cuBLAS logits chunks (default, faster on the H200); "fused": Triton tiles
_STRATEGIES = ("fused", "gemm")
_POISON = os.environ.get("FASTATTN_POISON") == "1"


@dataclass(frozen=True)
class _Config:
    BM: int
    BN: int
    BK: int
    warps: int
    stages: int
    BR: int = 4096     # block of the "gemm" strategy's row kernels over the vocabulary
    flat: bool = False  # forward: flatten the (vocab tile, K slice) loop nest into one pipelined loop


CONFIG_OVERRIDE: dict = {}   # bench hook: fields of _Config to use instead of the defaults (bench/seq_logps.py --sweep)


def _config(dtype: torch.dtype, interpret: bool) -> _Config:
    cfg = _default_config(dtype, interpret)
    return dataclasses.replace(cfg, **CONFIG_OVERRIDE) if CONFIG_OVERRIDE else cfg


@functools.lru_cache(maxsize=None)
def _default_config(dtype: torch.dtype, interpret: bool) -> _Config:
    """Fixed tiles (no autotuning): 128 x 256 logits tiles, one 8-warp program each, for bf16/fp16 (wgmma on
    Hopper; the fastest correct config of the H200 sweep in bench/results/seq_logps_gpu.md, forward 3.37 ms and
    forward + backward 9.42 ms against 4.07 / 11.73 ms for 128 x 128 at B=8, T=1024); fp32 inputs use IEEE fp32
    dots on 64 x 64 tiles. The interpreter uses the smallest legal tiles so
    that CPU tests cover ragged tails of every dim at small sizes."""
    if interpret:
        return _Config(BM=16, BN=32, BK=16, warps=4, stages=1, BR=32)
    if dtype == torch.float32:
        return _Config(BM=64, BN=64, BK=32, warps=4, stages=2)
    return _Config(BM=128, BN=256, BK=64, warps=8, stages=3)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter runs: plan as for an H200


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _POISON else out


def _rows(hidden: Tensor, labels: Tensor, mask: Tensor):
    """The response tokens: flat indices [N], batch and time indices [N], hidden-row element offsets [N]
    (int64) and labels [N]."""
    T = hidden.shape[1]
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    b = torch.div(idx, T, rounding_mode="floor")
    t = idx - b * T
    row_off = b * hidden.stride(0) + t * hidden.stride(1)
    return idx, b, t, row_off, labels.reshape(-1)[idx]


def _splits(n_row_tiles: int, n_vocab_tiles: int, device: torch.device) -> tuple[int, int]:
    """(vocab tiles per split, splits): split the vocabulary only as far as needed for ~2 programs per SM."""
    want = VOCAB_SPLITS if VOCAB_SPLITS is not None else triton.cdiv(2 * _num_sms(device), n_row_tiles)
    tps = triton.cdiv(n_vocab_tiles, max(1, min(want, n_vocab_tiles)))
    return tps, triton.cdiv(n_vocab_tiles, tps)


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def forward(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, token_chunk: int = 0,
            vocab_chunk: int = 0) -> tuple[Tensor, Tensor]:
    """hidden [B, T, d], weight [V, d], labels [B, T] int64, mask [B, T] bool -> (logps [B] fp32,
    lse [B, T] fp32, 0 where mask is False). token_chunk bounds the rows per logits chunk of the "gemm" strategy;
    vocab_chunk is not used (the tiles are fixed)."""
    B, T, d = hidden.shape
    dev = hidden.device
    logps = torch.zeros(B, dtype=torch.float32, device=dev)
    lse_flat = torch.zeros(B * T, dtype=torch.float32, device=dev)
    idx, b, t, row_off, lab = _rows(hidden, labels, mask)
    N = idx.numel()
    if N == 0:
        return logps, lse_flat.reshape(B, T)
    cfg = _config(hidden.dtype, _INTERPRET)
    if _strategy() == "gemm":
        lse, target = _lse_gemm(hidden, weight, b, t, lab, token_chunk, cfg)
    else:
        lse, target = _lse_fused(hidden, weight, row_off, lab, cfg)
    lse_flat[idx] = lse
    logps.index_add_(0, b, target - lse)
    return logps, lse_flat.reshape(B, T)


def _strategy() -> str:
    if STRATEGY not in _STRATEGIES:
        raise ValueError(f"seq_logps triton STRATEGY must be one of {_STRATEGIES}, got {STRATEGY!r}")
    return STRATEGY


def _lse_fused(hidden, weight, row_off, lab, cfg) -> tuple[Tensor, Tensor]:
    """(lse [N], label logit [N]) of the response rows from the fused forward kernel and its vocab splits."""
    N, V, d = row_off.numel(), weight.shape[0], hidden.shape[2]
    n_m = triton.cdiv(N, cfg.BM)
    tps, S = _splits(n_m, triton.cdiv(V, cfg.BN), hidden.device)
    m_part, s_part, t_part = (_empty(S, N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    _k.fwd_kernel[(n_m, S)](
        hidden, row_off, lab, weight, m_part, s_part, t_part, N, V, hidden.stride(2), *weight.stride(), tps,
        D=d, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, IEEE=_ieee(hidden.dtype), FLAT=cfg.flat, num_warps=cfg.warps,
        num_stages=cfg.stages)
    if S == 1:
        return m_part[0] + torch.log(s_part[0]), t_part[0]
    # merge the splits' (max, scaled sum) pairs: lse = M + log sum_s s_s exp(m_s - M)
    M = m_part.amax(0)
    return M + torch.log((s_part * torch.exp(m_part - M)).sum(0)), t_part.sum(0)


def _lse_gemm(hidden, weight, b, t, lab, token_chunk, cfg) -> tuple[Tensor, Tensor]:
    """(lse [N], label logit [N]) from cuBLAS fp32 logits, one chunk of rows at a time."""
    N, V = b.numel(), weight.shape[0]
    lse, target = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(2))
    chunk = min(token_chunk if token_chunk > 0 else _default_chunk(V, 4, cfg.BM, GEMM_BUFFER_BYTES), N)
    for c0 in range(0, N, chunk):
        c1 = min(c0 + chunk, N)
        logits = _mm_f32(hidden[b[c0:c1], t[c0:c1]], weight.T)                   # [n, V] fp32
        _k.row_lse_kernel[(c1 - c0,)](logits, logits.stride(0), lab[c0:c1], lse[c0:c1], target[c0:c1], V,
                                      BV=cfg.BR, num_warps=8)
        del logits   # one [chunk, V] buffer alive at a time
    return lse, target


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result (fp32 accumulation); bf16/fp16 operands stay 16-bit where the GEMM allows it
    (else both are upcast: never a 16-bit result)."""
    if a.dtype == torch.float32:
        return a @ b.float()
    if a.is_cuda and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return a.float() @ b.float()   # CPU (interpreter runs): no mixed-dtype GEMM there


def _addmm_f32(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """acc += a @ b in place, acc fp32 (16-bit operands accumulate into it in the GEMM where cuBLAS allows: no
    [V, d] fp32 temporary and extra pass per chunk)."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b.float())
    if a.is_cuda and a.dtype == b.dtype:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return acc.add_(_mm_f32(a, b))


def _default_chunk(V: int, row_bytes: int, BM: int, budget: int) -> int:
    """Rows per chunk (a multiple of BM) whose [chunk, V] buffers of ``row_bytes`` per element fit ``budget``."""
    return max(BM, (budget // (V * row_bytes)) // BM * BM)


def backward(grad: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, lse: Tensor,
             token_chunk: int = 0, vocab_chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum_b grad[b] * logp_b``: (dhidden [B, T, d] hidden.dtype, 0 where mask is False;
    dweight [V, d] weight.dtype). token_chunk bounds the rows per [chunk, V] gradient buffer (0: about
    ``G_BUFFER_BYTES``)."""
    B, T, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dtype = hidden.dtype
    dh_flat = torch.zeros(B * T, d, dtype=dtype, device=dev)
    idx, b, t, row_off, lab = _rows(hidden, labels, mask)
    N = idx.numel()
    if N == 0:
        return dh_flat.reshape(B, T, d), torch.zeros_like(weight)
    cfg = _config(dtype, _INTERPRET)
    g_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32   # fp16 G could underflow
    w_gemm = weight if g_dtype == dtype else weight.float()
    gemm = _strategy() == "gemm"
    row_bytes = torch.finfo(g_dtype).bits // 8 + (4 if gemm else 0)      # G (+ the fp32 logits of "gemm")
    chunk = token_chunk if token_chunk > 0 else _default_chunk(V, row_bytes, cfg.BM,
                                                               GEMM_BUFFER_BYTES if gemm else G_BUFFER_BYTES)
    chunk = min(chunk, N)
    G = _empty(chunk, V, dtype=g_dtype, device=dev)
    lse_rows = lse.reshape(-1)[idx].float().contiguous()
    g_rows = grad.float()[b].contiguous()
    dw = torch.zeros(V, d, dtype=torch.float32, device=dev)
    for c0 in range(0, N, chunk):
        c1 = min(c0 + chunk, N)
        n = c1 - c0
        Gc = G[:n]
        h_rows = hidden[b[c0:c1], t[c0:c1]]                                      # gathered [n, d]
        if gemm:
            logits = _mm_f32(h_rows, weight.T)                                    # [n, V] fp32
            _k.softmax_grad_kernel[(n, triton.cdiv(V, cfg.BR))](
                logits, logits.stride(0), lab[c0:c1], lse_rows[c0:c1], g_rows[c0:c1], Gc, Gc.stride(0), V,
                BV=cfg.BR, num_warps=8)
            del logits
        else:
            grid = (triton.cdiv(n, cfg.BM) * triton.cdiv(V, cfg.BN),)
            _k.grad_kernel[grid](
                hidden, row_off[c0:c1], lab[c0:c1], lse_rows[c0:c1], g_rows[c0:c1], weight, Gc, n, V,
                hidden.stride(2), *weight.stride(), Gc.stride(0),
                D=d, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, IEEE=_ieee(dtype), GROUP=8, num_warps=cfg.warps,
                num_stages=cfg.stages)
        dh_flat[idx[c0:c1]] = _mm_f32(Gc, w_gemm).to(dtype)                     # [n, d]
        _addmm_f32(dw, Gc.T, h_rows if g_dtype == dtype else h_rows.float())    # dW += G^T h, [V, d] fp32
    return dh_flat.reshape(B, T, d), dw.to(weight.dtype)


def supports(hidden: Tensor, weight: Tensor) -> tuple[bool, str]:
    """Whether this backend can serve a call with these inputs, and why not."""
    ok, why = triton_gate(hidden, _IMPORT_ERROR, min_capability=(8, 0))
    if ok and hidden.dtype not in _SUPPORTED:
        return False, (f"dtype {hidden.dtype} is not supported (fp16/bf16/fp32 inputs, fp32 accumulation); "
                       "fp64 (reference checks, gradcheck) is served by the torch backend")
    return ok, why
