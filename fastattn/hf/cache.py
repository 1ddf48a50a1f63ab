"""Recurrent cache for ``model.generate()`` on a linearized model: O(1) memory per token.

Each linear layer keeps its fp32 state (S [B, H, D, Dv], z [B, H, D]) and a token counter (a sliding-window hybrid
layer also its last ``window`` keys and values); softmax layers of a hybrid keep an ordinary growing key/value cache.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


class RecurrentStateLayer(CacheLayerMixin):
    """One linear-attention layer's recurrent state. ``update`` stores nothing: it counts tokens and tags the
    key tensor so that the attention function finds this layer (``key._fastattn_layer``)."""

    is_sliding = False
    is_compileable = False

    def __init__(self):
        super().__init__()
        self.state: tuple[Tensor, Tensor | None] | None = None
        self.window: tuple[Tensor, Tensor, Tensor] | None = None   # sliding-window hybrid: last keys, values, mask
        self.seen = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        key_states._fastattn_layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.window, self.seen = None, None, 0

    def _map_state(self, fn) -> None:
        if self.state is not None:
            self.state = tuple(None if t is None else fn(t) for t in self.state)
        if self.window is not None:
            self.window = tuple(fn(t) for t in self.window)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped (no per-token history is kept)")


class LinearAttentionCache(Cache):
    """``past_key_values`` for a linearized model: ``model.generate(..., past_key_values=LinearAttentionCache(model))``.

    ``fastattn.hf.linearize`` also makes plain ``model.generate()`` create one.
    """

    def __init__(self, model=None, num_layers: int | None = None, softmax_layers=()):
        if model is not None:
            from .linearize import linearized_layers
            linear = linearized_layers(model)
            num_layers = len(linear)
            softmax_layers = [i for i, is_linear in enumerate(linear) if not is_linear]
        if num_layers is None:
            raise ValueError("LinearAttentionCache needs a linearized model or num_layers")
        layers = [DynamicLayer() if i in set(softmax_layers) else RecurrentStateLayer() for i in range(num_layers)]
        super().__init__(layers=layers)

    def states(self) -> list[tuple[Tensor, Tensor | None] | None]:
        """The recurrent (S, z) of every layer (None for softmax layers or before the first token)."""
        return [getattr(layer, "state", None) for layer in self.layers]
