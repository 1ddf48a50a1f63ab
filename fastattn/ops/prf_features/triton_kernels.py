"""Triton kernel of ``prf_features`` (launched by ``triton.py``).

One program per (token tile, sequence x head): it loads its [BT, d] tile of x once (any strides, converted to
fp32) and, per [BM] slice of the M features, forms the fp32 logits x @ w^T with fp32-accurate dots (PREC:
"tf32x3", three TF32 tensor-core products per dot, on a GPU; "ieee" in the interpreter), subtracts
|x|^2 / (2 sqrt d), adds log c, and either stores exp(logits - shift) in the output dtype or (STATS) only the
tile's max. SHIFT: 0 none, 1 per-token max over all M (with one slice, M <= BM, from the same logits; else a
first pass over the slices finds it), 2 a per-(sequence, head) constant read from shift_ptr[b * s_sb + h * s_sh].
Tails of T, d and M are masked; nothing is padded.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits(xt, sq, w_ptr, log_c_ptr, h, ms, m_m, swh, swm, swd, sch, scm, ds, m_d, c_proj, PREC: tl.constexpr):
    """[BT, BM] fp32 log-features of the loaded x tile xt [BT, BD] for features ms (out of range: -inf)."""
    w = tl.load(w_ptr + h * swh + ms[None, :] * swm + ds[:, None] * swd, mask=m_d[:, None] & m_m[None, :],
                other=0.0).to(tl.float32)                                                   # [BD, BM]
    logc = tl.load(log_c_ptr + h * sch + ms * scm, mask=m_m, other=0.0).to(tl.float32)
    logits = tl.dot(xt, w, input_precision=PREC) * c_proj - sq[:, None] + logc[None, :]
    return tl.where(m_m[None, :], logits, float("-inf"))


@triton.jit
def _row_max(xt, sq, w_ptr, log_c_ptr, h, M, swh, swm, swd, sch, scm, ds, m_d, c_proj,
             BT: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """[BT] max log-feature of each row of the x tile over all M features (one pass over the slices)."""
    best = tl.full((BT,), float("-inf"), tl.float32)
    for m0 in range(0, M, BM):
        ms = m0 + tl.arange(0, BM)
        logits = _logits(xt, sq, w_ptr, log_c_ptr, h, ms, ms < M, swh, swm, swd, sch, scm, ds, m_d, c_proj, PREC)
        best = tl.maximum(best, tl.max(logits, axis=1))
    return best


@triton.jit
def _store(out_ptr, b, h, ts, ms, m_t, m_m, sob, soh, sot, som, phi):
    tl.store(out_ptr + b.to(tl.int64) * sob + h * soh + ts[:, None].to(tl.int64) * sot + ms[None, :] * som,
             phi.to(out_ptr.dtype.element_ty), mask=m_t[:, None] & m_m[None, :])


@triton.jit
def prf_features_kernel(x_ptr, w_ptr, log_c_ptr, shift_ptr, out_ptr, stats_ptr,
                        sxb, sxh, sxt, sxd, swh, swm, swd, sch, scm, s_sb, s_sh, sob, soh, sot, som,
                        T, M, H, G, c_proj, c_sq,
                        D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
                        SHIFT: tl.constexpr, STATS: tl.constexpr, ONE_SLICE: tl.constexpr, PREC: tl.constexpr):
    pid_t, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    ts = pid_t * BT + tl.arange(0, BT)
    ds = tl.arange(0, BD)
    m_t, m_d = ts < T, ds < D
    # x holds H / G heads (GQA keys read in place): feature head h reads x head h // G
    xt = tl.load(x_ptr + b.to(tl.int64) * sxb + (h // G) * sxh + ts[:, None].to(tl.int64) * sxt + ds[None, :] * sxd,
                 mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)               # [BT, BD]
    sq = tl.sum(xt * xt, axis=1) * c_sq
    if STATS:   # the tile's max log-feature (rows past T excluded) -> stats[bh, pid_t]
        best = _row_max(xt, sq, w_ptr, log_c_ptr, h, M, swh, swm, swd, sch, scm, ds, m_d, c_proj, BT, BM, PREC)
        tl.store(stats_ptr + bh * tl.num_programs(0) + pid_t, tl.max(tl.where(m_t, best, float("-inf")), axis=0))
    elif ONE_SLICE and SHIFT == 1:   # every feature in one slice: the row max comes from the same logits
        ms = tl.arange(0, BM)
        m_m = ms < M
        logits = _logits(xt, sq, w_ptr, log_c_ptr, h, ms, m_m, swh, swm, swd, sch, scm, ds, m_d, c_proj, PREC)
        _store(out_ptr, b, h, ts, ms, m_t, m_m, sob, soh, sot, som, tl.exp(logits - tl.max(logits, axis=1)[:, None]))
    else:
        if SHIFT == 1:
            shift = _row_max(xt, sq, w_ptr, log_c_ptr, h, M, swh, swm, swd, sch, scm, ds, m_d, c_proj, BT, BM,
                             PREC)
        elif SHIFT == 2:
            shift = tl.full((BT,), 0.0, tl.float32) + tl.load(shift_ptr + b * s_sb + h * s_sh).to(tl.float32)
        else:
            shift = tl.zeros((BT,), tl.float32)
        for m0 in range(0, M, BM):
            ms = m0 + tl.arange(0, BM)
            m_m = ms < M
            logits = _logits(xt, sq, w_ptr, log_c_ptr, h, ms, m_m, swh, swm, swd, sch, scm, ds, m_d, c_proj, PREC)
            _store(out_ptr, b, h, ts, ms, m_t, m_m, sob, soh, sot, som, tl.exp(logits - shift[:, None]))
