"""Drawing the sketch P [s, n] of one iteration, deterministically from (seed, iteration)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.subspace_hvp.sketch import HASHED_KINDS, Sketch, coordinate_indices, default_scale, make_sketch

_M63 = (1 << 63) - 1


def iteration_seed(seed: int, k: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for iteration k (and parameter group / stream) of a run with ``seed``."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(k) + 1) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB)
    z &= (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _M63


def _torch_rng(kind: str, s: int, n: int, seed: int, scale: float, dtype, device) -> Tensor:
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(s, n, generator=gen, dtype=dtype, device=dev) * scale
    # rademacher
    return (torch.randint(0, 2, (s, n), generator=gen, device=dev).to(dtype) * 2 - 1) * scale


def _check_identity(s: int, n: int) -> None:
    if s != n:
        raise ValueError(f"the identity sketch needs s = n, got s={s}, n={n}")


def draw(kind: str, s: int, n: int, seed: int, scale: str | float = "unit", source: str = "torch",
         dtype: torch.dtype = torch.float64, device="cpu") -> tuple[Tensor, Sketch | None]:
    """(P [s, n] of ``dtype`` on ``device``, the Sketch a GLM kernel may generate itself or None).

    kinds: gaussian / rademacher (``source`` "torch": torch RNG; "hash": the shared counter hash, returned as a
    Sketch too), orthonormal, coordinate (see fastattn.ops.subspace_hvp.sketch), identity (P = I, s must be n).
    """
    if kind == "identity":
        _check_identity(s, n)
        return torch.eye(n, dtype=dtype, device=device), None
    if kind in HASHED_KINDS and source == "torch":
        return _torch_rng(kind, s, n, seed, default_scale(kind, s, n, scale), dtype, device), None
    sk = make_sketch(kind, s, n, seed, scale)
    return sk.materialize(n, dtype, device), (sk if sk.code else None)


class Subspace:
    """The sketch of one iteration as an operator: ``apply(v)`` = P v [s], ``adjoint(u)`` = P^T u [n], and
    ``operand``, what the oracle's subspace Hessian takes (P itself, or a Sketch a GLM kernel reads better)."""

    def __init__(self, P: Tensor):
        self.P = P

    @property
    def operand(self) -> Tensor | Sketch:
        return self.P

    def apply(self, v: Tensor) -> Tensor:
        return self.P @ v

    def adjoint(self, u: Tensor) -> Tensor:
        return self.P.T @ u


class _Identity(Subspace):
    def __init__(self, n: int, dtype, device):
        self.n, self.dtype, self.device = n, dtype, device

    @property
    def operand(self) -> Tensor:   # formed only for the subspace Hessian (P = I)
        return torch.eye(self.n, dtype=self.dtype, device=self.device)

    def apply(self, v: Tensor) -> Tensor:
        return v

    def adjoint(self, u: Tensor) -> Tensor:
        return u


class _Coordinates(Subspace):
    """P = scale * rows idx of the identity: P v and P^T u are a gather and a scatter, never an s x n matrix."""

    def __init__(self, sk: Sketch, n: int, device):
        self.sketch, self.n = sk, n
        self.idx, self.scale = coordinate_indices(sk, n).to(device), sk.scale

    @property
    def operand(self) -> Sketch:
        return self.sketch

    def apply(self, v: Tensor) -> Tensor:
        return self.scale * v[self.idx]

    def adjoint(self, u: Tensor) -> Tensor:
        return u.new_zeros(self.n).index_copy_(0, self.idx, self.scale * u)


def subspace(kind: str, s: int, n: int, seed: int, scale: str | float = "unit", source: str = "torch",
             dtype: torch.dtype = torch.float64, device="cpu") -> Subspace:
    """The ``Subspace`` of ``draw(kind, s, n, seed, ...)``: the same P, with the identity and coordinate sketches
    applied without forming it."""
    if kind == "identity":
        _check_identity(s, n)
        return _Identity(n, dtype, device)
    if kind == "coordinate":
        return _Coordinates(make_sketch(kind, s, n, seed, scale), n, device)
    return Subspace(draw(kind, s, n, seed, scale, source, dtype, device)[0])
