"""The result of a run, shared by RSHTR and the baselines of the harness."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class OptimizeResult:
    """x [n]; fun, grad_norm at x; nit iterations; oracle counts; history: one dict per iteration (k, f,
    grad_norm, time, n_fun, n_grad, n_hvp, and method-specific entries such as eta, theta, t, small_t)."""
    x: Tensor
    fun: float
    grad_norm: float
    nit: int
    n_fun: int
    n_grad: int
    n_hvp: int
    converged: bool
    message: str
    time: float
    method: str = "rshtr"
    history: list[dict] = field(default_factory=list)

    @property
    def oracle_calls(self) -> int:
        """Gradients + Hessian-vector products (function values are counted separately in n_fun)."""
        return self.n_grad + self.n_hvp


class Clock:
    """Wall-clock seconds since construction, synchronising CUDA first when x lives there."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t0 = self.now_raw()

    def now_raw(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self) -> float:
        return self.now_raw() - self.t0
