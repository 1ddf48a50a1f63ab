"""Where each supported HF architecture keeps its attention modules and head counts: one table, no per-model code."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    layers: str            # dotted path from the model to the list of blocks
    attention: str         # dotted path from a block to the module that calls the attention function
    heads: str             # config attribute: query heads
    kv_heads: str | None   # config attribute: key/value heads (None: same as heads)
    causal: bool
    projections: tuple[str, ...]   # the attention module's linear projections (LoRA targets)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("model.layers", "self_attn", "num_attention_heads", "num_key_value_heads", True,
                          ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gpt2": Architecture("transformer.h", "attn", "n_head", None, True, ("c_attn", "c_proj")),
    "bert": Architecture("encoder.layer", "attention.self", "num_attention_heads", None, False,
                         ("query", "key", "value")),
}
# Llama-style families share the layout
for _name in ("mistral", "qwen2", "qwen3", "smollm3"):
    ARCHITECTURES[_name] = ARCHITECTURES["llama"]


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def architecture(model: nn.Module) -> Architecture:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every layer, in layer order."""
    arch = architecture(model)
    bare = arch.layers.split(".", 1)[1] if "." in arch.layers else arch.layers
    # heads-on-top wrappers (LlamaForCausalLM, GPT2LMHeadModel, BertFor...) or bare models (LlamaModel, BertModel)
    for path in (arch.layers, bare, "bert." + arch.layers):
        try:
            layers = _get(model, path)
            break
        except AttributeError:
            continue
    else:
        raise ValueError(f"cannot find the layers {arch.layers!r} in {type(model).__name__}")
    return [_get(block, arch.attention) for block in layers]


def head_counts(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the config."""
    arch = architecture(model)
    cfg = model.config
    heads = getattr(cfg, arch.heads)
    kv = getattr(cfg, arch.kv_heads) if arch.kv_heads else heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return heads, kv, head_dim
