"""report.md, metrics.json and the figures (PNG + JSON each) of a PCFG metadata-conditioning run."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .run import best_layer_curve


def _mean(xs):
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def _by_depth(metrics: dict, cooldown: bool = False) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in metrics["runs"].values():
        if r["cooldown"] == cooldown:
            out.setdefault(r["meta_depth"], []).append(r)
    return dict(sorted(out.items()))


def _colors(depths):
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("viridis")
    return {d: cmap(i / max(1, len(depths) - 1)) for i, d in enumerate(depths)}


def _save(fig, out: Path, name: str, data: dict | None = None) -> None:
    """``name``.png (and ``name``.json with the plotted numbers)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    plt.close(fig)
    if data is not None:
        (out / f"{name}.json").write_text(json.dumps(data))


def _avg_curves(curves: list[dict], min_count: int) -> tuple[list[int], list[float]]:
    counts = curves[0]["count"]
    xs = [k for k, c in enumerate(counts) if c >= min_count]
    return xs, [_mean(c["per_position"][k] for c in curves) for k in xs]


def figure_a(metrics: dict, out: Path) -> dict:
    import matplotlib.pyplot as plt
    ref = metrics["reference"]["loss"]
    groups = _by_depth(metrics)
    colors = _colors(list(groups))
    min_count = max(5, ref["mask"]["count"][0] // 10)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [2, 2, 1.2]})
    data = {"bayes": ref, "runs": {}, "average": {}}
    for d, rs in groups.items():
        for ax, mode in zip(axes[:2], ("meta", "mask")):
            xs, ys = _avg_curves([r["loss"][mode] for r in rs], min_count)
            ax.plot(xs, ys, color=colors[d], label=f"D_M={d} model")
        xs, ys = _avg_curves([ref["meta"][str(d)]], min_count)
        axes[0].plot(xs, ys, color=colors[d], ls="--", lw=1, label=f"D_M={d} Bayes")
        data["average"][str(d)] = {m: _mean(r["loss"][m]["average"] for r in rs) for m in ("meta", "mask")}
        data["average"][str(d)]["bayes_meta"] = ref["meta"][str(d)]["average"]
        for r in rs:
            data["runs"][f"dm{d}_s{r['seed']}"] = r["loss"]
    xs, ys = _avg_curves([ref["mask"]], min_count)
    axes[1].plot(xs, ys, color="k", ls="--", lw=1, label="Bayes (all MASK)")
    axes[0].set(title="metadata given at inference (the run's D_M levels)", xlabel="position k (terminals seen)",
                ylabel="next-token loss (nats)")
    axes[1].set(title="all-MASK prefix at inference", xlabel="position k (terminals seen)")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    depths = list(groups)
    width = 0.38
    axes[2].bar([i - width / 2 for i in range(len(depths))], [data["average"][str(d)]["meta"] for d in depths],
                width, label="metadata given")
    axes[2].bar([i + width / 2 for i in range(len(depths))], [data["average"][str(d)]["mask"] for d in depths],
                width, label="all MASK")
    axes[2].axhline(ref["mask"]["average"], color="k", ls="--", lw=1, label="Bayes all MASK")
    axes[2].set_xticks(range(len(depths)), [f"D_M={d}" for d in depths])
    lo = min(min(v["meta"], v["mask"]) for v in data["average"].values())
    axes[2].set_ylim(bottom=max(0, lo - 0.1))
    axes[2].set(title="average loss (mean over seeds)")
    axes[2].legend(fontsize=7)
    _save(fig, out, "fig_a_loss", data)
    return data


def figure_b(metrics: dict, out: Path) -> dict:
    import matplotlib.pyplot as plt
    positions = metrics["config"]["positions"]
    groups = _by_depth(metrics)
    colors = _colors(list(groups))
    ceiling = [_mean(row) for row in metrics["reference"]["probe_ceiling"]]
    rand = best_layer_curve(metrics["random_init"]["probes"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    xs = list(range(len(positions)))
    data = {"positions": positions, "bayes_ceiling": metrics["reference"]["probe_ceiling"],
            "random_init": metrics["random_init"]["probes"], "runs": {}, "best_layer_mean": {}}
    mid = len(positions) // 2
    for d, rs in groups.items():
        curve = [_mean(v) for v in zip(*(best_layer_curve(r["probes"]) for r in rs))]
        data["best_layer_mean"][str(d)] = curve
        axes[0].plot(xs, curve, "o-", color=colors[d], label=f"D_M={d}")
        per_layer = [_mean(_mean(r["probes"][layer][mid]) for r in rs) for layer in range(len(rs[0]["probes"]))]
        axes[1].plot(range(len(per_layer)), per_layer, "o-", color=colors[d], label=f"D_M={d}")
        for r in rs:
            data["runs"][f"dm{d}_s{r['seed']}"] = r["probes"]
    axes[0].plot(xs, ceiling, "k--", label="Bayes MAP ceiling")
    axes[0].plot(xs, rand, color="gray", ls=":", label="random-init model")
    axes[0].set_xticks(xs, [str(k) for k in positions])
    axes[0].set(xlabel="prompt length k (terminals seen, all-MASK prefix)",
                ylabel="probe accuracy (mean over levels j_d)", title="linear probes of metadata (best layer)")
    rand_layers = [_mean(layer[mid]) for layer in metrics["random_init"]["probes"]]
    axes[1].plot(range(len(rand_layers)), rand_layers, color="gray", ls=":", label="random-init model")
    axes[1].axhline(_mean(metrics["reference"]["probe_ceiling"][mid]), color="k", ls="--", label="Bayes MAP ceiling")
    axes[1].set(xlabel="layer (0 = embeddings)", title=f"per layer at k={positions[mid]}")
    for ax in axes:
        ax.legend(fontsize=7)
    _save(fig, out, "fig_b_probes", data)
    return data


def _grammar_panel(ax, groups, positions, colors, reference=None):
    xs = list(range(len(positions)))
    for d, rs in groups.items():
        ys = [_mean(r["grammar"][str(k)]["accuracy"] for r in rs if str(k) in r["grammar"]) for k in positions]
        ax.plot(xs, ys, "o-", color=colors[d], label=f"D_M={d}")
    if reference:
        ax.plot(xs, [reference.get(str(k), float("nan")) for k in positions], "k--", lw=1,
                label="E[p(j | prompt)] (Bayes lower bound)")
    ax.set_xticks(xs, [str(k) for k in positions])


def figure_c(metrics: dict, out: Path) -> dict:
    import matplotlib.pyplot as plt
    positions = metrics["config"]["positions"]
    groups = _by_depth(metrics)
    colors = _colors(list(groups))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    _grammar_panel(axes[0], groups, positions, colors, metrics["reference"]["identification"])
    axes[0].set(xlabel="prompt length k", ylabel="grammatical accuracy", title="continuations in L(G_j), own j")
    xs = list(range(len(positions)))
    base = {r["seed"]: r for r in groups.get(0, [])}
    data = {"positions": positions, "identification": metrics["reference"]["identification"], "runs": {},
            "diff": {}}
    for d, rs in groups.items():
        for r in rs:
            data["runs"][f"dm{d}_s{r['seed']}"] = r["grammar"]
            if d == 0 or r["seed"] not in base:
                continue
            diff = [r["grammar"][str(k)]["accuracy"] - base[r["seed"]]["grammar"][str(k)]["accuracy"]
                    if str(k) in r["grammar"] else float("nan") for k in positions]
            data["diff"][f"dm{d}_s{r['seed']}"] = diff
            axes[1].plot(xs, diff, "o-", color=colors[d], alpha=0.7, lw=1,
                         label=f"D_M={d}" if r is rs[0] else None)
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xticks(xs, [str(k) for k in positions])
    axes[1].set(xlabel="prompt length k", ylabel="accuracy(D_M) - accuracy(D_M=0)", title="per seed")
    for ax in axes:
        ax.legend(fontsize=7)
    _save(fig, out, "fig_c_grammar", data)
    return data


def figure_cooldown(metrics: dict, out: Path) -> dict | None:
    import matplotlib.pyplot as plt
    cooldown = metrics["summary"].get("targets", {}).get("cooldown")
    if not cooldown:
        return None
    positions = [str(k) for k in metrics["config"]["positions"]]
    headline = metrics["summary"]["targets"]["grammar_short_negative_long_positive"]["runs"]
    depths = sorted({int(k.split("_")[0][2:]) for k in cooldown})
    colors = _colors(depths)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(positions)))
    data = {"positions": positions, "base": {}, "cooldown": {}}
    for d in depths:
        keys = [k for k in cooldown if k.startswith(f"dm{d}_")]
        b = [_mean(headline[k]["diff"].get(p, float("nan")) for k in keys) for p in positions]
        c = [_mean(cooldown[k]["diff_cooldown"].get(p, float("nan")) for k in keys) for p in positions]
        data["base"][str(d)], data["cooldown"][str(d)] = b, c
        ax.plot(xs, b, "o-", color=colors[d], label=f"D_M={d}")
        ax.plot(xs, c, "s--", color=colors[d], label=f"D_M={d} + metadata-free cooldown")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(xs, positions)
    ax.set(xlabel="prompt length k", ylabel="accuracy(D_M) - accuracy(D_M=0)",
           title=f"cooldown ablation (last {metrics['config']['cooldown_steps']} steps without metadata)")
    ax.legend(fontsize=7)
    _save(fig, out, "fig_cooldown", data)
    return data


def figure_training(metrics: dict, out: Path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, r in metrics["runs"].items():
        h = r["train"]["history"]
        ax.plot([x["step"] for x in h], [x["loss"] for x in h], lw=1, label=key)
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title="training")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, out, "training")


def _fmt(x: float) -> str:
    return f"{x:+.3f}"


def _se(run: dict, side: str) -> str:
    """' +- SE' of a headline difference (runs summarized before standard errors were kept have none)."""
    se = run.get(f"{side}_se")
    return f" +- {se:.3f}" if se is not None else ""


def _beyond(runs: dict) -> str:
    """How many headline differences lie beyond two binomial standard errors of zero, and in which direction."""
    diffs = [(v[side], v[f"{side}_se"]) for v in runs.values() for side in ("short", "long") if f"{side}_se" in v]
    if not diffs:
        return ""
    neg = sum(d < -2 * se for d, se in diffs)
    pos = sum(d > 2 * se for d, se in diffs)
    return (f" (+- one binomial standard error; beyond two: {neg} of {len(diffs)} below zero, {pos} above)")


def _pooled(p: dict | None) -> str:
    """The pooled difference (every D_M>0 run against every D_M=0 run) with its z-scores."""
    if not p:
        return ""
    def z(side: str) -> str:   # a zero standard error: every accuracy is 0 or 1
        return f" (z {p[side] / p[side + '_se']:+.1f})" if p[side + "_se"] > 0 else ""
    return (f"; pooled over {p['runs']['with_metadata']} D_M>0 and {p['runs']['without']} D_M=0 runs: short "
            + ", long ".join(f"{_fmt(p[s])} +- {p[s + '_se']:.3f}{z(s)}" for s in ("short", "long")))


def _wall(metrics: dict) -> str:
    """The wall time of all runs and how many trained at once (absent from metrics of older versions)."""
    if "runs_wall_seconds" not in metrics or metrics["config"].get("report_only"):
        return ""
    return f"all runs {metrics['runs_wall_seconds'] / 60:.1f} min wall, {metrics['config'].get('workers', 1)} at a " \
        "time; "


def write_report(metrics: dict, out: Path, command: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if not metrics["runs"]:
        text = f"# Metadata conditioning on leveled PCFG data\n\nCommand: `{command}`\n\nNo run finished; not made: " \
            f"{', '.join(metrics.get('skipped', []))}.\n"
        (out / "report.md").write_text(text)
        return out / "report.md"
    figure_a(metrics, out)
    figure_b(metrics, out)
    figure_c(metrics, out)
    has_cooldown = figure_cooldown(metrics, out) is not None
    figure_training(metrics, out)
    cfg, summ, ref = metrics["config"], metrics["summary"], metrics["reference"]
    positions = [str(k) for k in cfg["positions"]]
    train_s = sum(r["train"]["train_seconds"] for r in metrics["runs"].values())
    eval_s = sum(r["eval_seconds"] for r in metrics["runs"].values())
    lines = [f"# Metadata conditioning on leveled PCFG data ({cfg['preset']} preset)", "",
             f"Command: `{command}`", "",
             f"Device {metrics['device']}, torch {metrics['torch']}. Grammar: depth D={cfg['depth']}, symbols per "
             f"level {metrics['grammar']['sizes'][1:]}, K={cfg['num_alternatives']} rule sets per level, rule "
             f"probabilities {cfg['rule_probs']}, grammar seed {cfg['grammar_seed']}, vocabulary "
             f"{metrics['grammar']['vocab_size']}. "
             f"Model: Llama-style `{cfg['model']}` ({metrics['model']['parameters'] / 1e6:.2f}M parameters, "
             f"{cfg['attention']} attention). Training: {cfg['steps']} steps x {cfg['batch_size']} fresh documents, "
             f"p_meta={cfg['p_meta']}, lr {cfg['lr']} (warmup {cfg['warmup_steps']}, cosine to "
             f"{cfg['min_lr_ratio']}x), seeds {list(cfg['seeds'])}, D_M in {list(cfg['meta_depths'])}; "
             + (f"cooldown ablation: last {cfg['cooldown_steps']} steps without metadata" if cfg["cooldown_steps"]
                else "no cooldown ablation") + ". Time (summed over runs): training "
             f"{train_s / 60:.1f} min, evaluation {eval_s / 60:.1f} min; {_wall(metrics)}exact DP of the reference "
             f"sets {ref['dp_seconds']:.1f} s.", "",
             "## Targets", ""]
    if metrics.get("skipped"):
        why = "no train.json and eval.json in their directories" if cfg.get("report_only") else \
            f"time limit {cfg['time_limit_s']:.0f} s"
        lines[-2:-2] = [f"**Runs not made ({why}): {', '.join(metrics['skipped'])}.**",
                        ""]
    t = summ.get("targets", {})
    if t:
        g, p, m = (t["grammar_short_negative_long_positive"], t["probes_worse_at_short_positions"],
                   t["all_mask_loss_about_equal"])
        lines += [f"Short prompts k in {summ['short_positions']}, long prompts k in {summ['long_positions']} "
                  "(first and last third of the positions).", "",
                  "| target | holds on every seed? | evidence |", "|---|---|---|",
                  "| accuracy(D_M>0) - accuracy(D_M=0) < 0 short, > 0 long | "
                  f"{'yes' if g['holds_every_seed'] else 'no'} | "
                  + "; ".join(f"{k}: short {_fmt(v['short'])}{_se(v, 'short')}, long {_fmt(v['long'])}"
                              f"{_se(v, 'long')}" for k, v in g["runs"].items()) + _beyond(g["runs"])
                  + _pooled(g.get("pooled")) + " |",
                  f"| probes of D_M>0 models worse at short positions | {'yes' if p['holds_every_seed'] else 'no'} | "
                  + "; ".join(f"{k}: {_fmt(v['short_diff'])}" for k, v in p["runs"].items()) + " |",
                  f"| all-MASK average loss about equal across D_M | spread {m['spread']:.4f} nats "
                  f"({100 * m['relative_spread']:.2f}%) | " + ", ".join(f"D_M={d}: {v:.4f}" for d, v in
                                                                       m["loss_mask"].items())
                  + f"; Bayes {m['bayes_mask']:.4f} |", ""]
    lines += ["## A. Next-token loss by inference mode", "",
              "| D_M | loss, metadata given | Bayes, metadata given | loss, all MASK | Bayes, all MASK |",
              "|---|---|---|---|---|"]
    for d, row in summ["per_meta_depth"].items():
        lines.append(f"| {d} | {row['loss_meta']:.4f} +- {row['loss_meta_std']:.4f} | "
                     f"{ref['loss']['meta'][d]['average']:.4f} | {row['loss_mask']:.4f} +- {row['loss_mask_std']:.4f}"
                     f" | {ref['loss']['mask']['average']:.4f} |")
    lines += ["", "Mean +- std over seeds, nats per target token (terminals and EOS).", "",
              "![figure A](fig_a_loss.png)", "", "## B. Linear probes of metadata (all-MASK input)", "",
              "Best layer per position, accuracy averaged over the levels j_0..j_{D-1}; chance is "
              f"{1 / cfg['num_alternatives']:.2f}.", "",
              "| k | " + " | ".join(positions) + " |", "|---|" + "---|" * len(positions)]
    for d, row in summ["per_meta_depth"].items():
        lines.append(f"| D_M={d} | " + " | ".join(f"{x:.3f}" for x in row["probe_best_layer"]) + " |")
    lines.append("| random init | " + " | ".join(f"{x:.3f}" for x in best_layer_curve(
        metrics["random_init"]["probes"])) + " |")
    lines.append("| Bayes MAP | " + " | ".join(f"{_mean(x):.3f}" for x in ref["probe_ceiling"]) + " |")
    lines += ["", "![figure B](fig_b_probes.png)", "", "## C. Grammatical accuracy vs prompt length", "",
              "Continuations sampled at temperature 1 (terminals and EOS only) after `[BOS] MASK*D w_1..w_k`; "
              "accepted when the whole document is in the language of its own metadata (exact DP).", "",
              "| k | " + " | ".join(positions) + " |", "|---|" + "---|" * len(positions)]
    for d, row in summ["per_meta_depth"].items():
        lines.append(f"| D_M={d} | " + " | ".join(f"{row['grammar'][k]:.3f}" for k in positions) + " |")
    lines.append("| E[p(j given prompt)] | " + " | ".join(f"{ref['identification'].get(k, float('nan')):.3f}"
                                                        for k in positions) + " |")
    lines.append("| prompts | " + " | ".join(str(ref["prompt_counts"].get(k, 0)) for k in positions) + " |")
    lines += ["", "![figure C](fig_c_grammar.png)", ""]
    if has_cooldown:
        lines += ["## Cooldown ablation", "",
                  "accuracy - accuracy(D_M=0) on short / long prompts, without and with a metadata-free cooldown.", "",
                  "| run | short | short, cooldown | long | long, cooldown |", "|---|---|---|---|---|"]
        for k, v in t["cooldown"].items():
            lines.append(f"| {k} | {_fmt(v['short_base'])} | {_fmt(v['short_cooldown'])} | {_fmt(v['long_base'])} "
                         f"| {_fmt(v['long_cooldown'])} |")
        lines += ["", "![cooldown](fig_cooldown.png)", ""]
    lines += ["## Runs", "", "| run | final train loss | train s | eval s |", "|---|---|---|---|"]
    for key, r in metrics["runs"].items():
        lines.append(f"| {key} | {r['train']['final_loss']:.4f} | {r['train']['train_seconds']:.0f} | "
                     f"{r['eval_seconds']:.0f} |")
    lines += ["", "![training](training.png)", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
