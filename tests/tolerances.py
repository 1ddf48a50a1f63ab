"""The one place where test tolerances live.

fp32/fp64: fixed atol/rtol, relative to the size of the reference. fp16/bf16: the error of the fast path
against the fp64 reference may be at most 2x the error of the same-dtype torch reference, plus a small atol.
A failure reports the mismatch count and the first indices.
"""
from __future__ import annotations

import torch

RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}
LOW_PRECISION_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _report(name: str, got: torch.Tensor, ref: torch.Tensor, bad: torch.Tensor, bound: str) -> str:
    idx = bad.nonzero()[:5].tolist()
    err = (got - ref).abs()
    return (f"{name}: {int(bad.sum())}/{bad.numel()} mismatches ({bound}); max abs err {err.max().item():.3e}; "
            f"first indices {idx}; got {[got[tuple(i)].item() for i in idx]} "
            f"ref {[ref[tuple(i)].item() for i in idx]}")


def assert_close(name: str, got: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                 same_dtype_ref: torch.Tensor | None = None, scale: float | None = None) -> None:
    """``got`` (any dtype) against the fp64 reference. ``dtype`` is the computation dtype of the inputs.

    For fp16/bf16 pass ``same_dtype_ref``: the torch reference's result from the same low-precision inputs.
    """
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    got = got.detach().double()
    ref64 = ref64.detach().double()
    assert torch.isfinite(got).all(), _report(name, got, ref64, ~torch.isfinite(got), "non-finite values")
    if got.numel() == 0:
        return
    scale = max(1.0, ref64.abs().max().item()) if scale is None else scale
    if dtype in RTOL:
        tol = ATOL[dtype] * scale + RTOL[dtype] * ref64.abs()
        bad = (got - ref64).abs() > tol
        assert not bad.any(), _report(name, got, ref64, bad, f"atol {ATOL[dtype]}*{scale:.3g}, rtol {RTOL[dtype]}")
        return
    assert same_dtype_ref is not None, f"{name}: low-precision checks need the same-dtype reference"
    ref_err = (same_dtype_ref.detach().double() - ref64).abs().max().item()
    bound = 2 * ref_err + LOW_PRECISION_ATOL[dtype] * scale
    err = (got - ref64).abs()
    bad = err > bound
    assert not bad.any(), _report(name, got, ref64, bad, f"2 x same-dtype reference error {ref_err:.3e} + atol")


def assert_replay_matches_eager(name: str, graph: torch.Tensor, eager: torch.Tensor, eager_again: torch.Tensor,
                                rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """A CUDA-graph replay against eager execution of the same steps. GPU kernels that reduce with atomics are
    not bitwise deterministic, and training amplifies that, so the bound is rtol/atol plus 4x the spread of two
    eager runs (0 for deterministic kernels: then this is the plain rtol/atol check). NaN must match NaN."""
    assert graph.shape == eager.shape, f"{name}: shape {tuple(graph.shape)} != {tuple(eager.shape)}"
    g, e, e2 = (t.detach().double() for t in (graph, eager, eager_again))
    nan = e.isnan()
    assert bool((g.isnan() == nan).all()), f"{name}: NaN where eager has none, or the reverse"
    g, e, e2 = (t.masked_fill(nan, 0.0) for t in (g, e, e2.nan_to_num(0.0)))
    bad = (g - e).abs() > atol + rtol * e.abs() + 4 * (e2 - e).abs()
    assert not bool(bad.any()), _report(name, g, e, bad, f"rtol {rtol}, atol {atol} + 4x eager spread")
