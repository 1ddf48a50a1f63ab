"""Triton kernels for chunked linear attention (launched by ``triton.py``; the math is in README.md).

Names inside the kernels: T tokens, D (= K) the query/key feature dim, DV the value dim, BT the chunk, BK / BV
the feature tiles (powers of two in 16..64, the forward's BK up to 128, or 256 as an option; tails are masked,
inputs are never padded). Every kernel works on one (batch, head) pair at a time and reads q/k/v/do through their
strides, so "bhtd" and "bthd" memory both work.
Windows (WIN > 0, "bthd" memory with a ragged D, e.g. 9 or 182): the heads of a token lie side by side in one row
of H * D features, so a head's q/k row starts at h * D, rarely on a 16-byte boundary, and loads of it cannot be
vectors or async copies. With WIN (16 bytes in elements) a program reads the 16-byte aligned window starting at
c0 = h * D rounded down to WIN, i.e. off = h * D - c0 < WIN columns early, and zeroes what is not its head's:
feature f sits at window column f + off (``_kwin``). q/k windows load through pointers or TMA descriptors over
[B, T, H * D]; dq/dk are stored through pointers, masked to the head. The host takes windows only where they add
no feature tile (D + WIN - 1 fits the tiles D needs).
D and DV are runtime arguments, only the tiles are compile-time: a model whose layers all have different feature
dims compiles one kernel per tile bucket and alignment (AK, AV: 16, 8, 4, 2 or 1 elements), not one per layer.
EXACT (D == BK, DV == BV, or both, e.g. 64 x 64) compiles those dims in, as constants (``_dims``): with runtime
dims the split-T forward at D = 64 ran 1.4-1.5x slower on the H200 (bench/results/linear_attn_h200_runtime_dims.md).

Split-T schedule: the T axis is cut into NS segments of CPS chunks. ``chunk_state_kernel`` sums each segment's
contribution to the state, ``state_scan_kernel`` turns those sums into the state entering each segment (or the
total, for the non-causal form), and the chunk kernels then run every segment in parallel, carrying the state
through the segment's chunks in registers. With NS = 1 the state kernels are skipped.

Each chunk kernel holds one [BK, BV] tile of the state, so a program covers one (K tile, V tile) pair. Where an
output reduces over the other feature axis and that axis has several tiles, the program writes an fp32 partial
that ``sum_partials_kernel`` adds up (with the normalisation for the forward output).

Numerics: all accumulation is fp32. Products of two input tiles use the input dtype's MMA (exact products, fp32
sums). Products with an fp32 operand (a state, a masked score tile) go through ``_split`` + ``_dot_xs``/``_dot_sx``
(or ``_dot_xf``/``_dot_fx``): the fp32 side becomes bf16 hi + lo parts for bf16 inputs (two exact MMAs, a ~16-bit
operand), 3xTF32 for fp16 inputs (fp16 values are exact in tf32), IEEE fp32 for fp32 inputs. Rounding the state to
the input dtype instead would cost the backward most of its precision, where dq and dk are differences of nearly
equal terms.
"""
from __future__ import annotations

import triton
import triton.language as tl

# SPLIT: how products with an fp32 operand are computed (see the module docstring).
SPLIT_IEEE, SPLIT_BF16, SPLIT_TF32X3 = 0, 1, 2


@triton.jit
def _dot_xx(a, b, SPLIT: tl.constexpr):
    """a @ b, both tiles in the input dtype: exact products, fp32 sums."""
    if SPLIT == 0:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _split(f, SPLIT: tl.constexpr):
    """An fp32 operand as (hi, lo) for ``_dot_xs`` / ``_dot_sx``: bf16 hi + lo for bf16 inputs (the pair holds
    ~16 bits; products with an exact bf16 tile are exact), else the fp32 tile itself (lo unused)."""
    if SPLIT == 1:
        hi = f.to(tl.bfloat16)
        return hi, (f - hi.to(tl.float32)).to(tl.bfloat16)
    else:
        return f, f


@triton.jit
def _dot_xs(x, hi, lo, SPLIT: tl.constexpr):
    """x @ f for x in the input dtype and f = _split(f): close to fp32 accuracy."""
    if SPLIT == 0:
        return tl.dot(x, hi, input_precision="ieee")
    elif SPLIT == 1:
        return tl.dot(x, hi, tl.dot(x, lo))
    else:  # fp16 inputs: fp16 values are exact in tf32, 3xTF32 carries the fp32 side
        return tl.dot(x.to(tl.float32), hi, input_precision="tf32x3")


@triton.jit
def _dot_sx(hi, lo, x, SPLIT: tl.constexpr):
    """f @ x for f = _split(f) and x in the input dtype."""
    if SPLIT == 0:
        return tl.dot(hi, x, input_precision="ieee")
    elif SPLIT == 1:
        return tl.dot(hi, x, tl.dot(lo, x))
    else:
        return tl.dot(hi, x.to(tl.float32), input_precision="tf32x3")


@triton.jit
def _dot_xf(x, f, SPLIT: tl.constexpr):
    """x @ f with x in the input dtype and f fp32."""
    hi, lo = _split(f, SPLIT)
    return _dot_xs(x, hi, lo, SPLIT)


@triton.jit
def _dot_fx(f, x, SPLIT: tl.constexpr):
    """f @ x with f fp32 and x in the input dtype."""
    hi, lo = _split(f, SPLIT)
    return _dot_sx(hi, lo, x, SPLIT)


@triton.jit
def _base(i_b, i_h, sb, sh, A: tl.constexpr):
    """int64 offset of one (batch, head) slice; A > 1: the host checked that the strides are multiples of A."""
    off = i_b.to(tl.int64) * sb + i_h.to(tl.int64) * sh
    if A > 1:
        off = tl.multiple_of(off, A)
    return off


@triton.jit
def _slice(ptr, i_b, i_h, sb, sh, st, A: tl.constexpr):
    """(ptr at one (batch, head) slice, the token stride st). A: the tensor's alignment in elements (AK for q, k,
    dq, dk; AV for v, o, do, dv), the largest of 16, 8, 4, 2, 1 that divides its batch, head and token strides
    and its feature dim (``triton._alignment``). Stated to the compiler (multiple_of; st and, in ``_dims``, the
    dim as (x // A) * A), it lets rows of a ragged dim load as vectors / async copies: sm_90, D = 56, A = 8:
    16-byte copies instead of scalar 2-byte loads (bench/sm90_compile.py)."""
    if A > 1:
        st = (st // A) * A
    return ptr + _base(i_b, i_h, sb, sh, A), st


@triton.jit
def _kslice(ptr, i_b, i_h, c0, sb, sh, st, AK: tl.constexpr, WIN: tl.constexpr):
    """``_slice`` of a q-side tensor (q, k, dq, dk): at head i_h, or with WIN at its window's first column c0 (a
    multiple of WIN, as are the batch and token strides: the host checked; AK then is D's own alignment)."""
    if WIN:
        return _slice(ptr, i_b, c0, sb, 1, st, WIN)
    else:
        return _slice(ptr, i_b, i_h, sb, sh, st, AK)


@triton.jit
def _slices(q, k, v, x, i_b, i_h, c0, G, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sxb, sxh, sxt,
            AK: tl.constexpr, AV: tl.constexpr, WIN: tl.constexpr):
    """``_kslice`` of q and k, ``_slice`` of v (its value head i_h // G) and x (o or do; AV): (q, sqt, k, skt, v,
    svt, x, sxt)."""
    q, sqt = _kslice(q, i_b, i_h, c0, sqb, sqh, sqt, AK, WIN)
    k, skt = _kslice(k, i_b, i_h, c0, skb, skh, skt, AK, WIN)
    v, svt = _slice(v, i_b, i_h // G, svb, svh, svt, AV)
    x, sxt = _slice(x, i_b, i_h, sxb, sxh, sxt, AV)
    return q, sqt, k, skt, v, svt, x, sxt


@triton.jit
def _tile(ptr, o_r, o_c, s_r, s_c, m_r, m_c):
    return tl.load(ptr + o_r[:, None] * s_r + o_c[None, :] * s_c, mask=m_r[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _get(x, i_b, i_h, n, i_c, o_t, o_c, s_t, s_c, m_t, m_c, BT: tl.constexpr, BC: tl.constexpr,
         TMA: tl.constexpr, MASKED: tl.constexpr):
    """Chunk n's [BT, BC] tile of feature tile i_c of one (batch, head) slice, zero outside the rows m_t and the
    columns m_c: through the TMA descriptor x over [B, H, T, dim] (reads past T or the dim are zeros; MASKED: m_t
    masks more rows than that, e.g. padded keys), or from the pointer x at the slice (``_slice``)."""
    if TMA:
        t = x.load([i_b, i_h, n * BT, i_c * BC]).reshape(BT, BC)
        if MASKED:
            t = tl.where(m_t[:, None], t, 0.0)
    else:
        t = _tile(x, o_t, o_c, s_t, s_c, m_t, m_c)
    return t


@triton.jit
def _put(x, val, i_b, i_h, n, i_c, o_t, o_c, s_t, s_c, m_t, m_c, BT: tl.constexpr, BC: tl.constexpr,
         TMA: tl.constexpr):
    """``_get``'s tile stored (cast to x's dtype); through a descriptor, writes past T or the dim are dropped."""
    if TMA:
        x.store([i_b, i_h, n * BT, i_c * BC], val.to(x.dtype).reshape(1, 1, BT, BC))
    else:
        tl.store(x + o_t[:, None] * s_t + o_c[None, :] * s_c, val.to(x.dtype.element_ty),
                 mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _kwin(o_k, m_k, i_h, H, D, WIN: tl.constexpr):
    """(o_k, m_k, o_j, c0, lim): a program's q-side columns. Without WIN the feature indices o_k of its K tile
    are the columns o_j. With WIN (see the module docstring) o_j are window columns from c0 (a multiple of WIN),
    o_k = o_j - off the features they hold (some < 0 or >= D: another head's, masked off by m_k), and lim the
    columns left in the row after c0 (H * D is a multiple of WIN). off is a multiple of D's alignment AK (stated
    in ``_dims``), so the masks of stores to the head come in AK-wide runs: D = 182 stores pairs."""
    if WIN:
        c0 = (i_h * D // WIN) * WIN
        o_j = o_k
        o_k = o_j - (i_h * D - c0)
        return o_k, (o_k >= 0) & (o_k < D), o_j, c0, ((H * D - c0) // WIN) * WIN
    else:
        return o_k, m_k, o_k, 0, D


@triton.jit
def _getk(x, i_b, i_h, c0, n, i_k, o_t, o_j, lim, s_t, s_d, m_t, m_k, BT: tl.constexpr, BK: tl.constexpr,
          TMA: tl.constexpr, MASKED: tl.constexpr, WIN: tl.constexpr):
    """``_get`` of a q-side tile (q or k), zero outside its head's features m_k. With WIN: the window's columns
    o_j, through a TMA descriptor over [B, T, H * D] (loads start at c0 + i_k * BK, 16-byte aligned) or the
    pointer from ``_kslice`` (masked only to the row, o_j < lim, so that the loads stay vectors)."""
    if WIN:
        if TMA:
            t = x.load([i_b, n * BT, c0 + i_k * BK]).reshape(BT, BK)
            if MASKED:
                t = tl.where(m_t[:, None], t, 0.0)
        else:
            t = _tile(x, o_t, o_j, s_t, s_d, m_t, o_j < lim)
        t = tl.where(m_k[None, :], t, 0.0)
    else:
        t = _get(x, i_b, i_h, n, i_k, o_t, o_j, s_t, s_d, m_t, m_k, BT, BK, TMA, MASKED)
    return t


@triton.jit
def _putk(x, val, i_b, i_h, n, i_k, o_t, o_j, s_t, s_d, m_t, m_k, BT: tl.constexpr, BK: tl.constexpr,
          TMA: tl.constexpr, WIN: tl.constexpr):
    """``_put`` of a q-side tile (dq or dk) to its head's features; with WIN through the pointer from
    ``_kslice`` (a descriptor would write the whole window)."""
    if WIN:
        _put(x, val, i_b, i_h, n, i_k, o_t, o_j, s_t, s_d, m_t, m_k, BT, BK, False)
    else:
        _put(x, val, i_b, i_h, n, i_k, o_t, o_j, s_t, s_d, m_t, m_k, BT, BK, TMA)


@triton.jit
def _key_rows(kmask, i_b, smb, smt, o_t, m_t, HAS_MASK: tl.constexpr):
    """Rows of a chunk that hold a real (unmasked) key."""
    if HAS_MASK:
        keep = tl.load(kmask + i_b.to(tl.int64) * smb + o_t * smt, mask=m_t, other=0)
        return m_t & (keep != 0)
    else:
        return m_t


@triton.jit
def _dim(X_, BX: tl.constexpr, EXACT: tl.constexpr, A: tl.constexpr):
    """One feature dim: the tile BX itself when EXACT (a constant that folds after inlining, so tile indices and
    masks are compile-time), else the runtime X_ with its alignment A stated as (X_ // A) * A (the feature masks
    then split into A-wide runs, which vector loads need; see ``_slice``)."""
    if EXACT:
        X = BX
    elif A > 1:
        X = (X_ // A) * A
    else:
        X = X_
    return X


@triton.jit
def _dims(D_, DV_, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr, AK: tl.constexpr, AV: tl.constexpr):
    """(D, DV, NK, NV): the feature dims (``_dim``) and their tile counts. EXACT holds two bits, 1: D == BK,
    2: DV == BV (DV = 64 stays a constant next to D = 9)."""
    D = _dim(D_, BK, EXACT & 1, AK)
    DV = _dim(DV_, BV, EXACT & 2, AV)
    return D, DV, tl.cdiv(D, BK), tl.cdiv(DV, BV)


@triton.jit
def _program_tiles(i_kv, i_bh, NV, H, D, DV, BK: tl.constexpr, BV: tl.constexpr):
    """A program's K / V tile indices, batch and head, and the feature indices and masks of its tiles."""
    i_k, i_v = i_kv // NV, i_kv % NV
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    return i_k, i_v, i_bh // H, i_bh % H, o_k, o_v, o_k < D, o_v < DV


@triton.jit
def _split_pid(NKV, NS):
    """1-D grid (no 65535 limits): program -> (K/V tile pair, segment, batch*head) and B*H."""
    pid = tl.program_id(0)
    i_kv = pid % NKV
    i_s = (pid // NKV) % NS
    i_bh = pid // (NKV * NS)
    return i_kv, i_s, i_bh, tl.num_programs(0) // (NKV * NS)


# Arguments that change with T (batch / head strides of [B, H, T, .] tensors, segment counts): never
# specialised, so that a new T reuses the compiled kernel (names absent from a kernel are ignored).
_NOSPEC = ["sqb", "sqh", "skb", "skh", "svb", "svh", "sxb", "sxh", "sdb", "sdh", "sab", "sah", "syb", "syh",
           "swb", "swh", "smb", "shb", "shh", "shn", "szb", "szh", "szn", "T", "CPS", "NS"]


@triton.jit(do_not_specialize=_NOSPEC)
def chunk_state_kernel(y, w, kmask, den, aw, hs, hz,
                       syb, syh, syt, syd, swb, swh, swt, swd, smb, smt,
                       T, CPS, NS, H, GW,
                       D_, DV_, EXACT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_DEN: tl.constexpr, AUG: tl.constexpr,
                       SPLIT: tl.constexpr, AK: tl.constexpr, AV: tl.constexpr, WIN: tl.constexpr):
    """Per-segment state sums: hs[bh, s] = sum_{t in s} y_t^T w_t / den_t  [D, DV] and hz[bh, s] = sum a_t y_t [D].

    Forward states: y = k (key-masked), w = v (head h // GW), a = 1. Reverse (backward) states: y = q, w = do
    scaled by 1/den, a = c. AUG: 0 no hz, 1 a = 1, 2 a = aw[bh, t]. WIN: y through windows (``_kwin``).
    Grid: NK * NV * NS * B * H.
    """
    D, DV, NK, NV = _dims(D_, DV_, BK, BV, EXACT, AK, AV)
    i_kv, i_s, i_bh, BH = _split_pid(NK * NV, NS)
    i_k, i_v, i_b, i_h, o_k, o_v, m_k, m_v = _program_tiles(i_kv, i_bh, NV, H, D, DV, BK, BV)
    o_k, m_k, o_j, c0, lim = _kwin(o_k, m_k, i_h, H, D, WIN)
    y, syt = _kslice(y, i_b, i_h, c0, syb, syh, syt, AK, WIN)
    w, swt = _slice(w, i_b, i_h // GW, swb, swh, swt, AV)
    NT = tl.cdiv(T, BT)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    acc_z = tl.zeros([BK], dtype=tl.float32)
    for n in range(i_s * CPS, tl.minimum(i_s * CPS + CPS, NT)):
        o_t = n * BT + tl.arange(0, BT)
        m_t = o_t < T
        m_y = _key_rows(kmask, i_b, smb, smt, o_t, m_t, HAS_MASK)
        b_y = _getk(y, i_b, i_h, c0, n, i_k, o_t, o_j, lim, syt, syd, m_y, m_k, BT, BK, False, False, WIN)
        b_w = _tile(w, o_t, o_v, swt, swd, m_t, m_v)
        if HAS_DEN:
            inv = 1.0 / tl.load(den + i_bh.to(tl.int64) * T + o_t, mask=m_t, other=1.0)
            acc += _dot_fx(tl.trans(b_y.to(tl.float32) * inv[:, None]), b_w, SPLIT)
        else:
            acc += _dot_xx(tl.trans(b_y), b_w, SPLIT)
        if AUG == 1:
            acc_z += tl.sum(b_y.to(tl.float32), 0)
        elif AUG == 2:
            b_a = tl.load(aw + i_bh.to(tl.int64) * T + o_t, mask=m_t, other=0.0)
            acc_z += tl.sum(b_y.to(tl.float32) * b_a[:, None], 0)
    row = (i_bh.to(tl.int64) * NS + i_s) * D
    tl.store(hs + (row + o_k[:, None]) * DV + o_v[None, :], acc, mask=m_k[:, None] & m_v[None, :])
    if AUG != 0:
        tl.store(hz + row + o_k, acc_z, mask=m_k & (i_v == 0))


@triton.jit(do_not_specialize=_NOSPEC)
def state_scan_kernel(hs, hz, h0, z0, h_out, z_out,
                      shb, shh, shk, shv, szb, szh, szk, NS, H,
                      D_, DV_, EXACT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      REVERSE: tl.constexpr, EXCLUSIVE: tl.constexpr, HAS_H0: tl.constexpr,
                      HAS_Z0: tl.constexpr, AUG: tl.constexpr):
    """Scan of the segment sums of ``chunk_state_kernel``, starting from (h0, z0) (None: zeros).

    EXCLUSIVE (causal): hs[bh, s] is replaced by the state entering segment s, from the left (forward) or from
    the right (REVERSE, backward). Always: h_out / z_out [B, H, D, DV] / [B, H, D] get h0 plus every segment.
    Grid: NK * NV * B * H.
    """
    D, DV, NK, NV = _dims(D_, DV_, BK, BV, EXACT, 1, 1)
    pid = tl.program_id(0)
    i_kv, i_bh = pid % (NK * NV), pid // (NK * NV)
    i_k, i_v, i_b, i_h, o_k, o_v, m_k, m_v = _program_tiles(i_kv, i_bh, NV, H, D, DV, BK, BV)
    m_kv = m_k[:, None] & m_v[None, :]
    run = tl.zeros([BK, BV], dtype=tl.float32)
    run_z = tl.zeros([BK], dtype=tl.float32)
    if HAS_H0:
        run += _tile(h0 + _base(i_b, i_h, shb, shh, 1), o_k, o_v, shk, shv, m_k, m_v)
    if HAS_Z0:
        run_z += tl.load(z0 + _base(i_b, i_h, szb, szh, 1) + o_k * szk, mask=m_k, other=0.0)
    for j in range(0, NS):
        if REVERSE:
            s = NS - 1 - j
        else:
            s = j
        row = (i_bh.to(tl.int64) * NS + s) * D
        p = hs + (row + o_k[:, None]) * DV + o_v[None, :]
        x = tl.load(p, mask=m_kv, other=0.0)
        if EXCLUSIVE:
            tl.store(p, run, mask=m_kv)
        run += x
        if AUG:
            x_z = tl.load(hz + row + o_k, mask=m_k, other=0.0)
            if EXCLUSIVE:
                tl.store(hz + row + o_k, run_z, mask=m_k & (i_v == 0))
            run_z += x_z
    out = i_bh.to(tl.int64) * D
    tl.store(h_out + (out + o_k[:, None]) * DV + o_v[None, :], run, mask=m_kv)
    if AUG:
        tl.store(z_out + out + o_k, run_z, mask=m_k & (i_v == 0))


@triton.jit(do_not_specialize=_NOSPEC)
def fwd_kernel(q, k, v, x, kmask, h0, z0, den, part, dpart, s_out, z_out,
               sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sxb, sxh, sxt, sxd, smb, smt,
               shb, shh, shn, shk, shv, szb, szh, szn, szk,
               T, CPS, NS, H, G, eps,
               D_, DV_, EXACT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_H: tl.constexpr, HAS_Z: tl.constexpr, STORE_FINAL: tl.constexpr, MODE: tl.constexpr,
               SPLIT: tl.constexpr, AK: tl.constexpr, AV: tl.constexpr, TMA: tl.constexpr, WIN: tl.constexpr):
    """Forward over one segment: num_t = q_t S_t (S_t the prefix state, or the total when non-causal), computed
    per chunk as Q S_prev + tril(Q K^T) V, with den_t = q_t . z_t the same way (z next to S, in fp32).
    TMA: q, k, v and x (MODE 0) are TMA descriptors over [B, H, T, dim] (blocks [1, 1, BT, tile]; reads past T or
    the dim are zeros, writes there are dropped): no pointer tensors in registers. WIN: q and k through windows
    (``_kwin``; with TMA their descriptors are over [B, T, H * D]).

    MODE 0 (one K tile): x = o, o = num / (den + eps); den + eps stored to den [B*H, T] fp32.
    MODE 1: num and den partials of this K tile to part [NK, B*H, T, DV] and dpart [NK, B*H, T].
    MODE 2 (backward's c for several tiles): x = do; part [NK*NV, B*H, T] gets the partial of num_t . do_t.
    (h0, z0): the state entering each segment, strided (shn = 0 for one shared state). STORE_FINAL: the last
    segment writes the final state to s_out / z_out. Grid: NK * NV * NS * B * H.
    """
    D, DV, NK, NV = _dims(D_, DV_, BK, BV, EXACT, AK, AV)
    i_kv, i_s, i_bh, BH = _split_pid(NK * NV, NS)
    i_k, i_v, i_b, i_h, o_k, o_v, m_k, m_v = _program_tiles(i_kv, i_bh, NV, H, D, DV, BK, BV)
    o_k, m_k, o_j, c0, lim = _kwin(o_k, m_k, i_h, H, D, WIN)
    if not TMA:
        q, sqt, k, skt, v, svt, x, sxt = _slices(q, k, v, x, i_b, i_h, c0, G, sqb, sqh, sqt, skb, skh, skt,
                                                 svb, svh, svt, sxb, sxh, sxt, AK, AV, WIN)
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    if HAS_H:
        b_S += _tile(h0 + _base(i_b, i_h, shb, shh, 1) + i_s.to(tl.int64) * shn, o_k, o_v, shk, shv, m_k, m_v)
    if NORMALIZE and HAS_Z:
        b_z += tl.load(z0 + _base(i_b, i_h, szb, szh, 1) + i_s.to(tl.int64) * szn + o_k * szk,
                       mask=m_k, other=0.0)
    NT = tl.cdiv(T, BT)
    for n in range(i_s * CPS, tl.minimum(i_s * CPS + CPS, NT)):
        o_t = n * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_q = _getk(q, i_b, i_h, c0, n, i_k, o_t, o_j, lim, sqt, sqd, m_t, m_k, BT, BK, TMA, False, WIN)
        b_num = _dot_xf(b_q, b_S, SPLIT)
        if NORMALIZE:
            b_den = tl.sum(b_q.to(tl.float32) * b_z[None, :], 1)
        if CAUSAL:
            m_key = _key_rows(kmask, i_b, smb, smt, o_t, m_t, HAS_MASK)
            b_k = _getk(k, i_b, i_h, c0, n, i_k, o_t, o_j, lim, skt, skd, m_key, m_k, BT, BK, TMA, HAS_MASK, WIN)
            b_v = _get(v, i_b, i_h // G, n, i_v, o_t, o_v, svt, svd, m_t, m_v, BT, BV, TMA, False)
            b_a = tl.where(o_t[:, None] >= o_t[None, :], _dot_xx(b_q, tl.trans(b_k), SPLIT), 0.0)
            b_num += _dot_fx(b_a, b_v, SPLIT)
            if NORMALIZE:
                b_den += tl.sum(b_a, 1)
                b_z += tl.sum(b_k.to(tl.float32), 0)
            b_S += _dot_xx(tl.trans(b_k), b_v, SPLIT)
        rows = i_bh.to(tl.int64) * T + o_t
        if MODE == 0:
            if NORMALIZE:
                b_den += eps
                b_num = b_num / b_den[:, None]
                tl.store(den + rows, b_den, mask=m_t & (i_v == 0))
            _put(x, b_num, i_b, i_h, n, i_v, o_t, o_v, sxt, sxd, m_t, m_v, BT, BV, TMA)
        elif MODE == 1:
            prow = (i_k.to(tl.int64) * BH) * T + rows
            tl.store(part + prow[:, None] * DV + o_v[None, :], b_num, mask=m_t[:, None] & m_v[None, :])
            if NORMALIZE:
                tl.store(dpart + prow, b_den, mask=m_t & (i_v == 0))
        else:
            b_do = _tile(x, o_t, o_v, sxt, sxd, m_t, m_v)
            prow = (i_kv.to(tl.int64) * BH) * T + rows
            tl.store(part + prow, tl.sum(b_num * b_do.to(tl.float32), 1), mask=m_t)
    if STORE_FINAL:
        out = i_bh.to(tl.int64) * D
        tl.store(s_out + (out + o_k[:, None]) * DV + o_v[None, :], b_S, mask=m_k[:, None] & m_v[None, :])
        if NORMALIZE:
            tl.store(z_out + out + o_k, b_z, mask=m_k & (i_v == 0))


@triton.jit(do_not_specialize=_NOSPEC)
def bwd_dq_kernel(q, k, v, do, kmask, den, cbuf, h0, z0, dq, part,
                  sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                  sxb, sxh, sxt, sxd, smb, smt,
                  shb, shh, shn, shk, shv, szb, szh, szn, szk,
                  T, CPS, NS, H, G,
                  D_, DV_, EXACT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_H: tl.constexpr, HAS_Z: tl.constexpr, FUSE_C: tl.constexpr, DIRECT: tl.constexpr,
                  SPLIT: tl.constexpr, AK: tl.constexpr, AV: tl.constexpr, TMA: tl.constexpr, WIN: tl.constexpr):
    """dq_t = u_t + c_t z_t with u_t = S_t g_t, g_t = do_t / den_t (unnormalized: g = do, no c term).

    Per chunk: U = (DO S_prev^T + tril(DO V^T) K) / den, z_t = z_prev + tril(1) K (fp32, exact products).
    FUSE_C (one K and one V tile): c_t = -(q_t . u_t) / den_t is computed here from the fp32 u and stored to
    cbuf [B*H, T]; otherwise cbuf is read. DIRECT (one V tile): dq is written, else fp32 partials over the V
    tiles to part [NV, B*H, T, D] (the c z_t term only in tile 0). TMA: q, k, v, do and dq are descriptors
    (``_get``). WIN: q, k through windows, dq a pointer (``_getk``, ``_putk``). Grid: NK * NV * NS * B * H.
    """
    D, DV, NK, NV = _dims(D_, DV_, BK, BV, EXACT, AK, AV)
    i_kv, i_s, i_bh, BH = _split_pid(NK * NV, NS)
    i_k, i_v, i_b, i_h, o_k, o_v, m_k, m_v = _program_tiles(i_kv, i_bh, NV, H, D, DV, BK, BV)
    o_k, m_k, o_j, c0, lim = _kwin(o_k, m_k, i_h, H, D, WIN)
    if not TMA:
        q, sqt, k, skt, v, svt, do, sdt = _slices(q, k, v, do, i_b, i_h, c0, G, sqb, sqh, sqt, skb, skh, skt,
                                                  svb, svh, svt, sdb, sdh, sdt, AK, AV, WIN)
    if not TMA or WIN:
        dq, sxt = _kslice(dq, i_b, i_h, c0, sxb, sxh, sxt, AK, WIN)
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    if HAS_H:
        b_S += _tile(h0 + _base(i_b, i_h, shb, shh, 1) + i_s.to(tl.int64) * shn, o_k, o_v, shk, shv, m_k, m_v)
    if NORMALIZE and HAS_Z:
        b_z += tl.load(z0 + _base(i_b, i_h, szb, szh, 1) + i_s.to(tl.int64) * szn + o_k * szk,
                       mask=m_k, other=0.0)
    NT = tl.cdiv(T, BT)
    for n in range(i_s * CPS, tl.minimum(i_s * CPS + CPS, NT)):
        o_t = n * BT + tl.arange(0, BT)
        m_t = o_t < T
        rows = i_bh.to(tl.int64) * T + o_t
        causal = o_t[:, None] >= o_t[None, :]
        b_do = _get(do, i_b, i_h, n, i_v, o_t, o_v, sdt, sdd, m_t, m_v, BT, BV, TMA, False)
        b_u = _dot_xf(b_do, tl.trans(b_S), SPLIT)
        if CAUSAL:
            m_key = _key_rows(kmask, i_b, smb, smt, o_t, m_t, HAS_MASK)
            b_k = _getk(k, i_b, i_h, c0, n, i_k, o_t, o_j, lim, skt, skd, m_key, m_k, BT, BK, TMA, HAS_MASK, WIN)
            b_v = _get(v, i_b, i_h // G, n, i_v, o_t, o_v, svt, svd, m_t, m_v, BT, BV, TMA, False)
            b_a = tl.where(causal, _dot_xx(b_do, tl.trans(b_v), SPLIT), 0.0)
            b_u += _dot_fx(b_a, b_k, SPLIT)
        if NORMALIZE:
            inv = 1.0 / tl.load(den + rows, mask=m_t, other=1.0)
            b_u = b_u * inv[:, None]
            if FUSE_C:
                b_q = _getk(q, i_b, i_h, c0, n, i_k, o_t, o_j, lim, sqt, sqd, m_t, m_k, BT, BK, TMA, False, WIN)
                b_c = -tl.sum(b_q.to(tl.float32) * b_u, 1) * inv
                tl.store(cbuf + rows, b_c, mask=m_t)
            else:
                b_c = tl.load(cbuf + rows, mask=m_t, other=0.0)
            b_c = tl.where(i_v == 0, b_c, 0.0)
            if CAUSAL:
                ones = tl.where(causal, 1.0, 0.0).to(b_k.dtype)
                b_u += b_c[:, None] * (b_z[None, :] + _dot_xx(ones, b_k, SPLIT))
            else:
                b_u += b_c[:, None] * b_z[None, :]
        if CAUSAL:
            b_S += _dot_xx(tl.trans(b_k), b_v, SPLIT)
            if NORMALIZE:
                b_z += tl.sum(b_k.to(tl.float32), 0)
        if DIRECT:
            _putk(dq, b_u, i_b, i_h, n, i_k, o_t, o_j, sxt, sxd, m_t, m_k, BT, BK, TMA, WIN)
        else:
            prow = (i_v.to(tl.int64) * BH) * T + rows
            tl.store(part + prow[:, None] * D + o_k[None, :], b_u, mask=m_t[:, None] & m_k[None, :])


@triton.jit(do_not_specialize=_NOSPEC)
def bwd_dkdv_kernel(q, k, v, do, kmask, den, cbuf, h0, z0, dk, dv, kpart, vpart, s_out, z_out,
                    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                    sxb, sxh, sxt, sxd, sab, sah, sat, sad, smb, smt,
                    shb, shh, shn, shk, shv, szb, szh, szn, szk,
                    T, CPS, NS, H, G,
                    D_, DV_, EXACT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_H: tl.constexpr, HAS_Z: tl.constexpr, STORE_FINAL: tl.constexpr,
                    DK_DIRECT: tl.constexpr, DV_DIRECT: tl.constexpr, SPLIT: tl.constexpr,
                    AK: tl.constexpr, AV: tl.constexpr, TMA: tl.constexpr, WIN: tl.constexpr):
    """dk_s = R_s v_s + r_s (0 for masked keys), dv_s = R_s^T k_s, with the reverse sums
    R_s = dS + sum_{t>=s} q_t^T g_t and r_s = dz + sum_{t>=s} c_t q_t (all t when non-causal).

    Chunks run right to left: dv = K R_next + triu(K Q^T / den) DO, dk = V R_next^T + triu(V DO^T / den + c) Q
    + r_next. (h0, z0): the reverse state entering each segment from the right. dk: direct with one V tile, else
    partials [NV, B*H, T, D]. dv: direct with one K tile and no GQA, else partials [NK * G, B*Hv, T, DV] summed
    over K tiles and the query heads of each value head. STORE_FINAL: segment 0 writes (R_1, r_1) = (dS0, dz0).
    TMA: q, k, v, do, dk and dv are descriptors (``_get``). WIN: q, k through windows, dk a pointer (``_getk``,
    ``_putk``). Grid: NK * NV * NS * B * H.
    """
    D, DV, NK, NV = _dims(D_, DV_, BK, BV, EXACT, AK, AV)
    i_kv, i_s, i_bh, BH = _split_pid(NK * NV, NS)
    i_k, i_v, i_b, i_h, o_k, o_v, m_k, m_v = _program_tiles(i_kv, i_bh, NV, H, D, DV, BK, BV)
    o_k, m_k, o_j, c0, lim = _kwin(o_k, m_k, i_h, H, D, WIN)
    if not TMA:
        q, sqt, k, skt, v, svt, do, sdt = _slices(q, k, v, do, i_b, i_h, c0, G, sqb, sqh, sqt, skb, skh, skt,
                                                  svb, svh, svt, sdb, sdh, sdt, AK, AV, WIN)
        dv, sat = _slice(dv, i_b, i_h // G, sab, sah, sat, AV)
    if not TMA or WIN:
        dk, sxt = _kslice(dk, i_b, i_h, c0, sxb, sxh, sxt, AK, WIN)
    b_R = tl.zeros([BK, BV], dtype=tl.float32)
    b_r = tl.zeros([BK], dtype=tl.float32)
    if HAS_H:
        b_R += _tile(h0 + _base(i_b, i_h, shb, shh, 1) + i_s.to(tl.int64) * shn, o_k, o_v, shk, shv, m_k, m_v)
    if NORMALIZE and HAS_Z:
        b_r += tl.load(z0 + _base(i_b, i_h, szb, szh, 1) + i_s.to(tl.int64) * szn + o_k * szk,
                       mask=m_k, other=0.0)
    NT = tl.cdiv(T, BT)
    n_lo = i_s * CPS
    n_hi = tl.minimum(n_lo + CPS, NT)
    for j in range(0, n_hi - n_lo):
        n = n_hi - 1 - j
        o_t = n * BT + tl.arange(0, BT)
        m_t = o_t < T
        rows = i_bh.to(tl.int64) * T + o_t
        m_key = _key_rows(kmask, i_b, smb, smt, o_t, m_t, HAS_MASK)
        b_q = _getk(q, i_b, i_h, c0, n, i_k, o_t, o_j, lim, sqt, sqd, m_t, m_k, BT, BK, TMA, False, WIN)
        b_k = _getk(k, i_b, i_h, c0, n, i_k, o_t, o_j, lim, skt, skd, m_key, m_k, BT, BK, TMA, HAS_MASK, WIN)
        b_v = _get(v, i_b, i_h // G, n, i_v, o_t, o_v, svt, svd, m_t, m_v, BT, BV, TMA, False)
        b_do = _get(do, i_b, i_h, n, i_v, o_t, o_v, sdt, sdd, m_t, m_v, BT, BV, TMA, False)
        if NORMALIZE:
            inv = 1.0 / tl.load(den + rows, mask=m_t, other=1.0)
            b_c = tl.load(cbuf + rows, mask=m_t, other=0.0)
        r_hi, r_lo = _split(b_R, SPLIT)
        upper = o_t[None, :] >= o_t[:, None]          # [s, t]: query t at or after key s
        # dv = K R_next + triu(K Q^T / den) DO
        b_dv = _dot_xs(b_k, r_hi, r_lo, SPLIT)
        if CAUSAL:
            b_a = _dot_xx(b_k, tl.trans(b_q), SPLIT)
            if NORMALIZE:
                b_a = b_a * inv[None, :]
            b_dv += _dot_fx(tl.where(upper, b_a, 0.0), b_do, SPLIT)
        if DV_DIRECT:
            _put(dv, b_dv, i_b, i_h // G, n, i_v, o_t, o_v, sat, sad, m_t, m_v, BT, BV, TMA)
        else:
            # vpart[i_k * G + h % G, b * Hv + h // G]: one slot per (K tile, query head of the group), no races
            prow = ((i_k * G + i_h % G).to(tl.int64) * (BH // G) + i_b * (H // G) + i_h // G) * T + o_t
            tl.store(vpart + prow[:, None] * DV + o_v[None, :], b_dv, mask=m_t[:, None] & m_v[None, :])
        # dk = V R_next^T + triu(V DO^T / den + c) Q + r_next, zero for masked keys
        b_dk = _dot_xs(b_v, tl.trans(r_hi), tl.trans(r_lo), SPLIT)
        if CAUSAL:
            b_b = _dot_xx(b_v, tl.trans(b_do), SPLIT)
            if NORMALIZE:
                b_b = b_b * inv[None, :] + tl.where(i_v == 0, b_c, 0.0)[None, :]
            b_dk += _dot_fx(tl.where(upper, b_b, 0.0), b_q, SPLIT)
        if NORMALIZE:
            b_dk += tl.where(i_v == 0, b_r, 0.0)[None, :]
        b_dk = tl.where(m_key[:, None], b_dk, 0.0)
        if DK_DIRECT:
            _putk(dk, b_dk, i_b, i_h, n, i_k, o_t, o_j, sxt, sxd, m_t, m_k, BT, BK, TMA, WIN)
        else:
            prow = (i_v.to(tl.int64) * BH) * T + rows
            tl.store(kpart + prow[:, None] * D + o_k[None, :], b_dk, mask=m_t[:, None] & m_k[None, :])
        if CAUSAL:
            if NORMALIZE:
                # (Q / den)^T DO: the fp32 side as the left operand (Triton 3.6 miscompiled Q^T (DO / den) here)
                b_R += _dot_fx(tl.trans(b_q.to(tl.float32) * inv[:, None]), b_do, SPLIT)
                b_r += tl.sum(b_q.to(tl.float32) * b_c[:, None], 0)
            else:
                b_R += _dot_xx(tl.trans(b_q), b_do, SPLIT)
    if STORE_FINAL:
        out = i_bh.to(tl.int64) * D
        tl.store(s_out + (out + o_k[:, None]) * DV + o_v[None, :], b_R, mask=m_k[:, None] & m_v[None, :])
        if NORMALIZE:
            tl.store(z_out + out + o_k, b_r, mask=m_k & (i_v == 0))


@triton.jit(do_not_specialize=["T", "sob", "soh"])
def sum_partials_kernel(part, dpart, out, den, P, T, H, sob, soh, sot, sod, eps,
                        X, BT: tl.constexpr, BX: tl.constexpr, HAS_DEN: tl.constexpr):
    """out[b, h, t, :] = sum_p part[p, b*H + h, t, :] (fp32 partials [P, B*H, T, X]), cast to out's dtype.

    HAS_DEN (forward output): also divides by den = sum_p dpart[p, bh, t] + eps and stores den [B*H, T].
    Grid: (cdiv(T, BT), cdiv(X, BX), B*H).
    """
    i_t, i_x, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BH = tl.num_programs(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_x = i_x * BX + tl.arange(0, BX)
    m_t, m_x = o_t < T, o_x < X
    m = m_t[:, None] & m_x[None, :]
    rows = i_bh.to(tl.int64) * T + o_t
    acc = tl.zeros([BT, BX], dtype=tl.float32)
    acc_d = tl.zeros([BT], dtype=tl.float32)
    for p in range(0, P):
        prow = p * BH * T + rows
        acc += tl.load(part + prow[:, None] * X + o_x[None, :], mask=m, other=0.0)
        if HAS_DEN:
            acc_d += tl.load(dpart + prow, mask=m_t, other=0.0)
    if HAS_DEN:
        acc_d += eps
        acc = acc / acc_d[:, None]
        tl.store(den + rows, acc_d, mask=m_t & (i_x == 0))
    out += _base(i_bh // H, i_bh % H, sob, soh, 1)
    tl.store(out + o_t[:, None] * sot + o_x[None, :] * sod, acc.to(out.dtype.element_ty), mask=m)


@triton.jit
def step_kernel(q, k, v, S, z, o, sqb, sqh, sqd, skb, skh, skd, svb, svh, svd,
                sSb, sSh, sSk, sSv, szb, szh, szk, sob, soh, sod, H, G, eps,
                D, DV, BK: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr):
    """One decode token for one (b, h): S += k^T v, z += k (fp32, in place), o = q S / (q . z + eps).

    One program owns the whole [D, DV] state of its (b, h), so z is updated and read without races.
    Grid: B * H.
    """
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    q += _base(i_b, i_h, sqb, sqh, 1)
    k += _base(i_b, i_h, skb, skh, 1)
    v += _base(i_b, i_h // G, svb, svh, 1)
    S += _base(i_b, i_h, sSb, sSh, 1)
    z += _base(i_b, i_h, szb, szh, 1)
    o += _base(i_b, i_h, sob, soh, 1)
    den = 1.0
    if NORMALIZE:
        acc_d = tl.zeros([BK], dtype=tl.float32)
        for k0 in range(0, D, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < D
            b_k = tl.load(k + o_k * skd, mask=m_k, other=0.0).to(tl.float32)
            b_z = tl.load(z + o_k * szk, mask=m_k, other=0.0) + b_k
            tl.store(z + o_k * szk, b_z, mask=m_k)
            acc_d += tl.load(q + o_k * sqd, mask=m_k, other=0.0).to(tl.float32) * b_z
        den = tl.sum(acc_d, 0) + eps
    for v0 in range(0, DV, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < DV
        b_v = tl.load(v + o_v * svd, mask=m_v, other=0.0).to(tl.float32)
        acc = tl.zeros([BV], dtype=tl.float32)
        for k0 in range(0, D, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < D
            b_k = tl.load(k + o_k * skd, mask=m_k, other=0.0).to(tl.float32)
            b_q = tl.load(q + o_k * sqd, mask=m_k, other=0.0).to(tl.float32)
            p = S + o_k[:, None] * sSk + o_v[None, :] * sSv
            m = m_k[:, None] & m_v[None, :]
            b_S = tl.load(p, mask=m, other=0.0) + b_k[:, None] * b_v[None, :]
            tl.store(p, b_S, mask=m)
            acc += tl.sum(b_q[:, None] * b_S, 0)
        tl.store(o + o_v * sod, (acc / den).to(o.dtype.element_ty), mask=m_v)
