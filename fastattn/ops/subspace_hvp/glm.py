"""GLM objectives f(x) = loss_scale * sum_i loss(a_i . x; y_i) + lam * sum_j r(x_j), described for the fused kernels.

Losses and regularisers live in small registries; each entry has the torch value and first/second derivatives
(used by the reference and by the optimizer's function values) and the integer code the C++/CUDA/Triton kernels
switch on (csrc/cpu/subspace_hvp.cpp, csrc/cuda/subspace_hvp.cu and triton_kernels.py implement the same formulas).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Pointwise:
    code: int
    value: Callable                  # loss: (z, y) -> [m]; regulariser: (x) -> [n]
    d1: Callable
    d2: Callable
    formula: str


def _sig(z: Tensor) -> Tensor:
    return torch.sigmoid(z)


def _smse_d1(z, y):
    s = _sig(z)
    return (s - y) * s * (1 - s)


def _smse_d2(z, y):
    s = _sig(z)
    q = s * (1 - s)
    return q * (q + (s - y) * (1 - 2 * s))


LOSSES: dict[str, Pointwise] = {
    "squared": Pointwise(0, lambda z, y: 0.5 * (z - y) ** 2, lambda z, y: z - y, lambda z, y: torch.ones_like(z),
                         "(z - y)^2 / 2"),
    "logistic": Pointwise(1, lambda z, y: torch.nn.functional.softplus(z) - y * z, lambda z, y: _sig(z) - y,
                          lambda z, y: _sig(z) * (1 - _sig(z)), "log(1 + e^z) - y z, y in {0, 1}"),
    "sigmoid_mse": Pointwise(2, lambda z, y: 0.5 * (_sig(z) - y) ** 2, _smse_d1, _smse_d2,
                             "(sigmoid(z) - y)^2 / 2"),
}

REGULARISERS: dict[str, Pointwise] = {
    "none": Pointwise(0, torch.zeros_like, torch.zeros_like, torch.zeros_like, "0"),
    "l2": Pointwise(1, lambda x: 0.5 * x * x, lambda x: x, torch.ones_like, "x^2 / 2"),
    "nonconvex": Pointwise(2, lambda x: x * x / (1 + x * x), lambda x: 2 * x / (1 + x * x) ** 2,
                           lambda x: (2 - 6 * x * x) / (1 + x * x) ** 3, "x^2 / (1 + x^2)"),
}


@dataclass(frozen=True, eq=False)
class GLM:
    """f(x) = loss_scale * sum_i loss(A[i] . x; y[i]) + lam * sum_j reg(x[j]).

    A [m, n] (any strides), y [m], both of one floating dtype and device. Callable: ``glm(x)`` is f(x), so a GLM
    is also a plain differentiable ``fun`` for the general paths and the optimizer.
    """
    A: Tensor
    y: Tensor
    loss: str = "logistic"
    reg: str = "none"
    lam: float = 0.0
    loss_scale: float = 1.0

    def __post_init__(self):
        if not isinstance(self.A, Tensor) or self.A.dim() != 2:
            raise ValueError(f"GLM.A must be a 2-D tensor [m, n], got {getattr(self.A, 'shape', type(self.A))}")
        if not self.A.is_floating_point():
            raise TypeError(f"GLM.A must be floating point, got {self.A.dtype}")
        if not isinstance(self.y, Tensor) or self.y.shape != (self.A.shape[0],):
            raise ValueError(f"GLM.y must be a tensor [m] = [{self.A.shape[0]}], got "
                             f"{getattr(self.y, 'shape', type(self.y))}")
        if self.y.dtype != self.A.dtype or self.y.device != self.A.device:
            raise TypeError(f"GLM.y must match A's dtype/device ({self.A.dtype}, {self.A.device}), got "
                            f"({self.y.dtype}, {self.y.device})")
        if self.loss not in LOSSES:
            raise ValueError(f"GLM.loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.reg not in REGULARISERS:
            raise ValueError(f"GLM.reg must be one of {sorted(REGULARISERS)}, got {self.reg!r}")

    @property
    def m(self) -> int:
        return self.A.shape[0]

    @property
    def n(self) -> int:
        return self.A.shape[1]

    @property
    def reg_active(self) -> bool:
        return self.reg != "none" and self.lam != 0.0

    def __call__(self, x: Tensor) -> Tensor:
        """f(x), a 0-d tensor; differentiable in x (and A, y)."""
        loss, reg = LOSSES[self.loss], REGULARISERS[self.reg]
        z = self.A @ x
        return self.loss_scale * loss.value(z, self.y).sum() + self.lam * reg.value(x).sum()

    def derivatives(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss' [m], loss'' [m], reg' [n], reg'' [n]) at x, with loss_scale and lam applied."""
        loss, reg = LOSSES[self.loss], REGULARISERS[self.reg]
        z = self.A @ x
        return (self.loss_scale * loss.d1(z, self.y), self.loss_scale * loss.d2(z, self.y),
                self.lam * reg.d1(x), self.lam * reg.d2(x))

    def grad(self, x: Tensor) -> Tensor:
        """grad f(x) [n] in closed form: A^T loss' + reg'."""
        lp, _, rp, _ = self.derivatives(x)
        return self.A.T @ lp + rp

    def to(self, dtype: torch.dtype | None = None, device=None) -> "GLM":
        return GLM(self.A.to(dtype=dtype, device=device), self.y.to(dtype=dtype, device=device), self.loss,
                   self.reg, self.lam, self.loss_scale)
