"""CPU backend of linear attention: thin wrappers over ``torch.ops.fastattn.*`` of the C++ extension
(csrc/cpu/linear_attn.cpp). Arguments, shapes and outputs follow README.md of this package; the kernels read
q, k, v, do through their strides (no copies) and allocate o, dq, dk, dv in the memory order of their inputs.
"""
from __future__ import annotations

from torch import Tensor

from ... import _ext
from .extension import backward, forward, step  # noqa: F401  (the backend's op functions)


def supports(q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, str]:
    """(True, "") when the compiled CPU kernels can run on these tensors, else (False, reason)."""
    if not _ext.available():
        return False, f"extension fastattn._C not built: {_ext.load_error()}"
    if not _ext.has_kernel("linear_attn_fwd", "CPU"):
        return False, "fastattn._C has no CPU kernels"
    devices = {t.device.type for t in (q, k, v)}
    if devices != {"cpu"}:
        return False, f"tensors are on {sorted(devices)}, the cpu backend needs CPU tensors"
    return True, ""
