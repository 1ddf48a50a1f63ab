"""CPU backend of linear attention: thin wrappers over ``torch.ops.fastattn.*`` of the C++ extension
(csrc/cpu/linear_attn.cpp). Arguments, shapes and outputs follow README.md of this package; the kernels read
q, k, v, do through their strides (no copies) and allocate o, dq, dk, dv in the memory order of their inputs.
"""
from __future__ import annotations

from torch import Tensor

from .extension import backward, forward, kernels_serve, step  # noqa: F401  (the backend's op functions)


def supports(q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, str]:
    """(True, "") when the compiled CPU kernels can run on these tensors, else (False, reason)."""
    return kernels_serve("cpu", "CPU", q, k, v)
