"""RSHTR: the homogenized step's identities, the hard case, P = I against an independent HSODM, the
rank-deficient superlinear tail, agreement of the HVP paths inside the iteration, and the Optimizer API."""
from __future__ import annotations

import math

import pytest
import torch

from fastattn.ops.subspace_hvp import GLM
from fastattn.rshtr import RSHTR, RSHTROptions, homogenized_step, lanczos_leftmost, minimize
from fastattn.rshtr.sketches import draw, subspace

from .test_subspace_hvp import glm_backends

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """LAPACK with 2 threads on a contended 2-core machine is 100x slower than with one (measured: eigh 401^2)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_instance(s, seed, indefinite=True):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(s, s, generator=g, dtype=F64))[0]
    ev = torch.randn(s, generator=g, dtype=F64) * 2 + (0 if indefinite else 3)
    return Q @ torch.diag(ev) @ Q.T, torch.randn(s, generator=g, dtype=F64)


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
@pytest.mark.parametrize("delta", [0.0, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_homogenized_step_identities(solver, delta, seed):
    s = 7 + 3 * seed
    Hs, gs = _random_instance(s, seed, indefinite=seed % 2 == 0)
    st = homogenized_step(gs, delta, 1e-3, Hs=Hs, solver=solver, seed=seed)
    assert not st.small_t
    d, theta = st.d, st.theta
    assert theta >= delta - 1e-12
    assert torch.allclose((Hs + theta * torch.eye(s, dtype=F64)) @ d, -gs, atol=1e-8)
    assert torch.linalg.eigvalsh(Hs + theta * torch.eye(s, dtype=F64)).min() >= -1e-8
    assert abs(torch.dot(gs, d).item() - (delta - theta)) < 1e-8
    assert torch.dot(gs, d).item() < 0
    model = torch.dot(gs, d) + 0.5 * d @ Hs @ d
    assert abs(model.item() - (-(theta - delta) / 2 - theta * d.dot(d).item() / 2)) < 1e-8
    # d solves the trust-region subproblem at radius |d|: no point of that norm has a lower model value
    for _ in range(20):
        u = torch.randn(s, dtype=F64)
        u = u / u.norm() * d.norm()
        assert (torch.dot(gs, u) + 0.5 * u @ Hs @ u).item() >= model.item() - 1e-9


def test_lanczos_matches_dense_and_matrix_free():
    Hs, gs = _random_instance(25, 9)
    dense = homogenized_step(gs, 0.0, 1e-3, Hs=Hs)
    lz = homogenized_step(gs, 0.0, 1e-3, Hs=Hs, solver="lanczos")
    mf = homogenized_step(gs, 0.0, 1e-3, hvp=lambda u: Hs @ u, solver="lanczos")
    for st in (lz, mf):
        assert abs(st.theta - dense.theta) < 1e-9 and torch.allclose(st.d, dense.d, atol=1e-7)
        assert abs(st.curvature - dense.curvature) < 1e-6
    lam, w, it = lanczos_leftmost(lambda v: torch.diag(torch.arange(1.0, 41.0, dtype=F64)) @ v, 40, 40, 1e-12,
                                  torch.ones(40, dtype=F64))
    assert abs(lam - 1.0) < 1e-10 and abs(abs(w[0].item()) - 1) < 1e-8 and it <= 40


def test_hard_case_takes_the_negative_curvature_branch():
    Hs = torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=F64))
    gs = torch.tensor([0.0, 1.0, 1.0], dtype=F64)          # orthogonal to the leftmost eigenvector e1
    for solver in ("dense", "lanczos"):
        st = homogenized_step(gs, 0.0, 1e-3, Hs=Hs, solver=solver)
        assert st.small_t and abs(st.t) < 1e-3 and abs(st.theta - 1.0) < 1e-9
        assert abs(abs(st.d[0].item()) - 1) < 1e-6 and st.curvature < 0


def _saddle(x):   # strict saddle at (0, 1); minima at (+-1, 1)
    return x[0] ** 4 / 4 - x[0] ** 2 / 2 + (x[1] - 1) ** 2


@pytest.mark.parametrize("solver", ["dense", "lanczos"])
def test_escapes_a_saddle_whose_gradient_has_no_escape_component(solver):
    r = minimize(_saddle, torch.tensor([0.0, 0.9], dtype=F64), 2, sketch="identity", eig_solver=solver,
                 gtol=1e-10, max_iter=100)
    assert r.converged and abs(abs(r.x[0].item()) - 1) < 1e-8 and abs(r.x[1].item() - 1) < 1e-8
    assert any(h.get("small_t") for h in r.history)


# ---- P = I against an independent HSODM on 2-D Rosenbrock -------------------------------------------------

def _rosen(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def _rosen_derivatives(x):
    a, b = x.tolist()
    g = torch.tensor([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)], dtype=F64)
    H = torch.tensor([[2 - 400 * (b - a * a) + 800 * a * a, -400 * a], [-400 * a, 200.0]], dtype=F64)
    return g, H


def _hsodm(x, iters, delta0, delta, nu=1e-3, c1=1e-4, beta=0.5):
    """Textbook HSODM with analytic derivatives and a backtracking line search on the model decrease."""
    xs, gns = [x.clone()], []
    for k in range(iters):
        g, H = _rosen_derivatives(x)
        gns.append(g.norm().item())
        if gns[-1] <= 1e-14:
            break
        F = torch.zeros(3, 3, dtype=F64)
        F[:2, :2], F[:2, 2], F[2, :2], F[2, 2] = H, g, g, -(delta0 if k == 0 else delta)
        w = torch.linalg.eigh(F)[1][:, 0]
        v, t = w[:2], w[2].item()
        d = v / t if abs(t) >= nu else -math.copysign(1.0, torch.dot(g, v).item()) * v
        slope, curv, f0, eta = torch.dot(g, d).item(), (d @ H @ d).item(), _rosen(x).item(), 1.0
        while True:
            pred = eta * slope + 0.5 * eta * eta * curv
            pred = pred if pred < 0 else eta * slope
            if _rosen(x + eta * d).item() - f0 <= c1 * pred:
                break
            eta *= beta
        x = x + eta * d
        xs.append(x.clone())
    return xs, gns


def test_identity_sketch_reproduces_hsodm_on_rosenbrock_with_a_quadratic_tail():
    x0 = torch.tensor([-1.2, 1.0], dtype=F64)
    r = minimize(_rosen, x0, 2, sketch="identity", gtol=1e-14, max_iter=100, delta0=1e-3, delta=0.0)
    xs, gns = _hsodm(x0, r.nit + 1, 1e-3, 0.0)
    assert r.converged and len(xs) >= r.nit + 1
    got = torch.stack([h_x for h_x in _iterates(_rosen, x0, r.nit)])
    assert (got - torch.stack(xs[: r.nit + 1])).abs().max().item() < 1e-10
    tail = [h["grad_norm"] for h in r.history if h["grad_norm"] > 0][-4:]
    for a, b in zip(tail, tail[1:]):       # quadratic: g_{k+1} <= C g_k^2
        assert b <= 50 * a * a, tail
    assert r.grad_norm < 1e-12 and r.history[-1]["grad_norm"] == r.grad_norm


def _iterates(fun, x0, nit):
    """The iterates x_0..x_nit of minimize (rerun with max_iter = k)."""
    return [minimize(fun, x0, 2, sketch="identity", gtol=0.0, max_iter=k, delta0=1e-3).x for k in range(nit + 1)]


# ---- rank-deficient GLM ---------------------------------------------------------------------------------------

def _rank_deficient_glm(m=30, n=300, seed=0, reg="none", lam=0.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=F64) / n ** 0.5
    y = torch.sigmoid(A @ torch.randn(n, generator=g, dtype=F64))        # realisable: f* = 0
    return GLM(A, y, "sigmoid_mse", reg, lam)


@pytest.mark.parametrize("s", [30, 45])
def test_rank_deficient_superlinear_tail_with_s_at_least_rank(s):
    glm = _rank_deficient_glm()
    r = minimize(glm, torch.zeros(300, dtype=F64), s, gtol=1e-10, max_iter=300, seed=1)
    assert r.converged and r.grad_norm <= 1e-10
    g = [h["grad_norm"] for h in r.history]
    ratios = [b / a for a, b in zip(g[-4:], g[-3:])]
    assert ratios[0] > ratios[1] > ratios[2] and ratios[-1] < 1e-3, g[-6:]   # superlinear: contraction -> 0


def test_same_seed_same_run_and_other_seed_differs():
    glm = _rank_deficient_glm(20, 80)
    a = minimize(glm, torch.zeros(80, dtype=F64), 10, max_iter=5, seed=3)
    b = minimize(glm, torch.zeros(80, dtype=F64), 10, max_iter=5, seed=3)
    c = minimize(glm, torch.zeros(80, dtype=F64), 10, max_iter=5, seed=4)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.n_grad == b.n_grad and a.n_hvp == 50


def test_every_hvp_path_gives_the_same_iterates():
    glm = _rank_deficient_glm(25, 60, reg="nonconvex", lam=0.05)
    x0 = torch.full((60,), 0.1, dtype=F64)
    torch_rng = {"sketch_source": "torch", "max_iter": 6, "gtol": 0.0}
    runs = {f"glm-{b}": minimize(glm, x0, 12, backend=b, **torch_rng) for b in glm_backends() if b != "triton"}
    runs["autodiff"] = minimize(lambda v: glm(v), x0, 12, hvp_chunk=5, **torch_rng)
    runs["matrix-free lanczos"] = minimize(glm, x0, 12, eig_solver="lanczos", matrix_free=True, **torch_rng)
    runs["hash sketch, fused"] = minimize(glm, x0, 12, max_iter=6, gtol=0.0, sketch_source="hash")
    runs["hash sketch, autodiff"] = minimize(lambda v: glm(v), x0, 12, max_iter=6, gtol=0.0, sketch_source="hash")
    ref = runs.pop("glm-torch")
    hash_ref = runs.pop("hash sketch, fused")
    for name, r in runs.items():
        target = hash_ref if "hash" in name else ref
        assert (r.x - target.x).abs().max().item() < 1e-8, name
    assert (hash_ref.x - ref.x).abs().max().item() > 1e-6      # the two sketch sources draw different P


@pytest.mark.parametrize("kind", ["coordinate", "identity", "rademacher", "orthonormal"])
def test_subspace_operators_equal_the_drawn_matrix(kind):
    n, s = 23, 23 if kind == "identity" else 7
    g = torch.Generator().manual_seed(0)
    v, u = torch.randn(n, generator=g, dtype=F64), torch.randn(s, generator=g, dtype=F64)
    P = draw(kind, s, n, 9, "jl")[0]
    op = subspace(kind, s, n, 9, "jl")
    assert torch.allclose(op.apply(v), P @ v, rtol=0, atol=1e-14), kind
    assert torch.allclose(op.adjoint(u), P.T @ u, rtol=0, atol=1e-14), kind


def test_coordinate_sketch_same_iterates_as_a_formed_P():
    """The gathered-column GLM path against autodiff on the formed P, inside the iteration."""
    glm = _rank_deficient_glm(25, 60, reg="nonconvex", lam=0.05)
    x0 = torch.full((60,), 0.1, dtype=F64)
    opts = {"sketch": "coordinate", "sketch_scale": "jl", "max_iter": 8, "gtol": 0.0}
    fused = minimize(glm, x0, 12, **opts)
    autodiff = minimize(lambda v: glm(v), x0, 12, **opts)
    assert (fused.x - autodiff.x).abs().max().item() < 1e-8
    assert fused.n_hvp == autodiff.n_hvp == 8 * 12 and fused.fun < glm(x0).item()


def test_triton_glm_path_inside_the_iteration():
    if "triton" not in glm_backends():
        pytest.skip("triton interpreter not available")
    glm = _rank_deficient_glm(20, 40).to(torch.float32)
    x0 = torch.zeros(40)
    a = minimize(glm, x0, 8, max_iter=3, backend="triton", gtol=0.0, sketch_source="hash")
    b = minimize(glm, x0, 8, max_iter=3, backend="torch", gtol=0.0, sketch_source="hash")
    assert (a.x - b.x).abs().max().item() < 1e-4


# ---- torch.optim API -----------------------------------------------------------------------------------------

def _mlp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 3, generator=g, dtype=F64)
    Y = torch.sin(X.sum(1, keepdim=True))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    return model, X, Y


def test_optimizer_on_a_module_decreases_the_loss_and_matches_minimize():
    model, X, Y = _mlp_problem()
    params = list(model.parameters())
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def closure():
        return torch.nn.functional.mse_loss(model(X), Y)

    opt = RSHTR(model.parameters(), subspace_dim=10, seed=5)
    l0 = closure().item()
    for _ in range(8):
        opt.step(closure)
    assert closure().item() < 0.5 * l0
    assert all(p.grad is not None for p in params)
    st = opt.state[params[0]]
    assert st["step"] == 8 and st["n_hvp"] == 80 and st["grad_norm"] > 0

    shapes = [p.shape for p in params]

    def flat_fun(x):
        out, off = {}, 0
        for (name, _), shp in zip(model.named_parameters(), shapes):
            out[name] = x[off:off + math.prod(shp)].view(shp)
            off += math.prod(shp)
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, out, (X,)), Y)

    r = minimize(flat_fun, flat0, 10, seed=5, max_iter=8, gtol=0.0)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    assert (flat - r.x).abs().max().item() < 1e-8


def test_optimizer_param_groups_determinism_and_state_dict():
    def run():
        model, X, Y = _mlp_problem(1)
        opt = RSHTR([{"params": model[0].parameters(), "subspace_dim": 6},
                     {"params": model[2].parameters(), "subspace_dim": 3, "eig_solver": "lanczos"}],
                    subspace_dim=4, seed=2)
        for _ in range(3):
            opt.step(lambda: torch.nn.functional.mse_loss(model(X), Y))
        return model, opt

    m1, o1 = run()
    m2, _ = run()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    sd = o1.state_dict()
    assert sd["param_groups"][0]["subspace_dim"] == 6 and sd["param_groups"][1]["eig_solver"] == "lanczos"
    assert o1.state[next(iter(m1[2].parameters()))]["n_hvp"] == 9
    model, X, Y = _mlp_problem(1)
    o3 = RSHTR([{"params": model[0].parameters()}, {"params": model[2].parameters()}], subspace_dim=4)
    o3.load_state_dict(sd)
    assert o3.param_groups[0]["subspace_dim"] == 6 and o3.state[next(iter(model[0].parameters()))]["step"] == 3
    with pytest.raises(ValueError, match="closure"):
        RSHTR(model.parameters(), 4).step(None)


def test_options_are_validated():
    with pytest.raises(ValueError, match="sketch"):
        RSHTROptions(sketch="sparse")
    with pytest.raises(ValueError, match="radius"):
        RSHTROptions(step="radius")
    with pytest.raises(ValueError, match="matrix_free"):
        RSHTROptions(matrix_free=True)
    with pytest.raises(TypeError, match="unknown RSHTR options"):
        minimize(_rosen, torch.zeros(2, dtype=F64), 2, learning_rate=1.0)
    with pytest.raises(ValueError, match="identity"):
        draw("identity", 3, 4, 0)


def test_radius_rule_and_cubic_line_search_converge():
    x0 = torch.tensor([-1.2, 1.0], dtype=F64)
    a = minimize(_rosen, x0, 2, sketch="identity", step="radius", radius=0.5, gtol=1e-9, max_iter=400)
    b = minimize(_rosen, x0, 2, sketch="identity", line_search="cubic", gtol=1e-9, max_iter=400)
    assert a.converged and b.converged and a.n_fun == 0 and b.n_fun > 0
    assert all(h["step_norm"] <= 0.5 + 1e-12 for h in a.history[1:])
