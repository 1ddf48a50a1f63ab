"""Exact inference in a leveled PCFG: inside and prefix probabilities per metadata tuple, posteriors, Bayes loss.

Charts are log-probabilities (float64) indexed ``[N, M, A, S, L]``: sequence, metadata suffix tuple, symbol, span
start, span length (offset by the chart's band low end). A level-i symbol (height h = D - i) yields exactly
2^h..3^h terminals, so its spans live in that band, which keeps the dynamic programme small.

- inside  beta_i(a | s, l) = p(a =>* w[s:s+l] | j_i..j_{D-1})
- prefix  pi_i(a | s, l)   = p(a =>* w[s:s+l] u for some u, possibly empty | j_i..j_{D-1}),  l >= 1

For a -> b c:  beta_a = sum_m beta_b beta_c;   pi_a = pi_b + sum_{m < s+l} beta_b pi_c  (b ends inside or after
the prefix; the two cases are disjoint, and the unconstrained siblings sum to one because every symbol derives a
finite string with probability one). A -> b c d is done as b c first (a pair chart Q indexed by (a, d)), then Q d.
Metadata: the chart of height h carries the K^h tuples (j_{D-h}..j_{D-1}), the new level's choice most significant,
so the root carries all K^D tuples in ``LeveledPCFG.meta_tuples`` order.

Membership (the boolean semiring) is ``log p > -inf``: the scaled contractions below only lose a term when it is
below 1e-308 relative to the largest term sharing its span start, far beyond any grammar this module is meant for.

Two implementations of the same charts, picked by ``inside(..., method=)``:
- ``"matrix"`` (default, fast, any device): charts indexed by (start, end) are [P, P] matrices, so concatenating
  two spans is a matrix product: beta_a = sum P(a -> b c) B_b @ B_c and pi_a = pi_b + B_b @ Pi_c (strictly upper
  triangular, so the sibling's prefix is never empty). Linear float64, each span scaled by V^length so values stay
  within ~[1e-60, 1e120] for the grammars meant here; zero stays exactly zero, so membership is exact.
- ``"band"``: the log-space (start, length) charts restricted to each height's length band (the reference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .grammar import LeveledPCFG

Band = tuple[int, int]        # inclusive (lowest, highest) span length of a chart's last axis


def _band(lo: int, hi: int, width: int) -> Band:
    return lo, max(lo, min(hi, width))


def _shift(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    m = x.amax(dim=dims, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _combine(rule: Tensor, left: Tensor, lband: Band, right: Tensor, rband: Band, band: Band, starts: int) -> Tensor:
    """sum_{b,c} rule[k,a,b,c] sum_split left[b | s, l1] right[c | s+l1, l - l1] in log space.

    rule [K or 1, A, B, C] probabilities; left [N, K or 1, M, B, S, L1] log; right [N, M, C, S', L2] log.
    Returns [N, K, M, A, starts, L] log for span lengths l in ``band`` and starts s < ``starts``.
    """
    n, _, m, _, _, l1 = left.shape
    c, s_right, l2 = right.shape[2:]
    k, a = max(rule.shape[0], left.shape[1]), rule.shape[1]
    dev = left.device
    split = lband[0] + torch.arange(l1, device=dev)                                     # [x] first-part length
    at = torch.arange(starts, device=dev)[:, None] + split                             # [s, x] second-part start
    rest = band[0] + torch.arange(band[1] - band[0] + 1, device=dev) - split[:, None] - rband[0]   # [x, l]
    # The right chart is scaled per start (exp in [0, 1]) and its scale moved onto the left factor, so the big
    # sheared gather right[c | s+x, l-x] -> [s, c, x, l] stays linear and the split sum is one batched matmul.
    rscale = _shift(right, (2, 4))[:, :, 0, :, 0]                                           # [N, M, S']
    rlin = (right - rscale[:, :, None, :, None]).exp().permute(0, 1, 3, 2, 4)                # [N, M, S', C, L2]
    rlin = torch.nn.functional.pad(rlin, (0, 1, 0, 0, 0, 1))
    at_i = torch.where(at < s_right, at, s_right)                                          # out of range -> zero pad
    rest_i = torch.where((rest >= 0) & (rest < l2), rest, l2)
    gathered = rlin[:, :, at_i[:, None, :, None], torch.arange(c, device=dev)[:, None, None], rest_i[None, None]]
    scale = torch.nn.functional.pad(rscale, (0, 1), value=-math.inf)[:, :, at_i]             # [N, M, s, x]
    rmax = _shift(scale, (3,))
    left = torch.nn.functional.pad(left[..., :starts, :], (0, 0, 0, starts - min(starts, left.shape[-2])),
                                   value=-math.inf) + (scale - rmax)[:, None, :, None]
    lmax = _shift(left, (3, 5))
    lin = torch.einsum("kabc,nkmbsx->nmskacx", rule.expand(k, *rule.shape[1:]),
                       (left - lmax).exp().expand(n, k, *left.shape[2:]))
    out = lin.reshape(n, m, starts, k * a, -1) @ gathered.reshape(n, m, starts, c * l1, -1)
    out = out.view(n, m, starts, k, a, -1).permute(0, 3, 1, 4, 2, 5)
    return out.log() + lmax + rmax[:, None, :, None]


def _mix(rule: Tensor, chart: Tensor, starts: int, length: int) -> Tensor:
    """sum_b rule[k,a,b] chart[b | s, l] in log space.

    rule [K, A, B]; chart [N, M, B, S, L] log -> [N, K, M, A, starts, length] log (lengths beyond L are -inf).
    """
    chart = chart[..., :starts, :]
    cmax = _shift(chart, (2, 4))
    out = torch.einsum("kab,nmbsl->nkmasl", rule, (chart - cmax).exp()).log() + cmax[:, None]
    return torch.nn.functional.pad(out, (0, length - out.shape[-1]), value=-math.inf)


def _pair_identity(a: int, b: int, dtype, device) -> Tensor:
    """[1, A, A*B, B]: maps the pair chart Q(a, d) and d back to a (the second step of a -> b c d)."""
    eye = torch.zeros(1, a, a * b, b, dtype=dtype, device=device)
    eye[0, torch.arange(a).repeat_interleave(b), torch.arange(a * b), torch.arange(b).repeat(a)] = 1
    return eye


def _charts(pcfg: LeveledPCFG, terminals: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Root charts for one chunk: beta [N, K^D, 3^D-band], pi [N, K^D, prefix band] (log, start 0)."""
    n, width = terminals.shape
    dev = terminals.device
    valid = torch.arange(width, device=dev) < lengths[:, None]
    onehot = torch.nn.functional.one_hot(terminals.clamp(0, pcfg.num_terminals - 1), pcfg.num_terminals).bool()
    beta = torch.where(onehot & valid[..., None], 0.0, -math.inf).to(torch.float64)
    beta = beta.permute(0, 2, 1)[:, None, :, :, None]                                     # [N, 1, V, T, 1]
    pi, bband, pband = beta, (1, 1), (1, 1)
    for i in reversed(range(pcfg.depth)):
        h = pcfg.depth - i
        # inside spans need >= 2^h terminals; prefix spans may start anywhere
        starts, pstarts = (1, 1) if i == 0 else (max(1, width - 2 ** h + 1), width)
        r2, r3 = (r.to(dev) for r in pcfg.rule_tensors[i])
        kk, a, b = r2.shape[:3]
        new_b, new_p = _band(2 ** h, 3 ** h, width), _band(1, 3 ** h, width)
        beta_c = beta[:, None]
        beta_new = _combine(r2, beta_c, bband, beta, bband, new_b, starts)
        pi_new = [_mix(r2.sum(-1) + r3.sum((-1, -2)), pi, pstarts, new_p[1]),
                  _combine(r2 + r3.sum(-1), beta_c, bband, pi, pband, new_p, pstarts)]
        if r3.any():
            qband = _band(2 * bband[0], 2 * 3 ** (h - 1), width)
            q = _combine(r3.permute(0, 1, 4, 2, 3).reshape(kk, a * b, b, b), beta_c, bband, beta, bband, qband, starts)
            eye = _pair_identity(a, b, r2.dtype, dev)
            beta_new = torch.logaddexp(beta_new, _combine(eye, q, qband, beta, bband, new_b, starts))
            pi_new.append(_combine(eye, q, qband, pi, pband, new_p, pstarts))
        pi_new = torch.stack(pi_new).logsumexp(0)
        beta, pi = (x.flatten(1, 2) for x in (beta_new, pi_new))                            # [N, K*M, A, S, L]
        bband, pband = new_b, new_p
    return beta[:, :, 0, 0], pi[:, :, 0, 0]


@dataclass
class InsideResult:
    """Exact scores of N documents under every metadata tuple (M = K^D, T = padded length).

    log_seq [N, M]: log p(w_1..w_n [EOS] | j), i.e. the document is exactly w.
    log_prefix [N, M, T+1]: log p(the document starts with w_1..w_k | j) for k = 0..T (-inf for k > n).
    Methods take ``known`` [N, D] long (-1 = unknown, see ``LeveledPCFG.mask_metadata``); None = nothing known.
    Rows with probability zero under ``known`` give NaN posteriors and infinite losses.
    """
    log_seq: Tensor
    log_prefix: Tensor
    lengths: Tensor
    meta_tuples: Tensor

    def log_prior(self, known: Tensor | None = None) -> Tensor:
        """log p(j | known) [N, M]: uniform over the tuples consistent with ``known``."""
        tuples = self.meta_tuples.to(self.log_seq.device)
        if known is None:
            known = torch.full((self.log_seq.shape[0], tuples.shape[1]), -1, device=tuples.device)
        consistent = ((known[:, None, :] < 0) | (known[:, None, :] == tuples)).all(-1)
        return torch.where(consistent, -consistent.sum(-1, keepdim=True).to(torch.float64).log(), -math.inf)

    def log_prob(self, known: Tensor | None = None) -> Tensor:
        """log p(w | known) [N]."""
        return (self.log_seq + self.log_prior(known)).logsumexp(-1)

    def prefix_log_prob(self, known: Tensor | None = None) -> Tensor:
        """log p(document starts with w_1..w_k | known) [N, T+1]."""
        return (self.log_prefix + self.log_prior(known)[..., None]).logsumexp(1)

    def is_member(self, known: Tensor | None = None) -> Tensor:
        """[N] bool: w is in the language of some grammar consistent with ``known`` (full ``known``: of G_j)."""
        return self.log_prob(known) > -math.inf

    def is_viable_prefix(self, known: Tensor | None = None) -> Tensor:
        """[N, T+1] bool: w_1..w_k extends to a member."""
        return self.prefix_log_prob(known) > -math.inf

    def posterior(self, known: Tensor | None = None) -> Tensor:
        """p(j | w_1..w_k, known) [N, T+1, M]; k = 0 is the prior."""
        joint = self.log_prefix + self.log_prior(known)[..., None]
        return (joint - joint.logsumexp(1, keepdim=True)).exp().transpose(1, 2)

    def posterior_complete(self, known: Tensor | None = None) -> Tensor:
        """p(j | the whole document w [EOS], known) [N, M]."""
        joint = self.log_seq + self.log_prior(known)
        return (joint - joint.logsumexp(-1, keepdim=True)).exp()

    def level_posterior(self, known: Tensor | None = None) -> Tensor:
        """p(j_d | w_1..w_k, known) [N, T+1, D, K] (MAP accuracy: argmax(-1) == true j_d)."""
        post = self.posterior(known)
        tuples = self.meta_tuples.to(post.device)
        onehot = torch.nn.functional.one_hot(tuples, int(tuples.max()) + 1).to(post.dtype)     # [M, D, K]
        return torch.einsum("ntm,mdk->ntdk", post, onehot)

    @property
    def valid(self) -> Tensor:
        """[N, T+1] bool: position k predicts a real target (w_{k+1} for k < n, EOS for k = n)."""
        return torch.arange(self.log_prefix.shape[-1], device=self.lengths.device) <= self.lengths[:, None]

    def bayes_loss(self, known: Tensor | None = None) -> Tensor:
        """Bayes-optimal next-token loss [N, T+1] in nats: -log p(x_{k+1} | w_1..w_k, known), 0 where not ``valid``.

        x_{k+1} = w_{k+1} for k < n and EOS for k = n; entry k pairs with encoded position ``prefix_width + k``.
        """
        prefix = self.prefix_log_prob(known)
        ahead = torch.cat([prefix[:, 1:], prefix[:, :1]], dim=1)
        at_end = torch.arange(prefix.shape[1], device=prefix.device) == self.lengths[:, None]
        ahead = torch.where(at_end, self.log_prob(known)[:, None], ahead)
        return torch.where(self.valid, prefix - ahead, 0.0)


def _level_rules(pcfg: LeveledPCFG, i: int, device, n: int, meta: Tensor | None) -> tuple[Tensor, Tensor]:
    """Level i's rule probabilities [N, K, A, B, C] and [N, K, A, B, C, D]; with ``meta`` [N, D] each document's
    own rule set only (K = 1)."""
    r2, r3 = (r.to(device) for r in pcfg.rule_tensors[i])
    if meta is None:
        return r2.expand(n, *r2.shape), r3.expand(n, *r3.shape)
    return r2[meta[:, i]][:, None], r3[meta[:, i]][:, None]


def _matrix_scores(pcfg: LeveledPCFG, terminals: Tensor, lengths: Tensor,
                   meta: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(log_seq [N, M], log_prefix [N, M, T+1]) of one chunk by (start, end) matrix charts.

    M = K^D (every metadata tuple), or M = 1 with ``meta`` [N, D] (each document's own tuple).
    Charts B (inside) and Pi (prefix) are [N, M, A, P, P] with P = T + 1 positions; entry (s, e) of a level-i
    symbol a is scaled by V^(e - s). Only row 0 of the root is needed, so the root's left factors keep row 0.
    """
    n, width = terminals.shape
    dev, dt = terminals.device, torch.float64
    size = width + 1
    scale = float(pcfg.num_terminals)
    valid = torch.arange(width, device=dev) < lengths[:, None]
    onehot = torch.nn.functional.one_hot(terminals.clamp(0, pcfg.num_terminals - 1), pcfg.num_terminals)
    diag = (onehot * valid[..., None]).to(dt).transpose(1, 2) * scale                      # [N, V, T]
    beta = torch.diag_embed(diag, offset=1)[:, None]                                          # [N, 1, V, P, P]
    pi = beta                                       # a terminal's only non-empty prefix is itself
    for i in reversed(range(pcfg.depth)):
        r2, r3 = _level_rules(pcfg, i, dev, n, meta)
        kk, na, nb = r2.shape[1:4]
        m = beta.shape[1]
        rows = 1 if i == 0 else size
        # every product left_b @ [B_c | Pi_c] in one batched matmul: [N, M, B*R, P] @ [N, M, P, 2*C*P]
        right = torch.cat([beta, pi], dim=2).permute(0, 1, 3, 2, 4).reshape(n, m, size, 2 * nb * size)
        prod = (beta[..., :rows, :].reshape(n, m, nb * rows, size) @ right).view(n, m, nb, rows, 2, nb, size)
        bb, bp = prod[:, :, :, :, 0], prod[:, :, :, :, 1]                                        # [N, M, B, R, C, P]
        # a -> b c:  B_b B_c;  prefix: Pi_b (b's yield covers the prefix) + B_b Pi_c (c's does)
        beta_new = torch.einsum("nkabc,nmbicj->nkmaij", r2, bb)
        pi_new = torch.einsum("nkab,nmbij->nkmaij", r2.sum(-1) + r3.sum((-1, -2)), pi[..., :rows, :]) \
            + torch.einsum("nkabc,nmbicj->nkmaij", r2 + r3.sum(-1), bp)
        if r3.any():
            # a -> b c d:  (B_b B_c) B_d and (B_b B_c) Pi_d, the pair products contracted over (b, c) first;
            # then one matmul contracting (d, position): [N, M, K*A*R, D*P] @ [N, M, D*P, 2P]
            w = torch.einsum("nkabcd,nmbicj->nmkaidj", r3, bb).reshape(n, m, kk * na * rows, nb * size)
            both = torch.cat([beta, pi], dim=-1).reshape(n, m, nb * size, 2 * size)
            tail = (w @ both).view(n, m, kk, na, rows, 2, size).permute(0, 2, 1, 3, 5, 4, 6)
            beta_new = beta_new + tail[:, :, :, :, 0]
            pi_new = pi_new + tail[:, :, :, :, 1]
        beta, pi = beta_new.flatten(1, 2), pi_new.flatten(1, 2)                                 # [N, K*M, A, R, P]
    beta, pi = beta[:, :, 0, 0], pi[:, :, 0, 0]                                                 # [N, K^D, P]
    unscale = torch.arange(size, device=dev, dtype=dt) * math.log(scale)
    log_seq = (beta.gather(-1, lengths[:, None, None].expand(-1, beta.shape[1], 1))[..., 0].log()
               - lengths[:, None].to(dt) * math.log(scale))
    log_prefix = pi.log() - unscale
    log_prefix[..., 0] = 0.0
    return log_seq, log_prefix


def _band_scores(pcfg: LeveledPCFG, terminals: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(log_seq [N, K^D], log_prefix [N, K^D, T+1]) of one chunk by the log-space band charts."""
    n, w = terminals.shape
    m = pcfg.num_alternatives ** pcfg.depth
    beta, pi = _charts(pcfg, terminals, lengths)
    lo = 2 ** pcfg.depth
    at = (lengths - lo).clamp(0, beta.shape[-1] - 1)
    seq = beta.gather(-1, at[:, None, None].expand(-1, m, 1))[..., 0]
    in_band = (lengths >= lo) & (lengths < lo + beta.shape[-1])
    log_seq = torch.where(in_band[:, None], seq, -math.inf)
    log_prefix = torch.full((n, m, w + 1), -math.inf, dtype=torch.float64, device=terminals.device)
    log_prefix[..., 0] = 0.0
    k = min(pi.shape[-1], w)
    log_prefix[..., 1:k + 1] = pi[..., :k]
    return log_seq, log_prefix


METHODS = {"matrix": _matrix_scores, "band": _band_scores}


def matrix_chunk_bytes(pcfg: LeveledPCFG, width: int) -> int:
    """Estimated peak bytes per document of the ``"matrix"`` method at padded length ``width``.

    The level below the root dominates: pair products and the ternary contraction over K^(D-2) child tuples.
    """
    kk, sym = pcfg.num_alternatives, max(pcfg.sizes)
    tuples = kk ** max(pcfg.depth - 2, 0)
    mats = tuples * (2 * sym * sym + 3 * kk * sym * sym + 6 * kk * sym) + 4 * kk * tuples * sym
    return 8 * (width + 1) ** 2 * mats


def _chunks(order: Tensor, lengths: Tensor, chunk_size: int | None, budget: int, cost) -> list[Tensor]:
    """Split length-sorted ``order`` into chunks of at most ``chunk_size`` docs or, when None, ``budget`` bytes."""
    if chunk_size is not None:
        return list(order.split(chunk_size))
    out, start, lens = [], 0, lengths[order].tolist()
    while start < len(lens):
        end = start + 1
        while end < len(lens) and (end + 1 - start) * cost(max(lens[end], 1)) <= budget:
            end += 1
        out.append(order[start:end])
        start = end
    return out


def inside(pcfg: LeveledPCFG, terminals: Tensor, lengths: Tensor, chunk_size: int | None = None,
           method: str = "matrix", max_chunk_bytes: int | None = None) -> InsideResult:
    """Exact inside and prefix log-probabilities of documents under every metadata tuple.

    terminals [N, T] long (terminal ids; entries at k >= lengths ignored), lengths [N]. Runs on terminals' device
    in float64, a chunk of documents at a time (sorted by length so chunks are trimmed to their longest).
    method: "matrix" (batched matrix products, the fast path; see the module docstring) or "band" (log space).
    chunk_size: documents per chunk; None = as many as fit ``max_chunk_bytes`` (default 1 GiB on CPU, an eighth
    of the free memory on CUDA) for "matrix", 64 for "band". Memory of "band" grows like
    chunk_size * K^(D-1) * T * 9^(D-1) doubles; lower chunk_size if it does not fit.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if terminals.dim() != 2 or lengths.shape != terminals.shape[:1]:
        raise ValueError(f"terminals must be [N, T] and lengths [N]; got {tuple(terminals.shape)} and "
                         f"{tuple(lengths.shape)}")
    n, width = terminals.shape
    dev = terminals.device
    lengths = lengths.to(dev)
    if method == "band" and chunk_size is None:
        chunk_size = 64
    if max_chunk_bytes is None:
        max_chunk_bytes = _default_budget(dev)
    m = pcfg.num_alternatives ** pcfg.depth
    log_seq = torch.full((n, m), -math.inf, dtype=torch.float64, device=dev)
    log_prefix = torch.full((n, m, width + 1), -math.inf, dtype=torch.float64, device=dev)
    log_prefix[..., 0] = 0.0
    order = lengths.argsort()
    for chunk in _chunks(order, lengths, chunk_size, max_chunk_bytes, lambda w: matrix_chunk_bytes(pcfg, w)):
        w = max(int(lengths[chunk].max()), 1)
        seq, prefix = METHODS[method](pcfg, terminals[chunk, :w], lengths[chunk])
        log_seq[chunk] = seq
        log_prefix[chunk, :, :w + 1] = prefix
    return InsideResult(log_seq, log_prefix, lengths, pcfg.meta_tuples.to(dev))


def conditional(pcfg: LeveledPCFG, terminals: Tensor, lengths: Tensor, meta: Tensor,
                chunk_size: int | None = None, max_chunk_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Scores of each document under its own metadata only: (log p(w | j) [N], log p(w_1..w_k | j) [N, T+1]).

    meta [N, D] long, a full tuple per document. K^D times cheaper than :func:`inside`: the grammatical-accuracy
    check (``log_seq > -inf`` is exact membership in L(G_j)).
    """
    n, width = terminals.shape
    dev = terminals.device
    lengths, meta = lengths.to(dev), meta.to(dev, torch.long)
    if meta.shape != (n, pcfg.depth) or bool(((meta < 0) | (meta >= pcfg.num_alternatives)).any()):
        raise ValueError(f"meta must be [N, D] = {(n, pcfg.depth)} with entries in [0, {pcfg.num_alternatives})")
    if max_chunk_bytes is None:
        max_chunk_bytes = _default_budget(dev)
    log_seq = torch.full((n,), -math.inf, dtype=torch.float64, device=dev)
    log_prefix = torch.full((n, width + 1), -math.inf, dtype=torch.float64, device=dev)
    order = lengths.argsort()
    cost = lambda w: matrix_chunk_bytes(pcfg, w) // pcfg.num_alternatives ** max(pcfg.depth - 2, 0)  # noqa: E731
    for chunk in _chunks(order, lengths, chunk_size, max_chunk_bytes, cost):
        w = max(int(lengths[chunk].max()), 1)
        seq, prefix = _matrix_scores(pcfg, terminals[chunk, :w], lengths[chunk], meta[chunk])
        log_seq[chunk] = seq[:, 0]
        log_prefix[chunk, :w + 1] = prefix[:, 0]
    return log_seq, log_prefix


CUDA_SHARE = 8   # a chunk's default budget on CUDA: 1/CUDA_SHARE of the free memory (processes sharing a GPU raise it)


def _default_budget(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] // CUDA_SHARE if device.type == "cuda" else 2 ** 30
