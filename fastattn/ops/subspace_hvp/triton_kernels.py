"""Triton kernel of the fused GLM subspace Hessian (host side: triton.py).

One program owns a partial slot (GP [G, s, s], PG [G, s]) and walks the blocks r = pid, pid + G, ... of
  data blocks  r <  RA: rows i of A;     B tile = A[rows] P^T (k-loop over n), z = A[rows] x, w = loss''(z; y)
  reg blocks   r >= RA: coordinates j;   B tile = P[:, cols]^T (rows of the identity), z = x[cols], w = reg''(z)
and adds B^T diag(w) B and B^T loss' (reg') for the column tiles (ta, tb) of its pair into its slot. The B tiles
stay in registers: A P^T is never written to memory. P tiles are loaded, or generated from the seed key with the
hash of sketch.py (GEN = 1 gaussian, 2 rademacher). Dots accumulate in fp32 at PREC ("tf32x3" keeps fp32
accuracy on tensor cores). ZPRE: the margins z = A x come precomputed in Z instead of from the k-loop.

SPLIT3 (the "bf16x3" precision of triton.py) computes A P^T on bf16 tensor cores instead: each fp32 operand x is
split into hi = bf16(x) and lo = bf16(x - hi), which hold ~16 of its 24 bits, and a P^T = a_lo p_hi + a_hi p_lo +
a_hi p_hi, every product exact in the fp32 accumulator; the dropped a_lo p_lo is ~2^-18 of a p. The three products
of a k-step start from zero (smallest first) and are added to the block's sum in an ordinary fp32 add: chaining
thousands of tensor-core accumulations (whose additions truncate) biased an earlier split to ~2e-4
(bench/results/subspace_hvp_h100_split.md). With a P tensor its hi and lo parts come split from the host (PH, PL,
strides sHs, sHn; the regulariser blocks read P itself). The s x s products B^T W B stay at PREC.
"""
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _p_tile(P, ks, prow, mk, mp, sPs, sPn, key, scale, GEN: tl.constexpr):
    """[len(ks), len(prow)] tile with element (a, b) = P[prow[b], ks[a]] (0 outside the masks)."""
    mask = mk[:, None] & mp[None, :]
    if GEN == 0:
        t = tl.load(P + prow[None, :] * sPs + ks[:, None] * sPn, mask=mask, other=0.0)
    else:
        rk = _mix32((prow + key).to(tl.uint32))
        h1 = _mix32(ks[:, None].to(tl.uint32) ^ rk[None, :])
        if GEN == 1:
            h2 = _mix32(h1 ^ 0x85EBCA6B)
            u1 = ((h1 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
            u2 = (h2 >> 8).to(tl.float32) * 5.9604644775390625e-08
            t = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
        else:
            t = 1.0 - 2.0 * (h1 >> 31).to(tl.float32)
        t = tl.where(mask, t * scale, 0.0)
    return t


@triton.jit
def _hi_lo(t):
    """An fp32 tile as bf16 (hi, lo) with hi + lo = t to ~2^-17 relative."""
    hi = t.to(tl.bfloat16)
    return hi, (t - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _ap_step(a_hi, a_lo, P, PH, PL, ks, prow, mk, mp, sPs, sPn, sHs, sHn, key, scale, acc,
             GEN: tl.constexpr, PREC: tl.constexpr, SPLIT3: tl.constexpr):
    """acc + a @ P[prow, ks]^T for an A tile [BM, BK]: SPLIT3, a = a_hi + a_lo (see the module docstring); else
    a = a_hi in fp32 (a_lo unused)."""
    if SPLIT3:
        if GEN == 0:
            mask = mk[:, None] & mp[None, :]
            offs = prow[None, :] * sHs + ks[:, None] * sHn
            p_hi = tl.load(PH + offs, mask=mask, other=0.0)
            p_lo = tl.load(PL + offs, mask=mask, other=0.0)
        else:
            p_hi, p_lo = _hi_lo(_p_tile(P, ks, prow, mk, mp, sPs, sPn, key, scale, GEN))
        t = tl.dot(a_lo, p_hi)
        t = tl.dot(a_hi, p_lo, t)
        t = tl.dot(a_hi, p_hi, t)
        return acc + t
    else:
        return tl.dot(a_hi, _p_tile(P, ks, prow, mk, mp, sPs, sPn, key, scale, GEN), acc, input_precision=PREC)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _loss_d(z, y, LOSS: tl.constexpr):
    """(loss', loss'') of glm.LOSSES by code: 0 squared, 1 logistic, 2 sigmoid_mse."""
    if LOSS == 0:
        d1 = z - y
        d2 = z * 0.0 + 1.0
    elif LOSS == 1:
        sg = _sigmoid(z)
        d1 = sg - y
        d2 = sg * (1.0 - sg)
    else:
        sg = _sigmoid(z)
        q = sg * (1.0 - sg)
        d1 = (sg - y) * q
        d2 = q * (q + (sg - y) * (1.0 - 2.0 * sg))
    return d1, d2


@triton.jit
def _reg_d(x, REG: tl.constexpr):
    """(reg', reg'') of glm.REGULARISERS by code: 0 none, 1 l2, 2 nonconvex."""
    if REG == 0:
        d1 = x * 0.0
        d2 = x * 0.0
    elif REG == 1:
        d1 = x
        d2 = x * 0.0 + 1.0
    else:
        q = 1.0 + x * x
        d1 = 2.0 * x / (q * q)
        d2 = (2.0 - 6.0 * x * x) / (q * q * q)
    return d1, d2


@triton.jit
def _rmw(ptr, val, mask):
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + val, mask=mask)


@triton.jit
def glm_gram_kernel(A, X, Y, Z, P, PH, PL, GP, PG, PAIRS, m, n, s, RA, R, key, scale, lam, loss_scale,
                    sAm, sAn, sPs, sPn, sHs, sHn,
                    LOSS: tl.constexpr, REG: tl.constexpr, GEN: tl.constexpr, HAS_B: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr, ZPRE: tl.constexpr,
                    SPLIT3: tl.constexpr):
    pid = tl.program_id(0)
    pp = tl.program_id(1)
    G = tl.num_programs(0)
    ta = tl.load(PAIRS + pp * 4)
    tb = tl.load(PAIRS + pp * 4 + 1)
    own_a = tl.load(PAIRS + pp * 4 + 2)
    own_b = tl.load(PAIRS + pp * 4 + 3)
    ca = ta * BS + tl.arange(0, BS)
    cb = tb * BS + tl.arange(0, BS)
    ma = ca < s
    mb = cb < s
    gp = GP + pid.to(tl.int64) * s * s
    pg = PG + pid.to(tl.int64) * s
    for r in range(pid, R, G):
        Ba = tl.zeros((BM, BS), dtype=tl.float32)
        Bb = tl.zeros((BM, BS), dtype=tl.float32)
        if r < RA:
            rows = r * BM + tl.arange(0, BM)
            mr = rows < m
            z = tl.zeros((BM,), dtype=tl.float32)
            for k0 in range(0, n, BK):
                ks = k0 + tl.arange(0, BK)
                mk = ks < n
                a = tl.load(A + rows[:, None].to(tl.int64) * sAm + ks[None, :] * sAn,
                            mask=mr[:, None] & mk[None, :], other=0.0)
                if not ZPRE:
                    z += tl.sum(a * tl.load(X + ks, mask=mk, other=0.0)[None, :], 1)
                if SPLIT3:   # once for both column tiles
                    a_hi, a_lo = _hi_lo(a)
                else:
                    a_hi, a_lo = a, a
                Ba = _ap_step(a_hi, a_lo, P, PH, PL, ks, ca, mk, ma, sPs, sPn, sHs, sHn, key, scale, Ba, GEN, PREC,
                              SPLIT3)
                if HAS_B:
                    Bb = _ap_step(a_hi, a_lo, P, PH, PL, ks, cb, mk, mb, sPs, sPn, sHs, sHn, key, scale, Bb, GEN,
                                  PREC, SPLIT3)
            if ZPRE:
                z = tl.load(Z + rows, mask=mr, other=0.0)
            d1, d2 = _loss_d(z, tl.load(Y + rows, mask=mr, other=0.0), LOSS)
            d1 = tl.where(mr, d1 * loss_scale, 0.0)
            d2 = tl.where(mr, d2 * loss_scale, 0.0)
        else:
            cols = (r - RA) * BM + tl.arange(0, BM)
            mc = cols < n
            Ba = _p_tile(P, cols, ca, mc, ma, sPs, sPn, key, scale, GEN)
            if HAS_B:
                Bb = _p_tile(P, cols, cb, mc, mb, sPs, sPn, key, scale, GEN)
            d1, d2 = _reg_d(tl.load(X + cols, mask=mc, other=0.0), REG)
            d1 = tl.where(mc, d1 * lam, 0.0)
            d2 = tl.where(mc, d2 * lam, 0.0)
        Bw = Ba * d2[:, None]
        if own_a != 0:
            _rmw(gp + ca[:, None] * s + ca[None, :], tl.dot(tl.trans(Bw), Ba, input_precision=PREC),
                 ma[:, None] & ma[None, :])
            _rmw(pg + ca, tl.sum(Ba * d1[:, None], 0), ma)
        if HAS_B:
            _rmw(gp + ca[:, None] * s + cb[None, :], tl.dot(tl.trans(Bw), Bb, input_precision=PREC),
                 ma[:, None] & mb[None, :])
            if own_b != 0:
                _rmw(gp + cb[:, None] * s + cb[None, :],
                     tl.dot(tl.trans(Bb * d2[:, None]), Bb, input_precision=PREC), mb[:, None] & mb[None, :])
                _rmw(pg + cb, tl.sum(Bb * d1[:, None], 0), mb)
