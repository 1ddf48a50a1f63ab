"""Density-ratio alignment losses (DDRO, RDRO) and the baselines DPO, KTO, BCO, over per-row sequence log-probs.

All functions are pure: tensors in, ``(loss, metrics)`` out. Inputs are per-row sequence log-probs ``[N]`` of
the policy and the reference model (any float dtype), and for the unpaired losses ``labels [N]`` bool
(True = preferred). ``l = policy_logps - ref_logps`` is the sequence log density ratio (no beta in DDRO/RDRO).
Computation runs in fp32, or in fp64 when an input is fp64; the loss comes back in that dtype and gradients flow
back to the inputs in their own dtype. Metrics are python floats computed from detached values (fetched in one
transfer); statistics of a class absent from the batch are ``nan`` (counts are 0).

Per-row losses (Higuchi & Suzuki, "Direct Density Ratio Optimization", ICML 2025, and the RDRO follow-up):

- DDRO, preferred:   ``-log(mu) - l``                       d/dl = -1
- DDRO, unpreferred: ``-log(1 - mu exp(l))``                d/dl = mu r / (1 - mu r),  r = exp(l)
  finite only while ``mu r < 1``; past ``l0 = log((1 - eps) / mu)`` the guard acts (see ``GUARDS``).
- RDRO, preferred:   ``(1 + alpha) softplus(l) - l``        d/dl = (1 + alpha) sigmoid(l) - 1
- RDRO, unpreferred: ``(1 - alpha) softplus(l)``            d/dl = (1 - alpha) sigmoid(l)

Reductions (``REDUCTIONS``): "balanced" = ``w+ mean(preferred rows) + w- mean(unpreferred rows)`` with
``(w+, w-) = (mu, 1 - mu)`` for DDRO and ``(1/2, 1/2)`` for RDRO, an absent class contributing 0; "pooled" = plain
mean over rows; "none" = the per-row losses ``[N]``. Class means are over the rows given (the local batch); a
DDP trainer that wants global class counts must all-reduce them itself.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GUARDS", "REDUCTIONS", "ddro_loss", "rdro_loss", "dpo_loss", "kto_loss", "bco_loss"]

_NAN = float("nan")


# ----------------------------------------------------------------------------------------------------- validation
def _as_compute(*xs: Tensor) -> list[Tensor]:
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    return [x.to(dtype) for x in xs]


def _check_logps(**named: Tensor) -> None:
    shape = None
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D [N] (per-row sequence log-probs), got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty: need at least one row")
        if shape is not None and x.shape != shape:
            names = ", ".join(f"{k} {tuple(v.shape)}" for k, v in named.items())
            raise ValueError(f"log-prob shapes differ: {names}")
        shape = x.shape


def _check_unpaired(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor) -> None:
    _check_logps(policy_logps=policy_logps, ref_logps=ref_logps)
    if not isinstance(labels, Tensor) or labels.dtype != torch.bool:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a bool tensor (True = preferred), got {got}")
    if labels.shape != policy_logps.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != log-prob shape {tuple(policy_logps.shape)}")


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _resolve_fraction(name: str, value: object, labels: Tensor) -> float:
    """A number in the open interval (0, 1), or "auto" = the fraction of preferred rows in the batch."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name} must be a number in (0, 1) or 'auto', got {value!r}")
        n_pos, n = int(labels.sum()), labels.numel()
        if not 0 < n_pos < n:
            raise ValueError(f"{name}='auto' needs both classes in the batch, got {n_pos} preferred of {n} rows")
        return n_pos / n
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in the open interval (0, 1) or 'auto', got {value!r}")
    return float(value)


def _lookup(kind: str, name: object, registry: dict) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


# ----------------------------------------------------------------------------------------------------- reductions
def _class_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask rows; 0 (with zero gradient) when no row is selected."""
    return torch.where(mask, x, 0).sum() / mask.sum().clamp(min=1)


def _balanced(rows: Tensor, labels: Tensor, w_pos: float, w_neg: float) -> Tensor:
    return w_pos * _class_mean(rows, labels) + w_neg * _class_mean(rows, ~labels)


REDUCTIONS: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "balanced": _balanced,
    "pooled": lambda rows, labels, w_pos, w_neg: rows.mean(),
    "none": lambda rows, labels, w_pos, w_neg: rows,
}


# ------------------------------------------------------------------------------------------------------- metrics
def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over mask rows; nan (0 / 0) when none is selected. No host sync."""
    return torch.where(mask, x, 0).sum() / mask.sum()


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.any(), torch.where(mask, x, -math.inf).max(), _NAN)


def _to_floats(stats: dict[str, Tensor | float]) -> dict[str, float]:
    keys = [k for k, v in stats.items() if isinstance(v, Tensor)]
    values = torch.stack([stats[k].detach().double().cpu() for k in keys]).tolist() if keys else []
    out = {k: float(v) for k, v in stats.items() if not isinstance(v, Tensor)}
    out.update(zip(keys, values))
    return out


def _class_metrics(l: Tensor, labels: Tensor, weight: Tensor) -> dict[str, Tensor | float]:
    """Counts, mean l per class and mean d loss_row / d l per class."""
    return {
        "n_pref": labels.sum(),
        "n_unpref": (~labels).sum(),
        "l_mean_pref": _masked_mean(l, labels),
        "l_mean_unpref": _masked_mean(l, ~labels),
        "grad_weight_pref": _masked_mean(weight, labels),
        "grad_weight_unpref": _masked_mean(weight, ~labels),
    }


# ------------------------------------------------------------------------------------------------------------ DDRO
def _neg_log1mexp(x: Tensor) -> Tensor:
    """-log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's log1mexp split at x = -log 2)."""
    # Near 0, 1 - exp(x) cancels: use -expm1(x). Far below 0, exp(x) is tiny: log1p keeps its digits.
    # Both branches are evaluated; for x in (log(1 - eps), 0) and x << 0 each stays finite, so where() is safe.
    return -torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _barrier_weight(x: Tensor) -> Tensor:
    """d/dl -log(1 - exp(x)) = e^x / (1 - e^x) = 1 / expm1(-x), x = l + log(mu)."""
    return 1.0 / torch.expm1(-x)


def _guard_tangent(x: Tensor, x0: float) -> tuple[Tensor, Tensor]:
    past = x > x0
    x_safe = torch.where(past, x0, x)   # keeps the barrier (and its backward) finite on guarded rows
    slope = math.exp(x0) / -math.expm1(x0)   # = (1 - eps) / eps, the barrier's slope at l0
    rows = _neg_log1mexp(x_safe) + torch.where(past, slope * (x - x0), 0)
    return rows, torch.where(past, slope, _barrier_weight(x_safe.detach()))


def _guard_clamp(x: Tensor, x0: float) -> tuple[Tensor, Tensor]:
    past = x > x0
    x_safe = torch.where(past, x0, x)
    return _neg_log1mexp(x_safe), torch.where(past, 0, _barrier_weight(x_safe.detach()))


def _guard_none(x: Tensor, x0: float) -> tuple[Tensor, Tensor]:
    return _neg_log1mexp(x), _barrier_weight(x.detach())


# Each guard maps x = l + log(mu) and x0 = log(1 - eps) (i.e. l0 in x) to (unpreferred row losses, d row / d l).
GUARDS: dict[str, Callable[[Tensor, float], tuple[Tensor, Tensor]]] = {
    "tangent": _guard_tangent,
    "clamp": _guard_clamp,
    "none": _guard_none,
}


def ddro_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    mu: float | str = 0.5,
    reduction: str = "balanced",
    guard: str = "tangent",
    eps: float = 1e-3,
) -> tuple[Tensor, dict[str, float]]:
    """Direct Density Ratio Optimization loss.

    Args:
        policy_logps, ref_logps: [N] sequence log-probs (summed over response tokens) of policy and reference.
        labels: [N] bool, True = preferred.
        mu: preferred fraction of the reference distribution, in (0, 1), or "auto" = fraction of preferred rows
            (then "balanced" equals "pooled").
        reduction: "balanced" (mu, 1 - mu class weights) | "pooled" | "none" (per-row losses [N]).
        guard: behaviour of the unpreferred term past ``l0 = log((1 - eps) / mu)``, where ``mu r = 1 - eps``:
            "tangent" continues linearly with the value ``-log(eps)`` and slope ``(1 - eps) / eps`` at l0 (C1);
            "clamp" keeps the value ``-log(eps)`` (zero gradient past l0);
            "none" applies no guard: the loss is +inf at ``mu r = 1`` and nan beyond (the gradient likewise).
        eps: guard margin in (0, 1).

    Per row, with l = policy - ref, r = exp(l):
        preferred   ``-log(mu) - l``
        unpreferred ``-log(1 - mu r)``, computed as ``-log1mexp(l + log mu)`` (log1p/expm1 forms).

    Returns:
        loss: scalar (or [N] for reduction="none"), fp32 or fp64.
        metrics: mu, n_pref, n_unpref, l_mean_pref, l_mean_unpref, max_mu_r_unpref, frac_guarded (unpreferred rows
            past l0, i.e. where the guard acts; counted for guard="none" too), grad_weight_pref,
            grad_weight_unpref (mean d loss_row / d l per class).
    """
    _check_unpaired(policy_logps, ref_logps, labels)
    mu = _resolve_fraction("mu", mu, labels)
    reduce = _lookup("reduction", reduction, REDUCTIONS)
    guard_fn = _lookup("guard", guard, GUARDS)
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0 < eps < 1:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")

    policy, ref = _as_compute(policy_logps, ref_logps)
    l = policy - ref
    log_mu = math.log(mu)
    x = l + log_mu
    x0 = math.log1p(-eps)
    pos_rows = -log_mu - l
    neg_rows, neg_weight = guard_fn(x, x0)
    rows = torch.where(labels, pos_rows, neg_rows)
    loss = reduce(rows, labels, mu, 1.0 - mu)

    with torch.no_grad():
        xd = x.detach()
        stats = {"mu": mu, **_class_metrics(l.detach(), labels, torch.where(labels, -1.0, neg_weight))}
        stats["max_mu_r_unpref"] = _masked_max(xd.exp(), ~labels)
        stats["frac_guarded"] = _masked_mean((xd > x0).to(xd.dtype), ~labels)
    return loss, _to_floats(stats)


# ------------------------------------------------------------------------------------------------------------ RDRO
def rdro_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    alpha: float | str = 0.5,
    reduction: str = "balanced",
) -> tuple[Tensor, dict[str, float]]:
    """Relative Density Ratio Optimization loss (bounded gradients; no guard needed).

    Args:
        policy_logps, ref_logps: [N] sequence log-probs; labels: [N] bool, True = preferred.
        alpha: relative-ratio mixing in (0, 1), or "auto" = fraction of preferred rows.
        reduction: "balanced" (1/2, 1/2 class weights) | "pooled" | "none" (per-row losses [N]).

    Per row, with l = policy - ref:
        preferred   ``(1 + alpha) softplus(l) - l``   d/dl = (1 + alpha) sigmoid(l) - 1
        unpreferred ``(1 - alpha) softplus(l)``       d/dl = (1 - alpha) sigmoid(l)

    Returns:
        loss: scalar (or [N]); metrics: alpha, n_pref, n_unpref, l_mean_pref, l_mean_unpref, grad_weight_pref,
        grad_weight_unpref.
    """
    _check_unpaired(policy_logps, ref_logps, labels)
    alpha = _resolve_fraction("alpha", alpha, labels)
    reduce = _lookup("reduction", reduction, REDUCTIONS)

    policy, ref = _as_compute(policy_logps, ref_logps)
    l = policy - ref
    sp = F.softplus(l, threshold=50)   # exact to rounding: softplus(l) - l < 2e-22 past l = 50
    rows = torch.where(labels, (1 + alpha) * sp - l, (1 - alpha) * sp)
    loss = reduce(rows, labels, 0.5, 0.5)

    with torch.no_grad():
        s = torch.sigmoid(l.detach())
        weight = torch.where(labels, (1 + alpha) * s - 1, (1 - alpha) * s)
        stats = {"alpha": alpha, **_class_metrics(l.detach(), labels, weight)}
    return loss, _to_floats(stats)


# ------------------------------------------------------------------------------------------------------- baselines
def dpo_loss(
    chosen_policy: Tensor,
    rejected_policy: Tensor,
    chosen_ref: Tensor,
    rejected_ref: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Direct Preference Optimization (paired), sigmoid loss.

    Args: four [P] sequence log-probs of the chosen and rejected response of each pair; beta > 0.

    ``margin = (chosen_policy - chosen_ref) - (rejected_policy - rejected_ref)``;
    ``loss = mean_P -log sigmoid(beta margin)``; per pair d/d margin = ``-beta sigmoid(-beta margin)``.

    Returns: scalar loss; metrics n_pairs, reward_chosen, reward_rejected (mean beta * log ratio), reward_margin
    (mean beta * margin), accuracy (fraction margin > 0), grad_weight (mean d loss_row / d margin).
    """
    _check_logps(chosen_policy=chosen_policy, rejected_policy=rejected_policy,
                 chosen_ref=chosen_ref, rejected_ref=rejected_ref)
    beta = _check_positive("beta", beta)
    cp, rp, cr, rr = _as_compute(chosen_policy, rejected_policy, chosen_ref, rejected_ref)
    chosen, rejected = cp - cr, rp - rr
    z = beta * (chosen - rejected)
    loss = -F.logsigmoid(z).mean()

    with torch.no_grad():
        zd = z.detach()
        stats = {
            "n_pairs": float(z.numel()),
            "reward_chosen": beta * chosen.detach().mean(),
            "reward_rejected": beta * rejected.detach().mean(),
            "reward_margin": zd.mean(),
            "accuracy": (zd > 0).double().mean(),
            "grad_weight": (-beta * torch.sigmoid(-zd)).mean(),
        }
    return loss, _to_floats(stats)


def _reference_point(name: str, value: object, default: Tensor, like: Tensor) -> Tensor:
    """The constant reference point: value (None, number or scalar tensor) or the detached default, as a 0-d tensor."""
    if value is None:
        return default.detach()
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(like)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be None, a finite number or a scalar tensor, got {value!r}")
    return like.new_tensor(float(value))


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Kahneman-Tversky Optimization (unpaired), as in Ethayarajh et al. 2024 and TRL.

    Args:
        policy_logps, ref_logps: [N] sequence log-probs; labels: [N] bool, True = desirable.
        beta > 0; desirable_weight, undesirable_weight > 0 (lambda_D, lambda_U).
        kl: the reference point z0 (treated as a constant). None = ``max(0, mean_N l)`` over this batch,
            detached. The paper estimates z0 from mismatched (x, y') pairs; the matched rows used here are a
            cheaper proxy (pass the mismatched estimate as ``kl`` to follow the paper exactly).

    Per row, with l = policy - ref:
        desirable   ``lambda_D (1 - sigmoid(beta (l - z0)))``
        undesirable ``lambda_U (1 - sigmoid(beta (z0 - l)))``
    loss = plain mean over rows (TRL's reduction). d/dl = ``-lambda_D beta s (1 - s)``, s = sigmoid(beta (l - z0)),
    and ``+lambda_U beta s (1 - s)``, s = sigmoid(beta (z0 - l)).

    Returns: scalar loss; metrics kl, n_pref, n_unpref, l_mean_pref, l_mean_unpref, grad_weight_pref,
    grad_weight_unpref.
    """
    _check_unpaired(policy_logps, ref_logps, labels)
    beta = _check_positive("beta", beta)
    w_d = _check_positive("desirable_weight", desirable_weight)
    w_u = _check_positive("undesirable_weight", undesirable_weight)
    policy, ref = _as_compute(policy_logps, ref_logps)
    l = policy - ref
    z0 = _reference_point("kl", kl, l.mean().clamp(min=0), l)
    z = torch.where(labels, beta * (l - z0), beta * (z0 - l))
    weights = torch.where(labels, l.new_tensor(w_d), l.new_tensor(w_u))
    rows = weights * torch.sigmoid(-z)   # = 1 - sigmoid(z), without the cancellation
    loss = rows.mean()

    with torch.no_grad():
        s = torch.sigmoid(z.detach())
        weight = torch.where(labels, l.new_tensor(-w_d * beta), l.new_tensor(w_u * beta)) * s * (1 - s)
        stats = {"kl": z0, **_class_metrics(l.detach(), labels, weight)}
    return loss, _to_floats(stats)


def bco_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    beta: float = 0.1,
    delta: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Binary Classifier Optimization (Jung et al. 2024): logistic loss on the shifted implicit reward.

    Args:
        policy_logps, ref_logps: [N] sequence log-probs; labels: [N] bool, True = desirable; beta > 0.
        delta: the reward shift (a constant). None = this batch's detached estimate
            ``(mean_{preferred} beta l + mean_{unpreferred} beta l) / 2`` (the mean of the present class when one
            is absent). The paper keeps a running mean of that quantity across steps: keep an EMA of the returned
            ``metrics["delta"]`` and pass it back in to reproduce it. The paper's density-ratio (UDM) reweighting
            is not included.

    Per row, with l = policy - ref and z = beta l - delta:
        desirable ``-log sigmoid(z)``   d/dl = ``-beta sigmoid(-z)``
        undesirable ``-log sigmoid(-z)``   d/dl = ``beta sigmoid(z)``
    loss = plain mean over rows (as TRL).

    Returns: scalar loss; metrics delta, accuracy (fraction of rows with sign(z) matching the label), n_pref,
    n_unpref, l_mean_pref, l_mean_unpref, grad_weight_pref, grad_weight_unpref.
    """
    _check_unpaired(policy_logps, ref_logps, labels)
    beta = _check_positive("beta", beta)
    policy, ref = _as_compute(policy_logps, ref_logps)
    l = policy - ref
    reward = beta * l
    with torch.no_grad():
        batch_delta = torch.stack([_masked_mean(reward, labels), _masked_mean(reward, ~labels)]).nanmean()
    shift = _reference_point("delta", delta, batch_delta, l)
    z = reward - shift
    signed = torch.where(labels, z, -z)
    loss = -F.logsigmoid(signed).mean()

    with torch.no_grad():
        sd = signed.detach()
        weight = torch.where(labels, l.new_tensor(-beta), l.new_tensor(beta)) * torch.sigmoid(-sd)
        stats = {"delta": shift, "accuracy": (sd > 0).double().mean(),
                 **_class_metrics(l.detach(), labels, weight)}
    return loss, _to_floats(stats)
