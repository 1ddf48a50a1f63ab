"""fastattn.ops.prf_features: the fused forward (triton: in the interpreter on CPU, conftest) against an fp64
evaluation of the definition written out here, on ragged shapes (T, d and M not multiples of the tiles), every
shift mode, strided x, bf16/fp16/fp32; the autograd path; the feature maps that call it."""
from __future__ import annotations

import math
import os

import pytest
import torch

from fastattn import backends, feature_maps
from fastattn.ops.prf_features.interface import prf_features

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not backends.availability("triton")[0]
                                  or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                  reason="needs triton on a GPU or in the interpreter")


def definition(x, w, log_c, shift):
    """fp64, term by term: Phi[b,h,t,m] = exp(sum_i w[h,m,i] x[b,h,t,i] / d^(1/4) - |x|^2 / (2 sqrt d) + c - s)."""
    x, w, log_c = x.double(), w.double(), log_c.double()
    d = x.shape[-1]
    logits = torch.einsum("bhti,hmi->bhtm", x, w) / d ** 0.25 - (x ** 2).sum(-1, keepdim=True) / (2 * math.sqrt(d)) \
        + log_c[None, :, None, :]
    if isinstance(shift, torch.Tensor):
        s = shift.double()[None, :, None, None]
    elif shift == "row":
        s = logits.max(-1, keepdim=True).values
    elif shift == "seq":
        s = logits.flatten(2).max(-1).values[:, :, None, None]
    else:
        s = 0.0
    return (logits - s).exp()


def _inputs(B, H, T, d, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, d, generator=g).to(dtype)
    w = torch.randn(H, M, d, generator=g)
    log_c = 0.3 * torch.randn(H, M, generator=g)
    return x, w, log_c


TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}   # relative: the output's rounding


@needs_triton
@pytest.mark.parametrize("shift", ["row", "seq", "none", "tensor"])
@pytest.mark.parametrize("B,H,T,d,M", [(2, 3, 37, 8, 13), (1, 2, 70, 20, 70), (1, 1, 5, 64, 129),
                                       (1, 2, 9, 16, 300)],
                         ids=["small", "two_tiles_one_slice", "two_slices", "three_slices"])
def test_triton_matches_fp64_definition(shift, B, H, T, d, M):
    x, w, log_c = _inputs(B, H, T, d, M, torch.float32)
    s = torch.randn(H) if shift == "tensor" else shift
    ref = definition(x, w, log_c, s)
    got = prf_features(*(t.to(DEV) for t in (x, w, log_c)), s.to(DEV) if shift == "tensor" else s,
                       backend="triton")
    assert got.shape == (B, H, T, M) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_low_precision_and_strided_input(dtype):
    B, H, T, d, M = 2, 3, 41, 16, 24
    x, w, log_c = _inputs(B, H, T, d, M, dtype, seed=1)
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)        # [B, H, T, d] view of [B, T, H, d] memory
    for shift in ("row", "seq"):
        ref = definition(x, w, log_c, shift)
        got = prf_features(xs.to(DEV), w.to(DEV), log_c.to(DEV), shift, backend="triton")
        assert got.dtype == dtype
        err = ((got.cpu().double() - ref).abs() / ref.abs().max()).max().item()
        assert err <= TOL[dtype], (shift, err)


@needs_triton
def test_triton_empty_sequence():
    x, w, log_c = _inputs(1, 2, 0, 8, 5, torch.float32)
    assert prf_features(x.to(DEV), w.to(DEV), log_c.to(DEV), "seq", backend="triton").shape == (1, 2, 0, 5)


def test_autograd_runs_the_reference_with_exact_gradients():
    """With x or a parameter requiring grad the op is the torch definition: gradients of the fp64 call equal
    those of the written-out definition (the detached shift carries no gradient)."""
    x, w, log_c = (t.double().requires_grad_() for t in _inputs(1, 2, 9, 6, 7, torch.float64))
    for shift in ("row", "seq", "none"):
        got = prf_features(x, w, log_c, shift, backend="triton")   # grad mode: the reference, whatever is asked
        g = torch.randn_like(got)
        grads = torch.autograd.grad(got, (x, w, log_c), g)

        def detached_definition(x, w, log_c, shift=shift):
            with torch.no_grad():
                s = torch.log(definition(x, w, log_c, "none") / definition(x, w, log_c, shift))
            return definition(x, w, log_c, "none") / s.exp()
        ref = torch.autograd.grad(detached_definition(x, w, log_c), (x, w, log_c), g)
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("shift", ["row", "seq", "tensor"])
def test_grouped_query_keys_read_in_place(backend, shift):
    """x with H / G heads (GQA keys): feature head h reads x head h // G, as the per-query-head copy does."""
    x, w, log_c = _inputs(2, 6, 37, 8, 13, torch.float32)
    kv = x[:, ::3].contiguous()                                  # 2 kv heads for 6 feature heads
    s = torch.randn(6) if shift == "tensor" else shift
    got = prf_features(kv.to(DEV), w.to(DEV), log_c.to(DEV), s.to(DEV) if shift == "tensor" else s, backend=backend)
    want = definition(kv.repeat_interleave(3, 1), w, log_c, s)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-6)


@needs_triton
def test_triton_output_follows_the_layout_of_x():
    """HF's projections are [B, T, H, d] memory viewed as [B, H, T, d]: Phi comes back in [B, T, H, M] memory, so
    the linear attention output (allocated like Phi) is already in the [B, T, H, Dv] order HF wants."""
    x, w, log_c = _inputs(2, 6, 37, 8, 13, torch.float32)
    bthd = x.transpose(1, 2).contiguous().transpose(1, 2)[:, ::3]   # GQA kv heads of a transposed view
    got = prf_features(bthd.to(DEV), w.to(DEV), log_c.to(DEV), "row", backend="triton")
    assert got.shape == (2, 6, 37, 13) and got.stride(1) < got.stride(2) and got.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(got.double().cpu(), definition(bthd.repeat_interleave(3, 1), w, log_c, "row"),
                               rtol=2e-5, atol=1e-6)
    plain = prf_features(x.to(DEV), w.to(DEV), log_c.to(DEV), "row", backend="triton")
    assert plain.is_contiguous()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("shift", ["row", "seq", "tensor"])
def test_compiled_inference_calls_the_registered_op(backend, shift, monkeypatch):
    """Under torch.compile (inductor, fullgraph) an inference call is the opaque op ``fastattn::prf_features``:
    the same backend as eager runs (counted), and the result, read by the fake's strides, equals fp64 for GQA
    keys in HF's transposed layout."""
    from fastattn.ops.prf_features import interface
    calls = []
    eager_forward = interface._forward
    monkeypatch.setattr(interface, "_forward", lambda *a: calls.append(a[-1]) or eager_forward(*a))
    x, w, log_c = _inputs(2, 6, 37, 8, 13, torch.float32)
    bthd = x.transpose(1, 2).contiguous().transpose(1, 2)[:, ::3]
    s = torch.randn(6) if shift == "tensor" else shift
    args = [t.to(DEV) for t in (bthd, w, log_c)] + [s.to(DEV) if shift == "tensor" else s]

    def f(x, w, log_c, s):   # an op after the features: its compiled kernel reads Phi by the fake's strides
        return prf_features(x, w, log_c, s, backend=backend) * 2.0 + 1.0

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(f, fullgraph=True)(*args)
    assert calls == [backend]
    want = 2.0 * definition(bthd.repeat_interleave(3, 1), w, log_c, s) + 1.0
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-6)


def test_feature_map_takes_grouped_keys():
    fm = feature_maps.build("prf", 8, 5, 6, generator=torch.Generator().manual_seed(0))
    k = torch.randn(1, 2, 11, 8)
    torch.testing.assert_close(fm(k, "k"), fm(k.repeat_interleave(3, 1), "k"))
    with pytest.raises(ValueError, match="or a divisor of the heads"):
        fm(torch.randn(1, 4, 11, 8), "k")


def test_input_errors():
    x, w, log_c = _inputs(1, 2, 4, 8, 5, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        prf_features(x, w[..., :5], log_c)
    with pytest.raises(ValueError, match="must be a multiple of it"):
        prf_features(x, w[:1], log_c[:1])
    with pytest.raises(ValueError, match="log_scale must be"):
        prf_features(x, w, log_c[:, :3])
    with pytest.raises(ValueError, match="shift must be one of"):
        prf_features(x, w, log_c, "max")
    with pytest.raises(ValueError, match="a shift tensor must be"):
        prf_features(x, w, log_c, torch.zeros(3))
    with pytest.raises(RuntimeError, match="cannot run prf_features"):
        prf_features(x.double(), w, log_c, backend="triton")


@needs_triton
@pytest.mark.parametrize("name", ["prf", "performer"])
def test_feature_maps_inference_path_equals_training_path(name, monkeypatch):
    """The maps' no-grad forward (fused kernel under FASTATTN_BACKEND=triton) equals their autograd forward (the
    torch definition) for queries, uncalibrated keys and calibrated keys."""
    monkeypatch.setenv("FASTATTN_BACKEND", "triton")
    fm = feature_maps.build(name, 16, 21, 3).to(DEV)
    x = torch.randn(2, 3, 33, 16, device=DEV)
    for calibrate in (False, True):
        if calibrate:
            fm.calibrate_key_shift(x)
        for role in ("q", "k"):
            with torch.no_grad():
                fast = fm(x, role)
            slow = fm(x.clone().requires_grad_(), role).detach()
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [64, 241])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_on_gpu_at_model_sizes(M, dtype):
    """The compiled kernel at a SmolLM2 layer's size (9 heads, head dim 64, T = 4099) against the fp64 definition,
    every shift mode."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, w, log_c = _inputs(1, 9, 4099, 64, M, dtype, seed=2)
    for shift in ("row", "seq", "none", torch.randn(9) + 8.0):
        ref = definition(x, w, log_c, shift)
        got = prf_features(x.cuda(), w.cuda(), log_c.cuda(), shift.cuda() if isinstance(shift, torch.Tensor)
                           else shift, backend="triton")
        err = ((got.cpu().double() - ref).abs() / ref.abs().amax()).max().item()
        assert got.dtype == dtype and err <= TOL[dtype], (str(shift)[:10], err)
    # SmolLM2's keys: 3 kv heads for 9 feature heads, a [B, T, H, d] projection viewed as [B, H, T, d]
    kv = x[:, ::3].transpose(1, 2).contiguous().transpose(1, 2)
    for shift in ("row", torch.randn(9) + 8.0):
        ref = definition(kv.repeat_interleave(3, 1), w, log_c, shift)
        got = prf_features(kv.cuda(), w.cuda(), log_c.cuda(), shift.cuda() if isinstance(shift, torch.Tensor)
                           else shift, backend="triton")
        err = ((got.cpu().double() - ref).abs() / ref.abs().amax()).max().item()
        assert got.transpose(1, 2).is_contiguous() and err <= TOL[dtype], ("grouped", str(shift)[:10], err)
