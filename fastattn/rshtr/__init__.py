"""RSHTR: random-subspace homogenized trust region (arXiv 2406.14337) on batched subspace HVPs.

``minimize(fun, x0, subspace_dim, **options)`` for a function of a vector (or a ``GLM``, which uses the fused
subspace-Hessian kernels); ``RSHTR(params, subspace_dim, ...)`` as a torch.optim.Optimizer.
"""
from ..ops.subspace_hvp import GLM, Sketch, subspace_hvp
from .config import ExperimentConfig, RSHTROptions
from .core import minimize
from .eigen import HomogenizedStep, homogenized_step, lanczos_leftmost
from .optimizer import RSHTR
from .result import OptimizeResult

__all__ = ["GLM", "Sketch", "subspace_hvp", "ExperimentConfig", "RSHTROptions", "minimize", "HomogenizedStep",
           "homogenized_step", "lanczos_leftmost", "RSHTR", "OptimizeResult"]
