"""Feature maps phi for linear attention, behind one registry.

Every map is an ``nn.Module`` with per-head parameters (leading dim ``num_heads``) and the attribute
``.feature_dim``; ``module(x, role)`` maps ``x: [B, H, T, head_dim]`` with ``role="q"|"k"`` to
``[B, H, T, feature_dim]``. Maps compute in fp32 whatever the input dtype and return the input dtype.
Any ``feature_dim >= 1`` works, odd values included.

Names (``build(name, ...)``):
  "prf"        learned positive random features (DISTILL.md): trainable z [H, M, d] and log_alpha [H, M]
  "hedgehog"   softmax([x W, -x W]) over features, W identity-initialised where possible
  "performer"  fixed positive random features (buffer w [H, M, d]), ``redraw()`` resamples w
  "elu1"       elu(x W) + 1
  "relu"       relu(x W)
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.prf_features import reference as prf_reference
from .ops.prf_features.interface import prf_features

ROLES = ("q", "k")

_REGISTRY: dict[str, type[FeatureMap]] = {}


def register(name: str) -> Callable[[type[FeatureMap]], type[FeatureMap]]:
    """Class decorator adding a feature map to the registry under ``name``."""
    def add(cls: type[FeatureMap]) -> type[FeatureMap]:
        if name in _REGISTRY:
            raise ValueError(f"feature map {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return add


def names() -> list[str]:
    """The registered feature-map names, sorted."""
    return sorted(_REGISTRY)


def build(name: str, head_dim: int, feature_dim: int, num_heads: int, **kw) -> FeatureMap:
    """Build the feature map ``name`` mapping [B, num_heads, T, head_dim] -> [B, num_heads, T, feature_dim].

    Extra keyword arguments go to the map's constructor (e.g. ``generator=``, ``orthogonal=``, ``stabilize=``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature map {name!r}; valid names: {', '.join(names())}")
    return _REGISTRY[name](head_dim, feature_dim, num_heads, **kw)


def _positive_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _project(x: Tensor, weight: Tensor) -> Tensor:
    """Per-head projection: x [B, H, T, d], weight [H, d, F] -> [B, H, T, F] (fp32)."""
    return x @ weight.float()   # [B, H, T, d] @ [H, d, F] broadcasts over B (cheaper to dispatch than einsum)


def _init_projection(num_heads: int, head_dim: int, out_dim: int, identity: bool,
                     generator: torch.Generator | None) -> Tensor:
    """Per-head projection [H, d, out_dim], entries N(0, 1/d); with ``identity`` the leading min(d, out_dim)
    columns are those of the identity (the remaining columns stay random so they do not all start equal)."""
    w = torch.randn(num_heads, head_dim, out_dim, generator=generator) / math.sqrt(head_dim)
    if identity:
        n = min(head_dim, out_dim)
        w[:, :, :n] = torch.eye(head_dim, n)
    return w


def _gaussian_projections(num_heads: int, num_features: int, dim: int, orthogonal: bool,
                          generator: torch.Generator | None) -> Tensor:
    """Random projections [H, M, d] whose rows are marginally N(0, I_d).

    With ``orthogonal`` the rows come in blocks of d mutually orthogonal rows (Haar directions, norms drawn as
    norms of Gaussian vectors), Performer's ORF; the last block is truncated when M is not a multiple of d.
    """
    gauss = torch.randn(num_heads, num_features, dim, generator=generator)
    if not orthogonal:
        return gauss
    blocks = -(-num_features // dim)
    qmat, rmat = torch.linalg.qr(torch.randn(num_heads, blocks, dim, dim, generator=generator))
    # sign fix makes Q Haar-distributed, so every row direction is uniform on the sphere
    qmat = qmat * torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = qmat.transpose(-1, -2).reshape(num_heads, blocks * dim, dim)[:, :num_features]
    return rows * gauss.norm(dim=-1, keepdim=True)


class FeatureMap(nn.Module):
    """Base class: x [B, H, T, head_dim], role "q"|"k" -> features [B, H, T, feature_dim] in x.dtype.

    Subclasses implement ``_features(x, role)`` on fp32 input.
    """

    name: str = ""

    def __init__(self, head_dim: int, feature_dim: int, num_heads: int):
        super().__init__()
        self.head_dim = _positive_int("head_dim", head_dim)
        self.feature_dim = _positive_int("feature_dim", feature_dim)
        self.num_heads = _positive_int("num_heads", num_heads)

    def forward(self, x: Tensor, role: str = "q") -> Tensor:
        """x [B, H, T, head_dim] -> [B, H, T, feature_dim], computed in fp32, returned in x.dtype."""
        self._check_input(x, role)
        return self._features(x.float(), role).to(x.dtype)

    def _features(self, x: Tensor, role: str) -> Tensor:
        raise NotImplementedError

    def _check_input(self, x: Tensor, role: str, grouped: bool = False) -> None:
        """grouped: x may hold num_heads / G heads (GQA keys), head h reading x head h // G."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        heads_ok = x.dim() == 4 and (x.shape[1] == self.num_heads or grouped and x.shape[1] > 0
                                     and self.num_heads % x.shape[1] == 0)
        if not heads_ok or x.shape[3] != self.head_dim:
            raise ValueError(f"{type(self).__name__} expects x of shape [B, {self.num_heads}, T, {self.head_dim}]"
                             + (" (or a divisor of the heads)" if grouped else "") + f", got {list(x.shape)}")

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, feature_dim={self.feature_dim}, num_heads={self.num_heads}"


class _PositiveRandomFeatures(FeatureMap):
    """Phi_m(x) = c_m * exp(w_m.x / d^(1/4) - |x|^2 / (2 sqrt d)) per head, so that for w_m ~ N(0, I) and
    c_m = 1/sqrt(M): E[Phi(x).Phi(y)] = exp(x.y / sqrt d). Subclasses supply w [H, M, d] and log c [H, M].

    Stabilisation (``stabilize=True``, the default) works in log space: for role "q" forward subtracts the
    per-token max over features, for role "k" one detached constant per (sequence, head): the max over the
    call's tokens and features, or the fixed per-head ``key_shift`` once ``calibrate_key_shift`` has set it.
    The outputs are thus scaled per query row / per head: the scales cancel in normalized linear attention (not
    in ``normalize=False``). A key shift that differs between calls feeding one recurrent state (chunked
    prefill, decode steps) would mix scales: calibrate the key shift (or use ``stabilize=False``) there. Keys whose log-features lie more than ~87 below the sequence's max underflow to 0 in fp32 (a causal
    row that sees only such keys gets a zero denominator). ``stabilize=False`` gives the exact unbiased
    features; ``log_features`` the unshifted log-features (for log-space losses).
    """

    grouped_input = True   # forward and calibrate_key_shift take GQA keys [B, H / G, T, d] in place (no copy)

    def __init__(self, head_dim: int, feature_dim: int, num_heads: int, *, stabilize: bool = True):
        super().__init__(head_dim, feature_dim, num_heads)
        self.stabilize = stabilize
        # A fixed per-head key shift (NaN = unset): set by ``calibrate_key_shift`` so that every call feeding one
        # recurrent state (prefill, then decode steps) uses the same key scale. Saved in the state dict.
        self.register_buffer("key_shift", torch.full((num_heads,), float("nan")))
        self._calibrated: bool | None = False   # cached so the hot path never syncs with the device

    @property
    def key_shift_calibrated(self) -> bool:
        if self._calibrated is None:
            self._calibrated = bool(torch.isfinite(self.key_shift).all())
        return self._calibrated

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._calibrated = None  # key_shift may have been loaded

    @torch.no_grad()
    def calibrate_key_shift(self, k: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Fix the key shift to the max log-feature per head over keys k [B, H or H / G, T, head_dim] (key_mask
        [B, T] excludes padding); returns it [H]. Afterwards forward(role="k") subtracts this constant."""
        self._check_input(k, "k", grouped=True)
        logf = self._log_features(k.float())
        if key_mask is not None:
            logf = logf.masked_fill(~key_mask[:, None, :, None], float("-inf"))
        self.key_shift.copy_(logf.amax(dim=(0, 2, 3)))
        self._calibrated = None
        return self.key_shift

    def _projections(self) -> Tensor:
        raise NotImplementedError

    def _log_scale(self) -> Tensor:
        raise NotImplementedError

    def log_features(self, x: Tensor, role: str = "q") -> Tensor:
        """Unshifted log Phi(x): x [B, H, T, head_dim] -> [B, H, T, feature_dim] in fp32 (same map for q and k)."""
        self._check_input(x, role)
        return self._log_features(x.float())

    def _log_features(self, x: Tensor) -> Tensor:
        return prf_reference.log_features(x, self._projections(), self._log_scale())

    def forward(self, x: Tensor, role: str = "q") -> Tensor:
        """x [B, H, T, head_dim] (or [B, H / G, T, head_dim]: head h reads x head h // G) -> [B, H, T,
        feature_dim] in x.dtype (fp32 math): ``fastattn.ops.prf_features``, one fused kernel on a GPU outside
        autograd, the differentiable torch definition inside it."""
        self._check_input(x, role, grouped=True)
        if not self.stabilize:
            shift = "none"
        elif role == "k":
            shift = self.key_shift if self.key_shift_calibrated else "seq"
        else:
            shift = "row"
        return prf_features(x, self._projections(), self._log_scale(), shift)


@register("prf")
class LearnedPRF(_PositiveRandomFeatures):
    """The paper's learned positive random features, per head:
    Phi_m(x) = sqrt(alpha_m / M) exp(z_m.x / d^(1/4) - |x|^2 / (2 sqrt d)), alpha = exp(log_alpha).

    Parameters: z [H, M, d] (init N(0, I), or orthogonal blocks with ``orthogonal=True``), log_alpha [H, M]
    (init 0, so the untrained map is an unbiased estimator of exp(x.y / sqrt d)). See the base class for
    ``stabilize`` and ``log_features``.
    """

    def __init__(self, head_dim: int, feature_dim: int, num_heads: int, *, orthogonal: bool = False,
                 stabilize: bool = True, generator: torch.Generator | None = None):
        super().__init__(head_dim, feature_dim, num_heads, stabilize=stabilize)
        self.z = nn.Parameter(_gaussian_projections(num_heads, feature_dim, head_dim, orthogonal, generator))
        self.log_alpha = nn.Parameter(torch.zeros(num_heads, feature_dim))

    def _projections(self) -> Tensor:
        return self.z

    def _log_scale(self) -> Tensor:
        return 0.5 * (self.log_alpha - math.log(self.feature_dim))


@register("performer")
class PerformerPRF(_PositiveRandomFeatures):
    """Fixed positive random features exp(w_m.x / d^(1/4) - |x|^2 / (2 sqrt d)) / sqrt(M), w [H, M, d] ~ N(0, I)
    a buffer (not trained; orthogonal blocks with ``orthogonal=True``). ``redraw(generator)`` resamples w."""

    def __init__(self, head_dim: int, feature_dim: int, num_heads: int, *, orthogonal: bool = False,
                 stabilize: bool = True, generator: torch.Generator | None = None):
        super().__init__(head_dim, feature_dim, num_heads, stabilize=stabilize)
        self.orthogonal = orthogonal
        self.register_buffer("w", torch.empty(num_heads, feature_dim, head_dim))
        self.redraw(generator)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Resample w in place (a CPU ``generator`` makes it reproducible)."""
        self.w.copy_(_gaussian_projections(self.num_heads, self.feature_dim, self.head_dim, self.orthogonal,
                                           generator))

    def _projections(self) -> Tensor:
        return self.w

    def _log_scale(self) -> Tensor:
        return self.w.new_full((self.num_heads, self.feature_dim), -0.5 * math.log(self.feature_dim))


@register("hedgehog")
class Hedgehog(FeatureMap):
    """Hedgehog: softmax([x W, -x W]) over the feature axis, W [H, d, ceil(M/2)] per head.

    W starts as the identity where possible (its leading min(d, ceil(M/2)) columns; further columns N(0, 1/d)).
    For odd M the 2*ceil(M/2) logits are truncated to the first M (dropping the last -x W logit) before the
    softmax, so the features always sum to 1 over the feature axis (M = 1 gives the constant feature 1).
    """

    def __init__(self, head_dim: int, feature_dim: int, num_heads: int, *,
                 generator: torch.Generator | None = None):
        super().__init__(head_dim, feature_dim, num_heads)
        half = -(-self.feature_dim // 2)
        self.weight = nn.Parameter(_init_projection(num_heads, head_dim, half, True, generator))

    def _features(self, x: Tensor, role: str) -> Tensor:
        h = _project(x, self.weight)
        return torch.softmax(torch.cat([h, -h], dim=-1)[..., :self.feature_dim], dim=-1)


class _ActivatedProjection(FeatureMap):
    """activation(x W) with W [H, d, M] per head: the identity when M == d, else N(0, 1/d)."""

    activation: Callable[[Tensor], Tensor]

    def __init__(self, head_dim: int, feature_dim: int, num_heads: int, *,
                 generator: torch.Generator | None = None):
        super().__init__(head_dim, feature_dim, num_heads)
        identity = self.feature_dim == self.head_dim
        self.weight = nn.Parameter(_init_projection(num_heads, head_dim, feature_dim, identity, generator))

    def _features(self, x: Tensor, role: str) -> Tensor:
        return self.activation(_project(x, self.weight))


@register("elu1")
class Elu1(_ActivatedProjection):
    """elu(x W) + 1 (positive), W [H, d, M] per head: identity when M == d, else N(0, 1/d)."""

    @staticmethod
    def activation(h: Tensor) -> Tensor:
        return F.elu(h) + 1


@register("relu")
class ReLU(_ActivatedProjection):
    """relu(x W) (non-negative, may be all zero for a token), W [H, d, M] per head: identity when M == d,
    else N(0, 1/d)."""

    activation = staticmethod(F.relu)
