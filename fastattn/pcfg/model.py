"""The Llama-style decoder of the PCFG study, built from a config (transformers, no downloads)."""
from __future__ import annotations

import torch
from torch import nn

from .config import MODELS, PCFGRunConfig
from .grammar import LeveledPCFG


def build_model(cfg: PCFGRunConfig, pcfg: LeveledPCFG, seed: int) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` over the grammar's vocabulary (seeded), optionally with fastattn
    linear attention (``cfg.attention == "linear"``: every layer, ``cfg.feature_map``, dim ``cfg.feature_dim``)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastattn pcfg needs transformers: pip install 'fastattn[hf]'") from e
    size = MODELS[cfg.model]
    conf = LlamaConfig(vocab_size=pcfg.vocab_size, hidden_size=size["hidden_size"],
                       intermediate_size=size["intermediate_size"], num_hidden_layers=size["num_layers"],
                       num_attention_heads=size["num_heads"], num_key_value_heads=size["num_heads"],
                       max_position_embeddings=pcfg.prefix_width + 2 * 3 ** pcfg.depth + 2,  # left-padded prompts
                       rope_theta=10000.0,
                       bos_token_id=pcfg.bos_id, eos_token_id=pcfg.eos_id, pad_token_id=pcfg.pad_id,
                       tie_word_embeddings=True, attention_dropout=0.0)
    conf._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(conf)
    if cfg.attention == "linear":
        from ..hf import linearize
        head_dim = size["hidden_size"] // size["num_heads"]
        linearize(model, cfg.feature_dim or head_dim, feature_map=cfg.feature_map, seed=seed)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
