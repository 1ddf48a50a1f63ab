"""TRL's preference dataset formats -> tokenized rows for sequence log-probs.

Accepted (a list of dicts, or a ``datasets.Dataset`` / anything iterable over dict rows):
- unpaired (KTO/BCO style): ``prompt``, ``completion``, ``label`` (bool: True = preferred / desirable);
- paired (DPO style): ``prompt``, ``chosen``, ``rejected``; each pair becomes a preferred and an unpreferred row
  (consecutive, sharing a ``pair`` id), so DDRO/RDRO see it as unpaired data with mu = 1/2.
Text may be "standard" (strings) or "conversational" (lists of {"role", "content"} messages, as in TRL): a
conversational prompt goes through the tokenizer's chat template with the generation prompt, a conversational
completion contributes its messages' contents.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Row:
    prompt: list[int]
    completion: list[int]
    label: bool
    pair: int = -1          # pair id for paired data (-1: unpaired)


def dataset_format(example: dict) -> str:
    """ "paired" or "unpaired" from one example's keys (ValueError naming the expected columns otherwise)."""
    keys = set(example)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "paired"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    raise ValueError(f"an example must have the columns prompt/completion/label (unpaired) or "
                     f"prompt/chosen/rejected (paired); got {sorted(keys)}")


def _text(tokenizer, value, is_prompt: bool) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in value):
        if is_prompt and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(list(value), tokenize=False, add_generation_prompt=True)
        return "".join(str(m["content"]) for m in value)
    raise ValueError(f"prompt/completion must be a string or a list of {{'role', 'content'}} messages, "
                     f"got {type(value).__name__}")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _row(tokenizer, prompt, completion, label: bool, pair: int, max_prompt: int, max_length: int) -> Row:
    p = _encode(tokenizer, _text(tokenizer, prompt, True))[-max_prompt:]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not p or p[0] != bos):
        p = [bos] + p[-(max_prompt - 1):] if max_prompt > 1 else [bos]
    if not p:
        raise ValueError("an empty prompt needs a tokenizer with a bos_token_id (the first completion token "
                         "must be predicted from something)")
    c = _encode(tokenizer, _text(tokenizer, completion, False))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        c = c + [eos]
    c = c[:max_length - len(p)]
    if not c:
        raise ValueError("a completion is empty after tokenization and truncation")
    return Row(p, c, bool(label), pair)


def tokenize(dataset, tokenizer, max_prompt_length: int = 256, max_length: int = 512) -> list[Row]:
    """Rows of a TRL-format dataset (module docstring), tokenized and truncated (prompts keep their last
    ``max_prompt_length`` tokens; completions are cut at ``max_length`` in total and end with eos when the
    tokenizer has one)."""
    rows: list[Row] = []
    kind = None
    for i, ex in enumerate(dataset):
        ex = dict(ex)
        kind = kind or dataset_format(ex)
        if dataset_format(ex) != kind:
            raise ValueError(f"example {i} is {dataset_format(ex)} but earlier examples are {kind}")
        if kind == "paired":
            for completion, label in ((ex["chosen"], True), (ex["rejected"], False)):
                rows.append(_row(tokenizer, ex["prompt"], completion, label, i, max_prompt_length, max_length))
        else:
            label = ex["label"]
            if not isinstance(label, (bool, int)) or isinstance(label, int) and label not in (0, 1):
                raise ValueError(f"example {i}: label must be a bool, got {label!r}")
            rows.append(_row(tokenizer, ex["prompt"], ex["completion"], bool(label), -1, max_prompt_length,
                             max_length))
    if not rows:
        raise ValueError("the dataset is empty")
    return rows


def collate(rows: list[Row], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch: input_ids, attention_mask [R, L]; targets and response [R, L - 1] for
    ``seq_logps(hidden[:, :-1], W, targets, response)`` (position t predicts token t + 1); labels [R] bool."""
    L = max(len(r.prompt) + len(r.completion) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), L, dtype=torch.bool)
    resp = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        seq = r.prompt + r.completion
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = True
        resp[i, len(r.prompt):len(seq)] = True
    return {"input_ids": ids, "attention_mask": attn, "targets": ids[:, 1:], "response": resp[:, 1:],
            "labels": torch.tensor([r.label for r in rows], dtype=torch.bool)}
