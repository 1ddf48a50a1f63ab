"""Public ``seq_logps``: input checks, the registered torch ops and their autograd.

The torch.library ops ``fastattn::seq_logps_fwd``/``_bwd`` pick a backend at run time (``backends.resolve``
on (hidden, weight)), so ``torch.compile(fullgraph=True)`` sees two opaque ops with fake implementations.
The backward runs on the backend the forward resolved (stored on ctx) and recomputes the logits tiles.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ... import backends
from .reference import acc_dtype

OP = "seq_logps"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ---- registered ops --------------------------------------------------------------------------------------

@torch.library.custom_op("fastattn::seq_logps_fwd", mutates_args=())
def _fwd_op(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, token_chunk: int, vocab_chunk: int,
            backend: str) -> tuple[Tensor, Tensor]:
    impl = backends.get(OP, backends.resolve(OP, backend, hidden, weight))
    return impl.forward(hidden, weight, labels, mask, token_chunk, vocab_chunk)


@_fwd_op.register_fake
def _(hidden, weight, labels, mask, token_chunk, vocab_chunk, backend):
    B, T, _ = hidden.shape
    acc = acc_dtype(hidden.dtype)
    return hidden.new_empty(B, dtype=acc), hidden.new_empty(B, T, dtype=acc)


@torch.library.custom_op("fastattn::seq_logps_bwd", mutates_args=())
def _bwd_op(grad: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, lse: Tensor,
            token_chunk: int, vocab_chunk: int, backend: str) -> tuple[Tensor, Tensor]:
    impl = backends.get(OP, backend)
    return impl.backward(grad, hidden, weight, labels, mask, lse, token_chunk, vocab_chunk)


@_bwd_op.register_fake
def _(grad, hidden, weight, labels, mask, lse, token_chunk, vocab_chunk, backend):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, mask, token_chunk, vocab_chunk, backend = inputs
    ctx.save_for_backward(hidden, weight, labels, mask, output[1])
    ctx.chunks = (token_chunk, vocab_chunk)
    ctx.backend = backends.resolve(OP, backend, hidden, weight)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dlogps, _dlse):
    hidden, weight, labels, mask, lse = ctx.saved_tensors
    if dlogps is None:
        dlogps = lse.new_zeros(lse.shape[0])
    dh, dw = _bwd_op(dlogps, hidden, weight, labels, mask, lse, *ctx.chunks, ctx.backend)
    return dh, dw, None, None, None, None, None


torch.library.register_autograd("fastattn::seq_logps_fwd", _backward, setup_context=_setup_context)


# ---- input checks ----------------------------------------------------------------------------------------

def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_inputs(hidden, weight, labels, mask, token_chunk, vocab_chunk) -> None:
    for name, t, doc in (("hidden", hidden, "[B, T, d]"), ("weight", weight, "[V, d]"),
                         ("labels", labels, "[B, T]"), ("mask", mask, "[B, T]")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {doc}, got {type(t).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [B, T, d], got shape {_shape(hidden)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, d] (the lm-head weight), got shape {_shape(weight)}")
    if hidden.dtype not in _FLOAT:
        raise TypeError(f"hidden must be a floating tensor (fp16, bf16, fp32, fp64), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    B, T, d = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight must be [V, d] with hidden's d={d}: hidden {_shape(hidden)}, "
                         f"weight {_shape(weight)}")
    if V == 0 or d == 0:
        raise ValueError(f"empty dimension: hidden {_shape(hidden)}, weight {_shape(weight)} (V and d must be > 0)")
    if tuple(labels.shape) != (B, T):
        raise ValueError(f"labels must be [B, T] = {(B, T)}, got shape {_shape(labels)}")
    if labels.dtype not in _INT:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"mask must be [B, T] = {(B, T)}, got shape {_shape(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = response token), got {mask.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("mask", mask)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; "
                             "all inputs must share a device")
    for name, c in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {c!r}")
    if not torch.compiler.is_compiling() and labels.numel():
        sel = labels[mask]
        if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= V):
            raise ValueError(f"labels at mask=True positions must lie in [0, V={V}), got values in "
                             f"[{int(sel.min())}, {int(sel.max())}]")


# ---- public function -------------------------------------------------------------------------------------

def seq_logps(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, backend: str = "auto",
              token_chunk: int | None = None, vocab_chunk: int | None = None) -> Tensor:
    """Sum of response-token log-probs, straight from final hidden states (no [B, T, V] logits).

    ``out[b] = sum_{t: mask[b, t]} log softmax(hidden[b, t] @ weight^T)[labels[b, t]]``

    Args:
        hidden: [B, T, d] final hidden states (already aligned with labels: position t predicts labels[b, t]).
        weight: [V, d] lm-head weight, hidden's dtype (no bias).
        labels: [B, T] integer token ids; only positions with mask True are read (others may be e.g. -100).
        mask: [B, T] bool, True = response token counted in the sum. A row without one gives 0.
        backend: "auto", "torch", "cpu", "triton" or "cuda" (see ``fastattn.backend_info()``).
        token_chunk, vocab_chunk: tile sizes (default 1024 x 8192); the largest temporary is one
            [token_chunk, vocab_chunk] fp32 tile. Differentiable w.r.t. hidden and weight (recomputed backward).

    Returns:
        [B] fp32 (fp64 for fp64 inputs).
    """
    _check_inputs(hidden, weight, labels, mask, token_chunk, vocab_chunk)
    if labels.dtype != torch.int64:
        labels = labels.long()
    logps, _ = _fwd_op(hidden, weight, labels, mask, int(token_chunk or 0), int(vocab_chunk or 0),
                       backends.requested(backend))
    return logps
