"""The RSHTR driver: problems, baselines in one harness, and `fastattn rshtr` writing its run directory."""
from __future__ import annotations

import json

import pytest
import torch

from fastattn.cli import main as cli_main
from fastattn.rshtr.baselines import METHODS, torchmin_available
from fastattn.rshtr.config import ExperimentConfig, make_config
from fastattn.rshtr.harness import aggregate, first_reaching, plan, smallest_hessian_eigenvalue
from fastattn.rshtr.problems import PROBLEMS, build


from .test_rshtr import one_thread  # noqa: F401,E402  (autouse fixture: one torch thread)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_problems_build_and_have_consistent_gradients(name):
    if name in ("breast_cancer_rf", "mlp_digits"):
        pytest.importorskip("sklearn")
    p = build(name, "smoke")
    x = p.x0 + 0.01
    with torch.enable_grad():
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(p.fun(xx), xx)
    v = torch.randn_like(x)
    h = 1e-6
    fd = (float(p.fun(x + h * v)) - float(p.fun(x - h * v))) / (2 * h)
    assert abs(fd - g.dot(v).item()) <= 1e-5 * max(1.0, abs(fd))


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("newton_cg", "trust_ncg", "trust_krylov")])
def test_every_method_reports_a_consistent_history(method):
    p = build("glm_rankdef", "smoke")
    r = METHODS[method](p, 20, 0, 1e-8, 8, 10.0)
    h = r.history
    assert h[0]["k"] == 0 and h[-1]["k"] == r.nit and abs(h[-1]["grad_norm"] - r.grad_norm) < 1e-12
    assert all(a["time"] <= b["time"] and a["n_grad"] <= b["n_grad"] for a, b in zip(h, h[1:]))
    assert h[-1]["f"] <= h[0]["f"] + 1e-12                                 # every method is a descent method
    assert r.method == method


def test_torchmin_baselines_when_installed():
    if not torchmin_available():
        pytest.skip("pytorch-minimize is not installed")
    p = build("glm_rankdef", "smoke")
    for m in ("newton_cg", "trust_ncg"):
        r = METHODS[m](p, 0, 0, 1e-8, 30, 10.0)
        assert r.history[-1]["f"] < r.history[0]["f"] and r.n_hvp == -1


def test_saddle_rshtr_escapes_where_gradient_methods_stall():
    p = build("saddle", "smoke")
    rs = METHODS["rshtr"](p, 20, 0, 1e-8, 200, 20.0)
    gd = METHODS["gd"](p, 20, 0, 1e-8, 200, 20.0)
    assert rs.fun < p.f_star + 1e-8 and smallest_hessian_eigenvalue(p, rs.x) > 0
    assert gd.fun > p.f_star + 0.5 and smallest_hessian_eigenvalue(p, gd.x) < 0


def test_plan_aggregate_and_threshold_helpers():
    cfg = ExperimentConfig(problems=("glm_rankdef", "saddle"), methods=("rshtr", "gd"), subspace_dims=(5, 7),
                           seeds=(0, 1), dims_by_problem="saddle:3")
    runs = plan(cfg)
    assert ("glm_rankdef", "rshtr", 7, 1) in runs and ("saddle", "rshtr", 3, 0) in runs
    assert ("glm_rankdef", "gd", None, 0) in runs and len(runs) == 4 + 1 + 2 + 1
    assert first_reaching([{"grad_norm": 1.0, "k": 0}, {"grad_norm": 1e-7, "k": 1}], "k", 1e-6) == 1
    rows = aggregate([{"problem": "p", "method": "m", "s": 1, "converged": True, "time_to_1e-06": t, "grad_norm": 0,
                       "time": t, "nit": 3, "min_eig": 0.0, "f_minus_fstar": 0.0, "iters_to_1e-06": 2,
                       "calls_to_1e-06": 9} for t in (1.0, 3.0, 2.0)])
    assert rows[0]["time_to_1e-06"] == 2.0 and rows[0]["time_to_1e-06_range"] == (1.0, 3.0)
    with pytest.raises(ValueError, match="unknown method"):
        plan(ExperimentConfig(methods=("adam",)))
    with pytest.raises(ValueError, match="dims_by_problem"):
        ExperimentConfig(dims_by_problem="saddle")
    assert make_config("cpu_more").subspace_dims_by_problem["breast_cancer_rf"] == (600,)


def test_cli_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["rshtr", "--preset", "smoke", "--out", str(out), "--problems", "glm_rankdef,saddle",
                     "--methods", "rshtr,gd", "--max-iter", "5", "--seeds", "0,1"]) == 0
    for name in ("report.md", "metrics.json", "config.json", "command.txt", "glm_rankdef.png", "saddle.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["runs"]) == 2 * (2 + 1) and metrics["config"]["max_iter"] == 5
    assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1]
    report = (out / "report.md").read_text()
    assert "## glm_rankdef" in report and "| rshtr | 20 |" in report and "![saddle](saddle.png)" in report
    command = (out / "command.txt").read_text()
    assert command.startswith("fastattn rshtr --preset smoke") and "--methods rshtr,gd" in command
