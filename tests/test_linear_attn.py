"""Every CPU-testable backend of fastattn.linear_attention against the fp64 token-by-token recurrence."""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.ops.linear_attn.reference import linear_attention_chunked, linear_attention_recurrent

from .launches import spy_launches
from .linear_attn_cases import CASES, Case, cpu_backends, make_inputs, run_fastattn, run_reference
from .tolerances import assert_close

BACKENDS = cpu_backends()
LOW = [torch.bfloat16, torch.float16]


def _skip_heavy(case, backend):
    if case.heavy and backend == "triton":
        pytest.skip("too slow for the Triton interpreter; runs on the GPU")


def _compare(got, ref, dtype, same=None):
    assert set(got) == set(ref), f"outputs {sorted(got)} != reference {sorted(ref)}"
    for name in ref:
        assert_close(name, got[name], ref[name], dtype, None if same is None else same[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_against_fp64_recurrence(case, backend):
    _skip_heavy(case, backend)
    inputs, cot = make_inputs(case, torch.float32)
    _compare(run_fastattn(case, inputs, cot, backend), run_reference(case, inputs, cot), torch.float32)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("case", [c for c in CASES if not c.heavy], ids=str)
def test_fp64_against_fp64_recurrence(case, backend):
    inputs, cot = make_inputs(case, torch.float64)
    _compare(run_fastattn(case, inputs, cot, backend), run_reference(case, inputs, cot), torch.float64)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("case", [c for c in CASES if c.name in
                                  ("gqa_bthd_mask_state", "unnormalized_gqa_mask", "noncausal_bthd_mask",
                                   "T1000_gqa_mask")], ids=str)
def test_low_precision_rule(case, backend, dtype):
    """Error against fp64 at most 2x the same-dtype torch reference's error (plus a small atol)."""
    _skip_heavy(case, backend)
    inputs, cot = make_inputs(case, dtype)
    got = run_fastattn(case, inputs, cot, backend)
    same = run_fastattn(case, inputs, cot, "torch")
    for name, t in got.items():
        assert t.dtype == same[name].dtype, f"{name}: dtype {t.dtype} != torch backend's {same[name].dtype}"
    _compare(got, run_reference(case, inputs, cot), dtype, same)


def test_chunked_equals_recurrent():
    for case in CASES:
        inputs, cot = make_inputs(case, torch.float64, seed=1)
        _compare(run_reference(case, inputs, cot, chunked=True), run_reference(case, inputs, cot), torch.float64)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_fp64(backend):
    g = torch.Generator().manual_seed(3)
    B, H, Hv, T, D, Dv = 1, 2, 1, 5, 3, 2
    q = torch.rand(B, H, T, D, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.rand(B, H, T, D, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(B, Hv, T, Dv, generator=g, dtype=torch.float64).requires_grad_()
    S0 = torch.rand(B, H, D, Dv, generator=g, dtype=torch.float64).requires_grad_()
    z0 = torch.rand(B, H, D, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[False, True, True, True, True]])

    def fn(q, k, v, S0, z0):
        o, (S, z) = fastattn.linear_attention(q, k, v, state=(S0, z0), return_state=True, key_mask=mask,
                                              backend=backend)
        return o, S, z

    assert torch.autograd.gradcheck(fn, (q, k, v, S0, z0))
    assert torch.autograd.gradcheck(
        lambda q, k, v: fastattn.linear_attention(q, k, v, causal=False, backend=backend)[0], (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v, S0: fastattn.linear_attention(q, k, v, normalize=False, state=(S0, None),
                                                      backend=backend)[0], (q, k, v, S0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_split_and_resume_equals_one_call(backend, normalize):
    g = torch.Generator().manual_seed(4)
    B, H, Hv, T, D, Dv = 2, 3, 1, 150, 37, 12
    q, k = torch.rand(2, B, H, T, D, generator=g)
    v = torch.randn(B, Hv, T, Dv, generator=g)
    full, (S, z) = fastattn.linear_attention(q, k, v, normalize=normalize, return_state=True, backend=backend)
    state, parts = None, []
    for lo, hi in ((0, 1), (1, 64), (64, 101), (101, T)):
        o, state = fastattn.linear_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], normalize=normalize,
                                             state=state, return_state=True, backend=backend)
        parts.append(o)
    assert_close("o", torch.cat(parts, 2), full.double(), torch.float32)
    assert_close("S", state[0], S.double(), torch.float32)
    if normalize:
        assert_close("z", state[1], z.double(), torch.float32)
    else:
        assert state[1] is None and z is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_causality(backend):
    g = torch.Generator().manual_seed(5)
    B, H, T, D, Dv, t = 1, 3, 130, 9, 6, 70
    q, k = torch.rand(2, B, H, T, D, generator=g)
    v = torch.randn(B, H, T, Dv, generator=g)
    o1, _ = fastattn.linear_attention(q, k, v, backend=backend)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, t:] = torch.rand(B, H, T - t, D, generator=g)
    k2[:, :, t:] = 5 * torch.rand(B, H, T - t, D, generator=g)
    v2[:, :, t:] = 100.0
    o2, _ = fastattn.linear_attention(q2, k2, v2, backend=backend)
    torch.testing.assert_close(o2[:, :, :t], o1[:, :, :t], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(o2[:, :, t:], o1[:, :, t:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_decode_steps_equal_last_rows(backend, normalize):
    g = torch.Generator().manual_seed(6)
    B, H, Hv, T, D, Dv, n = 2, 3, 1, 70, 37, 10, 5
    q, k = torch.rand(2, B, H, T, D, generator=g)
    v = torch.randn(B, Hv, T, Dv, generator=g)
    full, (S_full, z_full) = fastattn.linear_attention(q, k, v, normalize=normalize, return_state=True,
                                                       backend=backend)
    _, state = fastattn.linear_attention(q[:, :, :-n], k[:, :, :-n], v[:, :, :-n], normalize=normalize,
                                         return_state=True, backend=backend)
    S, z = state
    for t in range(T - n, T):
        o, (S2, z2) = fastattn.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], (S, z),
                                                     normalize=normalize, backend=backend)
        assert S2 is S and z2 is z, "the decode step must update the state in place"
        assert_close(f"o[{t}]", o, full[:, :, t].double(), torch.float32)
    assert_close("S", S, S_full.double(), torch.float32)
    if normalize:
        assert_close("z", z, z_full.double(), torch.float32)


def test_decode_step_with_autograd_is_out_of_place():
    g = torch.Generator().manual_seed(7)
    q, k = torch.rand(2, 1, 2, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 3, generator=g, dtype=torch.float64)
    S = torch.rand(1, 2, 4, 3, dtype=torch.float64).requires_grad_()
    z = torch.rand(1, 2, 4, dtype=torch.float64).requires_grad_()
    o, (S2, z2) = fastattn.linear_attention_step(q, k, v, (S, z))
    assert S2 is not S
    o.sum().backward()
    assert S.grad is not None and z.grad is not None


def test_reference_t0_and_t1():
    q = torch.rand(1, 2, 0, 3)
    o, S, z, den = linear_attention_recurrent(q, q, torch.rand(1, 2, 0, 4))
    assert o.shape == (1, 2, 0, 4) and S.abs().sum() == 0 and z.shape == (1, 2, 3)
    q = torch.rand(1, 2, 1, 3)
    v = torch.rand(1, 2, 1, 4)
    o, *_ = linear_attention_chunked(q, q, v, eps=0.0)
    torch.testing.assert_close(o, v)  # one token: o = v exactly when eps = 0


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize("widest", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("hf_view_gqa", "T1_D96", "D130_gqa", "D257_Dv1",
                                                                 "noncausal_bthd_mask")], ids=str)
def test_triton_forward_with_other_feature_tile_widths(case, dtype, widest, monkeypatch):
    """FWD_MAX_BK = 64 or 256 (the alternatives to the default 128: D > 64 in 64-wide tiles with fp32 partials
    and the summing kernel, or D <= 256 in one tile with 8 warps) gives the same answers: outputs, every
    gradient and the final state against fp64."""
    from fastattn.ops.linear_attn import triton as tri
    monkeypatch.setattr(tri, "FWD_MAX_BK", widest)
    assert tri._fwd_config(96, 16, 64).BK == 64 and tri._fwd_config(257, 1, 64).BK == 64
    assert tri._fwd_config(96, 16, 128).BK == 128 and tri._fwd_config(257, 1, 128).BK == 128
    assert tri._fwd_config(96, 16, 256).BK == 128 and tri._fwd_config(130, 33, 256).BK == 256
    assert tri._fwd_config(257, 1, 256).BK == 256 and tri._fwd_config(130, 33, 256).warps == 8
    assert [tri._tile(d) for d in (1, 16, 17, 33, 64, 65, 300)] == [16, 16, 32, 64, 64, 64, 64]
    inputs, cot = make_inputs(case, dtype)
    same = run_fastattn(case, inputs, cot, "torch") if dtype != torch.float32 else None
    _compare(run_fastattn(case, inputs, cot, "triton"), run_reference(case, inputs, cot), dtype, same)


TMA_CASES = [  # dims whose rows are 16-byte multiples take the descriptors; D = 130 keeps pointer loads
    Case("tma_state", B=2, T=130, D=32, Dv=16, state=True),
    Case("tma_gqa_bthd_mask", H=4, Hv=2, T=100, D=64, Dv=64, layout="bthd", mask=True, state=True),
    Case("tma_hf_view_unnormalized", B=2, T=70, D=96, Dv=32, hf_view=True, normalize=False),
    Case("tma_noncausal", T=40, D=16, Dv=16, causal=False),
    Case("tma_no_D130", Hv=1, T=100, D=130, Dv=32),
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("case", TMA_CASES, ids=str)
def test_triton_kernels_with_and_without_tma_descriptors(case, dtype, tma, monkeypatch):
    """FWD_TMA and BWD_TMA on (the default: q, k, v, do and the direct outputs through TMA descriptors, reads past
    T and the dim zero-filled, writes there dropped) and off (pointer loads, as on GPUs before sm_90): outputs,
    every gradient and the final state against fp64, and the descriptors used by the forward, dq and dk/dv kernels
    exactly when they are on and every row and stride is a 16-byte multiple."""
    from fastattn.ops.linear_attn import triton as tri
    monkeypatch.setattr(tri, "FWD_TMA", tma)
    monkeypatch.setattr(tri, "BWD_TMA", tma)
    seen = spy_launches(monkeypatch, tri._k, ("fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel"))
    inputs, cot = make_inputs(case, dtype)
    same = run_fastattn(case, inputs, cot, "torch") if dtype != torch.float32 else None
    _compare(run_fastattn(case, inputs, cot, "triton"), run_reference(case, inputs, cot), dtype, same)
    used = {name: [meta["TMA"] for meta in metas] for name, metas in seen.items()}
    tma = tma and case.D != 130
    assert used["fwd_kernel"][0] == tma and used["bwd_dq_kernel"] == [tma] and used["bwd_dkdv_kernel"] == [tma]


WINDOW_CASES = [  # "bthd" memory (or HF's view of it), ragged D, H * D a multiple of 8
    Case("win_D9_mask_state", B=2, H=8, Hv=8, T=70, D=9, Dv=16, layout="bthd", mask=True, state=True),
    Case("win_D182_gqa_Dv80", H=4, Hv=2, T=70, D=182, Dv=80, layout="bthd", state=True),
    Case("win_D37_hf_view_unnormalized", B=2, H=8, Hv=8, T=70, D=37, Dv=24, hf_view=True, normalize=False),
    Case("win_D9_noncausal_mask", H=8, Hv=4, T=40, D=9, Dv=8, causal=False, layout="bthd", mask=True),
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_triton_kernels_through_q_k_windows(case, dtype, tma, monkeypatch):
    """WINDOWS on: every q-side kernel reads q/k of a ragged D through 16-byte aligned windows (WIN = 8 elements
    in bf16, 4 in fp32; through TMA descriptors over [B, T, H * D] when tma, pointers otherwise) and stores dq/dk
    through pointers masked to the head. Outputs, every gradient and the final state against fp64: a neighbour
    head's features leaking into a window, or a shifted feature, would break them."""
    from fastattn.ops.linear_attn import triton as tri
    monkeypatch.setattr(tri, "WINDOWS", True)
    monkeypatch.setattr(tri, "FWD_TMA", tma)
    monkeypatch.setattr(tri, "BWD_TMA", tma)
    seen = spy_launches(monkeypatch, tri._k, ("chunk_state_kernel", "fwd_kernel", "bwd_dq_kernel",
                                              "bwd_dkdv_kernel"))
    inputs, cot = make_inputs(case, dtype)
    same = run_fastattn(case, inputs, cot, "torch") if dtype != torch.float32 else None
    _compare(run_fastattn(case, inputs, cot, "triton"), run_reference(case, inputs, cot), dtype, same)
    win = 16 // inputs["q"].element_size()
    assert {meta["WIN"] for metas in seen.values() for meta in metas} == {win}
    assert len(seen["chunk_state_kernel"]) >= 2          # the interpreter splits T: segment states ran too
    tmas = [meta["TMA"] for meta in seen["fwd_kernel"] if meta["MODE"] != 2]   # MODE 2 (the backward's c): never
    tmas += [meta["TMA"] for name in ("bwd_dq_kernel", "bwd_dkdv_kernel") for meta in seen[name]]
    assert set(tmas) == {tma}


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (GPU or interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case,widest,windows", [(next(c for c in CASES if c.name == "exact_64_gqa_mask_state"), 128,
                                                   False), (WINDOW_CASES[1], 256, True)], ids=str)
def test_triton_forward_with_32_wide_value_tiles(case, widest, windows, dtype, monkeypatch):
    """The forward with BV = 32 (the bench variants bv32 and bk256bv32w8: two value tiles per (b, h), each program
    re-reading q and k), here D = Dv = 64 with GQA, mask and state, and D = 182 in one 256-wide tile through
    windows: outputs, every gradient and the final state against fp64."""
    from fastattn.ops.linear_attn import triton as tri
    base = tri._fwd_config
    monkeypatch.setattr(tri, "FWD_MAX_BK", widest)
    monkeypatch.setattr(tri, "WINDOWS", windows)
    monkeypatch.setattr(tri, "_fwd_config", lambda D, Dv, w: tri._Config(**{**base(D, Dv, w).__dict__, "BV": 32}))
    seen = spy_launches(monkeypatch, tri._k, ("fwd_kernel",))
    inputs, cot = make_inputs(case, dtype)
    same = run_fastattn(case, inputs, cot, "torch") if dtype != torch.float32 else None
    _compare(run_fastattn(case, inputs, cot, "triton"), run_reference(case, inputs, cot), dtype, same)
    fwd = [meta for meta in seen["fwd_kernel"] if meta["MODE"] != 2]
    assert [(meta["BK"], meta["BV"], meta["MODE"], meta["WIN"]) for meta in fwd] == [
        (64 if widest == 128 else 256, 32, 0, 16 // inputs["q"].element_size() if windows else 0)]


def test_window_rule():
    """_kside takes windows only for a ragged D in memory with the heads side by side, 16-byte aligned bases,
    batch and token strides and rows of H * D features, and only where the window's extra columns add no K tile.
    AK is _alignment's either way. (WINDOWS is off by default until timed.)"""
    pytest.importorskip("triton")
    from fastattn.ops.linear_attn import triton as tri

    def bthd(D, H=8, B=2, T=5, dtype=torch.bfloat16):
        return torch.empty(B, T, H, D, dtype=dtype).transpose(1, 2)
    assert tri.WINDOWS is False and tri._kside((bthd(9),), 9, 16) == dict(AK=1, WIN=0)
    tri_windows, tri.WINDOWS = tri.WINDOWS, True
    try:
        assert tri._kside((bthd(9), bthd(9)), 9, 16) == dict(AK=1, WIN=8)
        assert tri._kside((bthd(9, dtype=torch.float32),), 9, 16) == dict(AK=1, WIN=4)
        assert tri._kside((bthd(182, H=4),), 182, 128) == dict(AK=2, WIN=8)       # AK: D's own alignment
        assert tri._kside((bthd(182, H=4),), 182, 64) == dict(AK=2, WIN=8)        # 189 columns: still 3 tiles
        assert tri._kside((bthd(58),), 58, 64) == dict(AK=2, WIN=0)               # 65 columns: a second tile
        assert tri._kside((bthd(64),), 64, 64) == dict(AK=16, WIN=0)              # aligned already
        assert tri._kside((bthd(9, H=3),), 9, 16) == dict(AK=1, WIN=0)            # rows of 27 features
        assert tri._kside((torch.empty(2, 8, 5, 9, dtype=torch.bfloat16),), 9, 16) == dict(AK=1, WIN=0)  # "bhtd"
        shifted = torch.empty(2 * 5 * 72 + 1, dtype=torch.bfloat16)[1:].view(2, 5, 8, 9).transpose(1, 2)
        assert tri._kside((bthd(9), shifted), 9, 16) == dict(AK=1, WIN=0)         # a base 2 bytes off
    finally:
        tri.WINDOWS = tri_windows


def test_split_t_rule_on_a_gpu_sized_grid(monkeypatch):
    """_segments as a 132-SM GPU plans it: T is split only when the unsplit grid fills less than half of the SMs;
    then into as many segments as fit PROGRAMS_PER_SM programs per SM (no partial last wave), with at least
    MIN_SEGMENT_CHUNKS chunks a segment."""
    pytest.importorskip("triton")
    from fastattn.ops.linear_attn import triton as tri
    monkeypatch.setattr(tri, "_num_sms", lambda device: 132)
    monkeypatch.setattr(tri, "PROGRAMS_PER_SM", {"fwd": 2, "bwd": 1})
    gpu = torch.device("cuda")
    assert tri._segments(256, 128, gpu, "fwd") == (256, 1)        # B x H = 128 >= 66: one segment
    assert tri._segments(256, 9, gpu, "fwd") == (9, 29)           # 16k tokens, B x H = 9: ~2 x 132 programs
    assert tri._segments(256, 9, gpu, "bwd") == (19, 14)          # the backward's 1 per SM: 126 programs
    assert tri._segments(256, 32, gpu, "fwd") == (32, 8)          # 256 programs, not 9 x 32 = 288 > 264
    assert tri._segments(32, 9, gpu, "fwd") == (4, 8)             # 2k tokens: segments of at least 4 chunks
    assert tri._segments(3, 9, gpu, "fwd") == (3, 1)              # fewer chunks than that: one segment
    assert tri._segments(3, 9, torch.device("cpu"), "fwd") == (1, 3)   # interpreter: still split (coverage)


def test_alignment_is_per_side_and_exact_bits_per_dim():
    """The kernels' AK / AV: the largest of 16, 8, 4, 2, 1 elements dividing the feature dim and the batch, head
    and token strides of every tensor of that side. At D = 9 in "bthd" memory the q/k rows are unaligned while v
    and o (Dv = 64) stay at 16; even and multiple-of-8 dims keep what they have. EXACT: bit 1 if D is one full
    tile, bit 2 if Dv is. (The interpreter ignores the alignment hints, so this pins the host's rule; the kernels'
    rounding of strides and dims to these multiples runs in every interpreter test.)"""
    pytest.importorskip("triton")
    from fastattn.ops.linear_attn import triton as tri

    def bthd(D, H=8, B=2, T=5):   # [B, H, T, D] view of [B, T, H, D] memory
        return torch.empty(B, T, H, D).transpose(1, 2)
    assert tri._alignment((bthd(9), bthd(9)), 9) == 1 and tri._alignment((bthd(64), bthd(64)), 64) == 16
    assert tri._alignment((bthd(56),), 56) == 8 and tri._alignment((bthd(182),), 182) == 2
    assert tri._alignment((bthd(64), bthd(182)), 64) == 2           # the least aligned tensor counts
    assert tri._alignment((bthd(64),), 60) == 4                      # and the dim itself
    assert tri._alignment((torch.empty(2, 3, 5, 48),), 48) == 16     # "bhtd": token stride 48
    assert tri._alignment((torch.empty(2, 3, 5, 60),), 60) == 4
    assert tri._alignment((bthd(16, H=1, T=3),), 16) == 16 and tri._alignment((bthd(24, H=1),), 24) == 8
    cfg = tri._config(9, 64)
    assert tri._exact(9, 64, cfg) == 2 and tri._exact(16, 64, tri._config(16, 64)) == 3
    assert tri._exact(64, 9, tri._config(64, 9)) == 1 and tri._exact(9, 9, tri._config(9, 9)) == 0
