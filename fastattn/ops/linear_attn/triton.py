"""Triton backend for linear attention: host launchers for ``triton_kernels.py`` (contract and math: README.md).

Schedule (details in ``triton_kernels``): the sequence is cut into NS segments of CPS chunks of BT = 64 tokens;
NS is chosen so that the grid fills the GPU (NS = 1, a single fused pass, when B * H * tiles already does).
  forward:  [segment sums -> scan]                    -> fwd_kernel            [-> sum_partials (D > 64)]
  backward: [segment sums -> scan] [c pass, big dims] -> bwd_dq_kernel (c fused for D, Dv <= 64)
            [reverse segment sums -> scan]            -> bwd_dkdv_kernel       [-> sum_partials]
Bracketed steps run only when needed: the state steps when NS > 1 or for the non-causal form, the reductions
when a feature dim has several tiles (or GQA, for dv). Only the feature tiles are compile-time constants: the
feature dims themselves, T, the segment counts and the strides that scale with T are runtime arguments, so a new
T or a new feature dim in the same tile bucket never compiles a new kernel. (A dim that is exactly one tile, e.g.
Dv = 64, is compiled in: ``_exact``.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..triton_gate import import_kernels, tma_descriptor, tma_ready, triton_gate
from .layout import empty_output

triton, _k, _IMPORT_ERROR = import_kernels(__package__)

BT = 64                           # chunk length
SEGMENT_CHUNKS: int | None = None  # testing hook: force chunks per segment (None: from the GPU size)
# Split-T target: programs per SM that the segment split aims for, forward and backward, once T is split (when
# the unsplit grid fills less than half of the SMs). One program per SM leaves each SM one sequential chain of
# chunk loads; more segments hide load latency at the price of the extra read of the segment-state pass, and a
# segment keeps at least MIN_SEGMENT_CHUNKS chunks. bench/linear_attn.py --sweep measures these on the GPU. The
# forward's 2: H100, B=1, H=9, D=64, T=16k 83 us against 108 at 1, T=64k 259 against 356
# (bench/results/linear_attn_h100_segments.md).
# The backward's 2 (with segments rounded down to full waves): H100, D = 64, B=4, H=8, T=16k 0.851 ms against
# 1.176 at 1 (forward + backward), B=1, H=9, T=64k 1.000 against 1.384 (bench/results/linear_attn_h100_configs.md).
PROGRAMS_PER_SM = {"fwd": 2, "bwd": 2}
MIN_SEGMENT_CHUNKS = 4
# The forward's widest feature tile: 128 serves D <= 128 in one tile (no fp32 partials, no summing kernel).
# With 4 warps it beat two 64-wide tiles on the H100: D = 128, T = 4k / 16k / 64k: 1.11x / 1.44x / 1.93x
# (with 8 warps it had lost, 1.3x slower on the H200). bench/linear_attn.py --sweep measures 64 against 128,
# bench/linear_attn_configs.py the stages and split rules (bench/results/linear_attn_h100_configs.md).
FWD_MAX_BK = 128
# The forward's load stages per feature-tile width: 3 beat 2 by 1.1-1.4x on 32- and 64-wide tiles (H100, D = 32
# and 64; equal at D = 9), 2 beat 3 by 1.5x on 128-wide ones (D = 128, T >= 16k). The backward keeps 2 (_config).
FWD_STAGES = {16: 3, 32: 3, 64: 3, 128: 2, 256: 2}
# 256-wide tiles (FWD_MAX_BK = 256: one tile for D <= 256, no fp32 partials, untimed; bench/linear_attn.py's sweep
# times it): 8 warps, where a local sm_90 compile spills 556 bytes a thread against 1,292 with 4
# (bench/sm90_compile.py --D 256 --widest 256 --warps 8, and 4).
FWD_WARPS = {256: 8}

# The forward's (FWD_TMA) and the backward's (BWD_TMA) loads and direct stores through TMA descriptors (sm_90+;
# every stride but the last a multiple of 16 bytes, so ragged dims such as 9 or 182, and older GPUs, keep pointer
# loads): no pointer tensors held in registers. H100, bf16, against pointer loads in the same process
# (bench/results/linear_attn_h100_tma.md): forward 1.01-1.03x at D = 64, 1.07-1.28x at D = 128, 1.33x at D = 96;
# forward + backward 1.07-1.15x (D = 64, 128).
FWD_TMA = True
BWD_TMA = True
# q/k windows for ragged D in "bthd" memory (``_kside``, triton_kernels' module docstring): 16-byte aligned loads
# (vectors, async copies, or TMA when FWD_TMA / BWD_TMA) where a head's rows start off a 16-byte boundary, as at
# D = 9 and 182 (0.32 and 0.18 of the HBM floor on the H100 with element-wise loads). Off until timed on a GPU.
WINDOWS = False

_SPLIT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # triton_kernels.SPLIT_*
_F32 = torch.float32


@dataclass(frozen=True)
class _Config:
    BK: int
    BV: int
    warps: int
    stages: int       # software pipelining of the per-chunk loads


def _tile(d: int, widest: int = 64) -> int:
    """Feature tile: the smallest power of two >= d in 16..widest (the MMA needs >= 16; tails are masked in the
    kernel)."""
    t = 16
    while t < d and t < widest:
        t *= 2
    return t


@functools.lru_cache(maxsize=None)
def _fwd_config(D: int, Dv: int, widest: int) -> _Config:
    """The forward's config: as _config, but up to ``widest`` (FWD_MAX_BK) features in one K tile, with
    FWD_STAGES load stages and FWD_WARPS warps."""
    cfg = _config(D, Dv)
    BK = _tile(D, widest)
    return _Config(BK=BK, BV=cfg.BV, warps=FWD_WARPS.get(BK, cfg.warps), stages=FWD_STAGES[BK])


def _descriptors(wanted: bool, tensors: tuple[Tensor, ...], widths: tuple[int, ...], win: int = 0,
                 outputs: tuple[int, ...] = ()) -> tuple[bool, tuple]:
    """(True, TMA descriptors over the [B, H, T, dim] tensors with blocks [1, 1, BT, width]) when ``wanted`` and
    they can take them (``tma_ready``); else (False, the tensors). With windows (``win``, see ``_kside``), q and k
    (tensors 0 and 1) get descriptors over their [B, T, H * D] rows (blocks [1, BT, width]), and the q-side
    outputs (the indices in ``outputs``: dq, dk) stay tensors."""
    if not wanted:
        return False, tensors
    if not win:
        if not tma_ready(*tensors):
            return False, tensors
        return True, tuple(tma_descriptor(t, [1, 1, BT, w]) for t, w in zip(tensors, widths))
    rows = [t.as_strided((t.shape[0], t.shape[2], t.shape[1] * t.shape[3]), (t.stride(0), t.stride(2), 1))
            for t in tensors[:2]]
    rest = [t for i, t in enumerate(tensors) if i >= 2 and i not in outputs]
    if not tma_ready(*rows, *rest):
        return False, tensors
    return True, tuple(tma_descriptor(rows[i], [1, BT, w]) if i < 2 else
                       t if i in outputs else tma_descriptor(t, [1, 1, BT, w])
                       for i, (t, w) in enumerate(zip(tensors, widths)))


def _exact(D: int, Dv: int, cfg: _Config) -> int:
    """The kernels' EXACT bits: 1 if D is one full tile, 2 if Dv is; such a dim becomes a compile-time constant."""
    return int(D == cfg.BK) | 2 * int(Dv == cfg.BV)


@functools.lru_cache(maxsize=None)
def _config(D: int, Dv: int) -> _Config:
    """One fixed config per (D, Dv) tile bucket: no autotuning, one compile per bucket. Measured on the H200
    (D = Dv = 64, bf16): one warpgroup per program (4 warps, wgmma on 64-row tiles) beats 8 warps by 2x in the
    backward. 3 load stages were ~5-10% faster but hit illegal memory accesses in the bf16 backward (dkdv with
    a 64 x 16 state tile) under Triton 3.6, so 2 stages it is."""
    return _Config(BK=_tile(D), BV=_tile(Dv), warps=4, stages=2)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter runs: plan as for an H200


def _segments(NT: int, programs_per_segment: int, device: torch.device, direction: str) -> tuple[int, int]:
    """(chunks per segment, segments). Splitting T costs an extra read of k, v (and of q, do in the backward)
    for the segment states, so T is split only when the grid would fill less than half of the SMs, and then into
    as many segments as keep the grid within PROGRAMS_PER_SM[direction] programs per SM (rounding up would
    leave a last, mostly idle wave: H100, B=4, H=8, T=16k, 9 segments took 0.261 ms, 8 took 0.202), each of at
    least MIN_SEGMENT_CHUNKS chunks."""
    if SEGMENT_CHUNKS is not None:
        cps = max(1, min(SEGMENT_CHUNKS, NT))
    else:
        sms = _num_sms(device)
        if 2 * programs_per_segment >= sms:
            return NT, 1
        ns = max(1, PROGRAMS_PER_SM[direction] * sms // programs_per_segment)
        least = MIN_SEGMENT_CHUNKS if device.type == "cuda" else 1   # interpreter: short T still gets segments
        cps = min(NT, max(least, triton.cdiv(NT, ns)))
    return cps, triton.cdiv(NT, cps)


def _alignment(ts: tuple[Tensor, ...], dim: int) -> int:
    """The largest of 16, 8, 4, 2, 1 elements that divides the feature dim ``dim`` and the batch, head and token
    strides of every tensor in ``ts``: the kernels' AK (for q, k, dq, dk) or AV (for v, o, do, dv). It lets them
    state aligned rows to the compiler (``triton_kernels._slice``); a ragged D only drops what it must (D = 9
    in "bthd" memory: AK = 1, AV = 16 with Dv = 64). The token stride counts so that the answer does not change
    with T for "bhtd" or "bthd" memory."""
    a = 16
    while a > 1 and (dim % a or any(s % a for t in ts for s in t.stride()[:3])):
        a //= 2
    return a


def _kside(ts: tuple[Tensor, ...], D: int, BK: int) -> dict:
    """The q-side launch arguments: AK (``_alignment``) and WIN (``triton_kernels._kwin``). WIN = 16 bytes in
    elements when the q/k rows of a ragged D are read as 16-byte aligned windows: WINDOWS is on, D is not a
    multiple of WIN, every tensor of ``ts`` has its heads side by side (head stride D, feature stride 1, as in
    "bthd" memory), 16-byte aligned bases, batch and token strides and rows of H * D features, and the window's
    up to WIN - 1 extra columns need no extra K tile of width BK. AK is _alignment's either way; with windows it is
    D's own alignment (< WIN), the strides' being WIN."""
    t0 = ts[0]
    H, win = t0.shape[1], 16 // t0.element_size()
    windows = (WINDOWS and D % win and triton.cdiv(D + win - 1, BK) == triton.cdiv(D, BK) and (H * D) % win == 0
               and all(t.stride(3) == 1 and t.stride(1) == D and t.stride(0) % win == 0 and t.stride(2) % win == 0
                       and t.stride(2) >= H * D and t.data_ptr() % 16 == 0 for t in ts))
    return dict(AK=_alignment(ts, D), WIN=win if windows else 0)


def _mask_args(key_mask: Tensor | None, dummy: Tensor):
    """(mask [B, T] as uint8, its strides, present?); the bool storage is reused, no copy."""
    if key_mask is None:
        return dummy, 0, 0, False
    m = key_mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def _state_src(S: Tensor | None, z: Tensor | None, dummy: Tensor):
    """Kernel arguments for one state shared by every segment: S [B, H, D, Dv], z [B, H, D] (None: zeros)."""
    sS = (S.stride(0), S.stride(1), 0, S.stride(2), S.stride(3)) if S is not None else (0,) * 5
    sz = (z.stride(0), z.stride(1), 0, z.stride(2)) if z is not None else (0,) * 4
    return (S if S is not None else dummy, z if z is not None else dummy), sS + sz, (S is not None, z is not None)


def _segment_src(hs: Tensor, hz: Tensor | None, dummy: Tensor):
    """Kernel arguments for per-segment states hs [B, H, NS, D, Dv], hz [B, H, NS, D]."""
    sz = tuple(hz.stride()) if hz is not None else (0,) * 4
    return (hs, hz if hz is not None else dummy), tuple(hs.stride()) + sz, (True, hz is not None)


def _segment_states(y, w, GW, mask_args, den, aw, init, init_z, out, out_z, NS, CPS, H, reverse, exclusive,
                    split, AV: int):
    """Run chunk_state_kernel + state_scan_kernel. Returns (hs, hz): the state entering each segment (exclusive)
    or the raw sums; out / out_z get init + all sums. aw: per-token weights for hz (None: ones)."""
    B, _, T, D = y.shape
    Dv = w.shape[3]
    cfg = _config(D, Dv)
    NK, NV = triton.cdiv(D, cfg.BK), triton.cdiv(Dv, cfg.BV)
    aug = 0 if out_z is None else (1 if aw is None else 2)
    hs = torch.empty(B, H, NS, D, Dv, dtype=_F32, device=y.device)
    hz = torch.empty(B, H, NS, D, dtype=_F32, device=y.device) if aug else None
    mask, smb, smt, has_mask = mask_args
    _k.chunk_state_kernel[(NK * NV * NS * B * H,)](
        y, w, mask, den if den is not None else hs, aw if aw is not None else hs, hs, hz if aug else hs,
        *y.stride(), *w.stride(), smb, smt, T, CPS, NS, H, GW,
        D_=D, DV_=Dv, EXACT=_exact(D, Dv, cfg), BT=BT, BK=cfg.BK, BV=cfg.BV, HAS_MASK=has_mask,
        HAS_DEN=den is not None, AUG=aug, SPLIT=split, num_warps=cfg.warps, num_stages=cfg.stages, AV=AV,
        **_kside((y,), D, cfg.BK))
    sS = init.stride() if init is not None else (0,) * 4
    sz = init_z.stride() if init_z is not None else (0,) * 3
    _k.state_scan_kernel[(NK * NV * B * H,)](
        hs, hz if aug else hs, init if init is not None else hs, init_z if init_z is not None else hs,
        out, out_z if aug else out, *sS, *sz, NS, H,
        D_=D, DV_=Dv, EXACT=_exact(D, Dv, cfg), BK=cfg.BK, BV=cfg.BV, REVERSE=reverse, EXCLUSIVE=exclusive,
        HAS_H0=init is not None, HAS_Z0=aug != 0 and init_z is not None, AUG=aug != 0, num_warps=4)
    return hs, hz


def _sum_partials(part, dpart, out, P, H, eps=0.0, den=None):
    """out [B, H, T, X] (any strides) = sum over P fp32 partials [P, B*H, T, X]; with den: / (sum dpart + eps)."""
    B, _, T, X = out.shape
    BX = min(64, triton.next_power_of_2(X))
    _k.sum_partials_kernel[(triton.cdiv(T, 64), triton.cdiv(X, BX), B * H)](
        part, dpart if dpart is not None else part, out, den if den is not None else part, P, T, H, *out.stride(),
        eps, X=X, BT=64, BX=BX, HAS_DEN=den is not None, num_warps=4)


def forward(q: Tensor, k: Tensor, v: Tensor, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None,
            causal: bool, normalize: bool, eps: float):
    """q, k [B, H, T, D]; v [B, Hv, T, Dv] -> (o [B, H, T, Dv] q.dtype, S [B, H, D, Dv], z [B, H, D], den [B, H, T])
    (fp32 state; z and den None when normalize=False)."""
    B, H, T, D = q.shape
    Hv, Dv = v.shape[1], v.shape[3]
    dev = q.device
    o = empty_output(q, Dv)
    S = torch.empty(B, H, D, Dv, dtype=_F32, device=dev)
    z = torch.empty(B, H, D, dtype=_F32, device=dev) if normalize else None
    den = torch.empty(B, H, T, dtype=_F32, device=dev) if normalize else None
    z0 = z0 if normalize else None
    if T == 0:
        S.copy_(S0) if S0 is not None else S.zero_()
        if normalize:
            z.copy_(z0) if z0 is not None else z.zero_()
        return o, S, z, den
    cfg = _fwd_config(D, Dv, FWD_MAX_BK)
    NK, NV = triton.cdiv(D, cfg.BK), triton.cdiv(Dv, cfg.BV)
    CPS, NS = _segments(triton.cdiv(T, BT), B * H * NK * NV, dev, "fwd")
    split, AV = _SPLIT[q.dtype], _alignment((v, o), Dv)
    kside = _kside((q, k), D, cfg.BK)
    mask_args = _mask_args(key_mask, q)
    if causal and NS == 1:
        ptrs, strides, (has_h, has_z) = _state_src(S0, z0, q)
    else:
        hs, hz = _segment_states(k, v, H // Hv, mask_args, None, None, S0, z0, S, z, NS, CPS, H,
                                 reverse=False, exclusive=causal, split=split, AV=AV)
        ptrs, strides, (has_h, has_z) = _segment_src(hs, hz, q) if causal else _state_src(S, z, q)
    mode = 0 if NK == 1 else 1
    part = torch.empty(NK, B * H, T, Dv, dtype=_F32, device=dev) if mode else S
    dpart = torch.empty(NK, B * H, T, dtype=_F32, device=dev) if mode and normalize else S
    mask, smb, smt, _ = mask_args
    tma, tensors = _descriptors(FWD_TMA, (q, k, v, o), (cfg.BK, cfg.BK, cfg.BV, cfg.BV), kside["WIN"])
    _k.fwd_kernel[(NK * NV * NS * B * H,)](
        *tensors, mask, *ptrs, den if normalize else S, part, dpart, S, z if normalize else S,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), smb, smt, *strides,
        T, CPS, NS, H, H // Hv, eps,
        D_=D, DV_=Dv, EXACT=_exact(D, Dv, cfg), BT=BT, BK=cfg.BK, BV=cfg.BV, CAUSAL=causal,
        NORMALIZE=normalize, HAS_MASK=key_mask is not None, HAS_H=has_h, HAS_Z=has_z,
        STORE_FINAL=causal and NS == 1, MODE=mode,
        SPLIT=split, num_warps=cfg.warps, num_stages=cfg.stages, TMA=tma, AV=AV, **kside)
    if mode:
        _sum_partials(part, dpart if normalize else None, o, NK, H, eps, den)
    return o, S, z, den


def backward(do: Tensor, dS: Tensor | None, dz: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
             den: Tensor | None, S0: Tensor | None, z0: Tensor | None, key_mask: Tensor | None, causal: bool,
             normalize: bool, eps: float):
    """-> (dq, dk [B, H, T, D] q.dtype, dv [B, Hv, T, Dv] v.dtype, dS0 [B, H, D, Dv], dz0 [B, H, D] or None)."""
    B, H, T, D = q.shape
    Hv, Dv = v.shape[1], v.shape[3]
    G = H // Hv
    dev = q.device
    dq, dk, dv = empty_output(q, D), empty_output(k, D), empty_output(v, Dv)
    dS0 = torch.empty(B, H, D, Dv, dtype=_F32, device=dev)
    dz0 = torch.empty(B, H, D, dtype=_F32, device=dev) if normalize else None
    z0, dz = (z0, dz) if normalize else (None, None)
    if T == 0:
        dS0.copy_(dS) if dS is not None else dS0.zero_()
        if normalize:
            dz0.copy_(dz) if dz is not None else dz0.zero_()
        return dq, dk, dv, dS0, dz0
    cfg = _config(D, Dv)
    NK, NV = triton.cdiv(D, cfg.BK), triton.cdiv(Dv, cfg.BV)
    CPS, NS = _segments(triton.cdiv(T, BT), B * H * NK * NV, dev, "bwd")
    split, AV = _SPLIT[q.dtype], _alignment((v, do, dv), Dv)
    kside = _kside((q, k, dq, dk), D, cfg.BK)
    mask_args = _mask_args(key_mask, q)
    mask, smb, smt, _ = mask_args
    den = den.contiguous() if normalize else None  # [B, H, T] fp32, as forward made it
    grid = (NK * NV * NS * B * H,)
    common = dict(D_=D, DV_=Dv, EXACT=_exact(D, Dv, cfg), BT=BT, BK=cfg.BK, BV=cfg.BV, CAUSAL=causal,
                  NORMALIZE=normalize, HAS_MASK=key_mask is not None, SPLIT=split, AV=AV, **kside)

    # forward states entering each segment (S_prev, z_prev), or the totals for the non-causal form
    if causal and NS == 1:
        ptrs, strides, (has_h, has_z) = _state_src(S0, z0, q)
    else:
        S_tot = torch.empty(B, H, D, Dv, dtype=_F32, device=dev)
        z_tot = torch.empty(B, H, D, dtype=_F32, device=dev) if normalize else None
        hs, hz = _segment_states(k, v, G, mask_args, None, None, S0, z0, S_tot, z_tot, NS, CPS, H,
                                 reverse=False, exclusive=causal, split=split, AV=AV)
        ptrs, strides, (has_h, has_z) = _segment_src(hs, hz, q) if causal else _state_src(S_tot, z_tot, q)

    # c_t = -(q_t . u_t) / den_t from the fp32 numerator (fused into the dq kernel when both dims fit one tile)
    fuse_c = NK * NV == 1
    c = torch.empty(B * H, T, dtype=_F32, device=dev) if normalize else None
    if normalize and not fuse_c:
        cpart = torch.empty(NK * NV, B * H, T, dtype=_F32, device=dev)
        _k.fwd_kernel[grid](
            q, k, v, do, mask, *ptrs, den, cpart, cpart, cpart, cpart,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), smb, smt, *strides,
            T, CPS, NS, H, G, eps, HAS_H=has_h, HAS_Z=has_z, STORE_FINAL=False, MODE=2, TMA=False,
            num_warps=cfg.warps, num_stages=cfg.stages, **common)
        # q.u = (num . do) / den, so c = -(num . do) / den^2
        torch.sum(cpart, 0, out=c)
        c.div_(den.view(B * H, T).square()).neg_()

    part = torch.empty(NV, B * H, T, D, dtype=_F32, device=dev) if NV > 1 else dq
    tma, (tq, tk, tv, tdo, tdq) = _descriptors(BWD_TMA, (q, k, v, do, dq), (cfg.BK, cfg.BK, cfg.BV, cfg.BV, cfg.BK),
                                               kside["WIN"], outputs=(4,))
    _k.bwd_dq_kernel[grid](
        tq, tk, tv, tdo, mask, den if normalize else q, c if normalize else q, *ptrs, tdq, part,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), smb, smt, *strides,
        T, CPS, NS, H, G, HAS_H=has_h, HAS_Z=has_z, FUSE_C=fuse_c, DIRECT=NV == 1,
        num_warps=cfg.warps, num_stages=cfg.stages, TMA=tma, **common)
    if NV > 1:
        _sum_partials(part, None, dq, NV, H)

    # reverse states entering each segment from the right (R, r), or the totals; dS0 = R_1, dz0 = r_1
    if causal and NS == 1:
        ptrs, strides, (has_h, has_z) = _state_src(dS, dz, q)
    else:
        hs, hz = _segment_states(q, do, 1, _mask_args(None, q), den, c, dS, dz, dS0, dz0, NS, CPS, H,
                                 reverse=True, exclusive=causal, split=split, AV=AV)
        ptrs, strides, (has_h, has_z) = _segment_src(hs, hz, q) if causal else _state_src(dS0, dz0, q)
    kpart = torch.empty(NV, B * H, T, D, dtype=_F32, device=dev) if NV > 1 else dk
    dv_direct = NK == 1 and G == 1
    vpart = dv if dv_direct else torch.empty(NK * G, B * Hv, T, Dv, dtype=_F32, device=dev)
    tma, tensors = _descriptors(BWD_TMA, (q, k, v, do, dk, dv), (cfg.BK, cfg.BK, cfg.BV, cfg.BV, cfg.BK, cfg.BV),
                                kside["WIN"], outputs=(4,))
    _k.bwd_dkdv_kernel[grid](
        *tensors[:4], mask, den if normalize else q, c if normalize else q, *ptrs, *tensors[4:], kpart, vpart,
        dS0, dz0 if normalize else dS0,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), smb, smt, *strides,
        T, CPS, NS, H, G, HAS_H=has_h, HAS_Z=has_z, STORE_FINAL=causal and NS == 1,
        DK_DIRECT=NV == 1, DV_DIRECT=dv_direct, num_warps=cfg.warps, num_stages=cfg.stages, TMA=tma, **common)
    if NV > 1:
        _sum_partials(kpart, None, dk, NV, H)
    if not dv_direct:
        _sum_partials(vpart, None, dv, NK * G, Hv)
    return dq, dk, dv, dS0, dz0


def step(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor | None, normalize: bool, eps: float) -> Tensor:
    """One decode token: q, k [B, H, D]; v [B, Hv, Dv]; S [B, H, D, Dv] and z [B, H, D] (fp32) updated in place.
    Returns o [B, H, Dv] in q's dtype."""
    B, H, D = q.shape
    Hv, Dv = v.shape[1], v.shape[2]
    o = torch.empty(B, H, Dv, dtype=q.dtype, device=q.device)
    if B * H == 0:
        return o
    zz = z if normalize else S
    sz = z.stride() if normalize else (0, 0, 0)
    _k.step_kernel[(B * H,)](
        q, k, v, S, zz, o, *q.stride(), *k.stride(), *v.stride(), *S.stride(), *sz, *o.stride(), H, H // Hv, eps,
        D=D, DV=Dv, BK=_tile(D), BV=_tile(Dv), NORMALIZE=normalize, num_warps=4)
    return o


def supports(q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, str]:
    """Whether this backend can serve a call with these inputs, and why not."""
    ok, why = triton_gate(q, _IMPORT_ERROR, min_capability=(8, 0))
    if not ok:
        return ok, why
    if q.dtype not in _SPLIT:
        return False, (f"dtype {q.dtype} is not supported: the kernels accumulate in fp32 (fp16/bf16/fp32 inputs); "
                       "fp64 (reference checks, gradcheck) is served by the torch backend")
    if q.shape[-1] > 512 or v.shape[-1] > 256:
        return False, f"feature dims D={q.shape[-1]} (max 512), Dv={v.shape[-1]} (max 256)"
    return True, ""
