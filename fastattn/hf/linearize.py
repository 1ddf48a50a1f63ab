"""``linearize``: attach per-layer feature maps to a pre-trained HF model and switch it to linear attention."""
from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import feature_maps
from .architectures import attention_modules, head_counts
from .attention import ATTENTION_NAME, LinearAttentionAdapter, register

META_FILE = "fastattn.json"
ADAPTER_FILE = "fastattn_adapters.safetensors"


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    model.config._attn_implementation = name
    for module in model.modules():  # sub-configs (e.g. text config) keep their own copy
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg is not model.config:
            cfg._attn_implementation = name


def linearized_layers(model: nn.Module) -> list[bool]:
    """For every layer: True when it runs linear attention."""
    return [getattr(m, "fastattn", None) is not None for m in attention_modules(model)]


def linearize(model: nn.Module, feature_dims: int | Sequence[int], feature_map: str = "prf",
              softmax_layers: Sequence[int] = (), window: int = 0, eps: float = 1e-12, backend: str = "auto",
              seed: int = 0, **feature_map_kw) -> nn.Module:
    """Give every layer (but ``softmax_layers``) its own feature map and switch the model to linear attention.

    Args:
        model: an HF model of a supported architecture (llama family, gpt2, bert); modified in place.
        feature_dims: one feature dim for all layers, or one per layer (entries of softmax layers are ignored).
        feature_map: a name of ``fastattn.feature_maps`` ("prf", "hedgehog", "performer", "elu1", "relu").
        softmax_layers: layer indices that keep softmax attention (a hybrid).
        window: a sliding-window softmax hybrid in every linear layer (LoLCATs): each query attends to its last
            ``window`` keys by softmax and to older keys by linear attention, one normalizer for both (see
            ``fastattn.hf.window``); 0 (default): linear attention only. Causal models only.
        eps: the denominator's epsilon (features are stabilised in log space, so it must be tiny).
        seed: seeds the feature maps' initialisation (layer i uses seed + i).
    Afterwards ``model(...)`` runs linear attention and ``model.generate(...)`` decodes with a
    ``LinearAttentionCache`` (O(1) memory per token). Feature-map parameters live under each attention module
    (``...self_attn.fastattn.feature_map.*``) in fp32.
    """
    modules = attention_modules(model)
    S = len(modules)
    dims = [int(feature_dims)] * S if isinstance(feature_dims, int) else [int(d) for d in feature_dims]
    if len(dims) != S:
        raise ValueError(f"feature_dims has {len(dims)} entries but the model has {S} layers")
    softmax = sorted(set(int(i) for i in softmax_layers))
    if any(not 0 <= i < S for i in softmax):
        raise ValueError(f"softmax_layers {softmax} out of range for {S} layers")
    if window and not getattr(modules[0], "is_causal", True):
        raise ValueError(f"window={window}: the sliding-window hybrid needs a causal model, "
                         f"{type(model).__name__} is not")
    heads, kv_heads, head_dim = head_counts(model)
    device = next(model.parameters()).device
    for i, module in enumerate(modules):
        if i in softmax:
            module.fastattn = None
            continue
        gen = torch.Generator().manual_seed(seed + i)
        kw = dict(feature_map_kw)
        if feature_map in ("prf", "performer", "hedgehog", "elu1", "relu"):
            kw.setdefault("generator", gen)
        fm = feature_maps.build(feature_map, head_dim, dims[i], heads, **kw)
        module.fastattn = LinearAttentionAdapter(fm, heads, kv_heads, eps=eps, backend=backend,
                                                 window=window).to(device)
    register()
    _set_attn_implementation(model, ATTENTION_NAME)
    model.config.fastattn = {"feature_dims": dims, "feature_map": feature_map, "softmax_layers": softmax,
                             "window": int(window), "eps": eps, "seed": seed,
                             "feature_map_kw": {k: v for k, v in feature_map_kw.items()
                                                if isinstance(v, (int, float, str, bool))}}
    _install_generation_cache(model)
    return model


def _install_generation_cache(model: nn.Module) -> None:
    """Make plain ``model.generate()`` use a LinearAttentionCache when the caller passes none."""
    prepare = getattr(model, "_prepare_cache_for_generation", None)
    if prepare is None or getattr(prepare, "_fastattn", False):
        return

    # transformers >= 5.24 names the argument "cache" (earlier: "past_key_values")
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prepare_cache(generation_config, model_kwargs, *args, **kwargs):
        from .cache import LinearAttentionCache
        if model_kwargs.get(key) is None and generation_config.use_cache is not False \
                and getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME:
            model_kwargs[key] = LinearAttentionCache(model)
        return prepare(generation_config, model_kwargs, *args, **kwargs)

    prepare_cache._fastattn = True
    model._prepare_cache_for_generation = prepare_cache


@contextlib.contextmanager
def softmax_attention(model: nn.Module, implementation: str = "sdpa"):
    """Run a linearized model as its softmax teacher inside the block (same weights, no copy)."""
    previous = model.config._attn_implementation
    _set_attn_implementation(model, implementation)
    try:
        yield model
    finally:
        _set_attn_implementation(model, previous)


def adapters(model: nn.Module) -> dict[int, LinearAttentionAdapter]:
    """{layer index: adapter} of the linear layers."""
    return {i: m.fastattn for i, m in enumerate(attention_modules(model)) if getattr(m, "fastattn", None) is not None}


def save_linearized(model: nn.Module, directory: str | Path) -> Path:
    """Write the feature maps (safetensors) and the linearization settings (JSON) to ``directory``.

    The base model's weights are not written: reload them as before, then ``load_linearized``.
    """
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"{i}.{k}": v.detach().cpu().contiguous() for i, a in adapters(model).items()
             for k, v in a.state_dict().items()}
    save_file(state, str(directory / ADAPTER_FILE))
    (directory / META_FILE).write_text(json.dumps(model.config.fastattn, indent=1))
    return directory


def load_linearized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Linearize ``model`` as saved in ``directory`` and load its trained feature maps (strictly)."""
    from safetensors.torch import load_file
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    linearize(model, meta["feature_dims"], feature_map=meta["feature_map"], softmax_layers=meta["softmax_layers"],
              window=meta.get("window", 0), eps=meta["eps"], seed=meta.get("seed", 0),
              **meta.get("feature_map_kw", {}))
    if "lora" in meta:
        from .lora import add_lora
        add_lora(model, **meta["lora"])
    state = load_file(str(directory / ADAPTER_FILE))
    for i, adapter in adapters(model).items():
        prefix = f"{i}."
        adapter.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return model
