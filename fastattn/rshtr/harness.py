"""Runs problems x methods x subspace dims x seeds and summarises each run (shared/design/RSHTR.md protocol)."""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from .baselines import METHODS, SUBSPACE_METHODS, TORCHMIN_METHODS, torchmin_available
from .config import ExperimentConfig
from .eigen import lanczos_leftmost
from .oracle import Oracle
from .problems import Problem, build

THRESHOLDS = (1e-6,)


def first_reaching(history: list[dict], key: str, tol: float) -> float | None:
    """history[i][key] at the first row with grad_norm <= tol (None if never)."""
    for row in history:
        if row["grad_norm"] <= tol:
            return row[key]
    return None


def smallest_hessian_eigenvalue(problem: Problem, x: torch.Tensor, iters: int = 100) -> float:
    """lambda_min of the Hessian at x: dense for n <= 400, else Lanczos (``iters`` HVPs)."""
    oracle = Oracle(problem.fun)
    n = x.shape[0]
    if n <= 400:
        mv = oracle.hvp(x)
        H = torch.stack([mv(e) for e in torch.eye(n, dtype=x.dtype, device=x.device)])
        return torch.linalg.eigvalsh(0.5 * (H + H.T).double())[0].item()
    mv = oracle.hvp(x)
    q0 = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x.device)
    lam, _, _ = lanczos_leftmost(lambda v: mv(v.to(x.dtype)).double(), n, iters, 1e-10, q0)
    return lam


HISTORY_ROWS = 400


def thin(history: list[dict], rows: int = HISTORY_ROWS) -> list[dict]:
    """At most ~``rows`` evenly spaced rows of a long history, always with the last 50 (the tail) kept whole."""
    if len(history) <= rows:
        return history
    head, tail = history[:-50], history[-50:]
    step = -(-len(head) // (rows - 50))
    return head[::step] + tail


def warm_up(problem: Problem, backend: str = "auto") -> None:
    """One untimed call of every oracle path (first calls of registered ops and torch.func transforms pay
    one-off setup costs of a second or more that would otherwise land in the first run's wall-clock)."""
    oracle = Oracle(problem.fun, backend=backend)
    x = problem.x0
    oracle.value_and_grad(x)
    P = torch.zeros(2, problem.n, dtype=x.dtype, device=x.device)
    P[0, 0] = P[1, -1] = 1.0
    oracle.subspace_hessian(x, P)
    oracle.hvp(x)(P[0])
    with torch.enable_grad():
        xx = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(problem.fun(xx), xx, create_graph=True)
        torch.autograd.grad(g @ P[0], xx)


def summarise(problem: Problem, method: str, s: int | None, seed: int, r) -> dict:
    out = {"problem": problem.name, "method": method, "s": s, "seed": seed, "n": problem.n,
           "converged": r.converged, "message": r.message, "nit": r.nit, "time": r.time, "f": r.fun,
           "f_minus_fstar": None if problem.f_star is None else r.fun - problem.f_star, "grad_norm": r.grad_norm,
           "n_fun": r.n_fun, "n_grad": r.n_grad, "n_hvp": r.n_hvp}
    for tol in THRESHOLDS:
        out[f"time_to_{tol:g}"] = first_reaching(r.history, "time", tol)
        out[f"iters_to_{tol:g}"] = first_reaching(r.history, "k", tol)
        calls = [row["n_grad"] + max(row["n_hvp"], 0) for row in r.history]
        hist = [dict(row, calls=c) for row, c in zip(r.history, calls)]
        out[f"calls_to_{tol:g}"] = first_reaching(hist, "calls", tol) if r.n_hvp >= 0 else None
    split = {k: sum(row.get(k, 0.0) for row in r.history) for k in
             ("t_sketch", "t_hessian", "t_eig", "t_linesearch", "t_grad")}
    if any(split.values()):
        out["time_split"] = split
    try:
        out["min_eig"] = smallest_hessian_eigenvalue(problem, r.x)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        out["min_eig"] = None
        out["min_eig_error"] = f"{type(e).__name__}: {e}"
    return out


def plan(cfg: ExperimentConfig) -> list[tuple[str, str, int | None, int]]:
    """(problem, method, s, seed) of every run: subspace methods per (s, seed), the others once."""
    from .problems import PROBLEMS
    for name, known in (("problem", PROBLEMS), ("method", METHODS)):
        for v in (cfg.problems if name == "problem" else cfg.methods):
            if v not in known:
                raise ValueError(f"unknown {name} {v!r}; known: {sorted(known)}")
    runs = []
    for prob in cfg.problems:
        dims = cfg.subspace_dims_by_problem.get(prob, cfg.subspace_dims)
        for method in cfg.methods:
            if method in SUBSPACE_METHODS:
                runs += [(prob, method, s, seed) for s in dims for seed in cfg.seeds]
            else:
                runs.append((prob, method, None, cfg.seeds[0]))
    return runs


def run_all(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """Every planned run: {"runs": [summary + history], "skipped": [...], "problems": {...}}."""
    dtype = getattr(torch, cfg.dtype)
    skipped, runs, problems = [], [], {}
    methods = list(cfg.methods)
    if not torchmin_available():
        for m in TORCHMIN_METHODS:
            if m in methods:
                methods.remove(m)
                skipped.append({"method": m, "reason": "pytorch-minimize (torchmin) is not installed"})
    cfg_methods = ExperimentConfig(**{**cfg.__dict__, "methods": methods})
    built: dict[str, Problem] = {}
    todo = plan(cfg_methods)
    for i, (prob, method, s, seed) in enumerate(todo):
        if prob not in built:
            built[prob] = build(prob, cfg.size, cfg.data_seed, dtype, cfg.device)
            p = built[prob]
            warm_up(p, cfg.backend)
            problems[prob] = {"n": p.n, "description": p.description, "f_star": p.f_star, "rank": p.rank}
        p = built[prob]
        r = METHODS[method](p, s, seed, cfg.gtol, cfg.max_iter, cfg.max_time, cfg.backend)
        summary = summarise(p, method, s, seed, r)
        summary["history"] = thin([{k: v for k, v in row.items() if k in
                                    ("k", "f", "grad_norm", "time", "n_fun", "n_grad", "n_hvp", "small_t", "eta")}
                                   for row in r.history])
        runs.append(summary)
        log(f"[{i + 1}/{len(todo)}] {prob} {method} s={s} seed={seed}: nit={r.nit} |g|={r.grad_norm:.2e} "
            f"time={r.time:.2f}s t(1e-6)={summary['time_to_1e-06']} {r.message}")
    return {"runs": runs, "skipped": skipped, "problems": problems}


def aggregate(runs: list[dict]) -> list[dict]:
    """Median and range over seeds of each (problem, method, s)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["problem"], r["method"], r["s"]), []).append(r)
    rows = []
    for (prob, method, s), rs in groups.items():
        row = {"problem": prob, "method": method, "s": s, "seeds": len(rs),
               "converged": sum(r["converged"] for r in rs)}
        for key in ("time_to_1e-06", "iters_to_1e-06", "calls_to_1e-06", "grad_norm", "time", "nit", "min_eig",
                    "f_minus_fstar"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = statistics.median(vals) if len(vals) == len(rs) and vals else None
            row[key + "_range"] = (min(vals), max(vals)) if len(vals) == len(rs) and len(vals) > 1 else None
        rows.append(row)
    return rows
