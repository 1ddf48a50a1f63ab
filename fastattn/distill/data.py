"""Offline text for distillation: CPython's pydoc_data.topics (465 KB of English reference text).

The topics are joined in sorted order and split by characters into calibration (first 10%), training (next
80%) and held-out (last 10%) parts, so the three never share text. Provenance: the ``pydoc_data`` package of the
running CPython (its version is recorded in the report).

Causal LMs read plain windows of the tokenized split (``sequences``); encoders (BERT family) read
``[CLS] window [SEP]`` sequences with an attention mask, optionally right-padded (``encoder_sequences``).
"""
from __future__ import annotations

import platform

import torch

SPLITS = {"calib": (0.0, 0.1), "train": (0.1, 0.9), "heldout": (0.9, 1.0)}


def corpus() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def provenance() -> str:
    return f"pydoc_data.topics of CPython {platform.python_version()} ({len(corpus())} characters)"


def _split_ids(tokenizer, split: str, add_special_tokens: bool = True) -> list[int]:
    """The token ids of one split of the corpus (one long sequence: no length warning, nothing truncated)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    text = corpus()
    lo, hi = SPLITS[split]
    return tokenizer(text[int(lo * len(text)):int(hi * len(text))], add_special_tokens=add_special_tokens,
                     verbose=False)["input_ids"]


def _windows(ids: list[int], split: str, width: int, count: int) -> torch.Tensor:
    """[count, width]: non-overlapping windows of ids, wrapping around if the split is short."""
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() < width:
        raise ValueError(f"split {split!r} has only {ids.numel()} tokens, fewer than one context of {width}")
    need = count * width
    return ids.repeat(-(-need // ids.numel()))[:need].view(count, width)


def sequences(tokenizer, split: str, context: int, count: int) -> torch.Tensor:
    """[count, context] token ids from one split (non-overlapping windows, wrapping around if the split is short)."""
    return _windows(_split_ids(tokenizer, split), split, context, count)


def encoder_sequences(tokenizer, split: str, context: int, count: int, max_positions: int | None = None,
                      pad_every: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder inputs from one split: (ids, attention_mask), both [count, context].

    Each row is ``[CLS] w [SEP]`` for a window w of context - 2 text tokens (non-overlapping windows). With
    ``pad_every`` = k > 0, rows k-1, 2k-1, ... are shortened to 3/4 of the context (still ending in [SEP]) and
    right-padded with [PAD] (mask 0), so that padding masks are exercised. ``max_positions``: the model's
    position limit (max_position_embeddings); a longer context is an error."""
    if max_positions is not None and context > max_positions:
        raise ValueError(f"context {context} exceeds the encoder's {max_positions} positions "
                         f"(max_position_embeddings); use --context {max_positions} or less")
    if context < 3:
        raise ValueError(f"an encoder sequence needs context >= 3 ([CLS] text [SEP]), got {context}")
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    missing = [name for name, i in special.items() if i is None]
    if missing:
        raise ValueError(f"the encoder's tokenizer has no {'/'.join(missing)} token")
    body = _windows(_split_ids(tokenizer, split, add_special_tokens=False), split, context - 2, count)
    ids = torch.cat([torch.full((count, 1), special["cls"]), body, torch.full((count, 1), special["sep"])], 1)
    mask = torch.ones_like(ids)
    if pad_every:
        short = max(3, context * 3 // 4)
        for row in range(pad_every - 1, count, pad_every):
            ids[row, short - 1] = special["sep"]
            ids[row, short:] = special["pad"]
            mask[row, short:] = 0
    return ids, mask


def available_sequences(tokenizer, split: str, context: int) -> int:
    return len(_split_ids(tokenizer, split)) // context
