"""Batched subspace Hessian-vector products: (P g, P H P^T) for general functions and fused GLM kernels."""
from .glm import GLM, LOSSES, REGULARISERS
from .interface import subspace_hvp
from .sketch import Sketch, make_sketch

__all__ = ["GLM", "LOSSES", "REGULARISERS", "Sketch", "make_sketch", "subspace_hvp"]
