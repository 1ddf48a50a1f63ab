"""Options of the RSHTR iteration (every constant of the algorithm) and of the experiment driver."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

SKETCH_KINDS = ("gaussian", "rademacher", "orthonormal", "coordinate", "identity")
SKETCH_SOURCES = ("torch", "hash")
STEP_RULES = ("linesearch", "radius")
LINE_SEARCHES = ("armijo", "cubic")
EIG_SOLVERS = ("dense", "lanczos")


@dataclass
class RSHTROptions:
    """Constants of one RSHTR run (arXiv 2406.14337, reconstructed; see shared/design/RSHTR.md).

    Sketch: P [s, n] drawn fresh each iteration; ``sketch`` kind, ``sketch_scale`` "unit" (P P^T ~ I: entries
    N(0, 1/n)), "jl" (entries N(0, 1/s)) or a number; ``sketch_source`` "hash" (the counter hash of
    fastattn.ops.subspace_hvp.sketch, materialised by the C++/CUDA ``sketch_fill_`` kernel, the same P on every
    device) or "torch" (a seeded torch RNG). P is materialised once per iteration (gs, P^T d and the kernels use it). "identity" is P = I
    (s = n): full-space HSODM.
    Homogenized step: F = [[Hs, gs], [gs^T, -delta]]; ``delta0`` on the first iteration, ``delta`` after; the
    leftmost eigenpair (-theta, (v, t)) by ``eig_solver`` "dense" (fp64 eigh) or "lanczos" (``lanczos_iters``
    steps, full reorthogonalisation, stop at residual <= ``lanczos_tol``); d = v / t when |t| >= ``nu``, else the
    negative-curvature direction -sign(gs.v) v. ``matrix_free``: Lanczos on F with one HVP per step instead of
    forming Hs (needs eig_solver="lanczos").
    Step length on D = P^T d (full-space units): ``step`` "radius" takes eta = min(1, radius / |D|); "linesearch"
    starts there (radius None: eta = 1) and backtracks (``line_search`` "armijo": times ``ls_beta``; "cubic":
    safeguarded quadratic/cubic interpolation in [``ls_low``, ``ls_high``] x eta) until
    f(x + eta D) - f(x) <= ``ls_c1`` * pred(eta), pred the quadratic model decrease (it covers the zero-slope
    negative-curvature case) + ``ls_noise`` * eps * |f(x)| (rounding of f), at most ``ls_max_iter`` times; a
    failed search takes no step.
    Stop when |grad f| <= ``gtol``, after ``max_iter`` iterations or ``max_time`` seconds.
    """
    sketch: str = "gaussian"
    sketch_scale: str | float = "unit"
    sketch_source: str = "hash"
    delta0: float = 1e-3
    delta: float = 0.0
    nu: float = 1e-3
    eig_solver: str = "dense"
    lanczos_iters: int | None = None     # None: s + 1 (exact in exact arithmetic)
    lanczos_tol: float = 1e-12
    matrix_free: bool = False
    step: str = "linesearch"
    radius: float | None = None
    line_search: str = "armijo"
    ls_c1: float = 1e-4
    ls_beta: float = 0.5
    ls_low: float = 0.1
    ls_high: float = 0.5
    ls_max_iter: int = 30
    ls_noise: float = 4.0                 # f(x + eta D) may exceed the allowance by ls_noise * eps(dtype) * |f(x)|
    gtol: float = 1e-6
    max_iter: int = 1000
    max_time: float | None = None
    seed: int = 0
    hvp_chunk: int | None = None          # rows of P per vmapped HVP batch (general functions)
    backend: str = "auto"                 # backend of the fused GLM op
    record_history: bool = True

    def __post_init__(self):
        _choice("sketch", self.sketch, SKETCH_KINDS)
        _choice("sketch_source", self.sketch_source, SKETCH_SOURCES)
        _choice("eig_solver", self.eig_solver, EIG_SOLVERS)
        _choice("step", self.step, STEP_RULES)
        _choice("line_search", self.line_search, LINE_SEARCHES)
        if not (isinstance(self.sketch_scale, (int, float)) or self.sketch_scale in ("unit", "jl")):
            raise ValueError(f"sketch_scale must be 'unit', 'jl' or a number, got {self.sketch_scale!r}")
        for name in ("delta0", "delta", "nu", "gtol", "lanczos_tol", "ls_noise"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not 0 < self.ls_c1 < 1 or not 0 < self.ls_beta < 1 or not 0 < self.ls_low <= self.ls_high < 1:
            raise ValueError("line-search constants need 0 < ls_c1 < 1, 0 < ls_beta < 1, 0 < ls_low <= ls_high < 1")
        if self.radius is not None and not self.radius > 0:
            raise ValueError(f"radius must be > 0 or None, got {self.radius!r}")
        if self.step == "radius" and self.radius is None:
            raise ValueError("step='radius' needs a radius")
        if self.matrix_free and self.eig_solver != "lanczos":
            raise ValueError("matrix_free=True needs eig_solver='lanczos'")
        for name in ("max_iter", "ls_max_iter"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.lanczos_iters is not None and self.lanczos_iters < 1:
            raise ValueError(f"lanczos_iters must be >= 1 or None, got {self.lanczos_iters!r}")

    @classmethod
    def from_kwargs(cls, **kw) -> "RSHTROptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown RSHTR options {unknown}; known: {sorted(names)}")
        return cls(**kw)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass
class ExperimentConfig:
    """`fastattn rshtr`: problems x methods x subspace dims x seeds, written into ``out``.

    ``dims_by_problem``: per-problem subspace dims overriding ``subspace_dims``, as "name:d1,d2;name2:d3".
    """
    out: str = "runs/rshtr"
    preset: str = "cpu"
    size: str = "cpu"                     # problem sizes: "smoke", "cpu", "gpu" (problems.py)
    problems: tuple[str, ...] = ("glm_rankdef",)
    methods: tuple[str, ...] = ("rshtr", "hsodm", "rs_gd", "rs_newton", "gd", "lbfgs")
    subspace_dims: tuple[int, ...] = (50,)
    dims_by_problem: str = ""
    seeds: tuple[int, ...] = (0,)         # seeds of the methods' sketches
    data_seed: int = 0                    # seed of the problem data (fixed across method seeds)
    gtol: float = 1e-10
    max_iter: int = 500
    max_time: float = 60.0
    dtype: str = "float64"
    device: str = "cpu"
    backend: str = "auto"
    threads: int = 1                      # torch.set_num_threads for CPU runs (0: leave as is)

    def __post_init__(self):
        _choice("dtype", self.dtype, ("float32", "float64"))
        _choice("size", self.size, ("smoke", "cpu", "gpu"))
        for name in ("problems", "methods", "subspace_dims", "seeds"):
            setattr(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"{name} must be non-empty")
        if any(s < 1 for s in self.subspace_dims):
            raise ValueError(f"subspace_dims must be >= 1, got {self.subspace_dims}")
        self.subspace_dims_by_problem  # parse once: raises on a malformed spec
        if self.max_time <= 0 or self.max_iter < 1:
            raise ValueError("max_time must be > 0 and max_iter >= 1")

    @property
    def subspace_dims_by_problem(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for part in filter(None, (p.strip() for p in self.dims_by_problem.split(";"))):
            name, sep, dims = part.partition(":")
            if not sep or not dims:
                raise ValueError(f"dims_by_problem entries are 'problem:d1,d2', got {part!r}")
            out[name.strip()] = tuple(int(d) for d in dims.split(","))
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_ALL_METHODS = ("rshtr", "rshtr_jl", "rshtr_rad", "rshtr_coord", "hsodm", "hsodm_mf", "rs_gd", "rs_newton", "gd",
                "lbfgs", "newton_cg", "trust_ncg", "trust_krylov")

PRESETS: dict[str, dict] = {
    # seconds: every problem at toy size, the main methods
    "smoke": dict(size="smoke", problems=("glm_rankdef", "rosenbrock", "saddle"),
                  methods=("rshtr", "hsodm", "rs_gd", "gd", "lbfgs"), subspace_dims=(20,), seeds=(0,),
                  gtol=1e-8, max_iter=60, max_time=5.0),
    # the committed CPU experiments (2 shared cores, one thread, ~10-15 min each): "cpu" the rank-deficient GLM
    # at n = 10^4 with every method and three sketch seeds; "cpu_more" the other problems, one seed
    "cpu": dict(size="cpu", problems=("glm_rankdef",), methods=_ALL_METHODS, subspace_dims=(100, 200, 400),
                seeds=(0, 1, 2), gtol=1e-10, max_iter=5000, max_time=20.0),
    "cpu_more": dict(size="cpu", problems=("glm_rankdef_reg", "breast_cancer_rf", "rosenbrock", "saddle",
                                           "mlp_digits"),
                     methods=_ALL_METHODS, subspace_dims=(100,), seeds=(0,),
                     dims_by_problem="glm_rankdef_reg:200;breast_cancer_rf:600", gtol=1e-10, max_iter=5000,
                     max_time=20.0),
    # one GPU, float64 (the H200's fp64 rate is ample for these sizes)
    "gpu": dict(size="gpu", problems=("glm_rankdef", "glm_rankdef_reg", "breast_cancer_rf", "rosenbrock", "saddle",
                                      "mlp_digits"),
                methods=_ALL_METHODS, subspace_dims=(200,), seeds=(0, 1, 2),
                dims_by_problem="glm_rankdef:200,400,800;breast_cancer_rf:600,1200;rosenbrock:200,1000",
                gtol=1e-10, max_iter=5000, max_time=120.0, device="cuda", threads=0),
}


def make_config(preset: str = "cpu", **overrides) -> ExperimentConfig:
    from ..driver_config import from_preset
    return from_preset(ExperimentConfig, PRESETS, preset, **overrides)
