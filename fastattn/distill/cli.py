"""`fastattn distill`: preset < --config file.yaml < command-line flags; writes the run directory."""
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
    cfg = resolve(args)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "fastattn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "fastattn distill"
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    (out / "command.txt").write_text(command + "\n")
    from .report import write_report
    from .run import run
    metrics = run(cfg)
    path = write_report(metrics, out, command)
    print(f"report: {path}")
    for rule, row in metrics["summary"].items():
        print(f"  {rule:>9}: held-out loss {row['loss_mean']:.4f} +- {row['loss_std']:.4f} "
              f"(gap {row['gap']:+.4f}), mean KL {row['kl_mean']:.4f}")
    return 0
