"""CPU backend of ``seq_logps``: thin wrappers over ``torch.ops.fastattn.lm_head_logps_*`` of the C++ extension
(csrc/cpu/seq_logps.cpp: GEMM tiles through ATen, one fused pass per row for the online logsumexp and for the
softmax gradient). Arguments and outputs follow ``reference.forward`` / ``reference.backward``; the default tiles
are 1024 tokens x 4096 vocab (token_chunk / vocab_chunk = 0)."""
from __future__ import annotations

import torch
from torch import Tensor

from ... import _ext


def forward(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, token_chunk: int = 0,
            vocab_chunk: int = 0) -> tuple[Tensor, Tensor]:
    """-> (logps [B], lse [B, T]) in the accumulation dtype (fp32; fp64 for fp64 inputs)."""
    return torch.ops.fastattn.lm_head_logps_fwd(hidden, weight, labels, mask, int(token_chunk), int(vocab_chunk))


def backward(grad: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, mask: Tensor, lse: Tensor,
             token_chunk: int = 0, vocab_chunk: int = 0) -> tuple[Tensor, Tensor]:
    """-> (dhidden [B, T, d], dweight [V, d]) in the input dtypes."""
    return torch.ops.fastattn.lm_head_logps_bwd(grad, hidden, weight, labels, mask, lse, int(token_chunk),
                                                int(vocab_chunk))


def supports(hidden: Tensor, weight: Tensor) -> tuple[bool, str]:
    if not _ext.available():
        return False, f"extension fastattn._C not built: {_ext.load_error()}"
    if not _ext.has_kernel("lm_head_logps_fwd", "CPU"):
        return False, "fastattn._C was built without the seq_logps CPU kernels (rebuild the extension)"
    if hidden.device.type != "cpu" or weight.device.type != "cpu":
        return False, f"tensors are on {hidden.device.type}, the cpu backend needs CPU tensors"
    return True, ""
