"""Backtracking on eta for x + eta D with sufficient decrease against the quadratic model.

pred(eta) = eta * slope + eta^2 * curvature / 2 (slope = gs.d, curvature = d^T Hs d): accept eta when
f(x + eta D) - f(x) <= c1 * pred(eta) and pred(eta) < 0. With a zero slope (negative curvature, hard case) the
model still predicts a decrease, where a first-order Armijo test could not. ``noise`` (absolute) is added to the
allowance so that near a minimiser, where the predicted decrease falls below the rounding error of f, the step is
judged by what f can resolve instead of failing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass
class LineSearchResult:
    eta: float
    f: float
    evals: int
    ok: bool


def _interpolate(f0: float, slope: float, prev: tuple[float, float] | None, eta: float, f_eta: float,
                 low: float, high: float) -> float:
    """Next trial by quadratic (first backtrack) or cubic interpolation, kept in [low, high] * eta."""
    if slope >= 0:
        return high * eta
    if prev is None:
        den = 2.0 * (f_eta - f0 - slope * eta)
        new = -slope * eta * eta / den if den > 0 else high * eta
    else:
        e0, f_e0 = prev
        r1, r0 = f_eta - f0 - slope * eta, f_e0 - f0 - slope * e0
        a = (r1 / eta ** 2 - r0 / e0 ** 2) / (eta - e0)
        b = (-e0 * r1 / eta ** 2 + eta * r0 / e0 ** 2) / (eta - e0)
        if abs(a) < 1e-300:
            new = -slope / (2 * b) if b > 0 else high * eta
        else:
            disc = b * b - 3 * a * slope
            new = (-b + math.sqrt(disc)) / (3 * a) if disc >= 0 else high * eta
    if not math.isfinite(new):
        new = high * eta
    return min(max(new, low * eta), high * eta)


def backtrack(phi: Callable[[float], float], f0: float, slope: float, curvature: float, eta0: float,
              rule: str = "armijo", c1: float = 1e-4, beta: float = 0.5, low: float = 0.1, high: float = 0.5,
              max_iter: int = 30, noise: float = 0.0) -> LineSearchResult:
    """Largest accepted eta of the sequence eta0, ...; phi(eta) = f(x + eta D)."""
    eta, prev, evals = eta0, None, 0
    for _ in range(max_iter + 1):
        pred = eta * slope + 0.5 * eta * eta * curvature
        if pred >= 0:
            pred = eta * slope
        f_eta = phi(eta)
        evals += 1
        if pred < 0 and math.isfinite(f_eta) and f_eta - f0 <= c1 * pred + noise:
            return LineSearchResult(eta, f_eta, evals, True)
        if rule == "cubic" and math.isfinite(f_eta):
            new = _interpolate(f0, slope, prev, eta, f_eta, low, high)
        else:
            new = beta * eta
        prev = (eta, f_eta) if math.isfinite(f_eta) else None
        eta = new
    return LineSearchResult(0.0, f0, evals, False)
