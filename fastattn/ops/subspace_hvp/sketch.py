"""Sketch matrices P [s, n] for subspace HVPs, described by a seed so kernels can generate them on chip.

``Sketch(kind, s, seed, scale)`` names P without storing it. The "gaussian" and "rademacher" kinds come from a
counter-based hash of (seed, row, column) that the torch reference (here), the C++ CPU, CUDA and Triton kernels
compute identically, so a kernel may generate its P tiles instead of reading P:

    key   = mix32(seed mod 2^32 ^ 0x9E3779B9)
    rk_i  = mix32((i + key) mod 2^32)                 row key
    h1    = mix32(j ^ rk_i);  h2 = mix32(h1 ^ 0x85EBCA6B)
    gaussian:   P_ij = scale * sqrt(-2 ln u1) * cos(2 pi u2),  u1 = ((h1 >> 8) + 1) 2^-24,  u2 = (h2 >> 8) 2^-24
    rademacher: P_ij = scale * (1 - 2 (h1 >> 31))

mix32 is the "lowbias32" integer finaliser (xor-shift-multiply, constants 0x7FEB352D and 0x846CA68B); the C++
side lives in csrc/sketch_hash.h (the ``sketch_fill_`` op materialises P with it on CPU and CUDA).
"orthonormal" (orthonormal rows times ``scale``) and "coordinate" (s distinct coordinates without replacement,
times ``scale``) are drawn with a torch.Generator seeded by ``seed``; the GLM path reads a coordinate sketch as
its indices (columns of A gathered, P never formed), every other use materialises them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
H2_SALT = 0x85EBCA6B
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B

HASHED_KINDS = {"gaussian": 1, "rademacher": 2}     # kind -> kernel code (0: P is read from memory)
KINDS = ("gaussian", "rademacher", "orthonormal", "coordinate")


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: Tensor) -> Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_C2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_C1) & MASK32
    x ^= x >> 15
    x = (x * MIX_C2) & MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The 32-bit key every kernel derives its P from."""
    return mix32_int((int(seed) & MASK32) ^ GOLDEN)


def default_scale(kind: str, s: int, n: int, scale: str | float = "unit") -> float:
    """"unit": P P^T ~ I (entries of variance 1/n; orthonormal and coordinate rows exactly unit);
    "jl": entries of variance 1/s (E P^T P = I); a number: that scale."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return float(scale)
    if scale == "unit":
        return 1.0 / math.sqrt(n) if kind in HASHED_KINDS else 1.0
    if scale == "jl":
        return 1.0 / math.sqrt(s) if kind in HASHED_KINDS else math.sqrt(n / s)
    raise ValueError(f"scale must be 'unit', 'jl' or a number, got {scale!r}")


@dataclass(frozen=True)
class Sketch:
    """A seeded description of P [s, n]; ``scale`` multiplies every entry (see ``default_scale``)."""
    kind: str
    s: int
    seed: int
    scale: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"sketch kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.s, int) or self.s < 1:
            raise ValueError(f"sketch size s must be a positive int, got {self.s!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"sketch scale must be finite, got {self.scale!r}")

    @property
    def code(self) -> int:
        """Kernel code of a hashed kind (1 gaussian, 2 rademacher); 0 when P must be materialised."""
        return HASHED_KINDS.get(self.kind, 0)

    def materialize(self, n: int, dtype: torch.dtype = torch.float32, device="cpu", use_kernel: bool = True) -> Tensor:
        """P [s, n] in ``dtype`` on ``device``; hashed kinds are computed in fp64 then cast, by the extension's
        ``sketch_fill_`` kernel where it serves (CPU fp32/fp64, CUDA fp32) unless ``use_kernel`` is False."""
        if self.code and use_kernel and _fill_kernel_serves(torch.device(device), dtype):
            P = torch.empty(self.s, n, dtype=dtype, device=device)
            return torch.ops.fastattn.sketch_fill_(P, self.code, int(self.seed) & MASK32, float(self.scale))
        return _MATERIALIZE[self.kind](self, n, device).to(dtype)


def _fill_kernel_serves(device: torch.device, dtype: torch.dtype) -> bool:
    from ... import _ext
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None or not _ext.has_kernel("sketch_fill_", key):
        return False
    return dtype in ((torch.float32, torch.float64) if key == "CPU" else (torch.float32,))


def _hash1(sk: Sketch, n: int, device) -> Tensor:
    """h1 [s, n] as int64 holding uint32 values."""
    rows = torch.arange(sk.s, dtype=torch.int64, device=device)
    cols = torch.arange(n, dtype=torch.int64, device=device)
    rk = mix32((rows + seed_key(sk.seed)) & MASK32)
    return mix32(cols[None, :] ^ rk[:, None])


def _gaussian(sk: Sketch, n: int, device) -> Tensor:
    h1 = _hash1(sk, n, device)
    h2 = mix32(h1 ^ H2_SALT)
    u1 = ((h1 >> 8) + 1).double() * 2.0 ** -24
    u2 = (h2 >> 8).double() * 2.0 ** -24
    return sk.scale * torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _rademacher(sk: Sketch, n: int, device) -> Tensor:
    h1 = _hash1(sk, n, device)
    return sk.scale * (1.0 - 2.0 * (h1 >> 31).double())


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))


def _orthonormal(sk: Sketch, n: int, device) -> Tensor:
    if sk.s > n:
        raise ValueError(f"orthonormal sketch needs s <= n, got s={sk.s}, n={n}")
    g = torch.randn(n, sk.s, dtype=torch.float64, generator=_generator(sk.seed))
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))[None, :]       # unique (Haar) orthonormal basis
    return (sk.scale * q.T).to(device)


def coordinate_indices(sk: Sketch, n: int) -> Tensor:
    """The s distinct coordinates (int64 [s], CPU) of a "coordinate" sketch: row i of P is scale * e_idx[i]."""
    if sk.kind != "coordinate":
        raise ValueError(f"coordinate_indices needs a coordinate sketch, got {sk.kind!r}")
    if sk.s > n:
        raise ValueError(f"coordinate sketch needs s <= n, got s={sk.s}, n={n}")
    return torch.randperm(n, generator=_generator(sk.seed))[: sk.s]


def _coordinate(sk: Sketch, n: int, device) -> Tensor:
    idx = coordinate_indices(sk, n)
    P = torch.zeros(sk.s, n, dtype=torch.float64)
    P[torch.arange(sk.s), idx] = sk.scale
    return P.to(device)


_MATERIALIZE = {"gaussian": _gaussian, "rademacher": _rademacher, "orthonormal": _orthonormal,
                "coordinate": _coordinate}


def make_sketch(kind: str, s: int, n: int, seed: int, scale: str | float = "unit") -> Sketch:
    """A Sketch of P [s, n] with its scale resolved from "unit" / "jl" / a number."""
    return Sketch(kind, int(s), int(seed), default_scale(kind, s, n, scale))
