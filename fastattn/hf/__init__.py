"""Drop-in linear attention for HF transformers models (needs ``pip install 'fastattn[hf]'``).

    model, tok = fastattn.models.load("smollm2-135m")
    fastattn.hf.linearize(model, feature_dims=[...one per layer...], feature_map="prf")
    model.generate(...)          # recurrent LinearAttentionCache, O(1) memory per token
"""
from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastattn.hf needs transformers: pip install 'fastattn[hf]'") from e

from .architectures import ARCHITECTURES, attention_modules, head_counts
from .attention import ATTENTION_NAME, LinearAttentionAdapter, linear_attention_forward, register
from .cache import LinearAttentionCache, RecurrentStateLayer
from .decode import greedy_decode
from .lora import add_lora
from .linearize import (adapters, linearize, linearized_layers, load_linearized, save_linearized,
                        softmax_attention)

__all__ = ["ARCHITECTURES", "ATTENTION_NAME", "LinearAttentionAdapter", "LinearAttentionCache",
           "RecurrentStateLayer", "add_lora", "adapters", "attention_modules", "greedy_decode", "head_counts",
           "linear_attention_forward", "linearize", "linearized_layers", "load_linearized", "register", "save_linearized", "softmax_attention"]
