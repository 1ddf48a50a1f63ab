"""The C++ CPU backend of fastattn.seq_logps against fp64 full logits: values and both gradients (fp64, fp32,
the bf16 rule), ragged tiles, masks, opcheck of the extension ops. Skipped when fastattn._C lacks the kernels."""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.ops.seq_logps import cpu

from .test_seq_logps import _inputs, _ours, _ref_grads
from .tolerances import assert_close

_OK, _WHY = cpu.supports(torch.empty(1, 1, 1), torch.empty(1, 1))
pytestmark = pytest.mark.skipif(not _OK, reason=f"cpu backend unavailable: {_WHY}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,T,V,d,chunks", [
    (1, 1, 37, 5, {}),
    (3, 37, 4099, 24, {}),                                           # default tiles: one token chunk, V ragged
    (3, 37, 4099, 24, dict(token_chunk=29, vocab_chunk=1000)),       # ragged token and vocab chunks
    (2, 19, 100, 33, dict(token_chunk=7, vocab_chunk=17)),           # vocab tiles below the 16-wide vectors
])
def test_values_and_grads(B, T, V, d, chunks, dtype):
    hidden, weight, labels, mask = _inputs(B, T, V, d=d, dtype=dtype, p=1.0 if T == 1 else 0.7)
    grad = torch.randn(B, dtype=torch.float64)
    out, dh, dw = _ours(hidden, weight, labels, mask, grad, backend="cpu", **chunks)
    r, rdh, rdw = _ref_grads(hidden, weight, labels, mask, grad)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_close("logps", out, r, dtype)
    assert_close("dhidden", dh, rdh, dtype)
    assert_close("dweight", dw, rdw, dtype)


def test_bf16_within_2x_same_dtype_reference():
    hidden, weight, labels, mask = _inputs(2, 37, 1000, dtype=torch.bfloat16)
    grad = torch.randn(2, dtype=torch.float64)
    out, dh, dw = _ours(hidden, weight, labels, mask, grad, backend="cpu", token_chunk=16, vocab_chunk=300)
    r, rdh, rdw = _ref_grads(hidden, weight, labels, mask, grad)
    s, sdh, sdw = _ref_grads(hidden, weight, labels, mask, grad, dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    assert_close("logps", out, r, torch.bfloat16, same_dtype_ref=s)
    assert_close("dhidden", dh, rdh, torch.bfloat16, same_dtype_ref=sdh)
    assert_close("dweight", dw, rdw, torch.bfloat16, same_dtype_ref=sdw)


def test_masks_strided_hidden_and_large_logits():
    hidden, weight, labels, mask = _inputs(4, 23, 300, dtype=torch.float32)
    mask[1] = False
    hidden = (hidden * 30).transpose(0, 1).contiguous().transpose(0, 1)    # logits ~ +-100: exp range, strides
    grad = torch.randn(4, dtype=torch.float64)
    out, dh, dw = _ours(hidden, weight, labels, mask, grad, backend="cpu", vocab_chunk=64)
    r, rdh, rdw = _ref_grads(hidden, weight, labels, mask, grad)
    assert out[1].item() == 0.0 and (dh[~mask] == 0).all()
    assert_close("logps", out, r, torch.float32)
    assert_close("dhidden", dh, rdh, torch.float32)
    assert_close("dweight", dw, rdw, torch.float32)
    w = weight.clone().requires_grad_()
    none = fastattn.seq_logps(hidden, w, labels, torch.zeros_like(mask), backend="cpu")
    (dw0,) = torch.autograd.grad(none.sum(), w)
    assert (none == 0).all() and (dw0 == 0).all()


def test_auto_picks_cpu_and_opcheck():
    from fastattn import backends
    hidden, weight, labels, mask = _inputs(2, 6, 37, d=8, dtype=torch.float32)
    assert backends.resolve("seq_logps", "auto", hidden, weight) == "cpu"
    # the raw extension ops are only called inside the registered op (which carries the fake implementation)
    fwd_args = (hidden.requires_grad_(), weight.requires_grad_(), labels, mask, 4, 16, "cpu")
    torch.library.opcheck(torch.ops.fastattn.seq_logps_fwd.default, fwd_args)
    _, lse = torch.ops.fastattn.seq_logps_fwd(hidden.detach(), weight.detach(), labels, mask, 4, 16, "cpu")
    torch.library.opcheck(torch.ops.fastattn.seq_logps_bwd.default,
                          (torch.randn(2), hidden.detach(), weight.detach(), labels, mask, lse, 4, 16, "cpu"))
