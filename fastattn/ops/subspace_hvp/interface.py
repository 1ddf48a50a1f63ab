"""Public ``subspace_hvp``: input checks, backend dispatch and the registered GLM op.

``fastattn::subspace_hvp_glm`` is a torch.library op (with a fake implementation) that picks its backend at run
time through ``backends.resolve`` on (A, x[, P]); the general autodiff paths are plain torch.func code.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ... import backends
from . import reference
from .glm import GLM, LOSSES, REGULARISERS
from .sketch import Sketch, coordinate_indices

OP = "subspace_hvp"
_FLOAT = (torch.float32, torch.float64)


@torch.library.custom_op("fastattn::subspace_hvp_glm", mutates_args=())
def _glm_op(A: Tensor, x: Tensor, y: Tensor, P: Tensor | None, s: int, sketch: int, seed: int, scale: float,
            loss: int, reg: int, lam: float, loss_scale: float, backend: str) -> tuple[Tensor, Tensor]:
    tensors = (A, x, P if P is not None else x.new_empty(s, 0))   # the verifiers read s from P's rows
    impl = backends.get(OP, backends.resolve(OP, backend, *tensors))
    return impl.glm(A, x, y, P, s, sketch, seed, scale, loss, reg, lam, loss_scale)


@_glm_op.register_fake
def _(A, x, y, P, s, sketch, seed, scale, loss, reg, lam, loss_scale, backend):
    return x.new_empty(s), x.new_empty(s, s)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_x_P(x, P, n: int | None) -> int:
    if not isinstance(x, Tensor) or x.dim() != 1:
        raise ValueError(f"x must be a 1-D tensor [n], got {_shape(x)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"x must have n = {n} entries (columns of A), got {x.shape[0]}")
    if isinstance(P, Sketch):
        return P.s
    if not isinstance(P, Tensor) or P.dim() != 2 or P.shape[1] != x.shape[0]:
        raise ValueError(f"P must be a Sketch or a tensor [s, n] with n = {x.shape[0]}, got {_shape(P)}")
    if P.dtype != x.dtype or P.device != x.device:
        raise TypeError(f"P must match x's dtype/device ({x.dtype}, {x.device}), got ({P.dtype}, {P.device})")
    if P.shape[0] < 1:
        raise ValueError("P must have at least one row")
    return P.shape[0]


def subspace_hvp(fun_or_glm: GLM | Callable[[Tensor], Tensor], x: Tensor, P: Tensor | Sketch, *,
                 backend: str = "auto", chunk_size: int | None = None, mode: str = "hvp") -> tuple[Tensor, Tensor]:
    """Gradient and Hessian of f restricted to the rows of P: ``(P grad f(x) [s], P H(x) P^T [s, s])``.

    fun_or_glm: a ``GLM`` (fused kernels: the backends "torch", "cpu", "triton", "cuda"; B = A P^T never goes
        through memory except on "torch"), or any differentiable ``fun(x [n]) -> 0-d tensor`` (autodiff,
        backend "torch" only).
    x: [n], fp32 or fp64.
    P: [s, n] of x's dtype/device, or a ``Sketch`` (gaussian / rademacher: generated inside the GLM kernels from
        the seed; coordinate: the GLM path gathers the s columns of A, whatever ``backend``; other kinds and the
        general path materialise P first).
    chunk_size: rows of P per vmapped forward-over-reverse batch (general path; None: all s at once).
    mode: general path only: "hvp" (vmap(jvp(grad f))), "vjp" (vmap(vjp(grad f))) or "restricted" (Hessian of
        u -> f(x + P^T u) at 0).
    Returns PHPt symmetrised, in x's dtype.
    """
    if isinstance(fun_or_glm, GLM):
        glm = fun_or_glm
        s = _check_x_P(x, P, glm.n)
        if x.dtype != glm.A.dtype or x.device != glm.A.device:
            raise TypeError(f"x must match A's dtype/device ({glm.A.dtype}, {glm.A.device}), got "
                            f"({x.dtype}, {x.device})")
        if x.dtype not in _FLOAT:
            raise TypeError(f"the GLM path takes float32 or float64, got {x.dtype}")
        if isinstance(P, Sketch) and P.kind == "coordinate":   # a gather and one m x s product, on any backend
            return reference.glm_columns(glm, x.detach(), coordinate_indices(P, glm.n), P.scale)
        if isinstance(P, Sketch):
            if P.code == 0:
                Pt, code, seed, scale = P.materialize(glm.n, x.dtype, x.device), 0, 0, 1.0
            else:
                Pt, code, seed, scale = None, P.code, P.seed, P.scale
        else:
            Pt, code, seed, scale = P, 0, 0, 1.0
        return _glm_op(glm.A, x.detach(), glm.y, Pt, s, code, int(seed) & 0xFFFFFFFF, float(scale),
                       LOSSES[glm.loss].code, REGULARISERS[glm.reg].code, float(glm.lam), float(glm.loss_scale),
                       backend)
    if not callable(fun_or_glm):
        raise TypeError(f"fun_or_glm must be a GLM or a callable f(x) -> scalar, got {type(fun_or_glm).__name__}")
    _check_x_P(x, P, None)
    if backends.requested(backend) not in ("auto", "torch"):
        raise RuntimeError(f"fastattn: backend {backend!r} cannot run {OP} on a general function: only the GLM "
                           "path has kernels; use backend='torch' or 'auto'")
    if mode not in reference.AUTODIFF_MODES:
        raise ValueError(f"mode must be one of {sorted(reference.AUTODIFF_MODES)}, got {mode!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(P, Sketch):
        P = P.materialize(x.shape[0], x.dtype, x.device)
    return reference.AUTODIFF_MODES[mode](fun_or_glm, x, P, chunk_size)
