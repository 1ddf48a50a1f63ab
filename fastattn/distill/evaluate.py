"""Evaluation of teacher and student: held-out next-token loss (causal LMs) or hidden-state fidelity to the
teacher (encoders), per-layer attention-row KL, throughput, text."""
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
def encoder_hidden(model, ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Final hidden states [N, T, D] (fp32) of an encoder on ids [N, T] with the padding mask [N, T]."""
    return torch.cat([model(ids[s:s + batch_size], attention_mask=attention_mask[s:s + batch_size])
                      .last_hidden_state.float() for s in range(0, ids.shape[0], batch_size)])


@torch.no_grad()
def encoder_fidelity(model, ids: torch.Tensor, attention_mask: torch.Tensor, teacher_hidden: torch.Tensor,
                     batch_size: int) -> dict:
    """How close the model's final hidden states are to the teacher's (teacher_hidden [N, T, D]) on held-out
    sequences, padding excluded: "cosine" = mean over sequences of the cosine similarity of the mean-pooled
    hidden states (the sentence embedding of MiniLM-style encoders), "cosine_min" its minimum,
    "hidden_rel_err" = ||h - h_teacher|| / ||h_teacher|| over all unpadded tokens, and "loss" = 1 - cosine
    (0 for the teacher itself; not a next-token loss)."""
    hidden = encoder_hidden(model, ids, attention_mask, batch_size)
    m = attention_mask[..., None].to(hidden.dtype)
    pooled, pooled_t = ((h * m).sum(1) / m.sum(1) for h in (hidden, teacher_hidden))
    cos = torch.nn.functional.cosine_similarity(pooled, pooled_t, dim=-1)
    err = ((hidden - teacher_hidden) * m).square().sum().sqrt() / (teacher_hidden * m).square().sum().sqrt()
    return {"loss": 1.0 - cos.mean().item(), "cosine": cos.mean().item(), "cosine_min": cos.min().item(),
            "hidden_rel_err": err.item(), "sequences": ids.shape[0], "tokens": int(attention_mask.sum())}


@torch.no_grad()
def attention_kl(model, teacher_batch: list[dict], attention_mask: torch.Tensor | None = None) -> list[float]:
    """Per-layer mean KL(teacher attention row || student row) on one captured held-out batch (nan for softmax
    layers). attention_mask [B, T] (right padding, non-causal models): each sequence's rows and keys are cut
    to its unpadded length and the KL is the mean over its unpadded query rows."""
    from ..hf import adapters, attention_modules
    ads = adapters(model)
    causal = getattr(attention_modules(model)[0], "is_causal", True)
    scaling = _scaling(model)
    lengths = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.sum(1).tolist()
    if lengths is not None and causal:
        raise ValueError("attention_kl: padding masks are for non-causal (encoder) batches")

    def kl(adapter, entry) -> float:
        if lengths is None:
            return softmax_loss(adapter, entry, scaling, causal)[0].item()
        per_seq = [softmax_loss(adapter, {"q": entry["q"][b:b + 1, :, :n], "k": entry["k"][b:b + 1, :, :n]},
                                scaling, causal)[0].item() * n for b, n in enumerate(lengths)]
        return sum(per_seq) / sum(lengths)

    return [kl(ads[i], entry) if i in ads else float("nan") for i, entry in enumerate(teacher_batch)]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def prefill_inputs(vocab: int, T: int, device, encoder: bool = False) -> tuple[torch.Tensor, dict]:
    """(ids [1, T], forward kwargs) of one timed B=1 prefill: causal LMs without cache, logits of the last token
    only; encoders the plain forward."""
    ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(0)).to(device)
    return ids, {} if encoder else dict(use_cache=False, logits_to_keep=1)


@torch.no_grad()
def prefill_throughput(model, vocab: int, T: int, device, reps: int = 3, encoder: bool = False) -> dict:
    """Tokens/s of one B=1 forward over T tokens (``prefill_inputs``)."""
    ids, kw = prefill_inputs(vocab, T, device, encoder)
    model(ids, **kw)   # warm-up at the full length: kernels specialised for it compile here, not in a timed rep
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        model(ids, **kw)
        _sync(device)
        times.append(time.perf_counter() - t0)
    ms = sorted(times)[len(times) // 2] * 1e3
    return {"T": T, "ms": ms, "tokens_per_s": T / (ms / 1e3)}


@torch.no_grad()
def generate_throughput(model, vocab: int, context: int, new_tokens: int, device, batch: int = 1,
                        fixed_steps: bool = False) -> dict:
    """Greedy ``model.generate`` tokens/s after a prompt of ``context`` tokens, and peak device memory.
    fixed_steps: ``fastattn.hf.greedy_decode`` instead (a linearized model; one CUDA graph replay per token on a
    GPU when every layer is plain linear attention), prefill included in the time as for generate."""
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(1)).to(device)
    if fixed_steps:
        from ..hf import greedy_decode

        def decode(x, n):
            return greedy_decode(model, x, n)
    else:
        def decode(x, n):
            return model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, min_new_tokens=n,
                                  max_new_tokens=n, pad_token_id=0)
    decode(ids[:, :8], 2)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    out = decode(ids, new_tokens)
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
