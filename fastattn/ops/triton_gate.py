"""The checks every Triton backend's ``supports()`` starts with; each backend adds its own dtype and size limits."""
from __future__ import annotations

import os

import torch
from torch import Tensor


def triton_gate(x: Tensor, import_error: str | None, min_capability: tuple[int, int] | None = None
                ) -> tuple[bool, str]:
    """(True, "") when triton imported, ``x`` is a CUDA tensor (or TRITON_INTERPRET=1 runs the kernels on the
    CPU) and, for CUDA tensors, the GPU has at least ``min_capability``; else (False, reason)."""
    if import_error is not None:
        return False, f"triton is not importable ({import_error})"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not x.is_cuda and not interpret:
        return False, f"tensors are on {x.device.type}, not CUDA (and TRITON_INTERPRET is not set)"
    if min_capability and x.is_cuda and not interpret and torch.cuda.get_device_capability(x.device) < min_capability:
        return False, f"needs an sm_{min_capability[0]}{min_capability[1]}+ GPU (bf16 / tf32 tensor-core dots)"
    return True, ""
