"""Function, gradient and Hessian oracles of one objective, with call counts.

A ``GLM`` uses its closed-form gradient, the fused subspace-Hessian op and closed-form HVPs; any other
``fun(x [n]) -> 0-d tensor`` uses torch.func (grad_and_value, vmapped forward-over-reverse, jvp of grad).
Counts: ``n_fun`` function values, ``n_grad`` gradients (each also gives the value), ``n_hvp`` Hessian-vector
products (a subspace Hessian of s rows counts s).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..ops.subspace_hvp import GLM, subspace_hvp
from ..ops.subspace_hvp.sketch import Sketch


class Oracle:
    def __init__(self, fun: GLM | Callable[[Tensor], Tensor], hvp_chunk: int | None = None, backend: str = "auto"):
        if not (isinstance(fun, GLM) or callable(fun)):
            raise TypeError(f"fun must be a GLM or a callable f(x) -> scalar tensor, got {type(fun).__name__}")
        self.fun = fun
        self.glm = fun if isinstance(fun, GLM) else None
        self.hvp_chunk = hvp_chunk
        self.backend = backend
        self.n_fun = self.n_grad = self.n_hvp = 0
        self._grad_and_value = None if self.glm is not None else torch.func.grad_and_value(fun)

    def counts(self) -> dict[str, int]:
        return {"n_fun": self.n_fun, "n_grad": self.n_grad, "n_hvp": self.n_hvp}

    def value(self, x: Tensor) -> float:
        self.n_fun += 1
        with torch.no_grad():
            return float(self.fun(x))

    def value_and_grad(self, x: Tensor) -> tuple[float, Tensor]:
        self.n_grad += 1
        if self.glm is not None:
            with torch.no_grad():
                return float(self.glm(x)), self.glm.grad(x)
        g, f = self._grad_and_value(x)
        return float(f), g.detach()

    def subspace_hessian(self, x: Tensor, P: Tensor | Sketch) -> Tensor:
        """P H(x) P^T [s, s]; P [s, n] or a Sketch (a GLM kernel generates or gathers it; autodiff forms it)."""
        self.n_hvp += P.s if isinstance(P, Sketch) else P.shape[0]
        if self.glm is not None:
            return subspace_hvp(self.glm, x, P, backend=self.backend)[1]
        return subspace_hvp(self.fun, x, P, chunk_size=self.hvp_chunk)[1]

    def hvp(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """v [n] -> H(x) v, one counted HVP per call."""
        if self.glm is not None:
            _, lpp, _, rpp = self.glm.derivatives(x)
            A = self.glm.A

            def mv(v):
                self.n_hvp += 1
                return A.T @ (lpp * (A @ v)) + rpp * v
            return mv
        grad_f = torch.func.grad(self.fun)

        def mv(v):
            self.n_hvp += 1
            return torch.func.jvp(grad_f, (x,), (v,))[1]
        return mv
