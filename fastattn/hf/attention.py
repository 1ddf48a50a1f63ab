"""The transformers attention function (and mask function) that runs fastattn linear attention.

Registered under the name ``ATTENTION_NAME`` in transformers' ``AttentionInterface`` and
``AttentionMaskInterface``. A linearized attention module carries ``module.fastattn``
(a ``LinearAttentionAdapter``); a module without one (a softmax layer of a hybrid) runs SDPA.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import fastattn

ATTENTION_NAME = "fastattn_linear"


class LinearAttentionAdapter(nn.Module):
    """Per-layer linear attention state attached to an HF attention module as ``module.fastattn``.

    Holds the layer's feature map (parameters saved under ``...self_attn.fastattn.feature_map.*``) and the
    settings of the linear attention. Keys are mapped per query head (GQA), values keep their kv heads.
    """

    def __init__(self, feature_map: nn.Module, num_heads: int, num_kv_heads: int, eps: float = 1e-12,
                 backend: str = "auto", window: int = 0):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an int >= 0 (0: linear attention only), got {window!r}")
        self.feature_map = feature_map
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        if window and not hasattr(feature_map, "log_features"):
            raise ValueError(f"a sliding window needs a feature map estimating exp(q.k) with log-features "
                             f"(prf, performer), not {getattr(feature_map, 'name', type(feature_map).__name__)!r}")
        self.eps, self.backend, self.window = eps, backend, window

    @property
    def feature_dim(self) -> int:
        return self.feature_map.feature_dim

    def features(self, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """query [B, H, T, d], key [B, Hkv, T, d] -> (phi_q, phi_k) [B, H, T, feature_dim]. Maps with
        ``grouped_input`` (prf, performer) read the kv heads in place; others get the keys per query head."""
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and not getattr(self.feature_map, "grouped_input", False):
            key = key.repeat_interleave(groups, dim=1)
        return self.feature_map(query, "q"), self.feature_map(key, "k")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, scaling: float, causal: bool = True,
                key_mask: Tensor | None = None, layer=None) -> Tensor:
        """This layer's attention: query [B, H, T, d], key/value [B, Hkv, T, d|Dv], key_mask [B, T] ->
        o [B, H, T, Dv] (the sliding-window hybrid when ``window`` > 0). ``layer``: a sliding-window layer's
        cache layer (plain linear layers with a cache are the attention function's business)."""
        if self.window:
            if not causal:
                raise ValueError("the sliding-window hybrid is causal; this layer is not")
            from .window import window_attention
            return window_attention(self, query, key, value, scaling, key_mask, layer)
        phi_q, phi_k = self.features(query, key)
        o, _ = fastattn.linear_attention(phi_q, phi_k, value, causal=causal, eps=self.eps, key_mask=key_mask,
                                         backend=self.backend)
        return o

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, eps={self.eps}"
                + (f", window={self.window}" if self.window else ""))


def _key_mask(attention_mask: Tensor | None, T: int) -> Tensor | None:
    """The [B, T] key padding mask of the current keys from our 2D mask (None = no padding)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError("fastattn attention expects the 2D padding mask of its own mask function; got "
                         f"shape {tuple(attention_mask.shape)}")
    # no all-True check here: it would cost a host sync in every layer (the mask function already drops
    # masks without padding once per forward)
    return attention_mask[:, -T:].bool() if T else attention_mask[:, :0].bool()


def _sdpa(module, query, key, value, attention_mask, scaling, dropout):
    """Softmax attention for the softmax layers of a hybrid, from the 2D padding mask."""
    B, H, Tq, _ = query.shape
    Tk = key.shape[2]
    groups = H // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    causal = getattr(module, "is_causal", True)
    mask = None
    if causal and Tq > 1 or attention_mask is not None:
        pos_q = torch.arange(Tk - Tq, Tk, device=query.device)[:, None]
        keep = pos_q >= torch.arange(Tk, device=query.device)[None] if causal else \
            torch.ones(Tq, Tk, dtype=torch.bool, device=query.device)
        mask = keep[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -Tk:].bool()
    o = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                         dropout_p=dropout if module.training else 0.0)
    return o.transpose(1, 2).contiguous(), None


def linear_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: query [B, H, T, d], key/value [B, Hkv, T, d] -> ([B, T, H, d], None).

    With a ``LinearAttentionCache`` the cache layer tags the key tensor it returns (``key._fastattn_layer``);
    prefill then carries the recurrent state out and one-token decode steps use ``linear_attention_step`` (a
    sliding-window layer keeps its window in the cache layer too, see ``fastattn.hf.window``).
    """
    adapter = getattr(module, "fastattn", None)
    layer = getattr(key, "_fastattn_layer", None)
    if adapter is None:
        if layer is not None:
            raise RuntimeError("a softmax layer received a recurrent cache layer; build the cache with "
                               "LinearAttentionCache(model)")
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout)
    T = query.shape[2]
    if key.shape[2] != T:
        raise RuntimeError(f"linear attention got {key.shape[2]} keys for {T} queries: the model is generating "
                           "with a key/value cache; use fastattn.hf.LinearAttentionCache")
    causal = getattr(module, "is_causal", True)
    key_mask = _key_mask(attention_mask, T)
    fm = adapter.feature_map
    if layer is not None and hasattr(fm, "calibrate_key_shift") and not fm.key_shift_calibrated:
        # one fixed key scale for every call that feeds this recurrent state
        fm.calibrate_key_shift(key, key_mask)   # maps with a key shift take GQA keys in place
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if layer is None or adapter.window:
        return adapter(query, key, value, scaling, causal, key_mask, layer).transpose(1, 2).contiguous(), None
    phi_q, phi_k = adapter.features(query, key)
    if layer.state is not None and T == 1:
        if key_mask is not None:
            phi_k = phi_k * key_mask[:, None, :, None].to(phi_k.dtype)
        o, layer.state = fastattn.linear_attention_step(phi_q[:, :, 0], phi_k[:, :, 0], value[:, :, 0], layer.state,
                                                        eps=adapter.eps, backend=adapter.backend)
        o = o[:, :, None]
    else:
        o, layer.state = fastattn.linear_attention(phi_q, phi_k, value, causal=True, eps=adapter.eps,
                                                   key_mask=key_mask, state=layer.state, return_state=True,
                                                   backend=adapter.backend)
    return o.transpose(1, 2).contiguous(), None


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """transformers mask function: pass the 2D padding mask [B, kv_length] through (None when nothing is padded);
    causality is the kernel's business."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    return None if bool(attention_mask.all()) else attention_mask


_registered: set[str] = set()


def register_attention(name: str, forward, mask_function) -> str:
    """Register an attention function and its mask function with transformers under ``name`` (idempotent)."""
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, mask_function)
        _registered.add(name)
    return name


def register() -> str:
    """Register fastattn's linear attention with transformers; returns ATTENTION_NAME."""
    return register_attention(ATTENTION_NAME, linear_attention_forward, padding_mask)
