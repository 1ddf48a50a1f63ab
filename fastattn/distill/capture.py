"""Capture of the frozen teacher's post-RoPE queries, keys, values and attention outputs, per layer.

A registered transformers attention function runs SDPA and hands (layer, q, k, v, o) to a sink; one teacher
forward thus feeds every layer.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

CAPTURE_NAME = "fastattn_capture"
_sink: Callable | None = None


def _capture_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    if _sink is not None:
        _sink(module, query, key, value, out)
    return out, weights


def _register() -> None:
    from transformers.masking_utils import sdpa_mask

    from ..hf.attention import register_attention
    register_attention(CAPTURE_NAME, _capture_forward, sdpa_mask)


@contextlib.contextmanager
def capturing(model: nn.Module, sink: Callable):
    """Inside the block the model runs softmax (SDPA) attention and calls sink(module, q, k, v, o) per layer."""
    global _sink
    from ..hf.linearize import _set_attn_implementation
    _register()
    previous = model.config._attn_implementation
    _set_attn_implementation(model, CAPTURE_NAME)
    _sink = sink
    try:
        yield
    finally:
        _sink = None
        _set_attn_implementation(model, previous)


def layer_index(model: nn.Module) -> dict[int, int]:
    from ..hf import attention_modules
    return {id(m): i for i, m in enumerate(attention_modules(model))}


@torch.no_grad()
def capture_batch(model: nn.Module, ids: Tensor, keep_vo: bool = False, store_dtype=None,
                  attention_mask: Tensor | None = None) -> list[dict]:
    """One teacher forward on ids [B, T] (with the padding mask attention_mask [B, T], if any): per layer
    {"q": [B,H,T,d], "k": [B,Hkv,T,d] (, "v", "o": [B,T,H,d])}; padded positions are captured too."""
    index = layer_index(model)
    layers: list[dict] = [dict() for _ in index]

    def sink(module, q, k, v, o):
        dt = store_dtype or q.dtype
        entry = {"q": q.detach().to(dt), "k": k.detach().to(dt)}
        if keep_vo:
            entry.update(v=v.detach().to(dt), o=o.detach().to(dt))
        layers[index[id(module)]] = entry

    with capturing(model, sink):
        model(ids) if attention_mask is None else model(ids, attention_mask=attention_mask)
    return layers


@torch.no_grad()
def sample_qk(model: nn.Module, batches: list[Tensor], max_per_head: int, seed: int = 0):
    """Reservoir-sampled post-RoPE q/k per layer over calibration batches -> fastattn.dof.QKReservoir."""
    from ..dof import QKReservoir
    index = layer_index(model)
    res = QKReservoir(len(index), max_per_head=max_per_head, seed=seed)

    def sink(module, q, k, v, o):
        res.add(index[id(module)], q.float(), k.float())

    with capturing(model, sink):
        for ids in batches:
            model(ids)
    return res
