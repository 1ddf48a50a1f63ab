"""The three evaluations of PCFG.md, each with its exact Bayes reference from the DP.

A. next-token loss per position with the run's metadata given vs an all-MASK prefix (Bayes: ``bayes_loss``);
B. linear probes of every j_d from hidden states (all-MASK input) per layer and prompt length (Bayes: MAP of
   ``level_posterior``), fitted on one document set and scored on another;
C. grammatical accuracy of sampled continuations of length-k prompts (all-MASK input), scored by exact membership
   in L(G_j) for the prompt's own metadata j (reference: E[p(j | w_1..w_k)], a lower bound on the accuracy of
   sampling from the true posterior predictive, which continues under the right grammar at least that often).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import PCFGRunConfig
from .grammar import LeveledPCFG, PCFGSample
from .inference import InsideResult, conditional, inside
from .train import autocast, token_losses

MODES = ("meta", "mask")       # inference with the run's metadata levels given / with all MASK slots


@dataclass
class EvalSet:
    """Held-out documents and their exact DP scores (shared by every run)."""
    docs: PCFGSample
    dp: InsideResult


def eval_set(pcfg: LeveledPCFG, n: int, seed: int, device) -> EvalSet:
    docs = pcfg.sample(n, seed=seed)
    return EvalSet(docs, inside(pcfg, docs.terminals.to(device), docs.lengths.to(device)))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def position_losses(model: nn.Module, pcfg: LeveledPCFG, docs: PCFGSample, known: Tensor, cfg: PCFGRunConfig,
                    device) -> Tensor:
    """Model next-token loss [N, T+1] (nats; 0 where not a target), entry k scoring w_{k+1} (EOS at k = n)."""
    tokens, _ = pcfg.encode(docs.terminals, docs.lengths, known)
    out = []
    for rows in _batches(len(tokens), cfg.eval_batch_size):
        with autocast(device, cfg):
            out.append(token_losses(model, tokens[rows].to(device)).cpu())
    losses = torch.cat(out)[:, pcfg.prefix_width - 1:]
    valid = torch.arange(losses.shape[1]) <= docs.lengths[:, None]
    return torch.where(valid, losses, 0.0)


def _curve(loss: Tensor, lengths: Tensor) -> dict:
    """Per-position mean over documents that have that position, the count, and the token-weighted average."""
    valid = torch.arange(loss.shape[1]) <= lengths[:, None]
    count = valid.sum(0)
    return {"per_position": (loss.sum(0) / count.clamp(min=1)).tolist(), "count": count.tolist(),
            "average": float(loss.sum() / valid.sum())}


def bayes_losses(pcfg: LeveledPCFG, ev: EvalSet, meta_depths) -> dict:
    """Figure A's Bayes curves: {"mask": curve, "meta": {D_M: curve}}."""
    docs, lengths = ev.docs, ev.docs.lengths
    out = {"mask": _curve(ev.dp.bayes_loss(None).cpu().float(), lengths), "meta": {}}
    for d in meta_depths:
        known = pcfg.mask_metadata(docs.meta, d).to(ev.dp.log_seq.device)
        out["meta"][str(d)] = _curve(ev.dp.bayes_loss(known).cpu().float(), lengths)
    return out


def loss_by_mode(model, pcfg: LeveledPCFG, ev: EvalSet, meta_depth: int, cfg: PCFGRunConfig, device) -> dict:
    """Figure A for one model: {"meta": curve, "mask": curve}."""
    docs = ev.docs
    known = {"meta": pcfg.mask_metadata(docs.meta, meta_depth), "mask": pcfg.mask_metadata(docs.meta, 0)}
    return {mode: _curve(position_losses(model, pcfg, docs, known[mode], cfg, device), docs.lengths)
            for mode in MODES}


# ---------------------------------------------------------------- B: probes ------------------------------------
@torch.no_grad()
def probe_features(model: nn.Module, pcfg: LeveledPCFG, docs: PCFGSample, positions, cfg: PCFGRunConfig,
                   device) -> Tensor:
    """Hidden states [L+1, P, N, H] (embeddings, then every layer) after reading w_1..w_k, all-MASK prefix."""
    known = pcfg.mask_metadata(docs.meta, 0)
    tokens, _ = pcfg.encode(docs.terminals, docs.lengths, known)
    at = torch.tensor([pcfg.prefix_width - 1 + k for k in positions])
    at = at.clamp(max=tokens.shape[1] - 1)
    out = []
    for rows in _batches(len(tokens), cfg.eval_batch_size):
        with autocast(device, cfg):
            hidden = model(input_ids=tokens[rows].to(device), output_hidden_states=True).hidden_states
        out.append(torch.stack([h[:, at.to(device)].float() for h in hidden]).cpu())        # [L+1, B, P, H]
    return torch.cat(out, dim=1).transpose(1, 2)


def fit_probes(train_x: Tensor, train_y: Tensor, train_valid: Tensor, test_x: Tensor, test_y: Tensor,
               test_valid: Tensor, num_classes: int, steps: int, device, seed: int = 0) -> Tensor:
    """Multinomial logistic probes, one per (layer, position, level), fitted jointly full-batch with Adam.

    x [L, P, N, H] features; y [N, D] labels; valid [P, N] (the document has position k). Returns the test
    accuracy [L, P, D]. Features are standardised with the training statistics of their (layer, position).
    """
    lay, pos, _, hid = train_x.shape
    levels = train_y.shape[1]
    m = train_valid[None, ..., None].to(train_x.dtype)                                     # [1, P, N, 1]
    count = m.sum(2, keepdim=True).clamp(min=1)
    mean = (train_x * m).sum(2, keepdim=True) / count
    std = (((train_x - mean) ** 2 * m).sum(2, keepdim=True) / count).sqrt() + 1e-5
    xs = [((x - mean) / std).to(device) for x in (train_x, test_x)]
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(lay, pos, levels, hid, num_classes, generator=gen)).to(device).requires_grad_()
    bias = torch.zeros(lay, pos, levels, 1, num_classes, device=device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    y = train_y.T.to(device)[None, None].expand(lay, pos, levels, -1)                      # [L, P, D, N]
    w = train_valid.to(device, torch.float32)[None, :, None].expand(lay, pos, levels, -1)
    for _ in range(steps):
        logits = torch.einsum("lpnh,lpdhk->lpdnk", xs[0], weight) + bias
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 3), y.flatten(), reduction="none")
        loss = (ce * w.flatten()).sum() / w.sum() + 1e-4 * weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (torch.einsum("lpnh,lpdhk->lpdnk", xs[1], weight) + bias).argmax(-1)         # [L, P, D, N]
        hit = (pred == test_y.T.to(device)).float()
        tv = test_valid.to(device, torch.float32)[None, :, None]
        return ((hit * tv).sum(-1) / tv.sum(-1).clamp(min=1)).cpu()


def position_valid(docs: PCFGSample, positions) -> Tensor:
    """[P, N]: document n has at least k terminals."""
    return docs.lengths[None] >= torch.tensor(positions)[:, None]


def bayes_probe_ceiling(ev: EvalSet, positions) -> Tensor:
    """MAP accuracy of p(j_d | w_1..w_k) [P, D] over the documents that have position k."""
    post = ev.dp.level_posterior(None).cpu()                                                 # [N, T+1, D, K]
    at = torch.tensor(positions).clamp(max=post.shape[1] - 1)
    hit = (post[:, at].argmax(-1) == ev.docs.meta[:, None]).float()                          # [N, P, D]
    valid = position_valid(ev.docs, positions).T[..., None].float()
    return (hit * valid).sum(0) / valid.sum(0).clamp(min=1)


# ---------------------------------------------------------------- C: grammatical accuracy --------------------------
def prompt_sets(pool: PCFGSample, positions, n: int) -> dict[int, Tensor]:
    """For each k: the indices of the first ``n`` pool documents with at least k terminals."""
    return {k: torch.nonzero(pool.lengths >= k)[:n, 0] for k in positions}


@torch.no_grad()
def sample_continuations(model: nn.Module, pcfg: LeveledPCFG, prompts: Tensor, prompt_lengths: Tensor,
                         cfg: PCFGRunConfig, device, seed: int) -> tuple[Tensor, Tensor]:
    """Sample (temperature 1, terminals and EOS only) after ``[BOS] MASK*D w_1..w_k``, prompts of mixed k.

    prompts [N, K] (row n uses its first ``prompt_lengths[n]`` terminals; rows are left-padded, which changes
    nothing: ``generate`` counts positions from the attention mask). Returns whole documents (terminals
    [N, 3^D + 1], lengths [N]); one without EOS within 3^D terminals gets length 3^D + 1, which no grammar accepts.
    """
    n = len(prompt_lengths)
    limit = 3 ** pcfg.depth
    width = int(prompt_lengths.max()) if n else 0
    pad = width - prompt_lengths                                                             # [N]
    head = torch.cat([torch.full((1,), pcfg.bos_id), torch.full((pcfg.depth,), pcfg.mask_id)])
    ids = torch.full((n, width + pcfg.prefix_width), pcfg.pad_id, dtype=torch.long)        # pad[n] PADs first
    for row in range(n):
        ids[row, int(pad[row]):] = torch.cat([head, prompts[row, :int(prompt_lengths[row])].long()])
    attention = (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()
    suppress = [t for t in range(pcfg.vocab_size) if t >= pcfg.num_terminals and t != pcfg.eos_id]
    torch.manual_seed(seed)
    with autocast(device, cfg):
        out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=limit - int(prompt_lengths.min()) + 1, eos_token_id=pcfg.eos_id,
                             pad_token_id=pcfg.pad_id, suppress_tokens=suppress).cpu()
    # row n's document starts after its pads and prefix: column pad[n] + prefix_width
    at = pad[:, None] + pcfg.prefix_width + torch.arange(limit + 1)[None]
    doc = torch.where(at < out.shape[1], out.gather(1, at.clamp(max=out.shape[1] - 1)), pcfg.pad_id)
    is_eos = doc == pcfg.eos_id
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1), limit + 1)
    terminals = torch.where(doc < pcfg.num_terminals, doc, 0)
    return terminals, lengths


def grammatical_accuracy(model: nn.Module, pcfg: LeveledPCFG, pool: PCFGSample, prompts: dict[int, Tensor],
                         cfg: PCFGRunConfig, device, seed: int) -> dict:
    """Figure C for one model: {k: {"accuracy", "n", "eos_rate"}} by exact membership under the own metadata.

    All prompt lengths are sampled together, ``eval_batch_size`` prompts per generate call.
    """
    ks = [k for k, idx in prompts.items() if len(idx)]
    doc = torch.cat([prompts[k] for k in ks]) if ks else torch.zeros(0, dtype=torch.long)
    klen = torch.cat([torch.full((len(prompts[k]),), k) for k in ks]) if ks else torch.zeros(0, dtype=torch.long)
    terminals, lengths = [], []
    for i, rows in enumerate(_batches(len(doc), cfg.eval_batch_size)):
        t, n = sample_continuations(model, pcfg, pool.terminals[doc[rows]], klen[rows], cfg, device, seed + i)
        terminals.append(t)
        lengths.append(n)
    if not ks:
        return {}
    terminals, lengths = torch.cat(terminals), torch.cat(lengths)
    ok = lengths <= 3 ** pcfg.depth
    member = torch.zeros(len(doc), dtype=torch.bool)
    if ok.any():
        seq, _ = conditional(pcfg, terminals[ok].to(device), lengths[ok].to(device), pool.meta[doc[ok]].to(device))
        member[ok] = (seq > float("-inf")).cpu()
    # the sampled documents must keep their prompts
    kept = (terminals[:, :klen.max()] == pool.terminals[doc, :klen.max()]) | \
        (torch.arange(int(klen.max()))[None] >= klen[:, None])
    if not kept.all():
        raise RuntimeError("sampled documents lost their prompts")
    return {str(k): {"accuracy": float(member[klen == k].float().mean()), "n": int((klen == k).sum()),
                     "eos_rate": float(ok[klen == k].float().mean())} for k in ks}


def identification_reference(pool_dp: InsideResult, pool: PCFGSample, prompts: dict[int, Tensor]) -> dict:
    """E[p(j_true | w_1..w_k)] per k: the posterior predictive continues under the true grammar at least so often."""
    tuples = pool_dp.meta_tuples.cpu()
    index = ((pool.meta[:, None, :] == tuples[None]).all(-1)).int().argmax(-1)              # [N] tuple of each doc
    post = pool_dp.posterior(None).cpu()                                                     # [N, T+1, M]
    return {str(k): float(post[idx, k, index[idx]].mean()) for k, idx in prompts.items() if len(idx)}
