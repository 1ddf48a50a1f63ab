"""`fastattn distill`: preset < --config file.yaml < command-line flags; writes the run directory.

Runs unchanged under ``torchrun --nproc_per_node=N -m fastattn.cli distill ...``: rank 0 writes every file and
prints; batch_size is the global batch (a multiple of N)."""
from __future__ import annotations


from ..driver_config import add_flags, start_run_dir
from ..driver_config import resolve as resolve_config
from .config import PRESETS, DistillConfig, make_config


def make_parser(parser):
    return add_flags(parser, DistillConfig, PRESETS, "quick", "quick: 10-20 min on a 2-core CPU; full: one GPU; "
                     "tiny: smoke test", int_tuples=("seeds", "softmax_layers", "throughput_lengths"))


def resolve(args) -> DistillConfig:
    return resolve_config(args, DistillConfig, make_config)


def main(args) -> int:
    from .. import distributed
    cfg = resolve(args)
    distributed.init()
    out, command = start_run_dir(cfg, "distill")
    from .report import heldout_label, write_report
    from .run import run
    metrics = run(cfg)
    if not distributed.is_main():
        return 0
    path = write_report(metrics, out, command)
    print(f"report: {path}")
    label = heldout_label(metrics)
    for rule, row in metrics["summary"].items():
        extra = f", cosine {row['cosine_mean']:.4f}" if "cosine_mean" in row else ""
        print(f"  {rule:>9}: {label} {row['loss_mean']:.4f} +- {row['loss_std']:.4f} "
              f"(gap {row['gap']:+.4f}){extra}, mean KL {row['kl_mean']:.4f}")
    return 0
