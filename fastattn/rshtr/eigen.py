"""The homogenized step: the leftmost eigenpair of F = [[Hs, gs], [gs^T, -delta]] (dense or Lanczos), in fp64.

With F (v, t) = -theta (v, t): if t != 0, d = v / t solves (Hs + theta I) d = -gs with Hs + theta I >= 0 and
theta >= delta >= 0, gs.d = delta - theta and the model value gs.d + d^T Hs d / 2 = -(theta - delta)/2 -
theta |d|^2 / 2. When |t| < nu the step is the negative-curvature direction -sign(gs.v) v.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

F64 = torch.float64


@dataclass
class HomogenizedStep:
    d: Tensor              # [s] fp64 subspace step
    theta: float           # -(leftmost eigenvalue of F)
    t: float               # last component of the unit eigenvector
    v: Tensor              # [s] first s components
    small_t: bool          # |t| < nu: negative-curvature branch
    slope: float           # gs . d
    curvature: float       # d^T Hs d
    residual: float        # |F w + theta w| of the returned pair
    matvecs: int           # products with F (Lanczos) or 0 (dense)


def homogenized_matrix(Hs: Tensor, gs: Tensor, delta: float) -> Tensor:
    s = gs.shape[0]
    F = torch.empty(s + 1, s + 1, dtype=F64, device=gs.device)
    F[:s, :s] = Hs.to(F64)
    F[:s, s] = gs.to(F64)
    F[s, :s] = gs.to(F64)
    F[s, s] = -delta
    return F


def lanczos_leftmost(matvec: Callable[[Tensor], Tensor], dim: int, iters: int, tol: float,
                     q0: Tensor) -> tuple[float, Tensor, int]:
    """Leftmost eigenpair of a symmetric operator by Lanczos with full reorthogonalisation.

    matvec: [dim] fp64 -> [dim]; iters: at most this many steps (<= dim); q0: start vector [dim].
    Returns (eigenvalue, unit eigenvector [dim], matvecs used)."""
    iters = min(iters, dim)
    Q = torch.zeros(iters, dim, dtype=F64, device=q0.device)
    alpha, beta = [], []
    q = q0 / q0.norm()
    for j in range(iters):
        Q[j] = q
        w = matvec(q)
        a = torch.dot(q, w)
        w = w - a * q - (beta[-1] * Q[j - 1] if j > 0 else 0.0)
        for _ in range(2):                                   # full reorthogonalisation, twice is enough
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        alpha.append(a)
        b = w.norm()
        T = torch.diag(torch.stack(alpha))
        if j > 0:
            off = torch.stack(beta)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        y = evecs[:, 0]
        scale = max(1.0, evals.abs().max().item())
        if (b * y[-1].abs()).item() <= tol * scale or b.item() <= 1e-300 or j == iters - 1:
            return evals[0].item(), Q[: j + 1].T @ y, j + 1
        beta.append(b)
        q = w / b
    raise AssertionError("unreachable")


def homogenized_step(gs: Tensor, delta: float, nu: float, Hs: Tensor | None = None,
                     hvp: Callable[[Tensor], Tensor] | None = None, solver: str = "dense",
                     lanczos_iters: int | None = None, lanczos_tol: float = 1e-12, seed: int = 0) -> HomogenizedStep:
    """The step of one iteration from gs [s] and either Hs [s, s] or ``hvp`` (u [s] -> Hs u, matrix-free)."""
    gs = gs.to(F64)
    s = gs.shape[0]
    if Hs is not None:
        F = homogenized_matrix(Hs, gs, delta)

        def hs_mv(u):
            return F[:s, :s] @ u
    elif hvp is not None:
        F = None
        hs_mv = hvp
    else:
        raise ValueError("homogenized_step needs Hs or hvp")
    matvecs = 0
    if solver == "dense":
        if F is None:
            raise ValueError("the dense eigen solver needs Hs")
        evals, evecs = torch.linalg.eigh(F)
        lam, w = evals[0].item(), evecs[:, 0]
    elif solver == "lanczos":
        def f_mv(w):
            u, t = w[:s], w[s]
            return torch.cat([hs_mv(u) + gs * t, (torch.dot(gs, u) - delta * t).reshape(1)])

        gen = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
        q0 = torch.randn(s + 1, generator=gen, dtype=F64).to(gs.device)
        lam, w, matvecs = lanczos_leftmost(f_mv, s + 1, lanczos_iters or s + 1, lanczos_tol, q0)
    else:
        raise ValueError(f"eigen solver must be 'dense' or 'lanczos', got {solver!r}")
    theta = -lam
    v, t = w[:s], w[s].item()
    if abs(t) >= nu:
        d = v / t
        small_t = False
    else:
        sgn = 1.0 if torch.dot(gs, v).item() >= 0 else -1.0
        d = -sgn * v
        small_t = True
    if F is not None:
        curvature = torch.dot(d, F[:s, :s] @ d).item()
        residual = (F @ w - lam * w).norm().item()
    else:   # from F w = lam w, without another HVP
        vHv = -theta * torch.dot(v, v).item() - t * torch.dot(gs, v).item()
        curvature = vHv / (t * t) if not small_t else vHv
        residual = float("nan")
    return HomogenizedStep(d, theta, t, v, small_t, torch.dot(gs, d).item(), curvature, residual, matvecs)
