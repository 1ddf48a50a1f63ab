"""Feature maps: registry, shapes/dtypes, PRF unbiasedness and stabilisation, per-map initialisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastattn import feature_maps

NAMES = feature_maps.names()
POSITIVE = {"prf", "performer", "hedgehog", "elu1"}  # relu is only non-negative


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(*shape, scale: float = 1.0, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _attention(phi_q: torch.Tensor, phi_k: torch.Tensor) -> torch.Tensor:
    """Normalized causal linear-attention rows [B, H, T, T] in fp64."""
    scores = phi_q.double() @ phi_k.double().transpose(-1, -2)
    scores = scores * torch.ones_like(scores).tril()
    return scores / scores.sum(-1, keepdim=True)


def test_registry_has_the_contract_names():
    assert set(NAMES) >= {"prf", "hedgehog", "performer", "elu1", "relu"}


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*hedgehog.*prf"):
        feature_maps.build("cosformer", 8, 8, 2)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
@pytest.mark.parametrize("arg", ["head_dim", "feature_dim", "num_heads"])
def test_bad_dims_raise(arg, bad):
    kw = dict(head_dim=8, feature_dim=8, num_heads=2) | {arg: bad}
    with pytest.raises(ValueError, match=arg):
        feature_maps.build("prf", **kw)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_and_role_raise(name):
    fm = feature_maps.build(name, 8, 5, 2)
    with pytest.raises(ValueError, match="role"):
        fm(_x(1, 2, 3, 8), role="v")
    for shape in [(1, 3, 3, 8), (1, 2, 3, 7), (2, 3, 8)]:
        with pytest.raises(ValueError, match="shape"):
            fm(_x(*shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature_dim", [1, 7, 16, 33])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_positivity(name, feature_dim, dtype):
    fm = feature_maps.build(name, 16, feature_dim, 3, generator=_gen())
    assert fm.feature_dim == feature_dim
    x = _x(2, 3, 11, 16, dtype=dtype)
    for role in ("q", "k"):
        out = fm(x, role=role)
        assert out.shape == (2, 3, 11, feature_dim) and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert (out > 0).all() if name in POSITIVE else (out >= 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_bf16_is_computed_in_fp32(name):
    fm = feature_maps.build(name, 8, 6, 2, generator=_gen())
    x = _x(1, 2, 5, 8, dtype=torch.bfloat16)
    assert torch.equal(fm(x, "k"), fm(x.float(), "k").to(torch.bfloat16))


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_per_head_and_heads_independent(name):
    fm = feature_maps.build(name, 8, 6, 3, generator=_gen())
    for tensor in [*fm.parameters(), *fm.buffers()]:
        assert tensor.shape[0] == 3
    x = _x(2, 3, 5, 8)
    y = x.clone()
    y[:, 1] += 1.0
    for role in ("q", "k"):
        a, b = fm(x, role), fm(y, role)
        assert torch.equal(a[:, [0, 2]], b[:, [0, 2]])
        if name != "hedgehog" or fm.feature_dim > 1:
            assert not torch.equal(a[:, 1], b[:, 1])


@pytest.mark.parametrize("name", [n for n in NAMES if n != "performer"])
def test_gradients_reach_every_parameter(name):
    fm = feature_maps.build(name, 8, 7, 2, generator=_gen())
    x = _x(2, 2, 6, 8)
    weights = _x(2, 2, 6, 7, seed=1)  # a plain sum would be constant for hedgehog's softmax
    ((fm(x, "q") * weights).sum() + (fm(x, "k") * weights).sum()).backward()
    params = list(fm.named_parameters())
    assert params
    for pname, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------- positive random features


@pytest.mark.parametrize("orthogonal", [False, True])
def test_untrained_prf_is_unbiased(orthogonal):
    d, m = 16, 1 << 16
    fm = feature_maps.build("prf", d, m, 1, stabilize=False, orthogonal=orthogonal, generator=_gen(3))
    x = _x(1, 1, 5, d, scale=0.6, seed=1)
    y = _x(1, 1, 5, d, scale=0.6, seed=2)
    # m * phi_m(x) phi_m(y): one independent (for iid z) sample of the kernel per feature
    samples = m * fm(x, "q")[0, 0] * fm(y, "k")[0, 0]  # [5, m]
    estimate = samples.double().mean(-1)
    stderr = samples.double().std(-1) / math.sqrt(m)
    exact = torch.exp((x[0, 0].double() * y[0, 0].double()).sum(-1) / math.sqrt(d))
    assert ((estimate - exact).abs() < 4 * stderr).all(), (estimate, exact, stderr)
    assert ((estimate - exact).abs() / exact < 0.05).all()


def test_orthogonal_blocks_are_orthogonal():
    d = 8
    z = feature_maps.build("prf", d, 20, 2, orthogonal=True, generator=_gen()).z.detach().double()
    for h in range(2):
        for block in (z[h, :d], z[h, d:2 * d], z[h, 2 * d:]):
            gram = block @ block.T
            assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-4)


def test_prf_forward_unstabilised_equals_formula_and_log_features():
    d, m = 8, 13
    fm = feature_maps.build("prf", d, m, 2, stabilize=False, generator=_gen())
    with torch.no_grad():
        fm.log_alpha.normal_(generator=_gen(5))
    x = _x(2, 2, 4, d)
    z, alpha = fm.z.detach(), fm.log_alpha.detach().exp()
    expected = torch.sqrt(alpha / m)[None, :, None, :] * torch.exp(
        torch.einsum("bhtd,hmd->bhtm", x, z) / d ** 0.25 - (x * x).sum(-1, keepdim=True) / (2 * math.sqrt(d)))
    assert torch.allclose(fm(x, "q"), expected, rtol=1e-5)
    assert torch.allclose(fm.log_features(x, "k").exp(), expected, rtol=1e-5)


def test_performer_matches_prf_with_the_same_projections():
    d, m = 8, 10
    perf = feature_maps.build("performer", d, m, 2, generator=_gen())
    prf = feature_maps.build("prf", d, m, 2)
    with torch.no_grad():
        prf.z.copy_(perf.w)
    x = _x(1, 2, 6, d)
    for role in ("q", "k"):
        assert torch.allclose(perf(x, role), prf(x, role))
        assert torch.allclose(perf.log_features(x, role), prf.log_features(x, role))


@pytest.mark.parametrize("name", ["prf", "performer"])
def test_stabilised_gives_the_same_normalized_attention(name):
    d = 16
    fm = feature_maps.build(name, d, 24, 2, generator=_gen())
    q, k = _x(2, 2, 9, d, seed=1), _x(2, 2, 9, d, seed=2)
    fm.stabilize = False
    exact = _attention(fm(q, "q"), fm(k, "k"))
    fm.stabilize = True
    phi_q, phi_k = fm(q, "q"), fm(k, "k")
    assert not torch.allclose(phi_q, fm.log_features(q, "q").exp())  # the shift is really applied
    assert torch.allclose(_attention(phi_q, phi_k), exact, rtol=1e-4, atol=1e-7)
    # the max log-feature is shifted to 0: per query row, per (sequence, head) for keys
    assert torch.allclose(phi_q.amax(-1), torch.ones(2, 2, 9))
    assert torch.allclose(phi_k.amax((-2, -1)), torch.ones(2, 2))


def test_stabilised_survives_where_unstabilised_underflows():
    d = 16
    fm = feature_maps.build("prf", d, 32, 1, generator=_gen())
    # norm 40: log-features about -200 +- 20, so exp underflows in fp32 unless shifted; the fixed norm keeps
    # the spread between tokens well inside fp32's range (one key shift per sequence cannot cover more)
    q, k = (40 * F.normalize(_x(1, 1, 7, d, seed=s), dim=-1) for s in (1, 2))
    fm.stabilize = False
    assert fm(q, "q").max() == 0 and fm(k, "k").max() == 0
    fm.stabilize = True
    attn = _attention(fm(q, "q"), fm(k, "k"))
    # reference in log space, fp64: A_ij = softmax_j( logsumexp_m(lq_im + lk_jm) ), causal
    lq, lk = fm.log_features(q, "q").double(), fm.log_features(k, "k").double()
    logits = torch.logsumexp(lq[..., :, None, :] + lk[..., None, :, :], dim=-1)
    logits = logits.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -math.inf)
    assert torch.isfinite(attn).all()
    assert torch.allclose(attn, logits.softmax(-1), rtol=1e-3, atol=1e-6)


def test_stabilised_gradients_match_unstabilised():
    d = 8
    q, k = _x(1, 2, 6, d, seed=1), _x(1, 2, 6, d, seed=2)
    grads = []
    for stabilize in (False, True):
        fm = feature_maps.build("prf", d, 12, 2, stabilize=stabilize, generator=_gen())
        _attention(fm(q, "q"), fm(k, "k")).square().sum().backward()
        grads.append((fm.z.grad, fm.log_alpha.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_performer_is_fixed_redraw_changes_and_is_seeded():
    fm = feature_maps.build("performer", 8, 12, 2, generator=_gen(1))
    assert list(fm.parameters()) == [] and "w" in fm.state_dict()
    x = _x(1, 2, 5, 8)
    before = fm(x, "q")
    assert torch.equal(before, feature_maps.build("performer", 8, 12, 2, generator=_gen(1))(x, "q"))
    fm.redraw(_gen(7))
    after = fm(x, "q")
    assert not torch.allclose(before, after)
    fm.redraw(_gen(7))
    assert torch.equal(fm(x, "q"), after)


# ---------------------------------------------------------------- projection maps


def test_hedgehog_identity_init():
    d = 8
    fm = feature_maps.build("hedgehog", d, 2 * d, 3)
    assert torch.equal(fm.weight.detach(), torch.eye(d).expand(3, d, d))
    x = _x(2, 3, 5, d)
    assert torch.allclose(fm(x, "q"), torch.softmax(torch.cat([x, -x], -1), -1))


@pytest.mark.parametrize("feature_dim", [1, 5, 9, 27])
def test_hedgehog_odd_and_wide_dims(feature_dim):
    d = 8
    fm = feature_maps.build("hedgehog", d, feature_dim, 2, generator=_gen())
    half = (feature_dim + 1) // 2
    assert fm.weight.shape == (2, d, half)
    n = min(d, half)
    assert torch.equal(fm.weight.detach()[:, :, :n], torch.eye(d, n).expand(2, d, n))
    if half > d:  # columns beyond the identity are random, not all equal
        assert not torch.allclose(fm.weight[:, :, d], fm.weight[:, :, d + 1])
    x = _x(2, 2, 5, d)
    h = torch.einsum("bhtd,hdf->bhtf", x, fm.weight.detach())
    expected = torch.softmax(torch.cat([h, -h], -1)[..., :feature_dim], -1)
    out = fm(x, "k")
    assert torch.allclose(out, expected)
    assert torch.allclose(out.sum(-1), torch.ones(2, 2, 5))


@pytest.mark.parametrize("name,act", [("elu1", lambda h: F.elu(h) + 1), ("relu", F.relu)])
def test_elu1_relu_identity_when_square_else_random(name, act):
    d = 8
    x = _x(2, 3, 5, d)
    square = feature_maps.build(name, d, d, 3)
    assert torch.equal(square.weight.detach(), torch.eye(d).expand(3, d, d))
    assert torch.allclose(square(x, "q"), act(x))
    wide = feature_maps.build(name, d, 11, 3, generator=_gen())
    assert wide.weight.shape == (3, d, 11)
    assert not torch.allclose(wide.weight[:, :, :d], torch.eye(d).expand(3, d, d))
    assert torch.allclose(wide(x, "k"), act(torch.einsum("bhtd,hdf->bhtf", x, wide.weight.detach())))


def test_calibrated_key_shift_is_one_constant_across_calls():
    torch.manual_seed(0)
    fm = feature_maps.build("prf", head_dim=8, feature_dim=6, num_heads=2)
    k = torch.randn(3, 2, 10, 8)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :4] = False
    assert not fm.key_shift_calibrated
    shift = fm.calibrate_key_shift(k, mask).clone()
    logf = fm.log_features(k, "k")
    torch.testing.assert_close(shift, logf[1:].amax(dim=(0, 2, 3)).maximum(logf[0, :, 4:].amax(dim=(1, 2))))
    # two separate calls (e.g. prefill, then one decode token) use the same scale as one call
    whole = fm(k, "k")
    parts = torch.cat([fm(k[:, :, :7], "k"), fm(k[:, :, 7:], "k")], dim=2)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(whole, (logf - shift[:, None, None]).exp())
    state = fm.state_dict()
    assert "key_shift" in state and torch.equal(state["key_shift"], shift)
