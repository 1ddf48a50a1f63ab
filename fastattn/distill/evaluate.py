"""Evaluation of teacher and student: held-out next-token loss, per-layer attention-row KL, throughput, text."""
from __future__ import annotations

import math
import time

import torch

from .losses import softmax_loss
from .train import _scaling, lm_loss


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, batch_size: int) -> dict:
    """Token-weighted mean next-token loss (nats) and perplexity over held-out sequences ids [N, T]."""
    total, count = 0.0, 0
    for s in range(0, ids.shape[0], batch_size):
        chunk = ids[s:s + batch_size]
        n = chunk.numel() - chunk.shape[0]
        total += lm_loss(model, chunk).item() * n
        count += n
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


@torch.no_grad()
def attention_kl(model, teacher_batch: list[dict]) -> list[float]:
    """Per-layer mean KL(teacher attention row || student row) on one captured held-out batch (nan for softmax
    layers)."""
    from ..hf import adapters, attention_modules
    ads = adapters(model)
    causal = getattr(attention_modules(model)[0], "is_causal", True)
    scaling = _scaling(model)
    return [softmax_loss(ads[i], entry, scaling, causal)[0].item() if i in ads else float("nan")
            for i, entry in enumerate(teacher_batch)]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_throughput(model, vocab: int, T: int, device, reps: int = 3) -> dict:
    """Tokens/s of one B=1 forward over T tokens (no cache, logits of the last token only)."""
    ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(0)).to(device)
    model(ids[:, :16], use_cache=False, logits_to_keep=1)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        _sync(device)
        times.append(time.perf_counter() - t0)
    ms = sorted(times)[len(times) // 2] * 1e3
    return {"T": T, "ms": ms, "tokens_per_s": T / (ms / 1e3)}


@torch.no_grad()
def generate_throughput(model, vocab: int, context: int, new_tokens: int, device, batch: int = 1) -> dict:
    """Greedy ``model.generate`` tokens/s after a prompt of ``context`` tokens, and peak device memory."""
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=new_tokens,
              max_new_tokens=new_tokens, pad_token_id=0)
    model.generate(ids[:, :8], **{**kw, "attention_mask": torch.ones_like(ids[:, :8]), "min_new_tokens": 2,
                                  "max_new_tokens": 2})
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    _sync(device)
    seconds = time.perf_counter() - t0
    generated = (out.shape[1] - context) * batch
    row = {"context": context, "batch": batch, "new_tokens": generated, "seconds": seconds,
           "tokens_per_s": generated / seconds}
    if torch.device(device).type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return row


@torch.no_grad()
def generate_text(model, tokenizer, prompts, max_new_tokens: int, device) -> list[str]:
    outs = []
    for prompt in prompts:
        msgs = [{"role": "user", "content": prompt}]
        try:
            enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        except (ValueError, AttributeError):  # no chat template
            enc = tokenizer(prompt, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs
