"""``minimize``: the random-subspace homogenized trust-region iteration (shared/design/RSHTR.md).

    g = grad f(x); stop if |g| <= gtol
    P [s, n] fresh (seeded by (seed, k)); gs = P g; Hs = P H P^T (s HVPs, or matrix-free Lanczos on F)
    (-theta, (v, t)) = leftmost eigenpair of [[Hs, gs], [gs^T, -delta]];  d = v / t  or  -sign(gs.v) v
    x <- x + eta P^T d   (eta from the radius rule or a backtracking line search)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..ops.subspace_hvp import GLM
from .config import RSHTROptions
from .eigen import HomogenizedStep, homogenized_step
from .linesearch import backtrack
from .oracle import Oracle
from .result import Clock, OptimizeResult
from .sketches import iteration_seed, subspace


def subspace_step(opts: RSHTROptions, k: int, gs: Tensor, Hs: Tensor | None,
                  hvp: Callable[[Tensor], Tensor] | None, seed: int) -> HomogenizedStep:
    """The homogenized step of iteration k (delta0 on the first iteration)."""
    return homogenized_step(gs, opts.delta0 if k == 0 else opts.delta, opts.nu, Hs=Hs, hvp=hvp,
                            solver=opts.eig_solver, lanczos_iters=opts.lanczos_iters, lanczos_tol=opts.lanczos_tol,
                            seed=seed)


def step_length(opts: RSHTROptions, phi: Callable[[float], float], f0: float, step: HomogenizedStep,
                D_norm: float, dtype: torch.dtype) -> tuple[float, float | None, int, bool]:
    """(eta, f(x + eta D) or None when not evaluated, function evaluations, accepted)."""
    eta0 = 1.0 if opts.radius is None else min(1.0, opts.radius / max(D_norm, 1e-300))
    if opts.step == "radius":
        return eta0, None, 0, True
    noise = opts.ls_noise * torch.finfo(dtype).eps * abs(f0)
    ls = backtrack(phi, f0, step.slope, step.curvature, eta0, opts.line_search, opts.ls_c1, opts.ls_beta, opts.ls_low,
                   opts.ls_high, opts.ls_max_iter, noise)
    return ls.eta, ls.f, ls.evals, ls.ok


def minimize(fun: GLM | Callable[[Tensor], Tensor], x0: Tensor, subspace_dim: int,
             callback: Callable[[dict], None] | None = None, **options) -> OptimizeResult:
    """Minimise ``fun`` from ``x0`` [n] with RSHTR in random subspaces of dimension ``subspace_dim``.

    fun: a ``fastattn.ops.subspace_hvp.GLM`` (fused subspace-Hessian kernels) or any differentiable
        ``f(x [n]) -> 0-d tensor`` (torch.func autodiff). x0: [n] float tensor (its dtype/device are kept).
    options: the fields of ``RSHTROptions`` (sketch, delta0, delta, nu, eig_solver, step, radius, line_search,
        gtol, max_iter, max_time, seed, ...). callback(history_row) runs after every iteration.
    Returns an ``OptimizeResult`` (x, fun, grad_norm, nit, n_fun / n_grad / n_hvp, history).
    """
    opts = RSHTROptions.from_kwargs(**options)
    if not isinstance(x0, Tensor) or x0.dim() != 1 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a 1-D floating tensor [n], got {getattr(x0, 'shape', type(x0))}")
    n = x0.shape[0]
    s = n if opts.sketch == "identity" else int(subspace_dim)
    if s < 1:
        raise ValueError(f"subspace_dim must be >= 1, got {subspace_dim}")
    if opts.sketch in ("orthonormal", "coordinate") and s > n:
        raise ValueError(f"subspace_dim {s} > n = {n} for the {opts.sketch} sketch")
    oracle = Oracle(fun, opts.hvp_chunk, opts.backend)
    x = x0.detach().clone()
    clock = Clock(x.device)
    f, g = oracle.value_and_grad(x)
    history: list[dict] = []
    converged, message, k = False, "max_iter reached", 0
    info: dict = {}
    for k in range(opts.max_iter + 1):
        gn = g.norm().item()
        row = {"k": k, "f": f, "grad_norm": gn, "time": clock(), **oracle.counts(), **info}
        if opts.record_history:
            history.append(row)
        if callback is not None:
            callback(row)
        if gn <= opts.gtol:
            converged, message = True, f"|grad f| <= gtol = {opts.gtol:g}"
            break
        if k == opts.max_iter:
            break
        if opts.max_time is not None and row["time"] >= opts.max_time:
            message = f"max_time {opts.max_time:g} s reached"
            break
        t0 = clock()
        it_seed = iteration_seed(opts.seed, k)
        # P as an operator: P = I and coordinate sketches are applied without forming P; a dense P is
        # materialised anyway (for gs and P^T d), so the kernels read it rather than regenerating it from the seed:
        # measured slower both on CPU (fp64 Box-Muller) and on the H200 (22 ms vs 5 ms, s = 256)
        P = subspace(opts.sketch, s, n, it_seed, opts.sketch_scale, opts.sketch_source, x.dtype, x.device)
        gs = P.apply(g)
        t1 = clock()
        if opts.matrix_free:
            full_hvp = oracle.hvp(x)

            def hvp(u):
                return P.apply(full_hvp(P.adjoint(u.to(x.dtype)))).to(torch.float64)
            Hs = None
        else:
            Hs, hvp = oracle.subspace_hessian(x, P.operand), None
        t2 = clock()
        step = subspace_step(opts, k, gs, Hs, hvp, it_seed)
        del Hs
        D = P.adjoint(step.d.to(x.dtype))
        t3 = clock()
        eta, _, evals, ok = step_length(opts, lambda e: oracle.value(x + e * D), f, step, D.norm().item(), x.dtype)
        t4 = clock()
        if ok and eta > 0:
            x = x + eta * D
            f, g = oracle.value_and_grad(x)
        t5 = clock()
        info = {"eta": eta, "theta": step.theta, "t": step.t, "small_t": step.small_t,
                "step_norm": eta * D.norm().item(), "ls_evals": evals, "ls_ok": ok, "t_sketch": t1 - t0,
                "t_hessian": t2 - t1, "t_eig": t3 - t2, "t_linesearch": t4 - t3, "t_grad": t5 - t4,
                "lanczos_matvecs": step.matvecs}
    else:
        k = opts.max_iter
    return OptimizeResult(x=x, fun=f, grad_norm=g.norm().item(), nit=k, converged=converged, message=message,
                          time=clock(), method="rshtr", history=history, **oracle.counts())
