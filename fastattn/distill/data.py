"""Offline text for distillation: CPython's pydoc_data.topics (465 KB of English reference text).

The topics are joined in sorted order and split by characters into calibration (first 10%), training (next
80%) and held-out (last 10%) parts, so the three never share text. Provenance: the ``pydoc_data`` package of the
running CPython (its version is recorded in the report).
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


def sequences(tokenizer, split: str, context: int, count: int) -> torch.Tensor:
    """[count, context] token ids from one split (non-overlapping windows, wrapping around if the split is short)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    text = corpus()
    lo, hi = SPLITS[split]
    part = text[int(lo * len(text)):int(hi * len(text))]
    ids = torch.tensor(tokenizer(part)["input_ids"], dtype=torch.long)
    need = count * context
    if ids.numel() < context:
        raise ValueError(f"split {split!r} has only {ids.numel()} tokens, fewer than one context of {context}")
    reps = -(-need // ids.numel())
    return ids.repeat(reps)[:need].view(count, context)


def available_sequences(tokenizer, split: str, context: int) -> int:
    text = corpus()
    lo, hi = SPLITS[split]
    return len(tokenizer(text[int(lo * len(text)):int(hi * len(text))])["input_ids"]) // context
