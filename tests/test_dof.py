"""DoF estimation (known answers, invariances, GQA pairing), the q/k reservoir and feature-dim allocation."""
import math
import random

import pytest
import torch

from fastattn import dof

PAPER_GPT2_DOF = [150, 173.8, 24.5, 39.8, 42.1, 66.6, 107.4, 33, 24.9, 29.9, 43.2, 39.8]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(*shape, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale


def _random_gram(n: int = 12, d: int = 4, seed: int = 0) -> torch.Tensor:
    x = _x(n, d, scale=0.8, seed=seed)
    return torch.exp(x @ x.T / math.sqrt(d))


# ---------------------------------------------------------------- the DoF formula


def test_known_spectrum():
    mu = torch.tensor([1.0, 0.5, 0.25, 0.0, -1e-2])  # negative eigenvalues (round-off) count as 0
    assert dof.dof_from_eigenvalues(mu, 0.25).item() == pytest.approx(1 / 1.25 + 0.5 / 0.75 + 0.25 / 0.5)
    out = dof.dof_from_eigenvalues(mu, [0.25, 1.0])
    assert out.shape == (2,) and out.dtype == torch.float64
    assert out[1].item() == pytest.approx(0.5 + 0.5 / 1.5 + 0.25 / 1.25)


def test_dof_from_gram_of_a_diagonal_matrix():
    gram = torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    assert dof.dof_from_gram(gram, 0.25, "none").item() == pytest.approx(3 / 3.25 + 1 / 1.25)
    assert dof.dof_from_gram(gram, 0.25, "mean").item() == pytest.approx(0.75 / 1.0 + 0.25 / 0.5)
    assert dof.dof_from_gram(gram, 0.25, "trace").item() == pytest.approx(0.75 / 1.0 + 0.25 / 0.5)


@pytest.mark.parametrize("c", [1e-6, 0.3, 7.0, 1e8])
def test_trace_form_is_scale_invariant_and_others_are_not(c):
    gram, lam = _random_gram(), 2.0 ** -4
    ref = dof.dof_from_gram(gram, lam)
    assert torch.allclose(dof.dof_from_gram(c * gram, lam, "trace"), ref, rtol=1e-10)
    # scaling G by c is scaling lambda by 1/c for the unnormalized forms
    for normalize in ("mean", "none"):
        scaled = dof.dof_from_gram(c * gram, lam, normalize)
        assert torch.allclose(scaled, dof.dof_from_gram(gram, lam / c, normalize), rtol=1e-10)
        assert not torch.allclose(scaled, dof.dof_from_gram(gram, lam, normalize))


def test_normalizations_relate_through_lambda():
    gram, lam = _random_gram(n=10), 0.1
    n, trace = gram.shape[0], gram.trace().item()
    none = dof.dof_from_gram(gram, [lam * n, lam * trace], "none")
    assert torch.allclose(dof.dof_from_gram(gram, lam, "mean"), none[0], rtol=1e-10)
    assert torch.allclose(dof.dof_from_gram(gram, lam, "trace"), none[1], rtol=1e-10)


def test_monotone_decreasing_in_lambda_and_bounded():
    q, k = _x(3, 40, 8, seed=1), _x(3, 40, 8, seed=2)
    lams = 2.0 ** torch.arange(-12, 4, dtype=torch.float64)
    out = dof.degrees_of_freedom(q, k, lams)
    assert out.shape == (3, len(lams))
    assert (out.diff(dim=-1) < 0).all()
    assert (out > 0).all() and (out <= 80).all()


def test_lambda_forms_and_validation():
    q, k = _x(2, 10, 4, seed=1), _x(2, 10, 4, seed=2)
    scalar = dof.degrees_of_freedom(q, k, 0.5)
    assert scalar.shape == (2,)
    assert torch.equal(dof.degrees_of_freedom(q, k, torch.tensor(0.5)), scalar)
    vector = dof.degrees_of_freedom(q, k, torch.tensor([0.5, 0.1]))
    assert vector.shape == (2, 2) and torch.allclose(vector[:, 0], scalar)
    for bad in (0.0, -1.0, [0.5, 0.0], float("nan"), [[0.5]], []):
        with pytest.raises(ValueError, match="lam"):
            dof.degrees_of_freedom(q, k, bad)


# ---------------------------------------------------------------- known answers from data


def test_matches_an_explicit_computation():
    d = 6
    q, k = _x(2, 15, d, seed=1), _x(2, 15, d, seed=2)
    out = dof.degrees_of_freedom(q, k, [0.01, 0.3], num_samples=1000)
    for h in range(2):
        x = torch.cat([q[h], k[h]])
        gram = torch.exp(x @ x.T / math.sqrt(d))
        mu = torch.linalg.eigvalsh(gram / gram.trace())
        for j, lam in enumerate([0.01, 0.3]):
            assert out[h, j].item() == pytest.approx((mu / (mu + lam)).sum().item(), rel=1e-10)


def test_all_equal_vectors_have_one_effective_dimension():
    v = _x(1, 1, 8, seed=3)
    q = v.expand(2, 30, 8)
    lams = [1e-3, 0.1, 1.0]
    out = dof.degrees_of_freedom(q, q.clone(), lams)
    assert torch.allclose(out, torch.tensor([[1 / (1 + lam) for lam in lams]] * 2, dtype=torch.float64))


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_data_on_r_points_has_dof_at_most_r(rank):
    d = 8
    points = _x(rank, d, seed=rank)
    q = points[torch.randint(rank, (2, 50), generator=_gen(1))]  # [2, 50, d]
    k = points[torch.randint(rank, (2, 50), generator=_gen(2))]
    out = dof.degrees_of_freedom(q, k, [1e-9, 1e-3, 0.1], num_samples=64)
    assert (out[:, 1:] <= rank + 1e-9).all()
    # the exp kernel is strictly positive definite: r distinct points give rank exactly r (lambda 1e-9 still
    # sits well above the fp64 round-off of the zero eigenvalues, ~1e-16)
    assert torch.allclose(out[:, 0], torch.full((2,), float(rank), dtype=torch.float64), atol=1e-3)
    assert (out[:, 1] < rank).all()


def test_mean_and_none_differ_from_trace_as_expected():
    # points of equal norm r: trace G = J exp(r^2 / sqrt d), so trace = mean with lambda scaled by exp(r^2/sqrt d)
    d, r = 8, 1.5
    q = r * torch.nn.functional.normalize(_x(2, 20, d, seed=1), dim=-1)
    k = r * torch.nn.functional.normalize(_x(2, 20, d, seed=2), dim=-1)
    lam, j, diag = 0.05, 40, math.exp(r * r / math.sqrt(d))
    trace = dof.degrees_of_freedom(q, k, lam)
    mean = dof.degrees_of_freedom(q, k, [lam * diag, lam], normalize="mean")
    none = dof.degrees_of_freedom(q, k, lam * j, normalize="none")
    assert torch.allclose(trace, mean[:, 0], rtol=1e-10)
    assert torch.allclose(none, mean[:, 1], rtol=1e-10)
    assert not torch.allclose(trace, mean[:, 1], rtol=1e-3)


def test_overflow_raises_for_unshifted_forms_only():
    q, k = _x(1, 10, 4, scale=30.0, seed=1), _x(1, 10, 4, scale=30.0, seed=2)
    assert torch.isfinite(dof.degrees_of_freedom(q, k, 0.1)).all()
    for normalize in ("mean", "none"):
        with pytest.raises(OverflowError, match="trace"):
            dof.degrees_of_freedom(q, k, 0.1, normalize=normalize)


def test_sampling_is_seeded_and_uses_everything_when_asked():
    q, k = _x(2, 60, 8, seed=1), _x(2, 60, 8, seed=2)
    a = dof.degrees_of_freedom(q, k, 0.01, num_samples=30, seed=5)
    assert torch.equal(a, dof.degrees_of_freedom(q, k, 0.01, num_samples=30, seed=5))
    assert not torch.allclose(a, dof.degrees_of_freedom(q, k, 0.01, num_samples=30, seed=6))
    full = dof.degrees_of_freedom(q, k, 0.01, num_samples=120, seed=5)
    assert torch.equal(full, dof.degrees_of_freedom(q, k, 0.01, num_samples=10_000, seed=6))
    assert not torch.allclose(full, dof.degrees_of_freedom(q, k, 0.01, num_samples=119, seed=5))


def test_gqa_pairs_query_head_h_with_key_head_h_over_group():
    q, k = _x(6, 12, 4, seed=1), _x(3, 12, 4, seed=2)  # group of 2: query heads (0,1)->0, (2,3)->1, (4,5)->2
    out = dof.degrees_of_freedom(q, k, [0.01, 0.1])
    assert torch.allclose(out, dof.degrees_of_freedom(q, k.repeat_interleave(2, dim=0), [0.01, 0.1]))
    for h in range(6):
        assert torch.allclose(out[h], dof.degrees_of_freedom(q[h:h + 1], k[h // 2:h // 2 + 1], [0.01, 0.1])[0])
    assert not torch.allclose(out, dof.degrees_of_freedom(q, k.repeat(2, 1, 1), [0.01, 0.1]))


def test_bad_inputs_raise():
    q = _x(4, 5, 8)
    with pytest.raises(ValueError, match="multiple"):
        dof.degrees_of_freedom(q, _x(3, 5, 8), 0.1)
    with pytest.raises(ValueError, match="same d"):
        dof.degrees_of_freedom(q, _x(4, 5, 6), 0.1)
    with pytest.raises(ValueError, match="normalize"):
        dof.degrees_of_freedom(q, q, 0.1, normalize="frobenius")
    with pytest.raises(ValueError, match="num_samples"):
        dof.degrees_of_freedom(q, q, 0.1, num_samples=0)


def test_layer_dof_reductions():
    per_head = torch.tensor([[1.0, 5.0], [3.0, 2.0], [2.0, 2.0]])  # [H=3, L=2]
    assert torch.equal(dof.layer_dof(per_head), torch.tensor([3.0, 5.0]))
    assert torch.equal(dof.layer_dof(per_head, "sum"), torch.tensor([6.0, 9.0]))
    assert torch.allclose(dof.layer_dof(per_head, "mean"), torch.tensor([2.0, 3.0]))
    assert torch.equal(dof.layer_dof(per_head[None].expand(4, 3, 2), dim=1), torch.tensor([[3.0, 5.0]] * 4))
    with pytest.raises(ValueError, match="max"):
        dof.layer_dof(per_head, "median")


# ---------------------------------------------------------------- reservoir


def _tagged_qk(batch, heads, kv_heads, t, d, offset=0):
    """q/k whose entries encode (token id, head): q[b, h, i] = id + h / 100, k likewise + 0.5."""
    ids = offset + torch.arange(batch * t, dtype=torch.float32).reshape(batch, 1, t, 1)
    q = (ids + torch.arange(heads).reshape(1, heads, 1, 1) / 100).expand(batch, heads, t, d).clone()
    k = (ids + 0.5 + torch.arange(kv_heads).reshape(1, kv_heads, 1, 1) / 100).expand(batch, kv_heads, t, d).clone()
    return q, k


def test_reservoir_keeps_everything_below_capacity_and_excludes_padding():
    res = dof.QKReservoir(num_layers=2, max_per_head=100)
    q, k = _tagged_qk(2, 4, 2, 10, 3)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    res.add(1, q.double(), k.to(torch.bfloat16), key_mask=mask)
    gq, gk = res.get(1)
    assert gq.shape == (4, 16, 3) and gk.shape == (4, 16, 3)
    assert gq.dtype == gk.dtype == torch.float32 and gq.device.type == "cpu"
    # sequence 0 holds ids 0..9, sequence 1 ids 10..19 of which 16..19 are padding
    assert sorted(gq[0, :, 0].floor().long().tolist()) == list(range(16))
    assert sorted(gk[0, :, 0].floor().long().tolist()) == list(range(16))
    assert res.seen(1) == 16
    with pytest.raises(ValueError, match="no captured"):
        res.get(0)


def test_reservoir_is_bounded_gqa_mapped_and_seeded():
    def run(seed):
        res = dof.QKReservoir(num_layers=1, max_per_head=20, seed=seed)
        for step in range(5):
            q, k = _tagged_qk(2, 6, 3, 9, 4, offset=100 * step)
            res.add(0, q, k)
        return res

    res = run(0)
    q, k = res.get(0)
    assert q.shape == k.shape == (6, 20, 4) and res.seen(0) == 90
    ids = q[0, :, 0].floor()
    for h in range(6):  # every head keeps the same tokens; key row h is key head h // 2
        assert torch.allclose(q[h, :, 0], ids + h / 100)
        key_ids = k[h, :, 0].floor()
        assert torch.allclose(k[h, :, 0], key_ids + 0.5 + (h // 2) / 100)
        assert torch.equal(k[h], k[2 * (h // 2)])
    assert len(set(ids.tolist())) == 20  # no token stored twice
    assert torch.equal(q, run(0).get(0)[0]) and torch.equal(k, run(0).get(0)[1])
    assert not torch.equal(q, run(1).get(0)[0])


def test_reservoir_sample_is_uniform():
    n, cap, trials = 60, 12, 300
    counts = torch.zeros(n)
    for seed in range(trials):
        res = dof.QKReservoir(num_layers=1, max_per_head=cap, seed=seed)
        start = 0
        for size in (5, 1, 17, 30, 7):  # ragged batches, one bigger than the capacity
            q, k = _tagged_qk(1, 1, 1, size, 1, offset=start)
            res.add(0, q, k)
            start += size
        counts[res.get(0)[0][0, :, 0].long()] += 1
    freq = counts / trials  # each token is kept with probability cap / n = 0.2
    assert (freq - cap / n).abs().max() < 0.09  # ~3.9 binomial standard deviations
    for part in freq.chunk(4):
        assert abs(part.mean().item() - cap / n) < 0.04


@pytest.mark.parametrize("batches", [(1, 1, 1), (3,), (2, 1)])
def test_reservoir_of_one_keeps_each_of_three_tokens_a_third_of_the_time(batches):
    counts = torch.zeros(3)
    for seed in range(300):
        res = dof.QKReservoir(num_layers=1, max_per_head=1, seed=seed)
        start = 0
        for size in batches:
            res.add(0, *_tagged_qk(1, 1, 1, size, 1, offset=start))
            start += size
        counts[res.get(0)[0][0, 0, 0].long()] += 1
    assert ((counts / 300 - 1 / 3).abs() < 0.09).all(), counts


def test_reservoir_dof_and_validation():
    res = dof.QKReservoir(num_layers=2, max_per_head=50)
    for layer in range(2):
        res.add(layer, _x(2, 4, 16, 8, seed=layer).float(), _x(2, 2, 16, 8, seed=10 + layer).float())
    out = res.dof([0.01, 0.1], num_samples=40)
    assert out.shape == (2, 4, 2)
    assert torch.equal(out[1], dof.degrees_of_freedom(*res.get(1), [0.01, 0.1], num_samples=40))
    assert res.dof(0.1).shape == (2, 4)
    with pytest.raises(ValueError, match="layer"):
        res.add(2, _x(1, 4, 3, 8), _x(1, 2, 3, 8))
    with pytest.raises(ValueError, match="multiple"):
        res.add(0, _x(1, 4, 3, 8), _x(1, 3, 3, 8))
    with pytest.raises(ValueError, match="changed"):
        res.add(0, _x(1, 2, 3, 8), _x(1, 2, 3, 8))
    with pytest.raises(ValueError, match="key_mask"):
        res.add(0, _x(1, 4, 3, 8), _x(1, 2, 3, 8), key_mask=torch.ones(1, 3))


# ---------------------------------------------------------------- allocation


def test_paper_gpt2_allocation():
    alloc = dof.allocate_feature_dims(PAPER_GPT2_DOF, 64)
    assert sum(alloc) == 12 * 64
    # exact proportional shares are 148.6 172.2 24.3 39.4 41.7 66.0 106.4 32.7 24.7 29.6 42.8 39.4
    assert alloc == [149, 172, 24, 39, 42, 66, 106, 33, 25, 30, 43, 39]
    clipped = dof.allocate_feature_dims(PAPER_GPT2_DOF, 64, rule="clip", max_dim=64)
    assert clipped == [min(a, 64) for a in alloc] and sum(clipped) < 12 * 64


@pytest.mark.parametrize("rule", ["proportional", "sqrt", "uniform"])
def test_total_is_exact_for_random_inputs(rule):
    rng = random.Random(0)
    for _ in range(200):
        s = rng.randint(1, 30)
        capped = rng.random() < 0.5
        low = 0.1 if capped else 0.0  # layers with zero DoF cannot take budget beyond min_dim
        dofs = [rng.choice([low, rng.uniform(0.1, 5), rng.uniform(1, 500)]) for _ in range(s - 1)] + [1.0]
        m = rng.choice([1, 1, 2, 4, 8])
        budget = m * rng.randint(1, 200 // m)  # keeps S*C a multiple of m
        kw = dict(multiple_of=m, min_dim=rng.choice([1, m, 2 * m]))
        if capped:
            kw["max_dim"] = rng.randint(budget, 3 * budget)
        if kw["min_dim"] > budget:
            kw["min_dim"] = 1
        alloc = dof.allocate_feature_dims(dofs, budget, rule=rule, **kw)
        assert sum(alloc) == s * budget, (dofs, budget, kw)
        assert all(a % m == 0 and a >= kw["min_dim"] for a in alloc)
        assert all(a <= kw["max_dim"] for a in alloc) if "max_dim" in kw else True
        if rule != "uniform":  # more DoF never gets fewer features
            assert all(alloc[a] <= alloc[b] for a in range(s) for b in range(s) if dofs[a] < dofs[b])


def test_rules_on_exact_cases():
    assert dof.allocate_feature_dims([1, 2, 3, 2], 16) == [8, 16, 24, 16]
    assert dof.allocate_feature_dims([1, 4, 16, 9], 10, rule="sqrt") == [4, 8, 16, 12]
    assert dof.allocate_feature_dims([1, 4, 16, 9], 10, rule="uniform") == [10] * 4
    assert dof.allocate_feature_dims(torch.tensor([5.0, 5.0]), 7) == [7, 7]


def test_rounding_modes_and_tie_breaking():
    # shares 1.8, 2.7, 4.5: largest remainder keeps the total, nearest drifts
    assert dof.allocate_feature_dims([2, 3, 5], 3) == [2, 3, 4]
    assert dof.allocate_feature_dims([2, 3, 5], 3, rounding="nearest") == [2, 3, 5]
    # equal remainders: the extra unit goes to the lowest layer index
    assert dof.allocate_feature_dims([1, 1, 1], 4, multiple_of=3) == [6, 3, 3]
    assert dof.allocate_feature_dims([1, 1, 1], 1, multiple_of=1) == [1, 1, 1]
    assert dof.allocate_feature_dims([3, 1, 1, 3], 2, min_dim=1) == [3, 1, 1, 3]


def test_water_filling_bounds():
    assert dof.allocate_feature_dims([100, 1, 1, 1], 10, max_dim=16) == [16, 8, 8, 8]
    assert dof.allocate_feature_dims([100, 1, 1, 1], 10, min_dim=6) == [22, 6, 6, 6]
    # both bounds bind at once: 35 and 10 fixed, the other two split 35 in proportion 30:20
    assert dof.allocate_feature_dims([100, 30, 20, 1], 20, min_dim=10, max_dim=35) == [35, 21, 14, 10]
    # a layer with zero DoF sits at min_dim
    assert dof.allocate_feature_dims([0, 1, 3], 8, min_dim=4) == [4, 5, 15]


def test_multiple_of():
    alloc = dof.allocate_feature_dims(PAPER_GPT2_DOF, 64, multiple_of=16, min_dim=16, max_dim=128)
    assert sum(alloc) == 768 and all(a % 16 == 0 and 16 <= a <= 128 for a in alloc)
    # the bounds are tightened to multiples: min 5 -> 8, max 30 -> 24
    alloc = dof.allocate_feature_dims([1, 100, 1], 16, multiple_of=8, min_dim=5, max_dim=30)
    assert alloc == [16, 24, 8]  # 8 * (1.5 + 3 + 1.5) units, the tied extra unit to layer 0
    with pytest.raises(ValueError, match="multiple"):
        dof.allocate_feature_dims([1, 2, 3], 7, multiple_of=2)
    with pytest.raises(ValueError, match="no multiple"):
        dof.allocate_feature_dims([1, 2], 8, multiple_of=8, min_dim=5, max_dim=7)


def test_clip_caps_without_redistributing():
    alloc = dof.allocate_feature_dims([100, 1, 1, 1], 10, rule="clip", max_dim=16)
    assert alloc == [16, 1, 1, 1]  # proportional would be 39 0.4 0.4 0.4 -> 37 1 1 1 with min_dim 1
    assert dof.allocate_feature_dims([100, 1, 1, 1], 10, rule="clip", max_dim=16, min_dim=4) == [16, 4, 4, 4]
    assert dof.allocate_feature_dims([1, 1], 8, rule="clip", max_dim=8) == [8, 8]
    with pytest.raises(ValueError, match="max_dim"):
        dof.allocate_feature_dims([1, 2], 8, rule="clip")


@pytest.mark.parametrize("kw", [
    dict(min_dim=9),  # 3 layers * 9 > 24
    dict(max_dim=7),  # 3 layers * 7 < 24
    dict(min_dim=8, max_dim=6),
    dict(rule="magic"),
    dict(rounding="floor"),
    dict(budget=0),
    dict(multiple_of=0),
])
def test_infeasible_and_invalid_raise(kw):
    args = dict(dof_per_layer=[1.0, 2.0, 3.0], budget=8) | kw
    with pytest.raises(ValueError):
        dof.allocate_feature_dims(**args)


@pytest.mark.parametrize("bad", [[], [1.0, -2.0], [1.0, float("nan")], [[1.0, 2.0]]])
def test_bad_dof_values_raise(bad):
    with pytest.raises(ValueError, match="dof_per_layer"):
        dof.allocate_feature_dims(bad, 8)


def test_zero_dof_cannot_absorb_budget():
    with pytest.raises(ValueError, match="infeasible"):
        dof.allocate_feature_dims([0.0, 0.0], 8)
    with pytest.raises(ValueError, match="infeasible"):
        dof.allocate_feature_dims([0.0, 1.0], 8, max_dim=10)
