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


def inside(pcfg: LeveledPCFG, terminals: Tensor, lengths: Tensor, chunk_size: int = 64) -> InsideResult:
    """Exact inside and prefix log-probabilities of documents under every metadata tuple.

    terminals [N, T] long (terminal ids; entries at k >= lengths ignored), lengths [N]. Runs on terminals' device
    in float64, ``chunk_size`` documents at a time (sorted by length so chunks are trimmed to their longest).
    Memory per chunk grows like chunk_size * K^(D-1) * T * 9^(D-1) doubles; lower chunk_size if it does not fit.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, width = terminals.shape
    dev = terminals.device
    lengths = lengths.to(dev)
    m = pcfg.num_alternatives ** pcfg.depth
    log_seq = torch.full((n, m), -math.inf, dtype=torch.float64, device=dev)
    log_prefix = torch.full((n, m, width + 1), -math.inf, dtype=torch.float64, device=dev)
    log_prefix[..., 0] = 0.0
    order = lengths.argsort()
    for chunk in order.split(chunk_size):
        w = max(int(lengths[chunk].max()), 1)
        beta, pi = _charts(pcfg, terminals[chunk, :w], lengths[chunk])
        lo = 2 ** pcfg.depth
        at = (lengths[chunk] - lo).clamp(0, beta.shape[-1] - 1)
        seq = beta.gather(-1, at[:, None, None].expand(-1, m, 1))[..., 0]
        in_band = (lengths[chunk] >= lo) & (lengths[chunk] < lo + beta.shape[-1])
        log_seq[chunk] = torch.where(in_band[:, None], seq, -math.inf)
        k = min(pi.shape[-1], w)
        log_prefix[chunk, :, 1:k + 1] = pi[..., :k]
    return InsideResult(log_seq, log_prefix, lengths, pcfg.meta_tuples.to(dev))
