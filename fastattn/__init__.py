"""fastattn: causal linear attention with per-layer feature dims, subspace HVPs, and research drivers.

Importing fastattn initialises no CUDA, compiles nothing and imports neither triton nor transformers;
submodules (feature_maps, dof, hf, models, distill, ...) load on first attribute access.
"""
from __future__ import annotations

import importlib

from .backends import backend_info
from .ops.linear_attn.interface import linear_attention, linear_attention_step
from .ops.seq_logps.interface import seq_logps
from .ops.subspace_hvp.interface import subspace_hvp

__version__ = "0.1.0"

_SUBMODULES = ("backends", "feature_maps", "dof", "hf", "models", "distill", "ddro", "pcfg", "rshtr", "cli")

__all__ = ["linear_attention", "linear_attention_step", "seq_logps", "subspace_hvp", "backend_info", "__version__",
           *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")
