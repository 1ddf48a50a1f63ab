"""Greedy decoding of a linearized model with fixed-shape steps: one CUDA graph replay per token on a GPU.

A linear layer's decode step reads and updates its fp32 state in place, so with every layer linear the whole
one-token forward has fixed shapes and fixed addresses: it is captured once as a CUDA graph (the next token, its
position and the state all live in static buffers) and replayed, which removes the per-token host work of the
eager forward and of ``model.generate`` (tens of milliseconds per token on a slow host CPU). Without CUDA the same
step runs eagerly (tests compare it with ``model.generate``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .cache import LinearAttentionCache, RecurrentStateLayer


def graph_capturable(model: nn.Module) -> bool:
    """True when every layer is plain linear attention (no softmax layers, no sliding window): fixed-shape steps."""
    from .linearize import adapters, linearized_layers
    return all(linearized_layers(model)) and not any(a.window for a in adapters(model).values())


class _Step:
    """One greedy decode step over static buffers: tok [B, 1] -> the next token written in place; its position
    pos [B, 1] and cache position cp [1] advance by one. ``mask`` (eager steps only): the growing padding mask
    that softmax layers of a hybrid need (linear layers keep padding out of their state at prefill)."""

    def __init__(self, model, cache, tok: Tensor, pos: Tensor, cp: Tensor, mask: Tensor | None = None):
        self.model, self.cache, self.tok, self.pos, self.cp, self.mask = model, cache, tok, pos, cp, mask

    def __call__(self) -> None:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        logits = self.model(input_ids=self.tok, attention_mask=self.mask, position_ids=self.pos,
                            cache_position=self.cp, past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.cp.add_(1)


def _snapshot(cache, *tensors: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(tensor, copy) of every recurrent state tensor and of ``tensors``, to undo warm-up steps in place."""
    state = [t for layer in cache.layers if isinstance(layer, RecurrentStateLayer) and layer.state is not None
             for t in layer.state if t is not None]
    return [(t, t.clone()) for t in (*state, *tensors)]


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    for t, copy in saved:
        t.copy_(copy)


@torch.no_grad()
def greedy_decode(model: nn.Module, input_ids: Tensor, max_new_tokens: int, attention_mask: Tensor | None = None,
                  cuda_graph: bool | None = None) -> Tensor:
    """Greedy continuation of input_ids [B, T] (left padding marked by attention_mask [B, T]) by exactly
    ``max_new_tokens`` tokens (no stop on EOS) -> [B, T + max_new_tokens].

    Prefill runs the ordinary forward into a ``LinearAttentionCache``; each later token is one fixed-shape step.
    cuda_graph: capture the step as a CUDA graph (None: when the model is on CUDA and every layer is plain linear
    attention; True where that does not hold raises)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    capturable = graph_capturable(model) and input_ids.is_cuda
    if cuda_graph and not capturable:
        raise ValueError("cuda_graph=True needs a CUDA model whose layers are all plain linear attention "
                         "(no softmax layers, no sliding window)")
    cuda_graph = capturable if cuda_graph is None else cuda_graph
    B, T = input_ids.shape
    cache = LinearAttentionCache(model)
    # positions count real tokens only (as generate's position ids with left padding)
    positions = None if attention_mask is None else (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    # the next token's position: the number of real tokens so far
    pos = (attention_mask.long().sum(1, keepdim=True) if attention_mask is not None
           else torch.full((B, 1), T, dtype=torch.long, device=input_ids.device))
    out = torch.empty(B, max_new_tokens, dtype=input_ids.dtype, device=input_ids.device)
    out[:, :1] = tok
    cp = torch.full((1,), T, dtype=torch.long, device=input_ids.device)
    step = _Step(model, cache, tok, pos, cp, None if cuda_graph else attention_mask)
    if max_new_tokens > 1 and cuda_graph:
        saved = _snapshot(cache, tok, pos, cp)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up off the capture stream (kernel compilation, workspaces)
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        _restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()          # recorded, not run: the buffers still hold the first step's inputs
        step = graph.replay
    for i in range(1, max_new_tokens):
        step()
        out[:, i:i + 1] = tok
    return torch.cat([input_ids, out], 1)
