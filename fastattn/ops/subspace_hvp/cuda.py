"""CUDA backend of the GLM subspace Hessian: csrc/cuda/subspace_hvp.cu (one block per row block of A: the
B = A_blk P^T tile lives in shared memory, then B^T diag(w) B is accumulated into the block's partial slot)."""
from __future__ import annotations

import torch
from torch import Tensor

from .extension import glm, kernels_serve  # noqa: F401  (the backend's op function)

MAX_S = 512   # kMaxS of csrc/cuda/subspace_hvp.h: the B tile [rows, s] must fit in shared memory


def supports(A: Tensor, x: Tensor, *rest: Tensor) -> tuple[bool, str]:
    ok, why = kernels_serve("cuda", "CUDA", A, x, *rest)
    if not ok:
        return ok, why
    if A.dtype != torch.float32:
        return False, f"dtype {A.dtype}: the CUDA GLM kernel takes float32"
    if rest and rest[0].shape[0] > MAX_S:
        return False, f"s = {rest[0].shape[0]} > {MAX_S}: the B tile does not fit in shared memory"
    return True, ""
