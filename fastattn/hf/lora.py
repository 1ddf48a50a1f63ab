"""LoRA on the attention projections of a linearized model (the optional second stage of distillation).

``add_lora(model, rank, alpha)`` gives every linear layer's adapter a ``lora`` ModuleDict of low-rank updates, one
per projection of the architecture table (llama: q/k/v/o, gpt2: c_attn/c_proj, bert: query/key/value):
``proj(x) + (alpha / rank) * x A^T B^T`` with A [rank, in] random and B [out, rank] zero, so the model is unchanged
until trained. The factors live in fp32 under ``...fastattn.lora.<proj>.*`` (saved by ``save_linearized``); a
forward hook on each projection applies them only while the model runs linear attention, so
``softmax_attention(model)`` still gives the untouched teacher.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .architectures import architecture, attention_modules


class LoRA(nn.Module):
    """x [..., in_features] -> (alpha / rank) * x A^T B^T [..., out_features] in fp32."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() @ self.A.t() @ self.B.t()) * self.scale


def _in_out(proj: nn.Module) -> tuple[int, int]:
    """(in, out) features of an nn.Linear or of transformers' Conv1D (weight [in, out])."""
    if isinstance(proj, nn.Linear):
        return proj.in_features, proj.out_features
    weight = getattr(proj, "weight", None)
    if weight is None or weight.dim() != 2:
        raise TypeError(f"LoRA needs a linear projection, got {type(proj).__name__}")
    return weight.shape[0], weight.shape[1]


class _LoRAHook:
    """Forward hook of one projection: adds the current adapter's LoRA update while the model runs linear attention.
    A class (not a closure) so that ``copy.deepcopy(model)`` gives the copy hooks that find the copy's adapters."""

    def __init__(self, attention: nn.Module, name: str):
        self.attention, self.name = attention, name

    def __call__(self, proj, args, out):
        from .attention import ATTENTION_NAME
        lora = getattr(getattr(self.attention, "fastattn", None), "lora", None)
        if lora is None or self.name not in lora or \
                getattr(self.attention.config, "_attn_implementation", ATTENTION_NAME) != ATTENTION_NAME:
            return None
        return out + lora[self.name](args[0]).to(out.dtype)


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, seed: int = 0) -> list[nn.Parameter]:
    """Attach LoRA factors to every linearized layer's projections; returns the new parameters (trainable).

    The base weights are not touched (freeze them yourself). Recorded in ``model.config.fastattn["lora"]`` so that
    ``load_linearized`` rebuilds them."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    config = getattr(model.config, "fastattn", None)
    if config is None:
        raise ValueError("add_lora needs a linearized model: call fastattn.hf.linearize first")
    names = architecture(model).projections
    g = torch.Generator().manual_seed(seed)
    params = []
    for attention in attention_modules(model):
        adapter = getattr(attention, "fastattn", None)
        if adapter is None:
            continue
        device = next(adapter.parameters()).device
        adapter.lora = nn.ModuleDict({n: LoRA(*_in_out(getattr(attention, n)), rank, alpha, g).to(device)
                                      for n in names})
        params += list(adapter.lora.parameters())
        for n in names:
            proj = getattr(attention, n)
            if not getattr(proj, "_fastattn_lora_hook", False):   # one hook per projection, for every later adapter
                proj.register_forward_hook(_LoRAHook(attention, n))
                proj._fastattn_lora_hook = True
    config["lora"] = {"rank": rank, "alpha": float(alpha), "seed": seed}
    return params
