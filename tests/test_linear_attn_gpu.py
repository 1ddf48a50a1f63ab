"""GPU backends (cuda, triton) against the fp64 reference, up to T = 65,536 (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.ops.linear_attn.reference import linear_attention_chunked, linear_attention_chunked_backward

from .linear_attn_cases import CASES, make_inputs, run_fastattn, run_reference
from .tolerances import assert_close

pytestmark = pytest.mark.gpu

GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and backends.availability(b)[0]
                and backends.has_backend("linear_attn", b)]


def _compare(got, ref, dtype, same=None):
    for name in ref:
        assert_close(name, got[name], ref[name], dtype, None if same is None else same[name])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_small_cases_fp32(case, backend):
    inputs, cot = make_inputs(case, torch.float32, device="cuda")
    _compare(run_fastattn(case, inputs, cot, backend), run_reference(case, inputs, cot), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c.T >= 63], ids=str)
def test_small_cases_low_precision(case, backend, dtype):
    inputs, cot = make_inputs(case, dtype, device="cuda")
    same = run_fastattn(case, inputs, cot, "torch")
    _compare(run_fastattn(case, inputs, cot, backend), run_reference(case, inputs, cot), dtype, same)


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("B,H,Hv,T,D,Dv", [(1, 9, 3, 65536, 64, 64), (2, 8, 8, 16384, 37, 64),
                                          (1, 4, 2, 65536, 130, 48)])
def test_long_sequences_against_fp64(backend, dtype, B, H, Hv, T, D, Dv):
    """Relative error (Frobenius) of o, dq, dk, dv and the final state at most 5e-3 in bf16, 1e-5 in fp32."""
    _check_long(backend, dtype, B, H, Hv, T, D, Dv)


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="needs the triton backend on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("widest,B,H,Hv,T,D,Dv", [(64, 4, 8, 8, 16384, 96, 64), (64, 1, 8, 4, 65536, 128, 64),
                                                 (64, 2, 4, 4, 16384, 182, 64), (256, 2, 4, 4, 16384, 182, 64),
                                                 (256, 1, 8, 8, 65536, 256, 64)])
def test_long_sequences_with_other_forward_tile_widths(dtype, widest, B, H, Hv, T, D, Dv, monkeypatch):
    """The same bounds with triton's alternative forward feature tiles (FWD_MAX_BK = 64 or 256)."""
    from fastattn.ops.linear_attn import triton as tri
    monkeypatch.setattr(tri, "FWD_MAX_BK", widest)
    _check_long("triton", dtype, B, H, Hv, T, D, Dv)


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="needs the triton backend on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("warps,B,H,Hv,T,D,Dv", [(4, 1, 9, 3, 65536, 64, 64), (4, 2, 8, 8, 16384, 128, 64),
                                                (8, 2, 8, 4, 16384, 96, 64)])
def test_long_sequences_through_pointer_loads(dtype, warps, B, H, Hv, T, D, Dv, monkeypatch):
    """The same bounds with the forward's and the backward's loads through pointers instead of TMA descriptors
    (FWD_TMA, BWD_TMA off, as on GPUs before sm_90; the bench variants pointers, pointers_w8 and bwd_pointers;
    ``warps``: the forward's)."""
    from fastattn.ops.linear_attn import triton as tri
    monkeypatch.setattr(tri, "FWD_TMA", False)
    monkeypatch.setattr(tri, "BWD_TMA", False)
    base = tri._fwd_config
    monkeypatch.setattr(tri, "_fwd_config", lambda d, dv, w: tri._Config(**{**base(d, dv, w).__dict__,
                                                                               "warps": warps}))
    _check_long("triton", dtype, B, H, Hv, T, D, Dv)


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="needs the triton backend on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("B,H,Hv,T,D,Dv", [(1, 8, 8, 65536, 9, 64), (2, 8, 4, 16384, 37, 64),
                                          (2, 4, 4, 16384, 182, 64)])
def test_long_sequences_through_q_k_windows(dtype, tma, B, H, Hv, T, D, Dv, monkeypatch):
    """The same bounds with q/k windows for ragged D (WINDOWS on; "bthd" memory, H * D a multiple of 8), their
    loads through TMA descriptors over [B, T, H * D] or pointers; the launches must have taken the windows."""
    from fastattn.ops.linear_attn import triton as tri
    from .launches import spy_launches
    monkeypatch.setattr(tri, "WINDOWS", True)
    monkeypatch.setattr(tri, "FWD_TMA", tma)
    monkeypatch.setattr(tri, "BWD_TMA", tma)
    seen = spy_launches(monkeypatch, tri._k, ("fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel"))
    _check_long("triton", dtype, B, H, Hv, T, D, Dv)
    win = 16 // torch.empty(0, dtype=dtype).element_size()
    assert {meta["WIN"] for metas in seen.values() for meta in metas} == {win}


def _cuda_mma_kernels(run) -> set[str]:
    """Names of the CUDA kernels that ``run()`` launches with FASTATTN_CUDA_MMA=1 (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if any(k in e.name for k in ("la_fwd_chunk", "la_bwd_dq", "la_bwd_dkdv"))}


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="needs the cuda backend on a GPU")
@pytest.mark.parametrize("case", [c for c in CASES if c.T >= 63], ids=str)
def test_cuda_tensor_cores_small_cases(case, monkeypatch):
    """FASTATTN_CUDA_MMA=1: the cuda backend's bf16 passes on tensor cores (the forward's segment sums and chunk
    pass, the backward's dq and dk / dv passes; WMMA, the fp32 operands as bf16 hi + lo) against fp64 by the
    low-precision rule, every gradient and the final state included; the profiler must show the tensor-core chunk,
    dq and dk / dv kernels and not the FMA ones."""
    monkeypatch.setenv("FASTATTN_CUDA_MMA", "1")
    inputs, cot = make_inputs(case, torch.bfloat16, device="cuda")
    same = run_fastattn(case, inputs, cot, "torch")
    got = {}
    names = _cuda_mma_kernels(lambda: got.update(run_fastattn(case, inputs, cot, "cuda")))
    _compare(got, run_reference(case, inputs, cot), torch.bfloat16, same)
    assert any("mma" in n for n in names) and not any("mma" not in n for n in names), names


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="needs the cuda backend on a GPU")
@pytest.mark.parametrize("B,H,Hv,T,D,Dv", [(1, 9, 3, 65536, 64, 64), (2, 8, 8, 16384, 37, 64),
                                          (1, 4, 2, 65536, 130, 48), (1, 2, 2, 16384, 300, 80)])
def test_cuda_tensor_cores_long_sequences(B, H, Hv, T, D, Dv, monkeypatch):
    """The long-sequence bounds (5e-3 relative in bf16) with the tensor-core passes."""
    monkeypatch.setenv("FASTATTN_CUDA_MMA", "1")
    _check_long("cuda", torch.bfloat16, B, H, Hv, T, D, Dv)


def _check_long(backend, dtype, B, H, Hv, T, D, Dv):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.rand(B, T, H, D, device="cuda", generator=g, dtype=dtype).transpose(1, 2)
    k = torch.rand(B, T, H, D, device="cuda", generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, T, Hv, Dv, device="cuda", generator=g, dtype=dtype).transpose(1, 2)
    do = torch.randn(B, H, T, Dv, device="cuda", generator=g, dtype=dtype)
    dS = torch.randn(B, H, D, Dv, device="cuda", generator=g)
    dz = torch.randn(B, H, D, device="cuda", generator=g)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o, (S, z) = fastattn.linear_attention(*leaves, return_state=True, backend=backend)
    torch.autograd.backward([o, S, z], [do, dS, dz])
    q64, k64, v64 = (t.double() for t in (q, k, v))
    o_ref, S_ref, z_ref, den = linear_attention_chunked(q64, k64, v64, chunk_size=256)
    dq, dk, dv, _, _ = linear_attention_chunked_backward(do.double(), dS.double(), dz.double(), q64, k64, v64, den,
                                                         None, None, None, chunk_size=256)
    tol = 5e-3 if dtype == torch.bfloat16 else 1e-5
    for name, got, ref in (("o", o, o_ref), ("S", S, S_ref), ("z", z, z_ref), ("dq", leaves[0].grad, dq),
                           ("dk", leaves[1].grad, dk), ("dv", leaves[2].grad, dv)):
        err = _relative(got, ref)
        assert err <= tol, f"{backend} {dtype} {name}: relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_decode_step_in_cuda_graph(backend):
    B, H, D, Dv = 64, 9, 64, 64
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k = torch.rand(2, B, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(B, H, Dv, device="cuda", generator=g, dtype=torch.bfloat16)
    S = torch.rand(B, H, D, Dv, device="cuda", generator=g)
    z = torch.rand(B, H, D, device="cuda", generator=g)
    o_ref, S_ref, z_ref = fastattn.ops.linear_attn.reference.linear_attention_step_reference(q, k, v, S, z)
    S_ref2, z_ref2 = S_ref + k.float()[..., None] * v.float()[..., None, :], z_ref + k.float()
    fastattn.linear_attention_step(q, k, v, (S.clone(), z.clone()), backend=backend)  # warm-up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, _ = fastattn.linear_attention_step(q, k, v, (S, z), backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-5)
    graph.replay()  # a second replay advances the state again, in place
    torch.testing.assert_close(S, S_ref2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z, z_ref2, rtol=1e-5, atol=1e-4)


def test_auto_order_sequences_triton_first_decode_steps_cuda_first():
    """The measured preference of fastattn.ops.linear_attn.auto_order (bench/results/linear_attn_h200.md)."""
    q = torch.rand(1, 2, 8, 4, device="cuda")
    first = lambda order: next((b for b in order if b in GPU_BACKENDS), "torch")  # noqa: E731
    assert backends.resolve("linear_attn", "auto", q, q, q) == first(("triton", "cuda"))
    q1 = q[:, :, :1]
    assert backends.resolve("linear_attn", "auto", q1, q1, q1) == first(("cuda", "triton"))


def test_torch_compile_fullgraph_on_gpu():
    q = torch.rand(1, 3, 100, 37, device="cuda", requires_grad=True)
    v = torch.randn(1, 3, 100, 16, device="cuda", requires_grad=True)

    def f(q, v):
        return fastattn.linear_attention(q, q, v)[0].sum()

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, v), f(q, v))


@pytest.mark.skipif("triton" not in GPU_BACKENDS, reason="needs the triton backend on a GPU")
def test_new_feature_dims_in_one_tile_bucket_compile_nothing_new():
    """Per-layer feature dims (a DoF allocation) must not compile one kernel set per layer: after one dim of the
    64-wide bucket, other dims of that bucket (none a multiple of 16, so Triton's divisibility flag is the same)
    reuse the compiled forward and backward kernels, and still match the fp64 reference."""
    from fastattn.ops.linear_attn import triton as tri

    def compiled() -> int:
        dev = torch.cuda.current_device()
        caches = [fn.device_caches.get(dev) for fn in vars(tri._k).values()
                  if isinstance(fn, tri.triton.runtime.JITFunction)]
        return sum(len(c[0]) for c in caches if c is not None)

    def run(D: int) -> None:
        g = torch.Generator(device="cuda").manual_seed(D)
        q, k = (torch.rand(2, 2, 3, 300, D, device="cuda", generator=g) / D).to(torch.bfloat16).unbind(0)
        v = torch.randn(2, 3, 300, 50, device="cuda", generator=g).to(torch.bfloat16)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        o, _ = fastattn.linear_attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(o.float().square().sum(), (q, k, v))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = fastattn.linear_attention(*leaves, backend="torch")[0]
        ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
        assert _relative(o, ref) < 5e-3
        for got, want in zip(grads, ref_grads):
            assert _relative(got, want) < 5e-3

    run(33)
    before = compiled()
    for D in (37, 41, 50, 57, 63):
        run(D)
    assert compiled() == before
