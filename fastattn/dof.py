"""Degrees of freedom (DoF) of the softmax kernel on a layer's queries/keys, and feature-dim allocation.

For one head, sample J vectors x_i from the union of its queries and keys, form the Gram matrix
G_ij = exp(x_i.x_j / sqrt(d)), normalize it (default: G / trace G) and take
DoF(lam) = sum_i mu_i / (mu_i + lam) over its eigenvalues mu_i (DISTILL.md). A layer's value is the max over
its heads; ``allocate_feature_dims`` then splits a feature budget across layers in proportion to it.

Flow: ``QKReservoir`` (bounded capture from the teacher) -> ``degrees_of_freedom`` -> ``layer_dof`` ->
``allocate_feature_dims``. ``dof_from_gram`` and ``dof_from_eigenvalues`` expose the two inner steps.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor

from .feature_maps import _positive_int

_NORMALIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "trace": lambda g: g / g.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None],
    "mean": lambda g: g / g.shape[-1],
    "none": lambda g: g,
}
# Normalizations under which DoF does not change when G is multiplied by a constant.
_SCALE_INVARIANT = frozenset({"trace"})

_REDUCERS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "max": lambda t, dim: t.amax(dim),
    "mean": lambda t, dim: t.mean(dim),
    "sum": lambda t, dim: t.sum(dim),
}


def _check_choice(what: str, value: str, options) -> None:
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(sorted(options))}")


def _as_lambdas(lam) -> tuple[Tensor, bool]:
    """lam (float, 0-d or 1-D tensor, list) -> (lambdas [L] fp64 on CPU, whether lam was a scalar)."""
    lams = torch.as_tensor(lam, dtype=torch.float64).cpu()
    if lams.dim() > 1 or lams.numel() == 0:
        raise ValueError(f"lam must be a float or a non-empty 1-D sequence, got shape {list(lams.shape)}")
    if not bool(torch.isfinite(lams).all() and (lams > 0).all()):
        raise ValueError(f"lam must be positive and finite, got {lams.tolist()}")
    return lams.reshape(-1), lams.dim() == 0


def dof_from_eigenvalues(mu: Tensor, lam) -> Tensor:
    """DoF(lam) = sum_i mu_i / (mu_i + lam).

    mu: [..., J] eigenvalues (tiny negative ones from round-off are clamped to 0); lam: float -> [...],
    1-D sequence of L lambdas -> [..., L]. fp64. Eigenvalues carry round-off of about 1e-16 * J * max mu,
    so lambdas near that level count round-off as dimensions.
    """
    lams, scalar = _as_lambdas(lam)
    mu = mu.to(torch.float64).clamp_min(0)[..., None]
    dof = (mu / (mu + lams.to(mu.device))).sum(-2)
    return dof[..., 0] if scalar else dof


def dof_from_gram(gram: Tensor, lam, normalize: str = "trace") -> Tensor:
    """DoF of a Gram matrix: gram [..., J, J] symmetric PSD -> [...] (or [..., L] for L lambdas), fp64.

    normalize: "trace" (G / trace G: invariant to multiplying G by a constant), "mean" (G / J) or "none".
    One fp64 ``eigvalsh`` per matrix serves every lambda.
    """
    _check_choice("normalize", normalize, _NORMALIZERS)
    gram = _NORMALIZERS[normalize](gram.to(torch.float64))
    return dof_from_eigenvalues(torch.linalg.eigvalsh(gram), lam)


def _sample_union(q: Tensor, k: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
    """q [Nq, d], k [Nk, d] -> [J, d] fp64: num_samples rows drawn without replacement from the union,
    or the whole union (in order) when num_samples >= Nq + Nk."""
    union = torch.cat([q.to(torch.float64), k.to(torch.float64)])
    if num_samples >= union.shape[0]:
        return union
    idx = torch.randperm(union.shape[0], generator=generator)[:num_samples]
    return union[idx.to(union.device)]


def degrees_of_freedom(q: Tensor, k: Tensor, lam, num_samples: int = 1024, normalize: str = "trace",
                       seed: int = 0) -> Tensor:
    """Per-head DoF of the kernel exp(x.y / sqrt d) on one layer's post-RoPE queries and keys.

    q: [H, Nq, d], k: [Hk, Nk, d] with H % Hk == 0 (GQA: query head h pairs with key head h // (H // Hk)).
    For each head, num_samples vectors are drawn (torch.Generator seeded with ``seed``) from the union of its
    queries and keys (all of them, deterministically, when num_samples >= Nq + Nk); see ``dof_from_gram`` for
    ``normalize``. lam: float -> Tensor[H]; 1-D sequence of L lambdas -> Tensor[H, L]. fp64.

    "mean" and "none" need the unshifted exp in fp64 and raise OverflowError when it overflows.
    """
    _check_choice("normalize", normalize, _NORMALIZERS)
    _as_lambdas(lam)
    num_samples = _positive_int("num_samples", num_samples)
    if q.dim() != 3 or k.dim() != 3 or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [H, N, d] with the same d, got {list(q.shape)} and {list(k.shape)}")
    heads, kv_heads, d = q.shape[0], k.shape[0], q.shape[2]
    if heads == 0 or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"the number of query heads ({heads}) must be a positive multiple of key heads ({kv_heads})")
    if q.shape[1] + k.shape[1] == 0:
        raise ValueError("q and k hold no vectors")
    if not bool(torch.isfinite(q).all() and torch.isfinite(k).all()):
        raise ValueError("q and k must be finite")

    generator = torch.Generator().manual_seed(seed)
    group = heads // kv_heads
    x = torch.stack([_sample_union(q[h], k[h // group], num_samples, generator) for h in range(heads)])
    logits = x @ x.transpose(-1, -2) / math.sqrt(d)  # [H, J, J]
    if normalize in _SCALE_INVARIANT:
        # any per-head scale cancels, so exp(s - max s) cannot overflow (the max lies on the diagonal)
        gram = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    else:
        gram = torch.exp(logits)
        if not bool(torch.isfinite(gram).all()):
            raise OverflowError(f"exp(x.y/sqrt(d)) overflows float64 (max logit {logits.max().item():.1f}) with "
                                f"normalize={normalize!r}; use normalize='trace', which is computed shifted")
    return dof_from_gram(gram, lam, normalize)


def layer_dof(per_head: Tensor, reduce: str = "max", dim: int = 0) -> Tensor:
    """Reduce per-head DoF over the head axis ``dim``: [H] -> [], [H, L] -> [L], [S, H(, L)] with dim=1 ->
    [S(, L)]. reduce: "max" (the paper: heads of a layer share M), "mean" or "sum"."""
    _check_choice("reduce", reduce, _REDUCERS)
    return _REDUCERS[reduce](per_head, dim)


class _TokenReservoir:
    """Uniform reservoir sample (Algorithm R) of at most ``capacity`` rows from a stream of [n, heads, d]
    batches, kept on CPU in fp32."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.seen = 0
        self.data: Tensor | None = None  # [min(seen, capacity), heads, d]

    def add(self, rows: Tensor, generator: torch.Generator) -> None:
        n, cap = rows.shape[0], self.capacity
        pos = torch.arange(self.seen, self.seen + n, dtype=torch.float64)  # stream positions
        # Algorithm R: position i fills slot i while i < capacity, later goes to a uniform slot in [0, i]
        # (dropped when that is >= capacity)
        draw = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (pos + 1))
        slot = torch.where(pos < cap, pos, draw).long()
        keep = slot < cap
        # a slot hit several times in one batch keeps the last row, as the sequential algorithm would
        winner = torch.full((cap,), -1, dtype=torch.long).scatter_reduce(
            0, slot[keep], torch.arange(n)[keep], reduce="amax")
        hit = (winner >= 0).nonzero().squeeze(1)

        size = min(self.seen + n, cap)
        if self.data is None:
            self.data = torch.empty(size, *rows.shape[1:])
        elif self.data.shape[0] < size:
            self.data = torch.cat([self.data, self.data.new_empty(size - self.data.shape[0], *rows.shape[1:])])
        self.data[hit] = rows[winner[hit].to(rows.device)].to("cpu", torch.float32)
        self.seen += n


class QKReservoir:
    """Bounded-memory capture of per-layer queries and keys for DoF estimation.

    ``add(layer, q, k, key_mask)`` streams in q [B, H, T, d], k [B, Hk, T, d] (H % Hk == 0) and keeps a uniform
    reservoir sample of at most ``max_per_head`` query vectors per query head and key vectors per key head,
    excluding padding (key_mask [B, T], True = real token). The sample is drawn over tokens: all heads of a
    layer keep the same tokens (each head's sample is still uniform); queries and keys are sampled
    independently. Keys are stored once per key head. Storage is CPU fp32; sampling is seeded and
    deterministic given the sequence of ``add`` calls of each layer (every layer has its own generator).
    """

    def __init__(self, num_layers: int, max_per_head: int = 4096, seed: int = 0):
        self.num_layers = _positive_int("num_layers", num_layers)
        self.max_per_head = _positive_int("max_per_head", max_per_head)
        self._q = [_TokenReservoir(self.max_per_head) for _ in range(self.num_layers)]
        self._k = [_TokenReservoir(self.max_per_head) for _ in range(self.num_layers)]
        self._shapes: list[tuple[int, int, int] | None] = [None] * self.num_layers  # (H, Hk, d)
        # one stream per layer, so a layer's sample does not depend on how calls for layers interleave
        self._generators = [torch.Generator().manual_seed(seed * self.num_layers + layer)
                            for layer in range(self.num_layers)]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    def add(self, layer: int, q: Tensor, k: Tensor, key_mask: Tensor | None = None) -> None:
        """Stream one batch: q [B, H, T, d], k [B, Hk, T, d], key_mask [B, T] bool (True = real token)."""
        self._check_layer(layer)
        if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
            raise ValueError(f"q must be [B, H, T, d] and k [B, Hk, T, d], got {list(q.shape)} and {list(k.shape)}")
        shape = (q.shape[1], k.shape[1], q.shape[3])
        if shape[1] == 0 or shape[0] % shape[1]:
            raise ValueError(f"query heads ({shape[0]}) must be a positive multiple of key heads ({shape[1]})")
        if self._shapes[layer] not in (None, shape):
            raise ValueError(f"layer {layer}: (H, Hk, d) changed from {self._shapes[layer]} to {shape}")
        q_rows, k_rows = q.detach().transpose(1, 2), k.detach().transpose(1, 2)  # [B, T, heads, d]
        if key_mask is None:
            q_rows, k_rows = q_rows.flatten(0, 1), k_rows.flatten(0, 1)
        else:
            if key_mask.dtype != torch.bool or key_mask.shape != q.shape[:1] + q.shape[2:3]:
                raise ValueError(f"key_mask must be bool [B, T] = {[q.shape[0], q.shape[2]]}, "
                                 f"got {key_mask.dtype} {list(key_mask.shape)}")
            key_mask = key_mask.to(q.device)
            q_rows, k_rows = q_rows[key_mask], k_rows[key_mask]  # [n, heads, d], real tokens only
        self._shapes[layer] = shape
        self._q[layer].add(q_rows, self._generators[layer])
        self._k[layer].add(k_rows, self._generators[layer])

    def seen(self, layer: int) -> int:
        """Number of real tokens streamed into ``layer`` so far."""
        self._check_layer(layer)
        return self._q[layer].seen

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        """The sample of ``layer``: (q [H, N, d], k [H, N, d]) CPU fp32, N <= max_per_head; row h of k holds the
        keys of query head h's key head h // (H // Hk)."""
        self._check_layer(layer)
        if self._shapes[layer] is None or self._q[layer].data is None:
            raise ValueError(f"layer {layer} has no captured tokens")
        heads, kv_heads, _ = self._shapes[layer]
        key_head = torch.arange(heads) // (heads // kv_heads)
        q = self._q[layer].data.transpose(0, 1).contiguous()
        k = self._k[layer].data[:, key_head].transpose(0, 1).contiguous()
        return q, k

    def dof(self, lam, **kw) -> Tensor:
        """``degrees_of_freedom`` of every layer's sample: Tensor[num_layers, H] (or [num_layers, H, L])."""
        return torch.stack([degrees_of_freedom(*self.get(layer), lam, **kw) for layer in range(self.num_layers)])


class _Rule(NamedTuple):
    weight: Callable[[float], float]  # layer weight from its DoF
    redistributes: bool  # False: proportional, then capped at max_dim without redistribution


_RULES: dict[str, _Rule] = {
    "uniform": _Rule(lambda n: 1.0, True),
    "proportional": _Rule(lambda n: n, True),
    "sqrt": _Rule(math.sqrt, True),
    "clip": _Rule(lambda n: n, False),
}


def _water_fill(weights: list[Fraction], total: int, lo: int, hi: int | None) -> list[Fraction]:
    """Shares x_s = clip(t * w_s, lo, hi) with the scalar t >= 0 that makes them sum to ``total``: layers at a
    bound stay there and the others split the rest in proportion to w. Exact (rational) arithmetic."""
    cap = math.inf if hi is None else hi

    def shares(t: Fraction) -> list[Fraction]:
        return [min(max(t * w, lo), cap) for w in weights]

    reachable = sum(cap if w > 0 else lo for w in weights)
    if not len(weights) * lo <= total <= reachable:
        raise ValueError(f"infeasible allocation: {len(weights)} layers with dims in [{lo}, {cap}] units (layers "
                         f"with DoF 0 stay at the minimum) cannot sum to {total} units")
    # sum(shares(t)) is piecewise linear and non-decreasing in t, with kinks where a layer meets a bound
    kinks = sorted({b / w for w in weights if w > 0 for b in (lo, cap) if b != math.inf})
    start = Fraction(0)
    for t in kinks:
        if sum(shares(t)) >= total:
            break
        start = t
    base = shares(start)
    if sum(base) == total:
        return base
    slope = sum(w for w in weights if w > 0 and lo <= start * w < cap)  # layers moving just above start
    return shares(start + (total - sum(base)) / slope)


def _largest_remainder(shares: list[Fraction], total: int) -> list[int]:
    """Floors, plus one unit to the largest remainders until the sum is ``total``; ties go to lower layers."""
    units = [math.floor(x) for x in shares]
    order = sorted(range(len(shares)), key=lambda s: (units[s] - shares[s], s))
    for s in order[:total - sum(units)]:
        units[s] += 1
    return units


def _nearest(shares: list[Fraction], total: int) -> list[int]:
    """Round half up, independently per layer: the sum may drift from ``total``."""
    return [math.floor(x + Fraction(1, 2)) for x in shares]


_ROUNDINGS: dict[str, Callable[[list[Fraction], int], list[int]]] = {
    "largest_remainder": _largest_remainder,
    "nearest": _nearest,
}


def allocate_feature_dims(dof_per_layer: Sequence[float] | Tensor, budget: int, rule: str = "proportional",
                          min_dim: int = 1, max_dim: int | None = None, multiple_of: int = 1,
                          rounding: str = "largest_remainder") -> list[int]:
    """Split a feature budget across S layers: dof_per_layer [S] (>= 0) -> S feature dims.

    budget: the average feature dim per layer C, so the rules that redistribute give a total of exactly S*C:
      "uniform"       C each (as evenly as possible when multiple_of does not divide C)
      "proportional"  M_s = C S N_s / sum N (the paper's DoF allocation)
      "sqrt"          M_s proportional to sqrt(N_s)
      "clip"          the paper's DoF+Clip: "proportional", then capped at max_dim (required) WITHOUT
                      redistributing the excess, so the total may fall below S*C
    min_dim / max_dim bound every dim; the redistributing rules enforce them by water-filling (clamped layers
    are fixed, the rest split the remainder in proportion); "clip" enforces min_dim that way and caps last.
    multiple_of: every dim is a multiple of it (the bounds are tightened to multiples); the allocation runs in
    units of multiple_of, so S*C must be a multiple of it.
    rounding: "largest_remainder" (exact total; ties go to the lower layer index) or "nearest" (each layer
    rounded half up on its own: the total may drift from S*C). Exact rational arithmetic, so deterministic.
    Raises ValueError for unknown names, bad values and infeasible bounds.
    """
    _check_choice("rule", rule, _RULES)
    _check_choice("rounding", rounding, _ROUNDINGS)
    dofs = torch.as_tensor(dof_per_layer, dtype=torch.float64)
    if dofs.dim() != 1 or dofs.numel() == 0:
        raise ValueError(f"dof_per_layer must be a non-empty 1-D sequence, got shape {list(dofs.shape)}")
    if not bool(torch.isfinite(dofs).all() and (dofs >= 0).all()):
        raise ValueError(f"dof_per_layer must be finite and >= 0, got {dofs.tolist()}")
    budget = _positive_int("budget", budget)
    min_dim = _positive_int("min_dim", min_dim)
    multiple_of = _positive_int("multiple_of", multiple_of)
    if max_dim is not None and _positive_int("max_dim", max_dim) < min_dim:
        raise ValueError(f"max_dim ({max_dim}) must be >= min_dim ({min_dim})")
    spec = _RULES[rule]
    if not spec.redistributes and max_dim is None:
        raise ValueError(f"rule {rule!r} needs max_dim (the cap, e.g. the head dim)")

    total_dim = len(dofs) * budget
    if total_dim % multiple_of:
        raise ValueError(f"the total S*C = {len(dofs)}*{budget} = {total_dim} is not a multiple of "
                         f"multiple_of={multiple_of}")
    lo = -(-min_dim // multiple_of)
    hi = None if max_dim is None else max_dim // multiple_of
    if hi is not None and lo > hi:
        raise ValueError(f"no multiple of {multiple_of} lies in [min_dim, max_dim] = [{min_dim}, {max_dim}]")

    units = total_dim // multiple_of
    weights = [Fraction(spec.weight(n)) for n in dofs.tolist()]
    shares = _water_fill(weights, units, lo, hi if spec.redistributes else None)
    alloc = _ROUNDINGS[rounding](shares, units)
    if not spec.redistributes:
        alloc = [min(a, hi) for a in alloc]
    return [a * multiple_of for a in alloc]
