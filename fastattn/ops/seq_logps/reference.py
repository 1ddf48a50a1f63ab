"""Sequence log-probs from final hidden states: a plain full-logits reference and the chunked torch backend.

``logp_b = sum_{t: mask[b, t]} log softmax(hidden[b, t] @ weight^T)[labels[b, t]]``

The chunked form (the "torch" backend, any device) never materialises the [B, T, V] logits: it walks the
response tokens (mask True) in chunks of ``token_chunk`` and the vocabulary in chunks of ``vocab_chunk`` with an
online logsumexp, accumulating in fp32 (fp64 for fp64 inputs). The backward recomputes each logits tile from
the saved per-token logsumexp, so the largest temporary is one [token_chunk, vocab_chunk] tile.
"""
from __future__ import annotations

import torch
from torch import Tensor

TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- full-logits reference (tests) ------------------------------------------------------------------------

def seq_logps_reference(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor,
                        dtype: torch.dtype | None = None) -> Tensor:
    """Materialises [B, T, V] logits in ``dtype`` (default: hidden's dtype), log_softmax, gather, masked sum.

    Differentiable through plain autograd. Returns [B] in ``dtype``.
    """
    dtype = hidden.dtype if dtype is None else dtype
    logits = hidden.to(dtype) @ weight.to(dtype).T                              # [B, T, V]
    logp = torch.log_softmax(logits, dim=-1)
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)                       # [B, T]
    return torch.where(mask, tok, torch.zeros_like(tok)).sum(-1)


# ---- chunked torch backend --------------------------------------------------------------------------------

def supports(hidden: Tensor, weight: Tensor) -> tuple[bool, str]:
    return True, ""


def _chunks(token_chunk: int, vocab_chunk: int) -> tuple[int, int]:
    return (token_chunk if token_chunk > 0 else TOKEN_CHUNK), (vocab_chunk if vocab_chunk > 0 else VOCAB_CHUNK)


def _selected(mask: Tensor) -> Tensor:
    """Flat indices (into B*T) of the response tokens."""
    return mask.reshape(-1).nonzero().squeeze(-1)


def _setup(hidden: Tensor, weight: Tensor, labels: Tensor, token_chunk: int, vocab_chunk: int):
    """Sizes, tile sizes, accumulation dtype and the token-flattened hidden [B*T, d] / labels [B*T]."""
    B, T, d = hidden.shape
    tc, vc = _chunks(token_chunk, vocab_chunk)
    return (B, T, d, weight.shape[0], tc, vc, acc_dtype(hidden.dtype), hidden.reshape(B * T, d),
            labels.reshape(B * T))


def forward(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, token_chunk: int = 0,
            vocab_chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Returns (logps [B], lse [B, T]) in the accumulation dtype; lse is 0 where mask is False."""
    B, T, d, V, tc, vc, acc, h_flat, lab_flat = _setup(hidden, weight, labels, token_chunk, vocab_chunk)
    idx = _selected(mask)
    logps = hidden.new_zeros(B, dtype=acc)
    lse_flat = hidden.new_zeros(B * T, dtype=acc)
    w_single = weight.to(acc) if V <= vc else None                               # one vocab chunk: convert once
    for s in range(0, idx.numel(), tc):
        ti = idx[s:s + tc]
        h = h_flat[ti].to(acc)                                                   # [tc, d]
        lab = lab_flat[ti]
        m = h.new_full((ti.numel(),), float("-inf"))
        ssum = h.new_zeros(ti.numel())
        for v0 in range(0, V, vc):
            w = w_single if w_single is not None else weight[v0:v0 + vc].to(acc)
            logits = h @ w.T                                                     # [tc, vc] tile
            m_new = torch.maximum(m, logits.amax(-1))
            ssum = ssum * torch.exp(m - m_new) + torch.exp(logits - m_new[:, None]).sum(-1)
            m = m_new
        lse = m + torch.log(ssum)
        target = (h * weight[lab].to(acc)).sum(-1)                               # label logits
        lse_flat[ti] = lse
        logps.index_add_(0, torch.div(ti, T, rounding_mode="floor"), target - lse)
    return logps, lse_flat.reshape(B, T)


def backward(grad: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, lse: Tensor,
             token_chunk: int = 0, vocab_chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum_b grad[b] * logp_b`` w.r.t. hidden [B, T, d] and weight [V, d] (in their dtypes).

    d logp / d logits_t = onehot(label_t) - softmax_t, recomputed tile by tile from the saved lse.
    """
    B, T, d, V, tc, vc, acc, h_flat, lab_flat = _setup(hidden, weight, labels, token_chunk, vocab_chunk)
    lse_flat = lse.reshape(B * T).to(acc)
    g_rows = grad.to(acc)
    idx = _selected(mask)
    dh_flat = hidden.new_zeros(B * T, d, dtype=acc)
    dw = weight.new_zeros(V, d, dtype=acc)
    w_single = weight.to(acc) if V <= vc else None
    for s in range(0, idx.numel(), tc):
        ti = idx[s:s + tc]
        h = h_flat[ti].to(acc)
        lab = lab_flat[ti]
        g = g_rows[torch.div(ti, T, rounding_mode="floor")]                     # [tc]
        l = lse_flat[ti]
        dh = g[:, None] * weight[lab].to(acc)                                    # + g * w[label]
        dw.index_add_(0, lab, g[:, None] * h)                                    # + g * h at the label rows
        for v0 in range(0, V, vc):
            w = w_single if w_single is not None else weight[v0:v0 + vc].to(acc)
            gp = torch.exp(h @ w.T - l[:, None]) * g[:, None]                    # [tc, vc]: g * softmax
            dh -= gp @ w
            dw[v0:v0 + vc] -= gp.T @ h
        dh_flat[ti] = dh
    return dh_flat.reshape(B, T, d).to(hidden.dtype), dw.to(weight.dtype)
