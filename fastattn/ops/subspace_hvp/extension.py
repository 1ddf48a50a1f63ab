"""Calls into the compiled ``torch.ops.fastattn.subspace_hvp_glm_fused`` op, shared by the cpu and cuda backends
(csrc/cpu/subspace_hvp.cpp and csrc/cuda/subspace_hvp_glue.cpp register it for their dispatch keys)."""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _ext

KERNEL = "subspace_hvp_glm_fused"


def kernels_serve(device_type: str, dispatch_key: str, *tensors: Tensor) -> tuple[bool, str]:
    """(True, "") when the extension has the ``dispatch_key`` kernel of the GLM op and the tensors are on
    ``device_type``; else (False, reason)."""
    if not _ext.available():
        return False, f"extension fastattn._C not built: {_ext.load_error()}"
    if not _ext.has_kernel(KERNEL, dispatch_key):
        return False, f"fastattn._C was built without the {dispatch_key} kernel of {KERNEL}"
    devices = {t.device.type for t in tensors}
    if devices != {device_type}:
        return False, f"tensors are on {sorted(devices)}, the {device_type} backend needs {dispatch_key} tensors"
    return True, ""


def glm(A: Tensor, x: Tensor, y: Tensor, P: Tensor | None, s: int, sketch: int, seed: int, scale: float,
        loss: int, reg: int, lam: float, loss_scale: float) -> tuple[Tensor, Tensor]:
    """(Pg [s], PHPt [s, s]) in A's dtype; arguments of ``reference.glm``."""
    return torch.ops.fastattn.subspace_hvp_glm_fused(A, x, y, P, int(s), int(sketch), int(seed), float(scale),
                                                     int(loss), int(reg), float(lam), float(loss_scale))
