"""Methods of the comparison, all returning ``OptimizeResult`` with a per-iteration history.

METHODS maps a name to ``run(problem, s, seed, gtol, max_iter, max_time, backend) -> OptimizeResult``:
  rshtr       RSHTR (this package) with its default options: Gaussian sketch of dimension s, entries N(0, 1/n)
  rshtr_jl    the same with entries N(0, 1/s) (sketch_scale "jl")
  rshtr_rad   Rademacher sketch, entries +-1/sqrt(s)
  rshtr_coord s random coordinates, scaled sqrt(n/s) (a GLM's subspace Hessian is then a column gather)
  hsodm       full-space HSODM: RSHTR with P = I, Hessian formed (dense eigh up to n = 1000, else Lanczos)
  hsodm_mf    full-space HSODM with matrix-free Lanczos on F (one HVP per Lanczos step)
  rs_gd       random-subspace gradient descent: x - eta P^T P g, Armijo backtracking with step doubling
  rs_newton   random-subspace regularised Newton (Fuji, Poirion, Takeda 2022): d = -(Hs + mu I)^-1 gs,
              (both with Gaussian P of entries N(0, 1/s), as in that paper)
              mu = c1 max(0, -lambda_min(Hs)) + c2 |g|^gamma, Armijo backtracking from eta = 1
  gd          gradient descent, Armijo backtracking with step doubling
  lbfgs       torch.optim.LBFGS (history 20, strong Wolfe), one iteration per step
  newton_cg, trust_ncg, trust_krylov   pytorch-minimize (package ``torchmin``), when installed; HVPs are not
              counted for these (n_hvp = -1)
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch
from torch import Tensor

from .core import minimize
from .linesearch import backtrack
from .oracle import Oracle
from .problems import Problem
from .result import Clock, OptimizeResult
from .sketches import draw, iteration_seed


class _Recorder:
    """History rows and stopping for the hand-written loops."""

    def __init__(self, oracle: Oracle, clock: Clock, gtol: float, max_iter: int, max_time: float | None):
        self.oracle, self.clock, self.gtol, self.max_iter, self.max_time = oracle, clock, gtol, max_iter, max_time
        self.history: list[dict] = []
        self.converged, self.message = False, "max_iter reached"

    def stop(self, k: int, f: float, g: Tensor, **info) -> bool:
        gn = g.norm().item()
        self.history.append({"k": k, "f": f, "grad_norm": gn, "time": self.clock(), **self.oracle.counts(), **info})
        if gn <= self.gtol:
            self.converged, self.message = True, f"|grad f| <= gtol = {self.gtol:g}"
            return True
        if self.max_time is not None and self.history[-1]["time"] >= self.max_time:
            self.message = f"max_time {self.max_time:g} s reached"
            return True
        return k >= self.max_iter

    def result(self, x: Tensor, f: float, g: Tensor, method: str) -> OptimizeResult:
        return OptimizeResult(x=x, fun=f, grad_norm=g.norm().item(), nit=self.history[-1]["k"],
                              converged=self.converged, message=self.message, time=self.clock(), method=method,
                              history=self.history, **self.oracle.counts())


def _descent_loop(problem: Problem, direction: Callable, gtol, max_iter, max_time, method, backend,
                  adaptive: bool) -> OptimizeResult:
    """x <- x + eta D with D, slope, curvature = direction(k, x, g, oracle) and backtracking on the model."""
    oracle = Oracle(problem.fun, backend=backend)
    x = problem.x0.detach().clone()
    clock = Clock(x.device)
    rec = _Recorder(oracle, clock, gtol, max_iter, max_time)
    f, g = oracle.value_and_grad(x)
    eta0, k, info = 1.0, 0, {}
    while not rec.stop(k, f, g, **info):
        D, slope, curvature = direction(k, x, g, oracle)
        ls = backtrack(lambda e: oracle.value(x + e * D), f, slope, curvature, eta0, "armijo",
                       noise=4 * torch.finfo(x.dtype).eps * abs(f))
        if ls.ok:
            x = x + ls.eta * D
            f, g = oracle.value_and_grad(x)
        if adaptive:
            eta0 = 2 * ls.eta if ls.ok else eta0 * 0.5 ** 30
        info = {"eta": ls.eta, "ls_ok": ls.ok}
        k += 1
    return rec.result(x, f, g, method)


def run_rshtr(problem, s, seed, gtol, max_iter, max_time, backend="auto", **options):
    return minimize(problem.fun, problem.x0, s, seed=seed, gtol=gtol, max_iter=max_iter, max_time=max_time,
                    backend=backend, **options)


def run_rshtr_jl(problem, s, seed, gtol, max_iter, max_time, backend="auto"):
    """RSHTR with the sketch scaled to entries N(0, 1/s) (E P^T P = I): Hs keeps the scale of H."""
    r = run_rshtr(problem, s, seed, gtol, max_iter, max_time, backend, sketch_scale="jl")
    r.method = "rshtr_jl"
    return r


def run_rshtr_rad(problem, s, seed, gtol, max_iter, max_time, backend="auto"):
    """RSHTR with a Rademacher sketch of entries +-1/sqrt(s): as rshtr_jl, ~10x cheaper to draw than Gaussian."""
    r = run_rshtr(problem, s, seed, gtol, max_iter, max_time, backend, sketch="rademacher", sketch_scale="jl")
    r.method = "rshtr_rad"
    return r


def run_rshtr_coord(problem, s, seed, gtol, max_iter, max_time, backend="auto"):
    """RSHTR in s random coordinates per iteration, scaled sqrt(n/s) (E P^T P = I): for a GLM the subspace
    Hessian is A[:, idx]^T diag(loss'') A[:, idx] (m s^2), with no A P^T to form (m n s)."""
    r = run_rshtr(problem, s, seed, gtol, max_iter, max_time, backend, sketch="coordinate", sketch_scale="jl")
    r.method = "rshtr_coord"
    return r


DENSE_EIG_MAX_N = 1000
LANCZOS = {"eig_solver": "lanczos", "lanczos_iters": 300, "lanczos_tol": 1e-10}


def run_hsodm(problem, s, seed, gtol, max_iter, max_time, backend="auto"):
    """P = I: the full n x n Hessian formed by n HVPs (the fused kernel for a GLM); its leftmost pair by dense eigh
    up to n = DENSE_EIG_MAX_N, else by Lanczos on the formed matrix."""
    opts = {} if problem.n <= DENSE_EIG_MAX_N else LANCZOS
    r = minimize(problem.fun, problem.x0, problem.n, sketch="identity", seed=seed, gtol=gtol, max_iter=max_iter,
                 max_time=max_time, backend=backend, **opts)
    r.method = "hsodm"
    return r


def run_hsodm_mf(problem, s, seed, gtol, max_iter, max_time, backend="auto"):
    """P = I, matrix-free: Lanczos on F with one full-space HVP per step (HSODM as Zhang et al. run it)."""
    r = minimize(problem.fun, problem.x0, problem.n, sketch="identity", seed=seed, gtol=gtol, max_iter=max_iter,
                 max_time=max_time, backend=backend, matrix_free=True, **LANCZOS)
    r.method = "hsodm_mf"
    return r


def run_rs_gd(problem, s, seed, gtol, max_iter, max_time, backend="auto"):
    n = problem.n

    def direction(k, x, g, oracle):
        P, _ = draw("gaussian", s, n, iteration_seed(seed, k), "jl", "torch", x.dtype, x.device)
        gs = P @ g
        return -(P.T @ gs), -gs.dot(gs).item(), 0.0

    return _descent_loop(problem, direction, gtol, max_iter, max_time, "rs_gd", backend, adaptive=True)


def run_rs_newton(problem, s, seed, gtol, max_iter, max_time, backend="auto", c1=2.0, c2=1.0, gamma=0.5):
    n = problem.n

    def direction(k, x, g, oracle):
        P, _ = draw("gaussian", s, n, iteration_seed(seed, k), "jl", "torch", x.dtype, x.device)
        gs = (P @ g).double()
        Hs = oracle.subspace_hessian(x, P).double()
        lam_min = torch.linalg.eigvalsh(Hs)[0].item()
        mu = c1 * max(0.0, -lam_min) + c2 * g.norm().item() ** gamma
        d = -torch.linalg.solve(Hs + mu * torch.eye(Hs.shape[0], dtype=torch.float64, device=Hs.device), gs)
        return P.T @ d.to(x.dtype), gs.dot(d).item(), (d @ Hs @ d).item()

    return _descent_loop(problem, direction, gtol, max_iter, max_time, "rs_newton", backend, adaptive=False)


def run_gd(problem, s, seed, gtol, max_iter, max_time, backend="auto"):
    def direction(k, x, g, oracle):
        return -g, -g.dot(g).item(), 0.0

    return _descent_loop(problem, direction, gtol, max_iter, max_time, "gd", backend, adaptive=True)


def run_lbfgs(problem, s, seed, gtol, max_iter, max_time, backend="auto"):
    oracle = Oracle(problem.fun, backend=backend)
    x = problem.x0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=1, max_eval=30, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=0.0, tolerance_change=0.0)
    state = {}

    def closure():
        opt.zero_grad()
        f = problem.fun(x)
        f.backward()
        oracle.n_grad += 1
        state["f"] = f.item()
        return f

    clock = Clock(x.device)
    rec = _Recorder(oracle, clock, gtol, max_iter, max_time)
    closure()
    k = 0
    while not rec.stop(k, state["f"], x.grad.detach()):
        opt.step(closure)
        closure()          # the value and gradient at the new iterate (LBFGS leaves them at its last trial)
        k += 1
    return rec.result(x.detach(), state["f"], x.grad.detach(), "lbfgs")


class _Stop(Exception):
    pass


def _torchmin(method: str):
    def run(problem, s, seed, gtol, max_iter, max_time, backend="auto"):
        import torchmin

        calls = {"n": 0}

        def fun(x):
            calls["n"] += 1
            return problem.fun(x)

        x0 = problem.x0.detach().clone()
        clock = Clock(x0.device)
        paused = {"t": 0.0}
        history: list[dict] = []
        best = {"x": x0}

        def record(x):   # the harness's own gradient evaluation is excluded from the time and the counts
            t_in = clock()
            with torch.enable_grad():
                xx = x.detach().clone().requires_grad_(True)
                f = problem.fun(xx)
                (g,) = torch.autograd.grad(f, xx)
            row = {"k": len(history), "f": f.item(), "grad_norm": g.norm().item(), "time": t_in - paused["t"],
                   "n_fun": 0, "n_grad": calls["n"], "n_hvp": -1}
            paused["t"] += clock() - t_in
            history.append(row)
            best["x"], best["g"] = x.detach().clone(), g
            if row["grad_norm"] <= gtol or (max_time is not None and row["time"] >= max_time):
                raise _Stop

        record(x0)
        options = {"gtol": 0.0} if method.startswith("trust") else {}
        message = "max_iter reached"
        try:
            torchmin.minimize(fun, x0, method=method, max_iter=max_iter, options=options,
                              callback=lambda x, *a: record(x))
        except _Stop:
            message = "stopped by the harness (gtol or max_time)"
        except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
            message = f"{type(e).__name__}: {e}"
        last = history[-1]
        return OptimizeResult(x=best["x"], fun=last["f"], grad_norm=last["grad_norm"], nit=last["k"],
                              n_fun=0, n_grad=calls["n"], n_hvp=-1, converged=last["grad_norm"] <= gtol,
                              message=message, time=last["time"], method=method.replace("-", "_"), history=history)
    return run


METHODS: dict[str, Callable[..., OptimizeResult]] = {
    "rshtr": run_rshtr,
    "rshtr_jl": run_rshtr_jl,
    "rshtr_rad": run_rshtr_rad,
    "rshtr_coord": run_rshtr_coord,
    "hsodm": run_hsodm,
    "hsodm_mf": run_hsodm_mf,
    "rs_gd": run_rs_gd,
    "rs_newton": run_rs_newton,
    "gd": run_gd,
    "lbfgs": run_lbfgs,
    "newton_cg": _torchmin("newton-cg"),
    "trust_ncg": _torchmin("trust-ncg"),
    "trust_krylov": _torchmin("trust-krylov"),
}
# run once per (subspace dim, seed); the others are deterministic and run once
SUBSPACE_METHODS = ("rshtr", "rshtr_jl", "rshtr_rad", "rshtr_coord", "rs_gd", "rs_newton")
TORCHMIN_METHODS = ("newton_cg", "trust_ncg", "trust_krylov")


def torchmin_available() -> bool:
    return importlib.util.find_spec("torchmin") is not None
