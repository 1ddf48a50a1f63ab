"""Triton backend of the GLM subspace Hessian: host launchers of ``triton_kernels.glm_gram_kernel`` and
``glm_tma_kernel``.

glm_gram_kernel: column tiles of BS <= 128 columns of B = A P^T; s <= 256 is one program per block (one or two
tiles, no redundant work); larger s runs the pairs (a < b) of tiles, recomputing each tile once per partner.
glm_tma_kernel (bf16x3 / fp16x3 with P given, s <= 256, sm_90+): up to four 64-wide tiles per block, operands
through TMA descriptors, the three split products added one by one (seq). Each of G <= #SM programs accumulates
into its own partial slot, summed here in a fixed order: results are deterministic.
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch import Tensor

from ..triton_gate import import_kernels, tma_descriptor, tma_ready, triton_gate
from .sketch import seed_key

triton, _k, _IMPORT_ERROR = import_kernels(__package__)

BK = 32
MAX_BS = 128
# How A P^T is multiplied: "tf32x3" (fp32 accuracy on tensor cores), "ieee" (CUDA cores), "tf32" (fast, ~1e-3),
# "bf16x3" (A and P split into bf16 hi + lo parts, three bf16 tensor-core products a k-step, triton_kernels.py), or
# "fp16x3" (the same on fp16 hi + lo parts: 22 bits, tf32x3's accuracy at bf16's tensor-core rate, kept in fp16's
# range by powers of two per row; glm_tma_kernel only, tf32x3 through glm_gram_kernel where it cannot serve).
# H100, m = n = 16384, s = 256 (bench/results/subspace_hvp_h100_seq.md): fp16x3 1.95 ms (rel. error 4.5e-7 PHPt,
# 5.3e-7 Pg), bf16x3 1.88 ms (1.4e-6, 4.3e-6), tf32x3 3.51 ms (8.4e-7, 3.4e-7), unfused fp32 torch 3.31 ms.
# fp16x3 is the default: bf16x3's P g error is 8x larger, and P g's sum cancels as the gradient vanishes, which is
# where a trust-region method ends.
INPUT_PRECISION = "fp16x3"
SPLITS = ("bf16x3", "fp16x3")   # the precisions computed as three products of hi / lo parts
PRECISIONS = ("tf32x3", "ieee", "tf32", *SPLITS)


@contextlib.contextmanager
def input_precision(prec: str):
    """INPUT_PRECISION set to ``prec`` inside the block (benchmarks and tests), restored after."""
    global INPUT_PRECISION
    if prec not in PRECISIONS:
        raise ValueError(f"input precision must be one of {PRECISIONS}, got {prec!r}")
    old, INPUT_PRECISION = INPUT_PRECISION, prec
    try:
        yield
    finally:
        INPUT_PRECISION = old


STAGES = (3, 2, 1)             # software-pipelining depths tried in order (fewer when shared memory runs out)
# Tuning hook (bench/subspace_hvp.py --sweep): any of BM, BK, warps, stages, zpre (margins by a separate GEMV).
CONFIG_OVERRIDE: dict = {}


def supports(A: Tensor, x: Tensor, *rest: Tensor) -> tuple[bool, str]:
    ok, why = triton_gate(A, _IMPORT_ERROR)
    if not ok:
        return ok, why
    if A.dtype != torch.float32:
        return False, f"dtype {A.dtype}: the Triton GLM kernel takes float32 (fp64 goes to torch / cpu)"
    return True, ""


def _tile(s: int) -> int:
    return min(MAX_BS, max(16, triton.next_power_of_2(s)))


@functools.lru_cache(maxsize=None)
def _pairs(NT: int, device: torch.device) -> Tensor:
    """[npairs, 4] int32 rows (ta, tb, owns diagonal/Pg tile ta, owns tb); every (a <= b) block once."""
    if NT == 1:
        rows = [(0, 0, 1, 0)]
    else:
        rows = [(a, b, int(b == a + 1), int(a == NT - 2 and b == NT - 1)) for a in range(NT) for b in range(a + 1, NT)]
    return torch.tensor(rows, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4   # interpreter runs: a few programs, so the grid-stride loop is exercised


def _block_rows(m: int, sms: int, cap64: bool = False) -> int:
    """128-row blocks when they still give (nearly) every SM one, unless ``cap64``; else 64-row blocks, halved
    (down to 16) while there are fewer data blocks than SMs (tall-skinny A).

    cap64 for the TMA kernel (at 128 rows its k-loop spills in a local sm_90 compile, at 64 with 8 warps it does
    not: bench/sm90_compile.py --op glm --precision bf16x3 --override BM=128) and for a generated P, which at 128
    rows needs 320 KB of shared memory at every stage depth
    (bench/sm90_compile.py --op glm --override BM=128 --stages 3,2,1), more than an H100 or H200 has, so each
    would be compiled and fail before the fallback; on an H100 (m = n = 16384, s = 256) its first call did not
    finish within ~100 s, twice (bench/results/subspace_hvp_h100_bf16x3.md)."""
    if not cap64 and triton.cdiv(m, 128) >= sms * 3 // 4:
        return 128
    bm = 64
    while bm > 16 and triton.cdiv(m, bm) < sms:
        bm //= 2
    return bm


# 128-row blocks: two warpgroups of 64 rows (Hopper's wgmma tile), a 64-wide k step (three stages run out of shared
# memory, so STAGES falls back to two), margins by a separate GEMV. H200, m = n = 16384, s = 256: 3.49 ms against
# 4.99 for the 64-row default (bench/results/subspace_hvp_h200_sweep.md).
_BLOCK_DEFAULTS = {128: dict(BK=64, zpre=True)}
# bf16x3 on top: a 32-wide k step (it spilled least in a local sm_90 compile; 192 KB of shared memory at 128 rows,
# as tf32x3). Not swept on a GPU yet: bench/subspace_hvp.py --sweep --sweep-precision bf16x3 is to choose.
_SPLIT3_DEFAULTS = dict(BK=32)


_stage_choice: dict[tuple, int] = {}


def _hi_lo(P: Tensor, fp16: bool = False, flat_rows: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """fp32 P [s, n] as (hi, lo) [s, n] bf16 parts, hi + lo = P to ~2^-18 relative (the kernels' SPLIT3 operands),
    and None; or, ``fp16``, fp16 parts of P's rows times 2^k_j (the row max in [2^14, 2^15)), to ~2^-22, and the
    inverse factors 2^-k_j [s]. ``flat_rows`` (fp16): a row whose entries share one magnitude c (a Rademacher
    sketch's, whatever its scale) becomes +-2^14 with the inverse factor c 2^-14, exactly, so its lo part is zero.
    Rows start at multiples of 8 elements (16 bytes, as TMA descriptors need), the padding zero."""
    s, n = P.shape
    inv = None
    if fp16:
        amax = P.abs().amax(1)
        k = (15 - torch.frexp(amax).exponent).clamp(-126, 126)   # frexp: max in [2^(e-1), 2^e)
        inv = torch.ldexp(torch.ones_like(P[:, 0]), -k.float())
        if flat_rows:
            flat = (P.abs().amin(1) == amax) & (amax > 0)
            P = torch.where(flat[:, None], torch.sign(P) * 2.0 ** 14, torch.ldexp(P, k[:, None].float()))
            inv = torch.where(flat, amax * 2.0 ** -14, inv)
        else:
            P = torch.ldexp(P, k[:, None].float())
    hi, lo = torch.zeros(2, s, -(-n // 8) * 8, dtype=torch.float16 if fp16 else torch.bfloat16,
                         device=P.device)[:, :, :n]
    hi.copy_(P)
    lo.copy_(P - hi.float())
    return hi, lo, inv


# The TMA kernel (glm_tma_kernel): P given, bf16x3 or fp16x3, s <= 4 x 64, on sm_90+ (or the interpreter), A with
# 16-byte aligned rows. 64-row blocks, 8 warps, BK 64 at 2 stages (152 KB of shared memory), its B^T W B at the
# k-loop's split; B in one accumulator ("wide") with 1, 2 or 4 column tiles of 64, else one per tile. Local sm_90
# compile (bench/sm90_compile.py --op glm --precision bf16x3 [--override wide=0 | tma=0 --stages 2]), a k-loop
# step: wide 558 instructions, 0 spill stores, 4 spill loads, 20 wgmma over 64 of k (fp16x3: 565); a dot per tile
# 952 instructions, 0 / 5, 80 wgmma; glm_gram_kernel's 128-row loop 585 instructions, 105 / 115, 12 wgmma over
# 32 of k. "seq" (the default; CONFIG_OVERRIDE seq=False turns it off): each product a dot from a constant
# zero, added by inline PTX, so no dot feeds another (a chain gives both warpgroups the whole tile): 573
# instructions, 0 / 5, 12 wgmma. H100, fp16x3 (bench/results/subspace_hvp_h100_seq.md): 1.94 ms with seq, 2.63
# without; a dot per tile 2.04 / 2.88; BK 32 at 3 stages 2.24 / 3.35; 128 rows (BK 32, 3 stages) 2.15 without.
# Option "zacc" (off until timed): z = A x reduced across the row once after the k-loop instead of every step
# (local sm_90 compile: 546 instructions a step against 582 at fp16x3, SHFL 32 -> 16, no new spills).
TMA_BS = 64
_TMA_DEFAULTS = dict(BK=64, seq=True)
# PARTS (A_PARTS, or CONFIG_OVERRIDE["parts"]; off until timed on a GPU): glm_tma_kernel reads A's fp16 parts,
# made once per A (a_parts) and kept (A's size again in memory); a k-step is then three chained products straight
# from shared memory, at 128-row blocks (no warpgroup duplication at 128 rows). Local sm_90 compile (fp16x3,
# bench/sm90_compile.py --op glm --precision fp16x3 --override parts=1): the k-loop 271 instructions a 64-wide
# step, no spills, 20 wgmma (12 products + z's 8 small ones), against 582 with the split in the loop.
A_PARTS = False
_PARTS_DEFAULTS = dict(seq=False)
TMA_STAGES = (2, 1)   # three stages of BK 64 need 250 KB


def _tma_serves(A: Tensor, P: Tensor | None, s: int) -> bool:
    """Whether glm_tma_kernel takes this call (see TMA_BS); CONFIG_OVERRIDE["tma"] = False turns it off."""
    return bool(INPUT_PRECISION in SPLITS and P is not None and s <= 4 * TMA_BS and A.numel() > 0
                and CONFIG_OVERRIDE.get("tma", True) and tma_ready(A))


def glm(A: Tensor, x: Tensor, y: Tensor, P: Tensor | None, s: int, sketch: int, seed: int, scale: float,
        loss: int, reg: int, lam: float, loss_scale: float) -> tuple[Tensor, Tensor]:
    """A [m, n], x [n], y [m] fp32; P [s, n] or None (generated from ``seed``) -> (Pg [s], PHPt [s, s]) fp32."""
    m = A.shape[0]
    if _tma_serves(A, P, s):
        parts = _parts_serve(s)
        BM = CONFIG_OVERRIDE.get("BM", _block_rows(m, _num_sms(A.device), cap64=not parts))
        try:
            return _glm_tma(A, x, y, P, s, loss, reg, lam, loss_scale, BM, parts)
        except triton.runtime.errors.OutOfResources:
            if CONFIG_OVERRIDE:   # a configuration asked for (bench sweeps, tests) must not change kernels
                raise
            # out of shared memory at every stage depth: glm_gram_kernel at the same precision (tf32x3 for fp16x3)
    BM = CONFIG_OVERRIDE.get("BM", _block_rows(m, _num_sms(A.device), cap64=P is None))
    run = functools.partial(_glm_blocks, A, x, y, P, s, sketch, seed, scale, loss, reg, lam, loss_scale)
    try:
        return run(BM)
    except triton.runtime.errors.OutOfResources:
        # 128-row blocks out of shared memory at every stage depth: 64-row blocks instead, unless the rows were
        # asked for
        if BM <= 64 or "BM" in CONFIG_OVERRIDE:
            raise
        return run(64)


def _glm_blocks(A, x, y, P, s, sketch, seed, scale, loss, reg, lam, loss_scale, BM):
    """glm() with BM-row blocks."""
    m, n = A.shape
    dev = A.device
    BS = _tile(s)
    NT = triton.cdiv(s, BS)
    split3 = INPUT_PRECISION == "bf16x3"
    prec = "tf32x3" if INPUT_PRECISION in SPLITS else INPUT_PRECISION   # fp16x3: TMA kernel only
    cfg = {**_BLOCK_DEFAULTS.get(BM, {}), **(_SPLIT3_DEFAULTS if split3 else {}), **CONFIG_OVERRIDE}
    bk = cfg.get("BK", BK)
    zpre = bool(cfg.get("zpre", False))
    RA, R, GP, PG = _slots(m, n, s, BM, reg, lam, dev)
    pairs = _pairs(NT, dev)
    PH = PL = GP
    if P is not None and split3:   # hi and lo bf16 parts of P, once per call (s x n; A is split in the kernel)
        PH, PL, _ = _hi_lo(P)
    Pt = P if P is not None else GP
    sPs, sPn = (P.stride(0), P.stride(1)) if P is not None else (0, 0)
    z = A @ x if zpre else PG
    args = (A, x, y, z, Pt, PH, PL, GP, PG, pairs, m, n, s, RA, R, seed_key(seed), float(scale), float(lam),
            float(loss_scale), A.stride(0), A.stride(1), sPs, sPn, PH.stride(0), PH.stride(1))
    meta = dict(LOSS=loss, REG=reg, GEN=sketch, HAS_B=NT > 1, BM=BM, BK=bk, BS=BS,
                PREC=prec, ZPRE=zpre, SPLIT3=split3,
                num_warps=cfg.get("warps", 8 if BS >= 128 else 4))
    _launch("glm_gram_kernel", (GP.shape[0], pairs.shape[0]), args, meta, cfg, STAGES)
    return _sum_slots(GP, PG, BS)


def _parts_serve(s: int) -> bool:
    """Whether glm_tma_kernel reads A's prepared parts (PARTS): fp16x3, B one accumulator (s <= 4 TMA_BS columns
    in 1, 2 or 4 tiles), A_PARTS (CONFIG_OVERRIDE["parts"] decides where given)."""
    NQ = triton.cdiv(s, min(TMA_BS, _tile(s)))
    return bool(INPUT_PRECISION == "fp16x3" and NQ in (1, 2, 4) and CONFIG_OVERRIDE.get("wide", True)
                and CONFIG_OVERRIDE.get("parts", A_PARTS))


_parts_cache: dict = {}
PARTS_CHUNK = 1 << 26   # elements of A split at a time by a_parts


def a_parts(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A [m, n] fp32 as glm_tma_kernel's PARTS operands: fp16 (hi, lo) [m, n] of A's rows times 2^k_i (the row max
    in [2^14, 2^15)) and the inverse factors 2^-k_i [m] (_hi_lo). Made once and kept while the same A is alive
    and unchanged (its version counter; the RSHTR use: A fixed, x and P new every call); memory: A's size again."""
    key = (A.data_ptr(), A._version, tuple(A.shape), tuple(A.stride()), A.device)
    hit = _parts_cache.get("entry")
    if hit is not None and hit[0]() is A and hit[1] == key:
        return hit[2]
    _parts_cache.clear()   # the old parts go before the new ones are made
    m, n = A.shape
    hi, lo = torch.empty(2, m, -(-n // 8) * 8, dtype=torch.float16, device=A.device)[:, :, :n]
    inv = torch.empty(m, dtype=torch.float32, device=A.device)
    rows = max(1, PARTS_CHUNK // max(n, 1))   # _hi_lo's fp32 temporaries stay at a few chunks, not a few A's
    for r in range(0, m, rows):
        hi[r:r + rows], lo[r:r + rows], inv[r:r + rows] = _hi_lo(A[r:r + rows], fp16=True)
    _parts_cache["entry"] = (weakref.ref(A, lambda _: _parts_cache.clear()), key, (hi, lo, inv))
    return hi, lo, inv


def _glm_tma(A, x, y, P, s, loss, reg, lam, loss_scale, BM, parts):
    """glm() through glm_tma_kernel (P given, bf16x3 or fp16x3, s <= 4 TMA_BS) with BM-row blocks; ``parts``: A's
    kept fp16 parts (_parts_serve). P's parts are made per call; checking whether their lo parts are all zero
    (PLO) waits for the GPU once (not during a CUDA graph capture, which keeps the three products)."""
    m, n = A.shape
    dev = A.device
    BS = min(TMA_BS, _tile(s))
    cfg = {**_TMA_DEFAULTS, **(_PARTS_DEFAULTS if parts else {}), **CONFIG_OVERRIDE}
    bk = cfg.get("BK", BK)
    zpre = bool(cfg.get("zpre", False))
    RA, R, GP, PG = _slots(m, n, s, BM, reg, lam, dev)
    fp16 = INPUT_PRECISION == "fp16x3"
    PH, PL, pinv = _hi_lo(P, fp16, flat_rows=fp16)
    # P's lo parts all zero (e.g. a Rademacher sketch): two products a k-step; CONFIG_OVERRIDE plo=True keeps three,
    # as does a CUDA graph capture (the check waits for the GPU)
    plo = bool(cfg.get("plo", False)) or (P.is_cuda and torch.cuda.is_current_stream_capturing()) or bool(PL.any())
    NQ = triton.cdiv(s, BS)
    wide = bool(cfg.get("wide", True)) and NQ in (1, 2, 4)
    pb = NQ * BS if wide else BS
    if parts:
        AH, AL, ainv = a_parts(A)
        xh, xl, xinv = _hi_lo(x[None, :], fp16=True)
        XP = torch.zeros(16, xh.stride(0), dtype=torch.float16, device=dev)[:, :n]   # rows x_hi, x_lo, zeros
        XP[0], XP[1] = xh[0], xl[0]
        a_descs = (tma_descriptor(AH, [BM, bk]), tma_descriptor(AL, [BM, bk]), tma_descriptor(XP, [16, bk]))
    else:
        ainv = xinv = PG
        a_descs = (tma_descriptor(A, [BM, bk]),) * 3   # AL_d and XP_d unused
    descs = (tma_descriptor(PH, [pb, bk]), tma_descriptor(PL, [pb, bk]))
    z = A @ x if zpre else PG
    args = (*a_descs, ainv, xinv, *descs, pinv if fp16 else PG, x, y, z, P, GP, PG, m, n, s, RA, R, float(lam),
            float(loss_scale), P.stride(0), P.stride(1))
    # B^T W B at the k-loop's own split: Triton's tf32x3 there makes ptxas serialize the k-loop's wgmma for want of
    # registers (bench/sm90_compile.py --op glm --precision fp16x3 --override gram=tf32x3)
    meta = dict(LOSS=loss, REG=reg, NQ=NQ, BM=BM, BK=bk, BS=BS,
                PREC=cfg.get("gram", INPUT_PRECISION), ZPRE=zpre, FP16=fp16, WIDE=wide,
                SEQ=bool(cfg["seq"]), ZACC=bool(cfg.get("zacc", False)) and not zpre and not parts, PARTS=parts,
                PLO=plo, num_warps=cfg.get("warps", 8 if BM >= 64 else 4))
    _launch("glm_tma_kernel", (GP.shape[0],), args, meta, cfg, TMA_STAGES)
    return _sum_slots(GP, PG, BS)


def _slots(m: int, n: int, s: int, BM: int, reg: int, lam: float, dev) -> tuple[int, int, Tensor, Tensor]:
    """(RA, R, GP, PG): RA data blocks of BM rows, R blocks in all (the regulariser's column blocks after them),
    and the zeroed partial slots [G, s, s] and [G, s] of G = min(R, #SM) programs (_sum_slots adds them up)."""
    RA = triton.cdiv(m, BM)
    R = RA + (triton.cdiv(n, BM) if reg != 0 and lam != 0.0 else 0)
    G = max(1, min(R, _num_sms(dev)))
    zeros = functools.partial(torch.zeros, dtype=torch.float32, device=dev)
    return RA, R, zeros(G, s, s), zeros(G, s)


def _launch(name: str, grid, args, meta, cfg, depths: tuple[int, ...]) -> None:
    """The kernel ``name`` of triton_kernels at the deepest software pipeline of ``depths`` (or cfg["stages"])
    that fits in shared memory; the depth found is remembered per configuration."""
    key = (name, *sorted((k, v) for k, v in meta.items() if isinstance(v, (int, str, bool))),
           INPUT_PRECISION)
    stage_list = (cfg["stages"],) if "stages" in cfg else depths
    start = _stage_choice.get(key, stage_list[0])
    if start not in stage_list:   # an override of the stages (bench sweep) after another depth was chosen
        start = stage_list[0]
    for stages in stage_list[stage_list.index(start):]:
        try:
            getattr(_k, name)[grid](*args, **meta, num_stages=stages)
            _stage_choice[key] = stages
            return
        except triton.runtime.errors.OutOfResources:
            if stages == stage_list[-1]:
                raise


def _sum_slots(GP: Tensor, PG: Tensor, BS: int) -> tuple[Tensor, Tensor]:
    """(Pg, PHPt) from the programs' partial slots, summed in a fixed order; the kernels fill the blocks a <= b of
    BS-wide column tiles, the diagonal ones whole."""
    s = PG.shape[1]
    H = GP.sum(0)
    blk = torch.arange(s, device=GP.device) // BS
    H = (H + H.T) * torch.where(blk[:, None] == blk[None, :], 0.5, 1.0)
    return PG.sum(0), H
