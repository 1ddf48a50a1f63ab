"""Experiment (a): statistical consistency on a synthetic, non-Bradley-Terry preference (DDRO.md).

Setting (tabular, exact ground truth): one prompt, K responses, a fixed reference ``pi_ref`` (softmax of seeded
normal logits). A pair (y1, y2) ~ pi_ref x pi_ref is labelled by
``P(y1 > y2) = clip(sigmoid(s_y1 - s_y2) + gamma C(y1, y2), 0, 1)``: a Bradley-Terry part with scores s plus a
cyclic part C (C(i, i+1 mod K) = 1 = -C(i+1, i), else 0; rock-paper-scissors for K = 3), which no BT model can
express. The preferred-response distribution is then exact:
``g+(y) = 2 pi_ref(y) sum_y' pi_ref(y') P(y > y')`` (and pi_ref = (g+ + g-) / 2, so mu = 1/2).

Each method fits tabular policy logits theta (pi_theta = softmax(theta)) to n sampled pairs by full-batch L-BFGS
on its loss from ``losses.py`` (DDRO/RDRO see the pairs as 2n unpaired rows; KTO/BCO too, with their reference
point / shift held fixed within an L-BFGS round and refreshed between rounds); the score is the total variation
``TV(pi_theta, g+)``. Nested n: each seed samples the largest n once and every smaller n is a prefix.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import losses

F64 = torch.float64


@dataclass
class ConsistencyConfig:
    K: int = 4                                          # responses
    gamma: float = 0.3                                  # weight of the cyclic (non-BT) part
    score_scale: float = 1.0                            # BT scores s ~ score_scale * N(0, 1)
    ns: tuple[int, ...] = (100, 300, 1000, 3000, 10000, 30000, 100000)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    dpo_betas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    baseline_beta: float = 1.0                          # KTO and BCO (at 0.1 both stay near TV 0.6 here)
    setting_seed: int = 1234                            # pi_ref and the BT scores
    lbfgs_iters: int = 100
    rounds: int = 3                                     # KTO/BCO: refreshes of the reference point / shift
    out: str = "runs/ddro/consistency"

    def __post_init__(self):
        self.ns = tuple(int(n) for n in self.ns)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.dpo_betas = tuple(float(b) for b in self.dpo_betas)
        if self.K < 3:
            raise ValueError(f"K must be >= 3 (a cycle needs three responses), got {self.K}")
        if not self.ns or min(self.ns) < 1 or not self.seeds:
            raise ValueError("ns must be positive pair counts and seeds non-empty")
        if not 0 <= self.gamma <= 0.5:
            raise ValueError(f"gamma must be in [0, 0.5], got {self.gamma}")


@dataclass
class Setting:
    pi_ref: torch.Tensor      # [K]
    pref: torch.Tensor        # [K, K] P(row > column); pref + pref.T = 1
    g_plus: torch.Tensor      # [K]


def make_setting(cfg: ConsistencyConfig) -> Setting:
    g = torch.Generator().manual_seed(cfg.setting_seed)
    pi_ref = torch.softmax(torch.randn(cfg.K, generator=g, dtype=F64), 0)
    s = cfg.score_scale * torch.randn(cfg.K, generator=g, dtype=F64)
    C = torch.zeros(cfg.K, cfg.K, dtype=F64)
    i = torch.arange(cfg.K)
    C[i, (i + 1) % cfg.K] = 1.0
    C[(i + 1) % cfg.K, i] = -1.0
    pref = (torch.sigmoid(s[:, None] - s[None, :]) + cfg.gamma * C).clamp(0, 1)
    pref.fill_diagonal_(0.5)
    g_plus = 2 * pi_ref * (pref @ pi_ref)
    return Setting(pi_ref, pref, g_plus)


def sample_pairs(st: Setting, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [n], rejected [n]) response indices."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(st.pi_ref, 2 * n, replacement=True, generator=g).view(n, 2)
    first = torch.rand(n, generator=g, dtype=F64) < st.pref[y[:, 0], y[:, 1]]
    chosen = torch.where(first, y[:, 0], y[:, 1])
    return chosen, torch.where(first, y[:, 1], y[:, 0])


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def _fit(objective, K: int, iters: int) -> torch.Tensor:
    theta = torch.zeros(K, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def _unpaired(st: Setting, chosen, rejected):
    y = torch.cat([chosen, rejected])
    labels = torch.cat([torch.ones_like(chosen, dtype=torch.bool), torch.zeros_like(rejected, dtype=torch.bool)])
    return y, labels, st.pi_ref.log()[y]


def _logp(theta, y):
    return torch.log_softmax(theta, 0)[y]


def fit_method(method: str, beta: float, st: Setting, chosen, rejected, cfg: ConsistencyConfig) -> torch.Tensor:
    """pi_theta [K] fitted by ``method`` ("ddro", "rdro", "dpo", "kto", "bco") to the pairs."""
    K = st.pi_ref.numel()
    y, labels, ref = _unpaired(st, chosen, rejected)
    log_ref = st.pi_ref.log()
    if method == "ddro":
        theta = _fit(lambda t: losses.ddro_loss(_logp(t, y), ref, labels, mu=0.5)[0], K, cfg.lbfgs_iters)
    elif method == "rdro":
        theta = _fit(lambda t: losses.rdro_loss(_logp(t, y), ref, labels, alpha=0.5)[0], K, cfg.lbfgs_iters)
    elif method == "dpo":
        theta = _fit(lambda t: losses.dpo_loss(_logp(t, chosen), _logp(t, rejected), log_ref[chosen],
                                               log_ref[rejected], beta=beta)[0], K, cfg.lbfgs_iters)
    else:   # kto / bco: a reference point (KL) / reward shift held fixed per round, refreshed between rounds
        theta = torch.zeros(K, dtype=F64)
        for _ in range(cfg.rounds):
            with torch.no_grad():
                pol = torch.log_softmax(theta, 0)
                if method == "kto":
                    point = dict(kl=float((pol.exp() * (pol - log_ref)).sum().clamp(min=0)))
                else:
                    _, m = losses.bco_loss(pol[y], ref, labels, beta=beta)
                    point = dict(delta=m["delta"])
            fn = losses.kto_loss if method == "kto" else losses.bco_loss
            theta = _fit(lambda t: fn(_logp(t, y), ref, labels, beta=beta, **point)[0], K, cfg.lbfgs_iters)
    return torch.softmax(theta, 0)


def methods(cfg: ConsistencyConfig) -> list[tuple[str, str, float]]:
    """(label, method, beta) of every curve."""
    out = [("DDRO", "ddro", 0.0), ("RDRO", "rdro", 0.0)]
    out += [(f"DPO beta={b:g}", "dpo", b) for b in cfg.dpo_betas]
    out += [(f"KTO beta={cfg.baseline_beta:g}", "kto", cfg.baseline_beta),
            (f"BCO beta={cfg.baseline_beta:g}", "bco", cfg.baseline_beta)]
    return out


def run(cfg: ConsistencyConfig, log=print) -> dict:
    st = make_setting(cfg)
    curves = {label: {n: [] for n in cfg.ns} for label, _, _ in methods(cfg)}
    for seed in cfg.seeds:
        chosen_all, rejected_all = sample_pairs(st, max(cfg.ns), seed)
        for n in cfg.ns:
            for label, method, beta in methods(cfg):
                pi = fit_method(method, beta, st, chosen_all[:n], rejected_all[:n], cfg)
                curves[label][n].append(tv(pi, st.g_plus))
            log(f"seed {seed} n {n}: " + ", ".join(f"{k} {v[n][-1]:.4f}" for k, v in curves.items()))
    return {"config": asdict(cfg), "pi_ref": st.pi_ref.tolist(), "g_plus": st.g_plus.tolist(),
            "pref": st.pref.tolist(), "tv_pi_ref": tv(st.pi_ref, st.g_plus),
            "curves": {k: {str(n): v for n, v in c.items()} for k, c in curves.items()}}


# ---------------------------------------------------------------------------------------------------- report
def _stats(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=F64)
    return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


def slope(ns: list[int], means: list[float]) -> float:
    """Least-squares slope of log TV against log n."""
    x = torch.tensor([math.log(n) for n in ns], dtype=F64)
    y = torch.tensor([math.log(max(m, 1e-300)) for m in means], dtype=F64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def summarize(result: dict) -> dict:
    ns = [int(n) for n in next(iter(result["curves"].values()))]
    rows = {}
    for label, c in result["curves"].items():
        st = [_stats(c[str(n)]) for n in ns]
        rows[label] = {"mean": [m for m, _ in st], "std": [s for _, s in st], "slope": slope(ns, [m for m, _ in st])}
    dpo = {k: v for k, v in rows.items() if k.startswith("DPO")}
    best = min(dpo, key=lambda k: dpo[k]["mean"][-1]) if dpo else None
    return {"ns": ns, "rows": rows, "best_dpo": best}


def write_report(result: dict, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    (out / "metrics.json").write_text(json.dumps({**result, "summary": summary}, indent=1))
    ns, rows = summary["ns"], summary["rows"]
    plots = []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, r in rows.items():
            m, s = torch.tensor(r["mean"]), torch.tensor(r["std"])
            style = "-" if label in ("DDRO", "RDRO") else ("--" if label.startswith("DPO") else ":")
            ax.plot(ns, m, style, marker="o", ms=3, label=label)
            ax.fill_between(ns, (m - s).clamp(min=1e-5), m + s, alpha=0.15)
        ref = rows["DDRO"]["mean"][0] * (torch.tensor(ns, dtype=F64) / ns[0]) ** -0.5
        ax.plot(ns, ref, "k-", lw=0.8, alpha=0.5, label="n^-1/2")
        ax.axhline(0.006, color="grey", lw=0.6, ls="-.", label="target 0.006")
        ax.set(xscale="log", yscale="log", xlabel="pairs n", ylabel="TV(pi_theta, g+)",
               title="consistency on a non-Bradley-Terry preference (mean +- std over seeds)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "tv_vs_n.png", dpi=120)
        plt.close(fig)
        plots.append("tv_vs_n.png")
    except ImportError:
        pass
    cfg = result["config"]
    i10 = ns.index(10000) if 10000 in ns else None
    lines = [
        "# DDRO experiment (a): consistency on a synthetic non-Bradley-Terry preference", "",
        f"Command: `{command}`", "",
        f"K = {cfg['K']} responses, cyclic weight gamma = {cfg['gamma']}, BT score scale {cfg['score_scale']}, "
        f"{len(cfg['seeds'])} seeds, full-batch L-BFGS ({cfg['lbfgs_iters']} iterations) on tabular logits.",
        f"pi_ref = {[round(x, 4) for x in result['pi_ref']]}; g+ = {[round(x, 4) for x in result['g_plus']]}; "
        f"TV(pi_ref, g+) = {result['tv_pi_ref']:.4f}.", "",
        "Total variation TV(pi_theta, g+), mean +- std over seeds:", "",
        "| method | " + " | ".join(f"n={n}" for n in ns) + " | log-log slope |",
        "|---|" + "---|" * (len(ns) + 1)]
    for label, r in rows.items():
        cells = [f"{m:.4f} +- {s:.4f}" for m, s in zip(r["mean"], r["std"])]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['slope']:.2f} |")
    lines.append("")
    if i10 is not None:
        best = summary["best_dpo"]
        for label in ("DDRO", "RDRO"):
            v = rows[label]["mean"][i10]
            lines.append(f"- {label} at n = 10,000: TV {v:.4f} ({'meets' if v <= 0.006 else 'misses'} the target "
                         f"<= 0.006); slope {rows[label]['slope']:.2f} (n^-1/2 is -0.5).")
        if best:
            lines.append(f"- best DPO beta (lowest TV at the largest n): {best}, TV {rows[best]['mean'][i10]:.4f} at "
                         f"n = 10,000 and {rows[best]['mean'][-1]:.4f} at n = {ns[-1]} (slope "
                         f"{rows[best]['slope']:.2f}).")
    lines += [""] + [f"![{p}]({p})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
