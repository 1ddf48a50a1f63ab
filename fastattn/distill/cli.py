"""`fastattn distill`: preset < --config file.yaml < command-line flags; writes the run directory.

Runs unchanged under ``torchrun --nproc_per_node=N -m fastattn.cli distill ...``: rank 0 writes every file and
prints; batch_size is the global batch (a multiple of N)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..driver_config import add_flags
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
    out = Path(cfg.out)
    command = "fastattn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "fastattn distill"
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        (out / "command.txt").write_text(command + "\n")
    from .report import write_report
    from .run import run
    metrics = run(cfg)
    if not distributed.is_main():
        return 0
    path = write_report(metrics, out, command)
    print(f"report: {path}")
    for rule, row in metrics["summary"].items():
        print(f"  {rule:>9}: held-out loss {row['loss_mean']:.4f} +- {row['loss_std']:.4f} "
              f"(gap {row['gap']:+.4f}), mean KL {row['kl_mean']:.4f}")
    return 0
