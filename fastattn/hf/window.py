"""Sliding-window softmax hybrid of one linear-attention layer (LoLCATs: softmax for recent keys, linear for older).

Query t attends to its last ``window`` keys (t - window < s <= t) with the softmax kernel exp(q.k * scaling) and to
every older key (s <= t - window) with the feature kernel phi(q).phi(k), under one normalizer:

    o_t = (sum_win exp(l_ts) v_s + sum_old phi(q_t).phi(k_s) v_s) / (sum_win exp(l_ts) + sum_old phi(q_t).phi(k_s))

The feature map must estimate exp(q.k * scaling) on that same scale, which positive random features do ("prf" is
unbiased at initialisation and its log_alpha learns the scale; "performer"): a window covering the whole sequence
is softmax attention exactly. Both kernels are evaluated in log space under one detached shift r_t per query row,
the larger of the row's largest window logit and the bound max_m log phi_m(q_t) + c on its log feature kernel
(c: the key shift, the map's calibrated ``key_shift`` or the max key log-feature of the call), so no term overflows.

The linear part is ``fastattn.linear_attention(normalize=False)`` on keys and values delayed by ``window``
positions, so that its state covers exactly the keys that have left every later query's window; its denominator
comes from a cumulative sum of the delayed key features (the state's z). (A ones column appended to the values
gave the denominator in the same call, but a value width of Dv + 1 = 65 splits the Triton kernels' values into
two 64-wide tiles, the second holding one column: that call's fp32 backward took 20 ms on the H200,
bench/results/hf_speed_h200.md, against 0.2 ms for the bf16, Dv = 64 call of a plain linear layer.) A recurrent
cache keeps that state plus the last ``window`` raw keys/values: prefill, chunked prefill and one-token decode
steps run the same code, with memory independent of the sequence length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastattn


def _repeat_heads(x: Tensor, groups: int) -> Tensor:
    return x.repeat_interleave(groups, 1) if groups > 1 else x


def kernel_parts(feature_map, q: Tensor, k: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Log-space pieces of the feature kernel for q [B, H, Tq, d], k [B, H, Tk, d] (fp32), key_mask [B, Tk]:
    (log phi(q) [B, H, Tq, M] unshifted, phi(k) * exp(-c) [B, H, Tk, M] (zero on padded keys), c broadcastable
    to [B, H, 1, 1])."""
    lq, lk = feature_map.log_features(q, "q"), feature_map.log_features(k, "k")
    if getattr(feature_map, "key_shift_calibrated", False):
        c = feature_map.key_shift.float()[None, :, None, None]
    else:
        masked = lk.detach() if key_mask is None else lk.detach().masked_fill(~key_mask[:, None, :, None],
                                                                                float("-inf"))
        c = masked.amax(dim=(-2, -1), keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))   # a row of padding only
    phi_k = (lk - c).exp()
    if key_mask is not None:
        phi_k = phi_k * key_mask[:, None, :, None]
    return lq, phi_k, c


def _row_shift(window_logits_max: Tensor, lq: Tensor, c: Tensor) -> Tensor:
    """The detached per-row shift r [B, H, Tq, 1] shared by both kernels."""
    bound = lq.detach().amax(-1, keepdim=True) + c
    return torch.maximum(window_logits_max.detach().unsqueeze(-1), bound)


def _blocks(x: Tensor, window: int, fill=0) -> Tensor:
    """x [B, H, N, ...] -> the keys each block of ``window`` queries can see: [B, H, nb, 2 window, ...] (the
    previous block and its own), padded with ``fill``."""
    N = x.shape[2]
    nb = -(-N // window)
    pad = [0, 0] * (x.dim() - 3) + [0, nb * window - N]
    blocks = F.pad(x, pad, value=fill).unflatten(2, (nb, window))
    previous = F.pad(blocks[:, :, :-1], [0, 0] * (x.dim() - 2) + [1, 0], value=fill)
    return torch.cat([previous, blocks], dim=3)


def _window_softmax_terms(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scaling: float, window: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Banded softmax pieces over one sequence of N positions: q, k [B, H, N, d], v [B, H, N, Dv], mask [B, N].
    Returns the window logits [B, H, nb, W, 2W] (-inf outside the window), their row max [B, H, N] and the
    blocked values [B, H, nb, 2W, Dv]; O(N W) memory."""
    B, H, N, _ = q.shape
    W = window
    qb = _blocks(q, W)[:, :, :, W:]                               # [B, H, nb, W, d]
    kb, vb = _blocks(k, W), _blocks(v, W)                         # [B, H, nb, 2W, .]
    valid = _blocks(mask[:, None, :].expand(B, H, N), W, fill=False)   # [B, H, nb, 2W]
    i = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    band = (j > i) & (j <= i + W)                                 # key (j - W) in (query - W, query]
    logits = (qb @ kb.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~(band & valid[:, :, :, None, :]), float("-inf"))
    row_max = logits.amax(-1).flatten(2)[:, :, :N]
    return logits, row_max, vb


def window_attention(adapter, query: Tensor, key: Tensor, value: Tensor, scaling: float,
                     key_mask: Tensor | None = None, layer=None) -> Tensor:
    """The hybrid attention of one layer: query [B, H, T, d], key [B, Hkv, T, d], value [B, Hkv, T, Dv],
    key_mask [B, T] (True = real token) -> o [B, H, T, Dv] in value's dtype.

    ``layer`` (a ``RecurrentStateLayer``) continues from and updates its recurrent state and window buffer
    (``layer.state``, ``layer.window``): the call then attends to everything the layer has seen before."""
    W, groups = adapter.window, adapter.num_heads // adapter.num_kv_heads
    B, H, T, _ = query.shape
    q, k, v = query.float(), key.float(), value.float()
    mask = key_mask if key_mask is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
    state, L = None, 0
    if layer is not None and layer.window is not None:   # keys/values of the last L <= W tokens seen before
        k_prev, v_prev, m_prev = layer.window
        L = k_prev.shape[2]
        k, v, mask = torch.cat([k_prev, k], 2), torch.cat([v_prev, v], 2), torch.cat([m_prev, mask], 1)
        q = torch.cat([q.new_zeros(B, H, L, q.shape[-1]), q], 2)   # their outputs are not needed
        state = layer.state
    k_rep = _repeat_heads(k, groups)
    lq, phi_k, c = kernel_parts(adapter.feature_map, q, k_rep, mask)
    logits, row_max, vb = _window_softmax_terms(q, k_rep, _repeat_heads(v, groups), mask, scaling, W)
    r = _row_shift(row_max, lq, c)                                 # [B, H, N, 1]
    N = q.shape[2]
    # softmax part, in blocks of W queries
    nb = logits.shape[2]
    r_blocks = F.pad(r, [0, 0, 0, nb * W - N]).unflatten(2, (nb, W))   # [B, H, nb, W, 1]
    p = (logits - r_blocks).exp()
    num_sm = (p @ vb).flatten(2, 3)[:, :, :N]
    den_sm = p.sum(-1).flatten(2)[:, :, :N]
    # linear part: keys and values delayed by W positions (phi_k is zero on padded keys); its denominator
    # phi(q_t) . (z0 + sum_{s <= t-W} phi(k_s)) from a cumulative sum of the delayed keys (O(N M), fp32)
    delayed_k = F.pad(phi_k, [0, 0, W, 0])[:, :, :N]
    delayed_v = F.pad(v, [0, 0, W, 0])[:, :, :N]
    phi_q = (lq - r + c).exp()
    o1, (S, _) = fastattn.linear_attention(phi_q, delayed_k, delayed_v, normalize=False,
                                           state=None if state is None else (state[0], None), return_state=True,
                                           backend=adapter.backend)
    z = delayed_k.cumsum(2)
    if state is not None:
        z = z + state[1][:, :, None]
    den1 = (phi_q * z).sum(-1)
    o = (num_sm + o1) / (den_sm + den1 + adapter.eps).unsqueeze(-1)
    if layer is not None:
        keep = min(N, W)
        layer.state = (S, z[:, :, -1])
        layer.window = (k[:, :, N - keep:], v[:, :, N - keep:], mask[:, N - keep:])
    return o[:, :, L:].to(value.dtype)


def window_rows(adapter, q: Tensor, k: Tensor, scaling: float, rows: Tensor | None = None) -> Tensor:
    """The hybrid's normalized causal attention rows of one sequence, densely, for the layerwise losses:
    q [B, H, T, d], k [B, H, T, d] (keys already per query head), rows [R] (None: all T) -> [B, H, R, T] fp32."""
    T, W = k.shape[2], adapter.window
    pos = torch.arange(T, device=q.device)
    qpos = pos if rows is None else rows.to(q.device)
    q = q if rows is None else q[:, :, rows]
    lq, phi_k, c = kernel_parts(adapter.feature_map, q, k, None)
    logits = (q @ k.transpose(-1, -2)) * scaling                   # [B, H, R, T]
    lag = qpos[:, None] - pos[None, :]
    in_window, older = (lag >= 0) & (lag < W), lag >= W
    logits = logits.masked_fill(~in_window, float("-inf"))
    r = _row_shift(logits.amax(-1), lq, c)
    weights = torch.where(in_window, (logits - r).exp(), ((lq - r + c).exp() @ phi_k.transpose(-1, -2)) * older)
    return weights / weights.sum(-1, keepdim=True)
