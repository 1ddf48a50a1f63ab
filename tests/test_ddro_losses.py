"""fastattn.ddro losses: hand-computed fp64 values, autograd against closed-form gradients, guards, numerics,
reductions, "auto" mu/alpha and input validation."""
import math

import pytest
import torch

from fastattn.ddro import bco_loss, ddro_loss, dpo_loss, kto_loss, rdro_loss

F64 = torch.float64
# The DDRO.md worked example: mu = 1/2, l = [0, -0.5] preferred, [0.5, -1] unpreferred.
L_EX = [0.0, -0.5, 0.5, -1.0]
LAB_EX = [True, True, False, False]
ROWS_EX = [0.693147, 1.193147, 1.739322, 0.203267]


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def lab(values):
    return torch.tensor(values, dtype=torch.bool)


def softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def grad_rows(fn, l, labels, **kw):
    """Per-row d loss_row / d l via autograd, with ref = 0 so l = policy."""
    x = l.clone().requires_grad_(True)
    rows, metrics = fn(x, torch.zeros_like(l), labels, reduction="none", **kw)
    (g,) = torch.autograd.grad(rows.sum(), x)
    return rows.detach(), g, metrics


# ------------------------------------------------------------------------------------------------- values (fp64)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_ddro_worked_example(dtype):
    rows, m = ddro_loss(t(L_EX, dtype), torch.zeros(4, dtype=dtype), lab(LAB_EX), mu=0.5, reduction="none")
    torch.testing.assert_close(rows, t(ROWS_EX, rows.dtype), atol=1e-6, rtol=0)
    loss, _ = ddro_loss(t(L_EX, dtype), torch.zeros(4, dtype=dtype), lab(LAB_EX), mu=0.5)
    expected = 0.5 * (ROWS_EX[0] + ROWS_EX[1]) / 2 + 0.5 * (ROWS_EX[2] + ROWS_EX[3]) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["max_mu_r_unpref"] == pytest.approx(0.5 * math.exp(0.5), rel=1e-6)
    assert m["l_mean_pref"] == pytest.approx(-0.25) and m["l_mean_unpref"] == pytest.approx(-0.25)
    assert (m["n_pref"], m["n_unpref"], m["frac_guarded"]) == (2, 2, 0)
    assert all(type(v) is float for v in m.values())


def test_ddro_values_with_ref_and_mu():
    policy, ref = t([-3.0, -7.25, -4.0, -2.5]), t([-2.0, -7.0, -4.5, -1.0])
    mu = 0.3
    l = [p - r for p, r in zip(policy.tolist(), ref.tolist())]
    expected = [-math.log(mu) - l[0], -math.log(mu) - l[1], -math.log(1 - mu * math.exp(l[2])),
                -math.log(1 - mu * math.exp(l[3]))]
    rows, _ = ddro_loss(policy, ref, lab([True, True, False, False]), mu=mu, reduction="none")
    torch.testing.assert_close(rows, t(expected), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_rdro_values(alpha):
    rows, _ = rdro_loss(t(L_EX), torch.zeros(4, dtype=F64), lab(LAB_EX), alpha=alpha, reduction="none")
    expected = [(1 + alpha) * softplus(v) - v if y else (1 - alpha) * softplus(v) for v, y in zip(L_EX, LAB_EX)]
    torch.testing.assert_close(rows, t(expected), atol=1e-12, rtol=1e-12)
    loss, _ = rdro_loss(t(L_EX), torch.zeros(4, dtype=F64), lab(LAB_EX), alpha=alpha)
    assert loss.item() == pytest.approx(0.25 * sum(expected), rel=1e-12)   # 1/2 * mean of 2 + 1/2 * mean of 2
    if alpha == 0.5:   # literal check of the formula, independent of the helpers above
        assert rows[0].item() == pytest.approx(1.5 * math.log(2), rel=1e-12)


def test_dpo_values():
    cp, rp, cr, rr = t([-5.0, -3.0, -10.0]), t([-6.0, -2.0, -9.0]), t([-5.5, -3.5, -9.5]), t([-5.0, -2.5, -9.5])
    beta = 0.5
    margins = [(a - c) - (b - d) for a, b, c, d in zip(cp.tolist(), rp.tolist(), cr.tolist(), rr.tolist())]
    assert margins == [1.5, 0.0, -1.0]
    loss, m = dpo_loss(cp, rp, cr, rr, beta=beta)
    expected = sum(math.log1p(math.exp(-beta * x)) for x in margins) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["reward_chosen"] == pytest.approx(beta * (0.5 + 0.5 - 0.5) / 3)
    assert m["grad_weight"] == pytest.approx(sum(-beta * sigmoid(-beta * x) for x in margins) / 3)


def test_kto_values_default_and_given_reference_point():
    l, y = [2.0, -1.0, 1.0, 0.5], [True, True, False, False]
    beta, wd, wu = 0.5, 1.0, 1.5
    z0 = max(0.0, sum(l) / 4)   # 0.625

    def expected(z):
        return sum(wd * (1 - sigmoid(beta * (v - z))) if c else wu * (1 - sigmoid(beta * (z - v)))
                   for v, c in zip(l, y)) / 4

    loss, m = kto_loss(t(l), torch.zeros(4, dtype=F64), lab(y), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert m["kl"] == pytest.approx(z0)
    assert loss.item() == pytest.approx(expected(z0), rel=1e-12)
    loss, m = kto_loss(t(l), torch.zeros(4, dtype=F64), lab(y), beta=beta, desirable_weight=wd, undesirable_weight=wu,
                       kl=0.3)
    assert m["kl"] == 0.3 and loss.item() == pytest.approx(expected(0.3), rel=1e-12)
    # The default estimate is clamped at 0 and is a constant for autograd.
    neg = -t(l)
    _, m = kto_loss(neg, torch.zeros(4, dtype=F64), lab(y))
    assert m["kl"] == 0.0


def test_bco_values_default_and_given_delta():
    l, y = [2.0, -1.0, 1.0, 0.5, -3.5], [True, True, False, False, False]
    beta = 0.5
    delta = (beta * (2.0 - 1.0) / 2 + beta * (1.0 + 0.5 - 3.5) / 3) / 2   # class-balanced mean reward = -0.0833

    def expected(d):
        return sum(math.log1p(math.exp(-(beta * v - d))) if c else math.log1p(math.exp(beta * v - d))
                   for v, c in zip(l, y)) / 5

    loss, m = bco_loss(t(l), torch.zeros(5, dtype=F64), lab(y), beta=beta)
    assert m["delta"] == pytest.approx(delta)
    assert loss.item() == pytest.approx(expected(delta), rel=1e-12)
    assert m["accuracy"] == pytest.approx(0.4)   # rows 0 (z > 0, preferred) and 4 (z < 0, unpreferred)
    loss, m = bco_loss(t(l), torch.zeros(5, dtype=F64), lab(y), beta=beta, delta=torch.tensor(0.1))
    assert m["delta"] == pytest.approx(0.1) and loss.item() == pytest.approx(expected(0.1), rel=1e-7)


# ------------------------------------------------------------------------------------------------------ gradients
L_GRAD = t([-2.0, 0.1, 0.6, -3.0, 0.3, -0.2, 0.68])
LAB_GRAD = lab([True, True, True, False, False, False, False])


@pytest.mark.parametrize("mu", [0.5, 0.3])
@pytest.mark.parametrize("guard", ["tangent", "clamp", "none"])
def test_ddro_gradients_match_closed_form(mu, guard):
    keep = L_GRAD < math.log((1 - 1e-3) / mu)   # the barrier region, where all guards agree
    l, y = L_GRAD[keep], LAB_GRAD[keep]
    _, g, m = grad_rows(ddro_loss, l, y, mu=mu, guard=guard)
    r = l.exp()
    expected = torch.where(y, -1.0, mu * r / (1 - mu * r))
    torch.testing.assert_close(g, expected, atol=1e-12, rtol=1e-10)
    assert m["grad_weight_pref"] == pytest.approx(-1.0)
    assert m["grad_weight_unpref"] == pytest.approx(expected[~y].mean().item(), rel=1e-10)


@pytest.mark.parametrize("alpha", [0.5, 0.1])
def test_rdro_gradients_match_closed_form(alpha):
    l = torch.cat([L_GRAD, t([40.0, -40.0, 60.0])])
    y = torch.cat([LAB_GRAD, lab([True, False, False])])
    _, g, m = grad_rows(rdro_loss, l, y, alpha=alpha)
    s = torch.sigmoid(l)
    expected = torch.where(y, (1 + alpha) * s - 1, (1 - alpha) * s)
    torch.testing.assert_close(g, expected, atol=1e-12, rtol=1e-10)
    assert m["grad_weight_pref"] == pytest.approx(expected[y].mean().item(), rel=1e-10)
    assert m["grad_weight_unpref"] == pytest.approx(expected[~y].mean().item(), rel=1e-10)


def test_dpo_gradients_match_closed_form():
    beta = 0.3
    xs = [t([-5.0, -3.0, -10.0, -1.0]), t([-6.0, -2.0, -9.0, -8.0]), t([-5.5, -3.5, -9.0, -1.5]),
          t([-5.0, -2.5, -9.5, -2.0])]
    xs = [x.requires_grad_(True) for x in xs]
    loss, _ = dpo_loss(*xs, beta=beta)
    grads = torch.autograd.grad(loss, xs)
    margin = (xs[0] - xs[2]) - (xs[1] - xs[3])
    w = (-beta * torch.sigmoid(-beta * margin) / 4).detach()   # d mean / d margin
    for g, sign in zip(grads, [1, -1, -1, 1]):
        torch.testing.assert_close(g, sign * w, atol=1e-14, rtol=1e-12)


def test_kto_gradients_match_closed_form():
    beta, wd, wu, z0 = 0.7, 1.2, 0.8, 0.25
    x = L_GRAD.clone().requires_grad_(True)
    loss, m = kto_loss(x, torch.zeros_like(x), LAB_GRAD, beta=beta, desirable_weight=wd, undesirable_weight=wu, kl=z0)
    (g,) = torch.autograd.grad(loss, x)
    sp, sn = torch.sigmoid(beta * (L_GRAD - z0)), torch.sigmoid(beta * (z0 - L_GRAD))
    per_row = torch.where(LAB_GRAD, -wd * beta * sp * (1 - sp), wu * beta * sn * (1 - sn))
    torch.testing.assert_close(g, per_row / len(L_GRAD), atol=1e-14, rtol=1e-12)
    assert m["grad_weight_unpref"] == pytest.approx(per_row[~LAB_GRAD].mean().item(), rel=1e-10)
    # The default reference point is detached: the gradient is the same closed form at z0 = max(0, mean l).
    shifted = L_GRAD + 1.0   # mean l > 0, so the clamp is inactive and z0 depends on l
    x = shifted.clone().requires_grad_(True)
    loss, m = kto_loss(x, torch.zeros_like(x), LAB_GRAD, beta=beta)
    (g,) = torch.autograd.grad(loss, x)
    z0 = shifted.mean().item()
    assert z0 > 0 and m["kl"] == pytest.approx(z0)
    sp, sn = torch.sigmoid(beta * (shifted - z0)), torch.sigmoid(beta * (z0 - shifted))
    per_row = torch.where(LAB_GRAD, -beta * sp * (1 - sp), beta * sn * (1 - sn))
    torch.testing.assert_close(g, per_row / len(L_GRAD), atol=1e-14, rtol=1e-12)


def test_bco_gradients_match_closed_form():
    beta = 0.4
    x = L_GRAD.clone().requires_grad_(True)
    loss, m = bco_loss(x, torch.zeros_like(x), LAB_GRAD, beta=beta)   # default delta is detached
    (g,) = torch.autograd.grad(loss, x)
    z = beta * L_GRAD - m["delta"]
    per_row = torch.where(LAB_GRAD, -beta * torch.sigmoid(-z), beta * torch.sigmoid(z))
    torch.testing.assert_close(g, per_row / len(L_GRAD), atol=1e-14, rtol=1e-10)
    assert m["grad_weight_pref"] == pytest.approx(per_row[LAB_GRAD].mean().item(), rel=1e-10)


# --------------------------------------------------------------------------------------------------------- guards
def _unpref(l_values, mu=0.5, guard="tangent", eps=1e-3):
    l = t(l_values)
    return grad_rows(ddro_loss, l, torch.zeros(len(l_values), dtype=torch.bool), mu=mu, guard=guard, eps=eps)


@pytest.mark.parametrize("mu,eps", [(0.5, 1e-3), (0.2, 1e-2)])
def test_tangent_guard_is_c1_at_l0_and_linear_past_it(mu, eps):
    l0 = math.log((1 - eps) / mu)
    slope = (1 - eps) / eps
    rows, g, m = _unpref([l0 - 1e-7, l0, l0 + 1e-7, l0 + 1.0, l0 + 2.0, l0 + 5.0], mu=mu, eps=eps)
    assert rows[1].item() == pytest.approx(-math.log(eps), rel=1e-9)
    assert torch.allclose(g, torch.full_like(g, slope), rtol=1e-4)   # slope continuous across l0
    # Value continuous and the one-sided difference quotients agree with the slope (C1).
    assert (rows[1] - rows[0]).item() / 1e-7 == pytest.approx(slope, rel=1e-3)
    assert (rows[2] - rows[1]).item() / 1e-7 == pytest.approx(slope, rel=1e-6)
    # Exactly linear past l0.
    past = rows[3:] - rows[1]
    torch.testing.assert_close(past, slope * t([1.0, 2.0, 5.0]), rtol=1e-12, atol=0)
    assert m["frac_guarded"] == pytest.approx(4 / 6)
    assert m["grad_weight_unpref"] == pytest.approx(g.mean().item(), rel=1e-9)


def test_clamp_guard_is_flat_past_l0():
    eps, mu = 1e-3, 0.5
    l0 = math.log((1 - eps) / mu)
    rows, g, m = _unpref([l0 - 0.01, l0 + 1e-6, l0 + 1.0, 1e4], mu=mu, guard="clamp", eps=eps)
    torch.testing.assert_close(rows[1:], torch.full((3,), -math.log(eps), dtype=F64), rtol=1e-9, atol=0)
    assert torch.equal(g[1:], torch.zeros(3, dtype=F64))
    r = math.exp(l0 - 0.01)
    assert g[0].item() == pytest.approx(mu * r / (1 - mu * r), rel=1e-10)
    assert m["frac_guarded"] == pytest.approx(0.75)


def test_none_guard_is_inf_at_and_nan_past_the_barrier():
    mu = 0.5
    rows, g, m = _unpref([math.log(1 / mu), 1.0, 3.0, 0.0], mu=mu, guard="none")
    assert math.isinf(rows[0].item()) and rows[0].item() > 0   # mu r = 1 exactly
    assert torch.isnan(rows[1:3]).all()
    assert not torch.isfinite(g[:3]).all()
    assert rows[3].item() == pytest.approx(math.log(2), rel=1e-12)   # below the barrier it is the plain loss
    assert m["frac_guarded"] == pytest.approx(0.75)   # rows past l0 are counted even though none are guarded
    loss, _ = ddro_loss(t([1.0]), t([0.0]), lab([False]), mu=mu, guard="none")
    assert torch.isnan(loss)
    # frac_guarded is over unpreferred rows only (a preferred row past l0 is not counted).
    _, m = ddro_loss(t([5.0, 5.0, -1.0]), t([0.0] * 3), lab([True, False, False]), mu=mu)
    assert m["frac_guarded"] == 0.5


# ------------------------------------------------------------------------------------------------------ numerics
def test_extreme_l_is_finite_for_every_loss():
    l = t([-1e4, -1e4, 1e4, -1e4, 1e4])
    y = lab([True, False, True, False, False])
    for fn, kw in [(ddro_loss, {"guard": "tangent"}), (ddro_loss, {"guard": "clamp"}), (rdro_loss, {}),
                   (kto_loss, {}), (bco_loss, {})]:
        x = l.clone().requires_grad_(True)
        loss, m = fn(x, torch.zeros_like(x), y, **kw)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), (fn.__name__, kw)
    x = l[:2].clone().requires_grad_(True)
    loss, _ = dpo_loss(x, x.flip(0), torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64))
    assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, x)[0]).all()


def test_ddro_extreme_values_are_exact():
    rows, g, _ = grad_rows(ddro_loss, t([-1e4, -1e4]), lab([True, False]), mu=0.5)
    assert rows.tolist() == [1e4 + math.log(2), 0.0] and g.tolist() == [-1.0, 0.0]
    rdro_rows, rg, _ = grad_rows(rdro_loss, t([-1e4, -1e4]), lab([True, False]), alpha=0.5)
    assert rdro_rows.tolist() == [1e4, 0.0] and rg.tolist() == [-1.0, 0.0]


def test_ddro_unpreferred_is_accurate_far_from_and_near_the_barrier():
    mu, eps = 0.5, 1e-3
    l0 = math.log((1 - eps) / mu)
    # Far below: the loss is ~ mu r = 1e-13, where a naive -log(1 - mu r) loses about 3 digits.
    rows, _, _ = _unpref([-30.0], mu=mu)
    assert rows.item() == pytest.approx(-math.log1p(-mu * math.exp(-30.0)), rel=1e-14, abs=0)
    # Just inside the guard: finite, unguarded, value ~ -log(eps), slope ~ (1 - eps) / eps.
    rows, g, m = _unpref([l0 - 1e-9], mu=mu, eps=eps)
    expected = -math.log(-math.expm1(math.log(mu) + l0 - 1e-9))
    assert rows.item() == pytest.approx(expected, rel=1e-9)
    assert rows.item() == pytest.approx(-math.log(eps), abs=2e-6)
    assert g.item() == pytest.approx((1 - eps) / eps, rel=1e-5)
    assert m["frac_guarded"] == 0.0
    # Close to the barrier with a tiny eps (guard none): expm1 keeps the digits of 1 - mu r = 1e-10.
    l = math.log1p(-1e-10) - math.log(mu)
    rows, g, m = _unpref([l], mu=mu, guard="none", eps=1e-12)
    one_minus_mu_r = -math.expm1(l + math.log(mu))   # ~1e-10, exact given l
    assert rows.item() == pytest.approx(-math.log(one_minus_mu_r), rel=1e-12, abs=0)
    assert g.item() == pytest.approx((1 - one_minus_mu_r) / one_minus_mu_r, rel=1e-9, abs=0)
    assert m["grad_weight_unpref"] == pytest.approx(g.item(), rel=1e-9, abs=0)
    assert m["max_mu_r_unpref"] == pytest.approx(1 - one_minus_mu_r, rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_compute_in_fp32(dtype):
    policy = t(L_EX, dtype).requires_grad_(True)
    for fn in (ddro_loss, rdro_loss, kto_loss, bco_loss):
        loss, _ = fn(policy, torch.zeros(4, dtype=dtype), lab(LAB_EX))
        assert loss.dtype == torch.float32
        (g,) = torch.autograd.grad(loss, policy)
        assert g.dtype == dtype
    loss, _ = ddro_loss(t(L_EX, torch.float32), t([0.0] * 4, torch.float32), lab(LAB_EX))
    assert loss.dtype == torch.float32
    loss, _ = ddro_loss(t(L_EX, torch.float32), t([0.0] * 4, F64), lab(LAB_EX))
    assert loss.dtype == F64


# ---------------------------------------------------------------------------------------------------- reductions
def test_reductions_balanced_pooled_none():
    l, y = t([-1.0, 0.2, -0.3, 0.1, -2.0]), lab([True, False, False, False, True])
    z = torch.zeros(5, dtype=F64)
    rows, _ = ddro_loss(l, z, y, mu=0.3, reduction="none")
    assert rows.shape == (5,)
    balanced, _ = ddro_loss(l, z, y, mu=0.3)
    assert balanced.item() == pytest.approx(0.3 * rows[y].mean().item() + 0.7 * rows[~y].mean().item(), rel=1e-12)
    assert balanced.item() != pytest.approx(rows.mean().item(), rel=1e-3)   # weights are not the row fractions
    pooled, _ = ddro_loss(l, z, y, mu=0.3, reduction="pooled")
    assert pooled.item() == pytest.approx(rows.mean().item(), rel=1e-12)
    rows, _ = rdro_loss(l, z, y, alpha=0.3, reduction="none")
    balanced, _ = rdro_loss(l, z, y, alpha=0.3)
    assert balanced.item() == pytest.approx(0.5 * rows[y].mean().item() + 0.5 * rows[~y].mean().item(), rel=1e-12)
    pooled, _ = rdro_loss(l, z, y, alpha=0.3, reduction="pooled")
    assert pooled.item() == pytest.approx(rows.mean().item(), rel=1e-12)


@pytest.mark.parametrize("fn,w", [(ddro_loss, 0.4), (rdro_loss, 0.5)])
@pytest.mark.parametrize("present", [True, False])
def test_balanced_reduction_with_an_absent_class(fn, w, present):
    kw = {"mu": 0.4} if fn is ddro_loss else {"alpha": 0.4}
    l = t([-1.0, -0.5, 0.3]).requires_grad_(True)
    y = torch.full((3,), present, dtype=torch.bool)
    rows, _ = fn(l, torch.zeros(3, dtype=F64), y, reduction="none", **kw)
    loss, m = fn(l, torch.zeros(3, dtype=F64), y, **kw)
    weight = w if present else 1 - w
    assert loss.item() == pytest.approx(weight * rows.mean().item(), rel=1e-12)
    assert torch.isfinite(torch.autograd.grad(loss, l)[0]).all()
    absent = "unpref" if present else "pref"
    assert m[f"n_{absent}"] == 0 and math.isnan(m[f"l_mean_{absent}"]) and math.isnan(m[f"grad_weight_{absent}"])


def test_auto_mu_and_alpha():
    l, y = t([-1.0, 0.2, -0.3, 0.1]), lab([True, False, False, False])
    z = torch.zeros(4, dtype=F64)
    loss, m = ddro_loss(l, z, y, mu="auto")
    assert m["mu"] == 0.25
    assert loss.item() == pytest.approx(ddro_loss(l, z, y, mu=0.25)[0].item(), rel=1e-14)
    assert loss.item() == pytest.approx(ddro_loss(l, z, y, mu=0.25, reduction="pooled")[0].item(), rel=1e-12)
    loss, m = rdro_loss(l, z, y, alpha="auto")
    assert m["alpha"] == 0.25
    assert loss.item() == pytest.approx(rdro_loss(l, z, y, alpha=0.25)[0].item(), rel=1e-14)
    for fn, name in [(ddro_loss, "mu"), (rdro_loss, "alpha")]:
        with pytest.raises(ValueError, match="both classes"):
            fn(l, z, torch.ones(4, dtype=torch.bool), **{name: "auto"})


# -------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [ddro_loss, rdro_loss, kto_loss, bco_loss])
def test_unpaired_input_errors(fn):
    p, y = t([0.0, -1.0]), lab([True, False])
    with pytest.raises(ValueError, match="shapes differ"):
        fn(p, t([0.0, 0.0, 0.0]), y)
    with pytest.raises(ValueError, match="1-D"):
        fn(p[None], p[None], y[None])
    with pytest.raises(ValueError, match="bool"):
        fn(p, p, y.float())
    with pytest.raises(ValueError, match="labels shape"):
        fn(p, p, lab([True]))
    with pytest.raises(ValueError, match="floating-point"):
        fn(p.long(), p.long(), y)
    with pytest.raises(ValueError, match="empty"):
        fn(t([]), t([]), lab([]))
    with pytest.raises(ValueError, match="torch.Tensor"):
        fn([0.0, -1.0], p, y)


@pytest.mark.parametrize("kw", [{"mu": 0.0}, {"mu": 1.0}, {"mu": -0.5}, {"mu": float("nan")}, {"mu": True},
                                {"mu": "half"}, {"reduction": "mean"}, {"guard": "soft"}, {"eps": 0.0},
                                {"eps": 1.0}])
def test_ddro_argument_errors(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        ddro_loss(t([0.0, -1.0]), t([0.0, 0.0]), lab([True, False]), **kw)


@pytest.mark.parametrize("kw", [{"alpha": 0.0}, {"alpha": 1.0}, {"alpha": "x"}, {"reduction": "sum"}])
def test_rdro_argument_errors(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        rdro_loss(t([0.0, -1.0]), t([0.0, 0.0]), lab([True, False]), **kw)


def test_baseline_argument_errors():
    p, y = t([0.0, -1.0]), lab([True, False])
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(p, p, p, p, beta=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        dpo_loss(p, p, p, t([0.0]))
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto_loss(p, p, y, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="kl"):
        kto_loss(p, p, y, kl=t([0.1, 0.2]))
    with pytest.raises(ValueError, match="beta"):
        bco_loss(p, p, y, beta=float("inf"))
    with pytest.raises(ValueError, match="delta"):
        bco_loss(p, p, y, delta="running")
