"""fastattn.seq_logps against fp64 full logits + log_softmax + gather: values, gradients, dtypes, masks,
input errors, the registered ops (opcheck) and the bounded temporaries of the chunked backend."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn.ops.seq_logps import reference as ref_mod
from fastattn.ops.seq_logps.reference import seq_logps_reference

from .tolerances import assert_close

D = 24


def _inputs(B, T, V, d=D, dtype=torch.float64, p=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, d, generator=g, dtype=torch.float64) / d ** 0.25).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < p
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    return hidden, weight, labels, mask


def _ref_grads(hidden, weight, labels, mask, grad, dtype=torch.float64):
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    out = seq_logps_reference(h, w, labels, mask, dtype=dtype)
    dh, dw = torch.autograd.grad(out, (h, w), grad.to(dtype))
    return out.detach(), dh, dw


def _ours(hidden, weight, labels, mask, grad, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fastattn.seq_logps(h, w, labels, mask, **kw)
    dh, dw = torch.autograd.grad(out, (h, w), grad.to(out.dtype))
    return out.detach(), dh, dw


SHAPES = [(1, 1, 1000), (2, 37, 1000), (3, 37, 4099), (4, 1, 4099)]
CHUNKS = [dict(), dict(token_chunk=29, vocab_chunk=1024)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunks", CHUNKS, ids=["default", "small"])
@pytest.mark.parametrize("B,T,V", SHAPES)
def test_values_and_grads(B, T, V, chunks, dtype):
    hidden, weight, labels, mask = _inputs(B, T, V, dtype=dtype, p=0.7 if T > 1 else 1.0)
    grad = torch.randn(B, dtype=torch.float64)
    out, dh, dw = _ours(hidden, weight, labels, mask, grad, **chunks)
    r, rdh, rdw = _ref_grads(hidden, weight, labels, mask, grad)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_close("logps", out, r, dtype)
    assert_close("dhidden", dh, rdh, dtype)
    assert_close("dweight", dw, rdw, dtype)


@pytest.mark.parametrize("B,T,V", [(2, 37, 1000), (3, 37, 4099)])
def test_bf16_within_2x_same_dtype_reference(B, T, V):
    dtype = torch.bfloat16
    hidden, weight, labels, mask = _inputs(B, T, V, dtype=dtype)
    grad = torch.randn(B, dtype=torch.float64)
    out, dh, dw = _ours(hidden, weight, labels, mask, grad, token_chunk=16, vocab_chunk=1024)
    r, rdh, rdw = _ref_grads(hidden, weight, labels, mask, grad)             # fp64 from the bf16 inputs
    s, sdh, sdw = _ref_grads(hidden, weight, labels, mask, grad, dtype=dtype)  # full logits in bf16
    assert out.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    assert_close("logps", out, r, dtype, same_dtype_ref=s)
    assert_close("dhidden", dh, rdh, dtype, same_dtype_ref=sdh)
    assert_close("dweight", dw, rdw, dtype, same_dtype_ref=sdw)


def test_empty_rows_and_unmasked_positions_ignored():
    hidden, weight, labels, mask = _inputs(4, 37, 1000)
    mask[1] = False
    mask[3] = False
    mask[0, 5] = True
    out = fastattn.seq_logps(hidden, weight, labels.clamp_min(0), mask)
    assert out[1].item() == 0.0 and out[3].item() == 0.0
    # labels and hidden states outside the mask do not matter (labels may be anything, e.g. -100 or >= V)
    labels2 = torch.where(mask, labels, torch.randint(-1000, 5000, labels.shape))
    hidden2 = torch.where(mask[..., None], hidden, torch.randn_like(hidden) * 100).requires_grad_()
    out2 = fastattn.seq_logps(hidden2, weight, labels2, mask, vocab_chunk=300)
    torch.testing.assert_close(out2.detach(), out, rtol=1e-12, atol=1e-12)
    (dh,) = torch.autograd.grad(out2.sum(), hidden2)
    assert (dh[~mask] == 0).all()
    assert (dh[mask].abs().sum(-1) > 0).all()


def test_all_masked_out_and_empty_T():
    hidden, weight, labels, mask = _inputs(2, 5, 100)
    w = weight.clone().requires_grad_()
    out = fastattn.seq_logps(hidden, w, labels, torch.zeros_like(mask))
    assert torch.equal(out, torch.zeros(2, dtype=torch.float64))
    (dw,) = torch.autograd.grad(out.sum(), w)
    assert (dw == 0).all()
    h0 = hidden[:, :0]
    assert torch.equal(fastattn.seq_logps(h0, weight, labels[:, :0], mask[:, :0]), torch.zeros(2, dtype=torch.float64))


def test_gradcheck_small():
    hidden, weight, labels, mask = _inputs(2, 5, 11, d=4, p=0.7)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    torch.autograd.gradcheck(lambda h, w: fastattn.seq_logps(h, w, labels, mask, token_chunk=2, vocab_chunk=3),
                             (h, w))


def test_int32_labels_no_grad_and_backend_names(monkeypatch):
    hidden, weight, labels, mask = _inputs(2, 9, 50)
    want = seq_logps_reference(hidden, weight, labels, mask)
    with torch.no_grad():
        got = fastattn.seq_logps(hidden, weight, labels.clamp_min(0).int(), mask, backend="torch")
    assert_close("logps", got, want, torch.float64)
    with pytest.raises(RuntimeError, match="cannot run seq_logps"):
        fastattn.seq_logps(hidden, weight, labels, mask, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        fastattn.seq_logps(hidden, weight, labels, mask, backend="bogus")
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    assert_close("logps", fastattn.seq_logps(hidden, weight, labels, mask), want, torch.float64)


def _bad_cases():
    h, w, lab, m = _inputs(2, 5, 10, d=4)
    yield "hidden_rank", (h[0], w, lab, m), {}, ValueError, "hidden must be 3-D"
    yield "hidden_type", (h.numpy(), w, lab, m), {}, TypeError, "hidden must be a torch.Tensor"
    yield "hidden_int", (h.long(), w.long(), lab, m), {}, TypeError, "hidden must be a floating"
    yield "weight_rank", (h, w[None], lab, m), {}, ValueError, "weight must be 2-D"
    yield "weight_d", (h, w[:, :3], lab, m), {}, ValueError, "weight must be \\[V, d\\] with hidden's d=4"
    yield "weight_dtype", (h, w.float(), lab, m), {}, TypeError, "weight must have hidden's dtype"
    yield "weight_empty", (h, w[:0], lab, m), {}, ValueError, "empty dimension"
    yield "labels_shape", (h, w, lab[:, :4], m), {}, ValueError, "labels must be \\[B, T\\] = \\(2, 5\\)"
    yield "labels_float", (h, w, lab.double(), m), {}, TypeError, "labels must be an integer"
    yield "mask_shape", (h, w, lab, m[:1]), {}, ValueError, "mask must be \\[B, T\\]"
    yield "mask_dtype", (h, w, lab, m.long()), {}, TypeError, "mask must be a bool"
    bad = torch.where(m, torch.full_like(lab, 10), lab)
    yield "labels_range", (h, w, bad, m), {}, ValueError, "labels at mask=True positions must lie in \\[0, V=10\\)"
    yield "chunk", (h, w, lab, m), {"vocab_chunk": 0}, ValueError, "vocab_chunk must be a positive int"
    yield "chunk_type", (h, w, lab, m), {"token_chunk": 2.5}, ValueError, "token_chunk must be a positive int"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, args, kw, exc, msg = case
    with pytest.raises(exc, match=msg):
        fastattn.seq_logps(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    hidden, weight, labels, mask = _inputs(2, 6, 37, d=8, dtype=dtype)
    mask[1] = False
    hidden.requires_grad_()
    weight.requires_grad_()
    fwd_args = (hidden, weight, labels, mask, 4, 16, "auto")
    torch.library.opcheck(torch.ops.fastattn.seq_logps_fwd.default, fwd_args)
    _, lse = torch.ops.fastattn.seq_logps_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                 for a in fwd_args])
    grad = torch.randn(2, dtype=lse.dtype)
    torch.library.opcheck(torch.ops.fastattn.seq_logps_bwd.default,
                          (grad, hidden.detach(), weight.detach(), labels, mask, lse, 4, 16, "torch"))


def test_compile_fullgraph_aot_eager():
    hidden, weight, labels, mask = _inputs(2, 7, 40, dtype=torch.float32)
    f = torch.compile(lambda h, w: fastattn.seq_logps(h, w, labels, mask, vocab_chunk=16), fullgraph=True,
                      backend="aot_eager")
    h = hidden.clone().requires_grad_()
    out = f(h, weight)
    out.sum().backward()
    r, rdh, _ = _ref_grads(hidden, weight, labels, mask, torch.ones(2, dtype=torch.float64))
    assert_close("logps", out.detach(), r, torch.float32)
    assert_close("dhidden", h.grad, rdh, torch.float32)


class _Sizes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_no_full_logits_tensor():
    """Forward and backward of the chunked backend never allocate more than one [token_chunk, vocab_chunk]
    tile of logits: every temporary is bounded by max(tile, V*d, B*T*d), all far below B*T*V."""
    B, T, V, d = 2, 37, 4099, D
    tc, vc = 32, 1024
    hidden, weight, labels, mask = _inputs(B, T, V, d=d, dtype=torch.float32, p=1.0)
    bound = max(tc * vc, V * d, B * T * d)
    assert bound * 2 < B * T * V
    with _Sizes() as rec:
        logps, lse = ref_mod.forward(hidden, weight, labels, mask, tc, vc)
        ref_mod.backward(torch.ones(B), hidden, weight, labels, mask, lse, tc, vc)
    numel = [(f, s, torch.Size(s).numel()) for f, s in rec.shapes]
    big = [x for x in numel if x[2] > bound]
    assert not big, f"temporaries above {bound} elements: {big[:5]}"
    assert not any(len(s) >= 2 and s[-1] == V and s[0] > 1 and f != "aten.t.default" for f, s, _ in numel
                   if s != (V, d)), "a [*, V] logits tensor was allocated"
    assert any(s == (tc, vc) for _, s, _ in numel), "the [token_chunk, vocab_chunk] tile was not used"
    assert_close("logps", logps, seq_logps_reference(hidden, weight, labels, mask, dtype=torch.float64),
                 torch.float32)
