"""Leveled PCFG: generator, encoding, and the exact DP against brute-force enumeration on small grammars."""
from __future__ import annotations

import itertools
import math
from collections import defaultdict

import pytest
import torch

from fastattn.pcfg import LeveledPCFG, PCFGConfig
from fastattn.pcfg.inference import conditional, inside

SMALL = dict(depth=3, num_symbols=2, rules_per_symbol=(1, 2), rule_probs="dirichlet", seed=0)
# seed 0: 419 strings in the union of the 8 languages, some with several derivations


def enumerate_language(g: LeveledPCFG, meta: tuple[int, ...]) -> dict[tuple[int, ...], float]:
    """{string: p(string | meta)} by expanding every derivation bottom-up (independent of the DP)."""
    dist = [{(v,): 1.0} for v in range(g.num_terminals)]
    for i in reversed(range(g.depth)):
        new = []
        for rules in g.rules[i][meta[i]]:
            d: dict[tuple[int, ...], float] = defaultdict(float)
            for rhs, p in rules:
                for parts in itertools.product(*(dist[c].items() for c in rhs)):
                    d[sum((s for s, _ in parts), ())] += p * math.prod(q for _, q in parts)
            new.append(d)
        dist = new
    return dict(dist[0])


def prefix_masses(lang: dict[tuple[int, ...], float]) -> dict[tuple[int, ...], float]:
    """{prefix: p(document starts with prefix)} for an enumerated distribution."""
    mass: dict[tuple[int, ...], float] = defaultdict(float)
    for s, p in lang.items():
        for k in range(len(s) + 1):
            mass[s[:k]] += p
    return mass


def pad(strings: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in strings)
    terminals = torch.tensor([list(s) + [0] * (width - len(s)) for s in strings], dtype=torch.long)
    return terminals, torch.tensor([len(s) for s in strings])


@pytest.fixture(scope="module", params=["matrix", "band"])
def small(request):
    g = LeveledPCFG(PCFGConfig(**SMALL))
    langs = [enumerate_language(g, tuple(j)) for j in g.meta_tuples.tolist()]
    strings = sorted(set().union(*langs), key=lambda s: (len(s), s))
    terminals, lengths = pad(strings)
    return g, langs, strings, g.inside(terminals, lengths, chunk_size=512, method=request.param)


def test_config_validation():
    with pytest.raises(ValueError):
        PCFGConfig(depth=0)
    with pytest.raises(ValueError):
        PCFGConfig(rule_lengths=(1, 2))
    with pytest.raises(ValueError):
        PCFGConfig(num_symbols=(3, 3), depth=3)
    with pytest.raises(ValueError):       # 3 distinct rules impossible over one symbol with rule length 2
        PCFGConfig(depth=2, num_symbols=1, rules_per_symbol=(3, 3), rule_lengths=(2,))


def test_grammar_shape_and_distinct_alternatives():
    g = LeveledPCFG(depth=4, seed=1)
    for i, level in enumerate(g.rules):
        assert len(level) == 2 and level[0] != level[1]
        for rule_set in level:
            assert len(rule_set) == g.sizes[i]
            for rules in rule_set:
                assert 2 <= len(rules) <= 3 and len({rhs for rhs, _ in rules}) == len(rules)
                assert math.isclose(sum(p for _, p in rules), 1.0)
                assert all(len(rhs) in (2, 3) and max(rhs) < g.sizes[i + 1] for rhs, _ in rules)


def test_determinism_by_seed():
    a, b, c = LeveledPCFG(seed=5), LeveledPCFG(seed=5), LeveledPCFG(seed=6)
    assert a.rules == b.rules and a.rules != c.rules
    sa, sb, sc = a.sample(16, seed=0), b.sample(16, seed=0), a.sample(16, seed=1)
    assert torch.equal(sa.terminals, sb.terminals) and torch.equal(sa.meta, sb.meta)
    sg = a.sample(16, seed=torch.Generator().manual_seed(0))
    assert torch.equal(sa.terminals, sg.terminals) and torch.equal(sa.lengths, sg.lengths)
    assert not (sa.terminals.shape == sc.terminals.shape and torch.equal(sa.terminals, sc.terminals))


def test_sample_lengths_and_meta():
    g = LeveledPCFG(depth=4, seed=2)
    s = g.sample(200, seed=0)
    assert s.meta.shape == (200, 4) and set(s.meta.unique().tolist()) == {0, 1}
    assert int(s.lengths.min()) >= 2 ** 4 and int(s.lengths.max()) <= 3 ** 4
    assert int(s.terminals.max()) < g.num_terminals
    beyond = torch.arange(s.terminals.shape[1]) >= s.lengths[:, None]
    assert (s.terminals[beyond] == 0).all()


def chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom of ``counts`` (of ``n`` draws) against ``probs``; cells expected
    fewer than 5 times are pooled into one."""
    cells = set(counts) | set(probs)
    big = [c for c in cells if n * probs.get(c, 0.0) >= 5]
    pooled = [c for c in cells if n * probs.get(c, 0.0) < 5]
    obs = [counts.get(c, 0) for c in big] + [sum(counts.get(c, 0) for c in pooled)]
    exp = [n * probs[c] for c in big] + [n * sum(probs.get(c, 0.0) for c in pooled)]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0) + (math.inf if exp[-1] == 0 and obs[-1] else 0)
    return stat, len(big)


def test_sampler_frequencies_match_enumeration():
    """Empirical (metadata, document) frequencies of 200k samples against p(j) p(w | j) by enumeration."""
    g = LeveledPCFG(PCFGConfig(**SMALL))
    tuples = [tuple(j) for j in g.meta_tuples.tolist()]
    langs = [enumerate_language(g, j) for j in tuples]
    probs = {(j, w): p / len(tuples) for j, lang in zip(tuples, langs) for w, p in lang.items()}
    n = 200_000
    s = g.sample(n, seed=0)
    counts: dict = defaultdict(int)
    for j, w, length in zip(s.meta.tolist(), s.terminals.tolist(), s.lengths.tolist()):
        counts[(tuple(j), tuple(w[:length]))] += 1
    assert set(counts) <= set(probs)                       # nothing outside the languages of its own metadata
    stat, df = chi_square(counts, probs, n)
    bound = df + 5 * math.sqrt(2 * df)                     # chi-square(df) mean + 5 sd
    assert df > 100 and stat < bound, (stat, df)
    # the test has power: the same draws fail against a 5% admixture of the distribution with the last level's
    # rule sets swapped (same support, probabilities slightly off)
    swapped = {(j, w): probs.get((j[:-1] + (1 - j[-1],), w), 0.0) for j, w in probs}
    assert chi_square(counts, {c: 0.95 * p + 0.05 * swapped[c] for c, p in probs.items()}, n)[0] > bound
    # fixed metadata: every draw lies in that tuple's language
    meta = g.meta_tuples.repeat(50, 1)
    fixed = g.sample(len(meta), seed=1, meta=meta)
    assert torch.equal(fixed.meta, meta)
    for j, w, length in zip(meta.tolist(), fixed.terminals.tolist(), fixed.lengths.tolist()):
        assert tuple(w[:length]) in langs[tuples.index(tuple(j))]


def test_dp_matches_enumeration(small):
    g, langs, strings, res = small
    for m, lang in enumerate(langs):
        want = torch.tensor([math.log(lang[s]) if s in lang else -math.inf for s in strings], dtype=torch.float64)
        torch.testing.assert_close(res.log_seq[:, m], want, rtol=1e-9, atol=1e-9)
        prefix_mass = prefix_masses(lang)
        for row, s in enumerate(strings):
            want = [math.log(prefix_mass[s[:k]]) if s[:k] in prefix_mass else -math.inf for k in range(len(s) + 1)]
            torch.testing.assert_close(res.log_prefix[row, m, :len(s) + 1], torch.tensor(want, dtype=torch.float64))
            assert (res.log_prefix[row, m, len(s) + 1:] == -math.inf).all()


def test_posterior_matches_enumeration(small):
    g, langs, strings, res = small
    masses = [prefix_masses(lang) for lang in langs]
    mass = torch.tensor([[[m.get(s[:k], 0.0) for m in masses] for k in range(res.log_prefix.shape[-1])]
                         for s in strings], dtype=torch.float64)                      # [N, T+1, M]
    known = torch.tensor([[1, -1, -1]]).expand(len(strings), -1)
    uniform = torch.ones(len(langs), dtype=torch.float64)
    for kn, prior in ((None, uniform), (known, (g.meta_tuples[:, 0] == 1).double())):
        want = mass * prior
        want = want / want.sum(-1, keepdim=True)
        viable = res.is_viable_prefix(kn)
        assert torch.equal(viable, (mass.matmul(prior) > 0) & res.valid)
        torch.testing.assert_close(res.posterior(kn)[viable], want[viable])
    level = res.level_posterior(known)[res.is_viable_prefix(known)]      # [P, D, K] over viable prefixes
    torch.testing.assert_close(level[:, 0, 1], torch.ones_like(level[:, 0, 1]))   # the known level is certain
    torch.testing.assert_close(level.sum(-1), torch.ones_like(level.sum(-1)))


def test_probabilities_sum_to_one_exhaustively():
    g = LeveledPCFG(depth=2, num_symbols=2, seed=0)          # lengths 4..9 over 2 terminals: 1008 strings
    strings = [s for n in range(1, 10) for s in itertools.product(range(2), repeat=n)]
    strings += list(itertools.product(range(2), repeat=10))[::16]                  # too long: must get -inf
    res = g.inside(*pad(strings), chunk_size=256)
    lengths = torch.tensor([len(s) for s in strings])
    torch.testing.assert_close(res.log_seq.exp().sum(0), torch.ones(4, dtype=torch.float64))
    assert (res.log_seq[(lengths < 4) | (lengths > 9)] == -math.inf).all()
    torch.testing.assert_close(res.log_prob().exp().sum(), torch.ones((), dtype=torch.float64))
    for k in range(1, 10):          # all k-prefixes together: p(length >= k), which is 1 up to the minimum length
        at_least = (res.log_seq.exp() * (lengths >= k)[:, None]).sum(0)
        torch.testing.assert_close(res.log_prefix[lengths == k, :, k].exp().sum(0), at_least)


def test_bayes_loss_is_conditional_entropy(small):
    g, langs, strings, res = small
    for known_row in ([-1, -1, -1], [0, -1, -1], [1, 0, 1]):
        known = torch.tensor([known_row]).expand(len(strings), -1)
        prior = res.log_prior(known)[0].exp()
        p = sum(w * torch.tensor([lang.get(s, 0.0) for s in strings], dtype=torch.float64)
                for w, lang in zip(prior, langs))
        # per-position entropy H(x_{k+1} | x_1..x_k) from the enumerated distribution
        prefix_mass = prefix_masses(dict(zip(strings, p.tolist())))
        entropy = torch.zeros(res.log_prefix.shape[-1], dtype=torch.float64)
        for s, q in zip(strings, p.tolist()):
            if q > 0:
                for k in range(len(s) + 1):
                    nxt = prefix_mass[s[:k + 1]] if k < len(s) else q
                    entropy[k] -= q * math.log(nxt / prefix_mass[s[:k]])
        loss = res.bayes_loss(known)
        member = p > 0
        expected = (p[member, None] * loss[member]).sum(0)
        torch.testing.assert_close(expected, entropy)
        torch.testing.assert_close(expected.sum(), -(p[member] * p[member].log()).sum())


def test_membership():
    g = LeveledPCFG(depth=3, seed=0)
    s = g.sample(32, seed=0)
    res = g.inside(s.terminals, s.lengths)
    assert res.is_member(s.meta).all() and res.is_member().all()
    assert res.is_viable_prefix(s.meta)[res.valid].all()
    gen = torch.Generator().manual_seed(0)
    at = (torch.rand(32, generator=gen) * s.lengths).long()
    flipped = s.terminals.clone()
    rows = torch.arange(32)
    flipped[rows, at] = (flipped[rows, at] + torch.randint(1, g.num_terminals, (32,), generator=gen)) % g.num_terminals
    bad = g.inside(flipped, s.lengths)
    assert (~bad.is_member(s.meta)).float().mean() > 0.5
    # viability is monotone in the prefix length and holds up to the flip (that prefix is unperturbed)
    viable = bad.is_viable_prefix(s.meta)
    assert (viable[:, :-1] >= viable[:, 1:]).all() and viable[rows, at].all()


def test_batching_matches_one_by_one():
    g = LeveledPCFG(depth=3, seed=4)
    s = g.sample(8, seed=1)
    whole = g.inside(s.terminals, s.lengths, chunk_size=5)
    single = g.inside(s.terminals, s.lengths, chunk_size=1)
    torch.testing.assert_close(whole.log_seq, single.log_seq)
    torch.testing.assert_close(whole.log_prefix, single.log_prefix)
    for i in range(8):
        n = int(s.lengths[i])
        one = g.inside(s.terminals[i:i + 1, :n], s.lengths[i:i + 1])
        torch.testing.assert_close(one.log_seq[0], whole.log_seq[i])
        torch.testing.assert_close(one.log_prefix[0], whole.log_prefix[i, :, :n + 1])
        torch.testing.assert_close(one.bayes_loss(s.meta[i:i + 1])[0], whole.bayes_loss(s.meta)[i, :n + 1])


def test_encoding_round_trip_and_loss_mask():
    g = LeveledPCFG(depth=4, seed=0)
    s = g.sample(10, seed=0)
    has_meta = torch.tensor([True, False] * 5)
    known = g.mask_metadata(s.meta, meta_depth=2, has_meta=has_meta)
    assert (known[has_meta, :2] == s.meta[has_meta, :2]).all() and (known[has_meta, 2:] == -1).all()
    assert (known[~has_meta] == -1).all()
    tokens, loss_mask = g.encode(s.terminals, s.lengths, known)
    assert tokens.shape == (10, g.prefix_width + s.terminals.shape[1] + 1) and int(tokens.max()) < g.vocab_size
    assert (tokens[:, 0] == g.bos_id).all()
    meta_slots = tokens[:, 1:g.prefix_width]
    assert (meta_slots[~has_meta] == g.mask_id).all() and (meta_slots[has_meta, 2:] == g.mask_id).all()
    assert (meta_slots[has_meta, :2] == g.meta_id(torch.arange(2), s.meta[has_meta, :2])).all()
    assert not loss_mask[:, :g.prefix_width].any()                     # BOS and metadata/MASK slots: no loss
    target = tokens[loss_mask]
    assert ((target < g.num_terminals) | (target == g.eos_id)).all()  # terminals and EOS only ...
    assert loss_mask.sum() == (s.lengths + 1).sum()                    # ... all of them
    assert ((tokens == g.pad_id) == (torch.arange(tokens.shape[1]) > g.prefix_width + s.lengths[:, None])).all()
    terminals, lengths, known_back = g.decode(tokens)
    assert torch.equal(terminals, s.terminals) and torch.equal(lengths, s.lengths) and torch.equal(known_back, known)
    full = g.mask_metadata(s.meta, meta_depth=4)
    assert torch.equal(g.decode(g.encode(s.terminals, s.lengths, full)[0])[2], s.meta)


@pytest.mark.parametrize("depth,seed", [(3, 1), (4, 0)])
def test_matrix_matches_band_on_samples(depth, seed):
    g = LeveledPCFG(depth=depth, seed=seed, rule_probs="dirichlet")
    s = g.sample(12, seed=seed)
    flipped = s.terminals.clone()
    flipped[::2, 3] = (flipped[::2, 3] + 1) % g.num_terminals              # some non-members and dead prefixes
    a = g.inside(flipped, s.lengths)                                      # matrix, chunks sized by the byte budget
    b = g.inside(flipped, s.lengths, method="band", chunk_size=5)
    assert torch.equal(a.log_seq.isfinite(), b.log_seq.isfinite())
    assert torch.equal(a.log_prefix.isfinite(), b.log_prefix.isfinite())
    fin = b.log_prefix.isfinite()
    torch.testing.assert_close(a.log_prefix[fin], b.log_prefix[fin], rtol=1e-10, atol=1e-10)
    fin = b.log_seq.isfinite()
    torch.testing.assert_close(a.log_seq[fin], b.log_seq[fin], rtol=1e-10, atol=1e-10)
    tiny = inside(g, flipped, s.lengths, max_chunk_bytes=1)               # one document per chunk
    torch.testing.assert_close(tiny.log_prefix, a.log_prefix)


def test_conditional_is_the_own_metadata_column():
    g = LeveledPCFG(depth=3, seed=2)
    s = g.sample(20, seed=3)
    other = s.meta.flip(0)
    res = g.inside(s.terminals, s.lengths)
    index = (other * g.num_alternatives ** torch.arange(g.depth - 1, -1, -1)).sum(-1)    # product order
    assert torch.equal(g.meta_tuples[index], other)
    seq, prefix = conditional(g, s.terminals, s.lengths, other, chunk_size=7)
    torch.testing.assert_close(seq, res.log_seq[torch.arange(20), index])
    torch.testing.assert_close(prefix, res.log_prefix[torch.arange(20), index])
    assert conditional(g, s.terminals, s.lengths, s.meta)[0].isfinite().all()
    with pytest.raises(ValueError):
        conditional(g, s.terminals, s.lengths, s.meta[:, :2])
    with pytest.raises(ValueError):
        g.inside(s.terminals, s.lengths, method="nope")


@pytest.mark.gpu
def test_matrix_on_cuda_matches_cpu():
    g = LeveledPCFG(depth=4, seed=0)
    s = g.sample(64, seed=0)
    cpu = g.inside(s.terminals, s.lengths)
    gpu = g.inside(s.terminals.cuda(), s.lengths.cuda())
    torch.testing.assert_close(gpu.log_prefix.cpu(), cpu.log_prefix)
    torch.testing.assert_close(gpu.bayes_loss(s.meta.cuda()).cpu(), cpu.bayes_loss(s.meta))
