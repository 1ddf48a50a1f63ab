"""`fastattn pcfg`: preset < --config file.yaml < command-line flags; writes the run directory."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from ..driver_config import add_flags
from ..driver_config import resolve as resolve_config
from .config import PRESETS, PCFGRunConfig, make_config


def make_parser(parser):
    return add_flags(parser, PCFGRunConfig, PRESETS, "cpu", "cpu: ~40 min on a 2-core CPU; gpu: ~10M-parameter "
                     "model on one GPU; tiny: smoke test", int_tuples=("seeds", "positions"))


def resolve(args) -> PCFGRunConfig:
    return resolve_config(args, PCFGRunConfig, make_config)


def main(args) -> int:
    """Under torchrun every rank trains; rank 0 alone evaluates and writes the files and the report."""
    from .. import distributed
    cfg = resolve(args)
    distributed.init()
    out = Path(cfg.out)
    command = "fastattn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "fastattn pcfg"
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        (out / "command.txt").write_text(command + "\n")
    from .report import write_report
    from .run import run
    metrics = run(cfg, progress=cfg.progress)
    if not distributed.is_main():
        return 0
    path = write_report(metrics, out, command)
    print(f"report: {path}")
    for d, row in metrics["summary"]["per_meta_depth"].items():
        print(f"  D_M={d}: loss all-MASK {row['loss_mask']:.4f}, with metadata {row['loss_meta']:.4f}; grammatical "
              "accuracy " + " ".join(f"{k}:{v:.2f}" for k, v in row["grammar"].items()))
    for name, target in metrics["summary"].get("targets", {}).items():
        if "holds_every_seed" in target:
            print(f"  target {name}: {'holds' if target['holds_every_seed'] else 'does NOT hold'} on every seed")
    return 0
