"""Plain-torch subspace HVPs: the ground truth (fp64) and the backend "torch" of the GLM op.

General paths (any differentiable ``fun``; x [n], P [s, n]):
- ``forward_over_reverse``: H P^T row by row as ``vmap(jvp(grad f))`` over the s rows of P, in chunks of
  ``chunk_size`` rows to bound memory (s x n tangents live at once otherwise); then P (H P^T), symmetrised.
- ``vjp_of_grad``: reverse-over-reverse, vmap of the vjp of grad f (also the fallback of the above when an op's
  forward-mode formula fails).
- ``restricted``: the Hessian of phi(u) = f(x + P^T u) at u = 0 (torch.func.hessian), the same matrix.
- ``reverse_over_reverse``: from a gradient built with ``create_graph=True`` (closures of nn.Modules, where f
  cannot be re-traced functionally): one batched backward per chunk of rows (``is_grads_batched``).

GLM path (``glm``): with B = A P^T, P g = B^T loss' + P reg', P H P^T = B^T diag(loss'') B + P diag(reg'') P^T,
B formed ``row_chunk`` rows at a time (this is the "unfused torch matmuls" path: B goes through memory).
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import Tensor

from .glm import GLM, LOSSES, REGULARISERS
from .sketch import Sketch

ROW_CHUNK = 8192
log = logging.getLogger("fastattn")


def symmetrize(H: Tensor) -> Tensor:
    return 0.5 * (H + H.T)


def forward_over_reverse(fun: Callable[[Tensor], Tensor], x: Tensor, P: Tensor,
                         chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(P g [s], P H P^T [s, s]) by forward-over-reverse autodiff, vmapped over rows of P [s, n]."""
    x = x.detach()
    grad_f = torch.func.grad(fun)

    def hvp(v: Tensor) -> Tensor:
        return torch.func.jvp(grad_f, (x,), (v,))[1]

    g = grad_f(x)
    try:
        HPt = torch.func.vmap(hvp, chunk_size=chunk_size)(P)    # [s, n], row i = H p_i
    except RuntimeError as e:
        if "ZeroTensor" not in str(e):
            raise
        # Some ops' forward-mode formulas (torch's mse_loss backward, for one) write into ZeroTensor tangents;
        # reverse-over-reverse gives the same H P^T.
        log.info("fastattn: forward-over-reverse HVP failed (%s); using reverse-over-reverse", e)
        return vjp_of_grad(fun, x, P, chunk_size)
    return P @ g, symmetrize(P @ HPt.T)


def vjp_of_grad(fun: Callable[[Tensor], Tensor], x: Tensor, P: Tensor,
                chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(P g, P H P^T) by reverse-over-reverse: vmap of the vjp of grad f (H is symmetric, so vjp = HVP)."""
    g, vjp_fn = torch.func.vjp(torch.func.grad(fun), x.detach())
    HPt = torch.func.vmap(lambda v: vjp_fn(v)[0], chunk_size=chunk_size)(P)
    return P @ g, symmetrize(P @ HPt.T)


def restricted(fun: Callable[[Tensor], Tensor], x: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
    """(grad phi(0), hess phi(0)) of the restricted function phi(u) = f(x + P^T u), u [s]."""
    x = x.detach()

    def phi(u: Tensor) -> Tensor:
        return fun(x + P.T @ u)

    u0 = torch.zeros(P.shape[0], dtype=x.dtype, device=x.device)
    return torch.func.grad(phi)(u0), symmetrize(torch.func.hessian(phi)(u0))


def reverse_over_reverse(grads: Sequence[Tensor], params: Sequence[Tensor], P: Tensor,
                         chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """(P g, P H P^T) from ``grads`` = autograd.grad(loss, params, create_graph=True); P [s, n] with
    n = total numel of params, columns in the order of ``params`` (each flattened)."""
    g = torch.cat([t.reshape(-1) for t in grads])
    s = P.shape[0]
    step = s if chunk_size is None else max(1, chunk_size)
    rows = []
    for i in range(0, s, step):
        V = P[i:i + step]
        hv = torch.autograd.grad(g, params, grad_outputs=V, is_grads_batched=True, retain_graph=True,
                                 allow_unused=True)
        rows.append(torch.cat([(torch.zeros(V.shape[0], p.numel(), dtype=V.dtype, device=V.device) if h is None
                                else h.reshape(V.shape[0], -1)) for h, p in zip(hv, params)], dim=1))
    HPt = torch.cat(rows).detach()
    return P @ g.detach(), symmetrize(P @ HPt.T)


AUTODIFF_MODES = {"hvp": forward_over_reverse, "vjp": vjp_of_grad,
                  "restricted": lambda fun, x, P, chunk_size: restricted(fun, x, P)}


def glm_explicit(glm: GLM, x: Tensor, P: Tensor, row_chunk: int = ROW_CHUNK,
                 AP: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The GLM closed form in the dtype of the inputs, B = A P^T formed ``row_chunk`` rows at a time (or given
    whole as ``AP`` [m, s], e.g. formed another way)."""
    lp, lpp, rp, rpp = glm.derivatives(x)
    Pg = P @ rp
    H = (P * rpp) @ P.T
    for r in range(0, glm.m, row_chunk):
        B = glm.A[r:r + row_chunk] @ P.T if AP is None else AP[r:r + row_chunk]   # [rows, s]
        Pg = Pg + B.T @ lp[r:r + row_chunk]
        H = H + B.T @ (lpp[r:r + row_chunk, None] * B)
    return Pg, symmetrize(H)


def glm_columns(glm: GLM, x: Tensor, idx: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The GLM closed form for a coordinate sketch (P = scale * rows idx [s] of the identity): B = scale * A[:, idx]
    is a gather, so P g and P H P^T cost m s and m s^2 instead of the m n s of forming A P^T."""
    lp, lpp, rp, rpp = glm.derivatives(x)
    idx = idx.to(x.device)
    B = glm.A[:, idx] * scale                                  # [m, s]
    Pg = B.T @ lp + scale * rp[idx]
    H = B.T @ (lpp[:, None] * B) + torch.diag(scale * scale * rpp[idx])
    return Pg, symmetrize(H)


_LOSS_BY_CODE = {v.code: k for k, v in LOSSES.items()}
_REG_BY_CODE = {v.code: k for k, v in REGULARISERS.items()}
_KIND_BY_CODE = {1: "gaussian", 2: "rademacher"}


def supports(*tensors: Tensor) -> tuple[bool, str]:
    return True, ""


def glm(A: Tensor, x: Tensor, y: Tensor, P: Tensor | None, s: int, sketch: int, seed: int, scale: float,
        loss: int, reg: int, lam: float, loss_scale: float) -> tuple[Tensor, Tensor]:
    """The backend entry point (the arguments of the op fastattn::subspace_hvp_glm; ``seed`` is the raw seed,
    P None when ``sketch`` is a hashed kind code)."""
    model = GLM(A, y, _LOSS_BY_CODE[loss], _REG_BY_CODE[reg], lam, loss_scale)
    if P is None:
        P = Sketch(_KIND_BY_CODE[sketch], s, seed, scale).materialize(A.shape[1], A.dtype, A.device)
    return glm_explicit(model, x, P)
