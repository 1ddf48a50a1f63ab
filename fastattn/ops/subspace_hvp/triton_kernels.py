"""Triton kernels of the fused GLM subspace Hessian (host side: triton.py): glm_gram_kernel (below) and
glm_tma_kernel (its docstring).

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
def _hi_lo16(t):
    """An fp32 tile as fp16 (hi, lo), hi + lo = t to ~2^-22 relative where t's magnitudes lie within fp16's range
    (the callers scale to at most 2^15 first)."""
    hi = t.to(tl.float16)
    return hi, (t - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _pow2_scale(a, AXIS: tl.constexpr):
    """(sc, inv) powers of two along a's dim 1 - AXIS, exact inverses: sc = 2^(14 - E) for each row's (AXIS 1) or
    column's (AXIS 0) max |a| in [2^E, 2^(E+1)), so a * sc stays below 2^15 (fp16's max is ~2^16); clamped to
    normal fp32 powers for zero or extreme ones."""
    e = (tl.max(tl.abs(a), AXIS).to(tl.int32, bitcast=True) >> 23) & 0xFF
    f = tl.minimum(tl.maximum(268 - e, 1), 253)   # biased exponent of sc: 127 + 14 - (e - 127)
    return (f << 23).to(tl.float32, bitcast=True), ((254 - f) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _split3(a_hi, a_lo, p_hi, p_lo):
    """a p for a = a_hi + a_lo [BM, BK], p = p_hi + p_lo [BK, BS] (bf16 parts), from a zero accumulator, smallest
    product first: the three bf16 products of a k-step (see the module docstring)."""
    t = tl.dot(a_lo, p_hi)
    t = tl.dot(a_hi, p_lo, t)
    return tl.dot(a_hi, p_hi, t)


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
        return acc + _split3(a_hi, a_lo, p_hi, p_lo)
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
def _loss_w(z, Z, Y, rows, mr, loss_scale, LOSS: tl.constexpr, ZPRE: tl.constexpr):
    """(w1, w2) = loss_scale * (loss', loss'') at the margins of the data rows (0 on masked rows): z from the k-loop,
    or with ZPRE read from Z."""
    if ZPRE:
        z = tl.load(Z + rows, mask=mr, other=0.0)
    d1, d2 = _loss_d(z, tl.load(Y + rows, mask=mr, other=0.0), LOSS)
    return tl.where(mr, d1 * loss_scale, 0.0), tl.where(mr, d2 * loss_scale, 0.0)


@triton.jit
def _reg_w(X, cols, mc, lam, REG: tl.constexpr):
    """(w1, w2) = lam * (reg', reg'') at the coordinates cols (0 on masked ones)."""
    d1, d2 = _reg_d(tl.load(X + cols, mask=mc, other=0.0), REG)
    return tl.where(mc, d1 * lam, 0.0), tl.where(mc, d2 * lam, 0.0)


@triton.jit
def _gram(gp, pg, s, Bi, Bj, w1, w2, ci, cj, mi, mj, DIAG: tl.constexpr, PREC: tl.constexpr):
    """Partial slot update of the column tiles (ci, cj): gp[ci, cj] += Bi^T diag(w2) Bj; DIAG (ci == cj) also
    pg[ci] += Bi^T w1. PREC "bf16x3": both factors split into bf16 hi + lo (_split3), which holds fewer registers
    than Triton's tf32x3 (its split goes through fp32 registers); "fp16x3": fp16 parts of the factors' columns
    scaled into fp16's range by powers of two, tf32x3's accuracy. The weights go in as sqrt|w2| on both factors
    (the sign on one), so that the scale of a column comes from rows that count: with w2 on one factor only, a row
    of huge B and ~0 weight sets the other factor's scale and pushes the rows that matter below fp16's range."""
    if PREC == "bf16x3":
        a_hi, a_lo = _hi_lo(tl.trans(Bi * w2[:, None]))
        b_hi, b_lo = _hi_lo(Bj)
        prod = _split3(a_hi, a_lo, b_hi, b_lo)
    elif PREC == "fp16x3":
        rw = tl.sqrt(tl.abs(w2))
        bw = Bi * tl.where(w2 < 0, -rw, rw)[:, None]
        bj = Bj * rw[:, None]
        sa, ia = _pow2_scale(bw, 0)
        sb, ib = _pow2_scale(bj, 0)
        a_hi, a_lo = _hi_lo16(tl.trans(bw * sa[None, :]))
        b_hi, b_lo = _hi_lo16(bj * sb[None, :])
        prod = _split3(a_hi, a_lo, b_hi, b_lo) * (ia[:, None] * ib[None, :])
    else:
        prod = tl.dot(tl.trans(Bi * w2[:, None]), Bj, input_precision=PREC)
    _rmw(gp + ci[:, None] * s + cj[None, :], prod, mi[:, None] & mj[None, :])
    if DIAG:
        _rmw(pg + ci, tl.sum(Bi * w1[:, None], 0), mi)


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
            w1, w2 = _loss_w(z, Z, Y, rows, mr, loss_scale, LOSS, ZPRE)
        else:
            cols = (r - RA) * BM + tl.arange(0, BM)
            mc = cols < n
            Ba = _p_tile(P, cols, ca, mc, ma, sPs, sPn, key, scale, GEN)
            if HAS_B:
                Bb = _p_tile(P, cols, cb, mc, mb, sPs, sPn, key, scale, GEN)
            w1, w2 = _reg_w(X, cols, mc, lam, REG)
        if own_a != 0:
            _gram(gp, pg, s, Ba, Ba, w1, w2, ca, ca, ma, ma, True, PREC)
        if HAS_B:
            _gram(gp, pg, s, Ba, Bb, w1, w2, ca, cb, ma, mb, False, PREC)
            if own_b != 0:
                _gram(gp, pg, s, Bb, Bb, w1, w2, cb, cb, mb, mb, True, PREC)


@triton.jit
def _fadd(x, y):
    """x + y in fp32 through inline PTX, which Triton cannot fold into a dot's accumulator (interpreter:
    triton_gate's compat patch)."""
    return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _ffma(x, y, z):
    """x y + z in fp32 through inline PTX (see _fadd)."""
    return tl.inline_asm_elementwise("fma.rn.f32 $0, $1, $2, $3;", "=r,r,r,r", [x, y, z], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _acc_add(acc, t, inv, FP16: tl.constexpr, OPAQUE: tl.constexpr):
    """acc + t, FP16: t's rows times inv (exact powers of two); OPAQUE: through _fadd / _ffma."""
    if FP16:
        if OPAQUE:
            return _ffma(t, inv[:, None], acc)
        return acc + t * inv[:, None]
    if OPAQUE:
        return _fadd(acc, t)
    return acc + t


@triton.jit
def _tma_split3(a_hi, a_lo, PH_d, PL_d, q: tl.constexpr, BS: tl.constexpr, k0, acc, inv, FP16: tl.constexpr,
                SEQ: tl.constexpr, CHAIN: tl.constexpr, PLO: tl.constexpr):
    """acc + a P[q BS : (q + 1) BS, k0 : k0 + BK]^T, P's hi / lo parts read through the descriptors PH_d, PL_d;
    FP16: a came scaled by 1 / inv per row (_pow2_scale), undone here exactly.
    Chained through one accumulator (_split3), Triton 3.6 gives the dots that feed another dot all warps along M:
    with 64 rows and 8 warps both warpgroups compute the whole tile (sm_90 compile: 20 wgmma a 64-wide k-step where
    12 do the work). SEQ: each product a dot from a constant zero, added to acc on its own by _fadd / _ffma, which
    Triton cannot fold into a chain: each warpgroup takes half the columns (12 wgmma), one product live at a time
    (no spills), but each add waits for its wgmma. CHAIN (no row factor: PARTS): the products chained into acc
    itself (acc + _split3 holds two accumulators: Triton folds only a dot from zero into a chain).
    PLO False: P's lo parts are all zero (P exact in the parts' format up to a factor per row, e.g. a Rademacher
    sketch; the host checked), so the a_hi p_lo product is skipped: two products a step instead of three."""
    p_hi = tl.trans(PH_d.load([q * BS, k0]))
    if CHAIN:
        if PLO:
            acc = tl.dot(a_hi, tl.trans(PL_d.load([q * BS, k0])), tl.dot(a_lo, p_hi, acc))
        else:
            acc = tl.dot(a_lo, p_hi, acc)
        return tl.dot(a_hi, p_hi, acc)
    if SEQ:
        acc = _acc_add(acc, tl.dot(a_lo, p_hi), inv, FP16, True)
        if PLO:
            acc = _acc_add(acc, tl.dot(a_hi, tl.trans(PL_d.load([q * BS, k0]))), inv, FP16, True)
        return _acc_add(acc, tl.dot(a_hi, p_hi), inv, FP16, True)
    if PLO:
        return _acc_add(acc, _split3(a_hi, a_lo, p_hi, tl.trans(PL_d.load([q * BS, k0]))), inv, FP16, False)
    return _acc_add(acc, tl.dot(a_hi, p_hi, tl.dot(a_lo, p_hi)), inv, FP16, False)


@triton.jit
def _cols(q: tl.constexpr, BS: tl.constexpr, s):
    c = q * BS + tl.arange(0, BS)
    return c, c < s


@triton.jit
def _column_tiles(BW, BM: tl.constexpr, BS: tl.constexpr, NQ: tl.constexpr):
    """[BM, NQ BS] (NQ = 1, 2 or 4) as its column tiles [BM, BS], zeros past the NQ-th."""
    t0 = BW
    t1 = tl.zeros((BM, BS), dtype=tl.float32)
    t2 = t1
    t3 = t1
    if NQ == 2:
        t0, t1 = tl.split(tl.permute(tl.reshape(BW, (BM, 2, BS)), (0, 2, 1)))
    elif NQ == 4:   # column j BS + c, j = 2 j1 + j0, as [BM, c, j1, j0]; split j0, then j1
        even, odd = tl.split(tl.permute(tl.reshape(BW, (BM, 2, 2, BS)), (0, 3, 1, 2)))
        t0, t2 = tl.split(even)
        t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def glm_tma_kernel(A_d, AL_d, XP_d, AINV, XINV, PH_d, PL_d, PINV, X, Y, Z, P, GP, PG, m, n, s, RA, R, lam,
                   loss_scale, sPs, sPn, LOSS: tl.constexpr, REG: tl.constexpr, NQ: tl.constexpr, BM: tl.constexpr,
                   BK: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr, ZPRE: tl.constexpr, FP16: tl.constexpr,
                   WIDE: tl.constexpr, SEQ: tl.constexpr, ZACC: tl.constexpr, PARTS: tl.constexpr,
                   PLO: tl.constexpr):
    """glm_gram_kernel's blocks for s <= 4 BS with P given, A P^T as three tensor-core products of hi / lo parts, one
    program per block: B = [B0 | B1 | B2 | B3] (NQ column tiles of BS, each its own accumulator; all pairs i <= j
    of tiles in the epilogue). A [m, n] fp32 and P's parts [s, n] arrive through TMA descriptors (blocks [BM, BK],
    [BS, BK]; rows / columns past the ends read as zeros), so no pointer tensors hold registers.
    Parts: bf16 (SPLIT3 of glm_gram_kernel, ~2^-18 relative), or FP16: fp16 hi + lo hold 22 bits (~2^-22, as
    tf32x3) at bf16's speed, within fp16's range by powers of two: each A tile's rows scaled by _pow2_scale (undone
    on the k-step's sum), P's rows on the host (PH_d, PL_d hold P * 2^k per row; PINV [s] the inverse factors,
    applied to B's columns after the k-loop). The regulariser blocks read P (fp32) as glm_gram_kernel does.
    WIDE (NQ = 1, 2 or 4): the k-loop keeps B as one [BM, NQ BS] accumulator (one wider dot a product, the P
    descriptors' blocks [NQ BS, BK]) and splits it into the tiles after the loop. SEQ: _tma_split3.
    ZACC (without ZPRE): z = A x summed elementwise over the k-loop ([BM, BK] partial sums) and across the row once
    after it, so the loop has no cross-thread sums for z.
    PARTS (FP16 and WIDE): A arrives prepared as fp16 parts of its rows times 2^k_i (A_d: hi, AL_d: lo, AINV [m]
    the inverse factors, one per row for all of n), so a k-step is three chained tensor-core products with no work
    in registers; z = A x comes from two [BM, 16] products with x's parts (XP_d [16, n]: rows hi, lo of x 2^k,
    the rest zero; XINV [1] = 2^-k). PLO False: P's lo parts are zero, two products a k-step (_tma_split3)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    gp = GP + pid.to(tl.int64) * s * s
    pg = PG + pid.to(tl.int64) * s
    c0, m0 = _cols(0, BS, s)   # B's column tiles: indices into P's rows and the results, and their masks
    c1, m1 = _cols(1, BS, s)
    c2, m2 = _cols(2, BS, s)
    c3, m3 = _cols(3, BS, s)
    for r in range(pid, R, G):
        B0 = tl.zeros((BM, BS), dtype=tl.float32)
        B1 = tl.zeros((BM, BS), dtype=tl.float32)
        B2 = tl.zeros((BM, BS), dtype=tl.float32)
        B3 = tl.zeros((BM, BS), dtype=tl.float32)
        if r < RA:
            z = tl.zeros((BM,), dtype=tl.float32)
            zt = tl.zeros((BM, BK if ZACC else 16), dtype=tl.float32)   # z's terms, when ZACC or PARTS
            BW = tl.zeros((BM, NQ * BS if WIDE else 16), dtype=tl.float32)   # B, when WIDE (a placeholder otherwise)
            for k0 in range(0, n, BK):
                if PARTS:
                    a_hi = A_d.load([r * BM, k0])
                    a_lo = AL_d.load([r * BM, k0])
                    BW = _tma_split3(a_hi, a_lo, PH_d, PL_d, 0, NQ * BS, k0, BW, z, False, SEQ, not SEQ, PLO)
                    if not ZPRE:
                        xp = tl.trans(XP_d.load([0, k0]))
                        zt = tl.dot(a_lo, xp, tl.dot(a_hi, xp, zt))   # columns: (a_hi + a_lo) x_hi, (..) x_lo
                else:
                    a = A_d.load([r * BM, k0])
                    if not ZPRE:
                        ks = k0 + tl.arange(0, BK)
                        ax = a * tl.load(X + ks, mask=ks < n, other=0.0)[None, :]
                        if ZACC:
                            zt += ax
                        else:
                            z += tl.sum(ax, 1)
                    if FP16:
                        sc, inv = _pow2_scale(a, 1)
                        a_hi, a_lo = _hi_lo16(a * sc[:, None])
                    else:
                        inv = z   # unused without FP16
                        a_hi, a_lo = _hi_lo(a)
                    if WIDE:
                        BW = _tma_split3(a_hi, a_lo, PH_d, PL_d, 0, NQ * BS, k0, BW, inv, FP16, SEQ, False, PLO)
                    else:
                        B0 = _tma_split3(a_hi, a_lo, PH_d, PL_d, 0, BS, k0, B0, inv, FP16, SEQ, False, PLO)
                        if NQ > 1:
                            B1 = _tma_split3(a_hi, a_lo, PH_d, PL_d, 1, BS, k0, B1, inv, FP16, SEQ, False, PLO)
                        if NQ > 2:
                            B2 = _tma_split3(a_hi, a_lo, PH_d, PL_d, 2, BS, k0, B2, inv, FP16, SEQ, False, PLO)
                        if NQ > 3:
                            B3 = _tma_split3(a_hi, a_lo, PH_d, PL_d, 3, BS, k0, B3, inv, FP16, SEQ, False, PLO)
            rows = r * BM + tl.arange(0, BM)
            mr = rows < m
            if ZACC:
                z = tl.sum(zt, 1)
            if PARTS:
                ainv = tl.load(AINV + rows, mask=mr, other=0.0)
                BW = BW * ainv[:, None]
                z = tl.sum(zt, 1) * ainv * tl.load(XINV)
            if WIDE:
                B0, B1, B2, B3 = _column_tiles(BW, BM, BS, NQ)
            if FP16:
                B0 = B0 * tl.load(PINV + c0, mask=m0, other=0.0)[None, :]
                B1 = B1 * tl.load(PINV + c1, mask=m1, other=0.0)[None, :]
                B2 = B2 * tl.load(PINV + c2, mask=m2, other=0.0)[None, :]
                B3 = B3 * tl.load(PINV + c3, mask=m3, other=0.0)[None, :]
            w1, w2 = _loss_w(z, Z, Y, rows, mr, loss_scale, LOSS, ZPRE)
        else:
            cols = (r - RA) * BM + tl.arange(0, BM)
            mc = cols < n
            B0 = _p_tile(P, cols, c0, mc, m0, sPs, sPn, 0, 1.0, 0)
            if NQ > 1:
                B1 = _p_tile(P, cols, c1, mc, m1, sPs, sPn, 0, 1.0, 0)
            if NQ > 2:
                B2 = _p_tile(P, cols, c2, mc, m2, sPs, sPn, 0, 1.0, 0)
            if NQ > 3:
                B3 = _p_tile(P, cols, c3, mc, m3, sPs, sPn, 0, 1.0, 0)
            w1, w2 = _reg_w(X, cols, mc, lam, REG)
        _gram(gp, pg, s, B0, B0, w1, w2, c0, c0, m0, m0, True, PREC)   # row by row: B0 dies first, then B1, ...
        if NQ > 1:
            _gram(gp, pg, s, B0, B1, w1, w2, c0, c1, m0, m1, False, PREC)
        if NQ > 2:
            _gram(gp, pg, s, B0, B2, w1, w2, c0, c2, m0, m2, False, PREC)
        if NQ > 3:
            _gram(gp, pg, s, B0, B3, w1, w2, c0, c3, m0, m3, False, PREC)
        if NQ > 1:
            _gram(gp, pg, s, B1, B1, w1, w2, c1, c1, m1, m1, True, PREC)
        if NQ > 2:
            _gram(gp, pg, s, B1, B2, w1, w2, c1, c2, m1, m2, False, PREC)
            _gram(gp, pg, s, B2, B2, w1, w2, c2, c2, m2, m2, True, PREC)
        if NQ > 3:
            _gram(gp, pg, s, B1, B3, w1, w2, c1, c3, m1, m3, False, PREC)
            _gram(gp, pg, s, B2, B3, w1, w2, c2, c3, m2, m3, False, PREC)
            _gram(gp, pg, s, B3, B3, w1, w2, c3, c3, m3, m3, True, PREC)
