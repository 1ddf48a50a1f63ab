"""Leveled PCFGs with K alternative rule sets per level: generator, vectorised sampling, token encoding.

Grammar (PCFG.md, after Allen-Zhu & Li): symbol levels S_0 = {root} .. S_D (terminals, ids 0..V-1). Level i < D has
K alternative rule sets R_{i,0..K-1}; each maps every level-i symbol to a few rules that rewrite it into 2 or 3
level-(i+1) symbols. A document draws metadata j = (j_0, .., j_{D-1}), uniform and independent, and rewrites every
symbol of the level-i string with R_{i, j_i}; all leaves lie at depth D, so lengths lie in [2^D, 3^D].

Choices where PCFG.md is silent:
- sizes: 3 symbols on every level below the root (so V = 3 terminals), 2-3 rules per symbol, each rule's length
  drawn uniformly from {2, 3} and its right-hand side uniformly among the level-(i+1) symbols (the cfg3 family);
  the right-hand sides of one symbol are distinct.
- "alternatives coincide": two rule sets of one level that are equal as maps symbol -> {(rhs, prob)}; such an
  alternative is redrawn.
- metadata tuples are indexed in ``itertools.product(range(K), repeat=D)`` order (j_0 most significant).
- revealed metadata: ``meta_depth`` reveals the top D_M levels j_0..j_{D_M-1}; in general any pattern can be
  expressed as ``known`` ([N, D] long, -1 = MASK), which is what ``encode``/``decode`` and the inference use.
- vocabulary: terminals 0..V-1, then BOS, EOS, MASK, PAD, then META(d, j) = V + 4 + d * K + j.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

RULE_PROBS = ("uniform", "dirichlet")

Rule = tuple[tuple[int, ...], float]          # (right-hand side, probability)


@dataclass
class PCFGConfig:
    depth: int = 5                               # D: levels S_0 (root) .. S_D (terminals)
    num_symbols: int | tuple[int, ...] = 3       # |S_1| .. |S_D| (one int: every level); |S_0| = 1
    num_alternatives: int = 2                    # K rule sets per level
    rules_per_symbol: tuple[int, int] = (2, 3)   # inclusive range of rules per symbol and rule set
    rule_lengths: tuple[int, ...] = (2, 3)
    rule_probs: str = "uniform"                  # "dirichlet": Dirichlet(1) weights per symbol
    seed: int = 0
    max_tries: int = 1000                        # redraws of one alternative before giving up

    def __post_init__(self):
        if int(self.depth) < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        self.depth = int(self.depth)
        sizes = (self.num_symbols,) * self.depth if isinstance(self.num_symbols, int) else tuple(self.num_symbols)
        if len(sizes) != self.depth or min(sizes) < 1:
            raise ValueError(f"num_symbols must be a positive int or {self.depth} positive ints, "
                             f"got {self.num_symbols}")
        self.num_symbols = tuple(int(s) for s in sizes)
        if int(self.num_alternatives) < 1:
            raise ValueError(f"num_alternatives must be >= 1, got {self.num_alternatives}")
        lo, hi = (int(r) for r in self.rules_per_symbol)
        if not 1 <= lo <= hi:
            raise ValueError(f"rules_per_symbol must be (lo, hi) with 1 <= lo <= hi, got {self.rules_per_symbol}")
        self.rules_per_symbol = (lo, hi)
        self.rule_lengths = tuple(sorted({int(x) for x in self.rule_lengths}))
        if not self.rule_lengths or not set(self.rule_lengths) <= {2, 3}:
            raise ValueError(f"rule_lengths must be a non-empty subset of (2, 3), got {self.rule_lengths}")
        if self.rule_probs not in RULE_PROBS:
            raise ValueError(f"rule_probs must be one of {RULE_PROBS}, got {self.rule_probs!r}")
        for i, n_next in enumerate(self.num_symbols):
            distinct = sum(n_next ** length for length in self.rule_lengths)
            if distinct < hi:
                raise ValueError(f"level {i}: {hi} distinct rules per symbol impossible with {n_next} symbols below")


@dataclass
class PCFGSample:
    """Sampled documents: ``terminals`` [N, T] long (0 after ``lengths``), ``lengths`` [N], ``meta`` [N, D]."""
    terminals: Tensor
    lengths: Tensor
    meta: Tensor


class LeveledPCFG:
    """A seeded leveled PCFG with K alternative rule sets per level.

    ``rules[i][k][a]`` is the tuple of (rhs, prob) of level-i symbol ``a`` under rule set R_{i,k}.
    Exact probabilities live in :mod:`fastattn.pcfg.inference` (``self.inside(...)`` is a shortcut).
    """

    def __init__(self, config: PCFGConfig | None = None, **overrides):
        if config is None:
            config = PCFGConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a PCFGConfig or keyword overrides, not both")
        self.config = config
        self.depth = config.depth
        self.num_alternatives = config.num_alternatives
        self.sizes = (1, *config.num_symbols)            # |S_0| .. |S_D|
        self.num_terminals = self.sizes[-1]
        rng = random.Random(config.seed)
        self.rules = tuple(self._draw_level(rng, i) for i in range(self.depth))

    # ----- generation -------------------------------------------------------------------------------------------
    def _draw_rule_set(self, rng: random.Random, level: int) -> tuple[tuple[Rule, ...], ...]:
        cfg = self.config
        n_next = self.sizes[level + 1]
        out = []
        for _ in range(self.sizes[level]):
            count = rng.randint(*cfg.rules_per_symbol)
            rhss: list[tuple[int, ...]] = []
            while len(rhss) < count:
                rhs = tuple(rng.randrange(n_next) for _ in range(rng.choice(cfg.rule_lengths)))
                if rhs not in rhss:
                    rhss.append(rhs)
            if cfg.rule_probs == "uniform":
                probs = [1.0 / count] * count
            else:
                weights = [rng.expovariate(1.0) for _ in range(count)]
                probs = [w / sum(weights) for w in weights]
            out.append(tuple(sorted(zip(rhss, probs))))
        return tuple(out)

    def _draw_level(self, rng: random.Random, level: int) -> tuple:
        alternatives: list = []
        for _ in range(self.num_alternatives):
            for _ in range(self.config.max_tries):
                rule_set = self._draw_rule_set(rng, level)
                if rule_set not in alternatives:
                    alternatives.append(rule_set)
                    break
            else:
                raise ValueError(f"level {level}: could not draw {self.num_alternatives} distinct rule sets")
        return tuple(alternatives)

    # ----- dense tables (CPU, cached; moved by callers) --------------------------------------------------------------
    @cached_property
    def rule_tensors(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """Per level i: float64 rule probabilities (R2 [K, n_i, n', n'], R3 [K, n_i, n', n', n']), n' = n_{i+1}."""
        out = []
        for i, level in enumerate(self.rules):
            n, m = self.sizes[i], self.sizes[i + 1]
            r2 = torch.zeros(self.num_alternatives, n, m, m, dtype=torch.float64)
            r3 = torch.zeros(self.num_alternatives, n, m, m, m, dtype=torch.float64)
            for k, rule_set in enumerate(level):
                for a, rules in enumerate(rule_set):
                    for rhs, p in rules:
                        (r2 if len(rhs) == 2 else r3)[(k, a, *rhs)] += p
            out.append((r2, r3))
        return tuple(out)

    @cached_property
    def _sampling_tables(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """Per level i, with symbol id n_i standing for an empty slot and rows ``k * (n_i + 1) + a`` (rule set k,
        symbol a), R = most rules of one symbol: cumulative rule probabilities [K * (n_i + 1), R] float64, exactly
        1.0 from the symbol's last rule on (so a uniform u in [0, 1) counts only real rules below it), and children
        [K * (n_i + 1) * R, 3] long (row ``.. * R + r``: rule r's right-hand side, padded with the empty id n_{i+1};
        an empty slot has three empty children)."""
        out = []
        for i, level in enumerate(self.rules):
            n, empty = self.sizes[i] + 1, self.sizes[i + 1]
            r_max = max(len(rules) for rule_set in level for rules in rule_set)
            cum = torch.ones(self.num_alternatives * n, r_max, dtype=torch.float64)
            children = torch.full((self.num_alternatives * n * r_max, 3), empty, dtype=torch.long)
            for k, rule_set in enumerate(level):
                for a, rules in enumerate(rule_set):
                    row = k * n + a
                    cum[row, :len(rules) - 1] = torch.tensor([p for _, p in rules[:-1]], dtype=torch.float64).cumsum(0)
                    for r, (rhs, _) in enumerate(rules):
                        children[row * r_max + r, :len(rhs)] = torch.tensor(rhs)
            out.append((cum, children))
        return tuple(out)

    @cached_property
    def meta_tuples(self) -> Tensor:
        """All metadata tuples [K^D, D] long, in ``itertools.product`` order (j_0 most significant)."""
        return torch.tensor(list(itertools.product(range(self.num_alternatives), repeat=self.depth)),
                            dtype=torch.long).view(-1, self.depth)

    # ----- sampling ----------------------------------------------------------------------------------------------
    def sample(self, n: int, seed: int | torch.Generator = 0, meta: Tensor | None = None) -> PCFGSample:
        """Draw ``n`` documents (CPU). ``meta`` [n, D] fixes the rule-set choices; otherwise uniform per level.

        The level-i string lives in 3^i slots per document (slot s rewrites into slots 3s..3s+2; unused slots hold
        the empty id n_i), so a level is a few whole-batch table look-ups with no reshuffling, and the terminals
        are packed once at the end. Each rule is picked by one uniform u: the number of cumulative probabilities
        <= u.
        """
        gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
        if meta is None:
            meta = torch.randint(self.num_alternatives, (n, self.depth), generator=gen)
        meta = meta.to(torch.long).cpu()
        if meta.shape != (n, self.depth):
            raise ValueError(f"meta must have shape {(n, self.depth)}, got {tuple(meta.shape)}")
        slots = torch.zeros(n, 1, dtype=torch.long)             # [n, 3^i] level-i symbols, n_i = empty slot
        for i, (cum, children) in enumerate(self._sampling_tables):
            row = meta[:, i:i + 1] * (self.sizes[i] + 1) + slots                 # [n, 3^i]
            u = torch.rand(slots.shape, dtype=torch.float64, generator=gen)
            choice = (u[..., None] >= cum[row]).sum(-1)                           # [n, 3^i] rule index
            slots = children[row * cum.shape[1] + choice].view(n, -1)             # [n, 3^(i+1)]
        filled = slots < self.num_terminals
        lengths = filled.sum(1)
        width = slots.shape[1]
        position = torch.where(filled, filled.cumsum(1) - 1, width)               # empty slots -> a spill column
        packed = torch.zeros(n, width + 1, dtype=torch.long).scatter_(1, position, slots * filled)
        return PCFGSample(packed[:, :int(lengths.max()) if n else 0], lengths, meta)

    # ----- encoding ----------------------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        return self.num_terminals

    @property
    def eos_id(self) -> int:
        return self.num_terminals + 1

    @property
    def mask_id(self) -> int:
        return self.num_terminals + 2

    @property
    def pad_id(self) -> int:
        return self.num_terminals + 3

    def meta_id(self, level: int | Tensor, choice: int | Tensor) -> int | Tensor:
        return self.num_terminals + 4 + level * self.num_alternatives + choice

    @property
    def vocab_size(self) -> int:
        return self.num_terminals + 4 + self.depth * self.num_alternatives

    @property
    def prefix_width(self) -> int:
        """Tokens before the first terminal: BOS and D metadata/MASK slots."""
        return 1 + self.depth

    def mask_metadata(self, meta: Tensor, meta_depth: int, has_meta: Tensor | None = None) -> Tensor:
        """Known metadata [N, D] (-1 = MASK): levels d < ``meta_depth`` of rows with ``has_meta`` (default all)."""
        if not 0 <= meta_depth <= self.depth:
            raise ValueError(f"meta_depth must be in [0, {self.depth}], got {meta_depth}")
        revealed = (torch.arange(self.depth, device=meta.device) < meta_depth).expand_as(meta)
        if has_meta is not None:
            revealed = revealed & has_meta.to(torch.bool)[:, None]
        return torch.where(revealed, meta, -1)

    def encode(self, terminals: Tensor, lengths: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
        """``[BOS] m_0..m_{D-1} w_1..w_n [EOS] [PAD]..`` -> (tokens [N, D+2+T] long, loss_mask [N, D+2+T] bool).

        ``known`` [N, D]: m_d = META(d, known_d), MASK where known_d < 0. ``loss_mask[:, t]`` marks tokens that are
        loss targets (terminals and EOS), so next-token logits at position t-1 pair with ``loss_mask[:, t]``.
        """
        n, width = terminals.shape
        dev = terminals.device
        pos = torch.arange(width + 1, device=dev)
        is_terminal = pos[:width] < lengths[:, None]
        body = torch.full((n, width + 1), self.pad_id, dtype=torch.long, device=dev)
        body[:, :width] = torch.where(is_terminal, terminals, self.pad_id)
        body[pos == lengths[:, None]] = self.eos_id
        levels = torch.arange(self.depth, device=dev)
        meta_tokens = torch.where(known >= 0, self.meta_id(levels, known.clamp(min=0)), self.mask_id)
        bos = torch.full((n, 1), self.bos_id, dtype=torch.long, device=dev)
        tokens = torch.cat([bos, meta_tokens, body], dim=1)
        loss_mask = torch.cat([torch.zeros(n, self.prefix_width, dtype=torch.bool, device=dev),
                               pos <= lengths[:, None]], dim=1)
        return tokens, loss_mask

    def decode(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inverse of :meth:`encode`: (terminals [N, T] long, lengths [N], known [N, D])."""
        meta_tokens = tokens[:, 1:self.prefix_width]
        offset = meta_tokens - self.meta_id(torch.arange(self.depth, device=tokens.device), 0)
        known = torch.where(meta_tokens == self.mask_id, -1, offset)
        body = tokens[:, self.prefix_width:]
        lengths = (body < self.num_terminals).cumprod(1).sum(1)
        width = int(lengths.max()) if len(lengths) else 0
        terminals = torch.where(torch.arange(width, device=tokens.device) < lengths[:, None], body[:, :width], 0)
        return terminals, lengths, known

    # ----- inference shortcut --------------------------------------------------------------------------------------
    def inside(self, terminals: Tensor, lengths: Tensor, chunk_size: int | None = None, method: str = "matrix"):
        """Exact per-metadata sequence and prefix log-probabilities; see :func:`fastattn.pcfg.inference.inside`."""
        from .inference import inside
        return inside(self, terminals, lengths, chunk_size=chunk_size, method=method)
