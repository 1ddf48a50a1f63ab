"""Triton kernels of ``seq_logps`` (launched by ``triton.py``).

Rows are the response tokens (mask True) in flat order; a row is addressed through ``row_off`` (the int64
element offset of its hidden vector), so hidden is read through its strides, never gathered or copied.
Names: N rows, V vocabulary, D hidden dim (compile-time), BM x BN the (rows x vocab) logits tile, BK the
reduction tile over D. Tails of N, V and D are masked; inputs are never padded.

Numerics: every logits tile is an fp32 accumulation over D (``tl.dot`` of bf16/fp16 tiles: exact products,
fp32 sums; fp32 inputs use IEEE fp32 dots); the online logsumexp, the label logit and the softmax gradient are
fp32 as well.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits_tile(h_ptr, row_off, m_rows, sd, w_ptr, cols, m_cols, swv, swd,
                 D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """[BM, BN] fp32 logits h[rows] @ w[cols]^T, accumulated over D in BK slices (rows/cols out of range: 0)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        m_k = ks < D
        h = tl.load(h_ptr + row_off[:, None] + ks[None, :] * sd, mask=m_rows[:, None] & m_k[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * swv + ks[:, None] * swd,
                    mask=m_k[:, None] & m_cols[None, :], other=0.0)                      # [BK, BN]
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    return acc


@triton.jit(do_not_specialize=["N", "V", "tiles_per_split"])
def fwd_kernel(h_ptr, row_off_ptr, lab_ptr, w_ptr, m_out, s_out, t_out, N, V, sd, swv, swd, tiles_per_split,
               D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
               FLAT: tl.constexpr):
    """Grid (row tiles, vocab splits). Each program runs an online logsumexp over its split's vocab tiles and
    writes, per row, the split's running max m, scaled sum s (sum exp(logit - m)) and the label logit (0 when
    the label lies in another split) at [split, row] of m_out / s_out / t_out ([S, N] fp32). FLAT: the vocab-tile
    loop and the K loop inside it are flattened into one software-pipelined loop."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    m_rows = rows < N
    row_off = tl.load(row_off_ptr + rows, mask=m_rows, other=0)
    lab = tl.load(lab_ptr + rows, mask=m_rows, other=-1)
    m = tl.full((BM,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BM,), dtype=tl.float32)
    tgt = tl.zeros((BM,), dtype=tl.float32)
    n_tiles = tl.cdiv(V, BN)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in tl.range(t0, t1, flatten=FLAT):
        cols = t * BN + tl.arange(0, BN)
        m_cols = cols < V
        logits = _logits_tile(h_ptr, row_off, m_rows, sd, w_ptr, cols, m_cols, swv, swd, D, BM, BN, BK, IEEE)
        tgt += tl.sum(tl.where(cols[None, :] == lab[:, None], logits, 0.0), axis=1)
        logits = tl.where(m_cols[None, :], logits, float("-inf"))      # vocab tail: no mass
        # every tile holds >= 1 real column, so m_new is finite and exp(m - m_new) is 0 on the first tile
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    out = pid_s * N + rows
    tl.store(m_out + out, m, mask=m_rows)
    tl.store(s_out + out, s, mask=m_rows)
    tl.store(t_out + out, tgt, mask=m_rows)


@triton.jit(do_not_specialize=["N", "V"])
def grad_kernel(h_ptr, row_off_ptr, lab_ptr, lse_ptr, g_ptr, w_ptr, G_ptr, N, V, sd, swv, swd, sGm,
                D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                GROUP: tl.constexpr):
    """G[row, v] = g_row * (onehot(label_row)[v] - softmax(logits_row)[v]) for one [BM, BN] tile: d logp / d
    logits scaled by the upstream gradient, from the logits recomputed here and the saved per-row lse. G is
    stored in G_ptr's dtype. 1-D grid, grouped so that GROUP row tiles share each streamed weight tile in L2."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BM)
    n_n = tl.cdiv(V, BN)
    per_group = GROUP * n_n
    first_m = (pid // per_group) * GROUP
    size_m = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m * BM + tl.arange(0, BM)
    m_rows = rows < N
    cols = pid_n * BN + tl.arange(0, BN)
    m_cols = cols < V
    row_off = tl.load(row_off_ptr + rows, mask=m_rows, other=0)
    lab = tl.load(lab_ptr + rows, mask=m_rows, other=-1)
    lse = tl.load(lse_ptr + rows, mask=m_rows, other=0.0)
    g = tl.load(g_ptr + rows, mask=m_rows, other=0.0)
    logits = _logits_tile(h_ptr, row_off, m_rows, sd, w_ptr, cols, m_cols, swv, swd, D, BM, BN, BK, IEEE)
    p = tl.exp(logits - lse[:, None])
    G = g[:, None] * (tl.where(cols[None, :] == lab[:, None], 1.0, 0.0) - p)
    tl.store(G_ptr + rows[:, None].to(tl.int64) * sGm + cols[None, :], G.to(G_ptr.dtype.element_ty),
             mask=m_rows[:, None] & m_cols[None, :])


# ---- the "gemm" strategy: cuBLAS computes fp32 logits chunks, these two row kernels read them once ----------

@triton.jit(do_not_specialize=["V", "sl"])
def row_lse_kernel(logits_ptr, sl, lab_ptr, lse_ptr, tgt_ptr, V, BV: tl.constexpr):
    """One row of fp32 logits [n, V] (row stride sl) per program: its logsumexp (online over BV-wide blocks) and
    its label logit. Grid: n."""
    r = tl.program_id(0)
    base = logits_ptr + r.to(tl.int64) * sl
    cols = tl.arange(0, BV)
    x = tl.load(base + cols, mask=cols < V, other=float("-inf"))
    m = tl.max(x, axis=0)                              # finite: every block holds >= 1 real column
    s = tl.sum(tl.exp(x - m), axis=0)
    for v0 in range(BV, V, BV):
        cols = v0 + tl.arange(0, BV)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(lse_ptr + r, m + tl.log(s))
    tl.store(tgt_ptr + r, tl.load(base + tl.load(lab_ptr + r)))


@triton.jit(do_not_specialize=["V", "sl", "sG"])
def softmax_grad_kernel(logits_ptr, sl, lab_ptr, lse_ptr, g_ptr, G_ptr, sG, V, BV: tl.constexpr):
    """G[r, v] = g_r * (onehot(label_r)[v] - exp(logits[r, v] - lse_r)) from fp32 logits [n, V], stored in G's
    dtype. Grid: (n, cdiv(V, BV))."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    m_cols = cols < V
    x = tl.load(logits_ptr + r.to(tl.int64) * sl + cols, mask=m_cols, other=0.0)
    p = tl.exp(x - tl.load(lse_ptr + r))
    G = tl.load(g_ptr + r) * (tl.where(cols == tl.load(lab_ptr + r), 1.0, 0.0) - p)
    tl.store(G_ptr + r.to(tl.int64) * sG + cols, G.to(G_ptr.dtype.element_ty), mask=m_cols)
