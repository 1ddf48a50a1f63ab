"""Batched subspace Hessian-vector products: (P g, P H P^T) for general functions and fused GLM kernels."""
from .glm import GLM, LOSSES, REGULARISERS
from .interface import subspace_hvp
from .sketch import Sketch, make_sketch

__all__ = ["GLM", "LOSSES", "REGULARISERS", "Sketch", "make_sketch", "subspace_hvp"]


def auto_order(A, *rest) -> tuple[str, ...] | None:
    """The order in which backend "auto" tries the backends for a GLM call (A [m, n]), or None for the device's
    default. On CUDA, measured at m = n = 16384, s = 256, fp32 (bench/subspace_hvp.py): the CUDA C++ kernel
    (fp32 FMA, no tensor cores) took 17-19 ms on the H200, 5x the others; the triton kernel (3xTF32, fp32
    accuracy whatever torch's TF32 flags say, A P^T never in memory) 3.49 ms against 3.21 for the unfused torch
    matmuls on the H200, 4.07 against 3.31 on the H100 (bench/results/subspace_hvp_h200_sweep.md,
    subspace_hvp_h100_bf16x3.md). Torch's fp32 matmuls turn to TF32 (~1e-3) under
    ``torch.backends.cuda.matmul.allow_tf32``, so triton comes first, torch next."""
    if A.device.type != "cuda":
        return None
    return ("triton", "torch", "cuda")
