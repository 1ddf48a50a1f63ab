"""report.md, metrics.json and PNG plots of a distillation run (a causal LM or an encoder)."""
from __future__ import annotations

import json
import math
from pathlib import Path


def is_encoder(metrics: dict) -> bool:
    return metrics.get("kind", "causal_lm") == "encoder"   # runs before encoder support have no "kind"


def heldout_label(metrics: dict) -> str:
    """What heldout["loss"] is: the next-token loss (causal LMs) or 1 - cosine to the teacher (encoders)."""
    return "held-out 1 - cosine" if is_encoder(metrics) else "held-out loss"


def _plots(metrics: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    S = metrics["model"]["layers"]
    layers = list(range(S))

    fig, ax = plt.subplots(figsize=(9, 3.5))
    per_head = metrics["dof"]["per_head"]
    for i, heads in enumerate(per_head):
        ax.scatter([i] * len(heads), heads, s=10, color="tab:gray", alpha=0.6, label="heads" if i == 0 else None)
    ax.plot(layers, metrics["dof"]["per_layer"], "o-", color="tab:red", label="layer (max over heads)")
    ax.set(xlabel="layer", ylabel=f"DoF (lambda={metrics['dof']['lam']:g})", title="Degrees of freedom per layer/head")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dof_per_layer.png", dpi=120)
    files.append("dof_per_layer.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.5))
    for rule, dims in metrics["allocations"].items():
        ax.plot(layers, dims, "o-", label=f"{rule} (total {sum(dims)})", markersize=3)
    ax.set(xlabel="layer", ylabel="feature dim M", title=f"Allocated feature dims, budget C={metrics['config']['budget']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "allocations.png", dpi=120)
    files.append("allocations.png")
    plt.close(fig)

    summary = metrics["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    rules = list(summary)
    axes[0].bar(rules, [summary[r]["loss_mean"] for r in rules], yerr=[summary[r]["loss_std"] for r in rules],
                capsize=4, color="tab:blue")
    axes[0].axhline(metrics["teacher"]["heldout"]["loss"], color="k", ls="--", label="teacher")
    lo = min(metrics["teacher"]["heldout"]["loss"], *(summary[r]["loss_mean"] for r in rules))
    axes[0].set_ylim(bottom=max(0.0, lo - 0.5))
    if is_encoder(metrics):
        axes[0].set(ylabel="1 - cosine to the teacher", title="Held-out 1 - cosine of mean-pooled final hidden states")
    else:
        axes[0].set(ylabel="held-out loss (nats)", title="Held-out next-token loss (mean +- std over seeds)")
    axes[0].legend()
    for rule in rules:
        axes[1].plot(layers, summary[rule]["kl_per_layer"], "o-", markersize=3, label=rule)
    axes[1].set(xlabel="layer", ylabel="KL(teacher row || student row)", title="Attention-row KL per layer",
                yscale="log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss_and_kl.png", dpi=120)
    files.append("loss_and_kl.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, run in metrics["runs"].items():
        ax.plot([h["step"] for h in run["history"]], [h["loss"] for h in run["history"]], label=key)
    ax.set(xlabel="step", ylabel=f"{metrics['config']['loss']} loss (mean over layers)", title="Training",
           yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=120)
    files.append("training.png")
    plt.close(fig)
    return files


def _tp_rows(label: str, tp: dict) -> list[str]:
    rows = [f"| {label} | prefill T={p['T']} | {p['ms']:.1f} ms | {p['tokens_per_s']:.0f} tok/s | |"
            for p in tp["prefill"]]
    if "generate" not in tp:   # encoders: the encoder forward only
        return rows
    g = tp["generate"]
    mem = f"{g['peak_mem_gb']:.2f} GB" if "peak_mem_gb" in g else ""
    rows.append(f"| {label} | generate ctx {g['context']}, {g['new_tokens']} new | {g['seconds']:.2f} s "
                f"| {g['tokens_per_s']:.1f} tok/s | {mem} |")
    f = tp.get("fixed_steps")
    if f:
        how = "CUDA graph per token" if f.get("cuda_graph") else "eager"
        mem = f"{f['peak_mem_gb']:.2f} GB" if "peak_mem_gb" in f else ""
        rows.append(f"| {label} | greedy_decode ({how}) ctx {f['context']}, {f['new_tokens']} new | "
                    f"{f['seconds']:.2f} s | {f['tokens_per_s']:.1f} tok/s | {mem} |")
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _causal_table(metrics: dict) -> list[str]:
    teacher = metrics["teacher"]["heldout"]
    rows = [["teacher (softmax)", "-", f"{teacher['loss']:.4f}", "0", f"{teacher['ppl']:.2f}", "-"]]
    for rule, row in metrics["summary"].items():
        rows.append([rule, str(row["total_dim"]), f"{row['loss_mean']:.4f} +- {row['loss_std']:.4f} (n={row['n']})",
                     f"{row['gap']:+.4f}", f"{math.exp(row['loss_mean']):.2f}", f"{row['kl_mean']:.4f}"])
        stage2 = metrics["config"].get("stage2", "finetune")
        for name, label in (("linear_only", "without its window (linear only)"), ("stage2", f"+ stage 2 ({stage2})"),
                            ("stage2_linear_only", f"+ stage 2 ({stage2}), without its window")):
            if f"{name}_loss_mean" in row:
                rows.append([f"{rule} {label}", str(row["total_dim"]),
                             f"{row[f'{name}_loss_mean']:.4f} +- {row.get(f'{name}_loss_std', 0.0):.4f} (n={row['n']})",
                             f"{row[f'{name}_gap']:+.4f}", f"{math.exp(row[f'{name}_loss_mean']):.2f}", "-"])
    return ["## Held-out next-token loss", ""] + _table(
        ["model", "total feature dim", "held-out loss (mean +- std)", "gap to teacher", "ppl", "mean attention KL"],
        rows)


def _encoder_table(metrics: dict) -> list[str]:
    teacher = metrics["teacher"]["heldout"]
    rows = [["teacher (softmax)", "-", f"{teacher['loss']:.4f}", f"{teacher['cosine']:.4f}",
             f"{teacher['hidden_rel_err']:.4f}", "-"]]
    for rule, row in metrics["summary"].items():
        cos_min = min(r["heldout"]["cosine_min"] for r in metrics["runs"].values() if r["rule"] == rule)
        rows.append([rule, str(row["total_dim"]), f"{row['loss_mean']:.4f} +- {row['loss_std']:.4f} (n={row['n']})",
                     f"{row['cosine_mean']:.4f} ({cos_min:.4f})", f"{row['hidden_rel_err_mean']:.4f}",
                     f"{row['kl_mean']:.4f}"])
    intro = (f"An encoder has no next-token loss: on {teacher['sequences']} held-out `[CLS] text [SEP]` sequences "
             f"({teacher['tokens']} unpadded tokens; every second sequence right-padded to exercise the padding "
             "masks) the student's final hidden states are compared with the softmax teacher's: **1 - cosine** = 1 - "
             "mean over sequences of the cosine similarity of the mean-pooled (padding excluded) hidden states "
             "(the sentence embedding of mean-pooling encoders such as all-MiniLM-L6-v2), and the relative L2 error "
             "||h - h_teacher|| / ||h_teacher|| over all unpadded tokens. The attention KL is over unpadded rows and "
             "keys of the first held-out batch.")
    return ["## Held-out fidelity to the teacher (encoder)", "", intro, ""] + _table(
        ["model", "total feature dim", "1 - cosine (mean +- std)", "mean cosine (min)", "hidden rel. L2 error",
         "mean attention KL"], rows)


def write_report(metrics: dict, out: Path, command: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _plots(metrics, out)
    cfg = metrics["config"]
    encoder = is_encoder(metrics)
    label = heldout_label(metrics)
    lines = [
        f"# Distillation of {cfg['model']} into linear attention ({cfg['preset']} preset)", "",
        f"Command: `{command}`", "",
        f"Device {metrics['device']} ({metrics['dtype']}); text: {metrics['provenance']}; tokens: calibration "
        f"{metrics['tokens']['calib']}, training {metrics['tokens']['train']}, held-out {metrics['tokens']['heldout']}; "
        f"context {cfg['context']}; feature map {cfg['feature_map']}; loss {cfg['loss']} "
        f"(lr z {cfg['lr_z']}, alpha {cfg['lr_alpha']}); budget C = {cfg['budget']} per layer; "
        f"seeds {list(cfg['seeds'])}.", ""]
    extras = [text for cond, text in (
        (cfg.get("window"), f"sliding-window softmax hybrid in every linear layer: the last {cfg.get('window')} keys "
                            "of each query by softmax, older keys by linear attention, one normalizer (rows "
                            "'without its window' evaluate the same feature maps as plain linear attention)"),
        (cfg.get("softmax_layers"), f"softmax layers {list(cfg.get('softmax_layers') or [])}"),
        (cfg.get("stage2", "none") != "none" and cfg.get("stage2_steps"),
         f"stage 2 {cfg.get('stage2')}: {cfg.get('stage2_steps')} steps of end-to-end next-token training of the "
         f"feature maps (lr {cfg.get('stage2_lr')})" + (f" and LoRA rank {cfg.get('lora_rank')} (alpha "
                                                       f"{cfg.get('lora_alpha')}, lr {cfg.get('lora_lr')}) on the "
                                                       "attention projections" if cfg.get("stage2") == "lora"
                                                       else ""))) if cond]
    if extras:
        lines += ["Ablations: " + "; ".join(extras) + ".", ""]
    lines += _encoder_table(metrics) if encoder else _causal_table(metrics)
    lines += ["", "![loss and KL](loss_and_kl.png)", "", "## Degrees of freedom and allocations", "",
              f"DoF at lambda = {metrics['dof']['lam']:g} from {metrics['dof']['samples_per_head']} sampled "
              "q/k vectors per head (post-RoPE in RoPE models; trace-normalised Gram of exp(x.y/sqrt d)); layer "
              "value = max over heads.",
              "", "| layer | DoF (max head) | heads (min / median / max) | " +
              " | ".join(metrics["allocations"]) + " |",
              "|---|---|---|" + "---|" * len(metrics["allocations"])]
    for i, (d, heads) in enumerate(zip(metrics["dof"]["per_layer"], metrics["dof"]["per_head"])):
        hs = sorted(heads)
        dims = " | ".join(str(metrics["allocations"][r][i]) for r in metrics["allocations"])
        lines.append(f"| {i} | {d:.1f} | {hs[0]:.1f} / {hs[len(hs) // 2]:.1f} / {hs[-1]:.1f} | {dims} |")
    lines += ["", "![DoF](dof_per_layer.png)", "", "![allocations](allocations.png)", "",
              "## Per-run results", "", f"| run | {label} | mean KL | train s |", "|---|---|---|---|"]
    for key, run in metrics["runs"].items():
        kl = [x for x in run["kl_per_layer"] if x == x]
        lines.append(f"| {key} | {run['heldout']['loss']:.4f} | {sum(kl) / max(1, len(kl)):.4f} "
                     f"| {run['train_seconds']:.0f} |")
    lines += ["", "![training](training.png)", ""]
    if "throughput" in metrics["teacher"] and "throughput" in metrics.get("student", {}):
        lines += ["## Throughput (B=1)", "", "| model | what | time | rate | peak memory |", "|---|---|---|---|---|"]
        lines += _tp_rows("teacher (SDPA)" if encoder else "teacher (SDPA, KV cache)", metrics["teacher"]["throughput"])
        lines += _tp_rows(f"student ({metrics['student']['rule']}, "
                          f"{'linear attention' if encoder else 'recurrent state'})", metrics["student"]["throughput"])
        if "throughput_linear_only" in metrics["student"]:
            lines += _tp_rows(f"student ({metrics['student']['rule']}, window off)",
                              metrics["student"]["throughput_linear_only"])
        skipped = metrics["teacher"]["throughput"].get("skipped_lengths")
        if skipped:
            lines.append(f"\nNot measured: T = {skipped} (beyond the encoder's max_position_embeddings).")
        lines.append("")
    if "text" in metrics["teacher"]:
        lines += ["## Generated text (greedy)", ""]
        for prompt, t, s in zip(cfg["prompts"], metrics["teacher"]["text"], metrics["student"]["text"]):
            lines += [f"**{prompt}**", "", f"- teacher: {t!r}", f"- student ({metrics['student']['rule']}): {s!r}",
                      ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
