"""``RSHTR`` as a torch.optim.Optimizer: one RSHTR iteration per ``step(closure)`` and parameter group.

Each group is its own block: its parameters are flattened into x [n_group], a fresh sketch P [s, n_group] is drawn
(seed, step count, group index), P H P^T comes from reverse-over-reverse autodiff of the closure's loss (batched
backward over the rows of P), then the homogenized step and the line search (closure re-evaluations under
no_grad) move that group's parameters. ``closure`` re-evaluates the model and returns the loss; it must not call
``backward`` itself (the optimizer differentiates twice and sets ``p.grad`` to the gradient it used).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from ..ops.subspace_hvp.reference import reverse_over_reverse
from .config import RSHTROptions
from .core import step_length, subspace_step
from .sketches import draw, iteration_seed

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RSHTROptions)}


class RSHTR(torch.optim.Optimizer):
    """RSHTR(params, subspace_dim, **options): options are the fields of ``RSHTROptions`` (per group too).

    ``state[first param of the group]`` keeps: step (iterations taken), grad_norm, theta, eta, small_t, n_hvp.
    ``matrix_free`` and ``max_iter`` / ``max_time`` do not apply (one iteration per step; Hs is always formed).
    """

    def __init__(self, params, subspace_dim: int, **options):
        RSHTROptions.from_kwargs(**options)             # validate names and values
        if not isinstance(subspace_dim, int) or subspace_dim < 1:
            raise ValueError(f"subspace_dim must be a positive int, got {subspace_dim!r}")
        super().__init__(params, {**_DEFAULTS, **options, "subspace_dim": subspace_dim})

    @staticmethod
    def _options(group: dict) -> RSHTROptions:
        return RSHTROptions.from_kwargs(**{k: group[k] for k in _DEFAULTS})

    def step(self, closure: Callable[[], Tensor]) -> Tensor:   # type: ignore[override]
        if closure is None:
            raise ValueError("RSHTR.step needs a closure that re-evaluates the model and returns the loss")
        first_loss = None
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            opts = self._options(group)
            state = self.state[params[0]]
            k = state.get("step", 0)
            with torch.enable_grad():
                loss = closure()
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise TypeError("the closure must return a 0-d loss tensor")
                if first_loss is None:
                    first_loss = loss.detach()
                grads = torch.autograd.grad(loss, params, create_graph=True)
            g = torch.cat([t.reshape(-1) for t in grads]).detach()
            for p, t in zip(params, grads):
                p.grad = t.detach().clone()
            gn = g.norm().item()
            state.update(step=k + 1, grad_norm=gn)
            if gn <= opts.gtol:
                state.update(eta=0.0)
                continue
            n = g.numel()
            s = n if opts.sketch == "identity" else min(group["subspace_dim"], n) \
                if opts.sketch in ("orthonormal", "coordinate") else group["subspace_dim"]
            it_seed = iteration_seed(opts.seed, k, gi)
            P, _ = draw(opts.sketch, s, n, it_seed, opts.sketch_scale, opts.sketch_source, g.dtype, g.device)
            _, Hs = reverse_over_reverse(grads, params, P, chunk_size=opts.hvp_chunk)
            del grads
            gs = P @ g
            step = subspace_step(opts, k, gs, Hs, None, it_seed)
            D = P.T @ step.d.to(g.dtype)
            x0 = [p.detach().clone() for p in params]

            def set_params(eta: float) -> None:
                with torch.no_grad():
                    off = 0
                    for p, p0 in zip(params, x0):
                        p.copy_(p0 + eta * D[off:off + p.numel()].view_as(p))
                        off += p.numel()

            def phi(eta: float) -> float:
                set_params(eta)
                with torch.no_grad():
                    return float(closure())

            eta, _, _, ok = step_length(opts, phi, float(loss.detach()), step, D.norm().item(), g.dtype)
            set_params(eta if ok else 0.0)
            state.update(eta=eta if ok else 0.0, theta=step.theta, small_t=step.small_t,
                         n_hvp=state.get("n_hvp", 0) + s)
        return first_loss
