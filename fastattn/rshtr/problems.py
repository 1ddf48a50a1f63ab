"""Test problems of shared/design/RSHTR.md, built by name at a size preset ("smoke", "cpu", "gpu").

Each builder returns a ``Problem``: the objective (a ``GLM`` for the fused kernels, or a function of x [n]),
x0, f* when known, and a description. Real data ships offline with scikit-learn (imported lazily).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..ops.subspace_hvp import GLM

SIZES = ("smoke", "cpu", "gpu")


@dataclass
class Problem:
    name: str
    fun: GLM | Callable[[Tensor], Tensor]
    x0: Tensor
    f_star: float | None
    description: str
    rank: int | None = None       # rank of the Hessian at a solution, when known

    @property
    def n(self) -> int:
        return self.x0.shape[0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lowrank_glm(m, n, rank, seed, dtype, device, reg, lam, name):
    g = _gen(seed)
    A = (torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                               dtype=torch.float64)) / (rank * n) ** 0.5
    x_true = torch.randn(n, generator=g, dtype=torch.float64) * 2
    y = torch.sigmoid(A @ x_true)                       # realisable: f* = 0 without the regulariser
    glm = GLM(A.to(dtype).to(device), y.to(dtype).to(device), "sigmoid_mse", reg, lam)
    desc = (f"sigmoid-MSE GLM, A [{m}, {n}] of rank {rank}, realisable targets"
            + (f", nonconvex regulariser lam={lam:g} (full-rank Hessian)" if reg != "none" else ""))
    return Problem(name, glm, torch.zeros(n, dtype=dtype, device=device), 0.0 if reg == "none" else None, desc,
                   rank if reg == "none" else None)


GLM_SIZES = {"smoke": (40, 400, 20), "cpu": (100, 10000, 100), "gpu": (200, 16384, 200)}


def glm_rankdef(size, seed, dtype, device):
    m, n, r = GLM_SIZES[size]
    return _lowrank_glm(m, n, r, seed, dtype, device, "none", 0.0, "glm_rankdef")


def glm_rankdef_reg(size, seed, dtype, device):
    m, n, r = GLM_SIZES[size]
    return _lowrank_glm(m, n, r, seed, dtype, device, "nonconvex", 1e-3, "glm_rankdef_reg")


def _lifted(X: Tensor, n: int, seed: int) -> Tensor:
    """Standardised features lifted by n random ReLU features (rank <= number of samples)."""
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-12)
    W = torch.randn(X.shape[1], n, generator=_gen(seed + 1), dtype=torch.float64) / X.shape[1] ** 0.5
    return torch.relu(X @ W) / n ** 0.5


def _sklearn(loader: str):
    try:
        import sklearn.datasets as ds
    except ImportError as e:
        raise ImportError("the real-data problems need scikit-learn (pip install 'fastattn[rshtr]')") from e
    X, y = getattr(ds, loader)(return_X_y=True)
    return torch.tensor(X, dtype=torch.float64), torch.tensor(y)


RF_SIZES = {"smoke": 300, "cpu": 4000, "gpu": 20000}


def breast_cancer_rf(size, seed, dtype, device):
    X, y = _sklearn("load_breast_cancer")
    A = _lifted(X, RF_SIZES[size], seed)
    t = 0.1 + 0.8 * y.double()                           # labels 0.1 / 0.9: interpolable, f* = 0
    glm = GLM(A.to(dtype).to(device), t.to(dtype).to(device), "sigmoid_mse", "none", 0.0)
    return Problem("breast_cancer_rf", glm, torch.zeros(A.shape[1], dtype=dtype, device=device), 0.0,
                   f"breast-cancer (569 x 30, scikit-learn) lifted to {A.shape[1]} random ReLU features, "
                   "sigmoid-MSE to labels 0.1/0.9", rank=min(A.shape))


ROSEN_SIZES = {"smoke": 50, "cpu": 1000, "gpu": 100000}


def rosenbrock(size, seed, dtype, device):
    n = ROSEN_SIZES[size]

    def f(x):
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    x0 = torch.full((n,), -1.0, dtype=dtype, device=device)
    x0[1::2] = 1.0
    return Problem("rosenbrock", f, x0, 0.0, f"extended Rosenbrock, n = {n}, x0 = (-1, 1, -1, 1, ...)")


SADDLE_SIZES = {"smoke": 40, "cpu": 1000, "gpu": 100000}


def saddle(size, seed, dtype, device):
    """f = sum_{i<k} (x_i^4/4 - x_i^2/2) + sum_{i>=k} x_i^2 / 2, k = n/10: a strict saddle at 0 with k escape
    directions; x0 = 0 except the non-escape coordinates, so |grad| carries no escape component at first."""
    n = SADDLE_SIZES[size]
    k = max(1, n // 10)

    def f(x):
        return (x[:k] ** 4 / 4 - x[:k] ** 2 / 2).sum() + 0.5 * (x[k:] ** 2).sum()

    x0 = torch.zeros(n, dtype=dtype, device=device)
    x0[k:] = torch.randn(n - k, generator=_gen(seed), dtype=torch.float64).to(dtype).to(device)
    return Problem("saddle", f, x0, -k / 4, f"strict saddle, n = {n}, {k} negative-curvature directions")


MLP_HIDDEN = {"smoke": 4, "cpu": 16, "gpu": 64}


def mlp_digits(size, seed, dtype, device):
    """A 64-h-10 tanh MLP on scikit-learn's digits (cross-entropy + 1e-4 |w|^2), parameters flattened."""
    X, y = _sklearn("load_digits")
    X = (X / 16.0).to(dtype).to(device)
    y = y.to(device)
    h = MLP_HIDDEN[size]
    shapes = [(h, 64), (h,), (10, h), (10,)]
    sizes = [torch.Size(s).numel() for s in shapes]
    g = _gen(seed)
    x0 = torch.cat([torch.randn(sz, generator=g, dtype=torch.float64) * (0.0 if len(shp) == 1 else shp[1] ** -0.5)
                    for sz, shp in zip(sizes, shapes)]).to(dtype).to(device)

    def f(x):
        W1, b1, W2, b2 = (t.view(s) for t, s in zip(torch.split(x, sizes), shapes))
        logits = torch.tanh(X @ W1.T + b1) @ W2.T + b2
        return torch.nn.functional.cross_entropy(logits, y) + 1e-4 * (x * x).sum()

    return Problem("mlp_digits", f, x0, None, f"tanh MLP 64-{h}-10 on digits (1797 samples), {x0.numel()} "
                   "parameters, cross-entropy + 1e-4 |w|^2")


PROBLEMS: dict[str, Callable] = {
    "glm_rankdef": glm_rankdef,
    "glm_rankdef_reg": glm_rankdef_reg,
    "breast_cancer_rf": breast_cancer_rf,
    "rosenbrock": rosenbrock,
    "saddle": saddle,
    "mlp_digits": mlp_digits,
}


def build(name: str, size: str = "cpu", seed: int = 0, dtype: torch.dtype = torch.float64,
          device: str | torch.device = "cpu") -> Problem:
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; known: {sorted(PROBLEMS)}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return PROBLEMS[name](size, seed, dtype, device)
