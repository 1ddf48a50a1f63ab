"""Writes a run directory: metrics.json, report.md (tables), PNG plots of |grad f| against time and oracle calls."""
from __future__ import annotations

import json
from pathlib import Path

from .harness import aggregate


def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def _label(run: dict) -> str:
    return run["method"] + (f" s={run['s']}" if run["s"] is not None else "")


def plot(results: dict, out: Path) -> list[str]:
    """One PNG per problem: |grad f| vs wall-clock and vs oracle calls (gradients + HVPs), every seed drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    for prob in results["problems"]:
        runs = [r for r in results["runs"] if r["problem"] == prob]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = sorted({_label(r) for r in runs})
        styles = {lab: (plt.cm.tab10(i % 10), ("-", "--", ":")[i // 10 % 3]) for i, lab in enumerate(labels)}
        drawn = set()
        for r in runs:
            h = r["history"]
            lab = _label(r)
            kw = dict(color=styles[lab][0], ls=styles[lab][1], lw=1.2, label=None if lab in drawn else lab)
            drawn.add(lab)
            g = [max(row["grad_norm"], 1e-16) for row in h]
            axes[0].semilogy([row["time"] for row in h], g, **kw)
            if r["n_hvp"] >= 0:
                axes[1].semilogy([row["n_grad"] + row["n_hvp"] for row in h], g, **kw)
        axes[0].set_xlabel("wall-clock (s)")
        axes[0].set_xscale("log")
        axes[1].set_xlabel("oracle calls (gradients + HVPs)")
        axes[1].set_xscale("log")
        for ax in axes:
            ax.set_ylabel("|grad f|")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{prob}: {results['problems'][prob]['description']}", fontsize=9)
        fig.tight_layout()
        name = f"{prob}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def results_seeds(results: dict) -> list[int]:
    return sorted({r["seed"] for r in results["runs"]})


def write_report(results: dict, out: Path, config: dict, command: str, machine: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results["runs"])
    (out / "metrics.json").write_text(json.dumps({"config": config, "machine": machine, "summary": rows,
                                                  **results}, indent=1, default=str))
    pngs = plot(results, out)
    lines = ["# RSHTR experiment", "", f"Command: `{command}`", "",
             f"Machine: {machine.get('device')}, torch {machine.get('torch')}, threads {machine.get('threads')}, "
             f"commit {machine.get('commit')}", "",
             f"gtol {config['gtol']:g}, max_iter {config['max_iter']}, max_time {config['max_time']:g} s per run, "
             f"dtype {config['dtype']}; sketch seeds {config['seeds']} (median and [min, max] over seeds; "
             "deterministic methods run once). Oracle calls = gradients + Hessian-vector products "
             "(a subspace Hessian of s rows counts s); pytorch-minimize's HVPs are not counted (-).", ""]
    for s in results.get("skipped", []):
        lines.append(f"- skipped {s['method']}: {s['reason']}")
    for prob, info in results["problems"].items():
        lines += ["", f"## {prob}", "", f"{info['description']} (n = {info['n']}"
                  + (f", Hessian rank at the solution {info['rank']}" if info.get("rank") else "") + ")", "",
                  "| method | s | converged | time to 1e-6 (s) | iters to 1e-6 | calls to 1e-6 | final \\|g\\| | "
                  "f - f* | time (s) | iters | lambda_min(H) at end |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["problem"] == prob):
            def med(key, spec=".3g"):
                rng = r.get(key + "_range")
                return _fmt(r[key], spec) + (f" [{_fmt(rng[0], spec)}, {_fmt(rng[1], spec)}]" if rng else "")
            lines.append(f"| {r['method']} | {_fmt(r['s'])} | {r['converged']}/{r['seeds']} | "
                         f"{med('time_to_1e-06')} | {med('iters_to_1e-06', '.0f')} | {med('calls_to_1e-06', '.0f')} | "
                         f"{med('grad_norm', '.2e')} | {med('f_minus_fstar', '.2e')} | {med('time')} | "
                         f"{med('nit', '.0f')} | {med('min_eig', '.3e')} |")
        if f"{prob}.png" in pngs:
            lines += ["", f"![{prob}]({prob}.png)"]
        splits = [r for r in results["runs"] if r["problem"] == prob and r["method"].startswith("rshtr") and
                  "time_split" in r and r["seed"] == min(results_seeds(results))]
        if splits:
            lines += ["", "RSHTR time split (seconds, summed over iterations; first seed):", "",
                      "| method | s | sketch | subspace Hessian | eigen | line search | gradient |",
                      "|---|---|---|---|---|---|---|"]
            for r in splits:
                t = r["time_split"]
                lines.append(f"| {r['method']} | {r['s']} | {t['t_sketch']:.3f} | {t['t_hessian']:.3f} | "
                             f"{t['t_eig']:.3f} | {t['t_linesearch']:.3f} | {t['t_grad']:.3f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
