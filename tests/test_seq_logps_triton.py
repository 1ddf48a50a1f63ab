"""The Triton backend of fastattn.seq_logps against fp64 full logits: values and both gradients on ragged
shapes (V, d and the row count not multiples of the tiles), vocab splits, backward chunks, strided hidden,
masks, the bf16/fp16 rule. On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, conftest)."""
from __future__ import annotations

import os

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.ops.seq_logps import triton as tr

from .test_seq_logps import _inputs, _ours, _ref_grads
from .tolerances import assert_close

pytestmark = pytest.mark.skipif(not backends.availability("triton")[0]
                                or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs triton on a GPU or in the interpreter")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, params=tr._STRATEGIES)
def strategy(request, monkeypatch):
    """Every test runs under both strategies: fused Triton GEMM tiles, and cuBLAS logits chunks + row kernels."""
    monkeypatch.setattr(tr, "STRATEGY", request.param)
    return request.param


def _on(dev, *ts):
    return [t.to(dev) for t in ts]


def _check(B, T, V, d, dtype, splits=None, token_chunk=None, p=0.7, transpose=False, monkeypatch=None, seed=0):
    hidden, weight, labels, mask = _inputs(B, T, V, d=d, dtype=dtype, p=1.0 if T == 1 else p, seed=seed)
    if transpose:   # a [B, T, d] view of [T, B, d] memory (strided rows, as HF's transposed activations)
        hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    grad = torch.randn(B, dtype=torch.float64)
    monkeypatch.setattr(tr, "VOCAB_SPLITS", splits)
    h, w, lab, m, g = _on(DEV, hidden, weight, labels, mask, grad)
    out, dh, dw = _ours(h, w, lab, m, g, backend="triton", token_chunk=token_chunk)
    r, rdh, rdw = _ref_grads(hidden, weight, labels, mask, grad)
    assert out.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    same = {}
    if dtype in (torch.bfloat16, torch.float16):
        s, sdh, sdw = _ref_grads(hidden, weight, labels, mask, grad, dtype=dtype)
        same = dict(logps=s, dhidden=sdh, dweight=sdw)
    for name, got, ref in (("logps", out, r), ("dhidden", dh, rdh), ("dweight", dw, rdw)):
        assert_close(name, got.cpu(), ref, dtype, same_dtype_ref=same.get(name))
    return m, dh


@pytest.mark.parametrize("B,T,V,d,splits,token_chunk", [
    (1, 1, 37, 24, None, None),          # one row, one partial vocab tile
    (2, 9, 100, 24, 1, None),            # V = 3 tiles + 4 columns, d = 16 + 8
    (2, 9, 100, 40, 3, 5),               # 3 vocab splits (the last one short), 5-row backward chunks
    (3, 13, 257, 17, 2, 16),             # rows, V and d all ragged; chunk = one row tile
    (2, 21, 300, 24, None, 7),           # default splits (one tile each in the interpreter), ragged chunks
])
def test_fp32_values_and_grads(B, T, V, d, splits, token_chunk, monkeypatch):
    _check(B, T, V, d, torch.float32, splits, token_chunk, monkeypatch=monkeypatch)


def test_flattened_forward_loop(monkeypatch):
    """The bench sweep's flattened (vocab tile, K slice) forward loop: same values and gradients."""
    monkeypatch.setattr(tr, "CONFIG_OVERRIDE", {"flat": True})
    _check(2, 9, 100, 40, torch.float32, splits=3, token_chunk=5, monkeypatch=monkeypatch)


def test_strided_hidden_and_masks(monkeypatch):
    m, dh = _check(3, 11, 100, 24, torch.float32, splits=2, token_chunk=6, p=0.5, transpose=True,
                   monkeypatch=monkeypatch)
    assert (dh[~m] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_2x_same_dtype_reference(dtype, monkeypatch):
    _check(2, 13, 257, 24, dtype, splits=3, token_chunk=9, monkeypatch=monkeypatch)


def test_empty_rows_all_masked_and_fp64_refused(monkeypatch):
    monkeypatch.setattr(tr, "VOCAB_SPLITS", None)
    hidden, weight, labels, mask = _on(DEV, *_inputs(3, 7, 50, dtype=torch.float32))
    mask[1] = False
    out = fastattn.seq_logps(hidden, weight, labels, mask, backend="triton")
    want = fastattn.seq_logps(hidden, weight, labels, mask, backend="torch")
    assert out[1].item() == 0.0
    assert_close("logps", out.cpu(), want.double().cpu(), torch.float32)
    w = weight.clone().requires_grad_()
    none = fastattn.seq_logps(hidden, w, labels, torch.zeros_like(mask), backend="triton")
    assert (none == 0).all()
    (dw,) = torch.autograd.grad(none.sum(), w)
    assert (dw == 0).all()
    with pytest.raises(RuntimeError, match="fp64 .* served by the torch backend"):
        fastattn.seq_logps(hidden.double(), weight.double(), labels, mask, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_realistic_shape(dtype, monkeypatch):
    """SmolLM2's lm head (V = 49,152, d = 576) on 2 x 600 tokens, prompt half masked out."""
    _check(2, 600, 49152, 576, dtype, p=0.5, monkeypatch=monkeypatch)
