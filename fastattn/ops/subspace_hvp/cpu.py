"""CPU backend of the GLM subspace Hessian: the C++ kernel csrc/cpu/subspace_hvp.cpp (row blocks of A through one
cache-sized GEMM each, B^T diag(w) B accumulated per block, P generated from the seed in C++)."""
from __future__ import annotations

import torch
from torch import Tensor

from .extension import glm, kernels_serve  # noqa: F401  (the backend's op function)


def supports(A: Tensor, x: Tensor, *rest: Tensor) -> tuple[bool, str]:
    ok, why = kernels_serve("cpu", "CPU", A, x, *rest)
    if ok and A.dtype not in (torch.float32, torch.float64):
        return False, f"dtype {A.dtype} is not supported by the CPU kernel (float32, float64)"
    return ok, why
